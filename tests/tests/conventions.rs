//! Conventions of a well-kept daemon (issue 15): completions and a man page generated from the
//! CLI definition, JSON logs, systemd's readiness notification (`Type=notify`), `--json` on
//! every command that prints state, one spelling per setting (flag = TOML key), and the
//! frictions a new user met (error texts, P2P addresses).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use nix_p2p_cache_tests::harness::{Daemon, Env};
use nix_p2p_cache_tests::{cmd, run_ok};

#[test]
fn completions_and_the_man_page_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run_ok(cmd().args(["completions", shell]));
        let text = String::from_utf8(out.stdout).unwrap();
        for word in ["nix-p2p-cache", "import", "verify", "storage"] {
            assert!(text.contains(word), "{shell}: no {word}");
        }
    }
    let bad = cmd().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
    let man = String::from_utf8(run_ok(cmd().arg("man")).stdout).unwrap();
    assert!(
        man.starts_with(".ie") || man.contains(".TH"),
        "roff: {}",
        &man[..80]
    );
    for word in ["nix-p2p-cache", "daemon", "verify", "completions"] {
        assert!(man.contains(word), "man page: no {word}");
    }
}

#[test]
fn json_logs_and_the_readiness_notification() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let d = Daemon::start_with_env(
        &tmp.path().join("data"),
        &["--log-format", "json"],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("RUST_LOG", "info"),
        ],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 from the daemon");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    let stderr = d.stderr.clone();
    d.stop();
    let logs = std::fs::read_to_string(stderr).unwrap();
    let n = sock.recv(&mut buf).expect("STOPPING=1 from the daemon");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let lines: Vec<&str> = logs.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty(), "info logs expected");
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
}

/// Frictions a new user met (issue 15): `--url` without a scheme, colour codes in logs that go
/// to a file or the journal, nothing said at start about where data goes and how Nix reaches
/// the daemon, sizes without units for `max-upload-size`.
#[test]
fn first_start_says_where_and_how_and_logs_carry_no_colour() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = Daemon::start_with_env(&data, &[], &[("RUST_LOG", "info")]);
    let status = run_ok(cmd().args([
        "status",
        "--json",
        "--url",
        &format!("127.0.0.1:{}", d.port),
    ]));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(v["version"].is_string(), "{v}");
    // `stats` while the daemon holds the store: from the daemon (--url), or it says to give one.
    let url = format!("127.0.0.1:{}", d.port);
    let st = run_ok(
        cmd()
            .args(["stats", "--json", "--url", &url, "--data-dir"])
            .arg(&data),
    );
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["narinfos"], 0, "{st}");
    let locked = cmd()
        .args(["stats", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&locked.stderr);
    assert!(
        locked.status.success() || err.contains("give --url"),
        "{err}"
    );
    // `GET /` (it was a 404) goes to the dashboard; `/help` says what this is and how to point
    // Nix at it.
    use nix_p2p_cache_tests::harness::{get, http};
    let home = http(d.port, &get("/"));
    assert_eq!(home.status, 303);
    assert_eq!(home.header("location"), Some("/ui/"));
    let help = http(d.port, &get("/help"));
    assert_eq!(help.status, 200);
    let help = String::from_utf8(help.body).unwrap();
    assert!(
        help.contains("substituters = http://") && help.contains("/api/status"),
        "{help}"
    );
    let stderr = d.stderr.clone();
    d.stop();
    let logs = std::fs::read_to_string(stderr).unwrap();
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in a log file:\n{logs}"
    );
    assert!(
        logs.contains(&format!(
            "substituters = http://127.0.0.1:{}",
            d_port(&logs)
        )) && logs.contains(&data.display().to_string()),
        "{logs}"
    );

    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, "max-upload-size = \"1.5GiB\"\n").unwrap();
    let out = run_ok(
        cmd()
            .arg("check-config")
            .arg(&cfg)
            .args(["--max-upload-size", "2G"]),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("max-upload-size = 2000000000"), "{text}");
}

