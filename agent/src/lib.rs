//! imgd agent: the node daemon next to the container engine.

pub mod cache;
pub mod dataplane;
