//! The localhost substituter end to end: the real `nix copy` uploads a signed closure to the
//! daemon over HTTP and downloads it again into a fresh store, where Nix verifies it; trust,
//! damage, authentication and bad requests are checked with the real Nix and raw HTTP.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix_p2p_cache_tests::{cmd, nar_hash_of, nix, run_ok, stats, Corpus};
use sha2::{Digest, Sha256};

use nix_p2p_cache_tests::harness::{get, http, http_with, unique, Daemon};

fn put(path: &str, auth: Option<(&str, &str)>, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some((u, p)) = auth {
        r += &format!(
            "Authorization: Basic {}\r\n",
            base64(format!("{u}:{p}").as_bytes())
        );
    }
    r += "\r\n";
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

/// Sends `req` (with `Connection: close`), reads the answer until EOF. No half-close: hyper
/// (as axum::serve configures it) drops a connection whose read side ends, answer unsent.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Nix helpers.

/// One test's scratch space: keys, netrc, token, Nix cache dir.
struct Env {
    tmp: tempfile::TempDir,
    xdg: PathBuf,
}

const TOKEN: &str = "s3cret-upload-token";

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let xdg = tmp.path().join("xdg");
        fs::create_dir_all(&xdg).unwrap();
        fs::write(tmp.path().join("token"), format!("{TOKEN}\n")).unwrap();
        fs::write(
            tmp.path().join("netrc"),
            format!("machine 127.0.0.1 login x password {TOKEN}\n"),
        )
        .unwrap();
        fs::write(
            tmp.path().join("netrc-wrong"),
            "machine 127.0.0.1 login x password not-the-token\n",
        )
        .unwrap();
        Env { tmp, xdg }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn nix(&self, program: &str) -> Command {
        nix(program, &self.xdg)
    }

    /// A fresh signing key pair with a name unique to this run: (secret key file, public key).
    fn key(&self, label: &str) -> (PathBuf, String) {
        let name = format!("e2e-{label}-{}", unique());
        let (sk, pk) = (
            self.path(&format!("{label}.sk")),
            self.path(&format!("{label}.pk")),
        );
        run_ok(
            self.nix("nix-store")
                .args(["--generate-binary-cache-key", &name])
                .args([&sk, &pk]),
        );
        (sk, fs::read_to_string(&pk).unwrap().trim().to_string())
    }

    /// A private chroot store holding the closure of `out`, signed with `sk`: signatures are
    /// added there, never to the machine's store (other tests sign concurrently).
    fn signed_store(&self, name: &str, out: &str, sk: &Path) -> String {
        let store = self.path(name).display().to_string();
        run_ok(self.nix("nix").args(["copy", "--to", &store, out]));
        run_ok(
            self.nix("nix")
                .args(["store", "sign", "--store", &store, "--key-file"])
                .arg(sk)
                .args(["-r", out]),
        );
        store
    }

    fn upload(&self, from: &str, to: &str, out: &str) -> Output {
        self.nix("nix")
            .args(["copy", "--from", from, "--to", to, "--option", "netrc-file"])
            .arg(self.path("netrc"))
            .arg(out)
            .output()
            .unwrap()
    }

    /// `nix copy --from <daemon> --to <fresh chroot store>`, requiring signatures by `pk`.
    fn download(&self, daemon: &Daemon, store: &str, pk: &str, out: &str) -> Output {
        self.download_in(&self.xdg, daemon, store, pk, out)
    }

    /// `download` with Nix's cache dir `xdg` (a fresh one: another machine, which never saw
    /// the uploaded narinfos).
    fn download_in(&self, xdg: &Path, daemon: &Daemon, store: &str, pk: &str, out: &str) -> Output {
        nix("nix", xdg)
            .args(["copy", "--from", &daemon.url(), "--to", store])
            .args(["--option", "trusted-public-keys", pk])
            .args(["--option", "require-sigs", "true"])
            .args(["--option", "substituters", ""])
            .arg(out)
            .output()
            .unwrap()
    }

    fn is_valid(&self, store: &str, p: &str) -> bool {
        self.nix("nix")
            .args(["path-info", "--store", store, p])
            .output()
            .unwrap()
            .status
            .success()
    }

    fn verify_path(&self, store: &str, p: &str) -> Output {
        self.nix("nix-store")
            .args(["--store", store, "--verify-path", p])
            .output()
            .unwrap()
    }

    fn sigs(&self, store: &str, p: &str) -> BTreeSet<String> {
        let out = run_ok(
            self.nix("nix")
                .args(["path-info", "--store", store, "--sigs", p]),
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .skip(1)
            .filter(|w| w.contains(':') && *w != "ultimate")
            .map(String::from)
            .collect()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn dump(p: &str) -> Vec<u8> {
    run_ok(Command::new("nix-store").args(["--dump", p])).stdout
}

fn hash_part(p: &str) -> &str {
    &p.trim_start_matches("/nix/store/")[..32]
}

fn field<'a>(narinfo: &'a str, key: &str) -> Option<&'a str> {
    narinfo
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(": ")))
}

