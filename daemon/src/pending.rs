//! `PendingNarinfos`: narinfos found somewhere else (a peer, an upstream cache) that are being
//! served while their NAR is not stored yet; looked up by store-path hash (narinfo requests)
//! and by NarHash (the NAR request that follows). Bounded, least recently used first out: an
//! entry Nix just asked for is never dropped for a flood of others, and the map never empties
//! itself wholesale (a narinfo served must keep its NAR reachable).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::core::narinfo::NarInfo;
use crate::core::signing::Trust;
use crate::core::store_path::StorePathHash;
use crate::core::NarHash;

/// One pending narinfo; `S` says where it came from.
#[derive(Clone, Debug)]
pub struct Pending<S> {
    pub source: S,
    pub text: Arc<str>,
    pub info: Arc<NarInfo>,
    pub trust: Trust,
}

struct Entry<S> {
    pending: Pending<S>,
    tick: u64,
}

struct Maps<S> {
    by_path: HashMap<StorePathHash, Entry<S>>,
    by_nar: HashMap<NarHash, StorePathHash>,
    /// Recency order: tick → path.
    order: BTreeMap<u64, StorePathHash>,
    tick: u64,
}

impl<S> Maps<S> {
    fn bump(&mut self, hash: &StorePathHash) {
        self.tick += 1;
        let t = self.tick;
        if let Some(e) = self.by_path.get_mut(hash) {
            self.order.remove(&e.tick);
            e.tick = t;
            self.order.insert(t, hash.clone());
        }
    }

    fn remove_path(&mut self, hash: &StorePathHash) -> Option<Pending<S>> {
        let e = self.by_path.remove(hash)?;
        self.order.remove(&e.tick);
        if self.by_nar.get(&e.pending.info.nar_hash) == Some(hash) {
            self.by_nar.remove(&e.pending.info.nar_hash);
        }
        Some(e.pending)
    }
}

/// The bounded LRU map of pending narinfos; see the module docs.
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
                order: BTreeMap::new(),
                tick: 0,
            }),
            cap: cap.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps<S>> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pending narinfo of a store-path hash (counts as a use).
    pub fn get(&self, hash: &StorePathHash) -> Option<Pending<S>> {
        let mut m = self.lock();
        let p = m.by_path.get(hash).map(|e| e.pending.clone())?;
        m.bump(hash);
        Some(p)
    }

    /// Adds (or replaces) the pending narinfo of `hash`; the least recently used entry goes
    /// when the map is full.
    pub fn insert(&self, hash: StorePathHash, pending: Pending<S>) {
        let mut m = self.lock();
        m.remove_path(&hash);
        while m.by_path.len() >= self.cap {
            let Some((_, oldest)) = m.order.pop_first() else {
                break;
            };
            m.remove_path(&oldest);
        }
        m.tick += 1;
        let tick = m.tick;
        m.by_nar.insert(pending.info.nar_hash, hash.clone());
        m.order.insert(tick, hash.clone());
        m.by_path.insert(hash, Entry { pending, tick });
    }

    /// The pending narinfo whose NarHash is `nar_hash`, with its store-path hash (a use).
    pub fn by_nar(&self, nar_hash: &NarHash) -> Option<(StorePathHash, Pending<S>)> {
        let mut m = self.lock();
        let h = m.by_nar.get(nar_hash)?.clone();
        let p = m.by_path.get(&h).map(|e| e.pending.clone())?;
        m.bump(&h);
        Some((h, p))
    }

    /// Drops the pending narinfo of `path` (its NAR is stored now, or every source failed).
    pub fn remove(&self, path: &StorePathHash) {
        self.lock().remove_path(path);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_path.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(i: u8) -> (StorePathHash, Pending<u8>) {
        let hash = format!("{:0>32}", format!("{i:x}").replace('e', "f"));
        let hash = hash.replace('e', "f");
        let nar = NarHash::digest(&[i]);
        let text = format!(
            "StorePath: /nix/store/{hash}-p\nURL: nar/x.nar\nCompression: none\n\
             NarHash: {nar}\nNarSize: 1\nReferences: \n"
        );
        let info = NarInfo::parse(&text).unwrap();
        (
            StorePathHash::parse(&hash).unwrap(),
            Pending {
                source: i,
                text: Arc::from(text),
                info: Arc::new(info),
                trust: Trust::Untrusted,
            },
        )
    }

    #[test]
    fn least_recently_used_goes_first_never_all() {
        let map = PendingNarinfos::new(3);
        let entries: Vec<_> = (1..=5).map(pending).collect();
        for (h, p) in entries.iter().take(3) {
            map.insert(h.clone(), p.clone());
        }
        // Use the first: the second is now the oldest.
        assert!(map.get(&entries[0].0).is_some());
        map.insert(entries[3].0.clone(), entries[3].1.clone());
        assert_eq!(map.len(), 3);
        assert!(map.get(&entries[1].0).is_none(), "the LRU entry went");
        assert!(map.get(&entries[0].0).is_some());
        let nar = entries[2].1.info.nar_hash;
        assert_eq!(map.by_nar(&nar).map(|(_, p)| p.source), Some(3));
        map.insert(entries[4].0.clone(), entries[4].1.clone());
        assert_eq!(map.len(), 3, "full, but never cleared");
        map.remove(&entries[4].0);
        assert!(map.by_nar(&entries[4].1.info.nar_hash).is_none());
        assert_eq!(map.len(), 2);
    }
}
