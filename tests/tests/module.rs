//! Issue 5, as far as a machine without nixpkgs allows: every `.nix` file parses, and the
//! configuration and flags the NixOS module generates are accepted by `check-config` (and the
//! bad ones refused). The module's option → config logic lives in `nixos-module/config.nix`
//! (builtins only), evaluated here with the real `nix-instantiate`; the TOML is written from
//! its JSON as `pkgs.formats.toml` would. The contrib unit and sample config are checked too.

use std::fs;
use std::path::{Path, PathBuf};

use nix_p2p_cache_tests::{cmd, nix, root, run_ok};
use serde_json::{json, Value};

const CACHE_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
const TEST_KEY: &str = "test-key-1:78Nf98nbvOPNUUW/boOhsIB79Rq1dhy940buuyOMuZM=";
const PEER: &str =
    "/ip4/192.0.2.1/tcp/7421/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let e = e.unwrap();
        let p = e.path();
        let name = e.file_name();
        if e.file_type().unwrap().is_dir() {
            if name != "target" && name != ".git" {
                nix_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "nix") {
            out.push(p);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    nix_files(&root(), &mut files);
    files.sort();
    let rel: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    for expected in [
        "flake.nix",
        "nixos-module/default.nix",
        "nixos-module/config.nix",
        "nixos-module/package.nix",
        "nixos-module/test.nix",
        "nixos-module/eval-test/eval.nix",
        "corpus/closure.nix",
    ] {
        assert!(rel.iter().any(|r| r == expected), "{expected} not found");
    }
    let mut failures = Vec::new();
    for f in &files {
        let out = nix("nix-instantiate", tmp.path())
            .arg("--parse")
            .arg(f)
            .output()
            .expect("running nix-instantiate");
        if !out.status.success() {
            failures.push(format!(
                "{}: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `config.nix`'s `generate` for option values `opts` (a Nix attrset; unset options take the
/// module's defaults).
fn generate(opts: &str) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let expr = format!(
        "{{ root }}: let c = import (/. + root + \"/nixos-module/config.nix\"); \
         in c.generate (c.withDefaults ({opts}))"
    );
    let out = run_ok(
        nix("nix-instantiate", tmp.path())
            .args([
                "--eval", "--strict", "--json", "--expr", &expr, "--argstr", "root",
            ])
            .arg(root()),
    );
    serde_json::from_slice(&out.stdout).expect("nix-instantiate --json prints JSON")
}

fn failed_assertions(g: &Value) -> Vec<String> {
    g["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["assertion"] == json!(false))
        .map(|a| a["message"].as_str().unwrap().to_string())
        .collect()
}

/// Writes the generated settings as TOML and runs `check-config FILE FLAGS…`: the effective
/// configuration it prints, or its error output.
fn check(g: &Value) -> Result<toml::Table, String> {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("nix-p2p-cache.toml");
    fs::write(
        &file,
        toml::to_string(&g["settings"]).expect("settings as TOML"),
    )
    .unwrap();
    let flags = json_strs(&g["flags"]);
    let out = cmd()
        .arg("check-config")
        .arg(&file)
        .args(&flags)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(toml::from_str(&String::from_utf8(out.stdout).unwrap())
            .expect("check-config prints TOML"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn accepted(opts: &str) -> (Value, toml::Table) {
    let g = generate(opts);
    assert_eq!(failed_assertions(&g), Vec::<String>::new(), "{opts}");
    let eff = check(&g).unwrap_or_else(|e| panic!("check-config refused {opts}:\n{e}\n{g:#}"));
    (g, eff)
}

/// The strings of a JSON array.
fn json_strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("{v} is not an array"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

fn strs(v: &toml::Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("{v} is not an array"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

#[test]
fn peer_defaults_are_accepted() {
    let (g, eff) = accepted("{ }");
    assert_eq!(eff["role"].as_str(), Some("peer"));
    assert_eq!(eff["data-dir"].as_str(), Some("/var/lib/nix-p2p-cache"));
    assert_eq!(eff["listen"].as_str(), Some("127.0.0.1:7420"));
    assert_eq!(strs(&eff["upstreams"]), ["https://cache.nixos.org"]);
    assert_eq!(strs(&eff["trusted-public-keys"]), [CACHE_KEY]);
    assert_eq!(
        strs(&eff["p2p-listen"]),
        ["/ip4/0.0.0.0/tcp/7421", "/ip6/::/tcp/7421"]
    );
    assert!(strs(&eff["bootstrap-peers"]).is_empty());
    assert_eq!(eff["share"].as_str(), Some("all"));
    assert_eq!(eff["no-mdns"].as_bool(), Some(false));
    assert!(!eff.contains_key("upload-token-file"));
    assert!(!eff.contains_key("max-cache-size"));
    assert_eq!(g["flags"], json!([]));
    assert_eq!(g["credentials"], json!([]));
    assert_eq!(g["substituter"], json!("http://127.0.0.1:7420"));
    assert_eq!(g["firewall"], json!({ "tcp": [7421], "udp": [5353] }));
    assert_eq!(g["privilegedPorts"], json!(false));
    // NixOS trusts cache.nixos.org's key already: not listed twice in nix.conf.
    assert_eq!(g["nixTrustedKeys"], json!([]));
}

#[test]
fn seed_with_upload_token_is_accepted() {
    let (g, eff) = accepted(&format!(
        r#"{{ role = "seed"; uploadTokenFile = "/run/keys/upload-token";
             trustedPublicKeys = [ "{CACHE_KEY}" "{TEST_KEY}" ];
             bootstrapPeers = [ "{PEER}" ]; }}"#
    ));
    assert_eq!(eff["role"].as_str(), Some("seed"));
    // A seed falls back on nothing.
    assert!(strs(&eff["upstreams"]).is_empty());
    assert_eq!(strs(&eff["trusted-public-keys"]), [CACHE_KEY, TEST_KEY]);
    assert_eq!(g["nixTrustedKeys"], json!([TEST_KEY]));
    assert_eq!(strs(&eff["bootstrap-peers"]), [PEER]);
    // The token's path is the credential systemd hands in, given as a flag (%d is expanded
    // by systemd; check-config does not read the file).
    assert_eq!(
        g["flags"],
        json!(["--upload-token-file", "%d/upload-token"])
    );
    assert_eq!(eff["upload-token-file"].as_str(), Some("%d/upload-token"));
    assert_eq!(
        g["credentials"],
        json!(["upload-token:/run/keys/upload-token"])
    );
    assert!(!g["settings"]
        .as_object()
        .unwrap()
        .contains_key("upload-token-file"));
}

#[test]
fn a_seed_on_s3_is_accepted_with_its_credentials_file_as_a_credential() {
    let (g, eff) = accepted(
        r#"{ role = "seed"; storage = "s3://nix-cache/seed"; s3Endpoint = "http://127.0.0.1:9000";
             s3CacheSize = "10G"; s3CredentialsFile = "/run/keys/s3"; }"#,
    );
    assert_eq!(eff["storage"].as_str(), Some("s3://nix-cache/seed"));
    assert_eq!(eff["s3-endpoint"].as_str(), Some("http://127.0.0.1:9000"));
    assert_eq!(eff["s3-cache-size"].as_integer(), Some(10_000_000_000));
    assert_eq!(g["credentials"], json!(["s3-credentials:/run/keys/s3"]));
    assert_eq!(
        g["environment"],
        json!({ "AWS_SHARED_CREDENTIALS_FILE": "%d/s3-credentials" })
    );
    assert_eq!(g["stopTimeoutSec"], json!(600));
    // S3 options without storage are refused.
    let g = generate(r#"{ s3Endpoint = "http://127.0.0.1:9000"; }"#);
    let failed = failed_assertions(&g);
    assert!(
        failed.iter().any(|f| f.contains("s3Endpoint")),
        "{failed:?}"
    );
}

#[test]
fn lan_share_quota_and_rate_limit_are_accepted() {
    let (g, eff) = accepted(
        r#"{ share = "lan"; maxCacheSize = "50G"; uploadRateLimit = "10M";
             listen = "0.0.0.0:7420"; ipv6 = false; p2pPort = 4001; }"#,
    );
    assert_eq!(eff["share"].as_str(), Some("lan"));
    assert_eq!(eff["max-cache-size"].as_integer(), Some(50_000_000_000));
    assert_eq!(eff["upload-rate-limit"].as_integer(), Some(10_000_000));
    assert_eq!(strs(&eff["p2p-listen"]), ["/ip4/0.0.0.0/tcp/4001"]);
    assert_eq!(eff["listen"].as_str(), Some("0.0.0.0:7420"));
    // A wildcard listen address is reached through loopback.
    assert_eq!(g["substituter"], json!("http://127.0.0.1:7420"));
    assert_eq!(g["firewall"]["tcp"], json!([4001]));
    // Integer sizes pass through as integers.
    let (_, eff) = accepted("{ maxCacheSize = 1073741824; uploadRateLimit = 1000000; }");
    assert_eq!(eff["max-cache-size"].as_integer(), Some(1 << 30));
    assert_eq!(eff["upload-rate-limit"].as_integer(), Some(1_000_000));
}

#[test]
fn settings_override_generated_keys() {
    let (g, eff) = accepted(
        r#"{ settings = { announce = "all"; no-mdns = true; max-upload-size = 1073741824;
                          upstream = [ "https://example.org/cache" ]; listen = "[::1]:8080"; }; }"#,
    );
    assert_eq!(eff["announce"].as_str(), Some("all"));
    assert_eq!(eff["no-mdns"].as_bool(), Some(true));
    assert_eq!(eff["max-upload-size"].as_integer(), Some(1 << 30));
    // `upstream` is the deprecated spelling of `upstreams`: it replaces the generated key.
    assert_eq!(strs(&eff["upstreams"]), ["https://example.org/cache"]);
    assert_eq!(eff["listen"].as_str(), Some("[::1]:8080"));
    assert_eq!(g["substituter"], json!("http://[::1]:8080"));
    // mDNS off: only the P2P port would be opened.
    assert_eq!(g["firewall"], json!({ "tcp": [7421], "udp": [] }));
    // P2P off.
    let (g, eff) = accepted("{ p2pPort = null; }");
    assert!(strs(&eff["p2p-listen"]).is_empty());
    assert_eq!(g["firewall"], json!({ "tcp": [], "udp": [] }));
    // A privileged port asks for CAP_NET_BIND_SERVICE.
    let (g, _) = accepted("{ p2pPort = 421; }");
    assert_eq!(g["privilegedPorts"], json!(true));
}

#[test]
fn bad_option_sets_are_refused() {
    // A seed never evicts: refused by the module's assertions and by check-config.
    let g = generate(r#"{ role = "seed"; maxCacheSize = "5G"; }"#);
    let failed = failed_assertions(&g);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains("maxCacheSize"), "{failed:?}");
    let e = check(&g).unwrap_err();
    assert!(e.contains("max-cache-size: a seed never evicts"), "{e}");

    // Secrets never in the store (a string naming it, or a path literal copied into it).
    for token in [
        r#""/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-token""#,
        "./token",
    ] {
        let failed = failed_assertions(&generate(&format!("{{ uploadTokenFile = {token}; }}")));
        assert_eq!(failed.len(), 1, "{token}: {failed:?}");
        assert!(
            failed[0].contains("must not lie in the Nix store"),
            "{failed:?}"
        );
    }
    let failed = failed_assertions(&generate(
        r#"{ settings.upload-token-file = "/etc/token"; settings.data-dir = "/srv/cache"; }"#,
    ));
    assert_eq!(failed.len(), 2, "{failed:?}");

    // Bootstrap peers with P2P off: the assertion, and check-config agrees.
    let g = generate(&format!(
        r#"{{ p2pPort = null; bootstrapPeers = [ "{PEER}" ]; }}"#
    ));
    assert_eq!(failed_assertions(&g).len(), 1);
    assert!(check(&g).unwrap_err().contains("p2p-listen is empty"));

    // What only the daemon knows is caught by the build-time check-config.
    for (opts, needle) in [
        (r#"{ settings.bogus = 1; }"#, "unknown field `bogus`"),
        (
            r#"{ bootstrapPeers = [ "/ip4/192.0.2.1/tcp/7421" ]; }"#,
            "does not end in /p2p/",
        ),
        (
            r#"{ upstreams = [ "ftp://example.org" ]; }"#,
            "ftp://example.org",
        ),
        (
            r#"{ trustedPublicKeys = [ "nope" ]; }"#,
            "trusted-public-keys",
        ),
        (r#"{ uploadRateLimit = 0; }"#, "upload-rate-limit"),
        (r#"{ maxCacheSize = "lots"; }"#, "bad size"),
    ] {
        let g = generate(opts);
        assert!(failed_assertions(&g).is_empty(), "{opts}");
        let e = check(&g).expect_err(opts);
        assert!(e.contains(needle), "{opts}: {needle} not in {e}");
    }
}

#[test]
fn contrib_unit_and_sample_config_are_accepted() {
    let unit = fs::read_to_string(root().join("contrib/nix-p2p-cache.service")).unwrap();
    let exec: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=")
        .split_whitespace()
        .collect();
    assert_eq!(exec[1], "daemon");
    let mut flags: Vec<&str> = Vec::new();
    let mut rest = exec[2..].iter();
    while let Some(f) = rest.next() {
        if *f == "--config" {
            assert_eq!(rest.next(), Some(&"/etc/nix-p2p-cache/config.toml"));
        } else {
            flags.push(f);
        }
    }
    for directive in [
        "DynamicUser=yes",
        "StateDirectory=nix-p2p-cache",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "Restart=on-failure",
        "LimitNOFILE=65536",
        "Type=notify",
    ] {
        assert!(unit.lines().any(|l| l == directive), "{directive} missing");
    }
    let out = run_ok(
        cmd()
            .arg("check-config")
            .arg(root().join("contrib/config.toml"))
            .args(&flags),
    );
    let eff: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(eff["data-dir"].as_str(), Some("/var/lib/nix-p2p-cache"));
    assert_eq!(eff["listen"].as_str(), Some("127.0.0.1:7420"));
    // The same flag with a token credential, as the unit's comments describe.
    run_ok(
        cmd()
            .arg("check-config")
            .arg(root().join("contrib/config.toml"))
            .args(["--upload-token-file", "%d/upload-token"]),
    );
}

/// `nix-p2p-cache-admin` (issue 15): the transient unit it asks `systemd-run` for runs as the
/// service's dynamic user, with its state directory and the same credentials; and the CLI finds
/// the data dir, config and upload token where that unit's environment points, so `gc` run
/// through it while the daemon holds the store acts through the daemon's API.
#[test]
fn the_admin_wrapper_runs_the_cli_as_the_service() {
    let g = generate(
        r#"{ role = "seed"; uploadTokenFile = "/run/keys/upload-token";
             storage = "s3://nix-cache/seed"; s3CredentialsFile = "/run/keys/s3"; }"#,
    );
    let props = json_strs(&g["adminProperties"]);
    for p in [
        "DynamicUser=yes",
        "User=nix-p2p-cache",
        "StateDirectory=nix-p2p-cache",
    ] {
        assert!(props.contains(&p), "{p} missing: {props:?}");
    }
    for c in g["credentials"].as_array().unwrap() {
        let p = format!("LoadCredential={}", c.as_str().unwrap());
        assert!(props.contains(&p.as_str()), "{p} missing: {props:?}");
    }
    assert_eq!(
        g["adminEnvironment"],
        json!({ "NIX_P2P_CACHE_DATA_DIR": "/var/lib/nix-p2p-cache" })
    );
    let cred_env = g["adminCredentialEnvironment"].clone();
    assert_eq!(
        cred_env,
        json!({ "NIX_P2P_CACHE_UPLOAD_TOKEN_FILE": "upload-token",
                "AWS_SHARED_CREDENTIALS_FILE": "s3-credentials" })
    );
    let g = generate("{ }");
    assert_eq!(g["adminCredentialEnvironment"], json!({}));

    // That environment (a temp dir standing in for the unit's credentials directory and the
    // state directory): `gc` while the daemon runs goes through its API with the token.
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("credentials");
    fs::create_dir_all(&creds).unwrap();
    fs::write(creds.join("upload-token"), "admin-token\n").unwrap();
    let data = tmp.path().join("data");
    let d = nix_p2p_cache_tests::harness::Daemon::start(
        &data,
        &[
            "--upload-token-file",
            creds.join("upload-token").to_str().unwrap(),
        ],
    );
    let config = tmp.path().join("config.toml");
    fs::write(&config, format!("listen = \"127.0.0.1:{}\"\n", d.port)).unwrap();
    let mut c = cmd();
    c.args(["gc", "--json"])
        .env("NIX_P2P_CACHE_CONFIG", &config)
        .env("NIX_P2P_CACHE_DATA_DIR", &data)
        .env(
            "NIX_P2P_CACHE_UPLOAD_TOKEN_FILE",
            creds.join(
                cred_env["NIX_P2P_CACHE_UPLOAD_TOKEN_FILE"]
                    .as_str()
                    .unwrap(),
            ),
        );
    let out = run_ok(&mut c);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Through the daemon: it holds the index, so the index is not compacted.
    assert_eq!(r["index_compacted"], json!(false), "{r}");
    d.stop();
}