fn narinfo(d: &Daemon, p: &str) -> String {
    let r = http(d.port, &get(&format!("/{}.narinfo", hash_part(p))));
    assert_eq!(r.status, 200, "GET narinfo of {p}");
    assert!(r.complete);
    String::from_utf8(r.body).unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Round trip through the real Nix.

fn round_trip(query: &str) {
    let corpus = Corpus::small();
    let env = Env::new();
    let out = corpus.out_path(1);
    let paths = corpus.paths(1);
    let (sk, pk) = env.key("rt");
    let src = env.signed_store("src", &out, &sk);
    let data = env.path("data");
    let token = env.path("token");
    let daemon = Daemon::start(
        &data,
        &[
            "--trusted-public-key",
            &pk,
            "--upload-token-file",
            token.to_str().unwrap(),
        ],
    );

    let up = env.upload(&src, &format!("{}{query}", daemon.url()), &out);
    assert!(
        up.status.success(),
        "nix copy --to {}{query}: {}\ndaemon stderr:\n{}",
        daemon.url(),
        text(&up),
        daemon.stderr()
    );

    // The store holds exactly the closure.
    let n = paths.len() as u64;
    let dumps: Vec<Vec<u8>> = paths.iter().map(|p| dump(p)).collect();
    let nar_bytes: u64 = dumps.iter().map(|d| d.len() as u64).sum();
    assert_eq!(daemon.metric("store_narinfos"), n);
    assert_eq!(daemon.metric("store_nars"), n);
    assert_eq!(daemon.metric("store_nar_bytes"), nar_bytes);
    assert_eq!(daemon.metric("uploads_total"), n);

    // Every narinfo: signatures unchanged, pointing at an uncompressed NAR whose bytes are
    // exactly what Nix dumps.
    for (p, nar) in paths.iter().zip(&dumps) {
        let info = narinfo(&daemon, p);
        assert_eq!(field(&info, "StorePath"), Some(p.as_str()), "{info}");
        assert_eq!(field(&info, "Compression"), Some("none"), "{info}");
        let want_sigs = env.sigs(&src, p);
        let mine: Vec<&String> = want_sigs
            .iter()
            .filter(|s| s.starts_with(&pk[..pk.find(':').unwrap() + 1]))
            .collect();
        assert_eq!(mine.len(), 1, "{p}: sigs in the source store {want_sigs:?}");
        let got_sigs: BTreeSet<String> = info
            .lines()
            .filter_map(|l| l.strip_prefix("Sig: "))
            .map(String::from)
            .collect();
        assert_eq!(got_sigs, want_sigs, "{p}: Sig lines changed:\n{info}");

        let nar_hash = nar_hash_of(nar);
        let q = run_ok(Command::new("nix-store").args(["-q", "--hash", p]));
        assert_eq!(String::from_utf8(q.stdout).unwrap().trim(), nar_hash);
        assert_eq!(field(&info, "NarHash"), Some(nar_hash.as_str()), "{info}");
        assert_eq!(field(&info, "NarSize"), Some(&*nar.len().to_string()));
        assert_eq!(field(&info, "FileHash"), Some(nar_hash.as_str()), "{info}");
        assert_eq!(field(&info, "FileSize"), Some(&*nar.len().to_string()));
        let url = field(&info, "URL").unwrap();
        assert_eq!(url, format!("nar/{}.nar", &nar_hash[7..]));

        let r = http(daemon.port, &get(&format!("/{url}")));
        assert_eq!(r.status, 200, "GET {url}");
        assert!(r.complete, "GET {url}: short body");
        assert_eq!(r.body.len(), nar.len(), "{p}: NAR length");
        assert!(
            Sha256::digest(&r.body) == Sha256::digest(nar),
            "{p}: NAR served is not what nix-store --dump gives"
        );

        // HEAD of the narinfo: same length, no body.
        let h = http(
            daemon.port,
            format!(
                "HEAD /{}.narinfo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                hash_part(p)
            )
            .as_bytes(),
        );
        assert_eq!(h.status, 200);
        assert_eq!(h.header("content-length"), Some(&*info.len().to_string()));
        assert!(h.body.is_empty());
    }

    // A Range request on the largest NAR.
    let (i, big) = dumps
        .iter()
        .enumerate()
        .max_by_key(|(_, d)| d.len())
        .unwrap();
    let url = field(&narinfo(&daemon, &paths[i]), "URL")
        .unwrap()
        .to_string();
    let (a, b) = (big.len() / 3, big.len() / 3 + 99_999);
    let r = http(
        daemon.port,
        format!(
            "GET /{url} HTTP/1.1\r\nHost: x\r\nRange: bytes={a}-{b}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some(&*format!("bytes {a}-{b}/{}", big.len()))
    );
    assert!(r.body == big[a..=b], "range body differs");

    // Download into fresh stores, signatures required; Nix verifies every path. First with
    // the uploader's Nix cache dir (it remembers the uploaded narinfos and asks for the
    // compressed NAR names: served recompressed), then as another machine would.
    let other_xdg = env.path("other-xdg");
    fs::create_dir_all(&other_xdg).unwrap();
    for (fresh, xdg) in [
        ("fresh/store", env.xdg.clone()),
        ("fresh2/store", other_xdg),
    ] {
        let fresh = env.path(fresh).display().to_string();
        let down = env.download_in(&xdg, &daemon, &fresh, &pk, &out);
        assert!(down.status.success(), "nix copy --from: {}", text(&down));
        for p in &paths {
            let v = env.verify_path(&fresh, p);
            assert!(v.status.success(), "--verify-path {p}: {}", text(&v));
            assert!(env.sigs(&fresh, p).iter().any(|s| s.starts_with("e2e-rt-")));
        }
    }
    assert_eq!(daemon.metric("nar_aborted_total"), 0);
    assert!(daemon.metric("nar_bytes_served_total") >= 2 * nar_bytes);

    // Stopped cleanly, the data dir says the same.
    daemon.stop();
    let s = stats(&data);
    assert_eq!(s["narinfos"], n, "{s}");
    assert_eq!(s["nars"], n, "{s}");
    assert_eq!(s["nar_bytes"], nar_bytes, "{s}");
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
}

/// `nix copy --to http://…` with the default compression (xz). Before uploading, Nix checks
/// whether `nar/<FileHash>.nar.xz` exists (HEAD) and accepts only 200, 404 or 403 as answers.
#[test]
fn nix_copy_round_trip() {
    round_trip("");
}

#[test]
fn nix_copy_round_trip_uncompressed() {
    round_trip("?compression=none");
}

#[test]
fn nix_copy_round_trip_zstd() {
    round_trip("?compression=zstd");
}

// ---------------------------------------------------------------------------------------------
// 2. Signatures by an untrusted key.

/// A small closure of the corpus (a path with a single reference).
fn small_closure(corpus: &Corpus) -> (String, Vec<String>) {
    let p = corpus
        .paths(1)
        .into_iter()
        .find(|p| p.ends_with("-bzip2-1.0.8"))
        .unwrap_or_else(|| corpus.out_path(1));
    let out = run_ok(Command::new("nix-store").args(["-qR", &p]));
    let closure = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    (p, closure)
}

#[test]
fn untrusted_signature_is_refused_by_nix() {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, closure) = small_closure(corpus);
    let (sk_a, pk_a) = env.key("a");
    let (_sk_b, pk_b) = env.key("b");
    let src = env.signed_store("src", &out, &sk_a);
    let token = env.path("token");
    let daemon = Daemon::start(
        &env.path("data"),
        &["--upload-token-file", token.to_str().unwrap()],
    );
    let up = env.upload(&src, &format!("{}?compression=none", daemon.url()), &out);
    assert!(up.status.success(), "upload: {}", text(&up));
    assert_eq!(daemon.metric("store_narinfos"), closure.len() as u64);
    let info = narinfo(&daemon, &out);
    assert!(info.contains("\nSig: e2e-a-"), "{info}");

    // Trusting only B: refused, and nothing lands in the store.
    let fresh = env.path("fresh-b/store").display().to_string();
    let down = env.download(&daemon, &fresh, &pk_b, &out);
    assert!(!down.status.success(), "must be refused: {}", text(&down));
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("signature"),
        "{}",
        text(&down)
    );
    for p in &closure {
        assert!(!env.is_valid(&fresh, p), "{p} is valid in {fresh}");
        assert!(
            !Path::new(&fresh).join(&p[1..]).exists(),
            "{p} exists in {fresh}"
        );
    }

    // Control: trusting A, the same copy works.
    let fresh_a = env.path("fresh-a/store").display().to_string();
    let down = env.download(&daemon, &fresh_a, &pk_a, &out);
    assert!(down.status.success(), "trusting A: {}", text(&down));
    for p in &closure {
        let v = env.verify_path(&fresh_a, p);
        assert!(v.status.success(), "{p}: {}", text(&v));
    }
    daemon.stop();
}

