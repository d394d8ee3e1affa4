//! The source layer (design §4): where a narinfo or a NAR the store lacks comes from.
//!
//! [`Source`] is one place a NAR can come from — the peers ([`crate::fetch::Peers`]: LAN,
//! the narinfo's sender, DHT providers) and the upstream caches ([`crate::upstream`]); the
//! local store is asked first by the callers, since it needs no flight. The [`Resolver`] owns
//! the cascade and everything shared between requests:
//! - narinfo: the pending narinfos (bounded LRU), the sources asked in order; a source that
//!   may still answer (a peer past the short budget) is waited for within [`LATE_BUDGET`]
//!   after the others said no, so a slow peer never turns into a 404 ([`NarinfoAnswer`]);
//! - NAR: one [`Flight`] per NarHash (single flight: every client asking for it streams the
//!   same flight from its spool, from byte 0); the flight tries the narinfo's own source
//!   first, then the others, starting over only while no byte was exposed; a source that
//!   failed after exposing bytes is not asked for that NAR again (the next request's flight
//!   goes to the others, and with none left the narinfo is forgotten);
//! - one "NAR stored" event ([`NarStored`], a bounded broadcast) that the announcer and the
//!   quota subscribe to.
//!
//! It holds no lock across an await, and no store call runs on the async threads.

pub mod flight;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;
use tokio::sync::broadcast;
use tracing::Instrument;

pub use flight::{Flight, FlightError};

use crate::core::signing::Trust;
use crate::core::store_path::StorePathHash;
use crate::core::NarHash;
use crate::fetch::PeerError;
use crate::metrics::transfers::Direction;
use crate::metrics::Metrics;
use crate::pending::{Pending, PendingNarinfos};
use crate::store::{Store, StoreError};
use crate::upstream::UpstreamError;

/// How long the sources that did not answer a narinfo within their short budget are waited
/// for once every other source said no.
pub const LATE_BUDGET: Duration = Duration::from_secs(3);
/// Pending narinfos kept (least recently used out first).
const PENDING_ENTRIES: usize = 64 * 1024;
/// "NAR stored" events queued for a slow subscriber (it then skips the oldest).
const EVENTS: usize = 1024;
/// NARs whose failed sources are remembered.
const DEMOTED_ENTRIES: usize = 4096;
/// Stored narinfos served, remembered by NarHash (oldest out first) so that a NAR evicted
/// after its narinfo went out can be fetched again.
const SERVED_ENTRIES: usize = 16 * 1024;

/// Where a narinfo was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A connected peer sent it.
    Peer(PeerId),
    /// An upstream cache (its base URL).
    Upstream(Arc<str>),
}

/// A narinfo found at a source, checked (parsed, for the asked path, signature verdict).
pub type Found = Pending<Origin>;

/// A source's answer to a narinfo request.
pub enum Lookup {
    Found(Found),
    /// The source does not have it.
    Missing,
    /// The source could not be asked (a transient failure): a miss not worth remembering.
    Unsure,
    /// Not within the short budget; the source may still answer.
    Late(BoxFuture<'static, Lookup>),
}

/// Why a source could not deliver a NAR.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Peers(#[from] PeerError),
    #[error(transparent)]
    Flight(#[from] FlightError),
    #[error("storing the NAR: {0}")]
    Store(Box<StoreError>),
    #[error("{0} task failed")]
    Task(&'static str),
}

impl From<StoreError> for FetchError {
    fn from(e: StoreError) -> Self {
        FetchError::Store(Box::new(e))
    }
}

/// One place a NAR can come from; see the module docs.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// For logs and metrics.
    fn name(&self) -> &'static str;
    /// Whether a narinfo found with this origin came from this source.
    fn owns(&self, origin: &Origin) -> bool;
    /// Asks for the narinfo of `hash`.
    async fn narinfo(&self, hash: &StorePathHash) -> Lookup;
    /// Streams the NAR `found` names into `flight` (in order, NarHash checked with
    /// [`Flight::finish`] before the last byte is visible) and stores it. `found` may come
    /// from another source.
    async fn fetch(
        &self,
        store: &Arc<Store>,
        found: &Found,
        flight: &Arc<Flight>,
    ) -> Result<(), FetchError>;
}

/// A NAR was stored from a source or an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarStored {
    pub nar_hash: NarHash,
    /// Its narinfo has a trusted signature (may be announced).
    pub trusted: bool,
}

/// What the sources say about a narinfo the store lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarinfoAnswer {
    /// Found (its original text); the NAR can be fetched.
    Found(Arc<str>),
    /// Not found; `certain`: every source asked said so (a miss worth remembering).
    Missing { certain: bool },
}

