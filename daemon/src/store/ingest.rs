//! Ingest: a NAR streamed into a `Staging` without any store-wide lock (validated, hashed,
//! normalised, cut, compressed), then committed under the pack-writer lock with its metadata
//! record (one fsync, one index transaction), or refused leaving nothing.

use super::*;

/// Chunks waiting for the compressor thread during an ingest.
const COMPRESS_QUEUE: usize = 16;

impl Store {
    /// Stores a narinfo and its NAR as a cache entry (evictable): [`Store::ingest_with`] with
    /// [`Retention::Cache`], for what is fetched from peers or upstreams.
    pub fn ingest<R: Read>(
        &self,
        info: &NarInfo,
        text: &str,
        trust: &Trust,
        source: &str,
        open_nar: impl FnOnce() -> io::Result<R>,
    ) -> Result<IngestOutcome, StoreError> {
        self.ingest_with(info, text, trust, source, Retention::Cache, open_nar)
    }

    /// Stores a narinfo and its NAR. `open_nar` is called only if the NAR is not stored yet;
    /// it must yield the *uncompressed* NAR. The NAR is streamed: validated, hashed,
    /// normalised, chunked, compressed into the current pack, then committed in one
    /// transaction — or refused, leaving nothing behind. `retention` says whether the path is
    /// pinned (local and explicit: uploads, `import`) or a cache entry that eviction may drop
    /// (fetched from peers or upstreams); an existing pin is never dropped by an ingest.
    pub fn ingest_with<R: Read>(
        &self,
        info: &NarInfo,
        text: &str,
        trust: &Trust,
        source: &str,
        retention: Retention,
        open_nar: impl FnOnce() -> io::Result<R>,
    ) -> Result<IngestOutcome, StoreError> {
        let store_path = info.store_path.to_absolute();
        let hash = info.store_path.hash().as_str().to_string();
        let _span = tracing::info_span!("ingest", path = %store_path).entered();
        let record = StoredNarInfo::new(info, text, trust, source);
        // Storing a hidden path again is asking for it: it is no longer to be collected.
        if self.is_hidden(&hash)? {
            self.undelete(std::slice::from_ref(&hash))?;
        }
        if let Some(old) = self.narinfo(&hash)? {
            if old.nar_hash == info.nar_hash && old.text == record.text && old.trust == record.trust
            {
                if retention == Retention::Pinned {
                    self.pin(&hash)?;
                }
                self.touch(&info.nar_hash)?;
                return Ok(IngestOutcome {
                    already_present: true,
                    nar_size: info.nar_size,
                    ..Default::default()
                });
            }
        }

        let staged = if self.has_nar(&info.nar_hash)? {
            None
        } else {
            Some(self.stage_nar(info, &store_path, open_nar)?)
        };
        self.commit_staged(info, record, retention, staged)
    }

    /// A new, empty [`Staging`] for an ingest that brings its own chunk frames (a fetch from
    /// peers), to be committed with [`Store::commit_fetched`].
    pub fn staging(&self) -> Result<Staging, StoreError> {
        Ok(Staging::new(&self.dir.join("staging"), self.zstd_level)?)
    }

    /// Commits a NAR whose chunks the caller has verified (each against its id) and whose
    /// bytes it has checked against the narinfo's NarHash and NarSize: the chunks the index
    /// lacks must be in `staging`. A cache entry, like [`Store::ingest`].
    pub fn commit_fetched(
        &self,
        info: &NarInfo,
        text: &str,
        trust: &Trust,
        source: &str,
        manifest: Manifest,
        staging: Staging,
    ) -> Result<IngestOutcome, StoreError> {
        let store_path = info.store_path.to_absolute();
        let _span = tracing::info_span!("commit_fetched", path = %store_path).entered();
        if manifest.nar_hash != info.nar_hash || manifest.nar_size != info.nar_size {
            return Err(StoreError::BadManifest {
                nar_hash: info.nar_hash,
                source: Box::new(ManifestError::BadNarHash),
            });
        }
        let record = StoredNarInfo::new(info, text, trust, source);
        self.commit_staged(info, record, Retention::Cache, Some((manifest, staging)))
    }

