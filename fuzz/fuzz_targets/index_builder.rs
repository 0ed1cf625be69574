#![no_main]
//! `cargo fuzz run index_builder`: see `imgd_core::fuzzing::index_builder`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| imgd_core::fuzzing::index_builder(data));
