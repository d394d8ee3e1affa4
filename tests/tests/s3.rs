//! A seed whose packs live on a real S3 server (`s3s-fs` on loopback): the real `nix copy`
//! uploads to it and downloads from it byte-identical (Nix checks every NarHash), after a
//! restart with an empty local cache too; `verify` passes; with the index deleted, `verify
//! --repair` rebuilds it from the bucket alone; a server that is down or refuses the
//! credentials is a clear error, never a wrong 200.

use std::fs;
use std::path::Path;

use nix_p2p_cache::store::storage::testing::S3Server;
use nix_p2p_cache_tests::harness::{get, http, small_closure, text, Daemon, Env};
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

/// Objects the bucket holds (s3s-fs keeps each as a file).
fn objects(s3: &S3Server) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![s3.data_dir().join(BUCKET)];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap().filter_map(Result::ok) {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.retain(|n| n.ends_with(".pack"));
    out.sort();
    out
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
    let d = Daemon::start_with_env(&data, &args, &s3.env());
    env.copy_closure_ok("after-repair", &d, Some(&pk), &out, &closure, &[]);
    d.stop();
}

#[test]
fn a_down_server_or_wrong_credentials_are_clear_errors_never_a_wrong_200() {
    let mut s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut import = cmd();
    import
        .args(["import", "--data-dir"])
        .arg(&data)
        .args(["--from", &corpus.xz_url()]);
    with_s3(&mut import, &s3);
    run_ok(&mut import);
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
    let info = http(d.port, &get(&format!("/{hash}.narinfo")));
    assert_eq!(info.status, 200);
    let text = String::from_utf8(info.body).unwrap();
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    assert_eq!(http(d.port, &get(&format!("/{url}"))).status, 200);
    s3.stop();
    let r = http(d.port, &get(&format!("/{url}")));
    assert!(r.status >= 500, "a NAR from a down storage: {}", r.status);
    assert_eq!(http(d.port, &get(&format!("/{hash}.narinfo"))).status, 200);
    d.assert_alive();
    assert!(d.metric("storage_errors_total{backend=\"s3\"}") > 0);
    d.stop();
}
