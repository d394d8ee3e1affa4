//! The localhost substituter (design §6): the HTTP binary-cache protocol that stock Nix speaks,
//! served from the store, plus uploads (`nix copy --to http://…`), `/metrics`, the JSON API
//! (`api.rs`) and the dashboard (`ui.rs`).
//!
//! Owns: routing, request parsing, the upload staging dir (`<data-dir>/uploads`). Store calls
//! run on `spawn_blocking`; NAR bodies stream through a bounded channel. Bad requests get 4xx,
//! internal failures a 500 without internals; a NAR stream that meets damage is aborted, never
//! ended as if complete.

mod api;
mod error;
pub mod listener;
mod nar;
mod ui;
mod upload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;

use crate::core::narinfo::NarInfo;
use crate::core::signing::PublicKey;
use crate::core::store_path::StorePathHash;
use crate::core::NarHash;
use crate::metrics::Metrics;
use crate::resolve::NarinfoAnswer;
use crate::store::Store;
pub use api::NodeInfo;
pub use error::HttpError;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use nar::{parse_nar_file, parse_range, NarFile};
pub use upload::sweep_staging;

/// Everything the handlers share.
pub struct HttpState {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// The upload token (HTTP basic password); `None` disables uploads.
    pub upload_token: Option<String>,
    pub trusted: Vec<PublicKey>,
    /// Where uploaded NARs wait for their narinfo.
    pub staging: PathBuf,
    /// Largest NAR upload accepted, in bytes.
    pub max_upload: u64,
    /// Served narinfo texts and misses, so the hot path (Nix asks for every path of a
    /// closure) needs no store call.
    pub narinfo_cache: Arc<NarinfoCache>,
    /// Where what the store lacks comes from (peers, upstreams): narinfos and NAR flights.
    pub resolver: Arc<crate::resolve::Resolver>,
    /// The P2P node (`--p2p-listen`), if on (for `/api/*` and `/metrics`).
    pub peers: Option<Arc<crate::fetch::Peers>>,
    /// What `/api/status` says about the node.
    pub node: NodeInfo,
    pub started: Instant,
    /// `--max-cache-size` enforcement (peers only).
    pub quota: Option<Arc<crate::quota::Quota>>,
    /// DHT announcements (P2P on and `--share all`).
    pub announcer: Option<Arc<crate::announce::Announcer>>,
}

impl HttpState {
    /// The P2P layer's counters, when it is on.
    pub(crate) async fn net_gauges(&self) -> Option<crate::metrics::NetGauges> {
        match &self.peers {
            Some(p) => Some(p.gauges().await),
            None => None,
        }
    }
}

/// A served narinfo text (`None`: a miss), its NarHash when it was served from the store, and
/// when it was cached.
type CacheEntry = (Option<Arc<str>>, Option<NarHash>, Instant);

/// Bounded cache of served narinfos (`Some(text)`) and misses (`None`) by store-path hash.
/// Cleared when full; an upload drops its hash's entry. Only this process writes the store
/// (the index file is locked), so hits cannot go stale; misses expire after `negative_ttl`
/// because peers and upstreams can gain a path at any time.
pub struct NarinfoCache {
    map: Mutex<HashMap<String, CacheEntry>>,
    cap: usize,
    /// How long a miss is remembered: peers and upstreams can gain a path at any time.
    negative_ttl: Duration,
}

impl NarinfoCache {
    pub fn new(cap: usize, negative_ttl: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            cap,
            negative_ttl,
        }
    }

    fn get(&self, hash: &str) -> Option<(Option<Arc<str>>, Option<NarHash>)> {
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(hash) {
            Some((None, _, at)) if at.elapsed() >= self.negative_ttl => None,
            Some((v, n, _)) => Some((v.clone(), *n)),
            None => None,
        }
    }

    fn put(&self, hash: &str, v: Option<Arc<str>>, nar: Option<NarHash>) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= self.cap {
            m.clear();
        }
        m.insert(hash.to_string(), (v, nar, Instant::now()));
    }

    /// Forgets everything (after an eviction removed paths).
    pub fn clear(&self) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn forget(&self, hash: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(hash);
    }
}

/// The `/nix-cache-info` body.
pub const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

