//! A seed whose packs live on a real S3 server (`s3s-fs` on loopback): the real `nix copy`
//! uploads to it and downloads from it byte-identical (Nix checks every NarHash), after a
//! restart with an empty local cache too; `verify` passes; with the index deleted, `verify
//! --repair` rebuilds it from the bucket alone; a server that is down or refuses the
//! credentials is a clear error, never a wrong 200.

use std::fs;
use std::path::Path;

use nix_p2p_cache::store::storage::testing::S3Server;
use nix_p2p_cache_tests::harness::{dump, get, http, small_closure, text, Daemon, Env};
use nix_p2p_cache_tests::{cmd, run_ok, Corpus};

const BUCKET: &str = "seed";

fn storage_args(s3: &S3Server) -> Vec<String> {
    vec![
        "--storage".into(),
        format!("s3://{BUCKET}/v1"),
        "--s3-endpoint".into(),
        s3.endpoint(),
    ]
}

/// Pack files in the data dir that hold records (more than the 16-byte header).
fn local_packs_with_records(data: &Path) -> usize {
    fs::read_dir(data.join("packs"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.metadata().is_ok_and(|m| m.len() > 16))
                .count()
        })
        .unwrap_or(0)
}

/// Names of the pack objects the bucket holds.
fn objects(s3: &S3Server) -> Vec<String> {
    object_paths(s3)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Imports the corpus into a data dir whose packs live on `s3`.
fn import_on_s3(corpus: &Corpus, data: &Path, s3: &S3Server) {
    let mut import = cmd();
    import
        .args(["import", "--data-dir"])
        .arg(data)
        .args(["--from", &corpus.xz_url()]);
    with_s3(&mut import, s3);
    run_ok(&mut import);
}

fn with_s3(c: &mut std::process::Command, s3: &S3Server) {
    c.envs(s3.env()).args(storage_args(s3));
}

#[test]
fn a_seed_on_s3_takes_uploads_serves_them_and_is_rebuilt_from_the_bucket() {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let env = Env::new();
    let (sk, pk) = env.key("s3");
    let (out, closure) = small_closure(Corpus::small());
    let signed = env.signed_store("signed", &out, &sk);
    let data = env.path("seed");
    let token = env.path("token").display().to_string();
    let mut args: Vec<String> = vec![
        "--role".into(),
        "seed".into(),
        "--upload-token-file".into(),
        token,
        "--trusted-public-key".into(),
        pk.clone(),
    ];
    args.extend(storage_args(&s3));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let d = Daemon::start_with_env(&data, &args, &s3.env());
    let up = env.upload(&signed, &d.url(), &out);
    assert!(
        up.status.success(),
        "nix copy --to: {}\n{}",
        text(&up),
        d.stderr()
    );
    // A clean stop seals and uploads the open pack: the bucket alone holds every NAR.
    d.stop();
    assert_eq!(local_packs_with_records(&data), 0);
    assert!(!objects(&s3).is_empty());

    // Restarted with an empty local cache: served from the bucket, byte-identical.
    fs::remove_dir_all(data.join("pack-cache")).ok();
    let d = Daemon::start_with_env(&data, &args, &s3.env());
    env.copy_closure_ok("first", &d, Some(&pk), &out, &closure, &[]);
    let gets = d.metric("storage_requests_total{backend=\"s3\",op=\"get\"}");
    assert!(gets > 0, "read from the bucket");
    d.stop();

    let mut verify = cmd();
    verify.args(["verify", "--data-dir"]).arg(&data);
    with_s3(&mut verify, &s3);
    run_ok(&mut verify);

    // The index and every local file but the node key lost: repaired from the bucket alone.
    for name in ["index.redb", "packs", "pack-cache"] {
        let p = data.join(name);
        if p.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else if p.exists() {
            fs::remove_file(&p).unwrap();
        }
    }
    let mut repair = cmd();
    repair.args(["verify", "--repair", "--data-dir"]).arg(&data);
    with_s3(&mut repair, &s3);
    let said = run_ok(&mut repair);
    let said = String::from_utf8_lossy(&said.stdout).to_string();
    assert!(
        said.contains(&format!("restored {} paths", closure.len())),
        "{said}"
    );
    // Repaired, and answering a peer: A (empty, no upstream) fetches the closure from the
    // seed's chunks, which the seed reads from the bucket.
    fs::remove_dir_all(data.join("pack-cache")).ok();
    let mut p2p_args = args.clone();
    p2p_args.extend(["--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]);
    let d = Daemon::start_with_env(&data, &p2p_args, &s3.env());
    env.copy_closure_ok("after-repair", &d, Some(&pk), &out, &closure, &[]);
    let seed_addr = d.p2p.clone().unwrap();
    let a = Daemon::start(
        &env.path("peer-a"),
        &[
            "--trusted-public-key",
            &pk,
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--bootstrap",
            &seed_addr,
        ],
    );
    env.copy_closure_ok("from-peer", &a, Some(&pk), &out, &closure, &[&d]);
    assert!(
        d.metric("p2p_requests_in_total") > 0,
        "the S3 seed answered the peer"
    );
    a.stop();
    d.stop();
}

/// A pack object damaged or gone from the bucket: the NARs in it are refused (never a wrong
/// 200), the others still served, and `verify` names the damage.
#[test]
fn a_damaged_or_missing_pack_object_is_refused_and_found_by_verify() {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    import_on_s3(corpus, &data, &s3);
    let packs = object_paths(&s3);
    assert!(!packs.is_empty());
    // Flip bytes all through the first pack object.
    let mut bytes = fs::read(&packs[0]).unwrap();
    let len = bytes.len();
    for f in [20, 40, 60, 80] {
        bytes[len * f / 100] ^= 0x5a;
    }
    fs::write(&packs[0], &bytes).unwrap();
    let mut verify = cmd();
    verify.args(["verify", "--data-dir"]).arg(&data);
    with_s3(&mut verify, &s3);
    let v = verify.output().unwrap();
    assert!(!v.status.success(), "verify must find the damage");
    assert!(String::from_utf8_lossy(&v.stdout).contains("DAMAGED"));

    let mut args = storage_args(&s3);
    args.extend(["--s3-cache-size".into(), "0".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_with_env(&data, &args, &s3.env());
    let mut served = 0;
    for p in corpus.paths(1) {
        let want = dump(&p);
        let url = nar_url(&d, &p);
        let r = http(d.port, &get(&format!("/{url}")));
        if r.status == 200 && r.complete && r.body == want {
            served += 1;
        } else {
            assert!(
                !(r.status == 200 && r.complete),
                "{p}: a damaged NAR served whole"
            );
        }
    }
    assert!(served > 0, "NARs in intact packs are still served");
    // The object gone: refused the same way.
    fs::remove_file(&packs[0]).unwrap();
    for p in corpus.paths(1) {
        let url = nar_url(&d, &p);
        let r = http(d.port, &get(&format!("/{url}")));
        assert!(r.status != 200 || r.body == dump(&p), "{p}: a wrong 200");
    }
    d.assert_alive();
    d.stop();
}

fn nar_url(d: &Daemon, p: &str) -> String {
    let hash = &p["/nix/store/".len().."/nix/store/".len() + 32];
    let info = http(d.port, &get(&format!("/{hash}.narinfo")));
    assert_eq!(info.status, 200, "{p}");
    String::from_utf8(info.body)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string()
}

/// Paths of the pack objects in the bucket (files of s3s-fs).
fn object_paths(s3: &S3Server) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![s3.data_dir().join(BUCKET)];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap().filter_map(Result::ok) {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else if e.file_name().to_string_lossy().ends_with(".pack") {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_down_server_or_wrong_credentials_are_clear_errors_never_a_wrong_200() {
    let mut s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    import_on_s3(corpus, &data, &s3);
    assert_eq!(
        local_packs_with_records(&data),
        0,
        "import uploads its packs"
    );

    // Wrong secret: refused by name, the secret never printed.
    let wrong = "definitely-not-the-secret-4711";
    let out = cmd()
        .args(["stats", "--data-dir"])
        .arg(&data)
        .args(storage_args(&s3))
        .envs(s3.env())
        .env("AWS_SECRET_ACCESS_KEY", wrong)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("access denied") && !err.contains(wrong),
        "{err}"
    );
    // Without --storage the data dir is refused, not opened as an empty local store.
    let out = cmd()
        .args(["stats", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("--storage s3://{BUCKET}/v1")),
        "{err}"
    );

    // The server goes away while the daemon runs: narinfos still answer, NARs fail clearly.
    let mut args = storage_args(&s3);
    args.extend(["--s3-cache-size".into(), "0".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_with_env(&data, &args, &s3.env());
    let p = &corpus.paths(1)[0];
    let hash = &p["/nix/store/".len().."/nix/store/".len() + 32];
    let url = nar_url(&d, p);
    assert_eq!(http(d.port, &get(&format!("/{url}"))).status, 200);
    s3.stop();
    let r = http(d.port, &get(&format!("/{url}")));
    assert!(r.status >= 500, "a NAR from a down storage: {}", r.status);
    assert_eq!(http(d.port, &get(&format!("/{hash}.narinfo"))).status, 200);
    d.assert_alive();
    assert!(d.metric("storage_errors_total{backend=\"s3\"}") > 0);
    d.stop();
}
