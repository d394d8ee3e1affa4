//! A bounded local cache of pack ranges read from remote pack storage (S3): sealed packs are
//! immutable, so a block of one, once fetched, is good until the pack is deleted. Blocks are
//! [`BLOCK`]-aligned files in `<data-dir>/pack-cache/`, evicted least recently used beyond
//! the configured size; a read fetches every run of missing blocks with one ranged GET, so
//! a hot NAR costs no request and a cold one one request per run of adjacent chunks.
//!
//! The cache holds no lock while fetching. What it returns is not checked here: the reader
//! checks every record against its id, and calls [`RangeCache::invalidate`] on a damaged
//! one before reading it again from the storage.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Cache block size: the unit of a fetch's alignment and of eviction.
pub(crate) const BLOCK: u64 = 1 << 20;

/// Numbers the temporary files of block writes (unique within the process).
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone, Copy)]
struct Entry {
    len: u64,
    used: u64,
}

#[derive(Debug, Default)]
struct State {
    blocks: HashMap<(u32, u64), Entry>,
    bytes: u64,
    clock: u64,
}

/// Why a cached read failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Fetch(E),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pack {pack}: range {offset}+{len} is past its end ({pack_len})")]
    PastEnd {
        pack: u32,
        offset: u64,
        len: u64,
        pack_len: u64,
    },
}

#[derive(Debug)]
pub(crate) struct RangeCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

fn block_name(pack: u32, block: u64) -> String {
    format!("p{pack:08}-{block:08}")
}

fn parse_block_name(name: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix('p')?;
    let (p, b) = rest.split_once('-')?;
    if p.len() != 8 || b.len() != 8 {
        return None;
    }
    Some((p.parse().ok()?, b.parse().ok()?))
}

