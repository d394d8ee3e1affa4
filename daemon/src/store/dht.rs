//! The DHT's records, in their own database `<data-dir>/dht.redb` (design §3, §4): the keys
//! this node provides, other peers' provider records, and Kademlia value records, so none of
//! it is forgotten on restart.
//!
//! [`DhtStore`] owns `dht.redb` and its `dht-*` tables (see [`super::tables`]); knows nothing
//! of libp2p: keys, peer ids and addresses are opaque bytes here and `net::record_store`
//! converts them. `kad` calls these methods synchronously on the swarm task, so every method
//! is one short redb transaction, and the records live apart from the index (`index.redb`): a
//! redb database has one writer, and the index's is held by ingest commits and eviction
//! batches for as long as they take; the swarm must never wait on them.
//! [`Store`](super::Store) opens the `DhtStore` with the index and hands it out as an `Arc`
//! ([`Store::dht`](super::Store::dht)), so the record store never holds the `Store` itself.
//!
//! Invariants:
//! - what other peers can make us store is bounded ([`DhtLimits`]): providers per key, remote
//!   provider records in total, addresses per record, value records and their size; the keys
//!   this node provides itself are not bounded;
//! - expiry is stored as unix seconds ([`NEVER`] for none); an expired remote record is never
//!   returned, and is deleted by the next write to its key or by
//!   [`DhtStore::purge_expired_dht`];
//! - writes are committed without fsync (losing the last few on a crash is harmless: they are
//!   re-announced), with a durable commit every [`DURABLE_EVERY`] writes, at each purge and
//!   when the `DhtStore` is dropped, so redb frees pages;
//! - a data directory from before `dht.redb` existed had these tables in `index.redb`: on open
//!   (`migrate_from_index`) the node's own provided keys are copied over once and the old
//!   tables are deleted from the index; other peers' records are dropped (they are
//!   re-announced).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use redb::{
    Database, Durability, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition,
};

use super::tables::{DHT_PROVIDED, DHT_PROVIDERS, DHT_RECORDS};
use super::StoreError;

/// File name of the DHT database in the data directory.
pub const DHT_DB: &str = "dht.redb";

/// Expiry of a record that does not expire.
pub const NEVER: u64 = u64::MAX;

/// One DHT write in this many is committed durably (the others skip the fsync).
pub const DURABLE_EVERY: u32 = 512;

/// Expired remote provider records deleted per write transaction by a purge.
const PURGE_BATCH: usize = 4096;

/// Provided keys copied per write transaction by [`migrate_from_index`].
const MIGRATE_BATCH: usize = 16 * 1024;

/// Bounds on what remote peers can make this node store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhtLimits {
    /// Provider records kept per key (kad's replication factor); further providers are
    /// ignored while these are alive (new providers cannot evict old ones: Sybil floods).
    pub max_providers_per_key: usize,
    /// Remote provider records in total; past it new ones are refused.
    pub max_remote_providers: u64,
    /// Addresses kept per provider record (the rest are dropped).
    pub max_addrs_per_provider: usize,
    /// Longest address kept, in bytes.
    pub max_addr_bytes: usize,
    /// Value records in total.
    pub max_records: u64,
    /// Largest record value, in bytes.
    pub max_value_bytes: usize,
}

impl Default for DhtLimits {
    fn default() -> Self {
        Self {
            max_providers_per_key: 20,
            max_remote_providers: 250_000,
            max_addrs_per_provider: 8,
            max_addr_bytes: 256,
            max_records: 1024,
            max_value_bytes: 65 * 1024,
        }
    }
}

/// A provider record of another peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteProvider {
    /// Peer id bytes.
    pub peer: Vec<u8>,
    /// Unix seconds, or [`NEVER`].
    pub expires_unix: u64,
    /// Multiaddr bytes.
    pub addrs: Vec<Vec<u8>>,
}