// ---------------------------------------------------------------------------------------------
// 3. A damaged pack.

#[test]
fn corrupted_pack_never_yields_valid_path() {
    let corpus = Corpus::small();
    let env = Env::new();
    let out = corpus.out_path(1);
    let paths = corpus.paths(1);
    let data = env.path("data");
    let token = env.path("token");
    let token_args = ["--upload-token-file", token.to_str().unwrap()];
    let daemon = Daemon::start(&data, &token_args);
    let up = env.upload("auto", &format!("{}?compression=none", daemon.url()), &out);
    assert!(up.status.success(), "upload: {}", text(&up));
    assert_eq!(daemon.metric("store_narinfos"), paths.len() as u64);
    daemon.stop();
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));

    // Flip bytes in several places of the pack.
    let pack = data.join("packs/pack-00000001.pack");
    let mut bytes = fs::read(&pack).unwrap();
    let len = bytes.len();
    assert!(len > 1 << 20, "pack of {len} bytes");
    for f in [15, 35, 50, 65, 85] {
        bytes[len * f / 100] ^= 0xa5;
    }
    fs::write(&pack, &bytes).unwrap();
    let v = cmd()
        .args(["verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!v.status.success(), "verify must find the damage");
    let report = String::from_utf8_lossy(&v.stdout).to_string();
    let damaged: BTreeSet<&String> = paths
        .iter()
        .filter(|p| report.contains(p.as_str()))
        .collect();
    assert!(!damaged.is_empty(), "no damaged path named:\n{report}");

    let daemon = Daemon::start(&data, &token_args);

    // Over raw HTTP: a damaged NAR is cut short, never a complete 200; an intact one is
    // byte-identical to what Nix dumps.
    for p in &paths {
        let info = narinfo(&daemon, p);
        let url = field(&info, "URL").unwrap();
        let r = http(daemon.port, &get(&format!("/{url}")));
        let nar = dump(p);
        if damaged.contains(p) {
            assert!(
                !(r.status == 200 && r.complete),
                "{p}: damaged NAR served whole ({} bytes)",
                r.body.len()
            );
            assert!(r.body != nar);
        } else {
            assert_eq!(r.status, 200, "{p}");
            assert!(r.complete && r.body == nar, "{p}: intact NAR differs");
        }
    }
    assert!(daemon.metric("nar_aborted_total") >= damaged.len() as u64);

    // The real Nix: the copy fails, nothing invalid is registered.
    let fresh = env.path("fresh/store").display().to_string();
    let down = env
        .nix("nix")
        .args(["copy", "--from", &daemon.url(), "--to", &fresh])
        .args(["--option", "download-attempts", "2"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!down.status.success(), "copy must fail: {}", text(&down));
    let mut valid = 0;
    for p in &paths {
        if env.is_valid(&fresh, p) {
            valid += 1;
            assert!(!damaged.contains(p), "damaged {p} is valid in {fresh}");
            let v = env.verify_path(&fresh, p);
            assert!(v.status.success(), "{p}: {}", text(&v));
        }
    }
    assert!(valid < paths.len());
    assert!(!env.is_valid(&fresh, &out));
    daemon.assert_alive();
    daemon.stop();
}

// ---------------------------------------------------------------------------------------------
// 4. Authentication of uploads.

/// The NAR and narinfo of the top-level path of generation 1 in the uncompressed corpus cache.
fn one_path(corpus: &Corpus) -> (String, String, Vec<u8>) {
    let p = corpus.out_path(1);
    let dir = corpus.dir.join("cache-none");
    let info = fs::read_to_string(dir.join(format!("{}.narinfo", hash_part(&p)))).unwrap();
    let url = field(&info, "URL").unwrap().to_string();
    let nar = fs::read(dir.join(&url)).unwrap();
    (info, url, nar)
}

#[test]
fn upload_without_token_is_refused() {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, _) = small_closure(corpus);
    let token = env.path("token");
    let data = env.path("data");
    let daemon = Daemon::start(&data, &["--upload-token-file", token.to_str().unwrap()]);
    let to = format!("{}?compression=none", daemon.url());

    for netrc in [None, Some("netrc-wrong")] {
        let mut c = env.nix("nix");
        c.args(["copy", "--to", &to, &out]);
        if let Some(n) = netrc {
            c.args(["--option", "netrc-file"]).arg(env.path(n));
        }
        let o = c.output().unwrap();
        assert!(!o.status.success(), "netrc {netrc:?}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("401"),
            "{}",
            text(&o)
        );
    }

    let (info, url, nar) = one_path(corpus);
    let p = corpus.out_path(1);
    let info_path = format!("/{}.narinfo", hash_part(&p));
    for auth in [None, Some(("x", "not-the-token")), Some(("x", ""))] {
        let r = http(daemon.port, &put(&format!("/{url}"), auth, &nar));
        assert_eq!(r.status, 401, "PUT NAR with {auth:?}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Basic realm=\"nix-p2p-cache\"")
        );
        let r = http(daemon.port, &put(&info_path, auth, info.as_bytes()));
        assert_eq!(r.status, 401, "PUT narinfo with {auth:?}");
    }
    // A password that is a prefix or an extension of the token.
    for pw in [&TOKEN[..5], &format!("{TOKEN}x")] {
        let r = http(daemon.port, &put(&format!("/{url}"), Some(("x", pw)), &nar));
        assert_eq!(r.status, 401);
    }
    assert_eq!(daemon.metric("store_narinfos"), 0);
    assert_eq!(daemon.metric("uploads_total"), 0);
    assert_eq!(daemon.metric("upload_bytes_total"), 0);

    // Control: the token works.
    let auth = Some(("anyone", TOKEN));
    assert_eq!(
        http(daemon.port, &put(&format!("/{url}"), auth, &nar)).status,
        200
    );
    let r = http(daemon.port, &put(&info_path, auth, info.as_bytes()));
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(daemon.metric("store_narinfos"), 1);
    daemon.stop();

    // Without --upload-token-file uploads are forbidden, whatever the credentials.
    let data2 = env.path("data2");
    let daemon = Daemon::start(&data2, &[]);
    for auth in [None, Some(("x", TOKEN))] {
        let r = http(daemon.port, &put(&format!("/{url}"), auth, &nar));
        assert_eq!(r.status, 403, "PUT NAR with {auth:?}");
        let r = http(daemon.port, &put(&info_path, auth, info.as_bytes()));
        assert_eq!(r.status, 403, "PUT narinfo with {auth:?}");
    }
    let o = env.upload("auto", &format!("{}?compression=none", daemon.url()), &out);
    assert!(!o.status.success(), "{}", text(&o));
    assert_eq!(daemon.metric("store_narinfos"), 0);
    assert!(
        !data2.join("uploads").exists()
            || fs::read_dir(data2.join("uploads")).unwrap().count() == 0
    );
    daemon.stop();
}

