//! The index against the packs: what `Store::open` proves before it cuts anything, and
//! `verify --repair`, which rebuilds the index from the packs alone.
//!
//! Open never truncates or deletes bytes that a metadata record newer than the index's last
//! commit names (`meta`): such a record proves the index older than the packs (restored
//! from a backup, or the packs copied in), and open refuses, naming `verify --repair`. What
//! it may still cut — the open pack's tail past its committed length, and packs above the
//! last one the index knows — then holds chunk records of a unit that never committed, or
//! copies made by an interrupted pack GC whose originals are still live.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::ReadableTable;
use serde::Serialize;

use super::meta::{MetaLoc, NarMeta};
use super::pack::{self, Location, RecordKind, FILE_HEADER};
use super::storage::{open_storage, PackStorage, StorageSpec};
use super::tables::*;
use super::{
    add_counter, create_tables, io_err, new_dctx, now_unix, open_database, storage_name,
    StorageOptions, StoreError, StoredNarInfo,
};
use crate::core::manifest::Manifest;
use crate::core::ChunkId;

/// Pack files in a directory: id → length.
pub(super) fn pack_files(dir: &Path) -> Result<BTreeMap<u32, u64>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out = BTreeMap::new();
    for e in entries {
        let e = e.map_err(io_err(dir))?;
        let Some(pack) = e
            .file_name()
            .to_str()
            .and_then(super::evict::parse_pack_name)
        else {
            continue;
        };
        let len = e.metadata().map_err(io_err(&e.path()))?.len();
        out.insert(pack, len);
    }
    Ok(out)
}

fn mismatch(dir: &Path, reason: String) -> StoreError {
    StoreError::IndexMismatch {
        dir: dir.to_path_buf(),
        reason,
    }
}

/// Checks, before open cuts anything, that the packs hold nothing the index does not know
/// of (see the module comment), but the one commit a crash may have interrupted after its
/// fsync: that one is returned, to be adopted. `known`: the index's packs and committed
/// lengths.
pub(super) fn check_agreement(
    data_dir: &Path,
    pack_dir: &Path,
    known: &BTreeMap<u32, u64>,
    meta_seq: u64,
    remote: &HashMap<u32, u64>,
    db: &redb::Database,
) -> Result<Option<Adoption>, StoreError> {
    let files = pack_files(pack_dir)?;
    let last = known.keys().next_back().copied();
    for (&p, &len) in known {
        match files.get(&p).or_else(|| remote.get(&p)) {
            None => {
                return Err(mismatch(
                    data_dir,
                    format!("pack {p} is in the index but neither on disk nor in the storage"),
                ))
            }
            Some(&on_disk) if on_disk < len => {
                return Err(mismatch(
                    data_dir,
                    format!("pack {p} is {on_disk} bytes, the index says {len}"),
                ))
            }
            _ => {}
        }
    }
    // Sealed packs are uploaded only once committed: one the index does not know past its
    // last was committed by a newer index.
    if let Some(p) = remote
        .keys()
        .find(|&&p| !known.contains_key(&p) && last.is_none_or(|l| p > l))
    {
        return Err(mismatch(
            data_dir,
            format!("the storage holds pack {p}, past the index's last pack"),
        ));
    }
    let mut dctx = new_dctx(data_dir)?;
    // The tail: the open pack past its committed length, then packs past the last known.
    let mut tail_chunks: HashMap<ChunkId, Location> = HashMap::new();
    let mut ends: BTreeMap<u32, u64> = BTreeMap::new();
    let mut next: Option<(NarMeta, MetaLoc)> = None;
    for (&p, &len) in &files {
        let start = match known.get(&p) {
            Some(&committed) => committed,
            None if last.is_none_or(|l| p > l) => FILE_HEADER.len() as u64,
            None => continue, // below the last: a GC'd pack whose delete was interrupted
        };
        if start >= len {
            continue;
        }
        let scan = match pack::scan_from(pack_dir, p, start) {
            Ok(s) => s,
            Err(pack::PackError::BadHeader { .. }) => continue, // a pack created, never written
            Err(e) => return Err(e.into()),
        };
        ends.insert(p, scan.end);
        let path = pack::pack_path(pack_dir, p);
        let file = fs::File::open(&path).map_err(io_err(&path))?;
        for (h, loc) in &scan.records {
            if h.kind == RecordKind::Chunk {
                tail_chunks.entry(h.id).or_insert(*loc);
                continue;
            }
            // A record that does not read is a torn write's: no commit can depend on it.
            let Ok(data) = pack::read_chunk(&file, &path, loc, &h.id, &mut dctx) else {
                continue;
            };
            let Ok(meta) = NarMeta::decode(&data) else {
                continue;
            };
            if meta.seq <= meta_seq {
                continue; // a copy an interrupted pack GC made
            }
            if meta.seq > meta_seq + 1 || next.is_some() {
                return Err(mismatch(
                    data_dir,
                    format!(
                        "pack {p} holds the metadata record of commit {} past the index's \
                         last commit {meta_seq}: the index is older than the packs",
                        meta.seq
                    ),
                ));
            }
            let m = MetaLoc {
                loc: *loc,
                id: h.id,
                seq: meta.seq,
            };
            next = Some((meta, m));
        }
    }
    let Some((meta, loc)) = next else {
        return Ok(None);
    };
    adoption(db, pack_dir, meta, loc, tail_chunks, &ends, &mut dctx)
}