/// A DHT value record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhtRecord {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Peer id bytes of the original publisher.
    pub publisher: Option<Vec<u8>>,
    /// Unix seconds, or [`NEVER`].
    pub expires_unix: u64,
}

/// What a DHT write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhtWrite {
    /// Stored (new or updated).
    Stored,
    /// Not stored: the key already has its maximum of live providers (not an error for kad).
    KeyFull,
    /// Not stored: the store holds its maximum of remote records.
    Full,
    /// Not stored: the value is over [`DhtLimits::max_value_bytes`].
    TooLarge,
}

/// Row counts of the DHT tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DhtCounts {
    /// Keys this node provides.
    pub provided: u64,
    /// Remote provider records (expired ones included until purged).
    pub remote_providers: u64,
    /// Value records.
    pub records: u64,
}

fn expired(expires_unix: u64, now: u64) -> bool {
    expires_unix <= now
}

fn encode_addrs(addrs: &[Vec<u8>], limits: &DhtLimits) -> Vec<u8> {
    let mut out = Vec::new();
    for a in addrs
        .iter()
        .filter(|a| !a.is_empty() && a.len() <= limits.max_addr_bytes.min(u16::MAX as usize))
        .take(limits.max_addrs_per_provider)
    {
        out.extend_from_slice(&(a.len() as u16).to_be_bytes());
        out.extend_from_slice(a);
    }
    out
}

/// Decodes what [`encode_addrs`] wrote; a damaged tail is dropped.
fn decode_addrs(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let len = u16::from_be_bytes([b[0], b[1]]) as usize;
        let Some(addr) = b.get(2..2 + len) else {
            break;
        };
        out.push(addr.to_vec());
        b = &b[2 + len..];
    }
    out
}

/// A `DHT_RECORDS` row as a record.
fn record_of(key: &[u8], (expires_unix, publisher, value): (u64, &[u8], &[u8])) -> DhtRecord {
    DhtRecord {
        key: key.to_vec(),
        value: value.to_vec(),
        publisher: (!publisher.is_empty()).then(|| publisher.to_vec()),
        expires_unix,
    }
}

/// The first possible (key, peer) pair of `key` in `DHT_PROVIDERS`.
fn key_start(key: &[u8]) -> (&[u8], &[u8]) {
    (key, &[])
}

/// Opens a table in a read transaction; a table no write has created yet reads as absent.
fn read_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, StoreError> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The DHT database `<data-dir>/dht.redb`; see the module docs.
pub struct DhtStore {
    path: PathBuf,
    db: Database,
    /// Write transactions begun, for [`DURABLE_EVERY`].
    writes: AtomicU32,
    /// A commit without fsync happened since the last durable one.
    dirty: AtomicBool,
}

impl std::fmt::Debug for DhtStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhtStore")
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for DhtStore {
    fn drop(&mut self) {
        if self.dirty.load(Ordering::Acquire) {
            if let Err(e) = self.begin_write(true).and_then(|txn| Ok(txn.commit()?)) {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "DHT records: last writes not synced");
            }
        }
    }
}

impl DhtStore {
    /// Opens (creating if needed) `dht.redb` in the data directory `dir`. Another process
    /// holding it is [`StoreError::Locked`].
    pub(super) fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(DHT_DB);
        let db = super::open_database(
            &path,
            dir,
            "start again: the DHT records are learnt anew from the network",
        )?;
        Ok(Self {
            path,
            db,
            writes: AtomicU32::new(0),
            dirty: AtomicBool::new(false),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A write transaction; `durable` or not. Called with the database's writer held from
    /// `begin_write` on, so `dirty` cannot be cleared while another write is in flight.
    fn begin_write(&self, durable: bool) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write()?;
        if durable {
            // This commit persists every earlier non-durable one.
            self.dirty.store(false, Ordering::Release);
        } else {
            txn.set_durability(Durability::None);
            self.dirty.store(true, Ordering::Release);
        }
        Ok(txn)
    }

    /// A write transaction for a single DHT write: without fsync, except one in
    /// [`DURABLE_EVERY`].
    fn begin_dht_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let n = self.writes.fetch_add(1, Ordering::Relaxed);
        self.begin_write(n.wrapping_rem(DURABLE_EVERY) == 0)
    }

