//! Reading what is stored: a chunk (checked) for a peer or a fetch, and a whole NAR or a
//! range of it as a stream ([`NarReader`]), every chunk checked against its id before its bytes
//! go out, a whole NAR also against its NarHash before its end.

use super::*;

/// Most bytes of adjacent records a NAR reader fetches from a remote pack in one request.
const REMOTE_RUN_MAX: u64 = 8 << 20;

impl Store {
    /// The zstd frame of a stored chunk, exactly as its pack record holds it, after a full check
    /// (record header, frame, BLAKE3 of the content against `id`): what a peer is sent.
    /// `None` if the chunk is not stored.
    pub fn chunk_frame(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        let Some((h, loc)) = self.chunk_record(id)? else {
            return Ok(None);
        };
        with_thread_dctx(&self.dir, |dctx| {
            Ok(Some(h.read_frame(&self.packs, &loc, id, dctx)?))
        })
    }

    /// Where a chunk's record is, with its pack open (held open: a pack GC may unlink it).
    fn chunk_record(&self, id: &ChunkId) -> Result<Option<(PackHandle, Location)>, StoreError> {
        let _gate = self.packs.shared();
        let loc = {
            let txn = self.db.begin_read()?;
            let t = txn.open_table(CHUNKS)?;
            let Some(v) = t.get(id.0)? else {
                return Ok(None);
            };
            loc_of(v.value()).0
        };
        Ok(Some((self.packs.get(loc.pack)?, loc)))
    }

    /// The content of a stored chunk after a full check (record header, zstd frame, BLAKE3
    /// against `id`): what a fetch reuses of a chunk it already holds. `None` if not stored.
    pub fn chunk_data(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        let Some((h, loc)) = self.chunk_record(id)? else {
            return Ok(None);
        };
        with_thread_dctx(&self.dir, |dctx| {
            Ok(Some(h.read_chunk(&self.packs, &loc, id, dctx)?))
        })
    }

    /// A streaming reader of the NAR with this hash: chunks are read one at a time, each
    /// checked against its id, hashes restored; at the end the whole stream is checked against
    /// NarHash and a mismatch is an error (never a silently wrong stream).
    pub fn nar_reader(&self, nar_hash: &NarHash) -> Result<NarReader, StoreError> {
        // Held until the packs are open: a concurrent pack GC cannot delete them in between.
        let _gate = self.packs.shared();
        let txn = self.db.begin_read()?;
        let manifests = txn.open_table(MANIFESTS)?;
        let chunks_t = txn.open_table(CHUNKS)?;
        let Some(v) = manifests.get(nar_hash.0)? else {
            return Err(StoreError::NoSuchNar(*nar_hash));
        };
        let m = Manifest::decode(v.value()).map_err(|source| StoreError::BadManifest {
            nar_hash: *nar_hash,
            source: Box::new(source),
        })?;
        if m.nar_hash != *nar_hash {
            return Err(StoreError::BadManifest {
                nar_hash: *nar_hash,
                source: Box::new(ManifestError::BadNarHash),
            });
        }
        let mut locs = Vec::with_capacity(m.chunks.len());
        for c in &m.chunks {
            let Some(v) = chunks_t.get(c.id.0)? else {
                return Err(StoreError::MissingChunk {
                    nar_hash: *nar_hash,
                    chunk: c.id,
                });
            };
            locs.push((c.id, loc_of(v.value()).0));
        }
        let mut files = HashMap::new();
        for (_, loc) in &locs {
            if let std::collections::hash_map::Entry::Vacant(e) = files.entry(loc.pack) {
                e.insert(self.packs.get(loc.pack)?);
            }
        }
        Ok(NarReader::new(
            self.packs.clone(),
            files,
            m,
            locs,
            new_dctx(&self.dir)?,
        ))
    }
}

/// Streams a stored NAR (see [`Store::nar_reader`]). Holds no database handle, and holds the
/// pack files it reads open (a pack GC may unlink them meanwhile).
///
/// Every chunk is checked against its id before any of its bytes go out; reading the whole
/// NAR also checks NarHash *before the last chunk is handed out*, so a NAR that does not
/// reassemble to its NarHash (a damaged manifest) never yields its complete length: the reader
/// errors instead.
pub struct NarReader {
    packs: Arc<PackFiles>,
    files: HashMap<u32, PackHandle>,
    /// Records read at once from a remote pack: (pack, offset of the first, their bytes).
    run: Option<(u32, u64, Vec<u8>)>,
    manifest: Manifest,
    locs: Vec<(ChunkId, Location)>,
    /// NAR offset of each chunk once restored.
    offsets: Vec<u64>,
    /// Offset of each chunk in the normalised stream.
    norm_offsets: Vec<u64>,
    next: usize,
    buf: Vec<u8>,
    pos: usize,
    /// Bytes still to hand out (a range may end before the NAR does).
    remaining: u64,
    /// `None` once the reader serves a range: then only chunk ids are checked.
    sha: Option<Sha256>,
    /// Bytes to skip in the next chunk loaded (start of a range).
    pending_skip: Option<usize>,
    dctx: zstd::bulk::Decompressor<'static>,
}