/// The commit right after the index's last, whose records are all in the tail (a crash came
/// between their fsync and the commit): adopted when every chunk its manifest names is in
/// the index or, checked, in the tail; else (a crash before the fsync) `None`, and the tail
/// is cut as a crashed unit's.
fn adoption(
    db: &redb::Database,
    pack_dir: &Path,
    meta: NarMeta,
    loc: MetaLoc,
    tail_chunks: HashMap<ChunkId, Location>,
    ends: &BTreeMap<u32, u64>,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<Option<Adoption>, StoreError> {
    let Ok(manifest) = Manifest::decode(&meta.manifest) else {
        return Ok(None);
    };
    let txn = db.begin_read()?;
    let chunks_t = txn.open_table(CHUNKS)?;
    let mut chunks = HashMap::new();
    for c in &manifest.chunks {
        if chunks.contains_key(&c.id) || chunks_t.get(c.id.0)?.is_some() {
            continue;
        }
        let Some(l) = tail_chunks.get(&c.id) else {
            return Ok(None);
        };
        let path = pack::pack_path(pack_dir, l.pack);
        let file = fs::File::open(&path).map_err(io_err(&path))?;
        if pack::read_chunk(&file, &path, l, &c.id, dctx).is_err() {
            return Ok(None);
        }
        chunks.insert(c.id, *l);
    }
    let has_nar = txn
        .open_table(MANIFESTS)?
        .get(manifest.nar_hash.0)?
        .is_some();
    // The packs written up to the record: whole ones, then the record's, to its end.
    let lengths = ends
        .range(..=loc.loc.pack)
        .map(|(&p, &end)| {
            if p == loc.loc.pack {
                (p, loc.loc.offset + loc.loc.record_len())
            } else {
                (p, end)
            }
        })
        .collect();
    Ok(Some(Adoption {
        meta,
        loc,
        manifest: (!has_nar).then_some(manifest),
        chunks,
        lengths,
    }))
}

/// A commit a crash interrupted after its records were fsynced, to be committed at open.
pub(super) struct Adoption {
    pub(super) meta: NarMeta,
    pub(super) loc: MetaLoc,
    /// The NAR's manifest, if the index does not hold it yet.
    pub(super) manifest: Option<Manifest>,
    /// Its chunks the index lacks, in the tail.
    pub(super) chunks: HashMap<ChunkId, Location>,
    /// Committed lengths of the packs it wrote.
    pub(super) lengths: Vec<(u32, u64)>,
}

/// What `verify --repair` found and restored.
#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    /// Where the index that was replaced went (nothing is deleted).
    pub old_index: Option<PathBuf>,
    pub packs: u64,
    pub pack_bytes: u64,
    pub chunk_records: u64,
    /// Bytes of remote packs downloaded to be read.
    pub downloaded_bytes: u64,
    /// Chunk records whose chunk is stored again elsewhere (dead).
    pub duplicate_chunk_records: u64,
    pub metadata_records: u64,
    /// Metadata records that did not read or decode (dead).
    pub damaged_metadata_records: u64,
    pub paths_restored: u64,
    pub nars_restored: u64,
    pub pinned_restored: u64,
    /// Paths whose newest metadata record names a chunk no pack holds: not restored.
    pub paths_incomplete: Vec<String>,
    /// Bytes past the last whole record of a pack (a torn write).
    pub torn_bytes: u64,
    /// Files named like packs that are not (their header is damaged), renamed
    /// `*.pack.damaged` and left out.
    pub unreadable_packs: Vec<String>,
    /// Bytes no restored path needs (collected by the next pack GC).
    pub dead_bytes: u64,
}

