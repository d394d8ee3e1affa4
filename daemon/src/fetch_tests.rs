//! `Peers` fetching over libp2p's memory transport with real stores: chunks from several
//! providers at once, a provider that sends bad blocks or a lying manifest (banned, the fetch
//! completes from the honest ones), manifests that cannot be ours, a NAR streamed into a
//! flight and stored as received, only the missing chunks of an upgrade fetched, and the
//! upload rate limit.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::PeerId;
use nix_p2p_cache_proto::v1 as pb;

use super::{PeerError, Peers};
use crate::core::manifest::Manifest;
use crate::core::nar::{write_nar, Node as NarNode};
use crate::core::signing::SecretKey;
use crate::core::store_path::StorePathHash;
use crate::core::NarHash;
use crate::metrics::Metrics;
use crate::net::responder::ResponseFuture;
use crate::net::tests::{memory_config, spawn_node, Node};
use crate::net::{NetConfig, Responder, StoreResponder};
use crate::resolve::{FetchError, Flight, Found, Lookup, Source};
use crate::store::testing::{ingest, noise};
use crate::store::Store;

const HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

/// A NAR of one directory with a few files of noise: `mib` MiB in all, many chunks.
fn big_nar(seed: u8, mib: usize) -> Vec<u8> {
    files_nar(HASH, (0..mib).map(|i| seed.wrapping_add(i as u8)))
}