impl NarReader {
    fn new(
        packs: Arc<PackFiles>,
        files: HashMap<u32, PackHandle>,
        manifest: Manifest,
        locs: Vec<(ChunkId, Location)>,
        dctx: zstd::bulk::Decompressor<'static>,
    ) -> Self {
        let offsets = manifest.nar_offsets();
        let norm_offsets = manifest.chunk_offsets().map(|(o, _)| o).collect();
        Self {
            norm_offsets,
            dctx,
            packs,
            files,
            run: None,
            remaining: manifest.nar_size,
            manifest,
            locs,
            offsets,
            next: 0,
            buf: Vec::new(),
            pos: 0,
            sha: Some(Sha256::new()),
            pending_skip: None,
        }
    }

    pub fn nar_size(&self) -> u64 {
        self.manifest.nar_size
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Restricts the stream to `start..end` of the NAR (for HTTP ranges). A range is checked
    /// chunk by chunk (ids), not against NarHash. Must be called before the first read.
    pub fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.manifest.nar_size);
        let start = start.min(end);
        self.sha = None;
        self.next = self
            .offsets
            .partition_point(|&o| o <= start)
            .saturating_sub(1);
        self.remaining = end - start;
        self.buf.clear();
        self.pos = 0;
        if self.next < self.locs.len() {
            // The chunk holding `start` is loaded on the first read and skipped into.
            self.pending_skip = Some((start - self.offsets[self.next]) as usize);
        }
    }

    fn load_next(&mut self) -> io::Result<()> {
        let (id, loc) = self.locs[self.next];
        // Every chunk is checked against its id before any of its bytes go out (a damaged
        // chunk never reaches a client, even as the prefix of an aborted body); a whole-NAR
        // read is also checked against NarHash before its last chunk goes out.
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
        let h = self
            .files
            .get(&loc.pack)
            .ok_or_else(|| invalid(format!("pack {} was not opened", loc.pack)))?
            .clone();
        let data = if h.remote {
            self.read_from_run(&h, &loc, &id)
        } else {
            h.read_chunk(&self.packs, &loc, &id, &mut self.dctx)
        }
        .map_err(|e| invalid(e.to_string()))?;
        let data = self.manifest.restore(self.norm_offsets[self.next], data);
        self.next += 1;
        if let Some(sha) = self.sha.as_mut() {
            sha.update(&data);
            if self.next == self.locs.len() {
                let got = NarHash(std::mem::take(sha).finalize().into());
                if got != self.manifest.nar_hash {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "NAR {} reassembles to {got}: refusing to hand out its end",
                            self.manifest.nar_hash
                        ),
                    ));
                }
            }
        }
        self.buf = data;
        self.pos = self.pending_skip.take().unwrap_or(0);
        Ok(())
    }
}

impl NarReader {
    /// Reads a chunk of a remote pack from the current run of records, first fetching the run
    /// that starts with it if needed: the following chunks of the NAR whose records sit next
    /// to each other in the same pack, up to [`REMOTE_RUN_MAX`] — one request for them all.
    fn read_from_run(
        &mut self,
        h: &PackHandle,
        loc: &Location,
        id: &ChunkId,
    ) -> Result<Vec<u8>, StoreError> {
        let covered = |run: &Option<(u32, u64, Vec<u8>)>| match run {
            Some((p, start, bytes)) => {
                *p == loc.pack
                    && loc.offset >= *start
                    && loc.offset + loc.record_len() <= start + bytes.len() as u64
            }
            None => false,
        };
        if !covered(&self.run) {
            let mut end = loc.offset + loc.record_len();
            for (_, next) in &self.locs[self.next + 1..] {
                if next.pack != loc.pack
                    || next.offset != end
                    || end + next.record_len() - loc.offset > REMOTE_RUN_MAX
                {
                    break;
                }
                end += next.record_len();
            }
            let mut bytes = vec![0u8; (end - loc.offset) as usize];
            h.src
                .read_exact_at(&mut bytes, loc.offset)
                .map_err(io_err(&h.path))?;
            self.run = Some((loc.pack, loc.offset, bytes));
        }
        let Some((_, start, bytes)) = &self.run else {
            unreachable!("the run was just read");
        };
        let from = (loc.offset - start) as usize;
        let rec = &bytes[from..from + loc.record_len() as usize];
        match pack::check_record(rec, &h.path, loc, id, &mut self.dctx) {
            Ok(data) => Ok(data),
            Err(_) => {
                // A damaged cached block: dropped, and this chunk read again on its own.
                self.run = None;
                self.packs
                    .invalidate(loc.pack, loc.offset, loc.record_len());
                h.read_chunk(&self.packs, loc, id, &mut self.dctx)
            }
        }
    }

    /// Makes sure `buf[pos..]` holds bytes (the caller has checked `remaining > 0`).
    fn fill(&mut self) -> io::Result<()> {
        while self.pos >= self.buf.len() {
            if self.next == self.locs.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "manifest ends before nar_size",
                ));
            }
            self.load_next()?;
        }
        Ok(())
    }

    /// The next piece of the stream, as an owned buffer (a whole chunk where possible: no copy
    /// for whole-NAR reads). `None` at the end.
    pub fn next_block(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        self.fill()?;
        let mut block = std::mem::take(&mut self.buf);
        if self.pos > 0 {
            block.drain(..self.pos);
        }
        self.pos = 0;
        if block.len() as u64 > self.remaining {
            block.truncate(self.remaining as usize);
        }
        self.remaining -= block.len() as u64;
        Ok(Some(block))
    }
}

impl Read for NarReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() || self.remaining == 0 {
            return Ok(0);
        }
        self.fill()?;
        let n = out
            .len()
            .min(self.buf.len() - self.pos)
            .min(self.remaining.min(usize::MAX as u64) as usize);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.remaining -= n as u64;
        Ok(n)
    }
}
