//! Garbage collection that can be undone (issue 11): paths a policy selects are first *hidden*
//! for a grace period — not served, not announced, not shared — and only collected once it is
//! over; `undelete` brings them back until then. A collected path leaves a *tombstone* (its
//! narinfo text and when it went), so the store can tell "collected" from "never had" and the
//! path can be looked for at peers again. The bytes come back with pack GC (`evict.rs`).
//!
//! The policy itself is pure (`crate::gc_policy`); this module gives it the facts and applies
//! its verdict.

use std::collections::{HashMap, HashSet};

use redb::{ReadableTable, ReadableTableMetadata};

use super::evict::{lock, Removal, RemovedPath};
use super::tables::{CHUNKS, HIDDEN, MANIFESTS, NARINFOS, NAR_ACCESS, PINS, TOMBSTONES};
use super::{now_unix, Store, StoreError, StoredNarInfo};
use crate::core::manifest::Manifest;
use crate::core::narinfo::NarInfo;
use crate::core::NarHash;

/// What a policy needs to know of one stored path.
#[derive(Debug, Clone)]
pub struct PathFacts {
    /// Store-path hash.
    pub hash: String,
    /// `/nix/store/<hash>-<name>`.
    pub store_path: String,
    /// Hashes of the paths it references (itself excluded).
    pub references: Vec<String>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub added_unix: u64,
    /// Last ingest or serve of its NAR (unix seconds), if recorded.
    pub last_access: Option<u64>,
    pub pinned: bool,
    /// Hidden already: (since, collectable after), unix seconds.
    pub hidden: Option<(u64, u64)>,
}

/// Where a store path stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathState {
    Stored,
    /// Not served; collected after `until` unless undeleted.
    Hidden {
        since: u64,
        until: u64,
    },
    /// Collected at `at`; its narinfo is kept.
    Collected {
        at: u64,
    },
    Unknown,
}

/// What collecting expired hidden paths did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectReport {
    pub paths: u64,
    pub nars: u64,
    pub nar_bytes: u64,
    /// Pack record bytes that became dead (reclaimed by pack GC).
    pub dead_bytes: u64,
}

impl Store {
    /// The facts of every stored path, for a GC policy. One read transaction.
    pub fn path_facts(&self) -> Result<Vec<PathFacts>, StoreError> {
        let txn = self.db.begin_read()?;
        let pins = txn.open_table(PINS)?;
        let access = txn.open_table(NAR_ACCESS)?;
        let hidden = txn.open_table(HIDDEN)?;
        let mut out = Vec::new();
        for r in txn.open_table(NARINFOS)?.iter()? {
            let (k, v) = r?;
            let hash = k.value().to_string();
            let rec = StoredNarInfo::decode(&hash, v.value())?;
            let info =
                NarInfo::parse(&rec.text).map_err(|_| StoreError::BadRecord(hash.clone()))?;
            out.push(PathFacts {
                store_path: info.store_path.to_absolute(),
                references: info
                    .references
                    .iter()
                    .map(|p| p.hash().as_str().to_string())
                    .filter(|h| *h != hash)
                    .collect(),
                nar_hash: rec.nar_hash,
                nar_size: info.nar_size,
                added_unix: rec.added_unix,
                last_access: access.get(rec.nar_hash.0)?.map(|v| v.value()),
                pinned: pins.get(hash.as_str())?.is_some(),
                hidden: hidden.get(hash.as_str())?.map(|v| v.value()),
                hash,
            });
        }
        Ok(out)
    }

