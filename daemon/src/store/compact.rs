//! Cold compaction (issue 11): sealed packs are rewritten with every chunk recompressed at a
//! higher zstd level. Each record stays one self-contained zstd frame of one chunk, so reads,
//! ranges and peer answers (which send frames as stored) work unchanged; only the bytes shrink.
//! `docs/chunking.md` ("Cold compaction") has the measurements behind the choice.
//!
//! A run groups cold packs (sealed, not compacted at this level yet, unmodified for a while)
//! into batches of at most one pack's worth of records. Per batch:
//! 1. without any lock, every live record is read back (fully checked), recompressed and
//!    staged — the old frame is kept where recompressing does not make it smaller;
//! 2. under the writer lock, the staged records are appended to a fresh pack, fsynced, and one
//!    index transaction points the chunks at them, forgets the old packs and marks the new one
//!    compacted; a chunk released meanwhile leaves its new copy dead;
//! 3. the old pack files are deleted.
//!
//! Crash safety is pack GC's: before the commit, the new pack's records are an uncommitted
//! tail (dropped on open); after it, the old packs are files the index does not know (deleted
//! on open). Nothing committed ever points at bytes that are not fsynced.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use redb::ReadableTable;

use super::evict::{lock, Repoint};
use super::pack::{self, Location, PACK_TARGET_SIZE};
use super::tables::{CHUNKS, COMPACTED_PACKS, C_CHUNK_COMPRESSED_BYTES, PACKS};
use super::{add_counter, io_err, loc_of, new_dctx, Staging, Store, StoreError};
use crate::core::ChunkId;

/// What a compaction run does.
#[derive(Debug, Clone, Copy)]
pub struct CompactOptions {
    /// zstd level of the rewritten records.
    pub level: i32,
    /// Packs modified more recently than this are not cold yet.
    pub min_age: Duration,
    /// Stop after this many input packs (a background task's slice of work).
    pub max_packs: Option<usize>,
}

/// What a compaction run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Packs rewritten (and deleted) and packs written.
    pub packs_in: u64,
    pub packs_out: u64,
    pub records: u64,
    /// Frames kept as they were (recompressing did not make them smaller).
    pub records_kept: u64,
    /// Record bytes (headers + frames) read and written.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Cold packs still waiting (a `max_packs` limit, or a stop).
    pub packs_left: u64,
    /// Packs left alone because a record could not be read back intact (see `verify`).
    pub skipped: Vec<String>,
    pub elapsed: Duration,
}

/// A pack to rewrite, its committed length and its live records in file order, as of the
/// snapshot they were read in.
struct Input {
    pack: u32,
    len: u64,
    records: Vec<(ChunkId, Location)>,
}

impl Store {
    /// Rewrites the cold packs at `opts.level`; `stop` is asked between batches.
    pub fn compact(
        &self,
        opts: CompactOptions,
        stop: &dyn Fn() -> bool,
    ) -> Result<CompactReport, StoreError> {
        self.compact_with(opts, stop, &mut |p| self.delete_pack(p))
    }

