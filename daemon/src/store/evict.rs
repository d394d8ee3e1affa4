//! Eviction, pins, last access and pack GC (design §3 "Eviction / GC"; `docs/storage.md`).
//!
//! Owns the `pins-v1`, `nar-access-v1` and `pack-dead-v1` tables and the `dead_bytes` counter.
//! Must not: evict a NAR that a pinned store path names; delete a pack before the index
//! commit that moved its live records away; let the counters drift from the tables.
//!
//! - **Last access** (`touch`): kept in memory and written in one transaction once
//!   [`TOUCH_FLUSH_INTERVAL`] has passed since the last write or [`TOUCH_MAX_PENDING`] NARs are
//!   waiting, before every eviction and when the store is dropped. A crash loses at most those
//!   few seconds of access order, never data.
//! - **Eviction** (`evict_to`): least-recently-used unpinned NARs go first (all store paths
//!   naming a NAR go with it) until what would be left after a pack GC is below 90 % of the
//!   target, then packs are compacted, most dead first, until the data directory is that small.
//! - **Pack GC** (`gc_packs`): live records of a pack are copied (checked, not recompressed) to
//!   the pack being appended to and fsynced; one transaction repoints their chunk rows and
//!   forgets the old pack; only then is the old pack deleted. A crash before the commit leaves
//!   an uncommitted tail (truncated on open); after it, an orphan pack (deleted on open).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use redb::{ReadTransaction, ReadableTable, WriteTransaction};

use super::pack::{self, Location, PackWriter, FILE_HEADER};
use super::tables::*;
use super::{
    add_counter, io_err, loc_of, new_dctx, now_unix, release_manifest, NarInfo, Store, StoreError,
    StoredNarInfo,
};
use crate::core::{ChunkId, NarHash};

/// Touches are written at least this often (when touches keep coming).
pub const TOUCH_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// … or as soon as this many NARs have been touched since the last write.
pub const TOUCH_MAX_PENDING: usize = 1024;
/// Eviction aims this far below its target (per mille), so that the next few ingests do not
/// trigger it again at once.
const EVICT_AIM_PER_MILLE: u64 = 900;
/// NARs removed per write transaction while evicting.
const EVICT_BATCH: usize = 256;

/// Whether an ingested store path may be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Local and explicit (uploads, `import`): pinned, never evicted until unpinned.
    Pinned,
    /// Fetched from peers or upstreams: a cache entry, evicted least-recently-used first.
    Cache,
}

/// Which packs a pack GC compacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcPolicy {
    /// Packs less than half live: the routine, cheap reclaim (little copying per byte freed).
    Sparse,
    /// Every pack holding dead bytes (`nix-p2p-cache gc`).
    AllDead,
    /// Packs with the most dead bytes first, until the data directory is at most this size.
    ToSize(u64),
}

/// What `remove_path` removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedPath {
    pub nar_hash: NarHash,
    /// The NAR went too (no other store path named it).
    pub nar_removed: bool,
    pub nar_size: u64,
    /// Chunks that no NAR uses any more (removed from the index).
    pub chunks_removed: u64,
    /// Pack record bytes that became dead (reclaimed by the next pack GC).
    pub dead_bytes: u64,
}

/// What a pack GC did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Packs compacted (their live records moved, the file deleted).
    pub packs: u64,
    pub records_copied: u64,
    pub bytes_copied: u64,
    /// How much smaller the packs are on disk.
    pub bytes_reclaimed: u64,
    /// Packs left alone because a record could not be read back intact (see `verify`).
    pub skipped: Vec<String>,
    pub elapsed: Duration,
}

/// What an eviction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictReport {
    pub target: u64,
    /// Data directory size (packs + index) before and after, as `Stats::cache_bytes`.
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub paths: u64,
    pub nars: u64,
    pub nar_bytes: u64,
    pub chunks: u64,
    pub gc: GcReport,
}

/// Last-access times waiting to be written.
#[derive(Debug)]
pub(super) struct Touches {
    pending: HashMap<NarHash, u64>,
    last_flush: Instant,
}

impl Default for Touches {
    fn default() -> Self {
        Self {
            pending: HashMap::new(),
            last_flush: Instant::now(),
        }
    }
}

/// Adds `delta` dead bytes to a pack and to the total.
pub(super) fn add_dead(
    dead: &mut redb::Table<u32, u64>,
    counters: &mut redb::Table<&str, u64>,
    pack: u32,
    delta: i64,
) -> Result<(), StoreError> {
    let cur = dead.get(pack)?.map(|v| v.value()).unwrap_or(0);
    dead.insert(pack, cur.saturating_add_signed(delta))?;
    add_counter(counters, C_DEAD_BYTES, delta)
}

/// The tables a pack rewrite (pack GC, compaction) changes in its commit: chunks pointed at
/// their new records, pack lengths, and the old packs forgotten.
pub(super) struct Repoint<'t> {
    chunks: redb::Table<'t, [u8; 32], (u32, u64, u32, u32, u32)>,
    packs: redb::Table<'t, u32, u64>,
    pub(super) dead: redb::Table<'t, u32, u64>,
    pub(super) counters: redb::Table<'t, &'static str, u64>,
    compacted: redb::Table<'t, u32, u8>,
}