/// The cascade of sources and what requests share; see the module docs.
pub struct Resolver {
    store: Arc<Store>,
    sources: Vec<Arc<dyn Source>>,
    pending: PendingNarinfos<Origin>,
    flights: Mutex<HashMap<NarHash, Arc<Flight>>>,
    /// Sources (by index) that failed a NAR after exposing bytes: tried last for it.
    demoted: Mutex<HashMap<NarHash, HashSet<usize>>>,
    events: broadcast::Sender<NarStored>,
    metrics: Arc<Metrics>,
    spool_dir: PathBuf,
    /// Store paths of stored narinfos recently served, by NarHash (see [`Resolver::recover`]).
    served: Mutex<(HashMap<NarHash, StorePathHash>, VecDeque<NarHash>)>,
    /// Narinfos found at sources, on their way into the index (`Store::remember_served`), so
    /// their NARs are found again after a restart.
    remember: tokio::sync::mpsc::Sender<Remember>,
}

/// A change to the remembered narinfos (`Store::remember_served`).
enum Remember {
    /// Served from a source: (NarHash, store-path hash).
    Served(NarHash, String),
    /// Every source failed the NAR: not to be looked for again through this path.
    Forget(NarHash),
}

/// Narinfos found at sources waiting to be remembered in the index; more are not remembered.
const REMEMBER_QUEUE: usize = 1024;