    /// [`Store::compact`] with the deletion of each rewritten pack handed to `emptied` (tests
    /// stop there to play a crash).
    pub(super) fn compact_with(
        &self,
        opts: CompactOptions,
        stop: &dyn Fn() -> bool,
        emptied: &mut dyn FnMut(u32) -> Result<(), StoreError>,
    ) -> Result<CompactReport, StoreError> {
        let start = Instant::now();
        let _span = tracing::info_span!("compact", level = opts.level).entered();
        let mut report = CompactReport::default();
        let (inputs, left) = self.cold_packs(opts)?;
        report.packs_left = left;
        let mut batches: Vec<Vec<Input>> = Vec::new();
        let mut batch_bytes = 0u64;
        for input in inputs {
            let bytes: u64 = input.records.iter().map(|(_, l)| l.record_len()).sum();
            match batches.last_mut() {
                Some(b) if batch_bytes + bytes <= PACK_TARGET_SIZE => {
                    batch_bytes += bytes;
                    b.push(input);
                }
                _ => {
                    batch_bytes = bytes;
                    batches.push(vec![input]);
                }
            }
        }
        let mut batches = batches.into_iter();
        for batch in batches.by_ref() {
            if stop() {
                report.packs_left += batch.len() as u64;
                break;
            }
            let n = batch.len() as u64;
            if !self.compact_batch(opts.level, batch, stop, &mut report, emptied)? {
                report.packs_left += n;
                break;
            }
        }
        report.packs_left += batches.map(|b| b.len() as u64).sum::<u64>();
        report.elapsed = start.elapsed();
        tracing::info!(
            packs_in = report.packs_in,
            packs_out = report.packs_out,
            bytes_in = report.bytes_in,
            bytes_out = report.bytes_out,
            left = report.packs_left,
            "compaction done"
        );
        Ok(report)
    }

