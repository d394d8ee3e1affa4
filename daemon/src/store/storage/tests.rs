//! One conformance suite for every [`PackStorage`] backend, run against [`LocalDir`] on a temp
//! dir and [`S3Storage`] on a real `s3s-fs` (and, with `--ignored`, on any S3 server named by
//! `NIX_P2P_CACHE_TEST_S3_*`, see `scripts/garage-conformance.sh`); then the S3 faults, spec
//! parsing and credential lookup.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::testing::{S3Server, SECRET_KEY};
use super::*;

/// Deterministic bytes that differ at every offset (so a range from the wrong place shows).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn write(dir: &Path, name: &str, data: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    fs::write(&p, data).expect("write test file");
    p
}

fn delta(before: StorageCounters, after: StorageCounters) -> StorageCounters {
    StorageCounters {
        puts: after.puts - before.puts,
        gets: after.gets - before.gets,
        deletes: after.deletes - before.deletes,
        lists: after.lists - before.lists,
        bytes_in: after.bytes_in - before.bytes_in,
        bytes_out: after.bytes_out - before.bytes_out,
        errors: after.errors - before.errors,
        multipart_parts: after.multipart_parts - before.multipart_parts,
    }
}

/// Size of the pack that takes the multipart path on S3 (tests set a 1 MiB threshold and
/// 5 MiB parts: three parts, the last one short).
const BIG: usize = 11 * 1024 * 1024 + 17;