// ---------------------------------------------------------------------------------------------
// 5. Bad requests.

#[test]
fn bad_requests_get_4xx_and_daemon_survives() {
    let corpus = Corpus::small();
    let env = Env::new();
    let token = env.path("token");
    let data = env.path("data");
    let daemon = Daemon::start(&data, &["--upload-token-file", token.to_str().unwrap()]);
    let port = daemon.port;
    let auth = Some(("x", TOKEN));
    let (info, url, nar) = one_path(corpus);
    let p = corpus.out_path(1);
    let info_path = format!("/{}.narinfo", hash_part(&p));

    let status = |req: &[u8]| http(port, req).status;
    assert_eq!(status(&get("/zzzz.narinfo")), 400);
    assert_eq!(
        status(&get(&format!("/{}.narinfo", "e".repeat(32)))),
        400,
        "e is not nix-base32"
    );
    assert_eq!(status(&get(&format!("/{}.narinfo", "0".repeat(32)))), 404);
    assert_eq!(status(&get(&info_path)), 404);
    assert_eq!(status(&get("/nar/zzzz.nar")), 400);
    assert_eq!(status(&get(&format!("/nar/{}.nar", "0".repeat(52)))), 404);
    for path in [
        "/nar/../../etc/passwd",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/nar/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/nar/..%2f..%2fetc%2fpasswd.nar",
    ] {
        let r = http(port, &get(path));
        assert!((400..500).contains(&r.status), "GET {path}: {}", r.status);
        assert!(!String::from_utf8_lossy(&r.body).contains("root:"));
    }
    for path in ["/nar/..%2f..%2fx.nar", "/nar/.x.nar", "/nar/a%2fb.nar"] {
        let r = http(port, &put(path, auth, b"data"));
        assert!((400..500).contains(&r.status), "PUT {path}: {}", r.status);
    }
    let r = http(port, b"GARBAGE\r\n\r\n");
    assert!(r.status == 0 || (400..500).contains(&r.status), "{r:?}");

    // A truncated NAR upload: Content-Length larger than what is sent, then EOF.
    let mut req = format!(
        "PUT /{url} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {}\r\nContent-Length: {}\r\n\r\n",
        base64(format!("x:{TOKEN}").as_bytes()),
        nar.len()
    )
    .into_bytes();
    req.extend_from_slice(&nar[..nar.len() / 2]);
    let r = http_with(port, &req, true);
    assert!(!(200..300).contains(&r.status), "truncated upload: {r:?}");
    // ... then its narinfo: the NAR is not there.
    let r = http(port, &put(&info_path, auth, info.as_bytes()));
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(daemon.metric("store_narinfos"), 0);

    // A narinfo whose NAR was never uploaded at all.
    let r = http(port, &put(&info_path, auth, info.as_bytes()));
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));

    // An oversized narinfo.
    let mut big = info.clone().into_bytes();
    big.extend(std::iter::repeat_n(b'#', (1 << 20) + 10));
    let r = http(port, &put(&info_path, auth, &big));
    assert!(
        matches!(r.status, 400 | 413),
        "oversized narinfo: {}",
        r.status
    );

    // A narinfo for another path's hash, and one that is not a narinfo.
    let r = http(
        port,
        &put(
            &format!("/{}.narinfo", "0".repeat(32)),
            auth,
            info.as_bytes(),
        ),
    );
    assert_eq!(r.status, 400);
    let r = http(port, &put(&info_path, auth, b"\xff\xfe not text"));
    assert_eq!(r.status, 400);
    assert_eq!(daemon.metric("store_narinfos"), 0);
    assert_eq!(daemon.metric("uploads_total"), 0);

    // Now a real upload, then ranges on its NAR.
    assert_eq!(http(port, &put(&format!("/{url}"), auth, &nar)).status, 200);
    let r = http(port, &put(&info_path, auth, info.as_bytes()));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(daemon.metric("store_narinfos"), 1);
    let range = |spec: &str| {
        http(
            port,
            format!("GET /{url} HTTP/1.1\r\nHost: x\r\nRange: {spec}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
    };
    let n = nar.len();
    let r = range(&format!("bytes={n}-"));
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some(&*format!("bytes */{n}")));
    assert_eq!(range(&format!("bytes={}-{}", n + 10, n + 20)).status, 416);
    assert_eq!(range("bytes=-0").status, 416);
    let r = range("bytes=5-1");
    assert!((400..500).contains(&r.status), "bytes=5-1: {}", r.status);
    let r = range(&format!("bytes={}-", n - 10));
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &nar[n - 10..]);
    let r = range("bytes=-7");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &nar[n - 7..]);
    let r = range(&format!("bytes=0-{}", n * 2));
    assert_eq!(r.status, 206);
    assert!(r.complete && r.body == nar);

    // Still alive and unchanged.
    daemon.assert_alive();
    assert_eq!(daemon.metric("store_narinfos"), 1);
    let r = http(port, &get(&format!("/{url}")));
    assert!(r.status == 200 && r.complete && r.body == nar);
    daemon.stop();
}