    /// The serialised part of every ingest: under the pack-writer lock, copies the staged
    /// records of the chunks the index still lacks into the current pack, appends the path's
    /// metadata record, fsyncs, and commits the index in one transaction (or rolls the pack
    /// back and commits nothing).
    fn commit_staged(
        &self,
        info: &NarInfo,
        record: StoredNarInfo,
        retention: Retention,
        staged: Option<(Manifest, Staging)>,
    ) -> Result<IngestOutcome, StoreError> {
        let hash = info.store_path.hash().as_str().to_string();
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut outcome = IngestOutcome {
            nar_size: info.nar_size,
            ..Default::default()
        };
        let mut new_chunks: HashMap<ChunkId, Location> = HashMap::new();
        let mut manifest = None;
        // Another ingest may have stored the NAR while this one staged it.
        let staged = match staged {
            Some(s) if !self.has_nar(&info.nar_hash)? => Some(s),
            _ => None,
        };
        let nar_file = nar_file_name(&info.url);
        writer.mark();
        let written = (|| {
            if let Some((m, mut staging)) = staged {
                let ids: Vec<ChunkId> = m.chunks.iter().map(|c| c.id).collect();
                let stored = self.stored_chunks(&ids)?;
                let mut seen = HashSet::new();
                let missing: Vec<ChunkId> = ids
                    .into_iter()
                    .filter(|id| !stored.contains(id) && seen.insert(*id))
                    .collect();
                new_chunks = staging.copy_into(&mut writer, missing)?;
                manifest = Some(m);
            }
            let manifest_bytes = match &manifest {
                Some(m) => m.encode(),
                None => self
                    .manifest_bytes(&info.nar_hash)?
                    .ok_or(StoreError::NoSuchNar(info.nar_hash))?,
            };
            let pinned = retention == Retention::Pinned || self.is_pinned(&hash)?;
            let meta = self.append_meta(
                &mut writer,
                self.meta_seq()? + 1,
                &hash,
                pinned,
                &record,
                manifest_bytes,
                nar_file,
            )?;
            writer.sync()?;
            Ok::<_, StoreError>(meta)
        })();
        let meta = match written {
            Ok(m) => m,
            Err(e) => {
                writer.rollback()?;
                return Err(e);
            }
        };
        let packs = writer.touched_lengths();
        let commit = Self::commit_ingest(
            &self.db,
            &hash,
            nar_file,
            &record,
            manifest.as_ref(),
            &new_chunks,
            &packs,
            &meta,
            retention,
            &mut outcome,
        );
        if let Err(e) = commit {
            writer.rollback()?;
            return Err(e);
        }
        tracing::debug!(?outcome, "ingested");
        Ok(outcome)
    }

