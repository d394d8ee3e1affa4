//! Reading an existing Nix binary cache — a directory (`file://`) or an HTTP(S) server: the
//! `<hash>.narinfo` files and NARs at their `URL`, compressed with xz, zstd, bzip2 or not at
//! all — and ingesting it into the store (`import`, mirroring).
//!
//! Every narinfo is parsed and its signatures checked before its NAR is read; every NAR is
//! checked by [`Store::ingest`]. A refused path is reported with its reason and leaves nothing
//! behind; the others still import. A path whose NAR is stored already is not downloaded again
//! (only its narinfo is read), so a run that was cut short continues where it stopped.
//!
//! Up to `jobs` paths are worked on at once, each on its own thread: the narinfo first (a
//! closure's references are queued as soon as it is checked), then the NAR, streamed —
//! download → bounded channel → decompressor → ingest — so memory stays bounded whatever the
//! NAR sizes. An HTTP cache has no listing: what to import is named (store paths, a store-paths
//! list, their closure).

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use crate::core::narinfo::{NarInfo, NarInfoError};
use crate::core::signing::{self, PublicKey, SigningError};
use crate::core::store_path::{parse_hash_or_path, StorePath, StorePathHash};
use crate::store::{IngestOutcome, Retention, Store, StoreError};
use crate::upstream::ChannelReader;

/// Connect timeout of HTTP requests.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Total time allowed for a narinfo (or `nix-cache-info`) request.
const NARINFO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the next bytes of a NAR or store-paths download.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest narinfo accepted.
const MAX_NARINFO: usize = 1024 * 1024;
/// Largest store-paths list accepted (decompressed).
const MAX_LIST: u64 = 256 * 1024 * 1024;
/// Blocks of one NAR download between the network and its ingesting thread.
const QUEUE: usize = 8;
/// Most parallel jobs.
pub const MAX_JOBS: usize = 64;

/// Errors of an import, each naming the store path (or hash) it is about.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("unsupported binary cache URL {0:?} (file:///path, http://… or https://…)")]
    UnsupportedUrl(String),
    #[error("{0}: an HTTP binary cache has no listing: name the store paths (arguments, --store-paths) to import")]
    NoListing(String),
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{what}, line {line}: {text:?} is not a store path")]
    BadList {
        what: String,
        line: usize,
        text: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: no narinfo in the binary cache")]
    NotInCache(String),
    #[error("{what}: malformed narinfo: {source}")]
    BadNarInfo {
        what: String,
        #[source]
        source: NarInfoError,
    },
    #[error("{what}: narinfo is for {found}")]
    WrongPath { what: String, found: String },
    #[error("{path}: signature check failed: {source}")]
    Signature {
        path: String,
        #[source]
        source: SigningError,
    },
    #[error("{path}: unsupported Compression {compression:?}")]
    UnsupportedCompression { path: String, compression: String },
    #[error("{path}: NAR URL {url:?} leaves the binary cache")]
    BadUrl { path: String, url: String },
    #[error(transparent)]
    Store(Box<StoreError>),
}

impl From<StoreError> for ImportError {
    fn from(e: StoreError) -> Self {
        ImportError::Store(Box::new(e))
    }
}

/// A binary cache to import from: a directory (`file://`) or an HTTP(S) server.
pub struct BinaryCache {
    url: String,
    kind: Kind,
    /// Bytes of NAR files read (as stored: compressed).
    read_bytes: Arc<AtomicU64>,
    /// NAR files opened (downloads started).
    nars_opened: AtomicU64,
}

enum Kind {
    Dir(PathBuf),
    Http(HttpCache),
}

/// The HTTP side: one client (one connection pool) and a small runtime of its own, which the
/// importing threads block on; NAR bodies reach them through bounded channels.
struct HttpCache {
    base: String,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl BinaryCache {
    /// Opens `file:///path`, `http://…` or `https://…`; an HTTP cache must answer
    /// `nix-cache-info`.
    pub fn open(url: &str) -> Result<Self, ImportError> {
        let kind = if let Some(path) = url.strip_prefix("file://") {
            let path = path.split('?').next().unwrap_or(path);
            let root = PathBuf::from(path);
            if !root.is_dir() {
                return Err(ImportError::Io {
                    path: root,
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        "binary cache directory not found",
                    ),
                });
            }
            Kind::Dir(root)
        } else if url.starts_with("http://") || url.starts_with("https://") {
            let base = url.trim_end_matches('/').to_string();
            if reqwest::Url::parse(&base).is_err() || base.contains('?') {
                return Err(ImportError::UnsupportedUrl(url.to_string()));
            }
            let http = HttpCache::new(base)?;
            http.check_cache_info()?;
            Kind::Http(http)
        } else {
            return Err(ImportError::UnsupportedUrl(url.to_string()));
        };
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            kind,
            read_bytes: Arc::default(),
            nars_opened: AtomicU64::new(0),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the cache can list its narinfos (a directory can, a server cannot).
    pub fn can_list(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }

    /// Bytes of NAR files read so far (compressed, as stored or downloaded).
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes.load(Ordering::Relaxed)
    }

