//! Sealed packs to remote storage (S3): uploaded after their commit, their local files deleted
//! only once the upload succeeded; at a clean stop the open pack is sealed and uploaded too,
//! so the storage alone holds every acknowledged NAR. No lock is held during an upload (only
//! the reader gate, briefly, to delete the local file).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::time::Instant;

use redb::ReadableTable;
use serde::Serialize;

use super::evict::lock;
use super::packs::REMOTE_DELETE_DELAY;
use super::tables::PACKS;
use super::{io_err, pack, Store, StoreError};

/// What [`Store::upload_sealed`] did.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct UploadReport {
    /// Sealed packs uploaded (and their local files deleted).
    pub packs: u64,
    pub bytes: u64,
    /// Remote packs deleted (a pack GC's, after their delay).
    pub deleted: u64,
}

impl Store {
    /// Whether sealed packs go to remote storage.
    pub fn has_remote_storage(&self) -> bool {
        self.packs.remote.is_some()
    }

    /// Uploads every committed, sealed pack still local and deletes its local file; deletes
    /// the remote packs pack GC gave up longer than [`REMOTE_DELETE_DELAY`] ago. Without
    /// remote storage: nothing.
    pub fn upload_sealed(&self) -> Result<UploadReport, StoreError> {
        self.upload(false)
    }

    /// At a clean stop: seals the open pack (if it holds records) and uploads every sealed
    /// pack, so that the storage alone holds every acknowledged NAR; deletes every remote
    /// pack pack GC gave up (no reader is left).
    pub fn seal_and_upload(&self) -> Result<UploadReport, StoreError> {
        if self.packs.remote.is_none() {
            return Ok(UploadReport::default());
        }
        {
            let mut w = lock(&self.writer);
            if !w.is_empty() {
                w.rotate()?;
            }
        }
        self.upload(true)
    }