    /// The number of the last metadata record committed.
    fn meta_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let c = txn.open_table(COUNTERS)?;
        Ok(c.get(C_META_SEQ)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Writes a metadata record for every stored path that has none (an index from before
    /// they existed), so that `verify --repair` can restore it. Batches of paths, each
    /// appended, fsynced and committed like an ingest.
    pub(super) fn describe_undescribed_paths(&self) -> Result<u64, StoreError> {
        let missing: Vec<(String, StoredNarInfo)> = {
            let txn = self.db.begin_read()?;
            let metas = txn.open_table(NAR_META)?;
            let narinfos = txn.open_table(NARINFOS)?;
            // Every narinfo has its record (rows go in and out together): no scan at each open.
            if metas.len()? == narinfos.len()? {
                return Ok(0);
            }
            let mut v = Vec::new();
            for r in narinfos.iter()? {
                let (k, rec) = r?;
                if metas.get(k.value())?.is_none() {
                    v.push((
                        k.value().to_string(),
                        StoredNarInfo::decode(k.value(), rec.value())?,
                    ));
                }
            }
            v
        };
        if missing.is_empty() {
            return Ok(0);
        }
        let _span = tracing::info_span!("describe_paths", paths = missing.len()).entered();
        let mut written = 0;
        for batch in missing.chunks(1000) {
            let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            writer.mark();
            let appended = (|| {
                let mut seq = self.meta_seq()?;
                let mut out = Vec::new();
                for (hash, rec) in batch {
                    let Some(manifest) = self.manifest_bytes(&rec.nar_hash)? else {
                        continue; // verify reports a narinfo without its NAR
                    };
                    let nar_file = NarInfo::parse(&rec.text)
                        .ok()
                        .and_then(|i| nar_file_name(&i.url).map(str::to_string));
                    seq += 1;
                    let m = self.append_meta(
                        &mut writer,
                        seq,
                        hash,
                        self.is_pinned(hash)?,
                        rec,
                        manifest,
                        nar_file.as_deref(),
                    )?;
                    out.push((hash.as_str(), m));
                }
                writer.sync()?;
                let packs = writer.touched_lengths();
                let txn = self.db.begin_write()?;
                {
                    let mut dead = txn.open_table(PACK_DEAD)?;
                    let mut counters = txn.open_table(COUNTERS)?;
                    let mut packs_t = txn.open_table(PACKS)?;
                    for &(p, len) in &packs {
                        packs_t.insert(p, len)?;
                    }
                    for (hash, m) in &out {
                        meta::commit(&txn, &mut dead, &mut counters, hash, m)?;
                    }
                }
                txn.commit()?;
                Ok::<_, StoreError>(out.len() as u64)
            })();
            match appended {
                Ok(n) => written += n,
                Err(e) => {
                    writer.rollback()?;
                    return Err(e);
                }
            }
        }
        tracing::info!(paths = written, "metadata records written for older paths");
        Ok(written)
    }

    /// Appends a path's metadata record numbered `seq` (one past the last committed) to the
    /// writer, whose lock the caller holds until the commit.
    #[allow(clippy::too_many_arguments)]
    fn append_meta(
        &self,
        writer: &mut PackWriter,
        seq: u64,
        hash: &str,
        pinned: bool,
        record: &StoredNarInfo,
        manifest: Vec<u8>,
        nar_file: Option<&str>,
    ) -> Result<MetaLoc, StoreError> {
        let payload = NarMeta {
            seq,
            hash: hash.to_string(),
            pinned,
            narinfo: record.encode(),
            manifest,
            nar_file: nar_file.map(str::to_string),
        }
        .encode();
        let rec = pack::meta_record(&payload).map_err(io_err(&self.dir))?;
        let loc = writer.append_record(&rec)?;
        Ok(MetaLoc {
            loc,
            id: ChunkId::of(&payload),
            seq,
        })
    }

    /// Streams the NAR into a [`Staging`] (no store-wide lock: validation, hashing,
    /// normalisation, chunking and compression run here, in parallel with other ingests);
    /// returns its manifest once hash and size check. Reads at most NarSize + 1 bytes.
    fn stage_nar<R: Read>(
        &self,
        info: &NarInfo,
        store_path: &str,
        open_nar: impl FnOnce() -> io::Result<R>,
    ) -> Result<(Manifest, Staging), StoreError> {
        let read_err = |source| StoreError::NarRead {
            store_path: store_path.to_string(),
            source,
        };
        let nar = open_nar().map_err(read_err)?;
        // One byte past NarSize is enough to know the NAR is too long.
        let mut tee = CheckingReader::new(nar.take(info.nar_size.saturating_add(1)));
        let mut norm = Normaliser::of(&mut tee, self.params.normalisation, || {
            RefSet::from_paths(info.references.iter().chain([&info.store_path]))
        });
        let txn = self.db.begin_read()?;
        let chunks_t = txn.open_table(CHUNKS)?;
        let mut entries = Vec::new();
        let mut staging = self.staging()?;
        // Compression and staging writes run on a second thread, fed through a bounded queue,
        // while this one reads, hashes, normalises and cuts.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(ChunkId, Vec<u8>)>(COMPRESS_QUEUE);
        let (cut, written) = std::thread::scope(|s| {
            let st = &mut staging;
            let compressor = s.spawn(move || {
                for (id, data) in rx {
                    st.append_chunk(&id, &data)?;
                }
                Ok::<_, PackError>(())
            });
            let cut = (|| {
                let mut queued = std::collections::HashSet::new();
                for c in chunker::chunks(&mut norm, self.params) {
                    let c = c.map_err(|e| match tee_error(&e) {
                        Some(source) => StoreError::BadNar {
                            store_path: store_path.to_string(),
                            source: Box::new(source),
                        },
                        None => read_err(e),
                    })?;
                    let id = c.id();
                    entries.push(ChunkEntry {
                        id,
                        size: c.data.len() as u32,
                    });
                    if queued.contains(&id) || chunks_t.get(id.0)?.is_some() {
                        continue;
                    }
                    queued.insert(id);
                    if tx.send((id, c.data)).is_err() {
                        break; // the compressor failed; its error is reported below
                    }
                }
                drop(tx);
                Ok::<_, StoreError>(())
            })();
            let written = compressor.join().unwrap_or_else(|_| {
                Err(PackError::Io {
                    path: self.dir.join("staging"),
                    source: io::Error::other("compressor thread panicked"),
                })
            });
            (cut, written)
        });
        written?;
        cut?;
        drop(chunks_t);
        drop(txn);
        let (_, slots) = norm.into_parts();
        let (sha, size) = tee.finish().map_err(|source| StoreError::BadNar {
            store_path: store_path.to_string(),
            source: Box::new(source),
        })?;
        if size != info.nar_size {
            return Err(StoreError::NarSizeMismatch {
                store_path: store_path.to_string(),
                expected: info.nar_size,
                actual: size,
            });
        }
        if sha != info.nar_hash {
            return Err(StoreError::NarHashMismatch {
                store_path: store_path.to_string(),
                expected: info.nar_hash,
                actual: sha,
            });
        }
        let manifest = Manifest {
            nar_hash: sha,
            nar_size: size,
            chunking: self.params.id,
            chunks: entries,
            slots,
        };
        Ok((manifest, staging))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn commit_ingest(
        db: &Database,
        hash: &str,
        nar_file: Option<&str>,
        record: &StoredNarInfo,
        manifest: Option<&Manifest>,
        new_chunks: &HashMap<ChunkId, Location>,
        packs: &[(u32, u64)],
        meta: &MetaLoc,
        retention: Retention,
        outcome: &mut IngestOutcome,
    ) -> Result<(), StoreError> {
        let txn = db.begin_write()?;
        {
            let mut dead = txn.open_table(PACK_DEAD)?;
            let mut chunks_t = txn.open_table(CHUNKS)?;
            let mut manifests = txn.open_table(MANIFESTS)?;
            let mut refs = txn.open_table(MANIFEST_REFS)?;
            let mut narinfos = txn.open_table(NARINFOS)?;
            let mut counters = txn.open_table(COUNTERS)?;
            let mut packs_t = txn.open_table(PACKS)?;
            if let Some(m) = manifest {
                outcome.new_nar = true;
                outcome.chunks = m.chunks.len() as u64;
                for c in &m.chunks {
                    let existing = chunks_t.get(c.id.0)?.map(|v| v.value());
                    match existing {
                        Some(mut v) => {
                            v.4 += 1;
                            chunks_t.insert(c.id.0, v)?;
                        }
                        None => {
                            let loc = new_chunks.get(&c.id).ok_or(StoreError::MissingChunk {
                                nar_hash: m.nar_hash,
                                chunk: c.id,
                            })?;
                            chunks_t.insert(
                                c.id.0,
                                (loc.pack, loc.offset, loc.comp_len, loc.raw_len, 1),
                            )?;
                            outcome.new_chunks += 1;
                            outcome.new_chunk_bytes += loc.raw_len as u64;
                            outcome.new_compressed_bytes += loc.comp_len as u64;
                        }
                    }
                }
                manifests.insert(m.nar_hash.0, m.encode().as_slice())?;
                add_counter(&mut counters, C_NARS, 1)?;
                add_counter(&mut counters, C_NAR_BYTES, m.nar_size as i64)?;
                add_counter(&mut counters, C_CHUNKS, outcome.new_chunks as i64)?;
                add_counter(
                    &mut counters,
                    C_UNIQUE_CHUNK_BYTES,
                    outcome.new_chunk_bytes as i64,
                )?;
                add_counter(
                    &mut counters,
                    C_CHUNK_COMPRESSED_BYTES,
                    outcome.new_compressed_bytes as i64,
                )?;
            }
            for &(p, len) in packs {
                packs_t.insert(p, len)?;
            }
            meta::commit(&txn, &mut dead, &mut counters, hash, meta)?;
            let old = narinfos.get(hash)?.map(|v| v.value().to_vec());
            match old {
                Some(old) => {
                    let old = StoredNarInfo::decode(hash, &old)?;
                    if old.nar_hash != record.nar_hash {
                        let released = release_manifest(
                            &mut manifests,
                            &mut refs,
                            &mut chunks_t,
                            &mut counters,
                            &mut dead,
                            &old.nar_hash,
                        )?;
                        if released.is_some() {
                            txn.open_table(NAR_ACCESS)?.remove(old.nar_hash.0)?;
                        }
                        add_ref(&mut refs, &record.nar_hash)?;
                    }
                }
                None => {
                    add_counter(&mut counters, C_NARINFOS, 1)?;
                    add_ref(&mut refs, &record.nar_hash)?;
                }
            }
            narinfos.insert(hash, record.encode().as_slice())?;
            if let Some(f) = nar_file {
                txn.open_table(NAR_FILES)?.insert(f, record.nar_hash.0)?;
            }
            txn.open_table(NAR_ACCESS)?
                .insert(record.nar_hash.0, record.added_unix)?;
            if retention == Retention::Pinned {
                txn.open_table(PINS)?.insert(hash, record.added_unix)?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// Tees the raw NAR into sha256 and the NAR validator as it is read.
struct CheckingReader<R> {
    inner: R,
    sha: Sha256,
    validator: NarValidator,
    size: u64,
}

/// Carries a NAR validation error through `io::Error` (the chunker only speaks io).
#[derive(Debug)]
struct TeeError(NarError);

impl std::fmt::Display for TeeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for TeeError {}

fn tee_error(e: &io::Error) -> Option<NarError> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<TeeError>())
        .map(|t| t.0.clone())
}

impl<R: Read> CheckingReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            sha: Sha256::new(),
            validator: NarValidator::new(),
            size: 0,
        }
    }

    fn finish(self) -> Result<(NarHash, u64), NarError> {
        self.validator.finish()?;
        Ok((NarHash(self.sha.finalize().into()), self.size))
    }
}

impl<R: Read> Read for CheckingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let data = &buf[..n];
        self.sha.update(data);
        self.validator
            .feed(data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, TeeError(e)))?;
        self.size += n as u64;
        Ok(n)
    }
}