    /// NAR files opened (downloads started) so far.
    pub fn nars_opened(&self) -> u64 {
        self.nars_opened.load(Ordering::Relaxed)
    }

    /// The narinfo text of a store-path hash, if the cache has it.
    pub fn narinfo_text(&self, hash: &StorePathHash) -> Result<Option<String>, ImportError> {
        let name = format!("{}.narinfo", hash.as_str());
        match &self.kind {
            Kind::Dir(root) => {
                let path = root.join(name);
                match std::fs::read_to_string(&path) {
                    Ok(t) => Ok(Some(t)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(ImportError::Io { path, source }),
                }
            }
            Kind::Http(h) => h.narinfo(&name),
        }
    }

    /// Hashes of every narinfo in the cache, sorted (a directory only).
    pub fn all_hashes(&self) -> Result<Vec<StorePathHash>, ImportError> {
        let root = match &self.kind {
            Kind::Dir(root) => root,
            Kind::Http(_) => return Err(ImportError::NoListing(self.url.clone())),
        };
        let rd = std::fs::read_dir(root).map_err(|source| ImportError::Io {
            path: root.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|source| ImportError::Io {
                path: root.clone(),
                source,
            })?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(h) = name.strip_suffix(".narinfo") {
                if let Ok(h) = StorePathHash::parse(h) {
                    out.push(h);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Opens the NAR of `info`, decompressed (streamed: nothing is held whole).
    pub fn open_nar(&self, info: &NarInfo) -> Result<Box<dyn Read + Send>, ImportError> {
        let path_name = info.store_path.to_absolute();
        let rel = Path::new(&info.url);
        if info.url.contains("://") || rel.components().any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(ImportError::BadUrl {
                path: path_name,
                url: info.url.clone(),
            });
        }
        let raw: Box<dyn Read + Send> = match &self.kind {
            Kind::Dir(root) => {
                let path = root.join(rel);
                let file = File::open(&path).map_err(|source| ImportError::Io {
                    path: path.clone(),
                    source,
                })?;
                Box::new(file)
            }
            Kind::Http(h) => Box::new(h.nar(&info.url)?),
        };
        self.nars_opened.fetch_add(1, Ordering::Relaxed);
        let counted = Counting {
            inner: raw,
            n: self.read_bytes.clone(),
        };
        let reader = BufReader::with_capacity(256 * 1024, counted);
        let compression = info.compression.as_deref().unwrap_or("bzip2");
        decompressor(reader, compression).map_err(|_| ImportError::UnsupportedCompression {
            path: path_name,
            compression: compression.to_string(),
        })
    }
}

impl HttpCache {
    fn new(base: String) -> Result<Self, ImportError> {
        let err = |e: &dyn std::fmt::Display| ImportError::Http {
            url: base.clone(),
            message: e.to_string(),
        };
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("nix-p2p-cache/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| err(&e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("import-http")
            .enable_all()
            .build()
            .map_err(|e| err(&e))?;
        Ok(Self { base, client, rt })
    }

    /// `GET <base>/nix-cache-info` must answer 200 with `StoreDir: /nix/store` (if it says).
    fn check_cache_info(&self) -> Result<(), ImportError> {
        let url = format!("{}/nix-cache-info", self.base);
        let text = self
            .get_small(&url, MAX_NARINFO)?
            .ok_or_else(|| ImportError::Http {
                url: url.clone(),
                message: "not found: is this a Nix binary cache?".into(),
            })?;
        match text.lines().find_map(|l| l.strip_prefix("StoreDir:")) {
            Some(d) if d.trim() != "/nix/store" => Err(ImportError::Http {
                url,
                message: format!("StoreDir is {}, not /nix/store", d.trim()),
            }),
            _ => Ok(()),
        }
    }

    fn narinfo(&self, name: &str) -> Result<Option<String>, ImportError> {
        self.get_small(&format!("{}/{name}", self.base), MAX_NARINFO)
    }

    /// A small text body; `None` on 404 (or 403: S3 says that for a missing key).
    fn get_small(&self, url: &str, max: usize) -> Result<Option<String>, ImportError> {
        let err = |message: String| ImportError::Http {
            url: url.to_string(),
            message,
        };
        self.rt.block_on(async {
            let resp = self
                .client
                .get(url)
                .timeout(NARINFO_TIMEOUT)
                .send()
                .await
                .map_err(|e| err(e.to_string()))?;
            match resp.status().as_u16() {
                200 => {}
                404 | 403 => return Ok(None),
                s => return Err(err(format!("HTTP status {s}"))),
            }
            let mut body = Vec::new();
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                body.extend_from_slice(&chunk.map_err(|e| err(e.to_string()))?);
                if body.len() > max {
                    return Err(err(format!("larger than {max} bytes")));
                }
            }
            String::from_utf8(body)
                .map(Some)
                .map_err(|_| err("not UTF-8".into()))
        })
    }

    /// Starts downloading `<base>/<rel>`; its body as a blocking reader, fed through a bounded
    /// channel by a task on the runtime (a stall ends it with an error).
    fn nar(&self, rel: &str) -> Result<ChannelReader, ImportError> {
        let url = format!("{}/{rel}", self.base);
        self.download(&url)
    }

    fn download(&self, url: &str) -> Result<ChannelReader, ImportError> {
        let err = |message: String| ImportError::Http {
            url: url.to_string(),
            message,
        };
        let resp = self
            .rt
            .block_on(self.client.get(url).send())
            .map_err(|e| err(e.to_string()))?;
        if resp.status().as_u16() != 200 {
            return Err(err(format!("HTTP status {}", resp.status().as_u16())));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(QUEUE);
        let url = url.to_string();
        self.rt.spawn(async move {
            let mut stream = resp.bytes_stream();
            loop {
                let item = match tokio::time::timeout(STALL_TIMEOUT, stream.next()).await {
                    Ok(None) => return,
                    Ok(Some(Ok(b))) => Ok(b),
                    Ok(Some(Err(e))) => Err(io::Error::other(format!("{url}: {e}"))),
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{url}: no data for {} s", STALL_TIMEOUT.as_secs()),
                    )),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return; // the ingest gave up, or the download did
                }
            }
        });
        Ok(ChannelReader::new(rx))
    }
}

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Reads a store-paths list: a file or an `http(s)://` URL, plain or xz/zstd-compressed (by
/// its magic bytes), one store path (or hash) per line; blank lines and `#` comments skipped.
pub fn read_store_paths(spec: &str) -> Result<Vec<StorePathHash>, ImportError> {
    let raw: Box<dyn Read + Send> = if spec.starts_with("http://") || spec.starts_with("https://") {
        let http = HttpCache::new(spec.to_string())?;
        let body = http.download(spec)?;
        // The runtime must outlive the reader: read it all here.
        let mut buf = Vec::new();
        body.take(MAX_LIST + 1)
            .read_to_end(&mut buf)
            .map_err(|e| ImportError::Http {
                url: spec.to_string(),
                message: e.to_string(),
            })?;
        Box::new(io::Cursor::new(buf))
    } else {
        let path = PathBuf::from(spec);
        Box::new(File::open(&path).map_err(|source| ImportError::Io { path, source })?)
    };
    let io_err = |source| ImportError::Io {
        path: PathBuf::from(spec),
        source,
    };
    let mut r = BufReader::new(raw);
    let head = io::BufRead::fill_buf(&mut r).map_err(io_err)?;
    let compression = if head.starts_with(b"\xFD7zXZ\0") {
        "xz"
    } else if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        "zstd"
    } else {
        "none"
    };
    let mut text = String::new();
    decompressor(r, compression)
        .map_err(io_err)?
        .take(MAX_LIST + 1)
        .read_to_string(&mut text)
        .map_err(io_err)?;
    if text.len() as u64 > MAX_LIST {
        return Err(io_err(io::Error::other(
            "store-paths list larger than 256 MiB",
        )));
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_hash_or_path(line).map_err(|_| ImportError::BadList {
            what: spec.to_string(),
            line: i + 1,
            text: line.to_string(),
        })?);
    }
    Ok(out)
}

/// A reader that decompresses `r` according to a narinfo `Compression` value.
pub fn decompressor<R: Read + Send + 'static>(
    r: R,
    compression: &str,
) -> Result<Box<dyn Read + Send>, io::Error> {
    Ok(match compression {
        "none" | "" => Box::new(r),
        "xz" => Box::new(xz2::read::XzDecoder::new_multi_decoder(r)),
        "zstd" => Box::new(zstd::stream::read::Decoder::new(r)?),
        "bzip2" => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("compression {other:?}"),
            ))
        }
    })
}