    /// The first `opts.max_packs` packs not yet compacted at `opts.level` and unmodified for
    /// `opts.min_age` (the one being appended to too, once it is that cold), with their live
    /// records, in pack order; and how many more such packs there are. Only the packs taken
    /// have their records collected.
    fn cold_packs(&self, opts: CompactOptions) -> Result<(Vec<Input>, u64), StoreError> {
        let now = SystemTime::now();
        let limit = opts.max_packs.unwrap_or(usize::MAX);
        let txn = self.db.begin_read()?;
        let compacted = txn.open_table(COMPACTED_PACKS)?;
        let mut wanted: HashMap<u32, (u64, Vec<(ChunkId, Location)>)> = HashMap::new();
        let mut left = 0u64;
        for r in txn.open_table(PACKS)?.iter()? {
            let (pack, len) = {
                let (k, v) = r?;
                (k.value(), v.value())
            };
            if len <= pack::FILE_HEADER.len() as u64 {
                continue; // no record
            }
            if compacted
                .get(pack)?
                .is_some_and(|l| i32::from(l.value()) >= opts.level)
            {
                continue;
            }
            let path = pack::pack_path(&self.packs.dir, pack);
            let modified = match std::fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(m) => Some(m),
                // Uploaded to the remote storage: sealed, so cold.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.has_remote_storage() => {
                    None
                }
                Err(e) => return Err(io_err(&path)(e)),
            };
            if modified.is_some_and(|m| now.duration_since(m).unwrap_or_default() < opts.min_age) {
                continue;
            }
            if wanted.len() < limit {
                wanted.insert(pack, (len, Vec::new()));
            } else {
                left += 1;
            }
        }
        if !wanted.is_empty() {
            for r in txn.open_table(CHUNKS)?.iter()? {
                let (k, v) = r?;
                let (loc, _) = loc_of(v.value());
                if let Some((_, records)) = wanted.get_mut(&loc.pack) {
                    records.push((ChunkId(k.value()), loc));
                }
            }
        }
        let mut inputs: Vec<Input> = wanted
            .into_iter()
            .map(|(pack, (len, mut records))| {
                records.sort_by_key(|(_, l)| l.offset);
                Input { pack, len, records }
            })
            .collect();
        inputs.sort_by_key(|i| i.pack);
        Ok((inputs, left))
    }

    /// Rewrites one batch; `false` if `stop` said so before anything was committed.
    fn compact_batch(
        &self,
        level: i32,
        batch: Vec<Input>,
        stop: &dyn Fn() -> bool,
        report: &mut CompactReport,
        emptied: &mut dyn FnMut(u32) -> Result<(), StoreError>,
    ) -> Result<bool, StoreError> {
        // 1. Recompress into a staging file, without any lock.
        let mut staging = self.staging()?;
        let mut compressor = zstd::bulk::Compressor::new(level).map_err(io_err(&self.dir))?;
        let mut dctx = new_dctx(&self.dir)?;
        let mut inputs = Vec::new();
        let mut kept = 0u64;
        for input in batch {
            match self.stage_pack(&input, &mut staging, &mut compressor, &mut dctx, stop) {
                Ok(None) => return Ok(false),
                Ok(Some(k)) => {
                    kept += k;
                    inputs.push(input);
                }
                Err(e) => {
                    tracing::warn!(pack = input.pack, error = %e, "pack left uncompacted");
                    report.skipped.push(format!("pack {}: {e}", input.pack));
                }
            }
        }
        if inputs.is_empty() {
            return Ok(true);
        }
        // 2. Append to a fresh pack and commit, under the writer lock.
        let mut writer = lock(&self.writer);
        writer.mark();
        let committed = (|| {
            // An input that got records since the snapshot (the pack being appended to) is
            // left for the next run: its new records are not in the batch.
            {
                let txn = self.db.begin_read()?;
                let packs = txn.open_table(PACKS)?;
                for i in &inputs {
                    if packs.get(i.pack)?.map(|v| v.value()) != Some(i.len) {
                        return Ok(None);
                    }
                }
            }
            if !writer.is_empty() {
                writer.rotate()?; // the compacted pack holds compacted records only
            }
            let first_out = writer.pack();
            let ids = inputs
                .iter()
                .flat_map(|i| i.records.iter().map(|(id, _)| *id));
            let placed = staging.copy_into(&mut writer, ids)?;
            let from: HashSet<u32> = inputs.iter().map(|i| i.pack).collect();
            let mut dctx = new_dctx(&self.dir)?;
            let metas =
                super::meta::copy_live(&self.db, &self.packs, &mut writer, &from, &mut dctx)?;
            let last_out = writer.pack();
            // Ingest goes on in the next pack, never into a compacted one.
            writer.rotate()?;
            let lengths = writer.touched_lengths();
            let txn = self.db.begin_write()?;
            let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
            {
                let mut t = Repoint::open(&txn)?;
                for (id, old) in inputs.iter().flat_map(|i| i.records.iter()) {
                    let new = placed.get(id).ok_or_else(|| {
                        io_err(&self.dir)(std::io::Error::other(format!(
                            "chunk {id} was not staged"
                        )))
                    })?;
                    bytes_in += old.record_len();
                    bytes_out += new.record_len();
                    // Released meanwhile: the copy is dead.
                    if t.move_chunk(id, old, new)? {
                        add_counter(
                            &mut t.counters,
                            C_CHUNK_COMPRESSED_BYTES,
                            i64::from(new.comp_len) - i64::from(old.comp_len),
                        )?;
                    }
                }
                t.set_lengths(&lengths)?;
                for p in first_out..=last_out {
                    t.set_compacted(p, u8::try_from(level.clamp(0, 22)).unwrap_or(0))?;
                }
                for i in &inputs {
                    t.forget_pack(i.pack)?;
                }
                super::meta::repoint(&txn, &mut t.dead, &mut t.counters, &metas)?;
            }
            txn.commit()?;
            Ok::<_, StoreError>(Some((
                bytes_in,
                bytes_out,
                u64::from(last_out - first_out) + 1,
            )))
        })();
        let (bytes_in, bytes_out, packs_out) = match committed {
            Ok(Some(v)) => v,
            Ok(None) => {
                report.packs_left += inputs.len() as u64;
                tracing::debug!("a pack changed during compaction; left for the next run");
                return Ok(true);
            }
            Err(e) => {
                writer.rollback()?;
                return Err(e);
            }
        };
        drop(writer);
        // 3. The old packs are no longer referenced.
        for i in &inputs {
            emptied(i.pack)?;
            report.packs_in += 1;
            report.records += i.records.len() as u64;
        }
        report.packs_out += packs_out;
        report.records_kept += kept;
        report.bytes_in += bytes_in;
        report.bytes_out += bytes_out;
        Ok(true)
    }

    /// Stages every record of `input` recompressed (or as it was, when that is smaller).
    /// Returns how many were kept as they were; `None` if `stop` said so.
    fn stage_pack(
        &self,
        input: &Input,
        staging: &mut Staging,
        compressor: &mut zstd::bulk::Compressor<'static>,
        dctx: &mut zstd::bulk::Decompressor<'static>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<u64>, StoreError> {
        let h = self.packs.get(input.pack)?;
        let path = h.path.clone();
        let mut kept = 0;
        for (id, loc) in &input.records {
            if stop() {
                return Ok(None);
            }
            let data = h.read_chunk(&self.packs, loc, id, dctx)?;
            let frame = compressor.compress(&data).map_err(io_err(&path))?;
            if frame.len() < loc.comp_len as usize {
                staging.append_frame(id, loc.raw_len, &frame)?;
            } else {
                let old = h.read_frame(&self.packs, loc, id, dctx)?;
                staging.append_frame(id, loc.raw_len, &old)?;
                kept += 1;
            }
        }
        Ok(Some(kept))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read;

    use super::super::testing::{ingest, noise, read_nar};
    use super::*;
    use crate::core::nar::{write_nar, Node};
    use crate::core::NarHash;

    /// A NAR of text that compresses much better at high levels than at level 3, plus noise.
    fn text_nar(seed: u8) -> Vec<u8> {
        let mut text = String::new();
        let mut x = u64::from(seed) + 1;
        for i in 0..40_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"];
            text.push_str(&format!(
                "{i}: {} {} /nix/store/0123456789abcdfghijklmnpqrsvwxyz-dep/lib {}\n",
                words[(x >> 33) as usize % 7],
                words[(x >> 40) as usize % 7],
                (x >> 20) % 1000
            ));
        }
        let mut entries = BTreeMap::new();
        entries.insert(
            "doc".to_string(),
            Node::Regular {
                executable: false,
                contents: text.into_bytes(),
            },
        );
        entries.insert(
            "blob".to_string(),
            Node::Regular {
                executable: false,
                contents: noise(seed, 100 * 1024),
            },
        );
        let mut nar = Vec::new();
        write_nar(&mut nar, &Node::Directory(entries)).unwrap();
        nar
    }

    /// Every NAR reads back byte-identical (whole, as a range, and chunk by chunk as peers get
    /// it), and the store verifies.
    fn assert_intact(store: &Store, nars: &[Vec<u8>]) {
        for nar in nars {
            let h = NarHash::digest(nar);
            assert!(read_nar(store, &h) == *nar, "NAR reads back identical");
            let mut r = store.nar_reader(&h).unwrap();
            let (a, b) = (nar.len() as u64 / 3, nar.len() as u64 / 2);
            r.set_range(a, b);
            let mut part = Vec::new();
            r.read_to_end(&mut part).unwrap();
            assert!(
                part == nar[a as usize..b as usize],
                "range reads back identical"
            );
            let m = store.manifest(&h).unwrap().unwrap();
            for c in &m.chunks {
                let frame = store.chunk_frame(&c.id).unwrap().unwrap();
                let data = zstd::bulk::decompress(&frame, c.size as usize).unwrap();
                assert_eq!(ChunkId::of(&data), c.id);
            }
        }
        let problems = store.verify(|_| {}).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
    }

    /// Ingests each NAR into a pack of its own (the writer rotates after each).
    fn store_with_packs(dir: &std::path::Path, nars: &[Vec<u8>]) -> Store {
        let store = Store::open(dir).unwrap();
        for (i, nar) in nars.iter().enumerate() {
            let hash = format!("{}", (b'a' + i as u8) as char).repeat(32);
            ingest(&store, &hash, nar, None, &[]);
            lock(&store.writer).rotate().unwrap();
        }
        store
    }

    fn opts(level: i32) -> CompactOptions {
        CompactOptions {
            level,
            min_age: Duration::ZERO,
            max_packs: None,
        }
    }

    #[test]
    fn compaction_shrinks_the_packs_and_every_nar_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let nars: Vec<Vec<u8>> = (1..=3).map(text_nar).collect();
        let store = store_with_packs(dir.path(), &nars);
        let before = store.stats().unwrap();
        let report = store.compact(opts(19), &|| false).unwrap();
        assert_eq!(report.packs_in, 3, "{report:?}");
        assert_eq!(report.packs_out, 1, "small packs are compacted into one");
        assert!(report.skipped.is_empty());
        assert!(report.bytes_out < report.bytes_in, "{report:?}");
        let after = store.stats().unwrap();
        assert!(
            after.chunk_compressed_bytes < before.chunk_compressed_bytes,
            "{} -> {}",
            before.chunk_compressed_bytes,
            after.chunk_compressed_bytes
        );
        assert_intact(&store, &nars);
        // Compacted packs are not compacted again; new data is.
        let again = store.compact(opts(19), &|| false).unwrap();
        assert_eq!(again.packs_in, 0, "{again:?}");
        let more = text_nar(9);
        ingest(&store, &"x".repeat(32), &more, None, &[]);
        lock(&store.writer).rotate().unwrap();
        let third = store.compact(opts(19), &|| false).unwrap();
        assert_eq!(third.packs_in, 1, "{third:?}");
        let mut all = nars.clone();
        all.push(more);
        assert_intact(&store, &all);
        // The store reopens as it was.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_intact(&store, &all);
    }

    #[test]
    fn limits_and_stops_leave_packs_for_later() {
        let dir = tempfile::tempdir().unwrap();
        let nars: Vec<Vec<u8>> = (1..=3).map(text_nar).collect();
        let store = store_with_packs(dir.path(), &nars);
        let young = CompactOptions {
            min_age: Duration::from_secs(3600),
            ..opts(19)
        };
        assert_eq!(store.compact(young, &|| false).unwrap().packs_in, 0);
        let stopped = store.compact(opts(19), &|| true).unwrap();
        assert_eq!((stopped.packs_in, stopped.packs_left), (0, 3));
        let one = CompactOptions {
            max_packs: Some(1),
            ..opts(19)
        };
        let r = store.compact(one, &|| false).unwrap();
        assert_eq!((r.packs_in, r.packs_left), (1, 2), "{r:?}");
        assert_intact(&store, &nars);
    }

    #[test]
    fn a_crash_before_the_old_packs_are_deleted_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let nars: Vec<Vec<u8>> = (1..=2).map(text_nar).collect();
        let store = store_with_packs(dir.path(), &nars);
        let packs_dir = dir.path().join("packs");
        let count = || std::fs::read_dir(&packs_dir).unwrap().count();
        let before = count();
        // Committed, but the process dies before deleting the old packs.
        let r = store
            .compact_with(opts(19), &|| false, &mut |_| Ok(()))
            .unwrap();
        assert_eq!(r.packs_in, 2);
        assert!(count() > before, "old and new packs both on disk");
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(count() < before + 1, "the old packs were swept on open");
        assert_intact(&store, &nars);
    }

    #[test]
    fn the_pack_being_appended_to_is_compacted_once_cold() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = text_nar(1);
        ingest(&store, &"a".repeat(32), &first, None, &[]);
        let r = store.compact(opts(19), &|| false).unwrap();
        assert_eq!(r.packs_in, 1, "{r:?}");
        // Ingest goes on in a fresh pack, never in the compacted one.
        let second = text_nar(2);
        ingest(&store, &"b".repeat(32), &second, None, &[]);
        let r = store.compact(opts(19), &|| false).unwrap();
        assert_eq!(r.packs_in, 1, "only the new data: {r:?}");
        assert_intact(&store, &[first, second]);
    }
}
