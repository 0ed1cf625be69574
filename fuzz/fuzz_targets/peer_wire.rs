#![no_main]
//! `cargo fuzz run peer_wire`: see `imgd_core::fuzzing::peer_wire`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| imgd_core::fuzzing::peer_wire(data));