impl RangeCache {
    /// Opens the cache in `dir` (created if needed) holding at most `max_bytes`; blocks left
    /// by an earlier run are kept (within the bound), partial writes removed.
    pub(crate) fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut state = State::default();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(key) = name.to_str().and_then(parse_block_name) else {
                let _ = fs::remove_file(e.path()); // a temporary file of a crashed write
                continue;
            };
            let len = e.metadata()?.len();
            state.clock += 1;
            state.bytes += len;
            state.blocks.insert(
                key,
                Entry {
                    len,
                    used: state.clock,
                },
            );
        }
        let cache = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
        };
        cache.shrink();
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// `len` bytes at `offset` of `pack` (`pack_len` long); the blocks missing are fetched
    /// with `fetch(offset, len)`, one call per run of adjacent missing blocks.
    pub(crate) fn read<E: std::error::Error + 'static>(
        &self,
        pack: u32,
        offset: u64,
        len: u64,
        pack_len: u64,
        mut fetch: impl FnMut(u64, u64) -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, CacheError<E>> {
        if offset.checked_add(len).is_none_or(|end| end > pack_len) {
            return Err(CacheError::PastEnd {
                pack,
                offset,
                len,
                pack_len,
            });
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.max_bytes == 0 {
            return fetch(offset, len).map_err(CacheError::Fetch);
        }
        let first = offset / BLOCK;
        let last = (offset + len - 1) / BLOCK;
        let mut out = Vec::with_capacity(len as usize);
        let mut b = first;
        while b <= last {
            // A run of cached blocks is read from disk, a run of missing ones fetched at once.
            let cached = self.lock().blocks.contains_key(&(pack, b));
            let mut end = b;
            while end < last && self.lock().blocks.contains_key(&(pack, end + 1)) == cached {
                end += 1;
            }
            let run_start = b * BLOCK;
            let run_end = ((end + 1) * BLOCK).min(pack_len);
            let bytes = if cached {
                match self.read_blocks(pack, b, end) {
                    Ok(bytes) => bytes,
                    // Evicted meanwhile: fetched again, not cached.
                    Err(_) => fetch(run_start, run_end - run_start).map_err(CacheError::Fetch)?,
                }
            } else {
                let bytes = fetch(run_start, run_end - run_start).map_err(CacheError::Fetch)?;
                self.store_blocks(pack, b, &bytes)?;
                bytes
            };
            let from = offset.max(run_start) - run_start;
            let to = (offset + len).min(run_end) - run_start;
            out.extend_from_slice(&bytes[from as usize..to as usize]);
            b = end + 1;
        }
        Ok(out)
    }

    fn read_blocks(&self, pack: u32, first: u64, last: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        for b in first..=last {
            let data = fs::read(self.dir.join(block_name(pack, b)))?;
            if b < last && data.len() as u64 != BLOCK {
                return Err(io::Error::other("short cache block"));
            }
            out.extend_from_slice(&data);
        }
        let mut st = self.lock();
        for b in first..=last {
            st.clock += 1;
            let now = st.clock;
            if let Some(e) = st.blocks.get_mut(&(pack, b)) {
                e.used = now;
            }
        }
        Ok(out)
    }

    /// Writes the blocks of `bytes` (fetched from block `first` on) and shrinks the cache.
    fn store_blocks<E: std::error::Error>(
        &self,
        pack: u32,
        first: u64,
        bytes: &[u8],
    ) -> Result<(), CacheError<E>> {
        for (i, block) in bytes.chunks(BLOCK as usize).enumerate() {
            let b = first + i as u64;
            let path = self.dir.join(block_name(pack, b));
            // A temporary name of this write's own: readers of neighbouring ranges miss the
            // same block at once and each stores it; with a shared name one renamed the other's
            // file away (ENOENT) or renamed it half-written (a short block).
            let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
            let tmp = self.dir.join(format!("{}.{seq}.tmp", block_name(pack, b)));
            let io_err = |source| CacheError::Io {
                path: path.clone(),
                source,
            };
            fs::write(&tmp, block).map_err(io_err)?;
            fs::rename(&tmp, &path).map_err(io_err)?;
            let mut st = self.lock();
            st.clock += 1;
            let e = Entry {
                len: block.len() as u64,
                used: st.clock,
            };
            if let Some(old) = st.blocks.insert((pack, b), e) {
                st.bytes -= old.len;
            }
            st.bytes += e.len;
        }
        self.shrink();
        Ok(())
    }

    /// Evicts least recently used blocks down to the bound.
    fn shrink(&self) {
        let victims: Vec<(u32, u64)> = {
            let mut st = self.lock();
            if st.bytes <= self.max_bytes {
                return;
            }
            let mut by_age: Vec<((u32, u64), Entry)> =
                st.blocks.iter().map(|(k, e)| (*k, *e)).collect();
            by_age.sort_by_key(|(_, e)| e.used);
            let mut out = Vec::new();
            for (k, e) in by_age {
                if st.bytes <= self.max_bytes {
                    break;
                }
                st.blocks.remove(&k);
                st.bytes -= e.len;
                out.push(k);
            }
            out
        };
        for (p, b) in victims {
            let _ = fs::remove_file(self.dir.join(block_name(p, b)));
        }
    }

    /// Drops the cached blocks holding `offset..offset + len` of `pack` (a damaged read).
    pub(crate) fn invalidate(&self, pack: u32, offset: u64, len: u64) {
        let first = offset / BLOCK;
        let last = (offset + len.max(1) - 1) / BLOCK;
        self.drop_blocks(|p, b| p == pack && (first..=last).contains(&b));
    }

    /// Drops every cached block of a deleted pack.
    pub(crate) fn forget_pack(&self, pack: u32) {
        self.drop_blocks(|p, _| p == pack);
    }

    fn drop_blocks(&self, which: impl Fn(u32, u64) -> bool) {
        let gone: Vec<(u32, u64)> = {
            let mut st = self.lock();
            let keys: Vec<(u32, u64)> = st
                .blocks
                .keys()
                .filter(|(p, b)| which(*p, *b))
                .copied()
                .collect();
            for k in &keys {
                if let Some(e) = st.blocks.remove(k) {
                    st.bytes -= e.len;
                }
            }
            keys
        };
        for (p, b) in gone {
            let _ = fs::remove_file(self.dir.join(block_name(p, b)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Debug, thiserror::Error)]
    #[error("fetch failed")]
    struct Nope;

    fn pack_bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn runs_of_missing_blocks_are_one_fetch_and_hot_reads_none() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RangeCache::open(dir.path(), 8 * BLOCK).unwrap();
        let pack = pack_bytes((3 * BLOCK + 500) as usize);
        let calls = RefCell::new(Vec::new());
        let fetch = |o: u64, l: u64| {
            calls.borrow_mut().push((o, l));
            Ok::<_, Nope>(pack[o as usize..(o + l) as usize].to_vec())
        };
        let len = pack.len() as u64;
        // Spans blocks 0..=2: one fetch of whole blocks.
        let got = cache.read(7, 100, 2 * BLOCK + 10, len, fetch).unwrap();
        assert_eq!(got, &pack[100..(100 + 2 * BLOCK + 10) as usize]);
        assert_eq!(*calls.borrow(), vec![(0, 3 * BLOCK)]);
        // Cached: no fetch.
        let got = cache.read(7, BLOCK - 3, 6, len, fetch).unwrap();
        assert_eq!(got, &pack[(BLOCK - 3) as usize..(BLOCK + 3) as usize]);
        assert_eq!(calls.borrow().len(), 1);
        // The short last block: fetched up to the pack's end only.
        let got = cache.read(7, 3 * BLOCK, 500, len, fetch).unwrap();
        assert_eq!(got, &pack[(3 * BLOCK) as usize..]);
        assert_eq!(calls.borrow()[1], (3 * BLOCK, 500));
        // Past the end: refused without a fetch.
        assert!(matches!(
            cache.read(7, 3 * BLOCK, 501, len, fetch),
            Err(CacheError::PastEnd { .. })
        ));
        assert_eq!(calls.borrow().len(), 2);
        // A damaged block is dropped and fetched again; a reopened cache keeps the rest.
        cache.invalidate(7, BLOCK + 5, 1);
        cache.read(7, 0, len, len, fetch).unwrap();
        assert_eq!(calls.borrow()[2], (BLOCK, BLOCK));
        drop(cache);
        let cache = RangeCache::open(dir.path(), 8 * BLOCK).unwrap();
        assert_eq!(cache.bytes(), len);
        assert_eq!(cache.read(7, 0, len, len, fetch).unwrap(), pack);
        assert_eq!(calls.borrow().len(), 3);
        cache.forget_pack(7);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn the_bound_holds_and_a_failed_fetch_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RangeCache::open(dir.path(), 2 * BLOCK).unwrap();
        let pack = pack_bytes((5 * BLOCK) as usize);
        let fetch = |o: u64, l: u64| Ok::<_, Nope>(pack[o as usize..(o + l) as usize].to_vec());
        for b in 0..5 {
            cache.read(1, b * BLOCK, 10, 5 * BLOCK, fetch).unwrap();
            assert!(cache.bytes() <= 2 * BLOCK);
        }
        let files = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2);
        let failed = cache.read(1, 0, 10, 5 * BLOCK, |_, _| Err::<Vec<u8>, _>(Nope));
        assert!(matches!(failed, Err(CacheError::Fetch(Nope))));
        // No cache: every read is a fetch of exactly what was asked.
        let none = RangeCache::open(&dir.path().join("none"), 0).unwrap();
        let got = none
            .read(1, 5, 10, 5 * BLOCK, |o, l| {
                assert_eq!((o, l), (5, 10));
                Ok::<_, Nope>(pack[5..15].to_vec())
            })
            .unwrap();
        assert_eq!(got, &pack[5..15]);
    }

    /// Readers of neighbouring NARs miss the same block at once (a cold daemon serving
    /// concurrent requests): each fetches and stores it, and none may fail for the other's
    /// write.
    #[test]
    fn concurrent_misses_of_one_block_all_succeed() {
        let pack = pack_bytes((2 * BLOCK + 100) as usize);
        let len = pack.len() as u64;
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let cache = RangeCache::open(dir.path(), 8 * BLOCK).unwrap();
            let start = std::sync::Barrier::new(8);
            std::thread::scope(|s| {
                for t in 0..8u64 {
                    let (cache, pack, start) = (&cache, &pack, &start);
                    s.spawn(move || {
                        start.wait();
                        let offset = t * 1000;
                        let got = cache
                            .read(3, offset, BLOCK + 50, len, |o, l| {
                                Ok::<_, Nope>(pack[o as usize..(o + l) as usize].to_vec())
                            })
                            .unwrap();
                        assert_eq!(got, &pack[offset as usize..(offset + BLOCK + 50) as usize]);
                    });
                }
            });
            assert_eq!(cache.bytes(), 2 * BLOCK);
            let names: Vec<String> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(names.len(), 2, "{names:?}");
        }
    }
}