    fn upload(&self, stopping: bool) -> Result<UploadReport, StoreError> {
        let mut report = UploadReport::default();
        let Some(remote) = self.packs.remote.clone() else {
            return Ok(report);
        };
        let current = lock(&self.writer).pack();
        let committed: BTreeMap<u32, u64> = {
            let txn = self.db.begin_read()?;
            let t = txn.open_table(PACKS)?;
            t.iter()?
                .map(|r| r.map(|(k, v)| (k.value(), v.value())))
                .collect::<Result<_, _>>()?
        };
        let dir = &self.packs.dir;
        for (&p, &len) in committed.iter().filter(|(&p, _)| p != current) {
            let path = pack::pack_path(dir, p);
            let on_disk = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            if on_disk != len {
                tracing::warn!(pack = p, on_disk, committed = len, "sealed pack left local");
                continue;
            }
            let t = Instant::now();
            remote.storage.put_pack(p, &path)?;
            // The local copy goes only once the stored one is proven whole.
            let stored = remote.storage.pack_len(p)?;
            if stored != Some(len) {
                return Err(StoreError::Storage(Box::new(
                    super::storage::StorageError::ShortRead {
                        pack: p,
                        offset: 0,
                        wanted: len,
                        available: stored.unwrap_or(0),
                    },
                )));
            }
            lock(&remote.lens).insert(p, len);
            {
                // Readers holding the local file keep reading it; later ones go remote.
                let _exclusive = self.packs.exclusive();
                self.packs.forget(p);
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&path)(e)),
                }
            }
            tracing::info!(
                pack = p,
                bytes = len,
                secs = t.elapsed().as_secs_f64(),
                "pack uploaded"
            );
            report.packs += 1;
            report.bytes += len;
        }
        let due: Vec<u32> = {
            let mut doomed = remote.doomed.lock().unwrap_or_else(|e| e.into_inner());
            let (due, keep) = doomed
                .drain(..)
                .partition(|(_, at)| stopping || at.elapsed() >= REMOTE_DELETE_DELAY);
            *doomed = keep;
            due.into_iter().map(|(p, _)| p).collect()
        };
        for p in due {
            remote.storage.delete_pack(p)?;
            remote.cache.forget_pack(p);
            report.deleted += 1;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::repair::repair_inner;
    use super::super::storage::testing::S3Server;
    use super::super::storage::{PackStorage, S3Storage, StorageSpec};
    use super::super::testing::*;
    use super::*;
    use crate::core::NarHash;

    const H: [&str; 3] = [
        "0123456789abcdfghijklmnpqrsvwxyz",
        "1123456789abcdfghijklmnpqrsvwxyz",
        "2123456789abcdfghijklmnpqrsvwxyz",
    ];

    fn s3(server: &S3Server) -> (StorageSpec, Arc<dyn PackStorage>) {
        let cfg = server.spec("seed", "packs/v1");
        let spec = StorageSpec::S3(cfg.target.clone());
        (spec, Arc::new(S3Storage::open(cfg).unwrap()))
    }

    fn open(dir: &std::path::Path, server: &S3Server) -> Store {
        let (spec, storage) = s3(server);
        Store::open_inner(dir, 3, &spec, Some(storage), Some(64 << 20)).unwrap()
    }

    fn local_packs_with_records(dir: &std::path::Path) -> usize {
        super::super::repair::pack_files(&dir.join("packs"))
            .unwrap()
            .values()
            .filter(|&&len| len > pack::FILE_HEADER.len() as u64)
            .count()
    }

    fn gets(store: &Store) -> u64 {
        store.stats().unwrap().storage.unwrap().requests.gets
    }

    #[test]
    fn a_seed_on_s3_serves_from_the_bucket_alone_and_is_rebuilt_from_it() {
        let server = S3Server::start();
        let dir = tempfile::tempdir().unwrap();
        let nars: Vec<Vec<u8>> = (1..=3).map(sample_nar).collect();
        {
            let store = open(dir.path(), &server);
            ingest(&store, H[0], &nars[0], None, &[]);
            ingest(&store, H[1], &nars[1], None, &[]);
            lock(&store.writer).rotate().unwrap(); // as when a pack is full
            ingest(&store, H[2], &nars[2], None, &[]);
            let r = store.upload_sealed().unwrap();
            assert_eq!(r.packs, 1);
            assert!(!pack::pack_path(&dir.path().join("packs"), 1).exists());
            // Read back from the bucket (cold cache: one request for the NAR's records).
            let before = gets(&store);
            assert_eq!(read_nar(&store, &NarHash::digest(&nars[0])), nars[0]);
            assert!(gets(&store) > before);
            // A clean stop: the open pack is sealed and uploaded too.
            let r = store.seal_and_upload().unwrap();
            assert_eq!(r.packs, 1);
            assert_eq!(local_packs_with_records(dir.path()), 0);
            let s = store.stats().unwrap().storage.unwrap();
            assert_eq!((s.remote_packs, s.requests.puts), (2, 2));
        }
        // Restart with an empty local cache: everything comes from the bucket.
        std::fs::remove_dir_all(dir.path().join("pack-cache")).unwrap();
        let store = open(dir.path(), &server);
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
        let cold = gets(&store);
        for n in &nars {
            assert_eq!(read_nar(&store, &NarHash::digest(n)), *n);
        }
        // Verify read every record: the NARs now come from the cache, no request.
        assert_eq!(gets(&store), cold);
        // Ingest goes on in a new local pack.
        ingest(
            &store,
            "3123456789abcdfghijklmnpqrsvwxyz",
            &sample_nar(4),
            None,
            &[],
        );
        store.seal_and_upload().unwrap();
        drop(store);

        // The data dir lost (index, packs, cache): the bucket alone rebuilds it.
        for d in ["index.redb", "packs", "pack-cache"] {
            let p = dir.path().join(d);
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
        let (spec, storage) = s3(&server);
        let report = repair_inner(dir.path(), &spec, Some(storage)).unwrap();
        assert_eq!((report.paths_restored, report.packs), (4, 3));
        assert!(report.downloaded_bytes > 0);
        let store = open(dir.path(), &server);
        assert_eq!(store.verify(|_| {}).unwrap(), Vec::<String>::new());
        for n in &nars {
            assert_eq!(read_nar(&store, &NarHash::digest(n)), *n);
        }
    }

    #[test]
    fn a_nar_read_costs_one_request_per_run_of_records() {
        let server = S3Server::start();
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), &server);
        let nar = sample_nar(7);
        ingest(&store, H[0], &nar, None, &[]);
        store.seal_and_upload().unwrap();
        let m = store.manifest(&NarHash::digest(&nar)).unwrap().unwrap();
        assert!(m.chunks.len() > 3, "several chunks: {}", m.chunks.len());
        let before = gets(&store);
        assert_eq!(read_nar(&store, &NarHash::digest(&nar)), nar);
        assert_eq!(gets(&store) - before, 1, "one GET for the whole run");
        assert_eq!(read_nar(&store, &NarHash::digest(&nar)), nar);
        assert_eq!(gets(&store) - before, 1, "hot: no GET");
    }

    #[test]
    fn a_storage_down_at_open_leaves_the_store_serving_what_it_can() {
        let mut server = S3Server::start();
        let dir = tempfile::tempdir().unwrap();
        let nar = sample_nar(1);
        {
            let store = open(dir.path(), &server);
            ingest(&store, H[0], &nar, None, &[]);
            store.seal_and_upload().unwrap();
        }
        let (spec, _) = s3(&server);
        let mut cfg = server.spec("seed", "packs/v1");
        server.stop();
        cfg.options.max_retries = 0;
        cfg.options.retry_timeout = std::time::Duration::from_secs(1);
        cfg.options.connect_timeout = std::time::Duration::from_secs(1);
        let storage: Arc<dyn PackStorage> = Arc::new(S3Storage::open(cfg).unwrap());
        let store = Store::open_inner(dir.path(), 3, &spec, Some(storage), Some(1 << 20)).unwrap();
        assert!(
            store.narinfo(H[0]).unwrap().is_some(),
            "narinfos still answer"
        );
        match store.nar_reader(&NarHash::digest(&nar)).and_then(|mut r| {
            std::io::copy(&mut r, &mut std::io::sink()).map_err(|source| StoreError::NarRead {
                store_path: H[0].into(),
                source,
            })
        }) {
            Err(e) => assert!(e.to_string().contains("unavailable"), "{e}"),
            Ok(_) => panic!("read a NAR from a storage that is down"),
        }
        // Ingest goes on locally; the upload waits for the storage.
        ingest(&store, H[1], &sample_nar(2), None, &[]);
        assert!(store.seal_and_upload().is_err());
        assert!(store.narinfo(H[1]).unwrap().is_some());
    }

    #[test]
    fn a_store_on_s3_is_not_opened_as_a_local_one() {
        let server = S3Server::start();
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), &server);
            ingest(&store, H[0], &sample_nar(1), None, &[]);
            store.seal_and_upload().unwrap();
        }
        match Store::open(dir.path()) {
            Err(e @ StoreError::StorageMismatch { .. }) => {
                assert!(
                    e.to_string().contains("--storage s3://seed/packs/v1"),
                    "{e}"
                );
            }
            Err(e) => panic!("expected a storage mismatch, got {e}"),
            Ok(_) => panic!("opened an S3 store as a local one"),
        }
    }
}