impl Resolver {
    /// `sources` in cascade order (peers before upstreams).
    /// Needs a runtime: it starts the task that remembers found narinfos in the index.
    pub fn new(store: Arc<Store>, sources: Vec<Arc<dyn Source>>, metrics: Arc<Metrics>) -> Self {
        let spool_dir = store.dir().join("spool");
        let (remember, mut queue) = tokio::sync::mpsc::channel::<Remember>(REMEMBER_QUEUE);
        let (st, m) = (store.clone(), metrics.clone());
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                let mut batch = vec![first];
                while batch.len() < 256 {
                    match queue.try_recv() {
                        Ok(x) => batch.push(x),
                        Err(_) => break,
                    }
                }
                let (mut served, mut forget) = (Vec::new(), Vec::new());
                for r in batch {
                    match r {
                        Remember::Served(nar, path) => served.push((nar, path)),
                        Remember::Forget(nar) => forget.push(nar),
                    }
                }
                let (s, n) = (st.clone(), served.len() as u64);
                let write = move || {
                    s.remember_served(&served)?;
                    s.forget_served(&forget)
                };
                match tokio::task::spawn_blocking(write).await {
                    Ok(Ok(())) => Metrics::inc(&m.narinfos_remembered, n),
                    Ok(Err(e)) => tracing::warn!(error = %e, "served narinfos not remembered"),
                    Err(e) => tracing::warn!(error = %e, "served narinfos not remembered"),
                }
            }
        });
        Self {
            remember,
            store,
            sources,
            pending: PendingNarinfos::new(PENDING_ENTRIES),
            flights: Mutex::new(HashMap::new()),
            demoted: Mutex::new(HashMap::new()),
            events: broadcast::channel(EVENTS).0,
            metrics,
            spool_dir,
            served: Mutex::default(),
        }
    }

    /// Notes that the stored narinfo of `path` (NAR `nar_hash`) was served: if its NAR is
    /// evicted before Nix asks for it, [`Resolver::recover`] finds it again at the sources.
    pub fn note_served(&self, nar_hash: NarHash, path: &StorePathHash) {
        if self.sources.is_empty() {
            return;
        }
        let mut m = self.served.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *m;
        if map.insert(nar_hash, path.clone()).is_none() {
            order.push_back(nar_hash);
            while order.len() > SERVED_ENTRIES {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }

    /// A NAR neither stored nor pending whose stored narinfo was served (then the NAR was
    /// evicted): asks the sources for that path again. Answers whether a source has the same
    /// NAR now (it is pending: [`Resolver::nar`] starts its flight).
    pub async fn recover(&self, nar_hash: &NarHash) -> bool {
        let recent = {
            let m = self.served.lock().unwrap_or_else(|e| e.into_inner());
            m.0.get(nar_hash).cloned()
        };
        let path = match recent {
            Some(p) => p,
            None => match self.remembered_path(nar_hash).await {
                Some(p) => p,
                None => return false,
            },
        };
        match self.narinfo(&path).await {
            NarinfoAnswer::Found(_) => self.pending.by_nar(nar_hash).is_some(),
            NarinfoAnswer::Missing { .. } => false,
        }
    }

    /// Whether any source is configured.
    pub fn has_sources(&self) -> bool {
        !self.sources.is_empty()
    }

    /// "NAR stored" events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NarStored> {
        self.events.subscribe()
    }

    /// Tells the subscribers a NAR was stored (fetches do it themselves; uploads call this).
    pub fn stored(&self, event: NarStored) {
        let _ = self.events.send(event); // no subscriber: nothing to tell
    }

    /// Asks the sources for the narinfo of `hash` (the store has none).
    pub async fn narinfo(&self, hash: &StorePathHash) -> NarinfoAnswer {
        if let Some(p) = self.pending.get(hash) {
            return NarinfoAnswer::Found(p.text);
        }
        let mut certain = true;
        let mut late: FuturesUnordered<BoxFuture<'static, Lookup>> = FuturesUnordered::new();
        for s in &self.sources {
            match s.narinfo(hash).await {
                Lookup::Found(f) => return self.found(hash, f),
                Lookup::Missing => {}
                Lookup::Unsure => certain = false,
                Lookup::Late(fut) => late.push(fut),
            }
        }
        if late.is_empty() {
            return NarinfoAnswer::Missing { certain };
        }
        // Everyone else said no: wait for the late ones (bounded) rather than answer a 404
        // that Nix would remember for an hour.
        Metrics::inc(&self.metrics.narinfo_late_waits, 1);
        let waited = tokio::time::timeout(LATE_BUDGET, async {
            while let Some(l) = late.next().await {
                match l {
                    Lookup::Found(f) => return Some(f),
                    Lookup::Missing => {}
                    Lookup::Unsure | Lookup::Late(_) => certain = false,
                }
            }
            None
        })
        .await;
        match waited {
            Ok(Some(f)) => self.found(hash, f),
            Ok(None) => NarinfoAnswer::Missing { certain },
            Err(_) => NarinfoAnswer::Missing { certain: false },
        }
    }

    fn found(&self, hash: &StorePathHash, f: Found) -> NarinfoAnswer {
        let text = f.text.clone();
        if self
            .remember
            .try_send(Remember::Served(f.info.nar_hash, hash.as_str().to_string()))
            .is_err()
        {
            tracing::debug!(path = %hash, "too many narinfos to remember: this one is not");
        }
        self.pending.insert(hash.clone(), f);
        NarinfoAnswer::Found(text)
    }

    /// NarSize of a NAR some source can bring (for `HEAD`), without fetching it.
    pub fn fetchable_size(&self, nar_hash: &NarHash) -> Option<u64> {
        if let Some(f) = self.flight(nar_hash) {
            return Some(f.nar_size());
        }
        self.pending.by_nar(nar_hash).map(|(_, p)| p.info.nar_size)
    }

    fn flight(&self, nar_hash: &NarHash) -> Option<Arc<Flight>> {
        let m = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        m.get(nar_hash).cloned()
    }

    /// The flight of a NAR the store lacks: the running one, or a new one if a pending
    /// narinfo names it. `Ok(None)`: no source can bring it.
    pub fn nar(self: &Arc<Self>, nar_hash: &NarHash) -> Result<Option<Arc<Flight>>, StoreError> {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = flights.get(nar_hash) {
            Metrics::inc(&self.metrics.nar_flight_joins, 1);
            return Ok(Some(f.clone()));
        }
        let Some((path, found)) = self.pending.by_nar(nar_hash) else {
            return Ok(None);
        };
        let flight =
            Flight::new(&self.spool_dir, *nar_hash, found.info.nar_size).map_err(|source| {
                StoreError::Io {
                    path: self.spool_dir.clone(),
                    source,
                }
            })?;
        flights.insert(*nar_hash, flight.clone());
        drop(flights);
        let span = tracing::warn_span!("flight", nar = %nar_hash,
            path = %found.info.store_path.to_absolute());
        let me = self.clone();
        let f = flight.clone();
        tokio::spawn(
            async move {
                tracing::debug!("flight started");
                me.run_flight(path, found, f).await
            }
            .instrument(span),
        );
        Ok(Some(flight))
    }

    /// The sources to try for `found`, in order: its own first, then the cascade; not the
    /// ones that failed this NAR after exposing bytes (they lied, or broke off).
    fn order(&self, found: &Found) -> Vec<usize> {
        let demoted = {
            let d = self.demoted.lock().unwrap_or_else(|e| e.into_inner());
            d.get(&found.info.nar_hash).cloned().unwrap_or_default()
        };
        let mut order: Vec<usize> = (0..self.sources.len())
            .filter(|i| !demoted.contains(i))
            .collect();
        order.sort_by_key(|&i| (!self.sources[i].owns(&found.source), i));
        order
    }

    fn demote(&self, nar_hash: NarHash, source: usize) {
        let mut d = self.demoted.lock().unwrap_or_else(|e| e.into_inner());
        if d.len() >= DEMOTED_ENTRIES && !d.contains_key(&nar_hash) {
            d.clear(); // a hint only: losing it costs one more failed try
        }
        d.entry(nar_hash).or_default().insert(source);
    }

    /// The store path of a narinfo served from a source with this NarHash, remembered in the
    /// index (before a restart, too).
    async fn remembered_path(&self, nar_hash: &NarHash) -> Option<StorePathHash> {
        let (store, nar) = (self.store.clone(), *nar_hash);
        match tokio::task::spawn_blocking(move || store.served_path(&nar)).await {
            Ok(Ok(p)) => p.and_then(|p| StorePathHash::parse(&p).ok()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "looking up a served narinfo");
                None
            }
            Err(_) => None,
        }
    }

    /// No source can bring this NAR: a request for it is not to look for its narinfo again.
    /// Forgotten in the index before the flight's clients hear of the failure, and once more
    /// through the queue, after any remembering still in it.
    async fn forget_served(&self, nar_hash: &NarHash) {
        {
            let mut m = self.served.lock().unwrap_or_else(|e| e.into_inner());
            m.0.remove(nar_hash); // its slot in the order ages out
        }
        let (store, nar) = (self.store.clone(), *nar_hash);
        match tokio::task::spawn_blocking(move || store.forget_served(&[nar])).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "forgetting a served narinfo"),
            Err(e) => tracing::warn!(error = %e, "forgetting a served narinfo"),
        }
        if self.remember.try_send(Remember::Forget(nar)).is_err() {
            tracing::debug!(nar = %nar_hash, "too many narinfos to forget: this one is not");
        }
    }

    fn forget_demoted(&self, nar_hash: &NarHash) {
        let mut d = self.demoted.lock().unwrap_or_else(|e| e.into_inner());
        d.remove(nar_hash);
    }

    async fn run_flight(self: Arc<Self>, path: StorePathHash, found: Found, flight: Arc<Flight>) {
        let nar_hash = found.info.nar_hash;
        let mut outcome: Result<(), String> = Err("no source could bring it".into());
        for i in self.order(&found) {
            let source = &self.sources[i];
            if !flight.reset() {
                break; // bytes are out: a retry must be a new flight
            }
            let _shown = self.metrics.transfers.begin(
                Direction::Fetch,
                found.info.store_path.to_absolute(),
                source.name(),
                Some(found.info.nar_size),
                flight.written_counter(),
            );
            match source.fetch(&self.store, &found, &flight).await {
                Ok(()) => {
                    outcome = Ok(());
                    break;
                }
                Err(e) => {
                    tracing::warn!(source = source.name(), error = %e, "fetching the NAR failed");
                    outcome = Err(format!("{}: {e}", source.name()));
                    if flight.is_verified() {
                        break; // the bytes were right; only storing them failed
                    }
                    if flight.exposed() {
                        if !matches!(e, FetchError::Peers(PeerError::BadManifest { .. })) {
                            self.demote(nar_hash, i);
                        }
                        break;
                    }
                }
            }
        }
        // Out of the map before its end is told: a request that comes after a failure starts
        // a new flight (or finds the NAR stored) instead of joining this one.
        {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            if flights
                .get(&nar_hash)
                .is_some_and(|f| Arc::ptr_eq(f, &flight))
            {
                flights.remove(&nar_hash);
            }
        }
        // A held flight's verified bytes go out now (an unheld one's went at verification).
        flight.release();
        match &outcome {
            Ok(()) => {
                self.pending.remove(&path);
                self.forget_demoted(&nar_hash);
                self.stored(NarStored {
                    nar_hash,
                    trusted: matches!(found.trust, Trust::Trusted { .. }),
                });
                if !flight.is_verified() {
                    // Stored meanwhile by another path with the same NAR: clients retry and
                    // find it in the store.
                    flight.fail("the NAR was stored by another request; ask again");
                }
            }
            Err(e) if !flight.is_verified() && !flight.exposed() => {
                // Every source failed before a byte went out: forget the narinfo, so the next
                // lookup asks the sources again.
                Metrics::inc(&self.metrics.nar_fetch_failures, 1);
                self.pending.remove(&path);
                self.forget_demoted(&nar_hash);
                self.forget_served(&nar_hash).await;
                flight.fail(e);
            }
            Err(e) => {
                Metrics::inc(&self.metrics.nar_fetch_failures, 1);
                flight.fail(e);
            }
        }
    }
}
