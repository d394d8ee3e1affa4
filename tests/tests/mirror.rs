//! Mirroring an HTTP binary cache (`import --from http://…`): a closure walked through the
//! narinfos with parallel jobs, every NAR reassembling byte-identical to `nix-store --dump`, a
//! second run downloading no NAR, a store-paths list (xz, itself over HTTP) as input, and a run
//! cut short by a server error resumed by running it again. The server is a real HTTP server on
//! loopback serving the corpus's xz binary cache directory and counting requests per path.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use nix_p2p_cache_tests::harness::{hash_part, narinfo_field};
use nix_p2p_cache_tests::{cmd, run_ok, stats, Corpus};

/// A static file server over a directory: `GET /<relative path>`, requests counted per path,
/// chosen paths answered with a 500 a set number of times first.
struct DirServer {
    port: u16,
    hits: Arc<Mutex<HashMap<String, u32>>>,
    fail: Arc<Mutex<HashMap<String, u32>>>,
}

impl DirServer {
    fn start(dir: &Path) -> DirServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let fail: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let (h, f, dir) = (hits.clone(), fail.clone(), dir.to_path_buf());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let (h, f, dir) = (h.clone(), f.clone(), dir.clone());
                std::thread::spawn(move || serve(s, &dir, &h, &f));
            }
        });
        DirServer { port, hits, fail }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn fail_next(&self, path: &str, times: u32) {
        self.fail.lock().unwrap().insert(path.to_string(), times);
    }

    fn hits(&self, path: &str) -> u32 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Requests for NAR files (`/nar/…`), all of them.
    fn nar_hits(&self) -> u32 {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.starts_with("/nar/"))
            .map(|(_, n)| n)
            .sum()
    }
}

fn serve(
    mut s: TcpStream,
    dir: &Path,
    hits: &Mutex<HashMap<String, u32>>,
    fail: &Mutex<HashMap<String, u32>>,
) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
    }
    let path = line.split(' ').nth(1).unwrap_or("").to_string();
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let failing = {
        let mut f = fail.lock().unwrap();
        match f.get_mut(&path) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    };
    if failing {
        let _ = s.write_all(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return;
    }
    let rel = path.trim_start_matches('/');
    let file: PathBuf = dir.join(rel);
    let body = if rel.split('/').any(|c| c == ".." || c.is_empty()) {
        None
    } else {
        std::fs::File::open(&file).ok().map(|mut f| {
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            b
        })
    };
    let Some(body) = body else {
        let _ = s
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(&body);
    let _ = s.flush();
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `import --json` with `args`; the exit status and the report.
fn import(data: &Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = cmd()
        .args(["import", "--json", "--data-dir"])
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("import --json: {e}\n{}", text(&out.stderr)));
    (out.status.success(), report, text(&out.stderr))
}

fn assert_same_nar(data: &Path, p: &str) {
    let ours = run_ok(cmd().args(["nar", "--data-dir"]).arg(data).arg(p)).stdout;
    let nix = run_ok(Command::new("nix-store").args(["--dump", p])).stdout;
    assert!(ours == nix, "{p}: NAR differs from nix-store --dump");
}

/// A copy of the corpus's xz cache in `dir` (the test adds files to serve).
fn cache_copy(corpus: &Corpus, dir: &Path) -> PathBuf {
    let to = dir.join("cache");
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(corpus.dir.join("cache-xz"))
            .arg(&to),
    );
    to
}

