//! `run`: the daemon as a library call (tests start it with port 0 and a temp dir).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{ConfigError, DaemonConfig};
use crate::core::signing::{PublicKey, SigningError, CACHE_NIXOS_ORG_KEY};
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::upstream::{Upstream, UpstreamError};

/// Served narinfos (and misses) kept in memory: ~1 KiB each at most.
const NARINFO_CACHE_ENTRIES: usize = 16 * 1024;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("bad trusted public key {key:?}: {source}")]
    Key {
        key: String,
        #[source]
        source: SigningError,
    },
    #[error("opening the store: {0}")]
    Store(#[from] Box<StoreError>),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
}

/// The trusted keys: cache.nixos.org's plus the configured ones.
pub fn trusted_keys(extra: &[String]) -> Result<Vec<PublicKey>, DaemonError> {
    std::iter::once(CACHE_NIXOS_ORG_KEY)
        .chain(extra.iter().map(String::as_str))
        .map(|k| {
            PublicKey::parse(k).map_err(|source| DaemonError::Key {
                key: k.to_string(),
                source,
            })
        })
        .collect()
}

/// Runs the daemon until `shutdown` resolves. `on_listen` gets each bound address.
pub async fn run(
    config: DaemonConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), DaemonError> {
    let trusted = trusted_keys(&config.trusted_public_keys)?;
    let upload_token = config.upload_token()?;
    let dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await
        .map_err(|e| DaemonError::Serve(std::io::Error::other(e)))?
        .map_err(Box::new)?;
    let upstream = if config.upstream.is_empty() {
        None
    } else {
        let u = Upstream::new(&config.upstream, trusted.clone())?;
        tracing::info!(upstreams = ?config.upstream, "upstream caches");
        Some(Arc::new(u))
    };
    let state = Arc::new(HttpState {
        store: Arc::new(store),
        metrics: Arc::new(Metrics::default()),
        upload_token,
        trusted,
        staging: config.data_dir.join("uploads"),
        max_upload: config.max_upload_size,
        narinfo_cache: http::NarinfoCache::new(NARINFO_CACHE_ENTRIES),
        upstream,
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(DaemonError::Serve)?;
    // Responses are written in large blocks; Nagle would only delay their tails.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
    });
    on_listen(addr);
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "serving");
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(DaemonError::Serve)?;
    tracing::info!("shut down");
    Ok(())
}
