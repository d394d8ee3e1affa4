//! `Staging`: where one ingest writes the records of its new chunks before they are committed.
//!
//! An ingest (an upload, an import, a NAR streaming in from an upstream or from peers) reads,
//! validates, normalises, cuts, hashes and compresses its NAR *without* the store's pack-writer
//! lock, writing each new chunk as a finished pack record (the same 48-byte header + zstd frame
//! as in a pack, see [`super::pack`]) into a private, already unlinked temporary file. Only the
//! commit takes the lock: it copies the records the index still lacks into the current pack
//! (local disk to local disk, never waiting on a network), fsyncs, and commits the index. So a
//! slow or hostile source never holds up another ingest, an upload, eviction or GC, and a
//! crash leaves nothing to clean up (the file has no name).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::pack::{self, Location, PackError, PackWriter, RECORD_HEADER_LEN};
use crate::core::ChunkId;

/// A staged record: where it is in the staging file.
#[derive(Debug, Clone, Copy)]
struct Staged {
    offset: u64,
    comp_len: u32,
}

/// One ingest's staged chunk records; see the module docs.
pub struct Staging {
    path: PathBuf,
    file: BufWriter<File>,
    len: u64,
    records: HashMap<ChunkId, Staged>,
    compressor: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PackError + '_ {
    move |source| PackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Staging {
    /// A new, empty staging file in `dir` (created if needed), compressing at `level`.
    pub(crate) fn new(dir: &Path, level: i32) -> Result<Self, PackError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let file = tempfile::tempfile_in(dir).map_err(io_err(dir))?;
        let compressor = zstd::bulk::Compressor::new(level).map_err(io_err(dir))?;
        Ok(Self {
            path: dir.join("(staging)"),
            file: BufWriter::with_capacity(1 << 20, file),
            len: 0,
            records: HashMap::new(),
            compressor,
            scratch: Vec::new(),
        })
    }

    /// Whether `id` is staged here.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.records.contains_key(id)
    }

    /// Compresses and stages one chunk (a chunk already staged is skipped).
    pub fn append_chunk(&mut self, id: &ChunkId, data: &[u8]) -> Result<(), PackError> {
        if self.contains(id) {
            return Ok(());
        }
        let mut frame = std::mem::take(&mut self.scratch);
        let r = pack::compress_record(&mut self.compressor, id, data, &mut frame)
            .map_err(io_err(&self.path))
            .and_then(|header| self.write(id, &header, &frame));
        self.scratch = frame;
        r
    }

    /// Stages a zstd frame received as it is (the caller has checked that it decompresses to
    /// `raw_len` bytes hashing to `id`). A chunk already staged is skipped.
    pub fn append_frame(
        &mut self,
        id: &ChunkId,
        raw_len: u32,
        frame: &[u8],
    ) -> Result<(), PackError> {
        if self.contains(id) {
            return Ok(());
        }
        self.write(
            id,
            &pack::record_header(id, raw_len, frame.len() as u32),
            frame,
        )
    }

    fn write(
        &mut self,
        id: &ChunkId,
        header: &[u8; RECORD_HEADER_LEN],
        frame: &[u8],
    ) -> Result<(), PackError> {
        self.file.write_all(header).map_err(io_err(&self.path))?;
        self.file.write_all(frame).map_err(io_err(&self.path))?;
        self.records.insert(
            *id,
            Staged {
                offset: self.len,
                comp_len: frame.len() as u32,
            },
        );
        self.len += (RECORD_HEADER_LEN + frame.len()) as u64;
        Ok(())
    }

    /// Copies the staged records of `ids` into the pack writer (the caller holds the writer
    /// lock and has marked it); returns where each went. An id that is not staged is an error
    /// of the caller, reported as `None` in the map (the commit then refuses).
    pub(crate) fn copy_into(
        &mut self,
        writer: &mut PackWriter,
        ids: impl IntoIterator<Item = ChunkId>,
    ) -> Result<HashMap<ChunkId, Location>, PackError> {
        self.file.flush().map_err(io_err(&self.path))?;
        let mut out = HashMap::new();
        let mut rec = Vec::new();
        for id in ids {
            let Some(s) = self.records.get(&id) else {
                continue;
            };
            rec.resize(RECORD_HEADER_LEN + s.comp_len as usize, 0);
            self.file
                .get_ref()
                .read_exact_at(&mut rec, s.offset)
                .map_err(io_err(&self.path))?;
            let loc = writer.append_record(&rec)?;
            out.insert(id, loc);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_records_copy_into_a_pack_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = Staging::new(&dir.path().join("staging"), 3).unwrap();
        let a = b"first chunk ".repeat(100);
        let b = b"second".repeat(50);
        let (ia, ib) = (ChunkId::of(&a), ChunkId::of(&b));
        st.append_chunk(&ia, &a).unwrap();
        let frame = zstd::bulk::compress(&b, 1).unwrap();
        st.append_frame(&ib, b.len() as u32, &frame).unwrap();
        st.append_chunk(&ia, &a).unwrap(); // skipped
        assert_eq!(st.records.len(), 2);
        let packs = dir.path().join("packs");
        let mut w = PackWriter::open(&packs, 1, None).unwrap();
        w.mark();
        let locs = st.copy_into(&mut w, [ia, ib, ChunkId::of(b"x")]).unwrap();
        w.sync().unwrap();
        assert_eq!(locs.len(), 2);
        let f = File::open(pack::pack_path(&packs, 1)).unwrap();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let p = pack::pack_path(&packs, 1);
        let got = pack::read_chunk(&f, &p, &locs[&ia], &ia, &mut d).unwrap();
        assert_eq!(got, a);
        let got = pack::read_frame(&f, &p, &locs[&ib], &ib, &mut d).unwrap();
        assert_eq!(got, frame, "a received frame is stored byte for byte");
    }
}
