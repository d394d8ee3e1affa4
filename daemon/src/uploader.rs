//! Background upload of sealed packs to remote pack storage (S3, `store::upload`): every
//! [`INTERVAL`] the sealed packs still local are uploaded and their local files deleted, and
//! the remote packs a pack GC gave up are deleted once their delay is over. A failed round
//! (the storage down) is retried next round; nothing is lost meanwhile (the packs stay local).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// How often sealed packs are looked for.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Starts the upload task on the current runtime; it ends once `stop` turns true (the daemon
/// then seals and uploads the open pack itself).
pub fn start(store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        while !*stop.borrow() {
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.upload_sealed()).await {
                Ok(Ok(r)) if r.packs > 0 || r.deleted > 0 => {
                    tracing::debug!(
                        packs = r.packs,
                        bytes = r.bytes,
                        deleted = r.deleted,
                        "uploads"
                    );
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "uploading sealed packs failed (retried)"),
                Err(e) => tracing::warn!(error = %e, "upload task failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = stop.changed() => {}
            }
        }
    });
}
