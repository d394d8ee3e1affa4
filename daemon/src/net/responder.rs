//! Answers inbound exchange requests: the [`Responder`] trait the event loop calls, and
//! [`StoreResponder`], which answers from a [`Store`].
//!
//! What is shared (design §5): narinfos only with a trusted signature; manifests only of NARs
//! a trusted narinfo names. Chunks are served by id without a trust check (see
//! `docs/protocol.md`, "Verification"): a chunk id is only learnt from a manifest, and
//! manifests of private NARs are never sent. Every chunk is checked against its id before it
//! is sent. Store calls run on `spawn_blocking`; nothing here touches the swarm.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use nix_p2p_cache_proto::v1 as pb;
use nix_p2p_cache_proto::MAX_MESSAGE_SIZE;
use prost::Message;

use crate::core::chunker::ChunkingParams;
use crate::core::store_path::StorePathHash;
use crate::core::summary::PathFilter;
use crate::core::{ChunkId, NarHash};
use crate::store::{Store, StoreError, TrustClass};

/// A boxed, sendable future of a response.
pub type ResponseFuture = Pin<Box<dyn Future<Output = pb::Response> + Send + 'static>>;

/// Answers one inbound request. Must not fail: what it cannot answer it leaves out.
pub trait Responder: Send + Sync + 'static {
    fn respond(&self, peer: PeerId, request: pb::Request) -> ResponseFuture;
}

/// Bytes kept free under `MAX_MESSAGE_SIZE` for framing of the fields around the blocks.
const RESPONSE_MARGIN: usize = 64 * 1024;

/// A NAR that is stored but not (yet) known as shareable triggers a rescan of the narinfos at
/// most this often (so requests for private NARs cannot make us scan continuously).
const RESCAN_INTERVAL: Duration = Duration::from_secs(10);
/// The path summary is checked for changes (one counter read) at most this often…
const SUMMARY_CHECK: Duration = Duration::from_secs(2);
/// …and rebuilt (one scan of the narinfos) when the count changed, or this often anyway.
const SUMMARY_REBUILD: Duration = Duration::from_secs(60);

/// Answers from a store (see the module docs for what is shared).
#[derive(Clone)]
pub struct StoreResponder {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    /// NarHashes named by a trusted narinfo, and when they were last scanned.
    shareable: Mutex<(HashSet<NarHash>, Option<Instant>)>,
    /// The summary of the shared store paths sent to peers.
    summary: Mutex<Option<Summary>>,
}

/// The Bloom filter of the shared store paths, as last built.
struct Summary {
    /// BLAKE3 of the filter (first 8 bytes, never 0): changes with the set, stable across
    /// restarts.
    generation: u64,
    filter: PathFilter,
    paths: u64,
    /// Narinfos in the store when it was built.
    narinfos: u64,
    built: Instant,
    checked: Instant,
}

impl StoreResponder {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                shareable: Mutex::new((HashSet::new(), None)),
                summary: Mutex::new(None),
            }),
        }
    }
}

impl Responder for StoreResponder {
    fn respond(&self, peer: PeerId, request: pb::Request) -> ResponseFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let task = tokio::task::spawn_blocking(move || inner.answer(request));
            match task.await {
                Ok(Ok(response)) => response,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "answering a peer: store error");
                    pb::Response::default()
                }
                Err(e) => {
                    tracing::error!(%peer, error = %e, "answering a peer: task failed");
                    pb::Response::default()
                }
            }
        })
    }
}

fn presence(cid: Vec<u8>, t: pb::response::PresenceType) -> pb::response::BlockPresence {
    pb::response::BlockPresence {
        cid,
        r#type: t as i32,
    }
}

impl Inner {
    fn answer(&self, request: pb::Request) -> Result<pb::Response, StoreError> {
        use pb::request::Kind;
        match request.kind {
            Some(Kind::Wantlist(w)) => self.wantlist(w),
            Some(Kind::Manifest(m)) => self.manifest(&m.nar_key, &m.chunkings),
            Some(Kind::Narinfo(n)) => self.narinfo(&n.store_path_hash),
            Some(Kind::Summary(r)) => self.summary(r.have_generation),
            None => Ok(pb::Response::default()),
        }
    }