/// The conformance suite. `s` must be empty; `plant(name, bytes)` stores a foreign object or
/// file at `name` relative to where packs go (the packs directory, or `PREFIX/packs/`) without
/// going through `s`.
fn conformance(s: Arc<dyn PackStorage>, scratch: &Path, plant: &dyn Fn(&str, &[u8])) {
    // Empty.
    assert_eq!(s.list_packs().expect("list empty"), vec![]);
    assert_eq!(s.pack_len(3).expect("len of absent"), None);
    match s.read_range(3, 0, 10) {
        Err(StorageError::NotFound { pack: 3, location }) => {
            assert!(location.contains("pack-00000003.pack"), "{location}");
        }
        other => panic!("read of an absent pack: {other:?}"),
    }

    // Put and read ranges.
    let a = pattern(100_000, 1);
    let a_path = write(scratch, "a", &a);
    s.put_pack(3, &a_path).expect("put 3");
    assert_eq!(s.pack_len(3).expect("len 3"), Some(a.len() as u64));
    let n = a.len() as u64;
    for (offset, len) in [
        (0u64, 16u64),
        (0, n),
        (4_000, 12_345),
        (n - 10, 10),
        (n - 1, 1),
    ] {
        let got = s.read_range(3, offset, len).expect("read in range");
        assert_eq!(
            got,
            &a[offset as usize..(offset + len) as usize],
            "{offset}+{len}"
        );
    }
    assert_eq!(s.read_range(3, n, 0).expect("empty read at the end"), b"");
    for (offset, len) in [(n - 5, 10u64), (n, 1), (n + 100, 50)] {
        match s.read_range(3, offset, len) {
            Err(StorageError::ShortRead {
                pack: 3,
                offset: o,
                wanted,
                available,
            }) => {
                assert_eq!((o, wanted), (offset, len));
                assert_eq!(available, n.saturating_sub(offset), "{offset}+{len}");
            }
            other => panic!("read past the end ({offset}+{len}): {other:?}"),
        }
    }

    // Idempotent re-put, from the same file and from a copy.
    s.put_pack(3, &a_path).expect("re-put 3");
    let a_copy = write(scratch, "a-copy", &a);
    s.put_pack(3, &a_copy).expect("re-put 3 from a copy");
    assert_eq!(s.pack_len(3).expect("len 3"), Some(n));
    assert_eq!(s.read_range(3, 0, n).expect("read 3"), a);

    // Listing: sorted by id, foreign objects ignored.
    let b = pattern(5_000, 2);
    let b_path = write(scratch, "b", &b);
    s.put_pack(12, &b_path).expect("put 12");
    s.put_pack(1, &b_path).expect("put 1");
    s.put_pack(100_000_000, &b_path)
        .expect("put a nine-digit id");
    for name in [
        "notes.txt",
        "pack-7.pack",
        "pack-0000000x.pack",
        "pack-00000008.pack.tmp",
        ".pack-00000009.pack.tmp-1-0",
        "sub/pack-00000010.pack",
    ] {
        plant(name, b"not a pack");
    }
    let b_len = b.len() as u64;
    assert_eq!(
        s.list_packs().expect("list"),
        vec![(1, b_len), (3, n), (12, b_len), (100_000_000, b_len)]
    );

    // Delete, and delete of the absent.
    s.delete_pack(12).expect("delete 12");
    assert_eq!(s.pack_len(12).expect("len 12"), None);
    assert!(matches!(
        s.read_range(12, 0, 1),
        Err(StorageError::NotFound { pack: 12, .. })
    ));
    s.delete_pack(12).expect("delete 12 again");
    s.delete_pack(999).expect("delete a pack never stored");
    s.delete_pack(100_000_000).expect("delete");
    assert_eq!(s.list_packs().expect("list"), vec![(1, b_len), (3, n)]);

    // A big pack (multipart on S3), read across part boundaries.
    let big = pattern(BIG, 3);
    let big_path = write(scratch, "big", &big);
    s.put_pack(40, &big_path).expect("put big");
    assert_eq!(s.pack_len(40).expect("len big"), Some(BIG as u64));
    const PART: u64 = 5 * 1024 * 1024;
    for (offset, len) in [
        (0u64, 1000u64),
        (PART - 3, 7),
        (2 * PART - 100, 200),
        (BIG as u64 - 17, 17),
        (PART / 2, PART + PART / 2),
    ] {
        let got = s.read_range(40, offset, len).expect("read big");
        assert!(
            got == big[offset as usize..(offset + len) as usize],
            "big pack differs at {offset}+{len}"
        );
    }
    assert_eq!(s.read_range(40, 0, BIG as u64).expect("whole big"), big);

    // Counters: one call of each kind, with known sizes.
    let before = s.counters();
    s.put_pack(2, &b_path).expect("put 2");
    assert_eq!(s.read_range(2, 10, 100).expect("read 2").len(), 100);
    assert_eq!(s.read_range(2, 0, 7).expect("read 2").len(), 7);
    assert_eq!(s.read_range(2, 0, 0).expect("empty read"), b"");
    assert_eq!(s.pack_len(2).expect("len 2"), Some(b_len));
    assert_eq!(s.list_packs().expect("list").len(), 4);
    s.delete_pack(2).expect("delete 2");
    assert!(s.read_range(2, 0, 1).is_err());
    let d = delta(before, s.counters());
    assert_eq!(
        d,
        StorageCounters {
            puts: 1,
            gets: 4,
            deletes: 1,
            lists: 1,
            bytes_in: 107,
            bytes_out: b_len,
            errors: 1,
            multipart_parts: 0,
        }
    );

    // Concurrent reads from several threads.
    std::thread::scope(|scope| {
        for t in 0..6u64 {
            let s = &s;
            let (a, big) = (&a, &big);
            scope.spawn(move || {
                for i in 0..12u64 {
                    let x = (t * 7919 + i * 104_729) % 90_000;
                    assert_eq!(
                        s.read_range(3, x, 1_000).expect("concurrent read"),
                        &a[x as usize..x as usize + 1_000]
                    );
                    let y = (t * 1_000_003 + i * 611_953) % (BIG as u64 - 70_000);
                    assert!(
                        s.read_range(40, y, 65_536).expect("concurrent read")
                            == big[y as usize..y as usize + 65_536]
                    );
                }
            });
        }
    });

    // From `spawn_blocking` on another runtime, and from one of its worker threads' blocking
    // sections: no "runtime within a runtime" panic, same answers.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime");
    let s2 = Arc::clone(&s);
    let c_path = write(scratch, "c", &pattern(3_000, 4));
    let (read, listed) = rt.block_on(async move {
        tokio::task::spawn_blocking(move || {
            s2.put_pack(5, &c_path).expect("put from spawn_blocking");
            let read = s2.read_range(3, 100, 50).expect("read from spawn_blocking");
            let listed = s2.list_packs().expect("list from spawn_blocking");
            s2.delete_pack(5).expect("delete from spawn_blocking");
            (read, listed)
        })
        .await
        .expect("blocking task")
    });
    assert_eq!(read, &a[100..150]);
    assert_eq!(
        listed,
        vec![(1, b_len), (3, n), (5, 3_000), (40, BIG as u64)]
    );
    drop(rt);

    assert_eq!(
        s.list_packs().expect("final list"),
        vec![(1, b_len), (3, n), (40, BIG as u64)]
    );
}

