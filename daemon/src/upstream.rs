//! Upstream HTTP binary caches (design §4, the last step of both paths): `--upstreams URL…`,
//! each one a [`Source`] of the resolver (which asks them in order).
//!
//! narinfo: short timeouts (2 s connect, 5 s total); a narinfo that parses, is for the asked
//! path and whose signatures check out (trusted or simply unsigned by a trusted key) is the
//! answer. A narinfo that fails the check is logged and treated as a miss.
//!
//! NAR: downloaded from this upstream with the narinfo that named it (or, when the narinfo came
//! from elsewhere, with this upstream's narinfo for the path if it has the same NarHash), into
//! a bounded channel (8 blocks), decompressed on a blocking thread into the [`Flight`] (clients
//! see the bytes as they are decompressed; the last one after the NarHash check), while
//! [`Store::ingest`] reads the flight's spool at its own pace and stages and commits the NAR.
//! A download has a stall timeout and an overall deadline; the flight refuses a byte past
//! NarSize, and the ingest reads at most NarSize + 1.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tracing::Instrument;

use crate::core::narinfo::NarInfo;
use crate::core::signing::PublicKey;
use crate::core::store_path::StorePathHash;
use crate::import::{check_narinfo, decompressor};
use crate::metrics::Metrics;
use crate::pending::Pending;
use crate::resolve::{FetchError, Flight, Found, Lookup, Origin, Source};
use crate::store::{Store, StoreError};

/// Connect timeout for every upstream request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Total time allowed for one narinfo request.
const NARINFO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the next bytes of a NAR download.
const NAR_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Overall deadline of a NAR download: this much, plus NarSize at [`NAR_MIN_RATE`].
const NAR_DEADLINE_BASE: Duration = Duration::from_secs(60);
/// Slowest average download rate a NAR deadline allows for (bytes per second).
const NAR_MIN_RATE: u64 = 64 * 1024;
/// Largest narinfo accepted from an upstream.
const MAX_NARINFO: usize = 1024 * 1024;
/// Blocks of a NAR download in flight between the network and the ingesting thread.
const QUEUE: usize = 8;

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
    #[error("{url}: NAR download stalled for {secs} s", secs = NAR_STALL_TIMEOUT.as_secs())]
    Stalled { url: String },
    #[error("{url}: NAR download past its deadline of {secs} s")]
    Deadline { url: String, secs: u64 },
    #[error("no upstream has this path with NarHash {0}")]
    NoMatch(crate::core::NarHash),
    #[error("reading the NAR download: {0}")]
    Read(String),
}

/// One upstream binary cache (`--upstreams URL`), a [`Source`] of its own: a NAR one upstream
/// failed is then fetched from the next. All of them share one HTTP client (one pool).
pub struct Upstream {
    client: reqwest::Client,
    url: Arc<str>,
    trusted: Vec<PublicKey>,
    metrics: Arc<Metrics>,
}