/// Two uploads of the same NAR that overlap (as two `nix copy --to` of one path do) both get
/// a 200 and the path is then stored right; a part file left by a crash is gone after a
/// restart. (Both uploads used to write one staging file: a 500, or a corrupt NAR.)
#[test]
fn overlapping_uploads_of_one_nar_both_succeed() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let corpus = Corpus::small();
    let env = Env::new();
    let token = env.path("token");
    let data = env.path("data");
    let daemon = Daemon::start(&data, &["--upload-token-file", token.to_str().unwrap()]);
    let (info, url, nar) = one_path(corpus);
    let req = put(&format!("/{url}"), Some(("x", TOKEN)), &nar);
    let head_len = req.len() - nar.len();
    let clients: Vec<_> = (0..2u64)
        .map(|i| {
            let (port, req) = (daemon.port, req.clone());
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(150 * i));
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                // Headers and half the body, a pause (the other upload runs), the rest.
                let half = head_len + (req.len() - head_len) / 2;
                s.write_all(&req[..half]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(400));
                s.write_all(&req[half..]).unwrap();
                let mut resp = Vec::new();
                let _ = s.read_to_end(&mut resp);
                String::from_utf8_lossy(&resp).into_owned()
            })
        })
        .collect();
    for c in clients {
        let resp = c.join().unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    let p = corpus.out_path(1);
    let info_path = format!("/{}.narinfo", hash_part(&p));
    let r = http(
        daemon.port,
        &put(&info_path, Some(("x", TOKEN)), info.as_bytes()),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let served = narinfo(&daemon, &p);
    let nar_url = field(&served, "URL").unwrap();
    let r = http(daemon.port, &get(&format!("/{nar_url}")));
    assert!(
        r.complete && r.body == dump(&p),
        "the stored NAR is the path's"
    );
    daemon.stop();

    // A part file of an upload cut by a crash is swept at the next start.
    let part = data.join("uploads").join("x.nar.part-1-1");
    fs::write(&part, b"half an upload").unwrap();
    let daemon = Daemon::start(&data, &["--upload-token-file", token.to_str().unwrap()]);
    assert!(!part.exists(), "stale part file removed");
    daemon.stop();
}

/// Hundreds of clients that ask for a large NAR and never read it (more than the runtime's 512
/// blocking threads) do not starve the daemon: narinfos, `/metrics` and a whole NAR are still
/// served. (Each stored NAR body used to hold a blocking thread for its whole download.)
#[test]
fn slow_readers_do_not_starve_the_daemon() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;
    let env = Env::new();
    let token = env.path("token");
    // More connections than the runtime has blocking threads (512): this is about threads,
    // so the connection cap must not be what stops them.
    let daemon = Daemon::start_with_env(
        &env.path("data"),
        &["--upload-token-file", token.to_str().unwrap()],
        &[("NIX_P2P_CACHE_HTTP_MAX_CONNECTIONS", "2000")],
    );
    // A 48 MiB NAR: far more than loopback socket buffers hold.
    let nar =
        nix_p2p_cache_tests::nar_of_file(&nix_p2p_cache_tests::test_upstream::noise(7, 48 << 20));
    let hash = "4123456789abcdfghijklmnpqrsvwxyz";
    let nar_hash = nar_hash_of(&nar);
    let info = format!(
        "StorePath: /nix/store/{hash}-big\nURL: nar/big.nar\nCompression: none\n\
         NarHash: {nar_hash}\nNarSize: {}\nReferences: \n",
        nar.len()
    );
    let auth = Some(("x", TOKEN));
    assert_eq!(
        http(daemon.port, &put("/nar/big.nar", auth, &nar)).status,
        200
    );
    let r = http(
        daemon.port,
        &put(&format!("/{hash}.narinfo"), auth, info.as_bytes()),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let served =
        String::from_utf8(http(daemon.port, &get(&format!("/{hash}.narinfo"))).body).unwrap();
    let url = format!("/{}", field(&served, "URL").unwrap());

    let slow: Vec<TcpStream> = (0..560)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", daemon.port)).unwrap();
            s.write_all(&get(&url)).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2)); // every slow request has started its body
                                                // Bounded waits: a starved daemon would not answer at all.
    let ask = |path: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", daemon.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&get(path)).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    };
    let n = ask(&format!("/{hash}.narinfo"));
    assert!(
        n.starts_with(b"HTTP/1.1 200"),
        "narinfo: {:?}",
        String::from_utf8_lossy(&n)
    );
    let m = ask("/metrics");
    assert!(m.starts_with(b"HTTP/1.1 200"), "metrics");
    let r = http(daemon.port, &get(&url));
    assert!(
        r.status == 200 && r.complete && r.body == nar,
        "a whole NAR among slow readers"
    );
    drop(slow);
    daemon.assert_alive();
    daemon.stop();
}