#[test]
fn local_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let packs = dir.path().join("packs");
    let scratch = dir.path().join("scratch");
    fs::create_dir(&scratch).expect("scratch");
    let s = Arc::new(LocalDir::open(&packs).expect("open"));
    let plant = |name: &str, data: &[u8]| {
        let p = packs.join(name);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, data).expect("plant");
    };
    conformance(s.clone(), &scratch, &plant);
    assert_eq!(s.kind(), "local");
    assert_eq!(s.counters().multipart_parts, 0);
    // Today's naming of pack files.
    assert!(packs.join(pack_file_name(40)) == crate::store::pack::pack_path(&packs, 40));
}

/// Options that take the multipart path for [`BIG`] and give up quickly on a dead server.
fn test_options() -> S3Options {
    S3Options {
        multipart_threshold: 1024 * 1024,
        part_size: 5 * 1024 * 1024,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(20),
        upload_timeout: Duration::from_secs(30),
        max_retries: 2,
        retry_timeout: Duration::from_secs(5),
    }
}

fn s3_conformance_on(config: S3Config) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(S3Storage::open(config).expect("open s3"));
    let prefix = s.packs_key_prefix();
    let planter = Arc::clone(&s);
    let plant = move |name: &str, data: &[u8]| {
        planter
            .put_raw(&format!("{prefix}/{name}"), data)
            .expect("plant");
    };
    // A pack under another prefix is not ours either.
    s.put_raw("elsewhere/packs/pack-00000004.pack", b"other prefix")
        .expect("plant elsewhere");
    let before = s.counters();
    conformance(s.clone(), dir.path(), &plant);
    assert_eq!(s.kind(), "s3");
    // The big pack went up in three parts (5 + 5 + 1 MiB) and nothing else was multipart.
    assert_eq!(s.counters().multipart_parts - before.multipart_parts, 3);
}

#[test]
fn s3_conformance() {
    let server = S3Server::start();
    let mut config = server.spec("packs-bucket", "cache/v1");
    config.options = test_options();
    s3_conformance_on(config);
    // The objects are where the naming says.
    assert!(server
        .data_dir()
        .join("packs-bucket/cache/v1/packs/pack-00000040.pack")
        .is_file());
}

#[test]
fn s3_conformance_without_prefix() {
    let server = S3Server::start();
    let mut config = server.spec("bare", "");
    config.options = test_options();
    let s = S3Storage::open(config).expect("open");
    assert_eq!(s.describe(), format!("s3://bare at {}", server.endpoint()));
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(dir.path(), "p", b"pack bytes");
    s.put_pack(9, &p).expect("put");
    assert!(server
        .data_dir()
        .join("bare/packs/pack-00000009.pack")
        .is_file());
    assert_eq!(s.list_packs().expect("list"), vec![(9, 10)]);
}

/// Runs the suite against the S3 server named by `NIX_P2P_CACHE_TEST_S3_ENDPOINT`,
/// `..._BUCKET`, `..._ACCESS_KEY_ID`, `..._SECRET_ACCESS_KEY` and `..._REGION` (default
/// `us-east-1`), under a fresh prefix. `scripts/garage-conformance.sh` runs it on Garage.
#[test]
#[ignore = "needs an external S3 server: scripts/garage-conformance.sh"]
fn s3_conformance_external() {
    let var = |name: &str| {
        let full = format!("NIX_P2P_CACHE_TEST_S3_{name}");
        std::env::var(&full).unwrap_or_else(|_| panic!("{full} is not set"))
    };
    let endpoint = var("ENDPOINT");
    let credentials = S3Credentials::from_lookup(&|name| match name {
        "AWS_ACCESS_KEY_ID" => Some(var("ACCESS_KEY_ID")),
        "AWS_SECRET_ACCESS_KEY" => Some(var("SECRET_ACCESS_KEY")),
        _ => None,
    })
    .expect("credentials");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let config = S3Config {
        target: S3Target {
            bucket: var("BUCKET"),
            prefix: format!("conformance-{stamp}"),
            endpoint: Some(endpoint),
            region: std::env::var("NIX_P2P_CACHE_TEST_S3_REGION")
                .unwrap_or_else(|_| DEFAULT_REGION.to_string()),
        },
        credentials,
        options: test_options(),
    };
    s3_conformance_on(config);
}

