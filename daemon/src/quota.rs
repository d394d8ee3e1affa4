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

    pub fn max(&self) -> u64 {
        self.max
    }

    /// Asks for an eviction run soon (never blocks).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    async fn run(&self, store: Arc<Store>) {
        loop {
            let (s, max) = (store.clone(), self.max);
            match tokio::task::spawn_blocking(move || s.evict_to(max)).await {
                Ok(Ok(r)) if r.paths > 0 || r.bytes_before != r.bytes_after => {
                    tracing::info!(
                        paths = r.paths,
                        nar_bytes = r.nar_bytes,
                        before = r.bytes_before,
                        after = r.bytes_after,
                        target = r.target,
                        "evicted to stay under max-cache-size"
                    );
                    if r.paths > 0 {
                        (self.on_evict)();
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "eviction failed"),
                Err(e) => tracing::warn!(error = %e, "eviction task failed"),
            }
            let _ = tokio::time::timeout(INTERVAL, self.wake.notified()).await;
        }
    }
}
