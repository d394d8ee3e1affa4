//! Reading an existing Nix binary cache (`file://` layout: `<hash>.narinfo` files and NARs at
//! their `URL`, compressed with xz, zstd, bzip2 or not at all) and ingesting it into the store.
//!
//! Every narinfo is parsed and its signatures checked before its NAR is read; every NAR is
//! checked by [`Store::ingest`]. A refused path is reported with its reason and leaves nothing
//! behind; the others still import.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use crate::core::narinfo::{NarInfo, NarInfoError};
use crate::core::signing::{self, PublicKey, SigningError};
use crate::core::store_path::{StorePath, StorePathHash};
use crate::store::{IngestOutcome, Retention, Store, StoreError};

/// Errors of an import, each naming the store path (or hash) it is about.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("unsupported binary cache URL {0:?} (only file:///path is supported here)")]
    UnsupportedUrl(String),
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

/// A `file://` binary cache.
pub struct BinaryCache {
    root: PathBuf,
    url: String,
}

impl BinaryCache {
    pub fn open(url: &str) -> Result<Self, ImportError> {
        let path = url
            .strip_prefix("file://")
            .ok_or_else(|| ImportError::UnsupportedUrl(url.to_string()))?;
        let path = path.split('?').next().unwrap_or(path);
        let root = PathBuf::from(path);
        if !root.is_dir() {
            return Err(ImportError::Io {
                path: root,
                source: io::Error::new(io::ErrorKind::NotFound, "binary cache directory not found"),
            });
        }
        Ok(Self {
            root,
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The narinfo text of a store-path hash, if the cache has it.
    pub fn narinfo_text(&self, hash: &StorePathHash) -> Result<Option<String>, ImportError> {
        let path = self.root.join(format!("{}.narinfo", hash.as_str()));
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ImportError::Io { path, source }),
        }
    }

    /// Hashes of every narinfo in the cache, sorted.
    pub fn all_hashes(&self) -> Result<Vec<StorePathHash>, ImportError> {
        let rd = std::fs::read_dir(&self.root).map_err(|source| ImportError::Io {
            path: self.root.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|source| ImportError::Io {
                path: self.root.clone(),
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

    /// Opens the NAR of `info`, decompressed.
    pub fn open_nar(&self, info: &NarInfo) -> Result<Box<dyn Read + Send>, ImportError> {
        let path_name = info.store_path.to_absolute();
        let rel = Path::new(&info.url);
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(ImportError::BadUrl {
                path: path_name,
                url: info.url.clone(),
            });
        }
        let path = self.root.join(rel);
        let file = File::open(&path).map_err(|source| ImportError::Io {
            path: path.clone(),
            source,
        })?;
        let file = BufReader::with_capacity(1 << 20, file);
        let compression = info.compression.as_deref().unwrap_or("bzip2");
        decompressor(file, compression).map_err(|_| ImportError::UnsupportedCompression {
            path: path_name,
            compression: compression.to_string(),
        })
    }
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
    pub imported: u64,
    pub already_present: u64,
    pub nar_bytes: u64,
    pub new_chunk_bytes: u64,
    pub new_compressed_bytes: u64,
    pub failed: Vec<ImportError>,
}

/// Imports from `cache` into `store`. Failures of single paths are collected, not fatal.
pub fn import(
    store: &Store,
    cache: &BinaryCache,
    selection: Selection,
    trusted: &[PublicKey],
    mut progress: impl FnMut(&StorePath, &IngestOutcome),
) -> Result<ImportReport, ImportError> {
    let mut report = ImportReport::default();
    let (mut queue, closure): (VecDeque<StorePathHash>, bool) = match selection {
        Selection::All => (cache.all_hashes()?.into(), false),
        Selection::Paths { roots, closure } => (roots.into(), closure),
    };
    let mut seen: HashSet<StorePathHash> = queue.iter().cloned().collect();
    while let Some(hash) = queue.pop_front() {
        match import_one(store, cache, &hash, trusted) {
            Ok((info, outcome)) => {
                if closure {
                    for r in &info.references {
                        if seen.insert(r.hash().clone()) {
                            queue.push_back(r.hash().clone());
                        }
                    }
                }
                if outcome.already_present {
                    report.already_present += 1;
                } else {
                    report.imported += 1;
                }
                report.nar_bytes += outcome.nar_size;
                report.new_chunk_bytes += outcome.new_chunk_bytes;
                report.new_compressed_bytes += outcome.new_compressed_bytes;
                progress(&info.store_path, &outcome);
            }
            Err(e) => {
                tracing::warn!(hash = hash.as_str(), error = %e, "import refused");
                report.failed.push(e);
            }
        }
    }
    Ok(report)
}

fn import_one(
    store: &Store,
    cache: &BinaryCache,
    hash: &StorePathHash,
    trusted: &[PublicKey],
) -> Result<(NarInfo, IngestOutcome), ImportError> {
    let text = cache
        .narinfo_text(hash)?
        .ok_or_else(|| ImportError::NotInCache(hash.as_str().to_string()))?;
    let (info, trust) = check_narinfo(&text, Some(hash), trusted)?;
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