    fn wantlist(&self, w: pb::Wantlist) -> Result<pb::Response, StoreError> {
        use pb::response::PresenceType::{DontHave, Have};
        use pb::wantlist::WantType;
        let mut entries = w.entries;
        entries.retain(|e| !e.cancel);
        entries.sort_by_key(|e| std::cmp::Reverse(e.priority));
        let mut response = pb::Response::default();
        let mut budget = MAX_MESSAGE_SIZE - RESPONSE_MARGIN;
        for e in entries {
            let Ok(id) = ChunkId::from_cid_bytes(&e.cid) else {
                if e.send_dont_have {
                    response.block_presences.push(presence(e.cid, DontHave));
                }
                continue;
            };
            let want_block = e.want_type == WantType::Block as i32;
            let found = if want_block {
                match self.store.chunk_frame(&id) {
                    Ok(f) => f.map(Some),
                    Err(err) => {
                        // A damaged record is never sent; the peer asks someone else.
                        tracing::warn!(chunk = %id, error = %err, "not serving a damaged chunk");
                        None
                    }
                }
            } else {
                self.store.has_chunk(&id)?.then_some(None)
            };
            match found {
                Some(Some(data)) => {
                    let block = pb::response::Block { cid: e.cid, data };
                    let len = block.encoded_len() + 8;
                    if len <= budget {
                        budget -= len;
                        response.blocks.push(block);
                    } else {
                        // Does not fit this response: say we have it, the peer asks again.
                        response.block_presences.push(presence(block.cid, Have));
                    }
                }
                Some(None) => response.block_presences.push(presence(e.cid, Have)),
                None if e.send_dont_have => {
                    response.block_presences.push(presence(e.cid, DontHave))
                }
                None => {}
            }
        }
        Ok(response)
    }

    fn is_shareable(&self, nar_hash: &NarHash) -> Result<bool, StoreError> {
        let mut guard = self.shareable.lock().unwrap_or_else(|e| e.into_inner());
        let (set, scanned) = &mut *guard;
        if set.contains(nar_hash) {
            return Ok(true);
        }
        let stale = match scanned {
            Some(t) => t.elapsed() >= RESCAN_INTERVAL,
            None => true,
        };
        if stale && self.store.has_nar(nar_hash)? {
            *set = self.store.shareable_nars()?;
            *scanned = Some(Instant::now());
            return Ok(set.contains(nar_hash));
        }
        Ok(false)
    }

    /// The manifest of a shared NAR, if its chunking is one the asker reads (`chunkings`;
    /// empty: only chunking 1).
    fn manifest(&self, nar_key: &[u8], chunkings: &[u32]) -> Result<pb::Response, StoreError> {
        let nar_hash = match nar_key {
            [0x12, 0x20, digest @ ..] => NarHash::from_slice(digest),
            _ => None,
        };
        let mut response = pb::Response::default();
        let Some(nar_hash) = nar_hash else {
            return Ok(response);
        };
        if !self.is_shareable(&nar_hash)? {
            return Ok(response);
        }
        if let Some(bytes) = self.store.manifest_bytes(&nar_hash)? {
            let chunking = pb::NarManifest::decode(&bytes[..]).map_or(0, |m| m.chunking);
            let readable = if chunkings.is_empty() {
                chunking == ChunkingParams::V1.id
            } else {
                chunkings.contains(&chunking)
            };
            if !readable {
                tracing::debug!(nar = %nar_hash, chunking, ?chunkings, "manifest of a chunking the asker does not read");
            } else if bytes.len() <= MAX_MESSAGE_SIZE - RESPONSE_MARGIN {
                response.manifest = Some(bytes);
            } else {
                tracing::warn!(nar = %nar_hash, len = bytes.len(), "manifest too large to send");
            }
        }
        Ok(response)
    }

