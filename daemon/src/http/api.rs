//! The daemon's own JSON API, served on the substituter's (loopback by default) address:
//! `GET /api/status` and `GET /api/peers` (read-only, for `nix-p2p-cache status` and `peers`,
//! and the dashboard), `GET /api/transfers`, `/api/history` and `/api/errors` (read-only, the
//! dashboard's; `docs/operations.md` documents every field),
//! and the state-changing `POST /api/pin`, `/api/unpin`, `/api/gc` and `/api/undelete` (for
//! those commands while the daemon runs), which need the upload token. Handlers translate:
//! the work is `crate::maintain`'s.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::{blocking, finish, HttpError, HttpState};
use crate::maintain::{
    self, MaintainError, PinReport, PolicyGcReport, SizeGcReport, UndeleteReport,
};
use crate::metrics::NetGauges;
use crate::net::PeerInfo;
use crate::store::Stats;

/// What the node is (fixed at start).
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub version: &'static str,
    pub role: crate::config::Role,
    pub share: crate::config::Share,
    pub announce: crate::config::Announce,
    pub max_cache_size: Option<u64>,
    pub upload_rate_limit: Option<u64>,
    pub upstreams: Vec<String>,
    pub peer_id: Option<String>,
    pub p2p_addresses: Vec<String>,
    /// The keys that make a narinfo trusted (cache.nixos.org-1's and the configured ones):
    /// Nix needs them in its `trusted-public-keys` (`doctor` checks).
    pub trusted_public_keys: Vec<String>,
    /// The data directory (`doctor` checks its free space).
    pub data_dir: std::path::PathBuf,
}

#[derive(Serialize)]
struct Status<'a> {
    #[serde(flatten)]
    node: &'a NodeInfo,
    uptime_secs: u64,
    /// The process's soft open-files limit (`doctor` checks it), if known.
    open_files_limit: Option<u64>,
    store: Stats,
    p2p: Option<P2pStatus>,
}

#[derive(Serialize)]
struct P2pStatus {
    #[serde(flatten)]
    net: NetGauges,
    nars_fetched: u64,
    nar_fetch_failures: u64,
    provider_lookups: u64,
    providers_found: u64,
    blocks_received: u64,
    bad_blocks: u64,
    bad_manifests: u64,
    chunks_reused_locally: u64,
    announce: Option<crate::announce::AnnounceStats>,
    /// Rows of the DHT database: keys provided, other nodes' provider records held.
    dht_records: crate::store::dht::DhtCounts,
}

fn json(body: &impl Serialize) -> Result<Response, HttpError> {
    let text =
        serde_json::to_string_pretty(body).map_err(|e| HttpError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], text).into_response())
}

pub async fn status(State(state): State<Arc<HttpState>>) -> Response {
    let r = async {
        let store = state.store.clone();
        let stats = blocking(move || Ok(store.stats()?)).await?;
        let p2p = match &state.peers {
            Some(p) => {
                let store = state.store.clone();
                let dht_records = blocking(move || Ok(store.dht()?.dht_counts()?)).await?;
                let m = &state.metrics;
                let get =
                    |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
                Some(P2pStatus {
                    net: p.gauges().await,
                    nars_fetched: get(&m.p2p_nars),
                    nar_fetch_failures: get(&m.p2p_nar_failures),
                    provider_lookups: get(&m.p2p_provider_lookups),
                    providers_found: get(&m.p2p_providers_found),
                    blocks_received: get(&m.p2p_blocks),
                    bad_blocks: get(&m.p2p_bad_blocks),
                    bad_manifests: get(&m.p2p_bad_manifests),
                    chunks_reused_locally: get(&m.p2p_chunks_local),
                    announce: state.announcer.as_ref().map(|a| a.stats()),
                    dht_records,
                })
            }
            None => None,
        };
        json(&Status {
            node: &state.node,
            uptime_secs: state.started.elapsed().as_secs(),
            open_files_limit: super::listener::open_files_limit(),
            store: stats,
            p2p,
        })
    }
    .await;
    finish(&state, "api", r)
}

pub async fn peers(State(state): State<Arc<HttpState>>) -> Response {
    let r = async {
        let mut list: Vec<PeerInfo> = match &state.peers {
            Some(p) => p
                .client()
                .peer_infos()
                .await
                .map_err(|e| HttpError::Internal(e.to_string()))?,
            None => Vec::new(),
        };
        list.sort_by(|a, b| {
            (b.connected, b.bytes_down + b.bytes_up).cmp(&(a.connected, a.bytes_down + a.bytes_up))
        });
        json(&list)
    }
    .await;
    finish(&state, "api", r)
}

/// `GET /api/transfers`: the NARs moving now (fetches into the store, bodies to clients).
pub async fn transfers(State(state): State<Arc<HttpState>>) -> Response {
    let r = json(&state.metrics.transfers.view());
    finish(&state, "api", r)
}

#[derive(Serialize)]
struct HistoryView {
    interval_secs: u64,
    samples: Vec<crate::metrics::history::Sample>,
}

/// `GET /api/history`: the last hour of samples of the traffic and hit counters, and the
/// counters now as the last sample (a page opened at start draws something).
pub async fn history(State(state): State<Arc<HttpState>>) -> Response {
    let net = state.net_gauges().await;
    let mut samples = state.metrics.history.samples();
    samples.push(state.metrics.snapshot(net.as_ref()));
    let r = json(&HistoryView {
        interval_secs: crate::metrics::history::SAMPLE_INTERVAL.as_secs(),
        samples,
    });
    finish(&state, "api", r)
}

