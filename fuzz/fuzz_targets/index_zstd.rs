#![no_main]
//! `cargo fuzz run index_zstd`: see `imgd_core::fuzzing::index_zstd`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| imgd_core::fuzzing::index_zstd(data));