/// Builds the router.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/", get(ui::to_dashboard))
        .route("/ui", get(ui::to_dashboard))
        .route("/ui/", get(ui::page))
        .route("/ui/{file}", get(ui::asset))
        .route("/help", get(help))
        .route("/nix-cache-info", get(cache_info).put(upload::put_ignored))
        .route("/metrics", get(metrics))
        .route("/api/status", get(api::status))
        .route("/api/peers", get(api::peers))
        .route("/api/transfers", get(api::transfers))
        .route("/api/history", get(api::history))
        .route("/api/errors", get(api::errors))
        .route("/api/pin", admin(api::pin))
        .route("/api/unpin", admin(api::unpin))
        .route("/api/gc", admin(api::gc))
        .route("/api/undelete", admin(api::undelete))
        .route("/nar/{file}", get(nar::get_nar).put(upload::put_nar))
        .route("/log/{file}", put(upload::put_ignored))
        .route("/realisations/{file}", put(upload::put_ignored))
        .route("/{file}", get(get_narinfo).put(upload::put_narinfo))
        .fallback(fallback)
        .layer(axum::middleware::from_fn(timed))
        .with_state(state)
}

tokio::task_local! {
    /// When the request being handled arrived (for [`finish`]'s latency histogram).
    static REQUEST_START: Instant;
}

/// Runs the handler with its start time at hand.
async fn timed(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    REQUEST_START.scope(Instant::now(), next.run(req)).await
}

/// A state-changing API route: `POST` only, bodies up to [`api::MAX_ADMIN_BODY`].
fn admin<H, T>(handler: H) -> axum::routing::MethodRouter<Arc<HttpState>>
where
    H: axum::handler::Handler<T, Arc<HttpState>>,
    T: 'static,
{
    post(handler).layer(axum::extract::DefaultBodyLimit::max(api::MAX_ADMIN_BODY))
}

/// Records the request (and its latency, up to here) in the metrics and turns errors into
/// responses.
fn finish(state: &HttpState, route: &'static str, r: Result<Response, HttpError>) -> Response {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    state.metrics.request(route, resp.status().as_u16());
    if let Ok(t) = REQUEST_START.try_with(Instant::elapsed) {
        state.metrics.observe_latency(route, t.as_secs_f64());
    }
    resp
}

async fn fallback(State(state): State<Arc<HttpState>>) -> Response {
    finish(&state, "other", Err(HttpError::NotFound))
}

/// `GET /help`: what this address is and how to use it (a person opening it in a browser),
/// with the dashboard, the node's JSON and metrics linked.
async fn help(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.bytes().all(|b| b.is_ascii_graphic()) && !h.contains(['<', '>', '&', '"']))
        .unwrap_or("127.0.0.1:7420");
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>nix-p2p-cache</title>\n\
         <h1>nix-p2p-cache {version}</h1>\n\
         <p>A Nix binary cache (substituter) backed by a peer-to-peer network. Point Nix at it \
         in <code>nix.conf</code>:</p>\n\
         <pre>substituters = http://{host} https://cache.nixos.org</pre>\n\
         <ul><li><a href=\"/ui/\">the dashboard</a></li>\n\
         <li><a href=\"/nix-cache-info\">nix-cache-info</a></li>\n\
         <li><a href=\"/api/status\">/api/status</a> (JSON: role, store, peers, traffic)</li>\n\
         <li><a href=\"/api/peers\">/api/peers</a></li>\n\
         <li><a href=\"/metrics\">/metrics</a> (Prometheus)</li></ul>\n",
        version = state.node.version,
    );
    let resp = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    finish(&state, "help", Ok(resp))
}

async fn cache_info(State(state): State<Arc<HttpState>>) -> Response {
    let resp = (
        [(header::CONTENT_TYPE, "text/x-nix-cache-info")],
        CACHE_INFO,
    )
        .into_response();
    finish(&state, "nix-cache-info", Ok(resp))
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    let store = state.store.clone();
    let stats = tokio::task::spawn_blocking(move || store.stats())
        .await
        .ok()
        .and_then(Result::ok);
    let net = state.net_gauges().await;
    let body = state.metrics.render(stats.as_ref(), net.as_ref());
    let resp = ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response();
    finish(&state, "metrics", Ok(resp))
}

/// Runs a store call off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HttpError> + Send + 'static,
) -> Result<T, HttpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HttpError::Internal(format!("task failed: {e}")))?
}

