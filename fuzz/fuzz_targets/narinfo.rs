//! Fuzz target `narinfo`: the properties are asserted in `nix_p2p_cache::fuzzing::narinfo`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nix_p2p_cache::fuzzing::narinfo(data));