    /// The path summary, rebuilt when the store's narinfos changed (see the constants).
    fn summary(&self, have_generation: u64) -> Result<pb::Response, StoreError> {
        let mut guard = self.summary.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let recent = guard
            .as_ref()
            .is_some_and(|s| now.duration_since(s.checked) < SUMMARY_CHECK);
        // One counter read tells whether the narinfos changed (not at all when just checked).
        let narinfos = if recent {
            None
        } else {
            Some(self.store.narinfo_count()?)
        };
        let rebuild = match (&*guard, narinfos) {
            (Some(s), Some(n)) => n != s.narinfos || now.duration_since(s.built) >= SUMMARY_REBUILD,
            (None, _) => true,
            (Some(_), None) => false,
        };
        if let (true, Some(narinfos)) = (rebuild, narinfos) {
            let paths = self.store.shareable_paths()?;
            let mut filter = PathFilter::with_capacity(paths.len());
            for p in &paths {
                if let Ok(h) = StorePathHash::parse(p) {
                    filter.insert(&h);
                }
            }
            *guard = Some(Summary {
                generation: filter.generation(),
                filter,
                paths: paths.len() as u64,
                narinfos,
                built: now,
                checked: now,
            });
        } else if let (Some(s), Some(_)) = (guard.as_mut(), narinfos) {
            // Only a real check moves the clock: peers asking more often than SUMMARY_CHECK
            // must not keep a changed store from ever being looked at again.
            s.checked = now;
        }
        let s = guard.as_ref().expect("built above");
        let bits = if have_generation == s.generation {
            Vec::new()
        } else {
            s.filter.bits().to_vec()
        };
        Ok(pb::Response {
            summary: Some(pb::PathSummary {
                generation: s.generation,
                hashes: s.filter.hashes(),
                bits,
                paths: s.paths,
            }),
            ..Default::default()
        })
    }

    fn narinfo(&self, hash: &str) -> Result<pb::Response, StoreError> {
        let mut response = pb::Response::default();
        if hash.len() != 32 || !hash.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Ok(response);
        }
        if let Some(info) = self.store.narinfo(hash)? {
            if matches!(info.trust, TrustClass::Trusted(_)) {
                response.narinfo = Some(info.text);
            }
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::signing::SecretKey;
    use crate::store::testing::{ingest, sample_nar};

    fn summary(r: &Inner, have: u64) -> pb::PathSummary {
        r.summary(have).unwrap().summary.expect("a summary")
    }

    /// A store that gains a path is seen in the summary within about SUMMARY_CHECK even
    /// while peers ask more often than that (each ask used to push the next check back).
    #[test]
    fn the_summary_follows_the_store_however_often_peers_ask() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let key = SecretKey::generate("test-1", [3; 32]);
        let trusted = [key.public_key()];
        ingest(
            &store,
            &"a".repeat(32),
            &sample_nar(1),
            Some(&key),
            &trusted,
        );
        let r = StoreResponder::new(store.clone());
        let first = summary(&r.inner, 0);
        assert_eq!(first.paths, 1);
        let unchanged = summary(&r.inner, first.generation);
        assert!(
            unchanged.bits.is_empty(),
            "an unchanged summary is not sent again"
        );
        ingest(
            &store,
            &"b".repeat(32),
            &sample_nar(2),
            Some(&key),
            &trusted,
        );
        // Ask every 200 ms; give up after a generous 20 s (the check comes after ~2 s).
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut s = summary(&r.inner, first.generation);
        while s.generation == first.generation && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            s = summary(&r.inner, first.generation);
        }
        assert_ne!(s.generation, first.generation, "the new path never showed");
        assert_eq!(s.paths, 2);
        let f = PathFilter::from_parts(s.bits, s.hashes).unwrap();
        assert!(f.may_contain(&StorePathHash::parse(&"b".repeat(32)).unwrap()));
    }
}