/// Most bytes of a remote pack read in one request while downloading it.
const DOWNLOAD_PIECE: u64 = 16 << 20;

/// Downloads remote pack `pack` (`len` bytes) to `dir` as a pack file.
fn download(storage: &dyn PackStorage, pack: u32, len: u64, dir: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = pack::pack_path(dir, pack);
    let mut f = fs::File::create(&path).map_err(io_err(&path))?;
    let mut at = 0;
    while at < len {
        let n = DOWNLOAD_PIECE.min(len - at);
        let bytes = storage.read_range(pack, at, n)?;
        io::Write::write_all(&mut f, &bytes).map_err(io_err(&path))?;
        at += n;
    }
    Ok(())
}

struct Found {
    meta: NarMeta,
    loc: MetaLoc,
}

/// Rebuilds the index of the data directory `dir` from its packs alone. The old index (if
/// any) is moved aside, never deleted; the DHT database is left as it is. Not restored:
/// hidden marks and tombstones of a GC policy, compaction levels, and last-access times
/// (set to now).
pub fn repair(dir: &Path, opts: &StorageOptions) -> Result<RepairReport, StoreError> {
    let spec = opts.spec()?;
    let remote = match &spec {
        StorageSpec::Local => None,
        StorageSpec::S3(_) => Some(open_storage(&spec, &dir.join("packs"))?),
    };
    repair_inner(dir, &spec, remote)
}

