#![no_main]
//! `cargo fuzz run index_zstd_chunked`: see `imgd_core::fuzzing::index_zstd_chunked`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| imgd_core::fuzzing::index_zstd_chunked(data));
