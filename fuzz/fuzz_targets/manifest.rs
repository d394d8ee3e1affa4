//! Fuzz target `manifest`: the properties are asserted in `nix_p2p_cache::fuzzing::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nix_p2p_cache::fuzzing::manifest(data));
