//! Kademlia's record store, persistent: [`PersistentStore`] implements
//! `kad::store::RecordStore` over the DHT database ([`DhtStore`], `<data-dir>/dht.redb`), so
//! provider records survive a restart and the number of keys this node provides is not capped
//! (kad's `MemoryStore` refuses the 1025th and forgets everything on restart).
//!
//! Owns only the conversion between kad's types and the store's bytes: `Instant` expiries
//! become unix seconds and back, peer ids and multiaddrs their byte forms. The bounds on what
//! remote peers can make us store are [`DhtLimits`], enforced by the store. kad calls every
//! method synchronously on the swarm task: each is one short redb transaction on `dht.redb`,
//! which nothing but DHT records writes, so the swarm never waits on the index's writer (ingest
//! commits, eviction batches); it holds only the `Arc<DhtStore>`, never the `Store`.
//! [`RecordStore::provided`] reads the provided keys a page at a time. A database error is
//! logged and reads as "nothing" (or a refused write); nothing here panics.
//!
//! [`KadStore`] is what the behaviour holds: the persistent store, or kad's `MemoryStore` for a
//! node built without a [`DhtStore`] (`net::new`, kept until the daemon passes its store's).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::kad::store::{self, MemoryStore, RecordStore};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::{Multiaddr, PeerId};

use crate::core::{ChunkId, NarKey};
use crate::store::dht::{DhtLimits, DhtRecord, DhtStore, DhtWrite, RemoteProvider, NEVER};

/// Provided keys read from the database per page by [`RecordStore::provided`].
pub const PROVIDED_PAGE: usize = 1024;

/// The DHT key of a NAR: its NAR key's multihash bytes (`0x12 0x20 ‖ NarHash`).
pub fn nar_record_key(key: &NarKey) -> RecordKey {
    RecordKey::new(&key.multihash_bytes())
}

