//! Helpers for the black-box tests: find the built binary, run the real Nix with settings
//! that keep it offline and quiet, and build the small multi-generation corpus once.

pub mod harness;
pub mod test_upstream;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Cargo's target dir (`CARGO_TARGET_DIR`, else `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Path of the built `nix-p2p-cache` binary (built on first use if missing).
pub fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("NIX_P2P_CACHE_BIN") {
            return PathBuf::from(p);
        }
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "-p", "nix-p2p-cache", "--bin", "nix-p2p-cache"])
            .current_dir(root());
        // Cargo gives a test process its own package's variables; build scripts that watch
        // them (ring's) would otherwise see a change and rebuild half the dependency tree.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k == "OUT_DIR"
                || k == "CARGO_PRIMARY_PACKAGE"
                || [
                    "CARGO_PKG_",
                    "CARGO_MANIFEST_",
                    "CARGO_CRATE_",
                    "CARGO_BIN_",
                ]
                .iter()
                .any(|p| k.starts_with(p))
            {
                build.env_remove(&*k);
            }
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "cargo build failed");
        target_dir().join("debug/nix-p2p-cache")
    })
    .clone()
}

/// A `nix-p2p-cache` command.
pub fn cmd() -> Command {
    Command::new(bin())
}

/// Settings that keep Nix 2.8 offline and quiet in tests.
pub const NIX_CONFIG: &str = "sandbox = false
build-users-group =
substituters =
require-sigs = false
experimental-features = nix-command
connect-timeout = 1
warn-dirty = false
";

/// A Nix command with the test settings and a private cache dir under `xdg_cache`.
pub fn nix(program: &str, xdg_cache: &Path) -> Command {
    let mut c = Command::new(program);
    c.env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg_cache)
        .env("NIX_PATH", "");
    c
}

/// Runs a command, panicking with its output if it fails.
pub fn run_ok(c: &mut Command) -> Output {
    let out = c.output().unwrap_or_else(|e| panic!("spawning {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The small corpus (2 generations of `corpus/closure.nix`, scale small): built once per
/// machine under the target dir, guarded by a file lock across test processes.
pub struct Corpus {
    pub dir: PathBuf,
}

impl Corpus {
    /// Imports every path of the corpus (its xz cache) into the data dir `data` (pinned).
    pub fn import_into(&self, data: &Path) {
        run_ok(
            cmd()
                .args(["import", "--data-dir"])
                .arg(data)
                .args(["--from", &self.xz_url()]),
        );
    }

    pub fn small() -> &'static Corpus {
        static C: OnceLock<Corpus> = OnceLock::new();
        C.get_or_init(|| {
            let dir = target_dir().join("test-corpus-small");
            std::fs::create_dir_all(&dir).expect("creating corpus dir");
            let lock =
                File::create(target_dir().join("test-corpus-small.lock")).expect("lock file");
            lock.lock().expect("locking corpus");
            run_ok(
                Command::new(root().join("corpus/build.sh"))
                    .args(["--scale", "small", "--generations", "2", "--out"])
                    .arg(&dir),
            );
            drop(lock);
            Corpus { dir }
        })
    }

    pub fn xz_url(&self) -> String {
        format!("file://{}", self.dir.join("cache-xz").display())
    }

    pub fn none_url(&self) -> String {
        format!("file://{}", self.dir.join("cache-none").display())
    }

    /// Store paths of the closure of generation `gen`.
    pub fn paths(&self, gen: u32) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(format!("gen-{gen}.paths")))
            .expect("reading paths")
            .lines()
            .map(String::from)
            .collect()
    }

    /// Top-level out path of generation `gen`.
    pub fn out_path(&self, gen: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("gen-{gen}.out")))
            .expect("reading out path")
            .trim()
            .to_string()
    }
}

/// `stats --json` of a data dir.
pub fn stats(data: &Path) -> serde_json::Value {
    let out = run_ok(cmd().args(["stats", "--json", "--data-dir"]).arg(data));
    serde_json::from_slice(&out.stdout).expect("stats --json prints JSON")
}

/// `sha256:<nix-base32>` of `data`, as a narinfo's `NarHash` — computed by the real Nix
/// (`nix-hash --to-base32`), not by the code under test.
pub fn nar_hash_of(data: &[u8]) -> String {
    use sha2::Digest as _;
    let hex: String = sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = run_ok(Command::new("nix-hash").args(["--type", "sha256", "--to-base32", &hex]));
    format!("sha256:{}", String::from_utf8(out.stdout).unwrap().trim())
}

/// A NAR holding one regular (non-executable) file with `contents`.
pub fn nar_of_file(contents: &[u8]) -> Vec<u8> {
    use nix_p2p_cache::core::nar::{write_nar, Node};
    let mut out = Vec::new();
    write_nar(
        &mut out,
        &Node::Regular {
            executable: false,
            contents: contents.to_vec(),
        },
    )
    .expect("writing to a Vec");
    out
}