/// The port in the daemon's "serving http://127.0.0.1:PORT" line.
fn d_port(logs: &str) -> String {
    let at = logs
        .find("serving http://127.0.0.1:")
        .expect("serving line");
    logs[at + "serving http://127.0.0.1:".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect()
}

/// Error texts say their cause once, and say it (issue 15): a port in use (HTTP and P2P), a
/// data dir that is a file.
#[test]
fn errors_say_their_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let run = |args: &[&str]| {
        let out = cmd().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let d = |n: &str| tmp.path().join(n).display().to_string();
    let http = run(&[
        "daemon",
        "--data-dir",
        &d("a"),
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    assert_eq!(http.matches("Address already in use").count(), 1, "{http}");
    let p2p = run(&[
        "daemon",
        "--data-dir",
        &d("b"),
        "--listen",
        "127.0.0.1:0",
        "--no-mdns",
        "--p2p-listen",
        &format!("/ip4/127.0.0.1/tcp/{port}"),
    ]);
    assert_eq!(p2p.matches("Address already in use").count(), 1, "{p2p}");
    std::fs::write(tmp.path().join("file"), "x").unwrap();
    let file = run(&[
        "daemon",
        "--data-dir",
        &d("file"),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(file.matches("not a directory").count(), 1, "{file}");
}

/// Every command that prints state accepts `--json` and prints one valid JSON document on
/// stdout (issue 15). The commands are read from `help`, so a new one must be added here, to
/// the JSON commands or to those that print no state.
#[test]
fn every_command_that_prints_state_has_json() {
    const NO_STATE: &[&str] = &["completions", "man", "daemon", "nar", "help"];
    let env = Env::new();
    let (sk, pk) = env.key("json");
    let file = env.path("f");
    std::fs::write(
        &file,
        format!("json {}\n", nix_p2p_cache_tests::harness::unique()),
    )
    .unwrap();
    let out = run_ok(
        std::process::Command::new("nix-store")
            .arg("--add")
            .arg(&file),
    );
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let cache = env.signed_file_cache("cache", &path, &sk);
    let data = env.path("data").display().to_string();
    let config = env.path("c.toml");
    std::fs::write(&config, format!("data-dir = {data:?}\n")).unwrap();
    let config = config.display().to_string();

    let mut seen = std::collections::BTreeSet::new();
    let mut json = |args: &[&str]| -> serde_json::Value {
        let out = cmd().args(args).arg("--json").output().unwrap();
        seen.insert(args[0].to_string());
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?} --json is not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let d = ["--data-dir", data.as_str()];
    let v = json(
        &[
            &["import"][..],
            &d,
            &["--from", &cache, "--trusted-public-key", &pk],
        ]
        .concat(),
    );
    assert_eq!(v["imported"], 1, "{v}");
    assert_eq!(json(&[&["stats"][..], &d].concat())["narinfos"], 1);
    assert_eq!(json(&[&["verify"][..], &d].concat())["ok"], true);
    let v = json(&[&["pin"][..], &d, &[&path]].concat());
    assert_eq!(v["paths"][0]["outcome"], "already_pinned", "{v}");
    let v = json(&[&["unpin"][..], &d, &[&path]].concat());
    assert_eq!(v["paths"][0]["outcome"], "unpinned", "{v}");
    assert!(json(&[&["gc"][..], &d].concat()).is_object());
    assert!(json(&[&["undelete"][..], &d, &["--all"]].concat()).is_object());
    assert!(json(&[&["compact"][..], &d].concat()).is_object());
    assert_eq!(json(&["check-config", &config])["data-dir"], data.as_str());

    let daemon = Daemon::start(std::path::Path::new(&data), &[]);
    let url = daemon.url();
    assert_eq!(json(&["status", "--url", &url])["store"]["narinfos"], 1);
    assert!(json(&["peers", "--url", &url]).is_array());
    assert!(json(&["doctor", "--url", &url]).is_array());
    daemon.stop();

    let help = String::from_utf8(run_ok(cmd().arg("help")).stdout).unwrap();
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(commands.len() >= 15, "{help}");
    for c in commands {
        assert!(
            seen.contains(c) || NO_STATE.contains(&c),
            "`{c}` is neither tested with --json nor listed as printing no state"
        );
    }
}

/// One spelling per setting (issue 15): every key of the daemon's TOML config is also its flag,
/// letter for letter, and the old spellings (`--trusted-public-key`, `upstream` /
/// `--upstream`, `bootstrap` / `--bootstrap`) still work.
#[test]
fn config_keys_and_flags_share_their_names_and_old_spellings_still_work() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        "storage = \"s3://bucket/p\"\ns3-endpoint = \"http://127.0.0.1:9\"\ns3-cache-size = 1\n\
         max-cache-size = 1\nupload-rate-limit = 1\ncompact-level = 1\n\
         upload-token-file = \"/t\"\np2p-listen = [\"/ip4/127.0.0.1/tcp/0\"]\n",
    )
    .unwrap();
    let out = run_ok(cmd().arg("check-config").arg(&cfg).arg("--json"));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<&String> = all.as_object().unwrap().keys().collect();
    assert!(keys.len() >= 19, "{all}");
    let help = String::from_utf8(run_ok(cmd().args(["daemon", "--help"])).stdout).unwrap();
    for k in keys {
        // A table (`[timers]`) is a group of file-only settings, not one flag.
        if all[k.as_str()].is_object() {
            continue;
        }
        assert!(
            help.contains(&format!("--{k} ")) || help.contains(&format!("--{k}\n")),
            "config key {k} has no flag --{k}:\n{help}"
        );
    }

    // The old spellings, in the file and as flags: the same settings, printed with the
    // current names.
    const KEY: &str = "test-key-1:78Nf98nbvOPNUUW/boOhsIB79Rq1dhy940buuyOMuZM=";
    const PEER: &str =
        "/ip4/192.0.2.1/tcp/7421/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";
    std::fs::write(
        &cfg,
        format!(
            "upstream = [\"https://a.example\"]\nbootstrap = [\"{PEER}\"]\n\
             trusted-public-key = [\"{KEY}\"]\np2p-listen = [\"/ip4/127.0.0.1/tcp/0\"]\n"
        ),
    )
    .unwrap();
    let out = run_ok(cmd().arg("check-config").arg(&cfg).args([
        "--json",
        "--upstream",
        "https://b.example",
        "--upstreams",
        "https://c.example",
        "--bootstrap",
        PEER,
        "--trusted-public-key",
        KEY,
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["upstreams"],
        serde_json::json!([
            "https://a.example",
            "https://b.example",
            "https://c.example"
        ])
    );
    assert_eq!(v["bootstrap-peers"], serde_json::json!([PEER, PEER]));
    assert_eq!(v["trusted-public-keys"], serde_json::json!([KEY, KEY]));
    assert!(
        v.get("upstream").is_none() && v.get("bootstrap").is_none(),
        "{v}"
    );
}

/// `--p2p-listen /ip4/0.0.0.0/tcp/0` (issue 15): the daemon prints, logs and reports (in
/// `/api/status` and `status`) every address peers can dial — each interface's IPv4 address
/// with the bound port and `/p2p/<peer id>`, loopback last — never `0.0.0.0` and not only
/// loopback; each one accepts a connection.
#[test]
fn a_wildcard_p2p_listener_reports_every_interface_address() {
    use std::io::BufRead as _;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let stderr = tmp.path().join("stderr");
    /// The daemon, killed if the test fails before it stops it.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Child(
        cmd()
            .args(["daemon", "--listen", "127.0.0.1:0", "--no-mdns"])
            .arg("--data-dir")
            .arg(&data)
            .args(["--p2p-listen", "/ip4/0.0.0.0/tcp/0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening ").unwrap().to_string();
    let status = run_ok(cmd().args(["status", "--json", "--url", &url]));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let peer_id = v["peer_id"].as_str().unwrap().to_string();
    let addrs: Vec<String> = v["p2p_addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    // Printed on stdout, one `listening` line each, in the same order.
    let mut printed = Vec::new();
    for _ in &addrs {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        printed.push(l.trim().strip_prefix("listening ").unwrap().to_string());
    }
    assert_eq!(printed, addrs);
    let port = addrs[0].split('/').nth(4).unwrap().to_string();
    assert_eq!(
        addrs.last().unwrap(),
        &format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}"),
        "loopback last: {addrs:?}"
    );
    // Every IPv4 address of the machine's interfaces, as `ip` lists them.
    if let Ok(ip) = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
    {
        for l in String::from_utf8_lossy(&ip.stdout).lines() {
            let Some(cidr) = l.split_whitespace().skip_while(|w| *w != "inet").nth(1) else {
                continue;
            };
            let a = cidr.split('/').next().unwrap();
            let want = format!("/ip4/{a}/tcp/{port}/p2p/{peer_id}");
            assert!(addrs.contains(&want), "{want} missing from {addrs:?}");
        }
    }
    for a in &addrs {
        assert!(!a.contains("0.0.0.0"), "{a}");
        assert!(a.ends_with(&format!("/p2p/{peer_id}")), "{a}");
        let ip = a.split('/').nth(2).unwrap();
        std::net::TcpStream::connect((ip, port.parse::<u16>().unwrap()))
            .unwrap_or_else(|e| panic!("{a} does not accept a connection: {e}"));
    }
    // `status` lists them; the startup message says them for --bootstrap-peers.
    let text = run_ok(cmd().args(["status", "--url", &url]));
    let text = String::from_utf8(text.stdout).unwrap();
    for a in &addrs {
        assert!(text.contains(&format!("listening  {a}")), "{text}");
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    assert!(child.0.wait().unwrap().success());
    let logs = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        logs.contains(&format!("P2P node reachable at {}", addrs.join(" "))),
        "{logs}"
    );
}
