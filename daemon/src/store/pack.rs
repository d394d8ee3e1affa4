//! Pack files: append-only files of self-describing chunk records (design §3).
//!
//! Layout: a 16-byte file header (`NIXP2P-PACK-v1\0\0`) followed by records. Each record is a
//! 48-byte header — magic, BLAKE3 digest of the uncompressed payload (32), uncompressed
//! length (u32 LE), compressed length (u32 LE), header check (first 4 bytes of BLAKE3 over the
//! preceding 44 bytes) — then one zstd frame. Two kinds of record:
//! - `NPCK`, a chunk: the payload is the chunk, its digest is its [`ChunkId`];
//! - `NPMD`, a path's metadata (`store::meta`): its narinfo, the NAR's manifest, whether it
//!   was pinned, and the index commit it belongs to — written with every commit that stores
//!   a narinfo, so a pack can be re-indexed from its bytes alone: [`scan`] walks the records
//!   and checks each header, and `verify --repair` rebuilds the index from them.
//!
//! Invariant: bytes are only ever appended, except that the single writer truncates a tail it
//! wrote itself (a refused NAR, or on open a tail that holds no metadata record, so no
//! committed narinfo can need it).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::core::ChunkId;

pub const FILE_HEADER: &[u8; 16] = b"NIXP2P-PACK-v1\0\0";
pub const RECORD_MAGIC: &[u8; 4] = b"NPCK";
pub const META_MAGIC: &[u8; 4] = b"NPMD";
pub const RECORD_HEADER_LEN: usize = 48;
/// A pack is closed and a new one started once it reaches this size.
pub const PACK_TARGET_SIZE: u64 = 64 * 1024 * 1024;

/// Errors reading a pack record.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} @ {offset}: bad record header ({reason})")]
    BadHeader {
        path: PathBuf,
        offset: u64,
        reason: &'static str,
    },
    #[error("{path} @ {offset}: chunk {id} is damaged ({reason})")]
    BadChunk {
        path: PathBuf,
        offset: u64,
        id: ChunkId,
        reason: String,
    },
}

/// Where a chunk record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: u32,
    /// Offset of the record header.
    pub offset: u64,
    /// Length of the zstd frame.
    pub comp_len: u32,
    /// Length of the uncompressed chunk.
    pub raw_len: u32,
}

impl Location {
    /// Bytes the record takes in its pack.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.comp_len as u64
    }
}

pub fn pack_path(dir: &Path, pack: u32) -> PathBuf {
    dir.join(format!("pack-{pack:08}.pack"))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PackError + '_ {
    move |source| PackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn header_check(h: &[u8]) -> [u8; 4] {
    let d = blake3::hash(&h[..44]);
    let mut c = [0u8; 4];
    c.copy_from_slice(&d.as_bytes()[..4]);
    c
}

/// The record header of a chunk (`id`, lengths), with its check.
pub(crate) fn record_header(id: &ChunkId, raw_len: u32, comp_len: u32) -> [u8; RECORD_HEADER_LEN] {
    header_of(RecordKind::Chunk, id, raw_len, comp_len)
}

fn header_of(
    kind: RecordKind,
    id: &ChunkId,
    raw_len: u32,
    comp_len: u32,
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..4].copy_from_slice(match kind {
        RecordKind::Chunk => RECORD_MAGIC,
        RecordKind::Meta => META_MAGIC,
    });
    h[4..36].copy_from_slice(&id.0);
    h[36..40].copy_from_slice(&raw_len.to_le_bytes());
    h[40..44].copy_from_slice(&comp_len.to_le_bytes());
    let c = header_check(&h);
    h[44..48].copy_from_slice(&c);
    h
}

/// Compresses `data` into `frame` (replacing what it held) and returns the record header
/// that goes before it: the record ingest stages and the pack writer appends as is.
pub(crate) fn compress_record(
    compressor: &mut zstd::bulk::Compressor<'static>,
    id: &ChunkId,
    data: &[u8],
    frame: &mut Vec<u8>,
) -> io::Result<[u8; RECORD_HEADER_LEN]> {
    frame.clear();
    frame.reserve(zstd::zstd_safe::compress_bound(data.len()));
    compressor.compress_to_buffer(data, frame)?;
    Ok(record_header(id, data.len() as u32, frame.len() as u32))
}

