#![no_main]
//! `cargo fuzz run manifest_parse`: see `imgd_core::fuzzing::manifest_parse`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| imgd_core::fuzzing::manifest_parse(data));