    /// Records that this node provides `key`. Answers whether it is new; a key already
    /// provided costs one read transaction, no write.
    pub fn dht_provide(&self, key: &[u8], now: u64) -> Result<bool, StoreError> {
        if self.dht_is_provided(key)? {
            return Ok(false);
        }
        let txn = self.begin_dht_write()?;
        let new = txn.open_table(DHT_PROVIDED)?.insert(key, now)?.is_none();
        txn.commit()?;
        Ok(new)
    }

    /// Deletes one row of a DHT table; answers whether there was one.
    fn dht_delete<'k, K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        table: TableDefinition<K, V>,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
    ) -> Result<bool, StoreError> {
        let txn = self.begin_dht_write()?;
        let was = txn.open_table(table)?.remove(key)?.is_some();
        txn.commit()?;
        Ok(was)
    }

    /// Stops providing `key`; answers whether it was provided.
    pub fn dht_unprovide(&self, key: &[u8]) -> Result<bool, StoreError> {
        self.dht_delete(DHT_PROVIDED, key)
    }

    /// Stops providing every key (a node that no longer shares with everyone); answers how
    /// many were provided.
    pub fn dht_unprovide_all(&self) -> Result<u64, StoreError> {
        let txn = self.begin_write(true)?;
        let n = {
            let mut t = txn.open_table(DHT_PROVIDED)?;
            let n = t.len()?;
            t.retain(|_, _| false)?;
            n
        };
        txn.commit()?;
        Ok(n)
    }

    pub fn dht_is_provided(&self, key: &[u8]) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let Some(t) = read_table(&txn, DHT_PROVIDED)? else {
            return Ok(false);
        };
        Ok(t.get(key)?.is_some())
    }

    /// Up to `limit` provided keys in key order, strictly after `after` (from the first when
    /// `None`): page through all of them without holding them all.
    pub fn dht_provided_page(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let Some(t) = read_table(&txn, DHT_PROVIDED)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        let range = match after {
            Some(a) => {
                t.range::<&[u8]>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))?
            }
            None => t.range::<&[u8]>(..)?,
        };
        for r in range.take(limit) {
            out.push(r?.0.value().to_vec());
        }
        Ok(out)
    }

    /// Stores (or refreshes) a remote provider record of `key`, within `limits`. Expired
    /// records of the key are deleted first, so they do not hold its places.
    pub fn dht_add_provider(
        &self,
        key: &[u8],
        provider: &RemoteProvider,
        limits: &DhtLimits,
        now: u64,
    ) -> Result<DhtWrite, StoreError> {
        if expired(provider.expires_unix, now) {
            return Ok(DhtWrite::Stored);
        }
        let addrs = encode_addrs(&provider.addrs, limits);
        let txn = self.begin_dht_write()?;
        let outcome = {
            let mut t = txn.open_table(DHT_PROVIDERS)?;
            let this = (key, provider.peer.as_slice());
            if t.get(this)?.is_some() {
                t.insert(this, (provider.expires_unix, addrs.as_slice()))?;
                DhtWrite::Stored
            } else {
                let mut live = 0;
                let mut dead = Vec::new();
                for r in t.range(key_start(key)..)? {
                    let (k, v) = r?;
                    let (k_key, k_peer) = k.value();
                    if k_key != key {
                        break;
                    }
                    if expired(v.value().0, now) {
                        dead.push(k_peer.to_vec());
                    } else {
                        live += 1;
                    }
                }
                for peer in &dead {
                    t.remove((key, peer.as_slice()))?;
                }
                if live >= limits.max_providers_per_key {
                    DhtWrite::KeyFull
                } else if t.len()? >= limits.max_remote_providers {
                    DhtWrite::Full
                } else {
                    t.insert(this, (provider.expires_unix, addrs.as_slice()))?;
                    DhtWrite::Stored
                }
            }
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// The live remote provider records of `key`.
    pub fn dht_providers(&self, key: &[u8], now: u64) -> Result<Vec<RemoteProvider>, StoreError> {
        let txn = self.db.begin_read()?;
        let Some(t) = read_table(&txn, DHT_PROVIDERS)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for r in t.range(key_start(key)..)? {
            let (k, v) = r?;
            let (k_key, peer) = k.value();
            if k_key != key {
                break;
            }
            let (expires_unix, addrs) = v.value();
            if !expired(expires_unix, now) {
                out.push(RemoteProvider {
                    peer: peer.to_vec(),
                    expires_unix,
                    addrs: decode_addrs(addrs),
                });
            }
        }
        Ok(out)
    }

    /// Deletes a remote provider record; answers whether there was one.
    pub fn dht_remove_provider(&self, key: &[u8], peer: &[u8]) -> Result<bool, StoreError> {
        self.dht_delete(DHT_PROVIDERS, (key, peer))
    }

    /// Stores (or replaces) a value record, within `limits`.
    pub fn dht_put_record(
        &self,
        record: &DhtRecord,
        limits: &DhtLimits,
    ) -> Result<DhtWrite, StoreError> {
        if record.value.len() > limits.max_value_bytes {
            return Ok(DhtWrite::TooLarge);
        }
        let publisher = record.publisher.as_deref().unwrap_or_default();
        let txn = self.begin_dht_write()?;
        let outcome = {
            let mut t = txn.open_table(DHT_RECORDS)?;
            let key = record.key.as_slice();
            if t.get(key)?.is_none() && t.len()? >= limits.max_records {
                DhtWrite::Full
            } else {
                t.insert(
                    key,
                    (record.expires_unix, publisher, record.value.as_slice()),
                )?;
                DhtWrite::Stored
            }
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// The value record of `key`, unless expired.
    pub fn dht_record(&self, key: &[u8], now: u64) -> Result<Option<DhtRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let Some(t) = read_table(&txn, DHT_RECORDS)? else {
            return Ok(None);
        };
        let Some(v) = t.get(key)? else {
            return Ok(None);
        };
        Ok(Some(record_of(key, v.value())).filter(|r| !expired(r.expires_unix, now)))
    }

    /// Every live value record (at most [`DhtLimits::max_records`] of them).
    pub fn dht_records(&self, now: u64) -> Result<Vec<DhtRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let Some(t) = read_table(&txn, DHT_RECORDS)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for r in t.iter()? {
            let (k, v) = r?;
            let record = record_of(k.value(), v.value());
            if !expired(record.expires_unix, now) {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Deletes a value record; answers whether there was one.
    pub fn dht_remove_record(&self, key: &[u8]) -> Result<bool, StoreError> {
        self.dht_delete(DHT_RECORDS, key)
    }

    pub fn dht_counts(&self) -> Result<DhtCounts, StoreError> {
        let txn = self.db.begin_read()?;
        let len = |n: Option<u64>| n.unwrap_or(0);
        Ok(DhtCounts {
            provided: len(read_table(&txn, DHT_PROVIDED)?
                .map(|t| t.len())
                .transpose()?),
            remote_providers: len(read_table(&txn, DHT_PROVIDERS)?
                .map(|t| t.len())
                .transpose()?),
            records: len(read_table(&txn, DHT_RECORDS)?
                .map(|t| t.len())
                .transpose()?),
        })
    }

    /// Deletes every expired remote provider record and value record; answers how many. Works
    /// in batches of short transactions (the swarm task writes between them), each durable.
    pub fn purge_expired_dht(&self, now: u64) -> Result<u64, StoreError> {
        let mut purged = 0;
        // Provider records: scan a page in a read transaction, delete it in a write one.
        let mut after: Option<(Vec<u8>, Vec<u8>)> = None;
        loop {
            let (dead, next) = {
                let txn = self.db.begin_read()?;
                let Some(t) = read_table(&txn, DHT_PROVIDERS)? else {
                    break;
                };
                let mut dead = Vec::new();
                let mut last = None;
                let range = match &after {
                    Some((k, p)) => t.range::<(&[u8], &[u8])>((
                        std::ops::Bound::Excluded((k.as_slice(), p.as_slice())),
                        std::ops::Bound::Unbounded,
                    ))?,
                    None => t.range::<(&[u8], &[u8])>(..)?,
                };
                for (seen, r) in range.enumerate() {
                    let (k, v) = r?;
                    let (key, peer) = k.value();
                    if expired(v.value().0, now) {
                        dead.push((key.to_vec(), peer.to_vec()));
                    }
                    if dead.len() >= PURGE_BATCH || seen >= 16 * PURGE_BATCH {
                        last = Some((key.to_vec(), peer.to_vec()));
                        break;
                    }
                }
                (dead, last)
            };
            if !dead.is_empty() {
                let txn = self.begin_write(true)?;
                {
                    let mut t = txn.open_table(DHT_PROVIDERS)?;
                    for (key, peer) in &dead {
                        // Re-checked: the peer may have re-announced since the scan.
                        let gone = t
                            .get((key.as_slice(), peer.as_slice()))?
                            .is_some_and(|v| expired(v.value().0, now));
                        if gone {
                            t.remove((key.as_slice(), peer.as_slice()))?;
                            purged += 1;
                        }
                    }
                }
                txn.commit()?;
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        // Value records: few (bounded by `max_records`), one transaction.
        let txn = self.begin_write(true)?;
        {
            let mut t = txn.open_table(DHT_RECORDS)?;
            let before = t.len()?;
            t.retain(|_, v| !expired(v.0, now))?;
            purged += before - t.len()?;
        }
        txn.commit()?;
        Ok(purged)
    }
}

/// Moves the DHT tables of an index from before `dht.redb` existed: copies the node's own
/// provided keys into `dht` (keys already there are kept), then deletes the `dht-*` tables
/// from `index`; other peers' records are dropped (they are re-announced). Answers how many
/// keys were copied. Nothing to do (one read transaction) once the tables are gone; a crash
/// midway copies again on the next open.
pub(super) fn migrate_from_index(index: &Database, dht: &DhtStore) -> Result<u64, StoreError> {
    {
        let txn = index.begin_read()?;
        let present = read_table(&txn, DHT_PROVIDED)?.is_some()
            || read_table(&txn, DHT_PROVIDERS)?.is_some()
            || read_table(&txn, DHT_RECORDS)?.is_some();
        if !present {
            return Ok(0);
        }
    }
    let mut copied = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page: Vec<(Vec<u8>, u64)> = {
            let txn = index.begin_read()?;
            let Some(t) = read_table(&txn, DHT_PROVIDED)? else {
                break;
            };
            let range = match &after {
                Some(a) => t.range::<&[u8]>((
                    std::ops::Bound::Excluded(a.as_slice()),
                    std::ops::Bound::Unbounded,
                ))?,
                None => t.range::<&[u8]>(..)?,
            };
            range
                .take(MIGRATE_BATCH)
                .map(|r| r.map(|(k, v)| (k.value().to_vec(), v.value())))
                .collect::<Result<_, _>>()?
        };
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        let txn = dht.begin_write(true)?;
        {
            let mut t = txn.open_table(DHT_PROVIDED)?;
            for (key, since) in &page {
                if t.get(key.as_slice())?.is_none() {
                    t.insert(key.as_slice(), since)?;
                    copied += 1;
                }
            }
        }
        txn.commit()?;
        if page.len() < MIGRATE_BATCH {
            break;
        }
    }
    let txn = index.begin_write()?;
    txn.delete_table(DHT_PROVIDED)?;
    txn.delete_table(DHT_PROVIDERS)?;
    txn.delete_table(DHT_RECORDS)?;
    txn.commit()?;
    tracing::info!(provided_keys = copied, path = %dht.path().display(),
        "DHT records moved out of the index");
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::Store;
    use super::*;

    /// The DHT database of a store in `dir` (the index is closed again at once).
    fn open(dir: &Path) -> Arc<DhtStore> {
        Store::open(dir).unwrap().dht().unwrap().clone()
    }

    fn key(i: u32) -> Vec<u8> {
        let mut k = vec![0x12, 0x20];
        k.extend_from_slice(&[0; 28]);
        k.extend_from_slice(&i.to_be_bytes());
        k
    }

    fn remote(peer: u8, expires_unix: u64) -> RemoteProvider {
        RemoteProvider {
            peer: vec![0, 36, peer],
            expires_unix,
            addrs: vec![vec![4, 127, 0, 0, peer, 6, 0x1c, 0x20]],
        }
    }

    const NOW: u64 = 1_000_000;

    #[test]
    fn dht_provided_keys_page_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // Before any write the tables do not exist: reads are empty, not errors.
        assert_eq!(store.dht_counts().unwrap(), DhtCounts::default());
        assert!(store.dht_provided_page(None, 10).unwrap().is_empty());
        assert!(store.dht_providers(&key(1), NOW).unwrap().is_empty());
        assert_eq!(store.dht_record(&key(1), NOW).unwrap(), None);

        for i in 0..2500 {
            assert!(store.dht_provide(&key(i), NOW).unwrap());
        }
        assert!(
            !store.dht_provide(&key(7), NOW).unwrap(),
            "already provided"
        );
        assert!(store.dht_unprovide(&key(7)).unwrap());
        assert!(!store.dht_unprovide(&key(7)).unwrap());
        drop(store);

        let store = open(dir.path());
        assert_eq!(store.dht_counts().unwrap().provided, 2499);
        let mut all = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = store.dht_provided_page(after.as_deref(), 1000).unwrap();
            assert!(page.len() <= 1000);
            let Some(last) = page.last() else { break };
            after = Some(last.clone());
            all.extend(page);
        }
        let expected: Vec<_> = (0..2500).filter(|&i| i != 7).map(key).collect();
        assert_eq!(all, expected);
        assert!(store.dht_is_provided(&key(2499)).unwrap());
        assert!(!store.dht_is_provided(&key(7)).unwrap());

        // A node that stops sharing with everyone provides nothing any more, after a reopen too.
        assert_eq!(store.dht_unprovide_all().unwrap(), 2499);
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.dht_counts().unwrap().provided, 0);
        assert!(!store.dht_is_provided(&key(2499)).unwrap());
        assert_eq!(store.dht_unprovide_all().unwrap(), 0);
    }

    #[test]
    fn dht_remote_providers_expire_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let limits = DhtLimits::default();
        let k = key(1);
        let w = |p: &RemoteProvider| store.dht_add_provider(&k, p, &limits, NOW).unwrap();
        assert_eq!(w(&remote(1, NOW + 100)), DhtWrite::Stored);
        assert_eq!(w(&remote(2, NOW + 10)), DhtWrite::Stored);
        assert_eq!(w(&remote(3, NEVER)), DhtWrite::Stored);
        // An expired record is not stored at all.
        assert_eq!(w(&remote(4, NOW)), DhtWrite::Stored);
        // A different key next to it is not mixed in.
        store
            .dht_add_provider(&key(2), &remote(9, NOW + 100), &limits, NOW)
            .unwrap();
        drop(store);

        let store = open(dir.path());
        let got = store.dht_providers(&k, NOW).unwrap();
        assert_eq!(
            got,
            vec![remote(1, NOW + 100), remote(2, NOW + 10), remote(3, NEVER)]
        );
        // Ten seconds later record 2 has expired: not returned, then purged.
        let later = NOW + 10;
        let peers: Vec<_> = store
            .dht_providers(&k, later)
            .unwrap()
            .into_iter()
            .map(|p| p.peer[2])
            .collect();
        assert_eq!(peers, vec![1, 3]);
        assert_eq!(store.dht_counts().unwrap().remote_providers, 4);
        assert_eq!(store.purge_expired_dht(later).unwrap(), 1);
        assert_eq!(store.dht_counts().unwrap().remote_providers, 3);
        assert!(store.dht_remove_provider(&k, &remote(1, 0).peer).unwrap());
        assert!(!store.dht_remove_provider(&k, &remote(1, 0).peer).unwrap());
        assert_eq!(
            store.dht_providers(&k, later).unwrap(),
            vec![remote(3, NEVER)]
        );
    }

    #[test]
    fn dht_remote_limits_hold() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let limits = DhtLimits {
            max_providers_per_key: 5,
            max_remote_providers: 12,
            max_addrs_per_provider: 2,
            ..DhtLimits::default()
        };
        let k = key(1);
        let outcomes: Vec<_> = (0..50)
            .map(|p| {
                store
                    .dht_add_provider(&k, &remote(p, NOW + 100), &limits, NOW)
                    .unwrap()
            })
            .collect();
        assert_eq!(&outcomes[..5], &[DhtWrite::Stored; 5]);
        assert!(outcomes[5..].iter().all(|o| *o == DhtWrite::KeyFull));
        assert_eq!(store.dht_providers(&k, NOW).unwrap().len(), 5);
        // A known provider may still refresh its record.
        assert_eq!(
            store
                .dht_add_provider(&k, &remote(0, NOW + 500), &limits, NOW)
                .unwrap(),
            DhtWrite::Stored
        );
        // Once the old ones expire, their places are free again.
        let later = NOW + 100;
        assert_eq!(
            store
                .dht_add_provider(&k, &remote(77, later + 100), &limits, later)
                .unwrap(),
            DhtWrite::Stored
        );
        assert_eq!(store.dht_providers(&k, later).unwrap().len(), 2);

        // The total cap: 2 rows so far, 10 more fit over other keys, then refusal.
        let mut stored = 0;
        let mut full = 0;
        for i in 2..20u32 {
            for p in 0..3 {
                match store
                    .dht_add_provider(&key(i), &remote(p, NOW + 1000), &limits, NOW)
                    .unwrap()
                {
                    DhtWrite::Stored => stored += 1,
                    DhtWrite::Full => full += 1,
                    o => panic!("{o:?}"),
                }
            }
        }
        assert_eq!(stored, 10);
        assert_eq!(full, 18 * 3 - 10);
        assert_eq!(store.dht_counts().unwrap().remote_providers, 12);

        // Addresses are capped too.
        let mut many = remote(1, NOW + 100);
        many.addrs = (0..10).map(|i| vec![i; 8]).collect();
        many.addrs.insert(0, vec![1; 1000]);
        store
            .dht_add_provider(&key(1000), &many, &DhtLimits::default(), NOW)
            .unwrap();
        let got = store.dht_providers(&key(1000), NOW).unwrap();
        assert_eq!(got[0].addrs, (0..8).map(|i| vec![i; 8]).collect::<Vec<_>>());
    }

    #[test]
    fn dht_value_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let limits = DhtLimits {
            max_records: 2,
            max_value_bytes: 10,
            ..DhtLimits::default()
        };
        let rec = |i: u32, expires_unix: u64| DhtRecord {
            key: key(i),
            value: vec![i as u8; 4],
            publisher: (i == 2).then(|| vec![1, 2, 3]),
            expires_unix,
        };
        assert_eq!(
            store.dht_put_record(&rec(1, NEVER), &limits).unwrap(),
            DhtWrite::Stored
        );
        assert_eq!(
            store.dht_put_record(&rec(2, NOW + 5), &limits).unwrap(),
            DhtWrite::Stored
        );
        assert_eq!(
            store.dht_put_record(&rec(3, NEVER), &limits).unwrap(),
            DhtWrite::Full
        );
        let mut big = rec(1, NEVER);
        big.value = vec![0; 11];
        assert_eq!(
            store.dht_put_record(&big, &limits).unwrap(),
            DhtWrite::TooLarge
        );
        // Replacing an existing key is not "more records".
        assert_eq!(
            store.dht_put_record(&rec(2, NOW + 5), &limits).unwrap(),
            DhtWrite::Stored
        );
        assert_eq!(store.dht_record(&key(1), NOW).unwrap(), Some(rec(1, NEVER)));
        assert_eq!(
            store.dht_record(&key(2), NOW).unwrap(),
            Some(rec(2, NOW + 5))
        );
        assert_eq!(store.dht_record(&key(2), NOW + 5).unwrap(), None);
        assert_eq!(store.dht_records(NOW + 5).unwrap(), vec![rec(1, NEVER)]);
        assert_eq!(store.purge_expired_dht(NOW + 5).unwrap(), 1);
        assert_eq!(store.dht_counts().unwrap().records, 1);
        assert!(store.dht_remove_record(&key(1)).unwrap());
        assert_eq!(store.dht_records(NOW).unwrap(), vec![]);
    }

    #[test]
    fn dht_tables_in_an_old_index_move_to_dht_redb() {
        const KEYS: u32 = MIGRATE_BATCH as u32 * 2 + 7;
        let dir = tempfile::tempdir().unwrap();
        {
            // What an older version left: the dht-* tables in index.redb.
            let store = Store::open(dir.path()).unwrap();
            // As if a migration had been cut short: a key already in dht.redb is kept.
            store.dht().unwrap().dht_provide(&key(3), 7).unwrap();
            let txn = store.db.begin_write().unwrap();
            {
                let mut provided = txn.open_table(DHT_PROVIDED).unwrap();
                for i in 0..KEYS {
                    provided
                        .insert(key(i).as_slice(), NOW + u64::from(i))
                        .unwrap();
                }
                let mut providers = txn.open_table(DHT_PROVIDERS).unwrap();
                providers
                    .insert(
                        (key(1).as_slice(), [1, 2].as_slice()),
                        (NEVER, [].as_slice()),
                    )
                    .unwrap();
                let mut records = txn.open_table(DHT_RECORDS).unwrap();
                records
                    .insert(key(1).as_slice(), (NEVER, [].as_slice(), [9].as_slice()))
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let counts = DhtCounts {
            provided: u64::from(KEYS),
            remote_providers: 0,
            records: 0,
        };
        assert_eq!(store.dht().unwrap().dht_counts().unwrap(), counts);
        let first = store.dht().unwrap().dht_provided_page(None, 2).unwrap();
        assert_eq!(first, vec![key(0), key(1)]);
        assert!(store
            .dht()
            .unwrap()
            .dht_is_provided(&key(KEYS - 1))
            .unwrap());
        {
            let txn = store.dht().unwrap().db.begin_read().unwrap();
            let t = read_table(&txn, DHT_PROVIDED).unwrap().unwrap();
            assert_eq!(t.get(key(3).as_slice()).unwrap().unwrap().value(), 7);
            assert_eq!(t.get(key(4).as_slice()).unwrap().unwrap().value(), NOW + 4);
        }
        // The index no longer has the tables.
        {
            let txn = store.db.begin_read().unwrap();
            assert!(read_table(&txn, DHT_PROVIDED).unwrap().is_none());
            assert!(read_table(&txn, DHT_PROVIDERS).unwrap().is_none());
            assert!(read_table(&txn, DHT_RECORDS).unwrap().is_none());
        }
        drop(store);
        // Once moved, nothing happens again.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.dht().unwrap().dht_counts().unwrap(), counts);
        assert_eq!(
            migrate_from_index(&store.db, store.dht().unwrap()).unwrap(),
            0
        );
    }
}
