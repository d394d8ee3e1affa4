//! Upstream HTTP binary caches (design §4, the last step of both paths): `--upstream URL…`.
//!
//! narinfo path: on a local miss the daemon asks each upstream in order with short timeouts
//! (2 s connect, 5 s total); the first narinfo that parses, is for the asked path and whose
//! signatures check out (trusted or simply unsigned by a trusted key) is kept in a bounded
//! in-memory map of *pending* narinfos and served. A narinfo that fails the check is logged and
//! treated as a miss.
//!
//! NAR path: when Nix asks for a NAR the store does not have, the pending narinfo with that
//! `NarHash` names the upstream and its NAR URL. The NAR is downloaded on the async side into a
//! bounded channel (8 blocks), read as a blocking `Read` on a blocking thread, decompressed
//! with [`import::decompressor`] and ingested with [`Store::ingest`], which checks NarHash,
//! NarSize and the NAR structure and leaves nothing behind on failure. One download per NAR
//! at a time (a per-NarHash async lock); a failed one drops the pending entry.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tracing::Instrument;

use crate::core::narinfo::NarInfo;
use crate::core::signing::{PublicKey, Trust};
use crate::core::store_path::StorePathHash;
use crate::core::NarHash;
use crate::import::{check_narinfo, decompressor};
use crate::pending::{NarLocks, Pending, PendingNarinfos};
use crate::store::{Store, StoreError};

/// Connect timeout for every upstream request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Total time allowed for one narinfo request.
const NARINFO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the next bytes of a NAR download.
const NAR_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest narinfo accepted from an upstream.
const MAX_NARINFO: usize = 1024 * 1024;
/// Blocks of a NAR download in flight between the network and the ingesting thread.
const QUEUE: usize = 8;
/// Pending narinfos kept (cleared when full, like the narinfo cache).
const PENDING_ENTRIES: usize = 16 * 1024;
/// NAR download locks kept before idle ones are pruned.
const LOCK_ENTRIES: usize = 1024;

/// Failures talking to an upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("bad upstream URL {0:?} (expected http:// or https://)")]
    BadUrl(String),
    #[error("building the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: narinfo larger than 1 MiB")]
    TooLarge { url: String },
    #[error("{url}: NAR URL {nar_url:?} is not a relative path")]
    BadNarUrl { url: String, nar_url: String },
    #[error("ingesting the NAR from {url}: {source}")]
    Ingest {
        url: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("ingest task failed: {0}")]
    Task(String),
}

/// What [`Upstream::fetch_nar`] did.
#[derive(Debug)]
pub enum NarFetch {
    /// No pending upstream narinfo names this NAR.
    NotPending,
    /// The store has the NAR now; `trusted`: this call ingested it with a trusted narinfo
    /// (worth announcing to peers).
    Stored { trusted: bool },
    /// The download or its ingest failed; the pending narinfo of `path` was dropped.
    Failed {
        path: StorePathHash,
        error: UpstreamError,
    },
}

/// The configured upstream caches and what has been fetched from them.
pub struct Upstream {
    client: reqwest::Client,
    urls: Vec<Arc<str>>,
    trusted: Vec<PublicKey>,
    pending: PendingNarinfos<Arc<str>>,
    fetching: NarLocks,
}

