//! Issue 2 end to end: a closure built with the real `nix-build`, copied with the real
//! `nix copy` to an xz `file://` cache, imported, verified, reassembled byte-identical to
//! `nix-store --dump`; damage and bad input are caught and named.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix_p2p_cache_tests::{cmd, nar_hash_of, run_ok, stats, Corpus};
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

fn packs(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(data.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn closure_imports_verifies_reassembles_and_damage_is_found() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");

    // Import generation 2 by closure, then everything (generation 1 too).
    let out = run_ok(
        cmd()
            .args(["import", "--closure", "--data-dir"])
            .arg(&data)
            .args(["--from", &corpus.xz_url(), &corpus.out_path(2)]),
    );
    let gen2 = corpus.paths(2);
    let s = stats(&data);
    assert_eq!(
        s["narinfos"],
        gen2.len() as u64,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    corpus.import_into(&data);
    let mut all: Vec<String> = corpus.paths(1);
    all.extend(gen2.iter().cloned());
    all.sort();
    all.dedup();
    let s = stats(&data);
    assert_eq!(s["narinfos"], all.len() as u64);
    assert!(s["stored_bytes"].as_u64().unwrap() > 0);
    assert!(
        s["unique_chunk_bytes"].as_u64().unwrap() < s["nar_bytes"].as_u64().unwrap(),
        "two generations must share chunks: {s}"
    );

    // Re-importing changes nothing.
    corpus.import_into(&data);
    // (The index file may grow: last-access times are written. Its size is not content.)
    assert_eq!(content(stats(&data)), content(s.clone()));

    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));

    // Every NAR reassembles byte-identical to what Nix dumps.
    let mut nar_total = 0u64;
    for p in &all {
        let ours = run_ok(cmd().args(["nar", "--data-dir"]).arg(&data).arg(p)).stdout;
        let nix = run_ok(Command::new("nix-store").args(["--dump", p])).stdout;
        assert_eq!(ours.len(), nix.len(), "{p}: NAR length");
        assert!(sha(&ours) == sha(&nix), "{p}: NAR bytes differ");
        nar_total += ours.len() as u64;
    }
    assert_eq!(s["nar_bytes"].as_u64().unwrap(), nar_total);

    // One flipped byte in a pack: verify fails and names what is damaged.
    let pack = packs(&data).pop().unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&pack, &bytes).unwrap();
    let out = cmd()
        .args(["verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success(), "verify must fail on a flipped byte");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("DAMAGED: chunk b"), "{report}");
    assert!(
        report.contains("/nix/store/"),
        "names the damaged store paths: {report}"
    );

    // And the damaged NAR is never produced as a whole.
    let damaged: Vec<&String> = all.iter().filter(|p| report.contains(p.as_str())).collect();
    assert!(!damaged.is_empty());
    for p in damaged {
        let out = cmd()
            .args(["nar", "--data-dir"])
            .arg(&data)
            .arg(p)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{p}: damaged NAR must not be served");
    }
}

/// A one-path `file://` cache copied from the uncompressed corpus cache, for mutation.
struct OnePath {
    dir: tempfile::TempDir,
    hash: String,
    store_path: String,
    narinfo: String,
    nar_url: String,
}

impl OnePath {
    fn new(corpus: &Corpus) -> Self {
        let src = corpus.dir.join("cache-none");
        // The top-level path of generation 1: small, references others.
        let store_path = corpus.out_path(1);
        let base = store_path.trim_start_matches("/nix/store/");
        let hash = base[..32].to_string();
        let narinfo = fs::read_to_string(src.join(format!("{hash}.narinfo"))).unwrap();
        let nar_url = narinfo
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_string();
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("nar")).unwrap();
        fs::copy(src.join(&nar_url), dir.path().join(&nar_url)).unwrap();
        fs::write(dir.path().join(format!("{hash}.narinfo")), &narinfo).unwrap();
        Self {
            dir,
            hash,
            store_path,
            narinfo,
            nar_url,
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    fn nar(&self) -> Vec<u8> {
        fs::read(self.dir.path().join(&self.nar_url)).unwrap()
    }

    fn set_nar(&self, b: &[u8]) {
        fs::write(self.dir.path().join(&self.nar_url), b).unwrap();
    }

    fn set_narinfo(&self, text: &str) {
        fs::write(self.dir.path().join(format!("{}.narinfo", self.hash)), text).unwrap();
    }

    fn with_field(&self, key: &str, value: &str) -> String {
        self.narinfo
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{key}: ")) {
                    format!("{key}: {value}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    }
}

fn assert_refused(data: &Path, one: &OnePath, needle: &[&str]) {
    let out = cmd()
        .args(["import", "--data-dir"])
        .arg(data)
        .args(["--from", &one.url()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "import must fail; stderr: {err}");
    for n in needle {
        assert!(err.contains(n), "stderr should contain {n:?}: {err}");
    }
    let s = stats(data);
    for k in [
        "narinfos",
        "nars",
        "chunks",
        "unique_chunk_bytes",
        "nar_bytes",
    ] {
        assert_eq!(s[k], 0, "{k} after a refused import: {s}");
    }
    for p in fs::read_dir(data.join("packs")).unwrap() {
        let len = p.unwrap().metadata().unwrap().len();
        assert!(len <= 16, "pack keeps {len} bytes of a refused NAR");
    }
}

#[test]
fn bad_input_is_refused_by_name_and_leaves_nothing() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let one = OnePath::new(corpus);
    let good_nar = one.nar();

    // Truncated NAR.
    one.set_nar(&good_nar[..good_nar.len() / 2]);
    assert_refused(&data, &one, &[&one.store_path, "NAR"]);
    one.set_nar(&good_nar);

    // NAR whose hash is not its narinfo's NarHash.
    one.set_narinfo(&one.with_field("NarHash", &nar_hash_of(b"something else")));
    assert_refused(&data, &one, &[&one.store_path, "NarHash"]);

    // Malformed NAR (bad magic), with NarHash/NarSize made to match the bad bytes.
    let mut bad = good_nar.clone();
    let at = bad.windows(13).position(|w| w == b"nix-archive-1").unwrap();
    bad[at + 12] = b'2';
    one.set_nar(&bad);
    one.set_narinfo(&one.with_field("NarHash", &nar_hash_of(&bad)));
    assert_refused(&data, &one, &[&one.store_path, "malformed NAR"]);
    one.set_nar(&good_nar);

    // A narinfo missing NarHash.
    let missing: String = one
        .narinfo
        .lines()
        .filter(|l| !l.starts_with("NarHash:"))
        .map(|l| format!("{l}\n"))
        .collect();
    one.set_narinfo(&missing);
    assert_refused(&data, &one, &[&one.hash, "NarHash"]);

    // A signature by a trusted key name that does not verify.
    let forged = format!(
        "{}Sig: cache.nixos.org-1:{}\n",
        one.narinfo,
        "K0thQEG60rzAK8ZS9f1whb7eRlIshlMDJAm7xvX1oF284H+PTqlicv/wGW6BIj+wWWONHvUZ2MYc+KDArekjDA=="
    );
    one.set_narinfo(&forged);
    assert_refused(&data, &one, &[&one.store_path, "signature"]);

    // The store still works: the good narinfo imports and verifies.
    one.set_narinfo(&one.narinfo);
    run_ok(
        cmd()
            .args(["import", "--data-dir"])
            .arg(&data)
            .args(["--from", &one.url()]),
    );
    assert_eq!(stats(&data)["narinfos"], 1);
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    let ours = run_ok(
        cmd()
            .args(["nar", "--data-dir"])
            .arg(&data)
            .arg(&one.store_path),
    )
    .stdout;
    assert!(ours == good_nar);
}

#[test]
fn kill_9_mid_import_keeps_the_store_consistent() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();

    // Reference: one clean import.
    let clean = tmp.path().join("clean");
    run_ok(
        cmd()
            .args(["import", "--data-dir"])
            .arg(&clean)
            .args(["--from", &corpus.xz_url()]),
    );
    let want = stats(&clean);

    // Kill -9 imports at several points; each time the store must verify.
    let data = tmp.path().join("data");
    for delay_ms in [300u64, 900, 1500] {
        let mut child = cmd()
            .args(["import", "--data-dir"])
            .arg(&data)
            .args(["--from", &corpus.xz_url()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    }
    // Resuming finishes the job, and the result is exactly a clean import: the killed writes'
    // uncommitted pack tails were truncated, not kept.
    corpus.import_into(&data);
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    let got = stats(&data);
    for k in [
        "narinfos",
        "nars",
        "nar_bytes",
        "chunks",
        "unique_chunk_bytes",
    ] {
        assert_eq!(got[k], want[k], "{k}: {got} vs {want}");
    }
    // Metadata records hold commit numbers and times, so their sizes vary by a few bytes.
    let chunk_bytes = |s: &serde_json::Value| {
        s["pack_bytes"].as_u64().unwrap() - s["metadata_bytes"].as_u64().unwrap()
    };
    assert_eq!(chunk_bytes(&got), chunk_bytes(&want), "{got} vs {want}");
}

/// Stats without what depends on the index file's size (redb grows it in steps).
fn content(mut s: serde_json::Value) -> serde_json::Value {
    if let Some(m) = s.as_object_mut() {
        for k in ["index_bytes", "stored_bytes", "cache_bytes", "live_bytes"] {
            m.remove(k);
        }
    }
    s
}

/// `nix-p2p-cache stats | head`: a reader that goes away ends the command quietly (exit 0),
/// never a panic (it used to exit 101 with "failed printing to stdout").
#[test]
fn stats_into_a_closed_pipe_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    nix_p2p_cache_tests::harness::Daemon::start(&data, &[]).stop(); // an empty store
    let stderr = tmp.path().join("stderr");
    // The reader closes its end at once; `stats` writes only after opening the store.
    let out = Command::new("bash")
        .args([
            "-c",
            r#"set -o pipefail; "$0" stats --data-dir "$1" 2>"$2" | (exec 0<&-; sleep 1)"#,
        ])
        .arg(nix_p2p_cache_tests::bin())
        .arg(&data)
        .arg(&stderr)
        .output()
        .unwrap();
    let err = fs::read_to_string(&stderr).unwrap_or_default();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
}

/// SIGTERM right after the daemon said it listens shuts it down cleanly (exit 0): the signal
/// handlers are installed before the `listening` line (they used to be installed only once the
/// server polled them, and an early SIGTERM killed the process).
#[test]
fn sigterm_right_after_start_is_a_clean_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..10 {
        // `stop` sends SIGTERM and asserts exit status 0.
        nix_p2p_cache_tests::harness::Daemon::start(&tmp.path().join(format!("d{i}")), &[]).stop();
    }
}

/// Truncates a file to half its length; returns the old length.
fn cut_in_half(path: &Path) -> u64 {
    let len = fs::metadata(path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    len
}

/// A half-truncated index (issue 14): `stats`, `verify` and `daemon` exit with an error that
/// says the index is damaged and what to do — no panic — and leave the file as it was.
#[test]
fn a_damaged_index_is_a_clear_error_not_a_panic() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    corpus.import_into(&data);
    let index = data.join("index.redb");
    let len = cut_in_half(&index);
    for args in [
        &["stats"][..],
        &["verify"],
        &["daemon", "--listen", "127.0.0.1:0"],
    ] {
        let out = cmd()
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("is damaged") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(fs::metadata(&index).unwrap().len(), len / 2, "never wiped");
}

/// Issue 10: the index is rebuilt from the packs alone — damaged, then lost — and every NAR
/// reassembles byte-identical; a store with packs but no index is never opened as empty.
#[test]
fn a_damaged_or_lost_index_is_rebuilt_from_the_packs() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    corpus.import_into(&data);
    let before = content(stats(&data));
    let index = data.join("index.redb");
    cut_in_half(&index);
    let out = run_ok(cmd().args(["verify", "--repair", "--data-dir"]).arg(&data));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("old index moved to"), "{said}");
    assert_eq!(content(stats(&data)), before, "{said}");

    fs::remove_file(&index).unwrap();
    let packs_before = packs(&data);
    for args in [&["stats"][..], &["daemon", "--listen", "127.0.0.1:0"]] {
        let out = cmd()
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("verify --repair"), "{args:?}: {err}");
    }
    assert_eq!(packs(&data), packs_before);
    for p in &packs_before {
        assert!(
            fs::metadata(p).unwrap().len() > 16,
            "{}: never cut",
            p.display()
        );
    }
    run_ok(cmd().args(["verify", "--repair", "--data-dir"]).arg(&data));
    assert_eq!(content(stats(&data)), before);
    for p in corpus.paths(1).iter().chain(&corpus.paths(2)) {
        let ours = run_ok(cmd().args(["nar", "--data-dir"]).arg(&data).arg(p)).stdout;
        let nix = run_ok(Command::new("nix-store").args(["--dump", p])).stdout;
        assert!(
            sha(&ours) == sha(&nix),
            "{p}: NAR bytes differ after repair"
        );
    }
}

/// Issue 15: an import counts paths the store already holds apart from those it imports —
/// in the text, in `--json` (paths and NAR bytes) and in its progress lines, which say the
/// total and an ETA.
#[test]
fn already_present_paths_are_counted_apart_with_a_total_and_an_eta() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let paths: Vec<String> = corpus.paths(1).into_iter().take(3).collect();
    let nar_size = |p: &str| -> u64 {
        let hash = &p["/nix/store/".len().."/nix/store/".len() + 32];
        let text =
            fs::read_to_string(corpus.dir.join(format!("cache-none/{hash}.narinfo"))).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("NarSize: "))
            .unwrap()
            .parse()
            .unwrap()
    };
    let import = |paths: &[String], json: bool| {
        let mut c = cmd();
        c.args(["import", "--data-dir"])
            .arg(&data)
            .args(["--from", &corpus.none_url()])
            .args(paths)
            .env("NIX_P2P_CACHE_PROGRESS_SECS", "0");
        if json {
            c.arg("--json");
        }
        run_ok(&mut c)
    };
    import(&paths[..1], false);

    let out = import(&paths, true);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["imported"], 2, "{r}");
    assert_eq!(r["already_present"], 1, "{r}");
    assert_eq!(
        r["nar_bytes"],
        nar_size(&paths[1]) + nar_size(&paths[2]),
        "{r}"
    );
    assert_eq!(r["already_present_nar_bytes"], nar_size(&paths[0]), "{r}");
    // Progress (no terminal: a line per path here): the total, the counts apart, an ETA
    // while paths are left.
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("import: ")).collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines.iter().all(|l| l.contains(" of 3 paths")), "{err}");
    assert!(lines[..2].iter().all(|l| l.contains(", eta ")), "{err}");
    assert!(
        lines[2].contains("2 new, 1 already present") && !lines[2].contains("eta"),
        "{err}"
    );

    // All present now: nothing imported, nothing read.
    let out = import(&paths, false);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("imported 0 paths, 0.0 B of NARs (0 NAR files read")
            && text.contains("3 paths already present"),
        "{text}"
    );
}
