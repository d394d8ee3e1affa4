//! `nix-p2p-cache doctor` (issue 15) against the real daemon and the real Nix (its settings
//! from `NIX_CONFIG`, its narinfo disk cache under `XDG_CACHE_HOME`): a correct setup is all
//! ok with exit status 0; each broken setup gets its FAIL (or warn) line and a non-zero exit.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use nix_p2p_cache_tests::harness::{free_port, Daemon, Env};
use nix_p2p_cache_tests::{cmd, nix, run_ok};
use serde_json::Value;

const CACHE_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// Nix's settings for a doctor run.
fn nix_conf(substituters: &str, keys: &str) -> String {
    format!(
        "substituters = {substituters}\ntrusted-public-keys = {keys}\nrequire-sigs = true\n\
         experimental-features = nix-command\n"
    )
}

/// A report: exit status, and each check's (status, detail + fix) by name.
struct Report {
    code: i32,
    checks: BTreeMap<String, (String, String)>,
    raw: String,
}

impl Report {
    fn status(&self, check: &str) -> &str {
        &self
            .checks
            .get(check)
            .unwrap_or_else(|| panic!("no {check} check: {}", self.raw))
            .0
    }

    fn text(&self, check: &str) -> &str {
        &self.checks[check].1
    }

    /// Asserts that `check` has `status` and its text mentions every one of `words`.
    fn assert(&self, check: &str, status: &str, words: &[&str]) {
        assert_eq!(self.status(check), status, "{check}: {}", self.raw);
        for w in words {
            assert!(
                self.text(check).contains(w),
                "{check} does not mention {w:?}: {}",
                self.raw
            );
        }
    }
}

fn doctor_cmd(url: &str, conf: &str, xdg: &Path) -> Command {
    let mut c = cmd();
    c.args(["doctor", "--url", url])
        .env("NIX_CONFIG", conf)
        .env("XDG_CACHE_HOME", xdg)
        .env_remove("NIX_P2P_CACHE_CONFIG");
    c
}

fn doctor(url: &str, conf: &str, xdg: &Path) -> Report {
    let out = doctor_cmd(url, conf, xdg).arg("--json").output().unwrap();
    let raw = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json is not JSON ({e}): {raw}"));
    let checks = v
        .as_array()
        .expect("an array")
        .iter()
        .map(|c| {
            let fix = c["fix"].as_str().unwrap_or("");
            (
                c["check"].as_str().unwrap().to_string(),
                (
                    c["status"].as_str().unwrap().to_string(),
                    format!("{} {fix}", c["detail"].as_str().unwrap()),
                ),
            )
        })
        .collect();
    Report {
        code: out.status.code().expect("an exit status"),
        checks,
        raw,
    }
}

/// Whether the filesystem of `dir` is below doctor's free-space floor (1 GiB or 5 %), as `df`
/// says: then the disk-space check rightly warns on this machine (a shared, busy disk).
fn disk_is_low(dir: &Path) -> bool {
    let out = run_ok(
        Command::new("df")
            .args(["-B1", "--output=avail,size"])
            .arg(dir),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let nums: Vec<f64> = text
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let (avail, size) = (nums[0], nums[1]);
    avail < (1u64 << 30) as f64 || avail < size * 0.05
}

/// The exit status of an otherwise correct setup: 0, or 3 (a warning) when the disk is low.
fn ok_code(dir: &Path) -> i32 {
    if disk_is_low(dir) {
        3
    } else {
        0
    }
}

/// This process's soft open-files limit (the daemons inherit it).
fn own_open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(u64::MAX)
}

#[test]
fn a_correct_setup_is_all_ok() {
    let env = Env::new();
    let (_, pk) = env.key("doctor");
    // The upstream is another daemon: its HTTP answers carry a Date for the clock check.
    let up = Daemon::start(&env.path("up"), &[]);
    let d = Daemon::start(
        &env.path("data"),
        &[
            "--upstream",
            &up.url(),
            "--trusted-public-key",
            &pk,
            "--no-mdns",
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
    );
    let conf = nix_conf(&d.url(), &format!("{CACHE_KEY} {pk}"));
    let r = doctor(&d.url(), &conf, &env.xdg("doctor"));
    for check in [
        "daemon",
        "http-port",
        "substituters",
        "substituter-order",
        "trusted-keys",
        "narinfo-cache",
        "p2p-ports",
        "clock",
    ] {
        assert_eq!(r.status(check), "ok", "{check}: {}", r.raw);
    }
    let low = disk_is_low(&env.path("data"));
    r.assert(
        "disk-space",
        if low { "warn" } else { "ok" },
        &[&env.path("data").display().to_string()],
    );
    r.assert("trusted-keys", "ok", &["(2)"]);
    r.assert("clock", "ok", &[&up.url()]);
    r.assert("p2p-ports", "ok", &["127.0.0.1:"]);
    r.assert("reachability", "skip", &["unknown"]);
    if own_open_files_limit() >= 4096 {
        r.assert("open-files", "ok", &[]);
        assert_eq!(r.code, ok_code(&env.path("data")), "{}", r.raw);
        // The text: one line per check, each ok or skip (but a low disk).
        let out = doctor_cmd(&d.url(), &conf, &env.xdg("doctor"))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.lines().count(), r.checks.len(), "{text}");
        for l in text.lines() {
            assert!(
                l.starts_with("ok ")
                    || l.starts_with("skip ")
                    || (low && l.starts_with("warn disk-space: ")),
                "{l}"
            );
        }
    }
    d.stop();
    up.stop();
}