/// What [`Store::retrust`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RetrustReport {
    /// Narinfos whose signatures were checked again (0: the keys had not changed).
    pub checked: u64,
    /// Paths trusted now that were not.
    pub now_trusted: u64,
    /// Paths no longer trusted.
    pub now_untrusted: u64,
}

impl Store {
    /// Makes every stored narinfo's trust follow `keys`: when they differ from the keys of
    /// the last check (or there was none), every narinfo's signatures are checked again and
    /// its trust class rewritten. A path imported before its key was configured is then
    /// announced and shared; one whose key was removed no longer is.
    pub fn retrust(
        &self,
        keys: &[crate::core::signing::PublicKey],
    ) -> Result<RetrustReport, StoreError> {
        let mut names: Vec<String> = keys.iter().map(ToString::to_string).collect();
        names.sort();
        names.dedup();
        let id = names.join(" ");
        let mut report = RetrustReport::default();
        let txn = self.db.begin_write()?;
        {
            let mut settings = txn.open_table(SETTINGS)?;
            if settings
                .get(S_TRUSTED_KEYS)?
                .is_some_and(|v| v.value() == id)
            {
                return Ok(report);
            }
            let mut narinfos = txn.open_table(NARINFOS)?;
            let rows: Vec<(String, Vec<u8>)> = narinfos
                .iter()?
                .map(|r| r.map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
                .collect::<Result<_, _>>()?;
            for (hash, bytes) in rows {
                let mut rec = StoredNarInfo::decode(&hash, &bytes)?;
                report.checked += 1;
                let trust = NarInfo::parse(&rec.text)
                    .ok()
                    .and_then(|info| crate::core::signing::verify_narinfo(&info, keys).ok())
                    .unwrap_or(Trust::Untrusted);
                let class = TrustClass::from(&trust);
                if class == rec.trust {
                    continue;
                }
                match class {
                    TrustClass::Trusted(_) => report.now_trusted += 1,
                    TrustClass::Untrusted => report.now_untrusted += 1,
                }
                rec.trust = class;
                narinfos.insert(hash.as_str(), rec.encode().as_slice())?;
            }
            settings.insert(S_TRUSTED_KEYS, id.as_str())?;
        }
        txn.commit()?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::core::signing::SecretKey;

    #[test]
    fn trust_follows_the_configured_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sk = SecretKey::generate("retrust-1", [7; 32]);
        let hash = "0123456789abcdfghijklmnpqrsvwxyz";
        // Imported before its key was configured: untrusted, not shareable.
        ingest(&store, hash, &sample_nar(1), Some(&sk), &[]);
        assert!(store.shareable_paths().unwrap().is_empty());
        let keys = [sk.public_key()];
        let r = store.retrust(&keys).unwrap();
        assert_eq!((r.checked, r.now_trusted, r.now_untrusted), (1, 1, 0));
        assert_eq!(store.shareable_paths().unwrap().len(), 1);
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
        // The same keys again: nothing to do.
        assert_eq!(store.retrust(&keys).unwrap(), RetrustReport::default());
        // The key removed: untrusted again.
        let r = store.retrust(&[]).unwrap();
        assert_eq!((r.now_trusted, r.now_untrusted), (0, 1));
        assert!(store.shareable_paths().unwrap().is_empty());
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
    }
}
