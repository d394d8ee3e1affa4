//! The `http` target: the real axum router (`http::router`) over a real store in a temporary
//! data dir holding one uploaded NAR, driven with in-memory requests (`tower::ServiceExt::
//! oneshot`, no socket). An input is up to four requests, each `METHOD PATH`, header lines, an
//! empty line and a body, separated by [`NEXT`]; the upload token is [`TOKEN`].

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use tower::ServiceExt as _;

use super::{block_on, Rng};
use crate::core::nar::NarWriter;
use crate::core::NarHash;
use crate::http::{self, HttpError, HttpState};

/// Separates the requests of one input.
pub const NEXT: &[u8] = b"\n--next--\n";
/// The upload token (`Authorization: Basic bml4OmZ1eno=` is `nix:fuzz`).
pub const TOKEN: &str = "fuzz";
/// Store path of the stored NAR.
pub const STORE_PATH: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-fuzz-tree";
const MAX_REQUESTS: usize = 4;
const MAX_BODY: usize = 64 << 20;

/// The router, its store's one NAR, and where uploads are staged.
struct Harness {
    router: Router,
    nar: Vec<u8>,
    nar_hash: NarHash,
    /// `<digest>.nar.xz`, the compressed name the NAR was uploaded under.
    xz_name: String,
    staging: PathBuf,
    /// Kept for the process's lifetime (statics are not dropped: the dir stays in $TMPDIR).
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static H: std::sync::OnceLock<Harness> = std::sync::OnceLock::new();
    H.get_or_init(|| block_on(setup()))
}

/// A NAR of a few chunks: a directory with an executable, a symlink and ~200 KiB of
/// pseudo-random contents naming store paths.
pub fn fixture_nar() -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut contents: Vec<u8> = (0..200_000).map(|_| rng.next() as u8).collect();
    for at in [1000usize, 70_000, 150_000] {
        let p = format!("{STORE_PATH}/bin/x");
        contents[at..at + p.len()].copy_from_slice(p.as_bytes());
    }
    let mut w = NarWriter::new(Vec::new());
    let steps = |w: &mut NarWriter<Vec<u8>>| -> std::io::Result<()> {
        w.begin_directory()?;
        w.entry(b"bin")?;
        w.regular(true, 5)?;
        w.write_contents(b"#!sh\n")?;
        w.end_regular()?;
        w.end_entry()?;
        w.entry(b"data")?;
        w.regular(false, contents.len() as u64)?;
        w.write_contents(&contents)?;
        w.end_regular()?;
        w.end_entry()?;
        w.entry(b"link")?;
        w.symlink(b"data")?;
        w.end_entry()?;
        w.end_directory()
    };
    steps(&mut w).expect("writing to memory");
    w.finish().expect("a valid NAR").0
}

/// The narinfo the fixture NAR is uploaded with.
pub fn fixture_narinfo(nar: &[u8], xz: &[u8]) -> String {
    let file_hash = NarHash::digest(xz);
    format!(
        "StorePath: {STORE_PATH}\nURL: nar/{}.nar.xz\nCompression: xz\nFileHash: {file_hash}\n\
         FileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: \n",
        file_hash.to_base32(),
        xz.len(),
        NarHash::digest(nar),
        nar.len()
    )
}

pub fn xz(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    xz2::read::XzEncoder::new(data, 1)
        .read_to_end(&mut out)
        .expect("compressing in memory");
    out
}

async fn setup() -> Harness {
    let dir = tempfile::Builder::new()
        .prefix("nix-p2p-cache-fuzz-")
        .tempdir()
        .expect("a temporary dir");
    let store = Arc::new(crate::store::Store::open(dir.path()).expect("a fresh store"));
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let resolver = Arc::new(crate::resolve::Resolver::new(
        store.clone(),
        Vec::new(),
        metrics.clone(),
    ));
    let staging = dir.path().join("uploads");
    let state = Arc::new(HttpState {
        store,
        metrics,
        upload_token: Some(TOKEN.into()),
        trusted: Vec::new(),
        staging: staging.clone(),
        max_upload: 1 << 20,
        narinfo_cache: Arc::new(http::NarinfoCache::new(
            64,
            std::time::Duration::from_secs(1),
        )),
        resolver,
        peers: None,
        node: http::NodeInfo {
            version: "fuzz",
            role: crate::config::Role::Peer,
            share: crate::config::Share::All,
            announce: crate::config::Announce::Roots,
            max_cache_size: None,
            upload_rate_limit: None,
            upstreams: Vec::new(),
            peer_id: None,
            p2p_addresses: Vec::new(),
            trusted_public_keys: Vec::new(),
            data_dir: dir.path().to_path_buf(),
        },
        started: std::time::Instant::now(),
        quota: None,
        announcer: None,
    });
    let router = http::router(state);
    let nar = fixture_nar();
    let compressed = xz(&nar);
    let info = fixture_narinfo(&nar, &compressed);
    let file_hash = NarHash::digest(&compressed).to_base32();
    let xz_name = format!("{file_hash}.nar.xz");
    let auth = format!("Basic {}", auth_value());
    for (path, body) in [
        (format!("/nar/{xz_name}"), compressed),
        (
            format!("/{}.narinfo", &STORE_PATH[11..43]),
            info.into_bytes(),
        ),
    ] {
        let req = Request::put(&path)
            .header(header::AUTHORIZATION, &auth)
            .body(Body::from(body))
            .expect("a valid request");
        let resp = router.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK, "fixture upload {path}");
    }
    Harness {
        router,
        nar_hash: NarHash::digest(&nar),
        nar,
        xz_name,
        staging,
        _dir: dir,
    }
}