/// Half-sent request heads (issue 14): the daemon holds at most its connection cap (the rest
/// wait in the kernel's backlog, not in its descriptors), closes a connection that stays idle,
/// and answers complete requests again once the idle ones are gone.
#[test]
fn half_sent_request_heads_are_capped_and_closed_when_idle() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_env(
        &tmp.path().join("data"),
        &[],
        &[
            ("NIX_P2P_CACHE_HTTP_IDLE_SECS", "2"),
            ("NIX_P2P_CACHE_HTTP_MAX_CONNECTIONS", "300"),
        ],
    );
    let pid = d.child.as_ref().unwrap().id();
    let fds = || fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let before = fds();
    let mut conns: Vec<std::net::TcpStream> = (0..800)
        .map_while(|_| {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", d.port)).ok()?;
            c.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n")
                .ok()?;
            Some(c)
        })
        .collect();
    assert!(conns.len() >= 700, "only {} connections", conns.len());
    std::thread::sleep(std::time::Duration::from_millis(500));
    let during = fds();
    assert!(
        during < before + 400,
        "{before} -> {during} descriptors with {} half-sent requests",
        conns.len()
    );
    // Idle ones are closed by the daemon (EOF or reset, never an answer).
    for c in conns.iter_mut().take(20) {
        c.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(n) => assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) => assert!(
                e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut,
                "not closed: {e}"
            ),
        }
    }
    assert_eq!(http(d.port, &get("/nix-cache-info")).status, 200);
    drop(conns);
    d.stop();
}