/// [`repair`] with the remote storage (for `spec`) already open.
pub(super) fn repair_inner(
    dir: &Path,
    spec: &StorageSpec,
    remote: Option<Arc<dyn PackStorage>>,
) -> Result<RepairReport, StoreError> {
    let pack_dir = dir.join("packs");
    let index = dir.join("index.redb");
    let mut report = RepairReport::default();
    if index.exists() {
        // Refuse while a daemon holds it; a damaged one is moved aside as it is.
        if let Err(e @ StoreError::Locked(_)) = open_database(&index, dir, "") {
            return Err(e);
        }
        let aside = dir.join(format!("index.redb.before-repair-{}", now_unix()));
        fs::rename(&index, &aside).map_err(io_err(&index))?;
        report.old_index = Some(aside);
    }
    // Every pack: local ones, then those only the remote storage holds (downloaded one at a
    // time to be read).
    let mut files: BTreeMap<u32, (u64, bool)> = pack_files(&pack_dir)?
        .into_iter()
        .map(|(p, len)| (p, (len, false)))
        .collect();
    if let Some(r) = &remote {
        for (p, len) in r.list_packs()? {
            files.entry(p).or_insert((len, true));
        }
    }
    let download_dir = dir.join("repair-download");
    let mut dctx = new_dctx(dir)?;
    let mut chunks: HashMap<ChunkId, Location> = HashMap::new();
    let mut found: HashMap<String, Found> = HashMap::new();
    // Per pack: (file length, bytes of records kept live).
    let mut sizes: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    let mut last_torn = false;
    for (&p, &(len, is_remote)) in &files {
        let scan_dir = match (&remote, is_remote) {
            (Some(r), true) => {
                download(r.as_ref(), p, len, &download_dir)?;
                report.downloaded_bytes += len;
                &download_dir
            }
            _ => &pack_dir,
        };
        let path = pack::pack_path(scan_dir, p);
        let scan = match pack::scan(scan_dir, p) {
            Ok(s) => s,
            Err(e) if is_remote => {
                report
                    .unreadable_packs
                    .push(format!("remote pack {p}: {e}"));
                let _ = fs::remove_file(&path);
                continue;
            }
            Err(e) => {
                // Not a pack any more (its file header is gone): kept aside, never deleted.
                let aside = path.with_extension("pack.damaged");
                fs::rename(&path, &aside).map_err(io_err(&path))?;
                report
                    .unreadable_packs
                    .push(format!("{}: {e}", aside.display()));
                continue;
            }
        };
        report.packs += 1;
        report.pack_bytes += len;
        sizes.insert(p, (len, 0));
        report.torn_bytes += scan.file_len - scan.end;
        last_torn = scan.file_len > scan.end;
        let file = fs::File::open(&path).map_err(io_err(&path))?;
        for (h, loc) in scan.records {
            match h.kind {
                RecordKind::Chunk => {
                    report.chunk_records += 1;
                    match chunks.entry(h.id) {
                        std::collections::hash_map::Entry::Occupied(_) => {
                            report.duplicate_chunk_records += 1;
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(loc);
                        }
                    }
                }
                RecordKind::Meta => {
                    report.metadata_records += 1;
                    let meta = pack::read_chunk(&file, &path, &loc, &h.id, &mut dctx)
                        .ok()
                        .and_then(|d| NarMeta::decode(&d).ok());
                    let Some(meta) = meta else {
                        report.damaged_metadata_records += 1;
                        continue;
                    };
                    let m = MetaLoc {
                        loc,
                        id: h.id,
                        seq: meta.seq,
                    };
                    let newer = found.get(&meta.hash).is_none_or(|f| f.meta.seq < meta.seq);
                    if newer {
                        found.insert(meta.hash.clone(), Found { meta, loc: m });
                    }
                }
            }
        }
        if is_remote {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    let _ = fs::remove_dir(&download_dir);

    let db = open_database(&index, dir, "move it aside and run verify --repair again")?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&index, fs::Permissions::from_mode(0o600)).map_err(io_err(&index))?;
    }
    let txn = db.begin_write()?;
    create_tables(&txn)?;
    txn.open_table(SETTINGS)?
        .insert(S_STORAGE, storage_name(spec).as_str())?;
    {
        let mut narinfos = txn.open_table(NARINFOS)?;
        let mut manifests = txn.open_table(MANIFESTS)?;
        let mut refs = txn.open_table(MANIFEST_REFS)?;
        let mut metas = txn.open_table(NAR_META)?;
        let mut nar_files = txn.open_table(NAR_FILES)?;
        let mut access = txn.open_table(NAR_ACCESS)?;
        let mut pins = txn.open_table(PINS)?;
        let mut counters = txn.open_table(COUNTERS)?;
        let mut refcounts: HashMap<ChunkId, u32> = HashMap::new();
        let mut max_seq = 0;
        let mut by_seq: Vec<Found> = found.into_values().collect();
        by_seq.sort_by_key(|f| f.meta.seq);
        let now = now_unix();
        for f in by_seq {
            max_seq = max_seq.max(f.meta.seq);
            let hash = f.meta.hash.as_str();
            let restored = (|| {
                let rec = StoredNarInfo::decode(hash, &f.meta.narinfo).ok()?;
                let m = Manifest::decode(&f.meta.manifest).ok()?;
                (m.nar_hash == rec.nar_hash && m.chunks.iter().all(|c| chunks.contains_key(&c.id)))
                    .then_some((rec, m))
            })();
            let Some((rec, m)) = restored else {
                report.paths_incomplete.push(hash.to_string());
                continue;
            };
            if manifests.get(m.nar_hash.0)?.is_none() {
                manifests.insert(m.nar_hash.0, f.meta.manifest.as_slice())?;
                for c in &m.chunks {
                    *refcounts.entry(c.id).or_default() += 1;
                }
                add_counter(&mut counters, C_NARS, 1)?;
                add_counter(&mut counters, C_NAR_BYTES, m.nar_size as i64)?;
                access.insert(m.nar_hash.0, now)?;
                report.nars_restored += 1;
            }
            let r = refs.get(m.nar_hash.0)?.map(|v| v.value()).unwrap_or(0);
            refs.insert(m.nar_hash.0, r + 1)?;
            narinfos.insert(hash, f.meta.narinfo.as_slice())?;
            add_counter(&mut counters, C_NARINFOS, 1)?;
            metas.insert(hash, f.loc.row())?;
            if let Some(name) = &f.meta.nar_file {
                nar_files.insert(name.as_str(), rec.nar_hash.0)?;
            }
            if f.meta.pinned {
                pins.insert(hash, now)?;
                report.pinned_restored += 1;
            }
            if let Some(s) = sizes.get_mut(&f.loc.loc.pack) {
                s.1 += f.loc.loc.record_len();
            }
            report.paths_restored += 1;
        }
        let mut chunks_t = txn.open_table(CHUNKS)?;
        for (id, rc) in &refcounts {
            let loc = chunks[id];
            chunks_t.insert(id.0, (loc.pack, loc.offset, loc.comp_len, loc.raw_len, *rc))?;
            add_counter(&mut counters, C_CHUNKS, 1)?;
            add_counter(&mut counters, C_UNIQUE_CHUNK_BYTES, loc.raw_len as i64)?;
            add_counter(&mut counters, C_CHUNK_COMPRESSED_BYTES, loc.comp_len as i64)?;
            if let Some(s) = sizes.get_mut(&loc.pack) {
                s.1 += loc.record_len();
            }
        }
        counters.insert(C_META_SEQ, max_seq)?;
        let mut packs = txn.open_table(PACKS)?;
        let mut dead = txn.open_table(PACK_DEAD)?;
        for (&p, &(len, live)) in &sizes {
            packs.insert(p, len)?;
            let d = (len - FILE_HEADER.len() as u64).saturating_sub(live);
            if d > 0 {
                dead.insert(p, d)?;
                add_counter(&mut counters, C_DEAD_BYTES, d as i64)?;
                report.dead_bytes += d;
            }
        }
        // Appends never go after a torn record: then they start a fresh pack. (The last pack
        // being remote, open starts one anyway.)
        if let (Some(&last), true) = (sizes.keys().next_back(), last_torn) {
            let writer = pack::PackWriter::open(&pack_dir, last + 1, None)?;
            drop(writer);
            packs.insert(last + 1, FILE_HEADER.len() as u64)?;
        }
    }
    txn.commit()?;
    report.paths_incomplete.sort();
    tracing::info!(
        packs = report.packs,
        paths = report.paths_restored,
        incomplete = report.paths_incomplete.len(),
        "index rebuilt from the packs"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{evict::lock, Retention, Store};
    use super::*;
    use crate::core::NarHash;

    const H: [&str; 4] = [
        "0123456789abcdfghijklmnpqrsvwxyz",
        "1123456789abcdfghijklmnpqrsvwxyz",
        "2123456789abcdfghijklmnpqrsvwxyz",
        "3123456789abcdfghijklmnpqrsvwxyz",
    ];

    /// Every stored path with its NAR as the store reassembles it, and the pins.
    fn contents(store: &Store) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
        let mut out = Vec::new();
        for (hash, rec) in store.narinfos().unwrap() {
            out.push((hash, read_nar(store, &rec.nar_hash)));
        }
        out.sort();
        (out, store.pins().unwrap())
    }

    fn assert_mismatch(dir: &Path) {
        match Store::open(dir) {
            Err(e @ StoreError::IndexMismatch { .. }) => {
                assert!(e.to_string().contains("verify --repair"), "{e}");
            }
            Err(e) => panic!("expected an index mismatch, got {e}"),
            Ok(_) => panic!("opened a store whose index is older than its packs"),
        }
    }

    #[test]
    fn a_lost_index_is_refused_then_rebuilt_from_the_packs() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let store = Store::open(dir.path()).unwrap();
            let a = sample_nar(1);
            ingest_as(&store, H[0], &a, None, &[], Retention::Pinned);
            ingest(&store, H[1], &sample_nar(2), None, &[]);
            lock(&store.writer).rotate().unwrap();
            // Shares every chunk with H[0]'s NAR: a second path of one NAR.
            ingest(&store, H[2], &a, None, &[]);
            ingest(&store, H[3], &sample_nar(3), None, &[]);
            // Evicted: its records are dead, and it is not restored.
            store.remove_path(H[3]).unwrap();
            assert!(store.verify(|_| {}).unwrap().is_empty());
            contents(&store)
        };
        assert_eq!(before.0.len(), 3);
        fs::remove_file(dir.path().join("index.redb")).unwrap();
        assert_mismatch(dir.path());
        // The refused open left the packs as they were.
        let report = repair(dir.path(), &StorageOptions::default()).unwrap();
        assert_eq!(report.paths_incomplete, Vec::<String>::new());
        assert_eq!(report.pinned_restored, 1);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
        let after = contents(&store);
        // H[3] comes back: its records were dead but still in the pack (no GC ran).
        assert_eq!(after.0.len(), 4);
        assert_eq!(&after.0[..3], &before.0[..]);
        assert_eq!(after.1, before.1);
        // Ingest goes on, and the next open agrees.
        ingest(
            &store,
            "4123456789abcdfghijklmnpqrsvwxyz",
            &sample_nar(4),
            None,
            &[],
        );
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn an_older_index_is_refused_and_repair_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("index.redb");
        let backup = dir.path().join("backup.redb");
        {
            let store = Store::open(dir.path()).unwrap();
            ingest(&store, H[0], &sample_nar(1), None, &[]);
        }
        fs::copy(&index, &backup).unwrap();
        let before = {
            let store = Store::open(dir.path()).unwrap();
            ingest(&store, H[1], &sample_nar(2), None, &[]);
            lock(&store.writer).rotate().unwrap();
            ingest(&store, H[2], &sample_nar(3), None, &[]);
            contents(&store)
        };
        let pack_dir = dir.path().join("packs");
        let packs_before = pack_files(&pack_dir).unwrap();
        fs::copy(&backup, &index).unwrap();
        assert_mismatch(dir.path());
        assert_eq!(
            pack_files(&pack_dir).unwrap(),
            packs_before,
            "open cut nothing"
        );
        let report = repair(dir.path(), &StorageOptions::default()).unwrap();
        assert!(report.old_index.is_some());
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
        assert_eq!(contents(&store), before);
    }

    #[test]
    fn a_commit_cut_short_after_its_fsync_is_adopted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("index.redb");
        let before_commit = dir.path().join("before.redb");
        {
            let store = Store::open(dir.path()).unwrap();
            ingest(&store, H[0], &sample_nar(1), None, &[]);
        }
        fs::copy(&index, &before_commit).unwrap();
        let want = {
            let store = Store::open(dir.path()).unwrap();
            ingest_as(&store, H[1], &sample_nar(2), None, &[], Retention::Pinned);
            contents(&store)
        };
        // The pack holds H[1]'s records, fsynced; the index is as before its commit.
        fs::copy(&before_commit, &index).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(contents(&store), want);
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
        ingest(&store, H[2], &sample_nar(3), None, &[]);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_crash_tail_without_metadata_is_still_cut() {
        let dir = tempfile::tempdir().unwrap();
        let pack_dir = dir.path().join("packs");
        let committed = {
            let store = Store::open(dir.path()).unwrap();
            ingest(&store, H[0], &sample_nar(1), None, &[]);
            let w = lock(&store.writer);
            fs::metadata(pack::pack_path(&pack_dir, w.pack()))
                .unwrap()
                .len()
        };
        // A unit that wrote chunk records, then crashed before its metadata and commit.
        {
            let mut w = pack::PackWriter::open(&pack_dir, 1, Some(committed)).unwrap();
            let mut c = zstd::bulk::Compressor::new(3).unwrap();
            let data = noise(9, 5000);
            let id = ChunkId::of(&data);
            let mut frame = Vec::new();
            let h = pack::compress_record(&mut c, &id, &data, &mut frame).unwrap();
            w.append_record(&[&h[..], &frame].concat()).unwrap();
            w.sync().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            fs::metadata(pack::pack_path(&pack_dir, 1)).unwrap().len(),
            committed
        );
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn paths_from_before_metadata_records_get_theirs_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let nar = sample_nar(1);
        {
            let store = Store::open(dir.path()).unwrap();
            ingest_as(&store, H[0], &nar, None, &[], Retention::Pinned);
            // As an index from before metadata records: no rows, the records not counted.
            let txn = store.db.begin_write().unwrap();
            {
                let mut metas = txn.open_table(NAR_META).unwrap();
                let rows: Vec<_> = metas
                    .iter()
                    .unwrap()
                    .map(|r| r.unwrap().0.value().to_string())
                    .collect();
                let mut dead = txn.open_table(PACK_DEAD).unwrap();
                let mut counters = txn.open_table(COUNTERS).unwrap();
                for h in rows {
                    super::super::meta::forget(&mut metas, &mut dead, &mut counters, &h).unwrap();
                }
                counters.insert(C_META_SEQ, 0).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
        drop(store);
        fs::remove_file(dir.path().join("index.redb")).unwrap();
        repair(dir.path(), &StorageOptions::default()).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(read_nar(&store, &NarHash::digest(&nar)), nar);
        assert_eq!(store.pins().unwrap(), vec![H[0].to_string()]);
    }

    #[test]
    fn a_torn_last_record_is_dead_and_appends_go_to_a_fresh_pack() {
        let dir = tempfile::tempdir().unwrap();
        let pack_dir = dir.path().join("packs");
        let nar = sample_nar(1);
        {
            let store = Store::open(dir.path()).unwrap();
            ingest(&store, H[0], &nar, None, &[]);
        }
        let last = pack::pack_path(&pack_dir, 1);
        let mut f = fs::OpenOptions::new().append(true).open(&last).unwrap();
        std::io::Write::write_all(&mut f, &pack::META_MAGIC[..]).unwrap();
        std::io::Write::write_all(&mut f, &[0u8; 30]).unwrap();
        drop(f);
        fs::remove_file(dir.path().join("index.redb")).unwrap();
        let report = repair(dir.path(), &StorageOptions::default()).unwrap();
        assert_eq!((report.torn_bytes, report.paths_restored), (34, 1));
        assert_eq!(report.dead_bytes, 34);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(lock(&store.writer).pack(), 2);
        ingest(&store, H[1], &sample_nar(2), None, &[]);
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
        assert_eq!(read_nar(&store, &NarHash::digest(&nar)), nar);
    }

    #[test]
    fn pack_gc_moves_metadata_records_with_the_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let nar = sample_nar(2);
        {
            let store = Store::open(dir.path()).unwrap();
            ingest(&store, H[0], &sample_nar(1), None, &[]);
            ingest(&store, H[1], &nar, None, &[]);
            lock(&store.writer).rotate().unwrap();
            store.remove_path(H[0]).unwrap();
            let r = store.gc_packs(super::super::GcPolicy::AllDead).unwrap();
            assert_eq!(r.packs, 1);
            assert!(!pack::pack_path(&dir.path().join("packs"), 1).exists());
            assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
        }
        fs::remove_file(dir.path().join("index.redb")).unwrap();
        let report = repair(dir.path(), &StorageOptions::default()).unwrap();
        assert_eq!(report.paths_restored, 1);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
        assert_eq!(read_nar(&store, &NarHash::digest(&nar)), nar);
    }
}
