//! `Peers` fetching over libp2p's memory transport with real stores: chunks from several
//! providers at once, a provider that sends bad blocks or a lying manifest (banned, the fetch
//! completes from the honest ones), and the upload rate limit.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::PeerId;
use nix_p2p_cache_proto::v1 as pb;

use super::{PeerFetch, Peers};
use crate::core::manifest::Manifest;
use crate::core::nar::{write_nar, Node as NarNode};
use crate::core::signing::SecretKey;
use crate::core::store_path::StorePathHash;
use crate::core::NarHash;
use crate::metrics::Metrics;
use crate::net::responder::ResponseFuture;
use crate::net::tests::{memory_config, spawn_node, Node};
use crate::net::{NetConfig, Responder, StoreResponder};
use crate::store::testing::{ingest, noise};
use crate::store::Store;

const HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

/// A NAR of one directory with a few files of noise: `mib` MiB in all, many chunks.
fn big_nar(seed: u8, mib: usize) -> Vec<u8> {
    let mut entries = BTreeMap::new();
    for i in 0..mib {
        entries.insert(
            format!("f{i:03}"),
            NarNode::Regular {
                executable: false,
                contents: noise(seed.wrapping_add(i as u8), 1 << 20),
            },
        );
    }
    let mut nar = Vec::new();
    write_nar(&mut nar, &NarNode::Directory(entries)).unwrap();
    nar
}

/// How a test provider lies.
#[derive(Clone, Copy)]
enum Lie {
    /// Every block's bytes are replaced by other (well-formed) zstd bytes.
    WrongBytes,
    /// The manifest has two chunks swapped: every block checks, the NAR does not.
    SwappedManifest,
}

struct Liar {
    honest: StoreResponder,
    lie: Lie,
}

impl Responder for Liar {
    fn respond(&self, peer: PeerId, request: pb::Request) -> ResponseFuture {
        let honest = self.honest.respond(peer, request);
        let lie = self.lie;
        Box::pin(async move {
            let mut r = honest.await;
            match lie {
                Lie::WrongBytes => {
                    for b in &mut r.blocks {
                        let n = zstd::bulk::decompress(&b.data, 1 << 20).unwrap().len();
                        b.data = zstd::bulk::compress(&noise(99, n), 1).unwrap();
                    }
                }
                Lie::SwappedManifest => {
                    if let Some(bytes) = &r.manifest {
                        let mut m = Manifest::decode(bytes).unwrap();
                        let last = m.chunks.len() - 1;
                        m.chunks.swap(0, last);
                        r.manifest = Some(m.encode());
                    }
                }
            }
            r
        })
    }
}

async fn provider(nar: &[u8], key: &SecretKey, lie: Option<Lie>, config: NetConfig) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    ingest(&store, HASH, nar, Some(key), &[key.public_key()]);
    let honest = StoreResponder::new(store.clone());
    let responder: Arc<dyn Responder> = match lie {
        Some(lie) => Arc::new(Liar { honest, lie }),
        None => Arc::new(honest),
    };
    let node = spawn_node(dir, store, Keypair::generate_ed25519(), &config, responder).await;
    node.client
        .start_providing(NarHash::digest(nar).nar_key())
        .await
        .ok();
    node
}

struct Fetcher {
    node: Node,
    peers: Peers,
    metrics: Arc<Metrics>,
}

async fn fetcher(key: &SecretKey) -> Fetcher {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let responder = Arc::new(StoreResponder::new(store.clone()));
    let node = spawn_node(
        dir,
        store,
        Keypair::generate_ed25519(),
        &memory_config(),
        responder,
    )
    .await;
    let metrics = Arc::new(Metrics::default());
    let peers = Peers::new(
        node.client.clone(),
        vec![key.public_key()],
        metrics.clone(),
        Box::new(|_| {}),
    );
    Fetcher {
        node,
        peers,
        metrics,
    }
}

impl Fetcher {
    async fn connect(&self, to: &Node) {
        self.node.client.dial(to.addr.clone()).await.unwrap();
    }