impl<'t> Repoint<'t> {
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            chunks: txn.open_table(CHUNKS)?,
            packs: txn.open_table(PACKS)?,
            dead: txn.open_table(PACK_DEAD)?,
            counters: txn.open_table(COUNTERS)?,
            compacted: txn.open_table(COMPACTED_PACKS)?,
        })
    }

    /// Points chunk `id` from its record at `old` to the copy at `new`; `false` (the copy
    /// counted dead) if the chunk was released or moved meanwhile.
    pub(super) fn move_chunk(
        &mut self,
        id: &ChunkId,
        old: &Location,
        new: &Location,
    ) -> Result<bool, StoreError> {
        let row = self.chunks.get(id.0)?.map(|v| v.value());
        match row {
            Some(v) if v.0 == old.pack && v.1 == old.offset => {
                self.chunks
                    .insert(id.0, (new.pack, new.offset, new.comp_len, new.raw_len, v.4))?;
                Ok(true)
            }
            _ => {
                add_dead(
                    &mut self.dead,
                    &mut self.counters,
                    new.pack,
                    new.record_len() as i64,
                )?;
                Ok(false)
            }
        }
    }

    /// Records the lengths of the packs written to.
    pub(super) fn set_lengths(&mut self, lengths: &[(u32, u64)]) -> Result<(), StoreError> {
        for &(pack, len) in lengths {
            self.packs.insert(pack, len)?;
        }
        Ok(())
    }

    /// Marks a pack as written by compaction at `level`.
    pub(super) fn set_compacted(&mut self, pack: u32, level: u8) -> Result<(), StoreError> {
        self.compacted.insert(pack, level)?;
        Ok(())
    }

    /// Forgets a pack nothing points into any more (its file is deleted after the commit).
    pub(super) fn forget_pack(&mut self, pack: u32) -> Result<(), StoreError> {
        self.packs.remove(pack)?;
        self.compacted.remove(pack)?;
        let d = self.dead.remove(pack)?.map(|v| v.value()).unwrap_or(0);
        add_counter(&mut self.counters, C_DEAD_BYTES, -(d as i64))
    }
}

/// Sizes eviction works with.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// Committed pack lengths (live and dead records, headers).
    packs: u64,
    dead: u64,
    index: u64,
}

impl Usage {
    fn total(&self) -> u64 {
        self.packs + self.index
    }

    /// What a full pack GC would leave.
    fn live(&self) -> u64 {
        self.total().saturating_sub(self.dead)
    }
}

/// A NAR eviction may remove, with every store path naming it.
#[derive(Debug)]
struct Candidate {
    access: u64,
    nar_hash: NarHash,
    paths: Vec<String>,
}

/// A pack with dead bytes.
#[derive(Debug, Clone, Copy)]
struct DeadPack {
    pack: u32,
    len: u64,
    dead: u64,
}

impl DeadPack {
    fn mostly_dead(&self) -> bool {
        let payload = self.len.saturating_sub(FILE_HEADER.len() as u64);
        self.dead * 2 > payload
    }
}

/// The tables removing a store path touches, open in one write transaction.
pub(super) struct Removal<'t> {
    narinfos: redb::Table<'t, &'static str, &'static [u8]>,
    pins: redb::Table<'t, &'static str, u64>,
    manifests: redb::Table<'t, [u8; 32], &'static [u8]>,
    refs: redb::Table<'t, [u8; 32], u32>,
    chunks: redb::Table<'t, [u8; 32], (u32, u64, u32, u32, u32)>,
    counters: redb::Table<'t, &'static str, u64>,
    dead: redb::Table<'t, u32, u64>,
    access: redb::Table<'t, [u8; 32], u64>,
    nar_files: redb::Table<'t, &'static str, [u8; 32]>,
    metas: redb::Table<'t, &'static str, super::meta::MetaRow>,
}

impl<'t> Removal<'t> {
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            narinfos: txn.open_table(NARINFOS)?,
            pins: txn.open_table(PINS)?,
            manifests: txn.open_table(MANIFESTS)?,
            refs: txn.open_table(MANIFEST_REFS)?,
            chunks: txn.open_table(CHUNKS)?,
            counters: txn.open_table(COUNTERS)?,
            dead: txn.open_table(PACK_DEAD)?,
            access: txn.open_table(NAR_ACCESS)?,
            nar_files: txn.open_table(NAR_FILES)?,
            metas: txn.open_table(NAR_META)?,
        })
    }

    fn is_pinned(&self, hash: &str) -> Result<bool, StoreError> {
        Ok(self.pins.get(hash)?.is_some())
    }

    /// Removes a narinfo (and its pin), releasing its NAR when no other path names it.
    pub(super) fn remove(&mut self, hash: &str) -> Result<Option<RemovedPath>, StoreError> {
        let Some(bytes) = self.narinfos.remove(hash)?.map(|v| v.value().to_vec()) else {
            return Ok(None);
        };
        let rec = StoredNarInfo::decode(hash, &bytes)?;
        add_counter(&mut self.counters, C_NARINFOS, -1)?;
        self.pins.remove(hash)?;
        let meta_bytes =
            super::meta::forget(&mut self.metas, &mut self.dead, &mut self.counters, hash)?;
        let released = release_manifest(
            &mut self.manifests,
            &mut self.refs,
            &mut self.chunks,
            &mut self.counters,
            &mut self.dead,
            &rec.nar_hash,
        )?;
        if released.is_some() {
            self.access.remove(rec.nar_hash.0)?;
            let url = NarInfo::parse(&rec.text).map(|i| i.url).unwrap_or_default();
            if let Some(name) = super::nar_file_name(&url) {
                let points_here = self.nar_files.get(name)?.map(|v| v.value());
                if points_here == Some(rec.nar_hash.0) {
                    self.nar_files.remove(name)?;
                }
            }
        }
        let r = released.unwrap_or_default();
        Ok(Some(RemovedPath {
            nar_hash: rec.nar_hash,
            nar_removed: released.is_some(),
            nar_size: r.nar_size,
            chunks_removed: r.chunks,
            dead_bytes: r.dead_bytes + meta_bytes,
        }))
    }
}

pub(super) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