/// Parses a narinfo text and checks it is for `expected` (when given) and its signatures.
pub fn check_narinfo(
    text: &str,
    expected: Option<&StorePathHash>,
    trusted: &[PublicKey],
) -> Result<(NarInfo, signing::Trust), ImportError> {
    let what = expected.map_or_else(|| "narinfo".to_string(), |h| h.as_str().to_string());
    let info = NarInfo::parse(text).map_err(|source| ImportError::BadNarInfo {
        what: what.clone(),
        source,
    })?;
    if let Some(h) = expected {
        if info.store_path.hash() != h {
            return Err(ImportError::WrongPath {
                what,
                found: info.store_path.to_absolute(),
            });
        }
    }
    let trust =
        signing::verify_narinfo(&info, trusted).map_err(|source| ImportError::Signature {
            path: info.store_path.to_absolute(),
            source,
        })?;
    Ok((info, trust))
}

/// What to import.
pub enum Selection {
    /// Every narinfo in the cache.
    All,
    /// These paths (and, with `closure`, everything they reference, transitively).
    Paths {
        roots: Vec<StorePathHash>,
        closure: bool,
    },
}

/// Result of an import run.
#[derive(Debug, Default)]
pub struct ImportReport {
    /// Paths stored by this run.
    pub imported: u64,
    /// Paths the store held already (same narinfo): not read again, not counted as imported.
    pub already_present: u64,
    /// NAR bytes of the imported paths.
    pub nar_bytes: u64,
    /// NAR bytes of the paths already present.
    pub already_present_nar_bytes: u64,
    pub new_chunk_bytes: u64,
    pub new_compressed_bytes: u64,
    pub failed: Vec<ImportError>,
}