/// A whole metadata record (header + zstd frame of `payload`).
pub(crate) fn meta_record(payload: &[u8]) -> io::Result<Vec<u8>> {
    let frame = zstd::bulk::compress(payload, 3)?;
    let id = ChunkId::of(payload);
    let header = header_of(
        RecordKind::Meta,
        &id,
        u32::try_from(payload.len()).map_err(io::Error::other)?,
        u32::try_from(frame.len()).map_err(io::Error::other)?,
    );
    Ok([&header[..], &frame].concat())
}

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Chunk,
    Meta,
}

/// A decoded record header.
#[derive(Debug, Clone, Copy)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub id: ChunkId,
    pub raw_len: u32,
    pub comp_len: u32,
}

fn decode_header(h: &[u8; RECORD_HEADER_LEN]) -> Result<RecordHeader, &'static str> {
    let kind = match &h[..4] {
        m if m == RECORD_MAGIC => RecordKind::Chunk,
        m if m == META_MAGIC => RecordKind::Meta,
        _ => return Err("bad magic"),
    };
    if h[44..48] != header_check(h) {
        return Err("header checksum mismatch");
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&h[4..36]);
    Ok(RecordHeader {
        kind,
        id: ChunkId(id),
        raw_len: u32::from_le_bytes(h[36..40].try_into().expect("4 bytes")),
        comp_len: u32::from_le_bytes(h[40..44].try_into().expect("4 bytes")),
    })
}

