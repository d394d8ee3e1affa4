//! The daemon's own JSON API for `nix-p2p-cache status` and `peers`: `GET /api/status` and
//! `GET /api/peers`. Read-only; served on the substituter's (loopback by default) address.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{blocking, finish, HttpError, HttpState};
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
}

#[derive(Serialize)]
struct Status<'a> {
    #[serde(flatten)]
    node: &'a NodeInfo,
    uptime_secs: u64,
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
                })
            }
            None => None,
        };
        json(&Status {
            node: &state.node,
            uptime_secs: state.started.elapsed().as_secs(),
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