impl Upstream {
    /// `urls` are tried in order; `trusted` decides each narinfo's trust class.
    pub fn new(urls: &[String], trusted: Vec<PublicKey>) -> Result<Self, UpstreamError> {
        let urls = urls
            .iter()
            .map(|u| {
                let u = u.trim().trim_end_matches('/');
                let ok = (u.starts_with("http://") || u.starts_with("https://"))
                    && reqwest::Url::parse(u).is_ok();
                if ok {
                    Ok(Arc::<str>::from(u))
                } else {
                    Err(UpstreamError::BadUrl(u.to_string()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("nix-p2p-cache/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(UpstreamError::Client)?;
        Ok(Self {
            client,
            urls,
            trusted,
            pending: PendingNarinfos::new(PENDING_ENTRIES),
            fetching: NarLocks::new(LOCK_ENTRIES),
        })
    }

    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.urls.iter().map(|u| &**u)
    }

    /// Asks each upstream in order for the narinfo of `hash`; returns its original text.
    /// `Ok(None)`: no upstream has it (or none had an acceptable one). `Err`: none had it and
    /// at least one could not be asked (a transient miss, not worth remembering).
    pub async fn narinfo(&self, hash: &StorePathHash) -> Result<Option<Arc<str>>, UpstreamError> {
        if let Some(t) = self.pending.text(hash) {
            return Ok(Some(t));
        }
        let mut failure = None;
        for base in &self.urls {
            let url = format!("{base}/{}.narinfo", hash.as_str());
            let span =
                tracing::debug_span!("upstream_narinfo", upstream = %base, hash = hash.as_str());
            let text = match self.get_narinfo(&url).instrument(span).await {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "upstream narinfo request failed");
                    failure = Some(e);
                    continue;
                }
            };
            let (info, trust) = match check_narinfo(&text, Some(hash), &self.trusted) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(upstream = %base, error = %e, "upstream narinfo refused");
                    continue;
                }
            };
            if info.url.contains("://") || info.url.starts_with('/') || info.url.contains("..") {
                tracing::warn!(upstream = %base, url = %info.url, "upstream narinfo has a bad URL");
                continue;
            }
            let text: Arc<str> = Arc::from(text);
            self.pending.insert(
                hash.clone(),
                Pending {
                    source: base.clone(),
                    text: text.clone(),
                    info: Arc::new(info),
                    trust,
                },
            );
            tracing::debug!(upstream = %base, hash = hash.as_str(), "narinfo from upstream");
            return Ok(Some(text));
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    async fn get_narinfo(&self, url: &str) -> Result<Option<String>, UpstreamError> {
        let http = |source| UpstreamError::Http {
            url: url.to_string(),
            source,
        };
        let resp = self
            .client
            .get(url)
            .timeout(NARINFO_TIMEOUT)
            .send()
            .await
            .map_err(http)?;
        match resp.status().as_u16() {
            200 => {}
            404 | 403 => return Ok(None), // S3 answers 403 for missing keys
            status => {
                return Err(UpstreamError::Status {
                    url: url.to_string(),
                    status,
                })
            }
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_NARINFO as u64)
        {
            return Err(UpstreamError::TooLarge {
                url: url.to_string(),
            });
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.map_err(http)?);
            if body.len() > MAX_NARINFO {
                return Err(UpstreamError::TooLarge {
                    url: url.to_string(),
                });
            }
        }
        match String::from_utf8(body) {
            Ok(t) => Ok(Some(t)),
            Err(_) => {
                tracing::warn!(%url, "upstream narinfo is not UTF-8");
                Ok(None)
            }
        }
    }

    /// Makes sure the store holds the NAR `nar_hash`, downloading it from the upstream whose
    /// narinfo named it. On failure the pending entry is dropped (the next narinfo request
    /// asks the upstreams again). One download per NAR at a time.
    pub async fn fetch_nar(&self, store: &Arc<Store>, nar_hash: &NarHash) -> NarFetch {
        self.fetching
            .with(nar_hash, self.fetch_locked(store, nar_hash))
            .await
    }

    async fn fetch_locked(&self, store: &Arc<Store>, nar_hash: &NarHash) -> NarFetch {
        let Some((path, pending)) = self.pending.by_nar(nar_hash) else {
            return NarFetch::NotPending;
        };
        let Pending {
            source: upstream,
            text,
            info,
            trust,
        } = pending;
        // Another request may have fetched it while we waited for the lock.
        let s = store.clone();
        let h = *nar_hash;
        if let Ok(Ok(true)) = tokio::task::spawn_blocking(move || s.has_nar(&h)).await {
            return NarFetch::Stored { trusted: false };
        }
        let span = tracing::info_span!("upstream_nar", upstream = %upstream, nar = %nar_hash,
            path = %info.store_path.to_absolute());
        let trusted = matches!(trust, Trust::Trusted { .. });
        let r = self
            .download_and_ingest(store, &upstream, text, info, trust)
            .instrument(span)
            .await;
        // Ingested: the store has the narinfo now. Refused: forget it, so the next narinfo
        // request asks the upstreams again.
        self.pending.remove(nar_hash, &path);
        match r {
            Ok(()) => NarFetch::Stored { trusted },
            Err(error) => {
                tracing::warn!(%error, "upstream NAR refused");
                NarFetch::Failed { path, error }
            }
        }
    }

    async fn download_and_ingest(
        &self,
        store: &Arc<Store>,
        upstream: &str,
        text: Arc<str>,
        info: Arc<NarInfo>,
        trust: Trust,
    ) -> Result<(), UpstreamError> {
        if info.url.contains("://") || info.url.starts_with('/') || info.url.contains("..") {
            return Err(UpstreamError::BadNarUrl {
                url: upstream.to_string(),
                nar_url: info.url.clone(),
            });
        }
        let url = format!("{upstream}/{}", info.url);
        let http = |source| UpstreamError::Http {
            url: url.clone(),
            source,
        };
        let resp = self.client.get(&url).send().await.map_err(http)?;
        if !resp.status().is_success() {
            return Err(UpstreamError::Status {
                url,
                status: resp.status().as_u16(),
            });
        }
        tracing::debug!(%url, "downloading NAR");
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(QUEUE);
        let mut stream = resp.bytes_stream();
        let pump = tokio::spawn(async move {
            loop {
                let item = match tokio::time::timeout(NAR_STALL_TIMEOUT, stream.next()).await {
                    Ok(None) => break,
                    Ok(Some(Ok(b))) => Ok(b),
                    Ok(Some(Err(e))) => Err(io::Error::other(e)),
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "upstream NAR download stalled",
                    )),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break; // the ingest gave up, or the download did
                }
            }
        });
        let source = upstream.to_string();
        let s = store.clone();
        let ingest = tokio::task::spawn_blocking(move || {
            let compression = info.compression_or_default().to_string();
            s.ingest(&info, &text, &trust, &source, || {
                decompressor(
                    io::BufReader::with_capacity(1 << 20, ChannelReader::new(rx)),
                    &compression,
                )
            })
        });
        let outcome = ingest.await;
        pump.abort();
        let outcome = outcome.map_err(|e| UpstreamError::Task(e.to_string()))?;
        match outcome {
            Ok(o) => {
                tracing::info!(nar_size = o.nar_size, "ingested NAR from upstream");
                Ok(())
            }
            Err(e) => Err(UpstreamError::Ingest {
                url,
                source: Box::new(e),
            }),
        }
    }
}

/// The receiving end of a download as a blocking `Read`.
pub(crate) struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl ChannelReader {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_http_urls() {
        assert!(matches!(
            Upstream::new(&["file:///tmp".into()], vec![]),
            Err(UpstreamError::BadUrl(_))
        ));
        let u = Upstream::new(&["https://cache.nixos.org/".into()], vec![]).unwrap();
        assert_eq!(u.urls().collect::<Vec<_>>(), ["https://cache.nixos.org"]);
    }

    #[test]
    fn channel_reader_reads_blocks_and_errors() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.try_send(Ok(Bytes::from_static(b"abc"))).unwrap();
        tx.try_send(Ok(Bytes::from_static(b"de"))).unwrap();
        tx.try_send(Err(io::Error::other("cut"))).unwrap();
        drop(tx);
        let mut r = ChannelReader::new(rx);
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        assert_eq!(out, b"abcde");
    }
}