/// Where a pack's bytes are read from: a local file, or remote pack storage.
pub trait ReadAt: Send + Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for std::sync::Arc<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// Reads the chunk at `loc` from an open pack, decompresses it and checks it fully (record
/// header, zstd frame, BLAKE3 of the content against `id`).
pub fn read_chunk(
    file: &dyn ReadAt,
    path: &Path,
    loc: &Location,
    id: &ChunkId,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<Vec<u8>, PackError> {
    read_record(file, path, loc, id, dctx).map(|(_, data)| data)
}

/// Reads the record at `loc` and checks it fully (header, zstd frame, BLAKE3 of the content
/// against `id`), then returns its zstd frame as stored: what a peer is sent.
pub fn read_frame(
    file: &dyn ReadAt,
    path: &Path,
    loc: &Location,
    id: &ChunkId,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<Vec<u8>, PackError> {
    let mut rec = read_checked_record(file, path, loc, id, dctx)?;
    rec.drain(..RECORD_HEADER_LEN);
    Ok(rec)
}

/// The whole record at `loc` (header + zstd frame) after a full check: what pack GC copies
/// (a record does not depend on where it sits, so it moves as is, never recompressed).
pub fn read_checked_record(
    file: &dyn ReadAt,
    path: &Path,
    loc: &Location,
    id: &ChunkId,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<Vec<u8>, PackError> {
    read_record(file, path, loc, id, dctx).map(|(rec, _)| rec)
}

/// The whole record (header + frame) and the decompressed chunk, fully checked.
fn read_record(
    file: &dyn ReadAt,
    path: &Path,
    loc: &Location,
    id: &ChunkId,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<(Vec<u8>, Vec<u8>), PackError> {
    let mut rec = vec![0u8; loc.record_len() as usize];
    file.read_exact_at(&mut rec, loc.offset)
        .map_err(io_err(path))?;
    let data = check_record(&rec, path, loc, id, dctx)?;
    Ok((rec, data))
}

/// Checks a whole record (header + frame) read from `loc` against the index's `id` and
/// lengths and returns the decompressed payload.
pub fn check_record(
    rec: &[u8],
    path: &Path,
    loc: &Location,
    id: &ChunkId,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<Vec<u8>, PackError> {
    let bad = |reason: String| PackError::BadChunk {
        path: path.to_path_buf(),
        offset: loc.offset,
        id: *id,
        reason,
    };
    if rec.len() as u64 != loc.record_len() {
        return Err(bad(format!(
            "{} bytes read, the record is {}",
            rec.len(),
            loc.record_len()
        )));
    }
    let header: &[u8; RECORD_HEADER_LEN] = rec[..RECORD_HEADER_LEN].try_into().expect("48 bytes");
    let h = decode_header(header).map_err(|r| bad(r.to_string()))?;
    if h.id != *id || h.raw_len != loc.raw_len || h.comp_len != loc.comp_len {
        return Err(bad("record header does not match the index".into()));
    }
    let data = decompress(dctx, &rec[RECORD_HEADER_LEN..], loc.raw_len as usize)
        .map_err(|e| bad(format!("zstd: {e}")))?;
    if ChunkId::of(&data) != *id {
        return Err(bad("content does not hash to its id".into()));
    }
    Ok(data)
}

fn decompress(
    dctx: &mut zstd::bulk::Decompressor<'static>,
    frame: &[u8],
    raw_len: usize,
) -> io::Result<Vec<u8>> {
    let out = dctx.decompress(frame, raw_len)?;
    if out.len() != raw_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("decompressed to {} bytes, expected {raw_len}", out.len()),
        ));
    }
    Ok(out)
}

/// The records of a pack from some offset on, as far as they are whole.
#[derive(Debug, Default)]
pub struct Scan {
    pub records: Vec<(RecordHeader, Location)>,
    /// Where the last whole record ends.
    pub end: u64,
    /// The file's length: past `end` is a torn or damaged tail.
    pub file_len: u64,
    /// Why the walk stopped before `file_len`.
    pub stopped: Option<&'static str>,
}

/// Walks the records of a pack from the start (see [`scan_from`]).
pub fn scan(dir: &Path, pack: u32) -> Result<Scan, PackError> {
    scan_from(dir, pack, FILE_HEADER.len() as u64)
}

/// Walks the records of a pack from `start` (a record boundary), reading headers only, and
/// stops at the end of the file or at the first damaged or torn record.
pub fn scan_from(dir: &Path, pack: u32, start: u64) -> Result<Scan, PackError> {
    let path = pack_path(dir, pack);
    let file = File::open(&path).map_err(io_err(&path))?;
    let file_len = file.metadata().map_err(io_err(&path))?.len();
    let mut f = io::BufReader::new(file);
    let mut fh = [0u8; 16];
    f.read_exact(&mut fh).map_err(io_err(&path))?;
    if &fh != FILE_HEADER {
        return Err(PackError::BadHeader {
            path,
            offset: 0,
            reason: "not a pack file",
        });
    }
    let mut out = Scan {
        end: start,
        file_len,
        ..Scan::default()
    };
    f.seek(SeekFrom::Start(start)).map_err(io_err(&path))?;
    let mut offset = start;
    while offset < file_len {
        let mut h = [0u8; RECORD_HEADER_LEN];
        match f.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                out.stopped = Some("torn record header");
                break;
            }
            Err(source) => return Err(PackError::Io { path, source }),
        }
        let rh = match decode_header(&h) {
            Ok(rh) => rh,
            Err(reason) => {
                out.stopped = Some(reason);
                break;
            }
        };
        let loc = Location {
            pack,
            offset,
            comp_len: rh.comp_len,
            raw_len: rh.raw_len,
        };
        if offset + loc.record_len() > file_len {
            out.stopped = Some("torn record");
            break;
        }
        f.seek_relative(rh.comp_len as i64).map_err(io_err(&path))?;
        offset += loc.record_len();
        out.end = offset;
        out.records.push((rh, loc));
    }
    Ok(out)
}

/// The single appender of pack files.
pub struct PackWriter {
    dir: PathBuf,
    pack: u32,
    file: BufWriter<File>,
    len: u64,
    /// Packs touched since the last `mark`, with their lengths at that time (None: created).
    touched: Vec<(u32, Option<u64>)>,
}

