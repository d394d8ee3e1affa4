//! The fuzz targets in the ordinary test suite (no instrumentation, stable Rust): every file
//! of `fuzz/corpus/<target>/` through its target, then seeded mutations of them, so CI runs
//! every target's properties on every build (`docs/fuzzing.md`).

use std::path::PathBuf;

use super::{Rng, TARGETS};

/// Mutated inputs per target (a few thousand in all; the `http` target is the slow one).
fn mutations(target: &str) -> usize {
    match target {
        "http" => 300,
        _ => 1500,
    }
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

/// A libFuzzer-style mutation of `input` (bit flips, byte sets, interesting integers, cuts,
/// duplications, splices with `other`).
fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len() as u64;
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len) as usize;
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len) as usize;
                v[i] = [0, 0xff, 0x7f, 0x80, b'\n', b':', b' ', b'/'][rng.below(8) as usize];
            }
            2 if len >= 8 => {
                let i = rng.below(len - 7) as usize;
                let n: u64 = [0, 1, 8, 255, 256, 4096, u64::MAX, 1 << 32][rng.below(8) as usize];
                v[i..i + 8].copy_from_slice(&n.to_le_bytes());
            }
            3 if len > 0 => {
                let at = rng.below(len) as usize;
                v.truncate(at);
            }
            4 if len > 0 => {
                let a = rng.below(len) as usize;
                let b = a + rng.below((len as usize - a) as u64 + 1) as usize;
                let piece = v[a..b].to_vec();
                let at = rng.below(len + 1) as usize;
                v.splice(at..at, piece);
            }
            5 if !other.is_empty() => {
                let a = rng.below(other.len() as u64) as usize;
                let at = rng.below(len + 1) as usize;
                v.truncate(at);
                v.extend_from_slice(&other[a..]);
            }
            _ if len > 0 => {
                let a = rng.below(len) as usize;
                let b = a + rng.below((len as usize - a) as u64 + 1) as usize;
                v.drain(a..b);
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

#[test]
fn every_target_has_a_corpus_and_a_fuzz_target() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, _) in TARGETS {
        assert!(!corpus(name).is_empty(), "fuzz/corpus/{name} is empty");
        let src = root.join("fuzz_targets").join(format!("{name}.rs"));
        assert!(src.is_file(), "{} is missing", src.display());
    }
}

#[test]
fn corpus_replay() {
    for (name, target) in TARGETS {
        let files = corpus(name);
        for (path, data) in &files {
            eprintln!("{name}: {}", path.display());
            target(data);
        }
        let mut rng = Rng(0x5eed ^ name.len() as u64);
        for _ in 0..mutations(name) {
            let a = &files[rng.below(files.len() as u64) as usize].1;
            let b = &files[rng.below(files.len() as u64) as usize].1;
            let input = mutate(a, b, &mut rng);
            let shown: String = input.iter().map(|b| format!("{b:02x}")).collect();
            let r = std::panic::catch_unwind(|| target(&input));
            assert!(r.is_ok(), "{name} failed on mutated input (hex) {shown}");
        }
    }
}

/// Writes the generated seeds of `fuzz/corpus/` (manifests, exchange messages, HTTP requests),
/// from the test vectors and fixtures: `cargo test -p nix-p2p-cache --lib write_seed_corpus
/// -- --ignored`. Files are named by content, so running it again adds nothing new.
#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    for (target, seeds) in super::seeds::all() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for s in seeds {
            let name = format!(
                "seed-{}",
                &crate::core::NarHash::digest(&s).to_base32()[..16]
            );
            std::fs::write(dir.join(name), s).expect("a seed written");
        }
    }
}