/// The DHT key of a chunk: its CID's multihash bytes (`0x1e 0x20 ‖ BLAKE3`).
pub fn chunk_record_key(id: &ChunkId) -> RecordKey {
    RecordKey::new(&id.cid().hash().to_bytes())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A monotonic expiry as unix seconds (rounded up; `None` is [`NEVER`]).
fn to_unix(expires: Option<Instant>, now: Instant, now_unix: u64) -> u64 {
    let Some(t) = expires else {
        return NEVER;
    };
    let left = t.saturating_duration_since(now);
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    now_unix.saturating_add(secs).min(NEVER - 1)
}

/// Unix seconds as a monotonic expiry ([`NEVER`] is `None`).
fn to_instant(unix: u64, now: Instant, now_unix: u64) -> Option<Instant> {
    if unix == NEVER {
        return None;
    }
    // Far-future expiries that do not fit an `Instant` are treated as none.
    now.checked_add(Duration::from_secs(unix.saturating_sub(now_unix)))
}

/// kad's record store over [`DhtStore`]; see the module docs.
pub struct PersistentStore {
    store: Arc<DhtStore>,
    local: PeerId,
    limits: DhtLimits,
}

impl PersistentStore {
    /// A store for the node `local` with the default [`DhtLimits`].
    pub fn new(store: Arc<DhtStore>, local: PeerId) -> Self {
        Self::with_limits(store, local, DhtLimits::default())
    }

    pub fn with_limits(store: Arc<DhtStore>, local: PeerId, limits: DhtLimits) -> Self {
        Self {
            store,
            local,
            limits,
        }
    }

    pub fn limits(&self) -> &DhtLimits {
        &self.limits
    }

    fn local_record(&self, key: RecordKey) -> ProviderRecord {
        // Like kad's own: no addresses, kad fills in the current ones when it answers.
        ProviderRecord::new(key, self.local, Vec::new())
    }
}

fn log_error(op: &'static str, key: &RecordKey, e: &crate::store::StoreError) {
    tracing::warn!(op, key = %hex::encode(key.as_ref()), error = %e, "DHT record store");
}

impl RecordStore for PersistentStore {
    type RecordsIter<'a> = std::vec::IntoIter<Cow<'a, Record>>;
    type ProvidedIter<'a> = ProvidedRecords<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        let (now, now_unix) = (Instant::now(), unix_now());
        match self.store.dht_record(k.as_ref(), now_unix) {
            Ok(r) => r.map(|r| Cow::Owned(to_record(r, now, now_unix))),
            Err(e) => {
                log_error("get", k, &e);
                None
            }
        }
    }

    fn put(&mut self, r: Record) -> store::Result<()> {
        let record = DhtRecord {
            key: r.key.to_vec(),
            value: r.value,
            publisher: r.publisher.map(|p| p.to_bytes()),
            expires_unix: to_unix(r.expires, Instant::now(), unix_now()),
        };
        match self.store.dht_put_record(&record, &self.limits) {
            Ok(DhtWrite::Stored | DhtWrite::KeyFull) => Ok(()),
            Ok(DhtWrite::Full) => Err(store::Error::MaxRecords),
            Ok(DhtWrite::TooLarge) => Err(store::Error::ValueTooLarge),
            Err(e) => {
                log_error("put", &r.key, &e);
                Err(store::Error::MaxRecords)
            }
        }
    }

    fn remove(&mut self, k: &RecordKey) {
        if let Err(e) = self.store.dht_remove_record(k.as_ref()) {
            log_error("remove", k, &e);
        }
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        let (now, now_unix) = (Instant::now(), unix_now());
        match self.store.dht_records(now_unix) {
            Ok(rs) => rs
                .into_iter()
                .map(|r| Cow::Owned(to_record(r, now, now_unix)))
                .collect::<Vec<_>>()
                .into_iter(),
            Err(e) => {
                tracing::warn!(op = "records", error = %e, "DHT record store");
                Vec::new().into_iter()
            }
        }
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        let now_unix = unix_now();
        let key = record.key.as_ref();
        if record.provider == self.local {
            return match self.store.dht_provide(key, now_unix) {
                Ok(_) => Ok(()),
                Err(e) => {
                    log_error("add_provider", &record.key, &e);
                    Err(store::Error::MaxProvidedKeys)
                }
            };
        }
        let provider = RemoteProvider {
            peer: record.provider.to_bytes(),
            expires_unix: to_unix(record.expires, Instant::now(), now_unix),
            addrs: record.addresses.iter().map(|a| a.to_vec()).collect(),
        };
        match self
            .store
            .dht_add_provider(key, &provider, &self.limits, now_unix)
        {
            Ok(DhtWrite::Stored | DhtWrite::TooLarge) => Ok(()),
            Ok(DhtWrite::KeyFull) => {
                // As kad's own store: a key with enough live providers ignores new ones.
                tracing::debug!(key = %hex::encode(key), peer = %record.provider,
                    "provider record ignored: key has its maximum of providers");
                Ok(())
            }
            Ok(DhtWrite::Full) => Err(store::Error::MaxProvidedKeys),
            Err(e) => {
                log_error("add_provider", &record.key, &e);
                Err(store::Error::MaxProvidedKeys)
            }
        }
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let (now, now_unix) = (Instant::now(), unix_now());
        let mut out = Vec::new();
        match self.store.dht_is_provided(key.as_ref()) {
            Ok(true) => out.push(self.local_record(key.clone())),
            Ok(false) => {}
            Err(e) => log_error("providers", key, &e),
        }
        match self.store.dht_providers(key.as_ref(), now_unix) {
            Ok(remote) => out.extend(remote.into_iter().filter_map(|p| {
                Some(ProviderRecord {
                    key: key.clone(),
                    provider: PeerId::from_bytes(&p.peer).ok()?,
                    expires: to_instant(p.expires_unix, now, now_unix),
                    addresses: p
                        .addrs
                        .into_iter()
                        .filter_map(|a| Multiaddr::try_from(a).ok())
                        .collect(),
                })
            })),
            Err(e) => log_error("providers", key, &e),
        }
        out
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        ProvidedRecords {
            store: &self.store,
            local: self.local,
            after: None,
            page: Vec::new().into_iter(),
            done: false,
        }
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        let result = if *p == self.local {
            self.store.dht_unprovide(k.as_ref())
        } else {
            self.store.dht_remove_provider(k.as_ref(), &p.to_bytes())
        };
        if let Err(e) = result {
            log_error("remove_provider", k, &e);
        }
    }
}

fn to_record(r: DhtRecord, now: Instant, now_unix: u64) -> Record {
    Record {
        key: RecordKey::from(r.key),
        value: r.value,
        publisher: r.publisher.and_then(|p| PeerId::from_bytes(&p).ok()),
        expires: to_instant(r.expires_unix, now, now_unix),
    }
}

/// The keys this node provides, read [`PROVIDED_PAGE`] at a time (one read transaction per
/// page), so millions of keys are never all in memory. A database error ends the iteration.
pub struct ProvidedRecords<'a> {
    store: &'a DhtStore,
    local: PeerId,
    after: Option<Vec<u8>>,
    page: std::vec::IntoIter<Vec<u8>>,
    done: bool,
}

impl<'a> Iterator for ProvidedRecords<'a> {
    type Item = Cow<'a, ProviderRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(k) = self.page.next() {
                let record = ProviderRecord::new(RecordKey::from(k), self.local, Vec::new());
                return Some(Cow::Owned(record));
            }
            if self.done {
                return None;
            }
            match self
                .store
                .dht_provided_page(self.after.as_deref(), PROVIDED_PAGE)
            {
                Ok(page) => {
                    self.done = page.len() < PROVIDED_PAGE;
                    self.after = page.last().cloned();
                    self.page = page.into_iter();
                }
                Err(e) => {
                    tracing::warn!(op = "provided", error = %e, "DHT record store");
                    self.done = true;
                }
            }
        }
    }
}

/// The record store the behaviour holds: persistent, or in memory for a node built without a
/// [`DhtStore`] (then the 1024-key cap and forgetting on restart apply).
pub enum KadStore {
    Persistent(PersistentStore),
    Memory(MemoryStore),
}