/// What an import run tells its caller as it goes (from any of its threads).
pub enum Event<'a> {
    /// Paths known so far (grows while a closure is walked).
    Total(u64),
    /// A path is stored (or was already).
    Done {
        path: &'a StorePath,
        outcome: &'a IngestOutcome,
    },
    /// A path was refused or could not be fetched.
    Failed(&'a ImportError),
}

/// Imports from `cache` into `store`, one path at a time. Failures of single paths are
/// collected, not fatal.
pub fn import(
    store: &Store,
    cache: &BinaryCache,
    selection: Selection,
    trusted: &[PublicKey],
    progress: impl FnMut(&StorePath, &IngestOutcome) + Send,
) -> Result<ImportReport, ImportError> {
    let progress = Mutex::new(progress);
    import_with(store, cache, selection, trusted, 1, &|e| {
        if let Event::Done { path, outcome } = e {
            (progress.lock().unwrap_or_else(|e| e.into_inner()))(path, outcome);
        }
    })
}

/// The work list shared by the jobs of [`import_with`].
struct Work {
    queue: VecDeque<StorePathHash>,
    seen: HashSet<StorePathHash>,
    /// Jobs working on a path (which may still add references to the queue).
    busy: usize,
    report: ImportReport,
}

/// Imports from `cache` into `store` with up to `jobs` paths at once (1..=[`MAX_JOBS`]).
/// `progress` hears of every path. Failures of single paths are collected, not fatal.
pub fn import_with(
    store: &Store,
    cache: &BinaryCache,
    selection: Selection,
    trusted: &[PublicKey],
    jobs: usize,
    progress: &(dyn Fn(Event<'_>) + Sync),
) -> Result<ImportReport, ImportError> {
    let (queue, closure): (VecDeque<StorePathHash>, bool) = match selection {
        Selection::All => (cache.all_hashes()?.into(), false),
        Selection::Paths { roots, closure } => (roots.into(), closure),
    };
    let mut seen = HashSet::new();
    let queue: VecDeque<StorePathHash> = queue
        .into_iter()
        .filter(|h| seen.insert(h.clone()))
        .collect();
    progress(Event::Total(seen.len() as u64));
    let jobs = jobs.clamp(1, MAX_JOBS).min(queue.len().max(1));
    let work = Mutex::new(Work {
        queue,
        seen,
        busy: 0,
        report: ImportReport::default(),
    });
    let wake = Condvar::new();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| job(store, cache, trusted, closure, &work, &wake, progress));
        }
    });
    Ok(work.into_inner().unwrap_or_else(|e| e.into_inner()).report)
}