#[test]
fn a_daemon_that_does_not_answer_fails() {
    let env = Env::new();
    let conf = nix_conf("", CACHE_KEY);
    let url = format!("http://127.0.0.1:{}", free_port());
    let r = doctor(&url, &conf, &env.xdg("doctor"));
    assert_eq!(r.code, 1, "{}", r.raw);
    r.assert("daemon", "fail", &["nothing answers", &url, "start it"]);
    r.assert("http-port", "ok", &["free"]);
    // Something else holds the port and drops every connection.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in squatter.incoming() {
            drop(c);
        }
    });
    let url = format!("http://127.0.0.1:{port}");
    let r = doctor(&url, &conf, &env.xdg("doctor"));
    assert_eq!(r.code, 1, "{}", r.raw);
    r.assert("daemon", "fail", &[]);
    r.assert("http-port", "fail", &["taken by a program", "ss -ltnp"]);
}

#[test]
fn nix_not_set_up_for_the_daemon_fails() {
    let env = Env::new();
    let (_, pk) = env.key("doctor");
    let other = Daemon::start(&env.path("other"), &[]);
    let d = Daemon::start(&env.path("data"), &["--trusted-public-key", &pk]);
    let keys = format!("{CACHE_KEY} {pk}");
    let xdg = env.xdg("doctor");

    // Not a substituter at all.
    let r = doctor(&d.url(), &nix_conf(&other.url(), &keys), &xdg);
    assert_eq!(r.code, 1, "{}", r.raw);
    r.assert(
        "substituters",
        "fail",
        &["not in Nix's substituters", "substituters = "],
    );

    // Listed, but after a substituter of the same priority (30): Nix asks that one first.
    let r = doctor(
        &d.url(),
        &nix_conf(&format!("{} {}", other.url(), d.url()), &keys),
        &xdg,
    );
    assert_eq!(r.code, 1, "{}", r.raw);
    r.assert("substituters", "ok", &[]);
    r.assert("substituter-order", "fail", &[&other.url(), "?priority=10"]);

    // A lower priority puts it first whatever the order; so does listing it first.
    for subs in [
        format!("{} {}?priority=10", other.url(), d.url()),
        format!("{} {}", d.url(), other.url()),
    ] {
        let r = doctor(&d.url(), &nix_conf(&subs, &keys), &xdg);
        r.assert("substituter-order", "ok", &["first"]);
    }

    // The daemon's key is not one Nix trusts.
    let r = doctor(&d.url(), &nix_conf(&d.url(), CACHE_KEY), &xdg);
    assert_eq!(r.code, 1, "{}", r.raw);
    r.assert("trusted-keys", "fail", &[&pk, "extra-trusted-public-keys"]);
    d.stop();
    other.stop();
}