    /// Compressed bytes of the chunks that only the NARs of `hashes` use: what collecting those
    /// paths would free (NARs another path names are not counted).
    pub fn freed_by(&self, hashes: &HashSet<String>) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let narinfos = txn.open_table(NARINFOS)?;
        let manifests = txn.open_table(MANIFESTS)?;
        let chunks = txn.open_table(CHUNKS)?;
        // NARs only the selected paths name.
        let mut named: HashMap<NarHash, bool> = HashMap::new();
        for r in narinfos.iter()? {
            let (k, v) = r?;
            let rec = StoredNarInfo::decode(k.value(), v.value())?;
            let selected = hashes.contains(k.value());
            let e = named.entry(rec.nar_hash).or_insert(true);
            *e &= selected;
        }
        // Chunk uses by the NARs going, against their refcounts.
        let mut uses: HashMap<[u8; 32], u32> = HashMap::new();
        for (nar, only_selected) in &named {
            if !only_selected {
                continue;
            }
            let Some(v) = manifests.get(nar.0)? else {
                continue;
            };
            let m = Manifest::decode(v.value()).map_err(|source| StoreError::BadManifest {
                nar_hash: *nar,
                source: Box::new(source),
            })?;
            for c in &m.chunks {
                *uses.entry(c.id.0).or_default() += 1;
            }
        }
        let mut freed = 0u64;
        for (id, n) in uses {
            if let Some(v) = chunks.get(id)? {
                let (_, _, comp_len, _, refcount) = v.value();
                if refcount <= n {
                    freed += u64::from(comp_len) + super::pack::RECORD_HEADER_LEN as u64;
                }
            }
        }
        Ok(freed)
    }

    /// Hides stored paths until `until` (unix seconds): not served, announced nor shared.
    /// Paths already hidden keep their dates. Returns how many were hidden now.
    pub fn hide(&self, hashes: &[String], until: u64) -> Result<u64, StoreError> {
        let _writer = lock(&self.writer);
        let now = now_unix();
        let txn = self.db.begin_write()?;
        let mut n = 0;
        {
            let narinfos = txn.open_table(NARINFOS)?;
            let mut hidden = txn.open_table(HIDDEN)?;
            for h in hashes {
                if narinfos.get(h.as_str())?.is_some() && hidden.get(h.as_str())?.is_none() {
                    hidden.insert(h.as_str(), (now, until))?;
                    n += 1;
                }
            }
        }
        txn.commit()?;
        Ok(n)
    }

    /// Brings hidden paths back (all of them when `hashes` is empty). Returns how many.
    pub fn undelete(&self, hashes: &[String]) -> Result<u64, StoreError> {
        let _writer = lock(&self.writer);
        let txn = self.db.begin_write()?;
        let mut n = 0;
        {
            let mut hidden = txn.open_table(HIDDEN)?;
            let all: Vec<String> = if hashes.is_empty() {
                hidden
                    .iter()?
                    .map(|r| r.map(|(k, _)| k.value().to_string()))
                    .collect::<Result<_, _>>()?
            } else {
                hashes.to_vec()
            };
            for h in &all {
                if hidden.remove(h.as_str())?.is_some() {
                    n += 1;
                }
            }
        }
        txn.commit()?;
        Ok(n)
    }

    /// Whether a stored path is hidden.
    pub fn is_hidden(&self, hash: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(HIDDEN)?.get(hash)?.is_some())
    }

    /// Collects the hidden paths whose grace period ended by `now`: each goes in one
    /// transaction that removes it and writes its tombstone.
    pub fn collect_hidden(&self, now: u64) -> Result<CollectReport, StoreError> {
        let due: Vec<String> = {
            let txn = self.db.begin_read()?;
            let hidden = txn.open_table(HIDDEN)?;
            let mut v = Vec::new();
            for r in hidden.iter()? {
                let (k, t) = r?;
                if t.value().1 <= now {
                    v.push(k.value().to_string());
                }
            }
            v
        };
        let mut report = CollectReport::default();
        for hash in due {
            let _writer = lock(&self.writer);
            let txn = self.db.begin_write()?;
            let removed: Option<RemovedPath> = {
                let text = txn
                    .open_table(NARINFOS)?
                    .get(hash.as_str())?
                    .map(|v| v.value().to_vec());
                if let Some(text) = &text {
                    txn.open_table(TOMBSTONES)?
                        .insert(hash.as_str(), (now, text.as_slice()))?;
                }
                txn.open_table(HIDDEN)?.remove(hash.as_str())?;
                Removal::open(&txn)?.remove(&hash)?
            };
            txn.commit()?;
            if let Some(r) = removed {
                tracing::info!(path = %hash, nar = %r.nar_hash, "collected");
                report.paths += 1;
                if r.nar_removed {
                    report.nars += 1;
                    report.nar_bytes += r.nar_size;
                }
                report.dead_bytes += r.dead_bytes;
            }
        }
        Ok(report)
    }

    /// Where a store path stands: stored, hidden, collected (tombstone) or unknown.
    pub fn path_state(&self, hash: &str) -> Result<PathState, StoreError> {
        let txn = self.db.begin_read()?;
        if let Some(v) = txn.open_table(HIDDEN)?.get(hash)? {
            let (since, until) = v.value();
            return Ok(PathState::Hidden { since, until });
        }
        if txn.open_table(NARINFOS)?.get(hash)?.is_some() {
            return Ok(PathState::Stored);
        }
        if let Some(v) = txn.open_table(TOMBSTONES)?.get(hash)? {
            return Ok(PathState::Collected { at: v.value().0 });
        }
        Ok(PathState::Unknown)
    }

    /// Counts of hidden paths and tombstones.
    pub fn retired_counts(&self) -> Result<(u64, u64), StoreError> {
        let txn = self.db.begin_read()?;
        Ok((
            txn.open_table(HIDDEN)?.len()?,
            txn.open_table(TOMBSTONES)?.len()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ingest, sample_nar};
    use super::*;

    #[test]
    fn hidden_paths_are_not_served_shared_nor_evicted_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = crate::core::signing::SecretKey::generate("test-1", [3; 32]);
        let trusted = [key.public_key()];
        let (a, b) = ("a".repeat(32), "b".repeat(32));
        ingest(&store, &a, &sample_nar(1), Some(&key), &trusted);
        ingest(&store, &b, &sample_nar(2), Some(&key), &trusted);
        assert_eq!(store.hide(std::slice::from_ref(&a), u64::MAX).unwrap(), 1);
        assert!(store.narinfo(&a).unwrap().is_none(), "not served");
        assert_eq!(
            store.shareable_paths().unwrap(),
            vec![b.clone()],
            "not shared"
        );
        // The quota takes b, never the hidden a.
        let r = store.evict_to(1).unwrap();
        assert_eq!(r.paths, 1);
        assert!(matches!(
            store.path_state(&a).unwrap(),
            PathState::Hidden { .. }
        ));
        assert_eq!(store.path_state(&b).unwrap(), PathState::Unknown);
        assert_eq!(
            store.collect_hidden(now_unix()).unwrap().paths,
            0,
            "grace not over"
        );
        assert_eq!(store.undelete(&[]).unwrap(), 1);
        assert!(store.narinfo(&a).unwrap().is_some());
        // Hidden with a grace period already over: collected, with a tombstone.
        store.hide(std::slice::from_ref(&a), 0).unwrap();
        let c = store.collect_hidden(now_unix()).unwrap();
        assert_eq!((c.paths, c.nars), (1, 1));
        assert!(matches!(
            store.path_state(&a).unwrap(),
            PathState::Collected { .. }
        ));
        assert_eq!(store.retired_counts().unwrap(), (0, 1));
        assert!(store.verify(|_| {}).unwrap().is_empty());
    }
}
