//! `PendingNarinfos`: narinfos fetched from somewhere else (a peer, an upstream cache) that are
//! being served while their NAR is not stored yet; looked up by store-path hash (narinfo
//! requests) and by NarHash (the NAR request that follows). Bounded: cleared when full.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::core::narinfo::NarInfo;
use crate::core::signing::Trust;
use crate::core::store_path::StorePathHash;
use crate::core::NarHash;

/// One pending narinfo; `S` says where it came from.
#[derive(Clone)]
pub struct Pending<S> {
    pub source: S,
    pub text: Arc<str>,
    pub info: Arc<NarInfo>,
    pub trust: Trust,
}

struct Maps<S> {
    by_path: HashMap<StorePathHash, Pending<S>>,
    by_nar: HashMap<NarHash, StorePathHash>,
}

pub struct PendingNarinfos<S> {
    maps: Mutex<Maps<S>>,
    cap: usize,
}

impl<S: Clone> PendingNarinfos<S> {
    pub fn new(cap: usize) -> Self {
        Self {
            maps: Mutex::new(Maps {
                by_path: HashMap::new(),
                by_nar: HashMap::new(),
            }),
            cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps<S>> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The served text of a pending narinfo.
    pub fn text(&self, hash: &StorePathHash) -> Option<Arc<str>> {
        self.lock().by_path.get(hash).map(|p| p.text.clone())
    }

    pub fn insert(&self, hash: StorePathHash, pending: Pending<S>) {
        let mut m = self.lock();
        if m.by_path.len() >= self.cap {
            m.by_path.clear();
            m.by_nar.clear();
        }
        m.by_nar.insert(pending.info.nar_hash, hash.clone());
        m.by_path.insert(hash, pending);
    }

    /// The pending narinfo whose NarHash is `nar_hash`, with its store-path hash.
    pub fn by_nar(&self, nar_hash: &NarHash) -> Option<(StorePathHash, Pending<S>)> {
        let m = self.lock();
        let h = m.by_nar.get(nar_hash)?;
        m.by_path.get(h).map(|p| (h.clone(), p.clone()))
    }

    pub fn remove(&self, nar_hash: &NarHash, path: &StorePathHash) {
        let mut m = self.lock();
        m.by_nar.remove(nar_hash);
        m.by_path.remove(path);
    }
}

/// One async lock per NarHash, so a NAR is fetched once while others proceed in parallel.
/// Bounded: idle locks are pruned when more than `cap` are held.
pub struct NarLocks {
    locks: Mutex<HashMap<NarHash, Arc<tokio::sync::Mutex<()>>>>,
    cap: usize,
}

impl NarLocks {
    pub fn new(cap: usize) -> Self {
        Self {
            locks: Mutex::new(HashMap::new()),
            cap,
        }
    }

    /// Runs `f` holding the lock of `nar_hash`.
    pub async fn with<T>(&self, nar_hash: &NarHash, f: impl std::future::Future<Output = T>) -> T {
        let lock = {
            let mut m = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            if m.len() >= self.cap {
                m.retain(|_, l| Arc::strong_count(l) > 1);
            }
            m.entry(*nar_hash).or_default().clone()
        };
        let guard = lock.lock().await;
        let result = f.await;
        drop(guard);
        let mut m = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(nar_hash).is_some_and(|l| Arc::ptr_eq(l, &lock)) && Arc::strong_count(&lock) == 2 {
            m.remove(nar_hash); // nobody else waits on it
        }
        result
    }
}