#[test]
fn a_remembered_miss_of_a_path_the_daemon_now_has_fails() {
    let env = Env::new();
    let d = Daemon::start(
        &env.path("data"),
        &["--upload-token-file", env.path("token").to_str().unwrap()],
    );
    let file = env.path("doctor-file");
    std::fs::write(
        &file,
        format!("doctor {}\n", nix_p2p_cache_tests::harness::unique()),
    )
    .unwrap();
    let out = run_ok(Command::new("nix-store").arg("--add").arg(&file));
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let xdg = env.xdg("doctor");
    let conf = nix_conf(&d.url(), CACHE_KEY).replace("require-sigs = true", "require-sigs = false");

    // Nix asks the daemon, which does not have the path: Nix remembers the miss.
    let asked = nix("nix", &xdg)
        .args(["path-info", "--store", &d.url(), &path])
        .output()
        .unwrap();
    assert!(!asked.status.success());
    let r = doctor(&d.url(), &conf, &xdg);
    r.assert("narinfo-cache", "ok", &["has none"]);
    assert_eq!(r.code, ok_code(&env.path("data")), "{}", r.raw);

    // The daemon gets it (an upload from elsewhere, with its own Nix cache dir).
    let up = nix("nix", &env.xdg("uploader"))
        .args(["copy", "--to", &d.url(), "--option", "netrc-file"])
        .arg(env.path("netrc"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let r = doctor(&d.url(), &conf, &xdg);
    assert_eq!(r.code, 1, "{}", r.raw);
    let hash = &path["/nix/store/".len().."/nix/store/".len() + 32];
    r.assert(
        "narinfo-cache",
        "fail",
        &[
            hash,
            "binary-cache-v6.sqlite",
            "narinfo-cache-negative-ttl 0",
        ],
    );
    d.stop();
}

#[test]
fn a_low_open_files_limit_warns_on_a_node_serving_peers() {
    let env = Env::new();
    let d = Daemon::start_under(
        &["prlimit", "--nofile=1024:1024", "--"],
        &env.path("data"),
        &["--no-mdns", "--p2p-listen", "/ip4/127.0.0.1/tcp/0"],
    );
    let r = doctor(&d.url(), &nix_conf(&d.url(), CACHE_KEY), &env.xdg("doctor"));
    r.assert("open-files", "warn", &["1024", "LimitNOFILE"]);
    assert_eq!(r.code, 3, "warnings only: {}", r.raw);
    d.stop();
}

/// With the daemon down, `--config` says where it would listen and keep its data: a P2P port
/// another program holds is a failure (the daemon could not start), the data dir's disk is
/// checked.
#[test]
fn with_the_daemon_down_its_config_names_the_ports_and_the_data_dir() {
    let env = Env::new();
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p2p_port = squatter.local_addr().unwrap().port();
    let http_port = free_port();
    let config = env.path("config.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{http_port}\"\ndata-dir = {:?}\n\
             p2p-listen = [\"/ip4/127.0.0.1/tcp/{p2p_port}\"]\n",
            env.path("data").display().to_string()
        ),
    )
    .unwrap();
    let out = cmd()
        .args(["doctor", "--json", "--config"])
        .arg(&config)
        .env("NIX_CONFIG", nix_conf("", CACHE_KEY))
        .env("XDG_CACHE_HOME", env.xdg("doctor"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let find = |name: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name}: {v}"))
            .clone()
    };
    assert_eq!(find("daemon")["status"], "fail", "{v}");
    assert!(find("daemon")["detail"]
        .as_str()
        .unwrap()
        .contains(&format!("127.0.0.1:{http_port}")));
    assert_eq!(find("http-port")["status"], "ok", "{v}");
    let p2p = find("p2p-ports");
    assert_eq!(p2p["status"], "fail", "{v}");
    assert!(p2p["detail"]
        .as_str()
        .unwrap()
        .contains(&format!("127.0.0.1:{p2p_port} is taken")));
    let disk = find("disk-space");
    assert_ne!(disk["status"], "skip", "{v}");
    assert!(disk["detail"]
        .as_str()
        .unwrap()
        .contains(&env.path("data").display().to_string()));
    drop(squatter);
}

/// Without a `nix` program to ask, Nix's settings are read from the files Nix reads
/// (`$NIX_CONF_DIR/nix.conf`, its includes, the user's files) and `NIX_CONFIG`.
#[test]
fn without_nix_show_config_the_nix_conf_files_are_read() {
    let env = Env::new();
    let d = Daemon::start(&env.path("data"), &[]);
    // A PATH with sqlite3 but no nix.
    let bin = env.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink("/usr/bin/sqlite3", bin.join("sqlite3")).unwrap();
    let conf_dir = env.path("etc-nix");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::write(
        conf_dir.join("nix.conf"),
        "substituters = https://a.invalid\ninclude more.conf\n",
    )
    .unwrap();
    std::fs::write(
        conf_dir.join("more.conf"),
        format!("extra-substituters = {}\n", d.url()),
    )
    .unwrap();
    let run = |nix_config: Option<&str>| {
        let mut c = cmd();
        c.args(["doctor", "--json", "--url", &d.url()])
            .env("PATH", &bin)
            .env("NIX_CONF_DIR", &conf_dir)
            .env("NIX_USER_CONF_FILES", env.path("none.conf"))
            .env("XDG_CACHE_HOME", env.xdg("doctor"))
            .env_remove("NIX_CONFIG");
        if let Some(n) = nix_config {
            c.env("NIX_CONFIG", n);
        }
        let out = c.output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "substituters")
            .unwrap()
            .clone()
    };
    let s = run(None);
    assert_eq!(s["status"], "ok", "{s}");
    let detail = s["detail"].as_str().unwrap();
    assert!(
        detail.contains(&conf_dir.join("nix.conf").display().to_string())
            && detail.contains("nix show-config"),
        "{s}"
    );
    // NIX_CONFIG comes last and wins.
    let s = run(Some("substituters = https://b.invalid"));
    assert_eq!(s["status"], "fail", "{s}");
    d.stop();
}
