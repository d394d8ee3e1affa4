//! Metadata records (`NPMD` in a pack, see `pack`): everything the index knows of a stored
//! path that the packs' chunk records do not say — its narinfo record, the NAR's manifest,
//! the NAR file name it came with, whether it was pinned — so that `verify --repair` can
//! rebuild the index from the packs alone.
//!
//! Every commit that stores a narinfo appends one, in the same unit as the NAR's chunks
//! (fsynced before the commit), numbered by `seq`: the index counts the records it committed
//! (`C_META_SEQ`), so a pack tail past the committed length that holds a record numbered
//! beyond it proves the index older than the packs. A newer record of a path supersedes an
//! older one; the index points at the newest (`NAR_META`), the older ones are dead bytes.

use std::collections::HashSet;
use std::path::Path;

use redb::{ReadableTable, WriteTransaction};

use crate::core::ChunkId;

use super::evict::add_dead;
use super::pack::{Location, PackWriter};
use super::tables::{C_META_SEQ, NAR_META};
use super::{PackFiles, StoreError};

/// Format version of the encoded payload.
const VERSION: u8 = 1;

/// Longest payload accepted when decoding (a manifest of a very large NAR is a few MB).
const MAX_FIELD: usize = 256 << 20;

/// One path's metadata, as a record holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NarMeta {
    /// Position in the index's commit order.
    pub seq: u64,
    /// Store-path hash.
    pub hash: String,
    pub pinned: bool,
    /// `StoredNarInfo` as the index stores it.
    pub narinfo: Vec<u8>,
    /// The manifest as the index stores it.
    pub manifest: Vec<u8>,
    /// The NAR file name its narinfo was received with, if any.
    pub nar_file: Option<String>,
}

