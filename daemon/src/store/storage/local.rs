//! [`LocalDir`]: packs as files `pack-{id:08}.pack` in one directory (the store's `packs/`).
//!
//! Owns: a bounded cache of open read handles, so a seed with thousands of packs reads without
//! reopening files and without running into the fd limit. Does not write into a pack: a put
//! copies a sealed file in whole (copy, fsync, rename, fsync the directory), or does nothing
//! when the file already is the destination.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{pack_file_name, parse_pack_file_name, Counters, Op, PackStorage, StorageCounters};
use super::{StorageError, StorageError as E};

/// Open read handles kept by default.
pub(crate) const DEFAULT_OPEN_HANDLES: usize = 256;

/// Packs in a local directory.
pub(crate) struct LocalDir {
    dir: PathBuf,
    handles: Mutex<HandleCache>,
    counters: Counters,
    /// Names temporary files of concurrent puts apart.
    tmp_seq: AtomicU64,
}

impl std::fmt::Debug for LocalDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDir").field("dir", &self.dir).finish()
    }
}

/// At most `cap` open files, the least recently used one closed first.
struct HandleCache {
    cap: usize,
    tick: u64,
    open: HashMap<u32, (Arc<File>, u64)>,
}

impl HandleCache {
    fn get(&mut self, pack: u32) -> Option<Arc<File>> {
        self.tick += 1;
        let tick = self.tick;
        self.open.get_mut(&pack).map(|(f, used)| {
            *used = tick;
            Arc::clone(f)
        })
    }

    fn insert(&mut self, pack: u32, file: Arc<File>) {
        if !self.open.contains_key(&pack) && self.open.len() >= self.cap {
            let oldest = self
                .open
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(&p, _)| p);
            if let Some(p) = oldest {
                self.open.remove(&p);
            }
        }
        self.tick += 1;
        self.open.insert(pack, (file, self.tick));
    }

    fn forget(&mut self, pack: u32) {
        self.open.remove(&pack);
    }
}

impl LocalDir {
    /// Packs in `dir` (created if missing), with [`DEFAULT_OPEN_HANDLES`] open handles at most.
    pub(crate) fn open(dir: &Path) -> Result<LocalDir, StorageError> {
        Self::with_open_handles(dir, DEFAULT_OPEN_HANDLES)
    }

    /// Packs in `dir` (created if missing), keeping at most `max_open` (at least 1) read
    /// handles open.
    pub(crate) fn with_open_handles(dir: &Path, max_open: usize) -> Result<LocalDir, StorageError> {
        fs::create_dir_all(dir).map_err(E::io(dir))?;
        Ok(LocalDir {
            dir: dir.to_path_buf(),
            handles: Mutex::new(HandleCache {
                cap: max_open.max(1),
                tick: 0,
                open: HashMap::new(),
            }),
            counters: Counters::default(),
            tmp_seq: AtomicU64::new(0),
        })
    }