#[derive(Serialize)]
struct ErrorsView {
    events: Vec<crate::metrics::events::LogEvent>,
}

/// `GET /api/errors`: the recent warn and error log events, oldest first.
pub async fn errors(State(state): State<Arc<HttpState>>) -> Response {
    let r = json(&ErrorsView {
        events: crate::metrics::events::recent(),
    });
    finish(&state, "api", r)
}

// ---------------------------------------------------------------------------------------------
// State-changing calls: `POST /api/pin`, `/api/unpin`, `/api/gc`, `/api/undelete`. Each needs
// the upload token (HTTP basic password, as uploads), checked before the body is read; the
// store work is `crate::maintain`'s, on a blocking thread; the answer is its report as JSON.

/// Largest request body of a state-changing call (a policy with a channel's roots inline).
pub const MAX_ADMIN_BODY: usize = 32 * 1024 * 1024;

/// One GC or undelete at a time: a second waits for the first (their selections would race).
static GC_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathsBody {
    /// Store paths or their hashes.
    paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GcBody {
    /// Evict least-recently-used unpinned paths down to this many bytes.
    #[serde(default)]
    max_size: Option<u64>,
    /// A GC policy: the TOML text of a policy file, roots inline (no `keep-roots-files`).
    #[serde(default)]
    policy: Option<String>,
    /// With `policy`: only report.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UndeleteBody {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    all: bool,
}

/// Token first (401/403 whatever the body), then the JSON body (400 with serde's reason).
fn admit<T: serde::de::DeserializeOwned>(
    state: &HttpState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, HttpError> {
    super::upload::check_auth(state, headers).map_err(|e| match e {
        HttpError::Forbidden(_) => HttpError::Forbidden(
            "state-changing calls need the upload token: start the daemon with \
             --upload-token-file"
                .into(),
        ),
        e => e,
    })?;
    serde_json::from_slice(body).map_err(|e| HttpError::BadRequest(format!("JSON body: {e}")))
}

fn maintain_err(e: MaintainError) -> HttpError {
    match e {
        MaintainError::Store(e) => HttpError::from(*e),
        e => HttpError::BadRequest(e.to_string()),
    }
}

/// `POST /api/pin` `{"paths": [...]}` → [`PinReport`].
pub async fn pin(State(state): State<Arc<HttpState>>, headers: HeaderMap, body: Bytes) -> Response {
    pin_or_unpin(state, headers, body, true).await
}

/// `POST /api/unpin` `{"paths": [...]}` → [`PinReport`].
pub async fn unpin(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    pin_or_unpin(state, headers, body, false).await
}

async fn pin_or_unpin(
    state: Arc<HttpState>,
    headers: HeaderMap,
    body: Bytes,
    on: bool,
) -> Response {
    let r = async {
        let req: PathsBody = admit(&state, &headers, &body)?;
        let store = state.store.clone();
        let report: PinReport =
            blocking(move || maintain::pin(&store, &req.paths, on).map_err(maintain_err)).await?;
        if !on {
            // Unpinned paths are cache entries now: the quota may take them.
            if let Some(q) = &state.quota {
                q.poke();
            }
        }
        json(&report)
    }
    .await;
    finish(&state, "api-admin", r)
}

/// `POST /api/gc` `{"max_size": N}` or `{"policy": "<TOML>", "dry_run": bool}` →
/// [`SizeGcReport`] or [`PolicyGcReport`]. The index is not compacted (the daemon holds it).
pub async fn gc(State(state): State<Arc<HttpState>>, headers: HeaderMap, body: Bytes) -> Response {
    let r = async {
        let req: GcBody = admit(&state, &headers, &body)?;
        let policy = match (&req.policy, req.max_size, req.dry_run) {
            (Some(_), Some(_), _) => {
                return Err(HttpError::BadRequest(
                    "give max_size or policy, not both".into(),
                ))
            }
            (None, _, true) => return Err(HttpError::BadRequest("dry_run needs a policy".into())),
            (Some(text), None, _) => Some(maintain::policy_from_text(text).map_err(maintain_err)?),
            (None, _, false) => None,
        };
        let _turn = GC_TURN.lock().await;
        let store = state.store.clone();
        let (max_size, dry_run) = (req.max_size, req.dry_run);
        let resp = match policy {
            Some(p) => {
                let r: PolicyGcReport = blocking(move || {
                    maintain::gc_by_policy(&store, &p, dry_run, maintain::now_unix())
                        .map_err(maintain_err)
                })
                .await?;
                json(&r)?
            }
            None => {
                let r: SizeGcReport =
                    blocking(move || maintain::gc_to_size(&store, max_size).map_err(maintain_err))
                        .await?;
                json(&r)?
            }
        };
        if !dry_run {
            // Evicted, hidden or collected paths must not be served from memory.
            state.narinfo_cache.clear();
        }
        Ok(resp)
    }
    .await;
    finish(&state, "api-admin", r)
}

/// `POST /api/undelete` `{"paths": [...]}` or `{"all": true}` → [`UndeleteReport`].
pub async fn undelete(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = async {
        let req: UndeleteBody = admit(&state, &headers, &body)?;
        let _turn = GC_TURN.lock().await;
        let store = state.store.clone();
        let report: UndeleteReport =
            blocking(move || maintain::undelete(&store, &req.paths, req.all).map_err(maintain_err))
                .await?;
        state.narinfo_cache.clear();
        json(&report)
    }
    .await;
    finish(&state, "api-admin", r)
}
