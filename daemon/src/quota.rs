//! `Quota`: keeps a peer's store under `--max-cache-size` (design §3, "Eviction / GC").
//!
//! One background task runs [`Store::evict_to`] (least-recently-used unpinned NARs first, then
//! pack GC) when poked after a NAR was fetched, and every [`INTERVAL`] anyway. Runs never
//! overlap; pokes while one runs coalesce into one more run. A seed has no quota (the config
//! refuses one), so it never evicts. Uploads and imports are pinned (`Retention::Pinned`);
//! only NARs fetched from peers or upstreams are cache.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::store::Store;

/// Eviction also runs this often without a poke (touches may have changed the order).
pub const INTERVAL: Duration = Duration::from_secs(300);
/// NARs used this recently are not evicted (their narinfo was just served: Nix is about to
/// ask for them), so the quota may be exceeded for that long.
pub const GRACE: Duration = Duration::from_secs(120);

pub struct Quota {
    wake: Notify,
    max: u64,
    on_evict: Box<dyn Fn() + Send + Sync>,
}

impl Quota {
    /// Starts the eviction task (on the current runtime) for a store of at most `max` bytes;
    /// `on_evict` runs after every run that removed paths.
    pub fn start(store: Arc<Store>, max: u64, on_evict: Box<dyn Fn() + Send + Sync>) -> Arc<Quota> {
        let q = Arc::new(Quota {
            wake: Notify::new(),
            max,
            on_evict,
        });
        let task = q.clone();
        tokio::spawn(async move { task.run(store).await });
        q
    }

    /// Asks for an eviction run soon (never blocks).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    async fn run(&self, store: Arc<Store>) {
        let grace = grace_secs();
        loop {
            let (s, max) = (store.clone(), self.max);
            let mut over = false;
            match tokio::task::spawn_blocking(move || s.evict_to_sparing(max, grace)).await {
                Ok(Ok(r)) => {
                    if r.paths > 0 || r.bytes_before != r.bytes_after {
                        tracing::info!(
                            paths = r.paths,
                            nar_bytes = r.nar_bytes,
                            before = r.bytes_before,
                            after = r.bytes_after,
                            target = r.target,
                            "evicted to stay under max-cache-size"
                        );
                    }
                    if r.paths > 0 {
                        (self.on_evict)();
                    }
                    over = r.bytes_after > r.target;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "eviction failed"),
                Err(e) => tracing::warn!(error = %e, "eviction task failed"),
            }
            // Still over (recently used NARs were spared): try again once they are not.
            let wait = if over {
                Duration::from_secs(grace + 1).min(INTERVAL)
            } else {
                INTERVAL
            };
            let _ = tokio::time::timeout(wait, self.wake.notified()).await;
        }
    }
}

/// [`GRACE`], or `NIX_P2P_CACHE_EVICT_GRACE_SECS` (tests and operators who know their clients).
fn grace_secs() -> u64 {
    std::env::var("NIX_P2P_CACHE_EVICT_GRACE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(GRACE.as_secs())
}