    fn path(&self, pack: u32) -> PathBuf {
        self.dir.join(pack_file_name(pack))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HandleCache> {
        // The cache holds no invariant a panicking reader could break: keep using it.
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, pack: u32) -> Result<Arc<File>, StorageError> {
        if let Some(f) = self.cache().get(pack) {
            return Ok(f);
        }
        let path = self.path(pack);
        let file = match File::open(&path) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(E::NotFound {
                    pack,
                    location: path.display().to_string(),
                })
            }
            Err(e) => return Err(E::io(&path)(e)),
        };
        self.cache().insert(pack, Arc::clone(&file));
        Ok(file)
    }

    fn put(&self, pack: u32, src: &Path) -> Result<(), StorageError> {
        let dest = self.path(pack);
        if same_file(src, &dest).map_err(E::io(src))? {
            tracing::debug!(pack, "pack is already in place");
            return Ok(());
        }
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(
            ".{}.tmp-{}-{seq}",
            pack_file_name(pack),
            std::process::id()
        ));
        let copied = copy_synced(src, &tmp);
        let copied = match copied {
            Ok(n) => n,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(E::io(&dest)(e));
        }
        self.cache().forget(pack);
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(E::io(&self.dir))?;
        self.counters.add_bytes_out(copied);
        Ok(())
    }

    fn read(&self, pack: u32, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        let file = self.handle(pack)?;
        let path = self.path(pack);
        let size = usize::try_from(len).map_err(|_| E::Io {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "read length overflows"),
        })?;
        let mut buf = vec![0u8; size];
        match file.read_exact_at(&mut buf, offset) {
            Ok(()) => {
                self.counters.add_bytes_in(len);
                Ok(buf)
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let file_len = file.metadata().map_err(E::io(&path))?.len();
                Err(E::ShortRead {
                    pack,
                    offset,
                    wanted: len,
                    available: file_len.saturating_sub(offset),
                })
            }
            Err(e) => Err(E::io(&path)(e)),
        }
    }

    fn len(&self, pack: u32) -> Result<Option<u64>, StorageError> {
        let path = self.path(pack);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(E::io(&path)(e)),
        }
    }

    fn list(&self) -> Result<Vec<(u32, u64)>, StorageError> {
        let mut packs = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(E::io(&self.dir))? {
            let entry = entry.map_err(E::io(&self.dir))?;
            let Some(pack) = entry.file_name().to_str().and_then(parse_pack_file_name) else {
                continue;
            };
            match entry.metadata() {
                Ok(m) if m.is_file() => packs.push((pack, m.len())),
                Ok(_) => {}
                // Deleted between the listing and now.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(E::io(&entry.path())(e)),
            }
        }
        packs.sort_unstable();
        Ok(packs)
    }

    fn delete(&self, pack: u32) -> Result<(), StorageError> {
        let path = self.path(pack);
        self.cache().forget(pack);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(E::io(&path)(e)),
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(E::io(&self.dir))
    }
}

/// Whether `a` and `b` name the same file (`b` may not exist).
fn same_file(a: &Path, b: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let ma = fs::metadata(a)?;
    match fs::metadata(b) {
        Ok(mb) => Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Copies `src` to a new file `dest` and fsyncs it; returns the bytes copied.
fn copy_synced(src: &Path, dest: &Path) -> Result<u64, StorageError> {
    let mut from = File::open(src).map_err(E::io(src))?;
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(E::io(dest))?;
    let n = io::copy(&mut from, &mut to).map_err(E::io(dest))?;
    to.flush().map_err(E::io(dest))?;
    to.sync_all().map_err(E::io(dest))?;
    Ok(n)
}

impl PackStorage for LocalDir {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.dir.display())
    }

    fn put_pack(&self, pack: u32, path: &Path) -> Result<(), StorageError> {
        let _span = tracing::debug_span!("put_pack", storage = "local", pack).entered();
        self.counters.record(Op::Put, self.put(pack, path))
    }

    fn read_range(&self, pack: u32, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.counters.record(Op::Get, self.read(pack, offset, len))
    }

    fn pack_len(&self, pack: u32) -> Result<Option<u64>, StorageError> {
        self.counters.record(Op::Get, self.len(pack))
    }

    fn list_packs(&self) -> Result<Vec<(u32, u64)>, StorageError> {
        self.counters.record(Op::List, self.list())
    }

    fn delete_pack(&self, pack: u32) -> Result<(), StorageError> {
        let _span = tracing::debug_span!("delete_pack", storage = "local", pack).entered();
        self.counters.record(Op::Delete, self.delete(pack))
    }

    fn counters(&self) -> StorageCounters {
        self.counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_cache_stays_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        fs::write(&src, b"0123456789").expect("write");
        let packs = dir.path().join("packs");
        let s = LocalDir::with_open_handles(&packs, 3).expect("open");
        for pack in 1..=10 {
            s.put_pack(pack, &src).expect("put");
            assert_eq!(s.read_range(pack, 2, 3).expect("read"), b"234");
            assert!(s.cache().open.len() <= 3);
        }
        // The most recently used packs are the ones kept.
        let mut kept: Vec<u32> = s.cache().open.keys().copied().collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![8, 9, 10]);
    }

    #[test]
    fn put_of_the_destination_itself_is_a_no_op() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = LocalDir::open(dir.path()).expect("open");
        let dest = dir.path().join(pack_file_name(4));
        fs::write(&dest, b"sealed pack").expect("write");
        s.put_pack(4, &dest).expect("put in place");
        assert_eq!(fs::read(&dest).expect("read"), b"sealed pack");
        assert_eq!(s.counters().bytes_out, 0);
        // No temporary file is left behind either.
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
        assert_eq!(s.list_packs().expect("list"), vec![(4, 11)]);
    }
}
