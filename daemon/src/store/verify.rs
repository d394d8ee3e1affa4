//! `stats` (the counters kept in step with the tables) and `verify` (every chunk, manifest,
//! narinfo and metadata record re-read and re-hashed; the tables recounted).

use super::*;

impl Store {
    /// Counts and sizes.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let txn = self.db.begin_read()?;
        let c = txn.open_table(COUNTERS)?;
        let get =
            |k: &str| -> Result<u64, StoreError> { Ok(c.get(k)?.map(|v| v.value()).unwrap_or(0)) };
        let mut s = Stats {
            narinfos: get(C_NARINFOS)?,
            nars: get(C_NARS)?,
            nar_bytes: get(C_NAR_BYTES)?,
            chunks: get(C_CHUNKS)?,
            unique_chunk_bytes: get(C_UNIQUE_CHUNK_BYTES)?,
            chunk_compressed_bytes: get(C_CHUNK_COMPRESSED_BYTES)?,
            ..Default::default()
        };
        for r in txn.open_table(MANIFESTS)?.iter()? {
            s.manifest_bytes += r?.1.value().len() as u64;
        }
        for r in txn.open_table(NAR_META)?.iter()? {
            s.metadata_bytes += MetaLoc::of_row(r?.1.value()).loc.record_len();
        }
        let packs = txn.open_table(PACKS)?;
        s.packs = packs.len()?;
        for r in packs.iter()? {
            s.pack_bytes += r?.1.value();
        }
        s.index_bytes = self.index_bytes();
        s.stored_bytes = s.pack_bytes + s.index_bytes;
        s.dead_bytes = get(C_DEAD_BYTES)?;
        s.cache_bytes = s.stored_bytes;
        s.live_bytes = s.cache_bytes.saturating_sub(s.dead_bytes);
        let pins = txn.open_table(PINS)?;
        let narinfos = txn.open_table(NARINFOS)?;
        let mut pinned = HashSet::new();
        for r in pins.iter()? {
            let (k, _) = r?;
            s.pinned_paths += 1;
            if let Some(v) = narinfos.get(k.value())? {
                pinned.insert(StoredNarInfo::decode(k.value(), v.value())?.nar_hash);
            }
        }
        s.pinned_nars = pinned.len() as u64;
        (s.hidden_paths, s.collected_paths) = self.retired_counts()?;
        s.storage = self.packs.remote.as_ref().map(|r| StorageStats {
            backend: r.storage.kind(),
            location: r.storage.describe(),
            remote_packs: r.lens.lock().unwrap_or_else(|e| e.into_inner()).len() as u64,
            cache_bytes: r.cache.bytes(),
            requests: r.storage.counters(),
        });
        Ok(s)
    }

    pub(super) fn index_bytes(&self) -> u64 {
        fs::metadata(self.dir.join("index.redb"))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Re-reads and re-hashes everything; returns the list of problems (empty: all good).
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        let txn = self.db.begin_read()?;
        let chunks_t = txn.open_table(CHUNKS)?;
        let manifests = txn.open_table(MANIFESTS)?;
        let refs_t = txn.open_table(MANIFEST_REFS)?;
        let narinfos = txn.open_table(NARINFOS)?;

        let mut dctx = new_dctx(&self.dir)?;
        // 1. Every chunk record: header, zstd frame, content hash.
        let mut bad_chunks = std::collections::HashSet::new();
        let mut chunk_refs: HashMap<ChunkId, u32> = HashMap::new();
        let mut by_place = Vec::new();
        for r in chunks_t.iter()? {
            let (k, v) = r?;
            let id = ChunkId(k.value());
            let (loc, rc) = loc_of(v.value());
            chunk_refs.insert(id, rc);
            by_place.push((id, loc));
        }
        // In pack order: a remote pack is then read in few, large requests.
        by_place.sort_by_key(|(_, l)| (l.pack, l.offset));
        for (id, loc) in by_place {
            if let Err(e) = self.packs.read(&id, &loc, &mut dctx) {
                problems.push(format!("chunk {id}: {e}"));
                bad_chunks.insert(id);
            }
            progress(loc.comp_len as u64);
        }

        // 2. Every manifest: decodes, names known chunks, reassembles to its NarHash.
        let mut counted: HashMap<ChunkId, u32> = HashMap::new();
        let mut nar_paths: HashMap<NarHash, Vec<String>> = HashMap::new();
        let mut narinfo_recs = Vec::new();
        for r in narinfos.iter()? {
            let (k, v) = r?;
            let hash = k.value().to_string();
            match StoredNarInfo::decode(&hash, v.value()) {
                Ok(rec) => narinfo_recs.push((hash, rec)),
                Err(e) => problems.push(format!("narinfo {hash}: {e}")),
            }
        }
        for (hash, rec) in &narinfo_recs {
            let path = NarInfo::parse(&rec.text)
                .map(|i| i.store_path.to_absolute())
                .unwrap_or_else(|_| hash.clone());
            nar_paths.entry(rec.nar_hash).or_default().push(path);
        }
        for r in manifests.iter()? {
            let (k, v) = r?;
            let nar_hash = NarHash(k.value());
            let who = nar_paths
                .get(&nar_hash)
                .map(|p| p.join(", "))
                .unwrap_or_else(|| format!("NAR {nar_hash} (no narinfo)"));
            let m = match Manifest::decode(v.value()) {
                Ok(m) => m,
                Err(e) => {
                    problems.push(format!("{who}: manifest damaged: {e}"));
                    continue;
                }
            };
            for c in &m.chunks {
                *counted.entry(c.id).or_default() += 1;
            }
            if let Some(c) = m.chunks.iter().find(|c| bad_chunks.contains(&c.id)) {
                problems.push(format!(
                    "{who}: NAR {nar_hash} cannot be rebuilt: chunk {} is damaged",
                    c.id
                ));
                continue;
            }
            match self.nar_reader(&nar_hash).and_then(|mut r| {
                io::copy(&mut r, &mut io::sink()).map_err(|source| StoreError::NarRead {
                    store_path: who.clone(),
                    source,
                })
            }) {
                Ok(n) if n == m.nar_size => {}
                Ok(n) => problems.push(format!(
                    "{who}: NAR rebuilt to {n} bytes, expected {}",
                    m.nar_size
                )),
                Err(e) => problems.push(format!("{who}: {e}")),
            }
            let refs = refs_t.get(nar_hash.0)?.map(|v| v.value()).unwrap_or(0);
            let expected = nar_paths.get(&nar_hash).map_or(0, |p| p.len() as u32);
            if refs != expected {
                problems.push(format!(
                    "NAR {nar_hash}: manifest refcount {refs}, but {expected} narinfos point at it"
                ));
            }
        }
        for (id, rc) in &chunk_refs {
            let n = counted.get(id).copied().unwrap_or(0);
            if n != *rc {
                problems.push(format!(
                    "chunk {id}: refcount {rc}, but {n} manifest entries name it"
                ));
            }
        }
        for id in counted.keys() {
            if !chunk_refs.contains_key(id) {
                problems.push(format!(
                    "chunk {id}: named by a manifest but missing from the index"
                ));
            }
        }

        // 3. Every narinfo: parses, matches its record, has its NAR.
        for (hash, rec) in &narinfo_recs {
            match NarInfo::parse(&rec.text) {
                Ok(info) => {
                    let p = info.store_path.to_absolute();
                    if info.store_path.hash().as_str() != hash {
                        problems.push(format!("{p}: stored under the wrong hash {hash}"));
                    }
                    if info.nar_hash != rec.nar_hash {
                        problems.push(format!("{p}: NarHash differs from its record"));
                    }
                    if manifests.get(rec.nar_hash.0)?.is_none() {
                        problems.push(format!("{p}: its NAR {} is missing", rec.nar_hash));
                    }
                }
                Err(e) => problems.push(format!("narinfo {hash}: {e}")),
            }
        }

        // 4. Every metadata record: checked, decodes, says what the index says.
        for r in txn.open_table(NAR_META)?.iter()? {
            let (k, v) = r?;
            let hash = k.value();
            let m = MetaLoc::of_row(v.value());
            let meta = match meta::read(&self.packs, &m, &mut dctx) {
                Ok(meta) => meta,
                Err(e) => {
                    problems.push(format!("metadata record of {hash}: {e}"));
                    continue;
                }
            };
            // The trust class is not compared: it follows the configured keys (`retrust`).
            let same = |a: &[u8]| match (
                StoredNarInfo::decode(hash, a),
                StoredNarInfo::decode(hash, &meta.narinfo),
            ) {
                (Ok(a), Ok(b)) => {
                    (a.text, a.nar_hash, a.source, a.added_unix)
                        == (b.text, b.nar_hash, b.source, b.added_unix)
                }
                _ => false,
            };
            let record = narinfos.get(hash)?.map(|v| v.value().to_vec());
            if meta.hash != hash || meta.seq != m.seq || !record.as_deref().is_some_and(same) {
                problems.push(format!(
                    "metadata record of {hash}: differs from the index (verify --repair would \
                     restore something else)"
                ));
            }
        }

        // 5. Pins, last-access times and each pack's live + dead bytes (`evict.rs`).
        evict::verify_tables(&txn, &narinfo_recs, &mut problems)?;
        Ok(problems)
    }
}