impl Upstream {
    /// One [`Upstream`] per URL, in order; `trusted` decides each narinfo's trust class.
    pub fn all(
        urls: &[String],
        trusted: Vec<PublicKey>,
        metrics: Arc<Metrics>,
    ) -> Result<Vec<Arc<Self>>, UpstreamError> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("nix-p2p-cache/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(UpstreamError::Client)?;
        urls.iter()
            .map(|u| {
                let u = u.trim().trim_end_matches('/');
                let ok = (u.starts_with("http://") || u.starts_with("https://"))
                    && reqwest::Url::parse(u).is_ok();
                if !ok {
                    return Err(UpstreamError::BadUrl(u.to_string()));
                }
                Ok(Arc::new(Self {
                    client: client.clone(),
                    url: Arc::from(u),
                    trusted: trusted.clone(),
                    metrics: metrics.clone(),
                }))
            })
            .collect()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Asks this upstream for the narinfo of `hash`. `Ok(None)`: it does not have it (or not
    /// an acceptable one). `Err`: it could not be asked (a transient miss, not worth
    /// remembering).
    async fn find(&self, hash: &StorePathHash) -> Result<Option<Found>, UpstreamError> {
        let base = &self.url;
        let url = format!("{base}/{}.narinfo", hash.as_str());
        let span = tracing::debug_span!("upstream_narinfo", upstream = %base, hash = hash.as_str());
        let text = match self.get_narinfo(&url).instrument(span).await {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "upstream narinfo request failed");
                return Err(e);
            }
        };
        let (info, trust) = match check_narinfo(&text, Some(hash), &self.trusted) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(upstream = %base, error = %e, "upstream narinfo refused");
                return Ok(None);
            }
        };
        if bad_nar_url(&info.url) {
            tracing::warn!(upstream = %base, url = %info.url, "upstream narinfo has a bad URL");
            return Ok(None);
        }
        tracing::debug!(upstream = %base, hash = hash.as_str(), "narinfo from upstream");
        Ok(Some(Pending {
            source: Origin::Upstream(base.clone()),
            text: Arc::from(text),
            info: Arc::new(info),
            trust,
        }))
    }

    /// The narinfo to download `found`'s NAR with: its own when it came from this upstream,
    /// else this upstream's narinfo for the path, if it has the same NarHash.
    async fn locate(&self, found: &Found) -> Result<Arc<NarInfo>, UpstreamError> {
        if self.owns(&found.source) {
            return Ok(found.info.clone());
        }
        match self.find(found.info.store_path.hash()).await? {
            Some(f)
                if f.info.nar_hash == found.info.nar_hash
                    && f.info.nar_size == found.info.nar_size =>
            {
                Ok(f.info)
            }
            _ => Err(UpstreamError::NoMatch(found.info.nar_hash)),
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

    /// Downloads the NAR of `info` from `upstream` and streams it into `flight` and the
    /// store (see the module docs). The narinfo stored is `found`'s.
    async fn download(
        &self,
        store: &Arc<Store>,
        upstream: &str,
        info: Arc<NarInfo>,
        found: &Found,
        flight: &Arc<Flight>,
    ) -> Result<(), FetchError> {
        if bad_nar_url(&info.url) {
            return Err(UpstreamError::BadNarUrl {
                url: upstream.to_string(),
                nar_url: info.url.clone(),
            }
            .into());
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
            }
            .into());
        }
        tracing::debug!(%url, "downloading NAR");
        let deadline = NAR_DEADLINE_BASE + Duration::from_secs(info.nar_size / NAR_MIN_RATE);
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(QUEUE);
        let mut stream = resp.bytes_stream();
        let pump_url = url.clone();
        let metrics = self.metrics.clone();
        let pump = tokio::spawn(async move {
            let end = tokio::time::Instant::now() + deadline;
            loop {
                let next = tokio::time::timeout(NAR_STALL_TIMEOUT, stream.next());
                let item: Result<(), UpstreamError> = match tokio::time::timeout_at(end, next).await
                {
                    Err(_) => Err(UpstreamError::Deadline {
                        url: pump_url.clone(),
                        secs: deadline.as_secs(),
                    }),
                    Ok(Err(_)) => Err(UpstreamError::Stalled {
                        url: pump_url.clone(),
                    }),
                    Ok(Ok(None)) => break,
                    Ok(Ok(Some(Ok(b)))) => {
                        Metrics::inc(&metrics.upstream_bytes, b.len() as u64);
                        if tx.send(Ok(b)).await.is_err() {
                            break; // the ingest gave up
                        }
                        continue;
                    }
                    Ok(Ok(Some(Err(e)))) => Err(UpstreamError::Http {
                        url: pump_url.clone(),
                        source: e,
                    }),
                };
                if let Err(e) = item {
                    let _ = tx.send(Err(io::Error::other(e))).await;
                    break;
                }
            }
        });
        // The feeder decompresses the download into the flight (clients read it from there,
        // the last byte once NarHash checks); the ingest reads the flight's spool at its own
        // pace, so no client waits for chunking, compression or the commit.
        let compression = info.compression_or_default().to_string();
        let f = flight.clone();
        let feeder = tokio::task::spawn_blocking(move || -> Result<(), FetchError> {
            let mut raw = decompressor(
                io::BufReader::with_capacity(1 << 20, ChannelReader::new(rx)),
                &compression,
            )
            .map_err(|e| UpstreamError::Read(e.to_string()))?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match raw.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(UpstreamError::Read(e.to_string()).into()),
                };
                f.write(&buf[..n])?;
            }
            f.finish()?;
            Ok(())
        });
        let source = upstream.to_string();
        let (s, f) = (store.clone(), flight.clone());
        let (text, trust, nar_info) = (found.text.clone(), found.trust.clone(), found.info.clone());
        let ingest = tokio::task::spawn_blocking(move || {
            s.ingest(&nar_info, &text, &trust, &source, || Ok(f.spool_reader()))
        });
        let fed = feeder.await;
        pump.abort();
        let fed = fed
            .map_err(|_| FetchError::Task("upstream feeder"))
            .and_then(|r| r);
        if let Err(e) = fed {
            // End the ingest's spool reader: start over (nothing shown yet), or stop it (the
            // resolver then fails the flight).
            if !flight.reset() {
                flight.end_spool(&e.to_string());
            }
            let _ = ingest.await;
            return Err(e);
        }
        match ingest
            .await
            .map_err(|_| FetchError::Task("upstream ingest"))?
        {
            Ok(o) => {
                tracing::info!(nar_size = o.nar_size, "ingested NAR from upstream");
                Ok(())
            }
            Err(e) => Err(UpstreamError::Ingest {
                url,
                source: Box::new(e),
            }
            .into()),
        }
    }
}

#[async_trait::async_trait]
impl Source for Upstream {
    fn name(&self) -> &'static str {
        "upstream"
    }

    fn owns(&self, origin: &Origin) -> bool {
        matches!(origin, Origin::Upstream(u) if *u == self.url)
    }

    async fn narinfo(&self, hash: &StorePathHash) -> Lookup {
        match self.find(hash).await {
            Ok(Some(f)) => Lookup::Found(f),
            Ok(None) => Lookup::Missing,
            Err(_) => Lookup::Unsure, // already logged
        }
    }

    async fn fetch(
        &self,
        store: &Arc<Store>,
        found: &Found,
        flight: &Arc<Flight>,
    ) -> Result<(), FetchError> {
        let info = self.locate(found).await?;
        let span = tracing::warn_span!("upstream_nar", upstream = %self.url);
        self.download(store, &self.url, info, found, flight)
            .instrument(span)
            .await?;
        Metrics::inc(&self.metrics.upstream_nars, 1);
        Ok(())
    }
}

fn bad_nar_url(url: &str) -> bool {
    url.contains("://") || url.starts_with('/') || url.contains("..")
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
            Upstream::all(&["file:///tmp".into()], vec![], Arc::default()),
            Err(UpstreamError::BadUrl(_))
        ));
        let u = Upstream::all(
            &[
                "https://cache.nixos.org/".into(),
                "http://127.0.0.1:1".into(),
            ],
            vec![],
            Arc::default(),
        )
        .unwrap();
        let urls: Vec<&str> = u.iter().map(|u| u.url()).collect();
        assert_eq!(urls, ["https://cache.nixos.org", "http://127.0.0.1:1"]);
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