#[test]
fn a_closure_mirrors_byte_identical_and_a_second_run_downloads_no_nar() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_copy(corpus, tmp.path());
    let server = DirServer::start(&cache);
    let data = tmp.path().join("data");
    let gen2: BTreeSet<String> = corpus.paths(2).into_iter().collect();
    let top = corpus.out_path(2);

    let (ok, r, err) = import(
        &data,
        &["--from", &server.url(), "--closure", "--jobs", "4", &top],
    );
    assert!(ok, "{r}\n{err}");
    assert_eq!(r["imported"], gen2.len() as u64, "{r}");
    assert_eq!(r["failed"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(server.nar_hits(), gen2.len() as u32, "one download per NAR");
    assert_eq!(r["nars_read"], gen2.len() as u64);
    let s = stats(&data);
    assert_eq!(s["narinfos"], gen2.len() as u64);
    assert_eq!(s["pinned_paths"], gen2.len() as u64, "imports are pinned");
    for p in &gen2 {
        assert_same_nar(&data, p);
    }
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));

    // Again: every narinfo is read, no NAR is.
    let before = server.nar_hits();
    let (ok, r, err) = import(&data, &["--from", &server.url(), "--closure", &top]);
    assert!(ok, "{r}\n{err}");
    assert_eq!(
        (r["imported"].as_u64(), r["already_present"].as_u64()),
        (Some(0), Some(gen2.len() as u64)),
        "{r}"
    );
    assert_eq!(server.nar_hits(), before, "no NAR downloaded again");
    assert_eq!(r["nars_read"], 0);

    // Generation 1's store-paths list, xz-compressed, itself downloaded from the server: only
    // the paths not stored yet are downloaded.
    let gen1: BTreeSet<String> = corpus.paths(1).into_iter().collect();
    let new: Vec<&String> = gen1.difference(&gen2).collect();
    assert!(!new.is_empty());
    let list = cache.join("store-paths");
    std::fs::write(
        &list,
        gen1.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )
    .unwrap();
    run_ok(Command::new("xz").arg(&list));
    let list_url = format!("{}/store-paths.xz", server.url());
    let (ok, r, err) = import(
        &data,
        &["--from", &server.url(), "--store-paths", &list_url],
    );
    assert!(ok, "{r}\n{err}");
    assert_eq!(server.hits("/store-paths.xz"), 1);
    assert_eq!(r["imported"], new.len() as u64, "{r}");
    assert_eq!(server.nar_hits(), before + new.len() as u32);
    assert_eq!(stats(&data)["narinfos"], (gen2.len() + new.len()) as u64);
    for p in new {
        assert_same_nar(&data, p);
    }

    // An HTTP cache cannot be listed: nothing named is an error, not an empty import.
    let out = cmd()
        .args(["import", "--data-dir"])
        .arg(&data)
        .args(["--from", &server.url()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot be listed"),
        "{}",
        text(&out.stderr)
    );
    // Not a binary cache at all.
    let out = cmd()
        .args(["import", "--data-dir"])
        .arg(&data)
        .args(["--from", &format!("{}/nar", server.url()), &top])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nix-cache-info"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_run_cut_short_by_a_server_error_is_resumed_by_running_it_again() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_copy(corpus, tmp.path());
    let server = DirServer::start(&cache);
    let data = tmp.path().join("data");
    let top = corpus.out_path(1);
    let gen1: BTreeSet<String> = corpus.paths(1).into_iter().collect();
    // The NAR of a path in the middle of the closure fails once.
    let victim = gen1
        .iter()
        .find(|p| **p != top && p.contains("bzip2"))
        .unwrap_or_else(|| gen1.iter().find(|p| **p != top).unwrap())
        .clone();
    let narinfo =
        std::fs::read_to_string(cache.join(format!("{}.narinfo", hash_part(&victim)))).unwrap();
    let nar = format!("/{}", narinfo_field(&narinfo, "URL").unwrap());
    server.fail_next(&nar, 1);

    let (ok, r, err) = import(
        &data,
        &["--from", &server.url(), "--closure", "--jobs", "3", &top],
    );
    assert!(!ok, "a failed path fails the run: {r}");
    let failed = r["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{r}");
    assert!(
        failed[0].as_str().unwrap().contains("HTTP status 500"),
        "{r}"
    );
    assert!(err.contains("run again"), "{err}");
    assert_eq!(
        r["imported"],
        (gen1.len() - 1) as u64,
        "the rest is imported"
    );
    assert_eq!(stats(&data)["narinfos"], (gen1.len() - 1) as u64);
    assert_eq!(server.hits(&nar), 1);

    // Run again: only the missing NAR is downloaded.
    let before = server.nar_hits();
    let (ok, r, err) = import(&data, &["--from", &server.url(), "--closure", &top]);
    assert!(ok, "{r}\n{err}");
    assert_eq!(
        (r["imported"].as_u64(), r["already_present"].as_u64()),
        (Some(1), Some((gen1.len() - 1) as u64)),
        "{r}"
    );
    assert_eq!(server.nar_hits(), before + 1);
    assert_eq!(server.hits(&nar), 2);
    assert_same_nar(&data, &victim);
    assert_eq!(stats(&data)["narinfos"], gen1.len() as u64);
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
}