/// A NAR of one directory with a 1 MiB file of noise per seed. Every file names the NAR's own
/// store path (`/nix/store/<self_hash>-sample`) and another one, so the chunks are normalised
/// (and their restored bytes longer than the chunks).
fn files_nar(self_hash: &str, seeds: impl Iterator<Item = u8>) -> Vec<u8> {
    let paths = [
        format!("/nix/store/{self_hash}-sample/lib "),
        "/nix/store/7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-other ".to_string(),
    ];
    let mut entries = BTreeMap::new();
    for (i, seed) in seeds.enumerate() {
        let mut contents = noise(seed, 1 << 20);
        for (k, at) in (0..contents.len() - 100).step_by(100_003).enumerate() {
            let p = paths[k % 2].as_bytes();
            contents[at..at + p.len()].copy_from_slice(p);
        }
        entries.insert(
            format!("f{i:03}"),
            NarNode::Regular {
                executable: false,
                contents,
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
    /// The manifest names chunking parameters we do not know.
    UnknownChunking,
    /// The first chunks merged into one entry over the chunking maximum (sum still right).
    OversizedChunk,
    /// The first chunk's size is one more than it is (sizes no longer sum to NarSize).
    WrongSum,
    /// Every block is a zstd frame that inflates to 256 MiB.
    Bomb,
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
                Lie::UnknownChunking | Lie::OversizedChunk | Lie::WrongSum => {
                    if let Some(bytes) = &r.manifest {
                        let mut m = Manifest::decode(bytes).unwrap();
                        match lie {
                            Lie::UnknownChunking => m.chunking = 99,
                            Lie::OversizedChunk => {
                                while m.chunks[0].size <= 512 * 1024 {
                                    let next = m.chunks.remove(1);
                                    m.chunks[0].size += next.size;
                                }
                            }
                            _ => m.chunks[0].size += 1,
                        }
                        r.manifest = Some(m.encode());
                    }
                }
                Lie::Bomb => {
                    static BOMB: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
                    let bomb = BOMB
                        .get_or_init(|| zstd::bulk::compress(&vec![0u8; 256 << 20], 1).unwrap());
                    for b in &mut r.blocks {
                        b.data = bomb.clone();
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

/// Everything a flight's client receives (`Err` if the body is aborted).
async fn collect(
    s: impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>>,
) -> Result<Vec<u8>, String> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    futures_util::pin_mut!(s);
    while let Some(item) = s.next().await {
        out.extend_from_slice(&item.map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// The NAR as the store reassembles it.
fn stored(store: &Store, nar_hash: &NarHash) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::copy(&mut store.nar_reader(nar_hash).unwrap(), &mut out).unwrap();
    out
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
    let peers = Peers::new(node.client.clone(), vec![key.public_key()], metrics.clone());
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

    /// The narinfo from the connected peers (within the short budget or late).
    async fn narinfo(&self) -> Found {
        let hash = StorePathHash::parse(HASH).unwrap();
        let mut l = self.peers.narinfo(&hash).await;
        if let Lookup::Late(f) = l {
            l = f.await;
        }
        let Lookup::Found(found) = l else {
            panic!("no narinfo from the peers");
        };
        assert!(found.text.contains("Sig: "));
        found
    }

    /// Fetches `found`'s NAR into a new flight; returns the outcome and the flight.
    async fn fetch_found(&self, found: &Found) -> (Result<(), FetchError>, Arc<Flight>) {
        let spool = self.node.store.dir().join("spool");
        let flight = Flight::new(&spool, found.info.nar_hash, found.info.nar_size).unwrap();
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            self.peers.fetch(&self.node.store, found, &flight),
        )
        .await
        .expect("fetch finished");
        (r, flight)
    }

    /// narinfo from the connected peers, then the NAR; checks what a client of the flight
    /// got; returns what the store then holds.
    async fn fetch(&self, nar: &[u8]) -> Vec<u8> {
        let found = self.narinfo().await;
        let nar_hash = NarHash::digest(nar);
        assert_eq!(found.info.nar_hash, nar_hash);
        let spool = self.node.store.dir().join("spool");
        let flight = Flight::new(&spool, nar_hash, nar.len() as u64).unwrap();
        let client = tokio::spawn(collect(flight.stream(0, u64::MAX)));
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            self.peers.fetch(&self.node.store, &found, &flight),
        )
        .await
        .expect("fetch finished");
        assert!(matches!(r, Ok(())), "{r:?}");
        flight.release(); // what the resolver does after the commit
        let streamed = client.await.unwrap().expect("the client got the whole NAR");
        assert!(streamed == nar, "the client got the NAR's bytes");
        let damaged = self.node.store.verify(|_| {}).unwrap();
        assert!(damaged.is_empty(), "the fetched NAR verifies: {damaged:?}");
        stored(&self.node.store, &nar_hash)
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
    // Only the liar is connected when the narinfo is asked for: its manifest is tried first,
    // the honest one's differs, so the flight is held until one of them checks.
    a.connect(&liar).await;
    let found = a.narinfo().await;
    a.connect(&honest).await;
    let nar_hash = NarHash::digest(&nar);
    let spool = a.node.store.dir().join("spool");
    let flight = Flight::new(&spool, nar_hash, nar.len() as u64).unwrap();
    let client = tokio::spawn(collect(flight.stream(0, u64::MAX)));
    let r = a.peers.fetch(&a.node.store, &found, &flight).await;
    assert!(matches!(r, Ok(())), "{r:?}");
    assert_eq!(
        client.await.unwrap().unwrap(),
        nar,
        "the client saw only the right NAR"
    );
    assert_eq!(stored(&a.node.store, &nar_hash), nar);
    assert_eq!(a.metrics.p2p_bad_manifests.load(Relaxed), 1);
    assert!(
        a.peer_bytes_down(&liar).await.1,
        "the manifest's sender is banned"
    );
}

/// A lone liar's manifest is streamed (nothing to compare it with): the client's body is cut
/// before its end, nothing is stored, the liar is banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_lying_manifest_aborts_the_stream_and_stores_nothing() {
    let key = SecretKey::generate("test-1", [11; 32]);
    let nar = big_nar(5, 2);
    let liar = provider(&nar, &key, Some(Lie::SwappedManifest), memory_config()).await;
    let a = fetcher(&key).await;
    a.connect(&liar).await;
    let found = a.narinfo().await;
    let spool = a.node.store.dir().join("spool");
    let flight = Flight::new(&spool, found.info.nar_hash, nar.len() as u64).unwrap();
    let client = tokio::spawn(collect(flight.stream(0, u64::MAX)));
    let r = a.peers.fetch(&a.node.store, &found, &flight).await;
    assert!(
        matches!(r, Err(FetchError::Peers(PeerError::BadManifest { .. }))),
        "{r:?}"
    );
    flight.fail("lying manifest");
    assert!(
        client.await.unwrap().is_err(),
        "the body is aborted, never complete"
    );
    assert!(!a.node.store.has_nar(&found.info.nar_hash).unwrap());
    assert_eq!(a.node.store.stats().unwrap().chunks, 0);
    assert!(a.peer_bytes_down(&liar).await.1, "banned");
}

/// Manifests that cannot be ours are refused before anything of their claimed sizes is
/// allocated: an unknown chunking id, a chunk over the maximum (sizes still summing to
/// NarSize), sizes that do not sum to NarSize.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_that_cannot_be_ours_are_refused() {
    for (seed, lie) in [
        (12u8, Lie::UnknownChunking),
        (13, Lie::OversizedChunk),
        (14, Lie::WrongSum),
    ] {
        let key = SecretKey::generate("test-1", [seed; 32]);
        let nar = big_nar(seed, 2);
        let liar = provider(&nar, &key, Some(lie), memory_config()).await;
        let a = fetcher(&key).await;
        a.connect(&liar).await;
        let found = a.narinfo().await;
        let (r, flight) = a.fetch_found(&found).await;
        assert!(
            matches!(r, Err(FetchError::Peers(PeerError::NoManifest { .. }))),
            "{r:?}"
        );
        assert_eq!(flight.written(), 0, "not a byte was fetched");
        assert_eq!(a.metrics.p2p_bad_manifests.load(Relaxed), 1);
        assert_eq!(a.metrics.p2p_blocks.load(Relaxed), 0);
        assert!(a.peer_bytes_down(&liar).await.1, "banned");
    }
}

/// A zstd bomb: a block that inflates far beyond its declared size is refused (decompressed
/// into a buffer of the declared size only), its sender banned, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zstd_bomb_block_is_refused() {
    let key = SecretKey::generate("test-1", [15; 32]);
    let nar = big_nar(15, 1);
    let liar = provider(&nar, &key, Some(Lie::Bomb), memory_config()).await;
    let a = fetcher(&key).await;
    a.connect(&liar).await;
    let found = a.narinfo().await;
    let (r, _) = a.fetch_found(&found).await;
    assert!(r.is_err(), "{r:?}");
    assert!(a.metrics.p2p_bad_blocks.load(Relaxed) >= 1);
    // Bounded memory: the blocks of one request would inflate to 2 GiB or more (≥ 8 of them);
    // the process (the 256 MiB the liar compressed its bomb from included, and under
    // `cargo test` every other test) stays below 1 GiB.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(hwm_kib < 1024 * 1024, "peak RSS {hwm_kib} KiB");
    assert!(a.peer_bytes_down(&liar).await.1, "banned");
    assert!(!a.node.store.has_nar(&found.info.nar_hash).unwrap());
}

/// An upgrade: a node holding one NAR fetches another that shares most of its chunks; only
/// the chunks it lacks travel, and the received frames are stored as they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_fetches_only_the_missing_chunks() {
    let key = SecretKey::generate("test-1", [16; 32]);
    // The old path and its rebuild (each names itself): the same files but one.
    let old_hash = "b".repeat(32);
    let old = files_nar(&old_hash, (0..6u8).map(|i| 16 + i));
    let new = files_nar(HASH, (0..6u8).map(|i| if i == 3 { 200 } else { 16 + i }));
    let b = provider(&new, &key, None, memory_config()).await;
    let a = fetcher(&key).await;
    ingest(
        &a.node.store,
        &old_hash,
        &old,
        Some(&key),
        &[key.public_key()],
    );
    a.connect(&b).await;
    assert_eq!(a.fetch(&new).await, new);
    let (down, _) = a.peer_bytes_down(&b).await;
    assert!(
        down < (new.len() as u64) / 3,
        "{down} bytes received for a {} byte NAR that shares 5/6 with what A had",
        new.len()
    );
    assert!(a.metrics.p2p_chunks_local.load(Relaxed) > 0);
    assert!(a.node.store.verify(|_| {}).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_liars_means_a_failed_fetch_and_nothing_stored() {
    let key = SecretKey::generate("test-1", [9; 32]);
    let nar = big_nar(3, 2);
    let d = provider(&nar, &key, Some(Lie::WrongBytes), memory_config()).await;
    let a = fetcher(&key).await;
    a.connect(&d).await;
    let found = a.narinfo().await;
    let nar_hash = NarHash::digest(&nar);
    let (r, _) = a.fetch_found(&found).await;
    assert!(r.is_err(), "{r:?}");
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

/// Path summaries: once A holds its peers' summaries, a narinfo is asked only of the peer that
/// may hold it, and a path no peer holds is a miss without a single request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narinfos_are_asked_only_of_peers_whose_summary_may_hold_them() {
    let key = SecretKey::generate("test-1", [17; 32]);
    let nar = big_nar(17, 1);
    let b = provider(&nar, &key, None, memory_config()).await;
    let c = fetcher(&key).await; // an empty store
    let a = fetcher(&key).await;
    a.connect(&b).await;
    a.connect(&c.node).await;
    a.peers.refresh_summaries().await;
    let asked = |n: &Node| n.client.stats().requests_in.load(Relaxed);
    let (b0, c0) = (asked(&b), asked(&c.node));
    let found = a.narinfo().await;
    assert_eq!(found.info.nar_hash, NarHash::digest(&nar));
    assert_eq!(
        asked(&c.node),
        c0,
        "C, whose summary lacks the path, was not asked"
    );
    assert_eq!(asked(&b), b0 + 1, "B was asked once");
    let missing = StorePathHash::parse("1123456789abcdfghijklmnpqrsvwxyz").unwrap();
    assert!(matches!(a.peers.narinfo(&missing).await, Lookup::Missing));
    assert_eq!(
        (asked(&b), asked(&c.node)),
        (b0 + 1, c0),
        "a path nobody holds asks nobody"
    );
    assert!(a.metrics.p2p_narinfo_asks_skipped.load(Relaxed) >= 3);
    // A summary that did not change is not sent again.
    let up = b.client.stats().bytes_up.load(Relaxed);
    a.peers.refresh_summaries().await;
    assert!(b.client.stats().bytes_up.load(Relaxed) - up < 1024);
}

/// A provider record of a peer that went away is followed once: the failed dial leaves that
/// peer out of the providers of every later NAR (for `UNREACHABLE_FOR`), unless it connects
/// again. Before, every NAR asked it again (231 failed requests in one closure, issue 15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_cannot_be_dialled_is_not_asked_again() {
    let key = SecretKey::generate("test-1", [5; 32]);
    let nar = big_nar(71, 1);
    let live = provider(&nar, &key, None, memory_config()).await;
    let gone = provider(&nar, &key, None, memory_config()).await;
    let f = fetcher(&key).await;
    f.connect(&live).await;
    f.connect(&gone).await;
    gone.client.dial(live.addr.clone()).await.unwrap();
    let gone_id = gone.client.local_peer_id();
    let nar_key = NarHash::digest(&nar).nar_key();
    // The record of `gone` is stored at the fetcher and at `live`.
    gone.client.start_providing(nar_key).await.unwrap();
    let found = f.narinfo().await;
    let started = Instant::now();
    while !f
        .peers
        .providers(None, found.info.nar_hash)
        .await
        .contains(&gone_id)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no record of the peer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It goes away (its listener with it); its record stays behind.
    drop(gone);
    let started = Instant::now();
    while f
        .node
        .client
        .connected_peers()
        .await
        .unwrap()
        .contains(&gone_id)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "still connected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(f
        .peers
        .providers(None, found.info.nar_hash)
        .await
        .contains(&gone_id));

    // The fetch asks it (first two providers at once), fails to dial it, and succeeds from
    // the live one.
    let found = Found {
        source: crate::resolve::Origin::Peer(gone_id),
        ..found
    };
    let (r, _flight) = f.fetch_found(&found).await;
    assert!(r.is_ok(), "{r:?}");
    assert!(f.peers.is_unreachable(&gone_id));
    let providers = f.peers.providers(Some(gone_id), found.info.nar_hash).await;
    assert!(
        !providers.contains(&gone_id),
        "an undialable peer is left out: {providers:?}"
    );
    assert!(providers.contains(&live.client.local_peer_id()));
}

/// A narinfo miss asks at most `MAX_NARINFO_ASKS` connected peers, whatever their number, and
/// the ones whose summary may hold the path before those with none (issue 13: the fan-out
/// grew with the network).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narinfo_miss_asks_a_bounded_number_of_peers() {
    use super::MAX_NARINFO_ASKS;
    let key = SecretKey::generate("test-1", [18; 32]);
    let nar = big_nar(18, 1);
    let holder = provider(&nar, &key, None, memory_config()).await;
    let a = fetcher(&key).await;
    let mut empty = Vec::new();
    for _ in 0..12 {
        let e = fetcher(&key).await;
        a.connect(&e.node).await;
        empty.push(e);
    }
    let asked = |n: &Node| n.client.stats().requests_in.load(Relaxed);
    let total = |empty: &[Fetcher]| empty.iter().map(|e| asked(&e.node)).sum::<u64>();
    // No summaries yet: a path nobody holds is asked of MAX_NARINFO_ASKS peers, not 12.
    let missing = StorePathHash::parse("1123456789abcdfghijklmnpqrsvwxyz").unwrap();
    let l = a.peers.narinfo(&missing).await;
    let l = match l {
        Lookup::Late(f) => f.await,
        l => l,
    };
    assert!(matches!(l, Lookup::Missing), "nobody holds it");
    let started = Instant::now();
    while total(&empty) < MAX_NARINFO_ASKS as u64 && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        total(&empty),
        MAX_NARINFO_ASKS as u64,
        "asks of 12 connected peers"
    );
    // With summaries, the holder (whose summary may hold it) is asked and the others, whose
    // summaries lack it, are not.
    a.connect(&holder).await;
    a.peers.refresh_summaries().await;
    let before = total(&empty);
    let found = a.narinfo().await;
    assert_eq!(found.info.nar_hash, NarHash::digest(&nar));
    assert_eq!(
        total(&empty),
        before,
        "peers whose summary lacks it were asked"
    );
}

/// A provider that answers "does not share it" to three manifest requests in a row (restarted
/// with `share` lan or none, its old provider records still out) is left out like an
/// unreachable one; an answer with a manifest in between resets the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_shares_nothing_it_is_asked_for_is_left_out() {
    let key = SecretKey::generate("test-1", [19; 32]);
    let f = fetcher(&key).await;
    let p = PeerId::random();
    f.peers.note_manifest_answer(p, true);
    f.peers.note_manifest_answer(p, true);
    f.peers.note_manifest_answer(p, false);
    f.peers.note_manifest_answer(p, true);
    f.peers.note_manifest_answer(p, true);
    assert!(
        !f.peers.is_unreachable(&p),
        "the count restarts after a manifest"
    );
    f.peers.note_manifest_answer(p, true);
    assert!(f.peers.is_unreachable(&p));
}