fn auth_value() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("nix:{TOKEN}"))
}

/// One request of an input: `METHOD PATH\r?\n(Name: value\r?\n)*\r?\n<body>`.
fn parse_request(raw: &[u8]) -> Option<Request<Body>> {
    let head_end = raw
        .windows(2)
        .position(|w| w == b"\n\n")
        .map_or(raw.len(), |i| i + 1);
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let body = raw.get(head_end + 1..).unwrap_or_default().to_vec();
    let mut lines = head.lines();
    let first = lines.next()?;
    let (method, path) = first.split_once(' ').unwrap_or(("GET", first));
    let mut b = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).ok()?)
        .uri(path);
    for line in lines.filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once(':')?;
        b = b.header(k, v.trim_start());
    }
    b.body(Body::from(body)).ok()
}

/// http: no request gets a 5xx or panics the server; a 2xx body is whole (its
/// `Content-Length`); the stored NAR is served byte for byte, whole, by range (exactly the
/// range `parse_range` computes) and recompressed; the file-name parsers' accepted names
/// round-trip.
pub fn http(data: &[u8]) {
    let h = harness();
    for raw in split(data).into_iter().take(MAX_REQUESTS) {
        let Some(req) = parse_request(raw) else {
            continue;
        };
        check_names(req.uri().path());
        block_on(one(h, req));
    }
    // Unfinished uploads would pile up over millions of inputs.
    if let Ok(entries) = std::fs::read_dir(&h.staging) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = memchr::memmem::find(rest, NEXT) {
        out.push(&rest[..i]);
        rest = &rest[i + NEXT.len()..];
    }
    out.push(rest);
    out
}

/// The pure parsers behind the routes, on the request's last path segment.
fn check_names(path: &str) {
    let file = path.rsplit('/').next().unwrap_or_default();
    if let Ok(http::NarFile::Plain(hash)) = http::parse_nar_file(file) {
        let canonical = format!("{}.nar", hash.to_base32());
        assert_eq!(
            http::parse_nar_file(&canonical).ok(),
            Some(http::NarFile::Plain(hash))
        );
    }
    if let Ok(hash) = http::parse_narinfo_file(file) {
        let canonical = format!("{}.narinfo", hash.as_str());
        assert_eq!(http::parse_narinfo_file(&canonical).ok(), Some(hash));
    }
}

async fn one(h: &Harness, req: Request<Body>) {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let range = req
        .headers()
        .get(header::RANGE)
        .map(|v| v.to_str().map(str::to_string));
    let resp = h.router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    assert!(
        !status.is_server_error(),
        "{method} {path}: {status} (a 5xx for a request)"
    );
    let declared = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let content_range = resp
        .headers()
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = axum::body::to_bytes(resp.into_body(), MAX_BODY).await;
    if method == Method::HEAD {
        assert!(body.is_ok_and(|b| b.is_empty()), "HEAD {path}: a body");
        return;
    }
    if !status.is_success() {
        return;
    }
    let body = body.unwrap_or_else(|e| panic!("{method} {path}: {status} body aborted: {e}"));
    if let Some(n) = declared {
        assert_eq!(
            body.len() as u64,
            n,
            "{path}: body is not Content-Length bytes"
        );
    }
    if method != Method::GET {
        return;
    }
    let file = path.strip_prefix("/nar/").unwrap_or_default();
    if file == h.xz_name {
        let mut out = Vec::new();
        xz2::read::XzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .expect("the recompressed NAR decompresses");
        assert!(out == h.nar, "the recompressed NAR is not the NAR");
        return;
    }
    if http::parse_nar_file(file).ok() != Some(http::NarFile::Plain(h.nar_hash)) {
        return;
    }
    let size = h.nar.len() as u64;
    let expected = match range {
        None => Ok(None),
        Some(Err(_)) => return, // a non-text Range header: whatever the server did
        Some(Ok(v)) => http::parse_range(&v, size),
    };
    match expected {
        Ok(None) => {
            assert_eq!(status, StatusCode::OK);
            assert!(body == h.nar, "the NAR served is not the NAR");
        }
        Ok(Some((start, end))) => {
            assert!(
                start < end && end <= size,
                "parse_range gave {start}..{end} of {size}"
            );
            assert_eq!(status, StatusCode::PARTIAL_CONTENT);
            assert_eq!(
                content_range.as_deref(),
                Some(format!("bytes {start}-{}/{size}", end - 1).as_str())
            );
            assert!(
                body == h.nar[start as usize..end as usize],
                "wrong range bytes"
            );
        }
        Err(HttpError::RangeNotSatisfiable { .. } | HttpError::BadRequest(_)) => {
            panic!("{path}: {status} where parse_range refused the range")
        }
        Err(e) => panic!("parse_range: unexpected error {e}"),
    }
}
