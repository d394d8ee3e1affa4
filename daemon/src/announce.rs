//! Announcing what the store holds on the DHT (design §4): provider records for every trusted
//! NAR, kept alive by reproviding.
//!
//! Owns a bounded queue of NarHashes to announce and the reprovide schedule; provides through
//! [`net::Client`] and reads the store on `spawn_blocking`. It does not decide what is
//! shareable: that is [`Store::shareable_nars`] (NARs some trusted narinfo names), and
//! [`Announcer::announce`] must only be given such NARs.
//!
//! Use:
//! ```ignore
//! let announcer = Arc::new(Announcer::new(client, store, config.announce));
//! tokio::spawn({ let a = announcer.clone(); async move { a.run().await } });
//! announcer.announce(nar_hash);           // after ingesting a trusted narinfo; never blocks
//! let s = announcer.stats();              // for `status`
//! ```
//!
//! - [`Announcer::run`] announces every trusted NAR at start, then reprovides all of them every
//!   reprovide interval (12 h; provider records live 48 h; both are `config::Timers`, set with
//!   [`Announcer::with_intervals`]), in batches of [`BATCH_NARS`] NARs with at most [`CONCURRENCY`] DHT queries in flight
//!   over everything the announcer does; between batches the queue is served. It also deletes
//!   expired DHT records from the store's DHT database ([`Store::dht`]) every
//!   purge interval (1 h, `config::Timers` too). It runs until its task is
//!   aborted or the network stops.
//! - [`Announcer::announce`] queues one NAR (at most [`QUEUE`] waiting); when the queue is
//!   full the NAR is dropped with a debug log — the next reprovide announces it.
//! - [`Announce::Roots`] provides NAR keys (DHT key: the NAR key's multihash bytes);
//!   [`Announce::All`] also every chunk id of those NARs (DHT key: the chunk CID's multihash).
//!
//! Not done: batching provider records per region of the key space (one closest-peers walk for
//! many keys) — rust-libp2p's kad has no API for it; each key is one `start_providing` query.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use libp2p::kad::RecordKey;
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

use crate::config::Announce;
use crate::core::NarHash;
use crate::net::record_store::{chunk_record_key, nar_record_key};
use crate::net::{self, NetError};
use crate::store::{Store, StoreError};

/// NarHashes waiting to be announced.
pub const QUEUE: usize = 1024;
/// NARs whose keys are gathered and provided together in one reprovide batch.
pub const BATCH_NARS: usize = 64;
/// `start_providing` queries in flight at once, over everything the announcer does. Each opens
/// a FIND_NODE and an ADD_PROVIDER stream to the closest peers; with few peers one of them gets
/// both of every query, and libp2p's kad drops inbound streams past 32 per connection when the
/// receiver is busy (the ADD_PROVIDER is then lost: it has no answer to miss). So at most 16.
pub const CONCURRENCY: usize = 16;
const _: () = assert!(
    2 * CONCURRENCY <= 32,
    "kad's inbound stream limit per connection"
);

/// What the announcer did since it started (see [`Announcer::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AnnounceStats {
    /// Successful `start_providing` queries (reprovides included).
    pub keys_provided: u64,
    /// Failed `start_providing` queries.
    pub failures: u64,
    /// NARs dropped by [`Announcer::announce`] because the queue was full.
    pub dropped: u64,
    /// Completed full (re)provide rounds.
    pub reprovides: u64,
    /// Keys provided by the last completed round.
    pub last_reprovide_keys: u64,
    /// How long the last completed round took, in milliseconds.
    pub last_reprovide_ms: Option<u64>,
    /// Expired DHT records deleted from the store.
    pub purged: u64,
}

#[derive(Default)]
struct Counters {
    keys_provided: AtomicU64,
    failures: AtomicU64,
    dropped: AtomicU64,
    reprovides: AtomicU64,
    last_reprovide_keys: AtomicU64,
    /// Milliseconds + 1; 0 = no round completed yet.
    last_reprovide_ms: AtomicU64,
    purged: AtomicU64,
}

/// Errors that end [`Announcer::run`] early.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("the network stopped")]
    Stopped,
    #[error("announcer is already running")]
    AlreadyRunning,
}

/// Provides trusted NARs on the DHT; see the module docs.
pub struct Announcer {
    client: net::Client,
    store: Arc<Store>,
    mode: Announce,
    tx: mpsc::Sender<NarHash>,
    rx: Mutex<Option<mpsc::Receiver<NarHash>>>,
    permits: Semaphore,
    counters: Counters,
    reprovide_interval: Duration,
    purge_interval: Duration,
}

