//! imgd test fixtures.