/// [`KadStore`]'s provided keys.
pub enum KadProvided<'a> {
    Persistent(ProvidedRecords<'a>),
    Memory(std::vec::IntoIter<Cow<'a, ProviderRecord>>),
}

impl<'a> Iterator for KadProvided<'a> {
    type Item = Cow<'a, ProviderRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            KadProvided::Persistent(i) => i.next(),
            KadProvided::Memory(i) => i.next(),
        }
    }
}

impl RecordStore for KadStore {
    type RecordsIter<'a> = std::vec::IntoIter<Cow<'a, Record>>;
    type ProvidedIter<'a> = KadProvided<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        match self {
            KadStore::Persistent(s) => s.get(k),
            KadStore::Memory(s) => s.get(k),
        }
    }

    fn put(&mut self, r: Record) -> store::Result<()> {
        match self {
            KadStore::Persistent(s) => s.put(r),
            KadStore::Memory(s) => s.put(r),
        }
    }

    fn remove(&mut self, k: &RecordKey) {
        match self {
            KadStore::Persistent(s) => s.remove(k),
            KadStore::Memory(s) => s.remove(k),
        }
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        match self {
            KadStore::Persistent(s) => s.records(),
            // At most `MemoryStoreConfig::max_records` (1024).
            KadStore::Memory(s) => s.records().collect::<Vec<_>>().into_iter(),
        }
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        match self {
            KadStore::Persistent(s) => s.add_provider(record),
            KadStore::Memory(s) => s.add_provider(record),
        }
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        match self {
            KadStore::Persistent(s) => s.providers(key),
            KadStore::Memory(s) => s.providers(key),
        }
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        match self {
            KadStore::Persistent(s) => KadProvided::Persistent(s.provided()),
            // At most `MemoryStoreConfig::max_provided_keys` (1024).
            KadStore::Memory(s) => {
                KadProvided::Memory(s.provided().collect::<Vec<_>>().into_iter())
            }
        }
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        match self {
            KadStore::Persistent(s) => s.remove_provider(k, p),
            KadStore::Memory(s) => s.remove_provider(k, p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn dht_expiry_round_trips_through_unix_seconds() {
        let now = Instant::now();
        let now_unix = 1_700_000_000;
        assert_eq!(to_unix(None, now, now_unix), NEVER);
        assert_eq!(to_instant(NEVER, now, now_unix), None);
        let in_48h = now + Duration::from_secs(48 * 3600);
        let u = to_unix(Some(in_48h), now, now_unix);
        assert_eq!(u, now_unix + 48 * 3600);
        assert_eq!(to_instant(u, now, now_unix), Some(in_48h));
        // Part of a second left rounds up; the past is "now" (expired).
        assert_eq!(
            to_unix(Some(now + Duration::from_millis(1)), now, now_unix),
            now_unix + 1
        );
        let past = now.checked_sub(Duration::from_secs(5)).unwrap();
        assert_eq!(to_unix(Some(past), now, now_unix), now_unix);
    }

    #[test]
    fn dht_persistent_store_keeps_local_and_remote_providers_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let local = PeerId::random();
        let remote = PeerId::random();
        let addr: Multiaddr = "/ip4/10.0.0.1/tcp/4001".parse().unwrap();
        let key = |i: u32| RecordKey::new(&i.to_be_bytes());
        {
            let mut s = PersistentStore::new(
                Store::open(dir.path()).unwrap().dht().unwrap().clone(),
                local,
            );
            for i in 0..3000 {
                s.add_provider(ProviderRecord::new(key(i), local, Vec::new()))
                    .unwrap();
            }
            let mut r = ProviderRecord::new(key(1), remote, vec![addr.clone()]);
            r.expires = Some(Instant::now() + Duration::from_secs(3600));
            s.add_provider(r).unwrap();
            // Already expired: never returned.
            let mut gone = ProviderRecord::new(key(2), remote, vec![addr.clone()]);
            gone.expires = Some(Instant::now());
            s.add_provider(gone).unwrap();
            s.put(Record::new(key(9), b"v".to_vec())).unwrap();
        }
        let s = PersistentStore::new(
            Store::open(dir.path()).unwrap().dht().unwrap().clone(),
            local,
        );
        assert_eq!(s.provided().count(), 3000);
        let mut keys: Vec<_> = s.provided().map(|r| r.key.to_vec()).collect();
        keys.dedup();
        assert_eq!(keys.len(), 3000, "pages do not repeat keys");
        let p = s.providers(&key(1));
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].provider, p[0].expires), (local, None));
        assert_eq!(p[1].provider, remote);
        assert_eq!(p[1].addresses, vec![addr]);
        let left = p[1].expires.unwrap() - Instant::now();
        assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3601));
        let p2: Vec<_> = s
            .providers(&key(2))
            .into_iter()
            .map(|p| p.provider)
            .collect();
        assert_eq!(p2, vec![local]);
        assert_eq!(s.get(&key(9)).unwrap().value, b"v");
        assert_eq!(s.records().count(), 1);
    }
}