/// `GET`/`HEAD /<hash>.narinfo`: the stored narinfo with its signatures unchanged and only
/// `URL`, `Compression`, `FileHash`, `FileSize` rewritten to what this server serves.
async fn get_narinfo(
    State(state): State<Arc<HttpState>>,
    method: Method,
    Path(file): Path<String>,
) -> Response {
    let r = async {
        let hash = parse_narinfo_file(&file)?;
        let cached = match state.narinfo_cache.get(hash.as_str()) {
            Some((text, nar)) => {
                // Under a quota, a NAR whose narinfo Nix just got must not be evicted before
                // Nix asks for it: serving the narinfo counts as using the NAR.
                if let (Some(nar), Some(_)) = (nar, &state.quota) {
                    let store = state.store.clone();
                    tokio::task::spawn_blocking(move || store.touch(&nar));
                    state.resolver.note_served(nar, &hash);
                }
                text
            }
            None => {
                let store = state.store.clone();
                let h = hash.clone();
                let touch = state.quota.is_some();
                let (text, nar) = blocking(move || match store.narinfo(h.as_str())? {
                    Some(rec) => {
                        if touch {
                            store.touch(&rec.nar_hash)?;
                        }
                        let t = Arc::<str>::from(served_narinfo(&rec.text)?);
                        Ok((Some(t), Some(rec.nar_hash)))
                    }
                    None => Ok((None, None)),
                })
                .await?;
                // Not stored: the sources (peers, upstreams). Only a miss every source was
                // sure of is remembered; texts found are held by the resolver (pending).
                if text.is_none() && state.resolver.has_sources() {
                    match state.resolver.narinfo(&hash).await {
                        NarinfoAnswer::Found(t) => {
                            let served = Arc::<str>::from(served_narinfo(&t)?);
                            Metrics::inc(&state.metrics.narinfo_hits, 1);
                            return Ok(narinfo_response(&method, served));
                        }
                        NarinfoAnswer::Missing { certain: false } => {
                            Metrics::inc(&state.metrics.narinfo_misses, 1);
                            return Err(HttpError::NotFound);
                        }
                        NarinfoAnswer::Missing { certain: true } => {}
                    }
                }
                if let (Some(nar), Some(_)) = (nar, &state.quota) {
                    state.resolver.note_served(nar, &hash);
                }
                state.narinfo_cache.put(hash.as_str(), text.clone(), nar);
                text
            }
        };
        let Some(text) = cached else {
            Metrics::inc(&state.metrics.narinfo_misses, 1);
            return Err(HttpError::NotFound);
        };
        Metrics::inc(&state.metrics.narinfo_hits, 1);
        Ok(narinfo_response(&method, text))
    }
    .await;
    finish(&state, "narinfo", r)
}

fn narinfo_response(method: &Method, text: Arc<str>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        "text/x-nix-narinfo".parse().expect("static"),
    );
    if method == Method::HEAD {
        headers.insert(header::CONTENT_LENGTH, text.len().into());
        return (StatusCode::OK, headers, Body::empty()).into_response();
    }
    (StatusCode::OK, headers, text.to_string()).into_response()
}

/// Parses `<store-path hash>.narinfo`: another name is not ours (404), a bad hash is a 400.
pub(crate) fn parse_narinfo_file(file: &str) -> Result<StorePathHash, HttpError> {
    let h = file.strip_suffix(".narinfo").ok_or(HttpError::NotFound)?;
    StorePathHash::parse(h)
        .map_err(|_| HttpError::BadRequest(format!("{h:?} is not a store path hash")))
}

/// The narinfo as served: the stored text with the fields the signature does not cover
/// pointing at our uncompressed NAR.
pub fn served_narinfo(stored: &str) -> Result<String, HttpError> {
    let mut info = NarInfo::parse(stored)
        .map_err(|e| HttpError::Internal(format!("stored narinfo does not parse: {e}")))?;
    info.url = nar_url(&info);
    info.compression = Some("none".into());
    info.file_hash = Some(info.nar_hash.to_string());
    info.file_size = Some(info.nar_size);
    Ok(info.to_text())
}

/// `nar/<NarHash in nix-base32>.nar`.
pub fn nar_url(info: &NarInfo) -> String {
    format!("nar/{}.nar", info.nar_hash.to_base32())
}

/// Convenience for counters.
pub(crate) fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn misses_expire_hits_stay() {
        let c = NarinfoCache::new(4, Duration::from_millis(30));
        let nar = NarHash::digest(b"nar");
        c.put("a", None, None);
        c.put("b", Some(Arc::from("text")), Some(nar));
        assert_eq!(c.get("a"), Some((None, None)));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(c.get("a"), None, "an old miss is asked again");
        assert_eq!(c.get("b"), Some((Some(Arc::from("text")), Some(nar))));
        c.forget("b");
        assert_eq!(c.get("b"), None);
        for k in ["c", "d", "e", "f"] {
            c.put(k, None, None);
        }
        assert!(c.map.lock().unwrap().len() <= 4, "bounded");
    }
}
