#![no_main]
//! `cargo fuzz run index_decode`: see `imgd_core::fuzzing::index_decode`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| imgd_core::fuzzing::index_decode(data));