/// Every rendering of an error, sources included.
fn all_text(e: &StorageError) -> String {
    let mut text = format!("{e} {e:?}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    text
}

#[test]
fn s3_wrong_secret_is_access_denied_without_the_secret() {
    let server = S3Server::start();
    let good = server.spec("denied", "p");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(dir.path(), "p", &pattern(1_000, 5));
    let s = S3Storage::open(good.clone()).expect("open");
    s.put_pack(1, &p).expect("put with the right key");

    let wrong_secret = "wrong-secret-0f3b8e2d91";
    let mut bad = good;
    bad.options = test_options();
    bad.credentials.secret_access_key = Secret::new(wrong_secret);
    let s = S3Storage::open(bad.clone()).expect("open");
    assert!(!format!("{s:?} {bad:?}").contains(wrong_secret));
    let errors = [
        s.read_range(1, 0, 10)
            .expect_err("read with a wrong secret"),
        s.put_pack(2, &p).expect_err("put with a wrong secret"),
        s.list_packs().expect_err("list with a wrong secret"),
        s.pack_len(1).expect_err("head with a wrong secret"),
    ];
    for e in &errors {
        assert!(
            matches!(e, StorageError::AccessDenied { .. }),
            "not access denied: {e:?}"
        );
        let text = all_text(e);
        assert!(!text.contains(wrong_secret), "secret in {text}");
        assert!(!text.contains(SECRET_KEY), "secret in {text}");
        assert!(
            text.contains("AWS_SECRET_ACCESS_KEY"),
            "does not say where the key came from: {e}"
        );
        assert!(text.contains(&server.endpoint()), "no endpoint in {e}");
    }
    assert_eq!(s.counters().errors, 4);

    // An access key id the server does not know.
    let mut unknown = bad;
    unknown.credentials.access_key_id = "AKIDUNKNOWN".into();
    unknown.credentials.secret_access_key = Secret::new(SECRET_KEY);
    let s = S3Storage::open(unknown).expect("open");
    let e = s.list_packs().expect_err("list with an unknown key id");
    assert!(matches!(e, StorageError::AccessDenied { .. }), "{e:?}");
    assert!(!all_text(&e).contains(SECRET_KEY), "secret in {e}");
}

#[test]
fn s3_stopped_server_is_unavailable() {
    let mut server = S3Server::start();
    let mut config = server.spec("down", "p");
    config.options = test_options();
    let s = S3Storage::open(config).expect("open");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(dir.path(), "p", &pattern(1_000, 6));
    s.put_pack(1, &p).expect("put while up");
    server.stop();

    let started = Instant::now();
    let errors = [
        s.read_range(1, 0, 10).expect_err("read while down"),
        s.pack_len(1).expect_err("head while down"),
        s.list_packs().expect_err("list while down"),
        s.put_pack(2, &p).expect_err("put while down"),
        s.delete_pack(1).expect_err("delete while down"),
    ];
    for e in &errors {
        match e {
            StorageError::Unavailable { endpoint, .. } => {
                assert_eq!(endpoint, &server.endpoint());
                assert!(e.to_string().contains(&server.endpoint()), "{e}");
            }
            other => panic!("not unavailable: {other:?}"),
        }
    }
    // Bounded, not a hang (generous: the machine is shared).
    assert!(
        started.elapsed() < Duration::from_secs(5 * 60),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn s3_stalled_server_is_unavailable() {
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let holder = std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let mut held = Vec::new();
        loop {
            if stop_rx.try_recv().is_ok() {
                break;
            }
            if let Ok((conn, _)) = listener.accept() {
                held.push(conn);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let credentials = S3Credentials::from_lookup(&|name| match name {
        "AWS_ACCESS_KEY_ID" => Some("id".into()),
        "AWS_SECRET_ACCESS_KEY" => Some("secret".into()),
        _ => None,
    })
    .expect("credentials");
    let s = S3Storage::open(S3Config {
        target: S3Target {
            bucket: "stalled".into(),
            prefix: String::new(),
            endpoint: Some(format!("http://{addr}")),
            region: DEFAULT_REGION.into(),
        },
        credentials,
        options: S3Options {
            request_timeout: Duration::from_secs(2),
            upload_timeout: Duration::from_secs(2),
            retry_timeout: Duration::from_secs(3),
            max_retries: 1,
            ..test_options()
        },
    })
    .expect("open");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(dir.path(), "p", &pattern(1_000, 7));
    for e in [
        s.read_range(1, 0, 10)
            .expect_err("read from a stalled server"),
        s.put_pack(1, &p).expect_err("upload to a stalled server"),
    ] {
        assert!(
            matches!(e, StorageError::Unavailable { .. }),
            "not unavailable: {e:?}"
        );
    }
    let _ = stop_tx.send(());
    holder.join().expect("holder thread");
}

#[test]
fn s3_missing_pack_is_not_found_and_drop_is_safe_in_async_code() {
    let server = S3Server::start();
    let s = S3Storage::open(server.spec("missing", "x")).expect("open");
    match s.read_range(77, 5, 5) {
        Err(e @ StorageError::NotFound { pack: 77, .. }) => {
            assert!(
                e.to_string()
                    .contains("s3://missing/x/packs/pack-00000077.pack"),
                "{e}"
            );
        }
        other => panic!("read of a missing pack: {other:?}"),
    }
    assert_eq!(s.pack_len(77).expect("len"), None);
    assert_eq!(s.counters().errors, 1);
    // The last handle may go away inside async code: dropping must not block or panic there.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async move { drop(s) });
}

#[test]
fn open_storage_builds_each_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let local = open_storage(&StorageSpec::Local, dir.path()).expect("local");
    assert_eq!(local.kind(), "local");
    let spec = StorageSpec::parse_with_env("s3://b-1/p", Some("http://127.0.0.1:9"), &|_| None)
        .expect("spec");
    // Credentials come from the environment here; the test cannot set it (tests share it), so
    // only the outcome's kind is checked when the environment happens to have them.
    match open_storage(&spec, dir.path()) {
        Ok(s) => assert_eq!(s.kind(), "s3"),
        Err(StorageError::NoCredentials { .. }) => {}
        Err(e) => panic!("unexpected: {e}"),
    }
}

#[test]
fn spec_parsing() {
    let env: HashMap<&str, &str> = [("AWS_REGION", "eu-west-3")].into();
    let lookup = |k: &str| env.get(k).map(|v| v.to_string());
    assert_eq!(
        StorageSpec::parse_with_env("local", None, &lookup).expect("local"),
        StorageSpec::Local
    );
    assert_eq!(
        StorageSpec::parse_with_env(
            "s3://my-bucket/a/b/",
            Some("http://127.0.0.1:9000/"),
            &lookup
        )
        .expect("s3"),
        StorageSpec::S3(S3Target {
            bucket: "my-bucket".into(),
            prefix: "a/b".into(),
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: "eu-west-3".into(),
        })
    );
    assert_eq!(
        StorageSpec::parse_with_env("s3://bkt", None, &|_| None).expect("s3"),
        StorageSpec::S3(S3Target {
            bucket: "bkt".into(),
            prefix: String::new(),
            endpoint: None,
            region: DEFAULT_REGION.into(),
        })
    );
    for (spec, endpoint) in [
        ("s3://", None),
        ("s3://UPPER", None),
        ("s3://ab", None),
        ("s3://bucket/a/../b", None),
        ("s3://bucket/a//b", None),
        ("gs://bucket", None),
        ("local", Some("http://x")),
        ("s3://bucket", Some("ftp://x")),
        ("s3://bucket", Some("http://x/path")),
        ("s3://bucket", Some("http://")),
    ] {
        assert!(
            matches!(
                StorageSpec::parse_with_env(spec, endpoint, &lookup),
                Err(StorageError::Config { .. })
            ),
            "{spec} {endpoint:?} accepted"
        );
    }
    // Credentials in the endpoint are refused and not repeated.
    let e = StorageSpec::parse_with_env("s3://bucket", Some("http://u:hunter22@h"), &lookup)
        .expect_err("credentials in the endpoint");
    assert!(!e.to_string().contains("hunter22"), "{e}");
}

#[test]
fn credentials_from_environment_and_file() {
    let env = |pairs: &[(&str, String)]| {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        move |k: &str| m.get(k).cloned()
    };
    // The environment wins.
    let c = S3Credentials::from_lookup(&env(&[
        ("AWS_ACCESS_KEY_ID", "AKID".into()),
        ("AWS_SECRET_ACCESS_KEY", "s3cr3t-env".into()),
        ("AWS_SESSION_TOKEN", "tok3n".into()),
    ]))
    .expect("env");
    assert_eq!(c.access_key_id, "AKID");
    assert_eq!(c.secret_access_key.expose(), "s3cr3t-env");
    assert_eq!(c.session_token.as_ref().map(Secret::expose), Some("tok3n"));
    assert!(c.source.contains("AWS_SESSION_TOKEN"));
    let debug = format!("{c:?}");
    assert!(
        !debug.contains("s3cr3t-env") && !debug.contains("tok3n"),
        "{debug}"
    );

    // Half a key pair is an error, not a fallback to the file.
    assert!(matches!(
        S3Credentials::from_lookup(&env(&[("AWS_ACCESS_KEY_ID", "AKID".into())])),
        Err(StorageError::NoCredentials { .. })
    ));

    // The credentials file, at a profile.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "credentials",
        b"# comment\n[default]\naws_access_key_id = DEFAULTID\naws_secret_access_key = default-secret\n\n\
          [ci]\n; another comment\nAWS_ACCESS_KEY_ID=CIID\naws_secret_access_key= ci-secret \naws_session_token = ci-token\n",
    );
    let file_var = ("AWS_SHARED_CREDENTIALS_FILE", file.display().to_string());
    let c =
        S3Credentials::from_lookup(&env(std::slice::from_ref(&file_var))).expect("default profile");
    assert_eq!(
        (c.access_key_id.as_str(), c.secret_access_key.expose()),
        ("DEFAULTID", "default-secret")
    );
    assert_eq!(c.source, format!("{} [default]", file.display()));
    let c = S3Credentials::from_lookup(&env(&[file_var.clone(), ("AWS_PROFILE", "ci".into())]))
        .expect("ci profile");
    assert_eq!(
        (c.access_key_id.as_str(), c.secret_access_key.expose()),
        ("CIID", "ci-secret")
    );
    assert_eq!(
        c.session_token.as_ref().map(Secret::expose),
        Some("ci-token")
    );
    let e = S3Credentials::from_lookup(&env(&[file_var, ("AWS_PROFILE", "nope".into())]))
        .expect_err("missing profile");
    assert!(e.to_string().contains("[nope]"), "{e}");
    assert!(!e.to_string().contains("-secret"), "{e}");

    // ~/.aws/credentials when no file is named.
    fs::create_dir(dir.path().join(".aws")).expect("mkdir");
    fs::copy(&file, dir.path().join(".aws/credentials")).expect("copy");
    let c = S3Credentials::from_lookup(&env(&[("HOME", dir.path().display().to_string())]))
        .expect("home");
    assert_eq!(c.access_key_id, "DEFAULTID");
    let empty = tempfile::tempdir().expect("tempdir");
    let e = S3Credentials::from_lookup(&env(&[("HOME", empty.path().display().to_string())]))
        .expect_err("no file");
    assert!(e.to_string().contains("does not exist"), "{e}");
}

#[test]
fn pack_names_round_trip_and_reject_others() {
    for id in [0, 1, 42, 99_999_999, 100_000_000, u32::MAX] {
        assert_eq!(parse_pack_file_name(&pack_file_name(id)), Some(id));
    }
    for name in [
        "pack-1.pack",
        "pack-000000001.pack",
        "pack-+0000001.pack",
        "pack-00000001.pack.tmp",
        "pack-99999999999.pack",
        "xpack-00000001.pack",
    ] {
        assert_eq!(parse_pack_file_name(name), None, "{name}");
    }
}
