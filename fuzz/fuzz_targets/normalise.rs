//! Fuzz target `normalise`: the properties are asserted in `nix_p2p_cache::fuzzing::normalise`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nix_p2p_cache::fuzzing::normalise(data));
