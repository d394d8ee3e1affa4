//! Background cold compaction (issue 11, `store::compact`): a seed rewrites its cold packs at a
//! higher zstd level, one pack at a time, within a CPU budget, and stops at shutdown.
//!
//! After each pack the task pauses for three times as long as the pack took, so compaction uses
//! at most a quarter of one core on average; with nothing cold left it looks again every
//! [`CHECK_INTERVAL`]. A run stopped at shutdown loses nothing (the batch is not committed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::store::{CompactOptions, Store};

/// How often the task looks for cold packs when it found none.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(600);
/// Share of one core compaction may use on average.
pub const CPU_BUDGET: f64 = 0.25;

/// Starts the compaction task on the current runtime; it ends once `stop` turns true (a run in
/// progress stops at the next record).
pub fn start(store: Arc<Store>, level: i32, min_age: Duration, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        while !*stop.borrow() {
            let (s, halt) = (store.clone(), stop.clone());
            let opts = CompactOptions {
                level,
                min_age,
                max_packs: Some(1),
            };
            let run = tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                (s.compact(opts, &|| *halt.borrow()), t.elapsed())
            })
            .await;
            let pause = match run {
                Ok((Ok(r), took)) => {
                    for s in &r.skipped {
                        tracing::warn!(skipped = %s, "compaction left a pack alone (run verify)");
                    }
                    if r.packs_in > 0 && r.packs_left > 0 {
                        took.mul_f64((1.0 - CPU_BUDGET) / CPU_BUDGET)
                    } else {
                        CHECK_INTERVAL
                    }
                }
                Ok((Err(e), _)) => {
                    tracing::warn!(error = %e, "compaction failed");
                    CHECK_INTERVAL
                }
                Err(e) => {
                    tracing::warn!(error = %e, "compaction task failed");
                    CHECK_INTERVAL
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
    });
}
