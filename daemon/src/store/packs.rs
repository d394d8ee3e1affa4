//! Where readers find a pack's bytes: the local `packs/` directory (the open pack, and every
//! sealed pack when there is no remote storage or until it is uploaded), else the remote pack
//! storage (S3) through the bounded local range cache.
//!
//! With remote storage, a sealed pack is uploaded (one PUT, multipart when large) and its
//! local file deleted only after the upload succeeded (`Store::upload_sealed`); a reader that
//! opened the local file keeps reading it. Deleting a remote pack (pack GC, compaction) waits
//! [`REMOTE_DELETE_DELAY`], so a reader that resolved the pack before the commit finishes.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::pack::{self, Location, ReadAt};
use super::range_cache::RangeCache;
use super::storage::{PackStorage, StorageError};
use super::{io_err, StoreError};
use crate::core::ChunkId;

/// Open local pack files kept (a seed has thousands of packs, a process limited descriptors).
pub(super) const OPEN_PACKS: usize = 256;

/// How long a remote pack outlives the commit that stopped pointing into it.
pub(super) const REMOTE_DELETE_DELAY: Duration = Duration::from_secs(600);

/// Remote pack storage with its range cache and what is known to be in it.
#[derive(Debug)]
pub(super) struct RemotePacks {
    pub(super) storage: Arc<dyn PackStorage>,
    pub(super) cache: RangeCache,
    /// Sealed packs in the storage and their lengths.
    pub(super) lens: Mutex<HashMap<u32, u64>>,
    /// Packs no commit points into any more, deleted once their delay is over.
    pub(super) doomed: Mutex<Vec<(u32, Instant)>>,
}

impl RemotePacks {
    pub(super) fn len_of(&self, pack: u32) -> Option<u64> {
        lock(&self.lens).get(&pack).copied()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pack in the remote storage, read through the range cache.
#[derive(Debug)]
struct RemotePack {
    remote: Arc<RemotePacks>,
    pack: u32,
    len: u64,
}

impl ReadAt for RemotePack {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let storage = &self.remote.storage;
        let bytes = self
            .remote
            .cache
            .read(self.pack, offset, buf.len() as u64, self.len, |o, l| {
                storage.read_range(self.pack, o, l)
            })
            .map_err(|e| match e {
                super::range_cache::CacheError::Fetch(StorageError::NotFound { .. }) => {
                    io::Error::new(io::ErrorKind::NotFound, e.to_string())
                }
                e => io::Error::other(e.to_string()),
            })?;
        buf.copy_from_slice(&bytes);
        Ok(())
    }
}

/// A pack to read from.
#[derive(Clone)]
pub(crate) struct PackHandle {
    pub(super) src: Arc<dyn ReadAt>,
    /// Named in errors: the local path, or where the remote pack is.
    pub(super) path: PathBuf,
    /// Remote: reads cost requests, so readers fetch runs of records at once.
    pub(super) remote: bool,
}

impl PackHandle {
    /// The chunk at `loc`, checked against `id`.
    pub(super) fn read_chunk(
        &self,
        packs: &PackFiles,
        loc: &Location,
        id: &ChunkId,
        dctx: &mut zstd::bulk::Decompressor<'static>,
    ) -> Result<Vec<u8>, StoreError> {
        self.checked(packs, loc, |src, path| {
            pack::read_chunk(src, path, loc, id, dctx)
        })
    }

    /// The zstd frame of the chunk at `loc` as stored, after a full check against `id`.
    pub(super) fn read_frame(
        &self,
        packs: &PackFiles,
        loc: &Location,
        id: &ChunkId,
        dctx: &mut zstd::bulk::Decompressor<'static>,
    ) -> Result<Vec<u8>, StoreError> {
        self.checked(packs, loc, |src, path| {
            pack::read_frame(src, path, loc, id, dctx)
        })
    }

    /// A checked read; on a remote pack a damaged record's cached blocks are dropped and it
    /// is read once more from the storage.
    fn checked<T>(
        &self,
        packs: &PackFiles,
        loc: &Location,
        mut read: impl FnMut(&dyn ReadAt, &std::path::Path) -> Result<T, pack::PackError>,
    ) -> Result<T, StoreError> {
        match read(&*self.src, &self.path) {
            Err(pack::PackError::BadChunk { .. }) if self.remote => {
                packs.invalidate(loc.pack, loc.offset, loc.record_len());
                Ok(read(&*self.src, &self.path)?)
            }
            r => Ok(r?),
        }
    }
}

/// Open pack files for reading, shared by readers.
#[derive(Debug, Default)]
pub(super) struct PackFiles {
    pub(super) dir: PathBuf,
    pub(super) open: Mutex<HashMap<u32, Arc<File>>>,
    /// Readers hold it (shared) from their index snapshot until they have opened the packs it
    /// names; pack GC and the uploader hold it (exclusive) to delete a local pack. So a reader
    /// either sees the index from after the commit, or holds the old pack open (unlinked
    /// files stay readable).
    pub(super) gate: RwLock<()>,
    pub(super) remote: Option<Arc<RemotePacks>>,
}

impl PackFiles {
    pub(super) fn new(dir: PathBuf, remote: Option<Arc<RemotePacks>>) -> Self {
        Self {
            dir,
            open: Mutex::default(),
            gate: RwLock::default(),
            remote,
        }
    }

    pub(super) fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes a pack (it is about to be deleted); readers holding it keep their handle.
    pub(super) fn forget(&self, pack: u32) {
        lock(&self.open).remove(&pack);
    }

    /// Drops cached remote bytes of a damaged read.
    pub(super) fn invalidate(&self, pack: u32, offset: u64, len: u64) {
        if let Some(r) = &self.remote {
            r.cache.invalidate(pack, offset, len);
        }
    }

    pub(super) fn get(&self, pack: u32) -> Result<PackHandle, StoreError> {
        let path = pack::pack_path(&self.dir, pack);
        let mut open = lock(&self.open);
        if let Some(f) = open.get(&pack) {
            return Ok(PackHandle {
                src: f.clone(),
                path,
                remote: false,
            });
        }
        let f = match File::open(&path) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                drop(open);
                return self.get_remote(pack).ok_or_else(|| io_err(&path)(e));
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        if open.len() >= OPEN_PACKS {
            // Bounded: readers keep the handles they hold; idle ones close first.
            let idle: Vec<u32> = open
                .iter()
                .filter(|(_, f)| Arc::strong_count(f) == 1)
                .map(|(p, _)| *p)
                .take(OPEN_PACKS / 4)
                .collect();
            for p in idle {
                open.remove(&p);
            }
        }
        if open.len() < OPEN_PACKS {
            open.insert(pack, f.clone());
        }
        Ok(PackHandle {
            src: f,
            path,
            remote: false,
        })
    }

    fn get_remote(&self, pack: u32) -> Option<PackHandle> {
        let remote = self.remote.as_ref()?;
        let len = remote.len_of(pack)?;
        Some(PackHandle {
            path: PathBuf::from(format!(
                "{}/{}",
                remote.storage.describe(),
                super::storage::pack_file_name(pack)
            )),
            src: Arc::new(RemotePack {
                remote: remote.clone(),
                pack,
                len,
            }),
            remote: true,
        })
    }

    pub(super) fn read(
        &self,
        id: &ChunkId,
        loc: &Location,
        dctx: &mut zstd::bulk::Decompressor<'static>,
    ) -> Result<Vec<u8>, StoreError> {
        self.get(loc.pack)?.read_chunk(self, loc, id, dctx)
    }
}