impl PackWriter {
    /// Opens pack `pack` for appending, truncating it to `committed_len` (bytes past what the
    /// index knows are a crashed write's tail), or creates it.
    pub fn open(dir: &Path, pack: u32, committed_len: Option<u64>) -> Result<Self, PackError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = pack_path(dir, pack);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let on_disk = file.metadata().map_err(io_err(&path))?.len();
        let len = match committed_len {
            Some(l) if l >= FILE_HEADER.len() as u64 && l <= on_disk => {
                if l < on_disk {
                    tracing::warn!(
                        pack,
                        on_disk,
                        committed = l,
                        "truncating uncommitted pack tail"
                    );
                    file.set_len(l).map_err(io_err(&path))?;
                }
                l
            }
            _ => {
                file.set_len(0).map_err(io_err(&path))?;
                file.write_all(FILE_HEADER).map_err(io_err(&path))?;
                FILE_HEADER.len() as u64
            }
        };
        file.seek(SeekFrom::Start(len)).map_err(io_err(&path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            pack,
            file: BufWriter::with_capacity(1 << 20, file),
            len,
            touched: Vec::new(),
        })
    }

    /// Starts a unit of work that `rollback` can undo.
    pub fn mark(&mut self) {
        self.touched = vec![(self.pack, Some(self.len))];
    }

    /// Appends a whole record read from another pack (see [`read_checked_record`]) as is.
    pub fn append_record(&mut self, rec: &[u8]) -> Result<Location, PackError> {
        let path = pack_path(&self.dir, self.pack);
        let bad = |reason| PackError::BadHeader {
            path: path.clone(),
            offset: self.len,
            reason,
        };
        let header: &[u8; RECORD_HEADER_LEN] = rec
            .get(..RECORD_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| bad("record shorter than its header"))?;
        let h = decode_header(header).map_err(bad)?;
        if rec.len() != RECORD_HEADER_LEN + h.comp_len as usize {
            return Err(bad("record length differs from its header"));
        }
        if self.len >= PACK_TARGET_SIZE {
            self.rotate()?;
        }
        self.write_record(header, &rec[RECORD_HEADER_LEN..], h.raw_len)
    }

    fn write_record(
        &mut self,
        header: &[u8; RECORD_HEADER_LEN],
        frame: &[u8],
        raw_len: u32,
    ) -> Result<Location, PackError> {
        let path = pack_path(&self.dir, self.pack);
        self.file.write_all(header).map_err(io_err(&path))?;
        self.file.write_all(frame).map_err(io_err(&path))?;
        let loc = Location {
            pack: self.pack,
            offset: self.len,
            comp_len: frame.len() as u32,
            raw_len,
        };
        self.len += loc.record_len();
        Ok(loc)
    }

    /// The pack being appended to.
    pub fn pack(&self) -> u32 {
        self.pack
    }

    /// Whether the pack being appended to holds no record yet.
    pub fn is_empty(&self) -> bool {
        self.len == FILE_HEADER.len() as u64
    }

    /// Closes the current pack (fsynced) and starts the next one. Recorded as touched, so a
    /// `rollback` removes the new pack again.
    pub fn rotate(&mut self) -> Result<(), PackError> {
        self.sync()?;
        let next = self.pack + 1;
        let path = pack_path(&self.dir, next);
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(FILE_HEADER).map_err(io_err(&path))?;
        self.file = BufWriter::with_capacity(1 << 20, file);
        self.pack = next;
        self.len = FILE_HEADER.len() as u64;
        self.touched.push((next, None));
        Ok(())
    }

    /// Flushes and fsyncs everything appended (and the directory, for new packs).
    pub fn sync(&mut self) -> Result<(), PackError> {
        let path = pack_path(&self.dir, self.pack);
        self.file.flush().map_err(io_err(&path))?;
        self.file.get_ref().sync_data().map_err(io_err(&path))?;
        if self.touched.iter().any(|(_, l)| l.is_none()) {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&self.dir))?;
        }
        Ok(())
    }

    /// Lengths of the packs touched since `mark`, as they are now (for the index commit).
    pub fn touched_lengths(&self) -> Vec<(u32, u64)> {
        let mut v: Vec<(u32, u64)> = self
            .touched
            .iter()
            .filter(|(p, _)| *p != self.pack)
            .map(|&(p, _)| (p, 0))
            .collect();
        // Closed packs are only closed once full; their final length is on disk.
        for (p, l) in v.iter_mut() {
            *l = fs::metadata(pack_path(&self.dir, *p))
                .map(|m| m.len())
                .unwrap_or(0);
        }
        v.push((self.pack, self.len));
        v
    }

    /// Undoes every append since `mark`: truncates packs back and removes packs it created.
    pub fn rollback(&mut self) -> Result<(), PackError> {
        let touched = std::mem::take(&mut self.touched);
        let Some(&(first, Some(first_len))) = touched.first() else {
            return Ok(());
        };
        for &(p, l) in touched.iter().skip(1) {
            if l.is_none() {
                let path = pack_path(&self.dir, p);
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        let path = pack_path(&self.dir, first);
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // Buffered bytes are discarded, never written: after a failed write (a full disk) a
        // flush on drop would put them past the length the pack is cut back to.
        let old = std::mem::replace(&mut self.file, BufWriter::with_capacity(1 << 20, file));
        drop(old.into_parts());
        let file = self.file.get_mut();
        file.set_len(first_len).map_err(io_err(&path))?;
        file.seek(SeekFrom::Start(first_len))
            .map_err(io_err(&path))?;
        self.pack = first;
        self.len = first_len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl PackWriter {
        /// Compresses and appends one chunk (ingest stages records instead: [`compress_record`]).
        fn append(&mut self, id: &ChunkId, data: &[u8]) -> Result<Location, PackError> {
            let mut c = zstd::bulk::Compressor::new(3).unwrap();
            let mut frame = Vec::new();
            let header = compress_record(&mut c, id, data, &mut frame).unwrap();
            self.append_record(&[&header[..], &frame].concat())
        }
    }

    #[test]
    fn append_read_scan_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::open(dir.path(), 1, None).unwrap();
        w.mark();
        let a = b"hello world ".repeat(100);
        let ida = ChunkId::of(&a);
        let la = w.append(&ida, &a).unwrap();
        w.sync().unwrap();
        w.mark();
        let b = b"other".repeat(10);
        let idb = ChunkId::of(&b);
        let lb = w.append(&idb, &b).unwrap();
        w.sync().unwrap();
        let path = pack_path(dir.path(), 1);
        let f = File::open(&path).unwrap();
        let mut dctx = zstd::bulk::Decompressor::new().unwrap();
        assert_eq!(read_chunk(&f, &path, &la, &ida, &mut dctx).unwrap(), a);
        assert_eq!(read_chunk(&f, &path, &lb, &idb, &mut dctx).unwrap(), b);
        assert!(matches!(
            read_chunk(&f, &path, &lb, &ida, &mut dctx),
            Err(PackError::BadChunk { .. })
        ));
        let recs = scan(dir.path(), 1).unwrap();
        assert_eq!(recs.records.len(), 2);
        assert_eq!(recs.records[1].1, lb);
        assert_eq!(recs.end, recs.file_len);
        assert!(recs.stopped.is_none());
        w.rollback().unwrap();
        assert_eq!(scan(dir.path(), 1).unwrap().records.len(), 1);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            la.offset + la.record_len()
        );

        // A flipped payload byte is detected.
        drop(w);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let f = File::open(&path).unwrap();
        assert!(read_chunk(&f, &path, &la, &ida, &mut dctx).is_err());
    }

    #[test]
    fn open_truncates_uncommitted_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::open(dir.path(), 1, None).unwrap();
        let a = vec![7u8; 5000];
        let la = w.append(&ChunkId::of(&a), &a).unwrap();
        let committed = la.offset + la.record_len();
        w.append(&ChunkId::of(b"tail"), b"tail").unwrap();
        w.sync().unwrap();
        drop(w);
        let w = PackWriter::open(dir.path(), 1, Some(committed)).unwrap();
        drop(w);
        assert_eq!(
            fs::metadata(pack_path(dir.path(), 1)).unwrap().len(),
            committed
        );
    }
}