/// kill -9 at arbitrary points during a stream of uploads, three times (issue 14): every upload
/// answered 200 before the kill is served byte-identical after the restart, and the store
/// verifies. (An upload is answered only after its index commit.)
#[test]
fn kill_9_during_uploads_loses_no_acknowledged_upload() {
    use std::sync::{Arc, Mutex};
    let env = Env::new();
    let token = env.path("token");
    let data = env.path("data");
    let token_arg = token.to_str().unwrap().to_string();
    let nars: Vec<(String, Vec<u8>, String)> = (0..60u64)
        .map(|i| {
            let nar = nix_p2p_cache_tests::nar_of_file(&nix_p2p_cache_tests::test_upstream::noise(
                100 + i,
                300 << 10,
            ));
            let hash: String = format!("{i:02}")
                .chars()
                .chain("3456789abcdfghijklmnpqrsvwxyz0".chars())
                .collect();
            let info = format!(
                "StorePath: /nix/store/{hash}-up{i}\nURL: nar/up{i}.nar\nCompression: none\n\
                 NarHash: {}\nNarSize: {}\nReferences: \n",
                nar_hash_of(&nar),
                nar.len()
            );
            (hash, nar, info)
        })
        .collect();
    let nars = Arc::new(nars);
    let mut acked_all: Vec<usize> = Vec::new();
    let mut next = 0usize;
    for delay_ms in [250u64, 600, 1100] {
        let mut d = Daemon::start(&data, &["--upload-token-file", &token_arg]);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (port, list, ack, start) = (d.port, nars.clone(), acked.clone(), next);
        let uploader = std::thread::spawn(move || {
            for i in start..list.len() {
                let (hash, nar, info) = &list[i];
                let auth = Some(("x", TOKEN));
                if http(port, &put(&format!("/nar/up{i}.nar"), auth, nar)).status != 200 {
                    return;
                }
                if http(
                    port,
                    &put(&format!("/{hash}.narinfo"), auth, info.as_bytes()),
                )
                .status
                    != 200
                {
                    return;
                }
                ack.lock().unwrap().push(i);
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let mut child = d.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        uploader.join().unwrap();
        let acked = acked.lock().unwrap().clone();
        next = acked.last().map_or(next, |&i| i + 1);
        acked_all.extend(acked);
    }
    assert!(!acked_all.is_empty(), "no upload was acknowledged");
    let d = Daemon::start(&data, &["--upload-token-file", &token_arg]);
    for &i in &acked_all {
        let (hash, nar, _) = &nars[i];
        let info = http(d.port, &get(&format!("/{hash}.narinfo")));
        assert_eq!(info.status, 200, "acknowledged upload {i} lost");
        let body = String::from_utf8(info.body).unwrap();
        let url = field(&body, "URL").unwrap();
        let r = http(d.port, &get(&format!("/{url}")));
        assert!(r.complete && r.body == *nar, "upload {i}: wrong NAR");
    }
    d.stop();
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    eprintln!(
        "{} acknowledged uploads survived 3 kill -9",
        acked_all.len()
    );
}