/// One job of [`import_with`]: takes paths until none is left and no other job may add one.
fn job(
    store: &Store,
    cache: &BinaryCache,
    trusted: &[PublicKey],
    closure: bool,
    work: &Mutex<Work>,
    wake: &Condvar,
    progress: &(dyn Fn(Event<'_>) + Sync),
) {
    let lock = || work.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let hash = {
            let mut w = lock();
            loop {
                if let Some(h) = w.queue.pop_front() {
                    w.busy += 1;
                    break h;
                }
                if w.busy == 0 {
                    return;
                }
                w = wake.wait(w).unwrap_or_else(|e| e.into_inner());
            }
        };
        let _span = tracing::info_span!("import", hash = hash.as_str()).entered();
        // A closure's references are queued as soon as the narinfo checks, so other jobs
        // start on them while this one ingests the NAR.
        let queue_refs = |info: &NarInfo| {
            if !closure {
                return;
            }
            let total = {
                let mut w = lock();
                for r in &info.references {
                    if w.seen.insert(r.hash().clone()) {
                        w.queue.push_back(r.hash().clone());
                    }
                }
                w.seen.len() as u64
            };
            wake.notify_all();
            progress(Event::Total(total));
        };
        let result = import_one(store, cache, &hash, trusted, queue_refs);
        match &result {
            Ok((info, outcome)) => progress(Event::Done {
                path: &info.store_path,
                outcome,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "import refused");
                progress(Event::Failed(e));
            }
        }
        {
            let mut w = lock();
            w.busy -= 1;
            let r = &mut w.report;
            match result {
                Ok((_, outcome)) => {
                    if outcome.already_present {
                        r.already_present += 1;
                        r.already_present_nar_bytes += outcome.nar_size;
                    } else {
                        r.imported += 1;
                        r.nar_bytes += outcome.nar_size;
                    }
                    r.new_chunk_bytes += outcome.new_chunk_bytes;
                    r.new_compressed_bytes += outcome.new_compressed_bytes;
                }
                Err(e) => r.failed.push(e),
            }
        }
        wake.notify_all();
    }
}

fn import_one(
    store: &Store,
    cache: &BinaryCache,
    hash: &StorePathHash,
    trusted: &[PublicKey],
    on_narinfo: impl FnOnce(&NarInfo),
) -> Result<(NarInfo, IngestOutcome), ImportError> {
    let text = cache
        .narinfo_text(hash)?
        .ok_or_else(|| ImportError::NotInCache(hash.as_str().to_string()))?;
    let (info, trust) = check_narinfo(&text, Some(hash), trusted)?;
    on_narinfo(&info);
    let mut open_err = None;
    let outcome = store.ingest_with(&info, &text, &trust, cache.url(), Retention::Pinned, || {
        cache.open_nar(&info).map_err(|e| {
            let msg = e.to_string();
            open_err = Some(e);
            io::Error::other(msg)
        })
    });
    match (outcome, open_err) {
        (Ok(o), _) => Ok((info, o)),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn store_paths_lists_plain_and_xz() {
        let dir = tempfile::tempdir().unwrap();
        let text = "# a channel\n/nix/store/0a2f8wq6f0vpyr6zqmzvqhq3s0jh2ll6-a\n\n  1b2f8wq6f0vpyr6zqmzvqhq3s0jh2ll6  \n";
        let plain = dir.path().join("plain");
        std::fs::write(&plain, text).unwrap();
        let xz = dir.path().join("list.xz");
        let mut enc = xz2::write::XzEncoder::new(File::create(&xz).unwrap(), 6);
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
        for f in [&plain, &xz] {
            let got: Vec<String> = read_store_paths(f.to_str().unwrap())
                .unwrap()
                .iter()
                .map(|h| h.as_str().to_string())
                .collect();
            assert_eq!(
                got,
                [
                    "0a2f8wq6f0vpyr6zqmzvqhq3s0jh2ll6",
                    "1b2f8wq6f0vpyr6zqmzvqhq3s0jh2ll6"
                ]
            );
        }
        std::fs::write(
            &plain,
            "1b2f8wq6f0vpyr6zqmzvqhq3s0jh2ll6\n/nix/store/short\n",
        )
        .unwrap();
        match read_store_paths(plain.to_str().unwrap()) {
            Err(ImportError::BadList { line: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn http_caches_cannot_be_listed_and_odd_urls_are_refused() {
        for u in [
            "ftp://x",
            "s3://bucket",
            "/var/cache",
            "http://127.0.0.1:1/x?y=1",
        ] {
            assert!(
                matches!(BinaryCache::open(u), Err(ImportError::UnsupportedUrl(_))),
                "{u}"
            );
        }
        // Nothing listens on port 1: the cache-info check fails with the URL in the error.
        match BinaryCache::open("http://127.0.0.1:1") {
            Err(ImportError::Http { url, .. }) => assert!(url.ends_with("/nix-cache-info")),
            other => panic!("{:?}", other.map(|c| c.url().to_string())),
        }
    }
}