    /// narinfo from the connected peers, then the NAR; returns what the store then holds.
    async fn fetch(&self, nar: &[u8]) -> Vec<u8> {
        let hash = StorePathHash::parse(HASH).unwrap();
        let text = self
            .peers
            .narinfo(&hash)
            .await
            .expect("every peer answered")
            .expect("narinfo from a peer");
        assert!(text.contains("Sig: "));
        let nar_hash = NarHash::digest(nar);
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            self.peers.fetch_nar(&self.node.store, &nar_hash),
        )
        .await
        .expect("fetch finished");
        assert!(matches!(r, PeerFetch::Stored), "{r:?}");
        let mut out = Vec::new();
        std::io::copy(
            &mut self.node.store.nar_reader(&nar_hash).unwrap(),
            &mut out,
        )
        .unwrap();
        out
    }

    async fn peer_bytes_down(&self, peer: &Node) -> (u64, bool) {
        let id = peer.client.local_peer_id().to_string();
        let infos = self.node.client.peer_infos().await.unwrap();
        let p = infos.iter().find(|p| p.peer_id == id).expect("known peer");
        (p.bytes_down, p.banned_secs.is_some())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_come_from_several_providers_and_a_bad_block_bans_its_sender() {
    let key = SecretKey::generate("test-1", [7; 32]);
    let nar = big_nar(1, 8);
    let b = provider(&nar, &key, None, memory_config()).await;
    let c = provider(&nar, &key, None, memory_config()).await;
    let d = provider(&nar, &key, Some(Lie::WrongBytes), memory_config()).await;
    let a = fetcher(&key).await;
    for p in [&b, &c, &d] {
        a.connect(p).await;
    }
    assert_eq!(a.fetch(&nar).await, nar, "the stored NAR is the original");
    let (b_down, b_banned) = a.peer_bytes_down(&b).await;
    let (c_down, c_banned) = a.peer_bytes_down(&c).await;
    let (_, d_banned) = a.peer_bytes_down(&d).await;
    assert!(
        b_down > 0 && c_down > 0,
        "both honest providers sent chunks: {b_down} {c_down}"
    );
    assert!(!b_banned && !c_banned);
    // The liar is banned as soon as one of its answers is read; an answer that arrives after
    // the honest providers finished (the endgame took its requests) is never read.
    let bad = a.metrics.p2p_bad_blocks.load(Relaxed);
    assert_eq!(
        d_banned,
        bad >= 1,
        "banned iff a bad block was seen ({bad})"
    );
    assert_eq!(
        a.node.client.stats().peers_banned.load(Relaxed),
        u64::from(d_banned)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_manifest_is_replaced_by_an_honest_one() {
    let key = SecretKey::generate("test-1", [8; 32]);
    let nar = big_nar(2, 3);
    let liar = provider(&nar, &key, Some(Lie::SwappedManifest), memory_config()).await;
    let honest = provider(&nar, &key, None, memory_config()).await;
    honest.client.dial(liar.addr.clone()).await.unwrap();
    let a = fetcher(&key).await;
    // Only the liar is connected when the narinfo is asked for: its manifest is tried first.
    a.connect(&liar).await;
    let hash = StorePathHash::parse(HASH).unwrap();
    assert!(a.peers.narinfo(&hash).await.unwrap().is_some());
    a.connect(&honest).await;
    let nar_hash = NarHash::digest(&nar);
    let r = a.peers.fetch_nar(&a.node.store, &nar_hash).await;
    assert!(matches!(r, PeerFetch::Stored), "{r:?}");
    let mut out = Vec::new();
    std::io::copy(&mut a.node.store.nar_reader(&nar_hash).unwrap(), &mut out).unwrap();
    assert_eq!(out, nar);
    assert_eq!(a.metrics.p2p_bad_manifests.load(Relaxed), 1);
    assert!(
        a.peer_bytes_down(&liar).await.1,
        "the manifest's sender is banned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_liars_means_a_failed_fetch_and_nothing_stored() {
    let key = SecretKey::generate("test-1", [9; 32]);
    let nar = big_nar(3, 2);
    let d = provider(&nar, &key, Some(Lie::WrongBytes), memory_config()).await;
    let a = fetcher(&key).await;
    a.connect(&d).await;
    let hash = StorePathHash::parse(HASH).unwrap();
    assert!(a.peers.narinfo(&hash).await.unwrap().is_some());
    let nar_hash = NarHash::digest(&nar);
    let r = a.peers.fetch_nar(&a.node.store, &nar_hash).await;
    assert!(matches!(r, PeerFetch::Failed { .. }), "{r:?}");
    // The liar is banned: disconnected and refused.
    assert!(a.peer_bytes_down(&d).await.1, "the liar is banned");
    assert!(a.metrics.p2p_bad_blocks.load(Relaxed) >= 1);
    let connected = a.node.client.connected_peers().await.unwrap();
    assert!(!connected.contains(&d.client.local_peer_id()));
    assert!(a.node.client.dial(d.addr.clone()).await.is_err());
    assert!(!a.node.store.has_nar(&nar_hash).unwrap());
    assert_eq!(
        a.node.store.stats().unwrap().chunks,
        0,
        "no chunk of the liar kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_rate_limit_holds() {
    let key = SecretKey::generate("test-1", [10; 32]);
    let nar = big_nar(4, 6);
    let rate = 2_000_000u64;
    let config = NetConfig {
        upload_rate_limit: Some(rate),
        ..memory_config()
    };
    let b = provider(&nar, &key, None, config).await;
    let a = fetcher(&key).await;
    a.connect(&b).await;
    let t0 = Instant::now();
    assert_eq!(a.fetch(&nar).await, nar);
    let took = t0.elapsed();
    // ~6.3 MB at 2 MB/s with a 250 ms burst: at least 2.8 s, whatever the machine's speed.
    let min = Duration::from_secs_f64(nar.len() as f64 / rate as f64) - Duration::from_millis(400);
    assert!(took >= min, "{took:?} < {min:?}: the limit was not applied");
}