impl Announcer {
    pub fn new(client: net::Client, store: Arc<Store>, mode: Announce) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            client,
            store,
            mode,
            tx,
            rx: Mutex::new(Some(rx)),
            permits: Semaphore::new(CONCURRENCY),
            counters: Counters::default(),
            reprovide_interval: crate::config::Timers::default().reprovide_interval(),
            purge_interval: crate::config::Timers::default().dht_purge_interval(),
        }
    }

    /// Reprovides every `reprovide` and purges expired DHT records every `purge` (instead of
    /// the defaults of `config::Timers`).
    pub fn with_intervals(mut self, reprovide: Duration, purge: Duration) -> Self {
        self.reprovide_interval = reprovide;
        self.purge_interval = purge;
        self
    }

    /// Queues a trusted NAR to be provided. Never blocks; callable from any thread. When the
    /// queue is full the NAR is dropped (logged at debug): the next reprovide catches it.
    pub fn announce(&self, nar_hash: NarHash) {
        if self.tx.try_send(nar_hash).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(nar = %nar_hash, "announce queue full: left to the next reprovide");
        }
    }

    pub fn stats(&self) -> AnnounceStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AnnounceStats {
            keys_provided: get(&c.keys_provided),
            failures: get(&c.failures),
            dropped: get(&c.dropped),
            reprovides: get(&c.reprovides),
            last_reprovide_keys: get(&c.last_reprovide_keys),
            last_reprovide_ms: get(&c.last_reprovide_ms).checked_sub(1),
            purged: get(&c.purged),
        }
    }

    /// Announces every trusted NAR, then serves the queue, reprovides and purges, forever (see
    /// the module docs). Returns only if the network stops, or if already running.
    pub async fn run(&self) -> Result<(), AnnounceError> {
        let rx = self
            .rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(AnnounceError::AlreadyRunning)?;
        let span = tracing::info_span!("announce", mode = ?self.mode);
        async {
            tokio::select! {
                r = self.reprovide_loop() => r,
                r = self.queue_loop(rx) => r,
                () = self.purge_loop() => Ok(()),
            }
        }
        .instrument(span)
        .await
    }

    async fn reprovide_loop(&self) -> Result<(), AnnounceError> {
        let mut ticks = tokio::time::interval(self.reprovide_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.reprovide_all().await?;
        }
    }

    async fn queue_loop(&self, mut rx: mpsc::Receiver<NarHash>) -> Result<(), AnnounceError> {
        let mut batch = Vec::with_capacity(BATCH_NARS);
        // `self` holds a sender, so the queue never closes.
        while rx.recv_many(&mut batch, BATCH_NARS).await > 0 {
            let nars = std::mem::take(&mut batch);
            self.provide_nars(nars).await?;
        }
        Ok(())
    }

    async fn purge_loop(&self) {
        let mut ticks = tokio::time::interval(self.purge_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let store = self.store.clone();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            match tokio::task::spawn_blocking(move || store.dht()?.purge_expired_dht(now)).await {
                Ok(Ok(n)) => {
                    self.counters.purged.fetch_add(n, Ordering::Relaxed);
                    tracing::debug!(purged = n, "expired DHT records deleted");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "purging expired DHT records"),
                Err(e) => tracing::warn!(error = %e, "purging expired DHT records"),
            }
        }
    }

    /// One full round: every trusted NAR, in batches. Answers how many keys were provided.
    pub async fn reprovide_all(&self) -> Result<u64, AnnounceError> {
        let started = Instant::now();
        let store = self.store.clone();
        let nars = match tokio::task::spawn_blocking(move || store.shareable_nars()).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reprovide: listing trusted NARs");
                return Ok(0);
            }
            Err(e) => {
                tracing::warn!(error = %e, "reprovide: listing trusted NARs");
                return Ok(0);
            }
        };
        let mut nars: Vec<NarHash> = nars.into_iter().collect();
        nars.sort();
        let total = nars.len();
        let mut provided = 0;
        for batch in nars.chunks(BATCH_NARS) {
            provided += self.provide_nars(batch.to_vec()).await?;
        }
        let ms = started.elapsed().as_millis() as u64;
        let c = &self.counters;
        c.reprovides.fetch_add(1, Ordering::Relaxed);
        c.last_reprovide_keys.store(provided, Ordering::Relaxed);
        c.last_reprovide_ms.store(ms + 1, Ordering::Relaxed);
        tracing::info!(nars = total, keys = provided, ms, "reprovided");
        Ok(provided)
    }

    /// Provides the keys of `nars` (deduplicated), at most [`CONCURRENCY`] queries at once.
    /// Answers how many succeeded.
    async fn provide_nars(&self, nars: Vec<NarHash>) -> Result<u64, AnnounceError> {
        let store = self.store.clone();
        let mode = self.mode;
        let keys = match tokio::task::spawn_blocking(move || keys_of(&store, &nars, mode)).await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "announce: reading manifests");
                return Ok(0);
            }
        };
        let ok = AtomicU64::new(0);
        let stopped = AtomicU64::new(0);
        stream::iter(keys)
            .for_each_concurrent(CONCURRENCY, |key| {
                let (ok, stopped) = (&ok, &stopped);
                async move {
                    let Ok(_permit) = self.permits.acquire().await else {
                        return;
                    };
                    match self.client.start_providing_key(key.clone()).await {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            self.counters.keys_provided.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(NetError::Stopped) => {
                            stopped.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            self.counters.failures.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(key = %hex::encode(key.as_ref()), error = %e,
                                "start_providing failed");
                        }
                    }
                }
            })
            .await;
        if stopped.load(Ordering::Relaxed) > 0 {
            return Err(AnnounceError::Stopped);
        }
        Ok(ok.load(Ordering::Relaxed))
    }
}

/// The DHT keys announcing `nars` in `mode`, without repeats. A NAR whose manifest cannot be
/// read is logged and announced by its NAR key only.
fn keys_of(store: &Store, nars: &[NarHash], mode: Announce) -> Vec<RecordKey> {
    let mut seen = HashSet::new();
    let mut keys = Vec::new();
    let mut push = |k: RecordKey| {
        if seen.insert(k.clone()) {
            keys.push(k);
        }
    };
    for nar in nars {
        push(nar_record_key(&nar.nar_key()));
        if mode == Announce::All {
            match store.manifest(nar) {
                Ok(Some(m)) => m.chunks.iter().for_each(|c| push(chunk_record_key(&c.id))),
                Ok(None) => {}
                Err(e) => log_manifest_error(nar, &e),
            }
        }
    }
    keys
}

fn log_manifest_error(nar: &NarHash, e: &StoreError) {
    tracing::warn!(nar = %nar, error = %e, "announce: manifest unreadable, chunks not provided");
}