/// Why a metadata payload did not decode.
#[derive(Debug, thiserror::Error)]
#[error("metadata record: {0}")]
pub(crate) struct MetaError(&'static str);

impl NarMeta {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let nar_file = self.nar_file.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(
            32 + self.hash.len() + self.narinfo.len() + self.manifest.len() + nar_file.len(),
        );
        out.push(VERSION);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.push(u8::from(self.pinned));
        for field in [
            self.hash.as_bytes(),
            &self.narinfo,
            &self.manifest,
            nar_file.as_bytes(),
        ] {
            out.extend_from_slice(&(field.len() as u32).to_le_bytes());
            out.extend_from_slice(field);
        }
        out
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, MetaError> {
        let mut r = Reader(b);
        if r.take(1)? != [VERSION] {
            return Err(MetaError("unknown version"));
        }
        let seq = u64::from_le_bytes(r.take(8)?.try_into().map_err(|_| MetaError("seq"))?);
        let pinned = match r.take(1)? {
            [0] => false,
            [1] => true,
            _ => return Err(MetaError("bad pinned flag")),
        };
        let hash = String::from_utf8(r.field()?.to_vec()).map_err(|_| MetaError("hash"))?;
        if hash.len() != 32 || !hash.bytes().all(|c| c.is_ascii_alphanumeric()) {
            return Err(MetaError("not a store-path hash"));
        }
        let narinfo = r.field()?.to_vec();
        let manifest = r.field()?.to_vec();
        let nar_file =
            String::from_utf8(r.field()?.to_vec()).map_err(|_| MetaError("NAR file name"))?;
        if !r.0.is_empty() {
            return Err(MetaError("trailing bytes"));
        }
        Ok(Self {
            seq,
            hash,
            pinned,
            narinfo,
            manifest,
            nar_file: (!nar_file.is_empty()).then_some(nar_file),
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MetaError> {
        if self.0.len() < n {
            return Err(MetaError("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn field(&mut self) -> Result<&'a [u8], MetaError> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| MetaError("len"))?);
        let len = len as usize;
        if len > MAX_FIELD {
            return Err(MetaError("field too long"));
        }
        self.take(len)
    }
}

/// Where a path's newest metadata record is (the `NAR_META` row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MetaLoc {
    pub loc: Location,
    pub id: ChunkId,
    pub seq: u64,
}

/// `NAR_META` row value: (pack, offset, comp_len, raw_len, seq, record digest).
pub(crate) type MetaRow = (u32, u64, u32, u32, u64, [u8; 32]);

impl MetaLoc {
    pub(crate) fn row(&self) -> MetaRow {
        (
            self.loc.pack,
            self.loc.offset,
            self.loc.comp_len,
            self.loc.raw_len,
            self.seq,
            self.id.0,
        )
    }

    pub(crate) fn of_row(v: MetaRow) -> Self {
        Self {
            loc: Location {
                pack: v.0,
                offset: v.1,
                comp_len: v.2,
                raw_len: v.3,
            },
            seq: v.4,
            id: ChunkId(v.5),
        }
    }
}

/// Reads and checks the metadata record at `m` (digest, zstd frame) and decodes it.
pub(super) fn read(
    packs: &PackFiles,
    m: &MetaLoc,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<NarMeta, StoreError> {
    let data = packs.read(&m.id, &m.loc, dctx)?;
    NarMeta::decode(&data).map_err(|e| bad_record(&packs.dir, m, e))
}

pub(super) fn bad_record(dir: &Path, m: &MetaLoc, e: MetaError) -> StoreError {
    StoreError::Pack(Box::new(super::pack::PackError::BadChunk {
        path: super::pack::pack_path(dir, m.loc.pack),
        offset: m.loc.offset,
        id: m.id,
        reason: e.to_string(),
    }))
}

/// Points a path at its new metadata record in a commit; the record it replaces is dead.
pub(super) fn commit(
    txn: &WriteTransaction,
    dead: &mut redb::Table<u32, u64>,
    counters: &mut redb::Table<&str, u64>,
    hash: &str,
    m: &MetaLoc,
) -> Result<(), StoreError> {
    let old = txn
        .open_table(NAR_META)?
        .insert(hash, m.row())?
        .map(|v| MetaLoc::of_row(v.value()));
    if let Some(old) = old {
        add_dead(dead, counters, old.loc.pack, old.loc.record_len() as i64)?;
    }
    let seq = counters.get(C_META_SEQ)?.map(|v| v.value()).unwrap_or(0);
    counters.insert(C_META_SEQ, seq.max(m.seq))?;
    Ok(())
}

/// Forgets a removed path's metadata record; returns its bytes, now dead.
pub(super) fn forget(
    metas: &mut redb::Table<&str, MetaRow>,
    dead: &mut redb::Table<u32, u64>,
    counters: &mut redb::Table<&str, u64>,
    hash: &str,
) -> Result<u64, StoreError> {
    let old = metas.remove(hash)?.map(|v| MetaLoc::of_row(v.value()));
    let Some(old) = old else {
        return Ok(0);
    };
    add_dead(dead, counters, old.loc.pack, old.loc.record_len() as i64)?;
    Ok(old.loc.record_len())
}

/// A metadata record copied by a pack rewrite: the path, where it was, where it is now.
pub(super) type Moved = (String, MetaLoc, MetaLoc);

/// Copies the live metadata records of `packs` (about to be dropped by pack GC or
/// compaction) to the writer as they are, checked first. The caller fsyncs and commits
/// them with [`repoint`].
pub(super) fn copy_live(
    db: &redb::Database,
    packs_files: &PackFiles,
    writer: &mut PackWriter,
    packs: &HashSet<u32>,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<Vec<Moved>, StoreError> {
    let mut live = Vec::new();
    {
        let txn = db.begin_read()?;
        for r in txn.open_table(NAR_META)?.iter()? {
            let (k, v) = r?;
            let m = MetaLoc::of_row(v.value());
            if packs.contains(&m.loc.pack) {
                live.push((k.value().to_string(), m));
            }
        }
    }
    live.sort_by_key(|(_, m)| (m.loc.pack, m.loc.offset));
    let mut moved = Vec::with_capacity(live.len());
    for (hash, old) in live {
        let h = packs_files.get(old.loc.pack)?;
        let rec = super::pack::read_checked_record(&*h.src, &h.path, &old.loc, &old.id, dctx)?;
        let loc = writer.append_record(&rec)?;
        moved.push((hash, old, MetaLoc { loc, ..old }));
    }
    Ok(moved)
}

/// Points the paths at their copied records, unless a commit replaced or removed the record
/// meanwhile (then the copy is dead).
pub(super) fn repoint(
    txn: &WriteTransaction,
    dead: &mut redb::Table<u32, u64>,
    counters: &mut redb::Table<&str, u64>,
    moved: &[Moved],
) -> Result<(), StoreError> {
    let mut t = txn.open_table(NAR_META)?;
    for (hash, old, new) in moved {
        let current = t.get(hash.as_str())?.map(|v| MetaLoc::of_row(v.value()));
        if current == Some(*old) {
            t.insert(hash.as_str(), new.row())?;
        } else {
            add_dead(dead, counters, new.loc.pack, new.loc.record_len() as i64)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NarMeta {
        NarMeta {
            seq: 42,
            hash: "0123456789abcdfghijklmnpqrsvwxyz".into(),
            pinned: true,
            narinfo: b"narinfo record".to_vec(),
            manifest: vec![7; 300],
            nar_file: Some("abc.nar.xz".into()),
        }
    }

    #[test]
    fn round_trip_and_malformed_payloads() {
        let m = sample();
        assert_eq!(NarMeta::decode(&m.encode()).unwrap(), m);
        let none = NarMeta {
            nar_file: None,
            pinned: false,
            ..sample()
        };
        assert_eq!(NarMeta::decode(&none.encode()).unwrap(), none);
        let b = m.encode();
        for cut in 0..b.len() {
            assert!(NarMeta::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = b.clone();
        extra.push(0);
        assert!(NarMeta::decode(&extra).is_err());
        let mut version = b.clone();
        version[0] = 9;
        assert!(NarMeta::decode(&version).is_err());
        let mut flag = b;
        flag[9] = 2;
        assert!(NarMeta::decode(&flag).is_err());
    }
}