pub(super) fn parse_pack_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("pack-")?.strip_suffix(".pack")?;
    (digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Deletes pack files the index does not know: a pack GC's old pack whose delete a crash
/// prevented, or a pack an uncommitted ingest started. Nothing committed points into them.
/// An empty pack table (a lost or new index) deletes nothing.
pub(super) fn sweep_orphan_packs(dir: &Path, known: &HashSet<u32>) -> Result<(), StoreError> {
    if known.is_empty() {
        return Ok(());
    }
    let mut removed = false;
    for (pack, len) in super::repair::pack_files(dir)? {
        if !known.contains(&pack) {
            let path = pack::pack_path(dir, pack);
            // A pack holding only its header is one a seal started (nothing to say).
            if len > FILE_HEADER.len() as u64 {
                tracing::warn!(pack, path = %path.display(), "deleting a pack the index does not know");
            }
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// `verify`'s checks of the eviction tables: pins name stored paths, access times stored
/// NARs, and every pack's bytes are exactly its live records + its dead bytes.
pub(super) fn verify_tables(
    txn: &ReadTransaction,
    narinfos: &[(String, StoredNarInfo)],
    problems: &mut Vec<String>,
) -> Result<(), StoreError> {
    let names: HashSet<&str> = narinfos.iter().map(|(h, _)| h.as_str()).collect();
    for r in txn.open_table(PINS)?.iter()? {
        let (k, _) = r?;
        if !names.contains(k.value()) {
            problems.push(format!("pin {}: no such store path", k.value()));
        }
    }
    let manifests = txn.open_table(MANIFESTS)?;
    for r in txn.open_table(NAR_ACCESS)?.iter()? {
        let (k, _) = r?;
        if manifests.get(k.value())?.is_none() {
            let h = NarHash(k.value());
            problems.push(format!("last access of NAR {h}: the NAR is not stored"));
        }
    }
    let mut live: HashMap<u32, u64> = HashMap::new();
    for r in txn.open_table(CHUNKS)?.iter()? {
        let (loc, _) = loc_of(r?.1.value());
        *live.entry(loc.pack).or_default() += loc.record_len();
    }
    let mut described = HashSet::new();
    for r in txn.open_table(NAR_META)?.iter()? {
        let (k, v) = r?;
        let m = super::meta::MetaLoc::of_row(v.value());
        *live.entry(m.loc.pack).or_default() += m.loc.record_len();
        if !names.contains(k.value()) {
            problems.push(format!(
                "metadata record of {}: no such store path",
                k.value()
            ));
        }
        described.insert(k.value().to_string());
    }
    for name in &names {
        if !described.contains(*name) {
            problems.push(format!(
                "{name}: no metadata record in the packs (verify --repair could not restore it)"
            ));
        }
    }
    let mut dead: HashMap<u32, u64> = HashMap::new();
    for r in txn.open_table(PACK_DEAD)?.iter()? {
        let (k, v) = r?;
        dead.insert(k.value(), v.value());
    }
    let packs = txn.open_table(PACKS)?;
    for r in packs.iter()? {
        let (k, v) = r?;
        let (p, len) = (k.value(), v.value());
        let payload = len.saturating_sub(FILE_HEADER.len() as u64);
        let (l, d) = (live.remove(&p).unwrap_or(0), dead.remove(&p).unwrap_or(0));
        if l + d != payload {
            problems.push(format!(
                "pack {p}: {payload} bytes of records, but {l} live + {d} dead = {}",
                l + d
            ));
        }
    }
    for p in live.keys() {
        problems.push(format!(
            "pack {p}: chunks point into it, but it is not committed"
        ));
    }
    for (p, d) in dead {
        if d > 0 {
            problems.push(format!("pack {p}: {d} dead bytes, but it is not committed"));
        }
    }
    let total: u64 = txn
        .open_table(PACK_DEAD)?
        .iter()?
        .map(|r| r.map(|(_, v)| v.value()))
        .sum::<Result<u64, _>>()?;
    let counted = txn
        .open_table(COUNTERS)?
        .get(C_DEAD_BYTES)?
        .map(|v| v.value())
        .unwrap_or(0);
    if total != counted {
        problems.push(format!(
            "dead bytes: counter says {counted}, packs hold {total}"
        ));
    }
    Ok(())
}

impl Store {
    /// Records that a NAR was just used (served): eviction drops least-recently-used NARs
    /// first. Cheap: kept in memory and written with others every few seconds (see the module
    /// comment), so it may block on a write transaction now and then: call it off async threads.
    pub fn touch(&self, nar_hash: &NarHash) -> Result<(), StoreError> {
        let due = {
            let mut t = lock(&self.touches);
            t.pending.insert(*nar_hash, now_unix());
            t.pending.len() >= TOUCH_MAX_PENDING || t.last_flush.elapsed() >= TOUCH_FLUSH_INTERVAL
        };
        if due {
            self.flush_touches()?;
        }
        Ok(())
    }

    /// Writes pending touches now (one transaction).
    pub fn flush_touches(&self) -> Result<(), StoreError> {
        let pending = {
            let mut t = lock(&self.touches);
            t.last_flush = Instant::now();
            std::mem::take(&mut t.pending)
        };
        if pending.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let manifests = txn.open_table(MANIFESTS)?;
            let mut access = txn.open_table(NAR_ACCESS)?;
            for (h, t) in pending {
                if manifests.get(h.0)?.is_none() {
                    continue; // evicted meanwhile
                }
                let cur = access.get(h.0)?.map(|v| v.value()).unwrap_or(0);
                if t > cur {
                    access.insert(h.0, t)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Unix seconds of a NAR's last ingest or serve (pending touches included).
    pub fn last_access(&self, nar_hash: &NarHash) -> Result<Option<u64>, StoreError> {
        let pending = lock(&self.touches).pending.get(nar_hash).copied();
        let txn = self.db.begin_read()?;
        let stored = txn
            .open_table(NAR_ACCESS)?
            .get(nar_hash.0)?
            .map(|v| v.value());
        Ok(pending.max(stored))
    }

    /// Pins a stored path (by its store-path hash): its NAR is never evicted. `false`: it was
    /// pinned already.
    pub fn pin(&self, hash: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        {
            if txn.open_table(NARINFOS)?.get(hash)?.is_none() {
                return Err(StoreError::NotStored(hash.to_string()));
            }
            let mut pins = txn.open_table(PINS)?;
            if pins.get(hash)?.is_some() {
                return Ok(false);
            }
            pins.insert(hash, now_unix())?;
        }
        txn.commit()?;
        Ok(true)
    }

    /// Unpins a path. `false`: it was not pinned.
    pub fn unpin(&self, hash: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let was = txn.open_table(PINS)?.remove(hash)?.is_some();
        if was {
            txn.commit()?;
        }
        Ok(was)
    }

    /// Whether a path is pinned.
    pub fn is_pinned(&self, hash: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(PINS)?.get(hash)?.is_some())
    }

    /// Pinned store-path hashes, sorted.
    pub fn pins(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PINS)?;
        let mut out = Vec::new();
        for r in t.iter()? {
            out.push(r?.0.value().to_string());
        }
        Ok(out)
    }

    /// Removes a store path (pinned or not): its narinfo, pin and NAR file names; its NAR and
    /// the chunks only it used when no other path names the NAR (their records become dead
    /// bytes, reclaimed by pack GC). One write transaction. `None`: not stored.
    pub fn remove_path(&self, hash: &str) -> Result<Option<RemovedPath>, StoreError> {
        let _writer = lock(&self.writer);
        let txn = self.db.begin_write()?;
        let removed = Removal::open(&txn)?.remove(hash)?;
        txn.commit()?;
        if let Some(r) = &removed {
            tracing::info!(path = hash, nar = %r.nar_hash, dead = r.dead_bytes, "removed");
        }
        Ok(removed)
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        let txn = self.db.begin_read()?;
        let mut packs = 0;
        for r in txn.open_table(PACKS)?.iter()? {
            packs += r?.1.value();
        }
        let dead = txn
            .open_table(COUNTERS)?
            .get(C_DEAD_BYTES)?
            .map(|v| v.value())
            .unwrap_or(0);
        Ok(Usage {
            packs,
            dead,
            index: self.index_bytes(),
        })
    }

    /// Unpinned NARs, least recently used first.
    /// Unpinned NARs by last access, oldest first; NARs used in the last `grace_secs` are left
    /// out (a client may be about to fetch them).
    fn lru_candidates(&self, grace_secs: u64) -> Result<Vec<Candidate>, StoreError> {
        let txn = self.db.begin_read()?;
        let narinfos = txn.open_table(NARINFOS)?;
        let pins = txn.open_table(PINS)?;
        let hidden = txn.open_table(HIDDEN)?;
        let access = txn.open_table(NAR_ACCESS)?;
        let mut by_nar: HashMap<NarHash, Candidate> = HashMap::new();
        let mut pinned = HashSet::new();
        for r in narinfos.iter()? {
            let (k, v) = r?;
            let rec = StoredNarInfo::decode(k.value(), v.value())?;
            // A hidden path is left to its GC policy: `undelete` must stay possible until the
            // grace period ends, so the quota does not take it either.
            if pins.get(k.value())?.is_some() || hidden.get(k.value())?.is_some() {
                pinned.insert(rec.nar_hash);
            }
            let c = by_nar.entry(rec.nar_hash).or_insert_with(|| Candidate {
                access: 0,
                nar_hash: rec.nar_hash,
                paths: Vec::new(),
            });
            c.paths.push(k.value().to_string());
            c.access = c.access.max(rec.added_unix);
        }
        let mut out = Vec::with_capacity(by_nar.len());
        let recent = now_unix().saturating_sub(grace_secs);
        for (h, mut c) in by_nar {
            if pinned.contains(&h) {
                continue;
            }
            if let Some(a) = access.get(h.0)? {
                c.access = a.value();
            }
            if grace_secs > 0 && c.access > recent {
                continue; // in use (e.g. its narinfo was just served): not now
            }
            out.push(c);
        }
        out.sort_by_key(|a| (a.access, a.nar_hash.0));
        Ok(out)
    }

    /// Keeps the data directory (packs + index, `Stats::cache_bytes`) within `target` bytes:
    /// when it is larger, removes least-recently-used unpinned NARs until what a pack GC
    /// leaves is at most 90 % of `target`, then compacts packs (most dead first) down to that.
    /// Pinned NARs are never removed, so the result may stay above `target`.
    pub fn evict_to(&self, target: u64) -> Result<EvictReport, StoreError> {
        self.evict_to_sparing(target, 0)
    }

    /// [`Store::evict_to`], but NARs used in the last `grace_secs` are not evicted this time
    /// (the daemon: a client that just got a narinfo is about to ask for its NAR).
    pub fn evict_to_sparing(
        &self,
        target: u64,
        grace_secs: u64,
    ) -> Result<EvictReport, StoreError> {
        let _span = tracing::info_span!("evict", target).entered();
        self.flush_touches()?;
        let mut writer = lock(&self.writer);
        let before = self.usage()?;
        let mut report = EvictReport {
            target,
            bytes_before: before.total(),
            bytes_after: before.total(),
            ..Default::default()
        };
        if before.total() <= target {
            return Ok(report);
        }
        let aim = target / 1000 * EVICT_AIM_PER_MILLE + target % 1000 * EVICT_AIM_PER_MILLE / 1000;
        let mut need = before.live().saturating_sub(aim);
        let candidates = if need > 0 {
            self.lru_candidates(grace_secs)?
        } else {
            Vec::new()
        };
        for batch in candidates.chunks(EVICT_BATCH) {
            if need == 0 {
                break;
            }
            let txn = self.db.begin_write()?;
            {
                let mut t = Removal::open(&txn)?;
                for nar in batch {
                    if need == 0 {
                        break;
                    }
                    // Pinned since the candidates were listed: keep.
                    if nar
                        .paths
                        .iter()
                        .try_fold(false, |any, p| Ok::<_, StoreError>(any || t.is_pinned(p)?))?
                    {
                        continue;
                    }
                    for p in &nar.paths {
                        let Some(r) = t.remove(p)? else { continue };
                        report.paths += 1;
                        if r.nar_removed {
                            report.nars += 1;
                            report.nar_bytes += r.nar_size;
                            report.chunks += r.chunks_removed;
                            need = need.saturating_sub(r.dead_bytes);
                        }
                    }
                    tracing::debug!(nar = %nar.nar_hash, access = nar.access, "evicted");
                }
            }
            txn.commit()?;
        }
        report.gc = self.gc_locked(&mut writer, GcPolicy::ToSize(aim), &mut |p| {
            self.delete_pack(p)
        })?;
        report.bytes_after = self.usage()?.total();
        tracing::info!(
            paths = report.paths,
            nars = report.nars,
            before = report.bytes_before,
            after = report.bytes_after,
            "evicted"
        );
        Ok(report)
    }

    /// Compacts the packs `policy` selects: their live records move to the current pack and
    /// the old files are deleted (see the module comment for the crash safety).
    pub fn gc_packs(&self, policy: GcPolicy) -> Result<GcReport, StoreError> {
        let mut writer = lock(&self.writer);
        self.gc_locked(&mut writer, policy, &mut |p| self.delete_pack(p))
    }

    /// Pack GC under the writer lock; `emptied` is called with each pack once the index no
    /// longer points into it (deletes it; tests stop there to play a crash).
    fn gc_locked(
        &self,
        writer: &mut PackWriter,
        policy: GcPolicy,
        emptied: &mut dyn FnMut(u32) -> Result<(), StoreError>,
    ) -> Result<GcReport, StoreError> {
        let start = Instant::now();
        let _span = tracing::info_span!("pack_gc", ?policy).entered();
        let mut report = GcReport::default();
        let before = self.usage()?;
        let (candidates, mut live) = {
            let txn = self.db.begin_read()?;
            let packs = txn.open_table(PACKS)?;
            let mut candidates = Vec::new();
            for r in txn.open_table(PACK_DEAD)?.iter()? {
                let (k, v) = r?;
                let Some(len) = packs.get(k.value())?.map(|l| l.value()) else {
                    continue;
                };
                let p = DeadPack {
                    pack: k.value(),
                    len,
                    dead: v.value(),
                };
                if p.dead > 0 && (policy != GcPolicy::Sparse || p.mostly_dead()) {
                    candidates.push(p);
                }
            }
            candidates.sort_by(|a, b| b.dead.cmp(&a.dead).then(a.pack.cmp(&b.pack)));
            let wanted: HashSet<u32> = candidates.iter().map(|p| p.pack).collect();
            let mut live: HashMap<u32, Vec<(ChunkId, Location)>> = HashMap::new();
            if !wanted.is_empty() {
                for r in txn.open_table(CHUNKS)?.iter()? {
                    let (k, v) = r?;
                    let (loc, _) = loc_of(v.value());
                    if wanted.contains(&loc.pack) {
                        live.entry(loc.pack)
                            .or_default()
                            .push((ChunkId(k.value()), loc));
                    }
                }
            }
            (candidates, live)
        };
        let mut size = before.total();
        for p in candidates {
            if matches!(policy, GcPolicy::ToSize(aim) if size <= aim) {
                break;
            }
            let mut records = live.remove(&p.pack).unwrap_or_default();
            records.sort_by_key(|(_, l)| l.offset);
            writer.mark();
            match self.move_records(writer, &p, &records) {
                Ok(copied) => {
                    emptied(p.pack)?;
                    report.packs += 1;
                    report.records_copied += records.len() as u64;
                    report.bytes_copied += copied;
                    size = size.saturating_sub(p.len.saturating_sub(copied));
                }
                Err(e) => {
                    writer.rollback()?;
                    tracing::warn!(pack = p.pack, error = %e, "pack left uncompacted");
                    report.skipped.push(format!("pack {}: {e}", p.pack));
                }
            }
        }
        report.bytes_reclaimed = before.packs.saturating_sub(self.usage()?.packs);
        report.elapsed = start.elapsed();
        if report.packs > 0 {
            tracing::info!(
                packs = report.packs,
                copied = report.bytes_copied,
                reclaimed = report.bytes_reclaimed,
                "packs compacted"
            );
        }
        Ok(report)
    }

    /// Copies a pack's live records to the writer, fsyncs, and commits the new locations with
    /// the old pack forgotten. Returns the bytes copied. On error the caller rolls back.
    fn move_records(
        &self,
        writer: &mut PackWriter,
        p: &DeadPack,
        records: &[(ChunkId, Location)],
    ) -> Result<u64, StoreError> {
        if writer.pack() == p.pack {
            writer.rotate()?; // never copy a pack into itself
        }
        let h = self.packs.get(p.pack)?;
        let mut dctx = new_dctx(&self.dir)?;
        let mut moved = Vec::with_capacity(records.len());
        let mut copied = 0;
        for (id, old) in records {
            let rec = pack::read_checked_record(&*h.src, &h.path, old, id, &mut dctx)?;
            let new = writer.append_record(&rec)?;
            copied += new.record_len();
            moved.push((*id, *old, new));
        }
        let metas = super::meta::copy_live(
            &self.db,
            &self.packs,
            writer,
            &HashSet::from([p.pack]),
            &mut dctx,
        )?;
        copied += metas
            .iter()
            .map(|(_, _, m)| m.loc.record_len())
            .sum::<u64>();
        writer.sync()?;
        let lengths = writer.touched_lengths();
        let txn = self.db.begin_write()?;
        {
            let mut t = Repoint::open(&txn)?;
            for (id, old, new) in &moved {
                // Released meanwhile is not possible under the writer lock.
                t.move_chunk(id, old, new)?;
            }
            t.set_lengths(&lengths)?;
            t.forget_pack(p.pack)?;
            super::meta::repoint(&txn, &mut t.dead, &mut t.counters, &metas)?;
        }
        txn.commit()?;
        Ok(copied)
    }

    /// Deletes a pack the index no longer points into; readers holding it open keep reading.
    pub(super) fn delete_pack(&self, pack: u32) -> Result<(), StoreError> {
        let path = pack::pack_path(&self.packs.dir, pack);
        if let Some(r) = &self.packs.remote {
            // Readers that resolved it before the commit may still be reading it.
            if lock(&r.lens).remove(&pack).is_some() {
                lock(&r.doomed).push((pack, Instant::now()));
            }
        }
        {
            let _exclusive = self.packs.exclusive();
            self.packs.forget(pack);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        sync_dir(&self.packs.dir)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.flush_touches() {
            tracing::warn!(error = %e, "last-access times not written");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::testing::{ingest, ingest_as, noise, read_nar, sample_nar};
    use super::*;
    use crate::core::nar::{write_nar, Node};

    fn h(c: char) -> String {
        c.to_string().repeat(32)
    }

    /// A NAR whose first 700 KiB (`blob`) depend on `blob` only: NARs with the same `blob`
    /// share those chunks.
    fn nar_with(blob: u8, run: u8) -> Vec<u8> {
        let mut entries = BTreeMap::new();
        for (name, seed, len) in [("blob", blob, 700 * 1024), ("run", run, 8192)] {
            entries.insert(
                name.to_string(),
                Node::Regular {
                    executable: false,
                    contents: noise(seed, len),
                },
            );
        }
        let mut nar = Vec::new();
        write_nar(&mut nar, &Node::Directory(entries)).expect("valid tree");
        nar
    }

    fn set_access(store: &Store, nar_hash: &NarHash, t: u64) {
        let txn = store.db.begin_write().unwrap();
        txn.open_table(NAR_ACCESS)
            .unwrap()
            .insert(nar_hash.0, t)
            .unwrap();
        txn.commit().unwrap();
    }

    fn stored_access(store: &Store, nar_hash: &NarHash) -> Option<u64> {
        let txn = store.db.begin_read().unwrap();
        let t = txn.open_table(NAR_ACCESS).unwrap();
        let v = t.get(nar_hash.0).unwrap().map(|v| v.value());
        v
    }

    fn pack_files(dir: &Path) -> BTreeMap<String, u64> {
        fs::read_dir(dir.join("packs"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, e.metadata().unwrap().len())
            })
            .collect()
    }

    fn assert_verifies(store: &Store) {
        let problems = store.verify(|_| {}).unwrap();
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn lru_order_is_respected_and_touch_changes_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let names = ['a', 'b', 'c', 'd'];
        let nars: Vec<Vec<u8>> = (0..4).map(|i| sample_nar(10 * i + 1)).collect();
        let infos: Vec<NarInfo> = names
            .iter()
            .zip(&nars)
            .map(|(c, n)| ingest(&store, &h(*c), n, None, &[]))
            .collect();
        for (i, info) in infos.iter().enumerate() {
            set_access(&store, &info.nar_hash, 1000 * (i as u64 + 1));
        }
        // a was the least recently used; serving it makes b and c the oldest.
        store.touch(&infos[0].nar_hash).unwrap();

        let u = store.usage().unwrap();
        let per_nar = (u.packs - FILE_HEADER.len() as u64) / 4;
        // Aim (90 % of the target) 1.5 NARs below today's size: two NARs must go.
        let target = (u.total() - per_nar * 3 / 2) * 10 / 9;
        let r = store.evict_to(target).unwrap();
        assert_eq!((r.paths, r.nars), (2, 2), "{r:?}");
        assert_eq!(r.nar_bytes, (nars[1].len() + nars[2].len()) as u64);
        for (c, kept) in [('a', true), ('b', false), ('c', false), ('d', true)] {
            assert_eq!(store.narinfo(&h(c)).unwrap().is_some(), kept, "{c}");
        }
        assert!(r.bytes_after <= target, "{r:?}");
        assert!(r.bytes_after < r.bytes_before, "{r:?}");
        assert_eq!(r.gc.packs, 1, "the half-dead pack is compacted: {r:?}");
        assert_eq!(read_nar(&store, &infos[0].nar_hash), nars[0]);
        assert_eq!(read_nar(&store, &infos[3].nar_hash), nars[3]);
        assert!(!store.has_nar(&infos[1].nar_hash).unwrap());
        assert_eq!(store.stats().unwrap().dead_bytes, 0);
        assert_verifies(&store);

        // Under the target already: nothing happens.
        let r = store.evict_to(u64::MAX).unwrap();
        assert_eq!((r.paths, r.gc.packs), (0, 0));
    }

    #[test]
    fn pinned_paths_are_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = ingest_as(
            &store,
            &h('a'),
            &sample_nar(1),
            None,
            &[],
            Retention::Pinned,
        );
        let b = ingest(&store, &h('b'), &sample_nar(11), None, &[]);
        ingest(&store, &h('c'), &sample_nar(21), None, &[]);
        let d = ingest(&store, &h('d'), &sample_nar(31), None, &[]);
        assert!(store.pin(&h('d')).unwrap());
        assert!(!store.pin(&h('d')).unwrap(), "already pinned");
        // One NAR under two paths, one of them pinned: the NAR is pinned.
        let shared = sample_nar(41);
        let f = ingest(&store, &h('f'), &shared, None, &[]);
        ingest_as(&store, &h('g'), &shared, None, &[], Retention::Pinned);
        assert!(matches!(store.pin(&h('z')), Err(StoreError::NotStored(_))));
        // Re-ingesting a pinned path as a cache entry keeps its pin.
        ingest(&store, &h('a'), &sample_nar(1), None, &[]);

        let s = store.stats().unwrap();
        assert_eq!((s.pinned_paths, s.pinned_nars), (3, 3));
        assert_eq!(store.pins().unwrap(), vec![h('a'), h('d'), h('g')]);
        for i in [&a, &b, &d, &f] {
            set_access(&store, &i.nar_hash, 1); // pinned ones are the oldest
        }

        let r = store.evict_to(0).unwrap();
        assert_eq!((r.paths, r.nars), (2, 2), "{r:?}");
        assert!(store.narinfo(&h('b')).unwrap().is_none());
        assert!(store.narinfo(&h('c')).unwrap().is_none());
        for c in ['a', 'd', 'f', 'g'] {
            assert!(store.narinfo(&h(c)).unwrap().is_some(), "{c} is pinned");
        }
        assert_eq!(read_nar(&store, &a.nar_hash), sample_nar(1));
        assert_eq!(read_nar(&store, &f.nar_hash), shared);
        assert_verifies(&store);

        assert!(store.unpin(&h('a')).unwrap());
        assert!(!store.unpin(&h('a')).unwrap());
        let r = store.evict_to(0).unwrap();
        assert_eq!(r.nars, 1);
        assert!(store.narinfo(&h('a')).unwrap().is_none());
        assert_eq!(store.pins().unwrap(), vec![h('d'), h('g')]);
        assert_verifies(&store);
    }

    #[test]
    fn shared_chunk_survives_eviction_and_gc() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (nx, ny) = (nar_with(1, 2), nar_with(1, 3));
        let x = ingest(&store, &h('x'), &nx, None, &[]);
        let y = ingest_as(&store, &h('y'), &ny, None, &[], Retention::Pinned);
        let mx = store.manifest(&x.nar_hash).unwrap().unwrap();
        let my = store.manifest(&y.nar_hash).unwrap().unwrap();
        let ids_y: HashSet<ChunkId> = my.chunks.iter().map(|c| c.id).collect();
        let shared: Vec<ChunkId> = mx
            .chunks
            .iter()
            .map(|c| c.id)
            .filter(|id| ids_y.contains(id))
            .collect();
        assert!(!shared.is_empty(), "the two NARs must share chunks");
        let only_x: Vec<ChunkId> = mx
            .chunks
            .iter()
            .map(|c| c.id)
            .filter(|id| !ids_y.contains(id))
            .collect();
        assert!(!only_x.is_empty());

        // Everything that may go goes: x, but not the chunks it shares with y.
        let r = store.evict_to(0).unwrap();
        assert_eq!(r.nars, 1, "{r:?}");
        assert!(store.narinfo(&h('x')).unwrap().is_none());
        assert_eq!(r.chunks, only_x.len() as u64);
        for id in &shared {
            assert!(store.has_chunk(id).unwrap(), "shared chunk {id} must stay");
        }
        for id in &only_x {
            assert!(!store.has_chunk(id).unwrap());
        }
        assert_eq!(read_nar(&store, &y.nar_hash), ny);
        assert_verifies(&store);

        store.gc_packs(GcPolicy::AllDead).unwrap();
        assert_eq!(store.stats().unwrap().dead_bytes, 0);
        assert_eq!(read_nar(&store, &y.nar_hash), ny);
        assert_verifies(&store);
    }

    #[test]
    fn gc_shrinks_the_packs_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let nars: Vec<Vec<u8>> = (0..4).map(|i| sample_nar(10 * i + 1)).collect();
        let infos: Vec<NarInfo> = ['a', 'b', 'c', 'd']
            .iter()
            .zip(&nars)
            .map(|(c, n)| ingest(&store, &h(*c), n, None, &[]))
            .collect();

        // 1 of 4 dead: the routine GC leaves the pack alone, an explicit one compacts it.
        let r = store.remove_path(&h('a')).unwrap().unwrap();
        assert!(r.nar_removed && r.dead_bytes > 0);
        assert_eq!(store.gc_packs(GcPolicy::Sparse).unwrap().packs, 0);

        let mut dead = r.dead_bytes;
        for c in ['b', 'c'] {
            dead += store.remove_path(&h(c)).unwrap().unwrap().dead_bytes;
        }
        assert_eq!(store.remove_path(&h('c')).unwrap(), None);
        assert_eq!(store.stats().unwrap().dead_bytes, dead);
        let before: u64 = pack_files(dir.path()).values().sum();
        let g = store.gc_packs(GcPolicy::Sparse).unwrap();
        let after = pack_files(dir.path());
        eprintln!("gc: {g:?}, packs {before} -> {after:?}");
        assert_eq!(g.packs, 1);
        assert_eq!(g.bytes_reclaimed, dead);
        assert_eq!(after.values().sum::<u64>(), before - dead);
        assert_eq!(after.keys().collect::<Vec<_>>(), ["pack-00000002.pack"]);
        let s = store.stats().unwrap();
        assert_eq!((s.dead_bytes, s.pack_bytes), (0, before - dead));
        assert_eq!(read_nar(&store, &infos[3].nar_hash), nars[3]);
        assert_verifies(&store);

        // Nothing dead: nothing to do.
        assert_eq!(store.gc_packs(GcPolicy::AllDead).unwrap().packs, 0);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(read_nar(&store, &infos[3].nar_hash), nars[3]);
        assert_verifies(&store);
    }

    #[test]
    fn crash_between_index_commit_and_pack_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        ingest(&store, &h('a'), &sample_nar(1), None, &[]);
        let b = ingest(&store, &h('b'), &sample_nar(11), None, &[]);
        store.remove_path(&h('a')).unwrap().unwrap();
        let r = {
            let mut w = lock(&store.writer);
            // "Crash" after the commit: the old pack is never deleted.
            store
                .gc_locked(&mut w, GcPolicy::AllDead, &mut |_| Ok(()))
                .unwrap()
        };
        assert_eq!(r.packs, 1);
        drop(store);
        let files = pack_files(dir.path());
        assert!(files.contains_key("pack-00000001.pack"), "{files:?}");
        assert!(files.contains_key("pack-00000002.pack"), "{files:?}");

        let store = Store::open(dir.path()).unwrap();
        let files = pack_files(dir.path());
        assert_eq!(files.keys().collect::<Vec<_>>(), ["pack-00000002.pack"]);
        assert_eq!(read_nar(&store, &b.nar_hash), sample_nar(11));
        assert_eq!(store.stats().unwrap().dead_bytes, 0);
        assert_verifies(&store);
    }

    #[test]
    fn crash_before_index_commit_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        ingest(&store, &h('a'), &sample_nar(1), None, &[]);
        let b = ingest(&store, &h('b'), &sample_nar(11), None, &[]);
        store.remove_path(&h('a')).unwrap().unwrap();
        let dead = store.stats().unwrap().dead_bytes;
        {
            // A GC copies b's records into a new pack and fsyncs, then "crashes".
            let mut w = lock(&store.writer);
            w.mark();
            w.rotate().unwrap();
            let m = store.manifest(&b.nar_hash).unwrap().unwrap();
            let h = store.packs.get(1).unwrap();
            let mut dctx = new_dctx(dir.path()).unwrap();
            let txn = store.db.begin_read().unwrap();
            let chunks = txn.open_table(CHUNKS).unwrap();
            for c in &m.chunks {
                let (loc, _) = loc_of(chunks.get(c.id.0).unwrap().unwrap().value());
                let rec =
                    pack::read_checked_record(&*h.src, &h.path, &loc, &c.id, &mut dctx).unwrap();
                w.append_record(&rec).unwrap();
            }
            w.sync().unwrap();
        }
        drop(store);
        assert!(pack_files(dir.path())["pack-00000002.pack"] > 16);

        let store = Store::open(dir.path()).unwrap();
        assert!(!pack_files(dir.path()).contains_key("pack-00000002.pack"));
        assert_eq!(read_nar(&store, &b.nar_hash), sample_nar(11));
        assert_eq!(store.stats().unwrap().dead_bytes, dead);
        assert_verifies(&store);
        // And a GC then runs to the end.
        assert_eq!(store.gc_packs(GcPolicy::AllDead).unwrap().packs, 1);
        assert_eq!(read_nar(&store, &b.nar_hash), sample_nar(11));
        assert_verifies(&store);
    }

    #[test]
    fn evicted_nar_can_be_ingested_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let nar = sample_nar(5);
        let info = ingest(&store, &h('a'), &nar, None, &[]);
        let first = store.stats().unwrap();
        let r = store.evict_to(0).unwrap();
        assert_eq!(r.nars, 1);
        assert!(!store.has_nar(&info.nar_hash).unwrap());
        assert_eq!(
            store
                .nar_hash_by_file(&format!("{}.nar", info.nar_hash.to_base32()))
                .unwrap(),
            None
        );
        assert_verifies(&store);

        ingest(&store, &h('a'), &nar, None, &[]);
        assert_eq!(read_nar(&store, &info.nar_hash), nar);
        let again = store.stats().unwrap();
        assert_eq!(
            (
                again.narinfos,
                again.nars,
                again.chunks,
                again.unique_chunk_bytes
            ),
            (
                first.narinfos,
                first.nars,
                first.chunks,
                first.unique_chunk_bytes
            )
        );
        assert_eq!(again.chunk_compressed_bytes, first.chunk_compressed_bytes);
        assert!(store.last_access(&info.nar_hash).unwrap().is_some());
        assert_verifies(&store);
    }

    #[test]
    fn removal_keeps_counters_as_if_never_ingested() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fresh_dir = tempfile::tempdir().unwrap();
        let fresh = Store::open(fresh_dir.path()).unwrap();
        let (na, nb, nc) = (nar_with(1, 2), nar_with(1, 3), nar_with(4, 5));
        ingest(&store, &h('a'), &na, None, &[]);
        let b = ingest(&store, &h('b'), &nb, None, &[]);
        ingest(&store, &h('c'), &nc, None, &[]);
        // c is replaced by another NAR: its old one is released (dead bytes tracked too).
        ingest(&store, &h('c'), &sample_nar(9), None, &[]);
        let removed = store.remove_path(&h('b')).unwrap().unwrap();
        assert_eq!(removed.nar_hash, b.nar_hash);
        ingest(&fresh, &h('a'), &na, None, &[]);
        ingest(&fresh, &h('c'), &sample_nar(9), None, &[]);
        let (s, f) = (store.stats().unwrap(), fresh.stats().unwrap());
        let key = |s: &super::super::Stats| {
            (
                s.narinfos,
                s.nars,
                s.nar_bytes,
                s.chunks,
                s.unique_chunk_bytes,
                s.chunk_compressed_bytes,
            )
        };
        assert_eq!(key(&s), key(&f));
        assert!(s.dead_bytes > 0);
        assert_eq!(s.live_bytes, s.cache_bytes - s.dead_bytes);
        assert_verifies(&store);
    }

    #[test]
    fn touches_are_coalesced_then_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let info = ingest(&store, &h('a'), &sample_nar(1), None, &[]);
        set_access(&store, &info.nar_hash, 1000);
        lock(&store.touches).last_flush = Instant::now(); // however slow the ingest was
        store.touch(&info.nar_hash).unwrap();
        store.touch(&NarHash([7; 32])).unwrap(); // not stored: never written
        assert_eq!(
            stored_access(&store, &info.nar_hash),
            Some(1000),
            "not yet written"
        );
        let now = store.last_access(&info.nar_hash).unwrap().unwrap();
        assert!(now > 1000);
        drop(store); // written on drop
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(stored_access(&store, &info.nar_hash), Some(now));
        assert_eq!(stored_access(&store, &NarHash([7; 32])), None);
        assert_verifies(&store);
    }
}
