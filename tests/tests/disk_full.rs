//! A full disk (issue 14): the data dir on a small tmpfs the test mounts. Uploads that do not
//! fit get 507 Insufficient Storage with a reason — never a bare 500 — an import says why it
//! stored nothing more, nothing acknowledged is lost, the store verifies, and once there is
//! room again the same `nix copy` completes.
//!
//! Needs root (to mount the tmpfs); elsewhere it says so and passes without testing anything.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix_p2p_cache_tests::harness::*;
use nix_p2p_cache_tests::{cmd, run_ok, Corpus};

/// A tmpfs of a fixed size, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success(), "remount");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `status` answers of `route` so far (`http_requests_total{route,status}`).
fn answered(d: &Daemon, route: &str, status: u16) -> u64 {
    d.try_metric(&format!(
        "http_requests_total{{route=\"{route}\",status=\"{status}\"}}"
    ))
    .unwrap_or(0)
}

#[test]
fn a_full_disk_is_a_507_loses_nothing_and_uploads_resume_once_there_is_room() {
    let env = Env::new();
    let Some(disk) = Tmpfs::mount(&env.path("disk"), "6m") else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the disk-full test did not run"
        );
        return;
    };
    let corpus = Corpus::small();
    let out = corpus.out_path(1);
    let closure = closure_of(&out);
    let (sk, pk) = env.key("full");
    let signed = env.signed_store("signed", &out, &sk);
    let data = disk.0.join("data");
    let token = env.path("token").display().to_string();
    let args = [
        "--upload-token-file",
        token.as_str(),
        "--trusted-public-key",
        pk.as_str(),
    ];
    let d = Daemon::start(&data, &args);
    let up = env.upload(&signed, &d.url(), &out);
    assert!(!up.status.success(), "6 MB cannot hold the closure");
    let full = answered(&d, "put-nar", 507) + answered(&d, "put-narinfo", 507);
    assert!(full > 0, "a full disk answers 507: {}", text(&up));
    for route in ["put-nar", "put-narinfo"] {
        assert_eq!(
            answered(&d, route, 500),
            0,
            "{route}: a bare 500\n{}",
            d.stderr()
        );
    }
    d.assert_alive();
    let stored = d.metric("store_narinfos");
    d.stop();
    // Everything acknowledged is whole.
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    // An import onto the full disk (a second data dir on it): it says why, and panics not.
    let imp = cmd()
        .args(["import", "--data-dir"])
        .arg(disk.0.join("imported"))
        .args(["--from", &corpus.xz_url()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&imp.stderr);
    assert_eq!(imp.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left on device") && !err.contains("panicked"),
        "{err}"
    );
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    let _ = fs::remove_dir_all(disk.0.join("imported"));

    // Room again: the same copy completes, and Nix gets the closure back byte-identical.
    disk.resize("400m");
    let d = Daemon::start(&data, &args);
    assert_eq!(d.metric("store_narinfos"), stored);
    let up = env.upload(&signed, &d.url(), &out);
    assert!(
        up.status.success(),
        "nix copy after freeing space: {}",
        text(&up)
    );
    env.copy_closure_ok("back", &d, Some(&pk), &out, &closure, &[]);
    d.stop();
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
}
