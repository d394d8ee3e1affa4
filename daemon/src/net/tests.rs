//! Nodes over libp2p's memory transport: DHT provider lookup, manifest and block exchange with
//! every block checked, trust rules, and limits; the persistent DHT record store (many keys,
//! restarts, remote limits, answering while the index is busy) and the announcer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::stream::{self as fstream, StreamExt as _};
use libp2p::identity::Keypair;
use tempfile::TempDir;

use super::record_store::{chunk_record_key, nar_record_key};
use super::*;
use crate::announce::Announcer;
use crate::config::Announce;
use crate::core::manifest::Manifest;
use crate::core::signing::SecretKey;
use crate::core::{ChunkId, NarHash};
use crate::store::dht::{DhtLimits, RemoteProvider, NEVER};
use crate::store::testing::{ingest, sample_nar};
use crate::store::Store;
use nix_p2p_cache_proto::MAX_WANTS_PER_REQUEST;

pub(crate) struct Node {
    pub(crate) client: Client,
    pub(crate) addr: Multiaddr,
    pub(crate) store: Arc<Store>,
    _dir: TempDir,
}

async fn node() -> Node {
    node_in(tempfile::tempdir().unwrap(), Keypair::generate_ed25519()).await
}

/// The test nodes' options: memory transport, no mDNS, sharing with everyone.
pub(crate) fn memory_config() -> NetConfig {
    NetConfig {
        transport: Transport::Memory,
        behaviour: BehaviourConfig {
            mdns: false,
            timers: Default::default(),
        },
        share: crate::config::Share::All,
        upload_rate_limit: None,
    }
}

/// A node whose store (DHT records included) lives in `dir`.
async fn node_in(dir: TempDir, key: Keypair) -> Node {
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let responder = Arc::new(StoreResponder::new(store.clone()));
    spawn_node(dir, store, key, &memory_config(), responder).await
}

/// A listening node over the memory transport with its own options and responder.
pub(crate) async fn spawn_node(
    dir: TempDir,
    store: Arc<Store>,
    key: Keypair,
    config: &NetConfig,
    responder: Arc<dyn Responder>,
) -> Node {
    let (client, event_loop) =
        new_with_store(key, config, responder, Some(store.dht().unwrap().clone())).unwrap();
    tokio::spawn(event_loop.run());
    let addr = client.listen("/memory/0".parse().unwrap()).await.unwrap();
    let addr = addr.with(Protocol::P2p(client.local_peer_id()));
    Node {
        client,
        addr,
        store,
        _dir: dir,
    }
}

fn wantlist(entries: Vec<pb::wantlist::Entry>) -> pb::Request {
    pb::Request {
        kind: Some(pb::request::Kind::Wantlist(pb::Wantlist {
            entries,
            full: false,
        })),
    }
}

fn want(id: &ChunkId, t: pb::wantlist::WantType) -> pb::wantlist::Entry {
    pb::wantlist::Entry {
        cid: id.to_cid_bytes().to_vec(),
        priority: 1,
        cancel: false,
        want_type: t as i32,
        send_dont_have: true,
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Fetches a NAR from `peer` the way `fetch` will: manifest, then blocks, each checked.
async fn fetch_nar(client: &Client, peer: PeerId, nar_hash: &NarHash) -> Vec<u8> {
    let key = nar_hash.nar_key();
    let ask = |chunkings: Vec<u32>| {
        client.request(
            peer,
            pb::Request {
                kind: Some(pb::request::Kind::Manifest(pb::ManifestRequest {
                    nar_key: key.multihash_bytes(),
                    chunkings,
                })),
            },
        )
    };
    // A node from before chunking 2 asks without `chunkings`: it is not sent a manifest it
    // could not read (and would ban the sender for).
    let res = ask(Vec::new()).await.unwrap();
    assert_eq!(
        res.manifest, None,
        "a chunking 2 manifest for a v1-only asker"
    );
    let res = ask(vec![1, 2]).await.unwrap();
    let manifest = Manifest::decode(&res.manifest.expect("manifest served")).unwrap();
    assert_eq!(manifest.nar_hash, *nar_hash);

    let mut chunks: HashMap<ChunkId, Vec<u8>> = HashMap::new();
    let mut missing: Vec<ChunkId> = manifest.chunks.iter().map(|c| c.id).collect();
    missing.sort();
    missing.dedup();
    let sizes: HashMap<ChunkId, u32> = manifest.chunks.iter().map(|c| (c.id, c.size)).collect();
    let mut rounds = 0;
    while !missing.is_empty() {
        rounds += 1;
        assert!(rounds < 100, "peer stopped sending blocks");
        let batch: Vec<_> = missing
            .iter()
            .take(MAX_WANTS_PER_REQUEST)
            .copied()
            .collect();
        let entries = batch
            .iter()
            .map(|id| want(id, pb::wantlist::WantType::Block))
            .collect();
        let res = client.request(peer, wantlist(entries)).await.unwrap();
        for block in res.blocks {
            let id = ChunkId::from_cid_bytes(&block.cid).unwrap();
            let size = *sizes.get(&id).expect("block was asked for");
            let data = zstd::bulk::decompress(&block.data, size as usize).unwrap();
            assert_eq!(ChunkId::of(&data), id, "block checked against its CID");
            chunks.insert(id, data);
        }
        missing.retain(|id| !chunks.contains_key(id));
    }

    let mut nar = Vec::with_capacity(manifest.nar_size as usize);
    for (offset, c) in manifest.chunk_offsets() {
        nar.extend(manifest.restore(offset, chunks[&c.id].clone()));
    }
    assert_eq!(
        NarHash::digest(&nar),
        *nar_hash,
        "reassembled NAR hashes to NarHash"
    );
    nar
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_find_and_fetch_a_nar() {
    let a = node().await;
    let b = node().await;
    let c = node().await;
    let key = SecretKey::generate("test-1", [5; 32]);
    let trusted = [key.public_key()];
    let nar = sample_nar(10);
    let private_nar = sample_nar(11);
    let (public, private) = {
        let store = a.store.clone();
        let (nar, private_nar) = (nar.clone(), private_nar.clone());
        tokio::task::spawn_blocking(move || {
            (
                ingest(&store, &"a".repeat(32), &nar, Some(&key), &trusted),
                ingest(&store, &"b".repeat(32), &private_nar, None, &trusted),
            )
        })
        .await
        .unwrap()
    };
    let a_id = a.client.local_peer_id();

    assert_eq!(
        within("B dials A", b.client.dial(a.addr.clone()))
            .await
            .unwrap(),
        a_id
    );
    assert_eq!(
        within("C dials A", c.client.dial(a.addr.clone()))
            .await
            .unwrap(),
        a_id
    );
    within("B bootstraps", b.client.bootstrap()).await.unwrap();
    within("C bootstraps", c.client.bootstrap()).await.unwrap();
    let mut peers = a.client.connected_peers().await.unwrap();
    peers.sort();
    let mut expected = vec![b.client.local_peer_id(), c.client.local_peer_id()];
    expected.sort();
    assert_eq!(peers, expected);

    // DHT: A announces the NAR key, C finds A as its provider.
    let nar_key = public.nar_hash.nar_key();
    within("A provides", a.client.start_providing(nar_key))
        .await
        .unwrap();
    let started = Instant::now();
    let providers = loop {
        let p = within("C looks up providers", c.client.get_providers(nar_key))
            .await
            .unwrap();
        if p.contains(&a_id) || started.elapsed() > Duration::from_secs(20) {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(providers.contains(&a_id), "providers: {providers:?}");
    // Nobody provides the private NAR.
    let none = within(
        "C looks up",
        c.client.get_providers(private.nar_hash.nar_key()),
    )
    .await
    .unwrap_or_default();
    assert!(!none.contains(&a_id));

    // Exchange: manifest, then every block, checked and reassembled.
    let fetched = within("C fetches", fetch_nar(&c.client, a_id, &public.nar_hash)).await;
    assert_eq!(fetched, nar);

    // Presences: HAVE for a stored chunk, DONT_HAVE for an unknown one.
    let m = a.store.manifest(&public.nar_hash).unwrap().unwrap();
    let have = m.chunks[0].id;
    let unknown = ChunkId([0x42; 32]);
    let res = within(
        "C asks HAVE",
        c.client.request(
            a_id,
            wantlist(vec![
                want(&have, pb::wantlist::WantType::Have),
                want(&unknown, pb::wantlist::WantType::Block),
            ]),
        ),
    )
    .await
    .unwrap();
    assert!(res.blocks.is_empty());
    let presences: Vec<(Vec<u8>, i32)> = res
        .block_presences
        .into_iter()
        .map(|p| (p.cid, p.r#type))
        .collect();
    assert_eq!(
        presences,
        vec![
            (
                have.to_cid_bytes().to_vec(),
                pb::response::PresenceType::Have as i32
            ),
            (
                unknown.to_cid_bytes().to_vec(),
                pb::response::PresenceType::DontHave as i32
            ),
        ]
    );

    // Trust: the trusted narinfo is served verbatim; the untrusted one and its manifest are not.
    let narinfo = |hash: String| pb::Request {
        kind: Some(pb::request::Kind::Narinfo(pb::NarInfoRequest {
            store_path_hash: hash,
        })),
    };
    let res = b
        .client
        .request(a_id, narinfo("a".repeat(32)))
        .await
        .unwrap();
    let stored = a.store.narinfo(&"a".repeat(32)).unwrap().unwrap();
    assert_eq!(res.narinfo.as_deref(), Some(stored.text.as_str()));
    let res = b
        .client
        .request(a_id, narinfo("b".repeat(32)))
        .await
        .unwrap();
    assert_eq!(
        res,
        pb::Response::default(),
        "untrusted narinfo is not shared"
    );
    let res = b
        .client
        .request(a_id, narinfo("../../etc".into()))
        .await
        .unwrap();
    assert_eq!(res, pb::Response::default());
    let res = b
        .client
        .request(
            a_id,
            pb::Request {
                kind: Some(pb::request::Kind::Manifest(pb::ManifestRequest {
                    nar_key: private.nar_hash.nar_key().multihash_bytes(),
                    chunkings: vec![1, 2],
                })),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        res.manifest, None,
        "manifest of an untrusted NAR is not shared"
    );

    // Limits: a want list over the limit is refused by A's codec; B sees a clean error and A
    // keeps serving.
    let too_many = (0..=MAX_WANTS_PER_REQUEST as u8)
        .map(|i| want(&ChunkId([i; 32]), pb::wantlist::WantType::Have))
        .collect();
    let err = within("B over limit", b.client.request(a_id, wantlist(too_many)))
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::Request { .. }), "{err}");
    let fetched = within("B fetches", fetch_nar(&b.client, a_id, &public.nar_hash)).await;
    assert_eq!(fetched, nar);
}

#[tokio::test]
async fn dial_needs_a_peer_id() {
    let a = node().await;
    let err = a
        .client
        .dial("/memory/1234".parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::NoPeerId(_)), "{err}");
}

// ---- DHT: persistent record store and announcer ----

fn dht_key(i: u32) -> RecordKey {
    let mut k = vec![0x12, 0x20];
    k.extend_from_slice(&[7; 28]);
    k.extend_from_slice(&i.to_be_bytes());
    RecordKey::new(&k)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A node without a store (kad's `MemoryStore`) that only dials out: a DHT client that knows
/// nobody but the peers it dials.
async fn memory_node() -> Client {
    let config = memory_config();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let responder = Arc::new(StoreResponder::new(store));
    let (client, event_loop) = new(Keypair::generate_ed25519(), &config, responder).unwrap();
    tokio::spawn(event_loop.run());
    client
}

/// Asks `client` for the providers of `key` until `peer` is among them (or 20 s pass).
async fn find_provider(client: &Client, key: RecordKey, peer: PeerId) -> HashSet<PeerId> {
    let started = Instant::now();
    loop {
        let p = within("get providers", client.get_providers_key(key.clone()))
            .await
            .unwrap_or_default();
        if p.contains(&peer) || started.elapsed() > Duration::from_secs(20) {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many unexpired remote provider records of `dht_key(i)` `store` holds.
fn live_providers(store: &Store, i: u32) -> usize {
    store
        .dht()
        .unwrap()
        .dht_providers(dht_key(i).as_ref(), unix_now())
        .unwrap()
        .len()
}

/// Waits (up to 120 s: the machine may be loaded) until `cond` holds; kad's ADD_PROVIDER is one-way, so the receiver
/// stores a record some time after the sender's query is done.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "never: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops a node's event loop and waits until nothing else holds its store, so the database is
/// closed when the returned directory is reopened.
async fn shut_down(node: Node) -> TempDir {
    let Node {
        client,
        store,
        _dir: dir,
        ..
    } = node;
    drop(client);
    let started = Instant::now();
    // The event loop's record store holds the DHT database; the `Store` holds it once.
    while Arc::strong_count(&store) > 1 || Arc::strong_count(store.dht().unwrap()) > 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "store still held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(store);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_provides_5000_keys_and_another_node_finds_them() {
    const KEYS: u32 = 5000;
    let a = node().await;
    let b = node().await;
    let a_id = a.client.local_peer_id();
    within("B dials A", b.client.dial(a.addr.clone()))
        .await
        .unwrap();
    within("B bootstraps", b.client.bootstrap()).await.unwrap();

    let started = Instant::now();
    let failures = fstream::iter(0..KEYS)
        .map(|i| a.client.start_providing_key(dht_key(i)))
        // As many at once as the announcer runs: each is a FIND_NODE and an ADD_PROVIDER
        // stream to B, and kad drops inbound streams past 32 per connection when B is busy.
        .buffer_unordered(crate::announce::CONCURRENCY)
        .filter(|r| std::future::ready(r.is_err()))
        .count()
        .await;
    let took = started.elapsed();
    eprintln!("providing {KEYS} keys took {took:?}");
    assert_eq!(failures, 0);
    assert_eq!(
        a.store.dht().unwrap().dht_counts().unwrap().provided,
        u64::from(KEYS)
    );

    // B was sent every ADD_PROVIDER (it is A's only peer) and kept it in its store.
    eventually("B stores every record", || {
        b.store
            .dht()
            .unwrap()
            .dht_counts()
            .unwrap()
            .remote_providers
            == u64::from(KEYS)
    })
    .await;
    let last = dht_key(KEYS - 1);
    let at_b = b
        .store
        .dht()
        .unwrap()
        .dht_providers(last.as_ref(), unix_now())
        .unwrap();
    assert_eq!(at_b.len(), 1);
    assert_eq!(at_b[0].peer, a_id.to_bytes());
    let providers = find_provider(&b.client, last, a_id).await;
    assert!(providers.contains(&a_id), "providers: {providers:?}");
    let none = within("B asks", b.client.get_providers_key(dht_key(KEYS)))
        .await
        .unwrap_or_default();
    assert!(!none.contains(&a_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_memory_store_refuses_the_1025th_key() {
    // What the persistent store replaces: a node without a store is capped by kad.
    let a = memory_node().await;
    for i in 0..1024 {
        within("provide", a.start_providing_key(dht_key(i)))
            .await
            .unwrap();
    }
    let err = within("provide", a.start_providing_key(dht_key(1024)))
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::Kad(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_provider_records_survive_a_restart() {
    let a_key = Keypair::generate_ed25519();
    let a = node_in(tempfile::tempdir().unwrap(), a_key.clone()).await;
    let b = node().await;
    let a_id = a.client.local_peer_id();
    let b_id = b.client.local_peer_id();
    within("B dials A", b.client.dial(a.addr.clone()))
        .await
        .unwrap();
    within("B bootstraps", b.client.bootstrap()).await.unwrap();
    // A provides key 1 itself; B provides key 2, so A holds B's record (remote).
    within("A provides", a.client.start_providing_key(dht_key(1)))
        .await
        .unwrap();
    within("B provides", b.client.start_providing_key(dht_key(2)))
        .await
        .unwrap();
    eventually("A stores B's record", || live_providers(&a.store, 2) == 1).await;
    // A remote record about to expire, and one that does not (with an address: kad only
    // answers providers whose address it knows).
    let now = unix_now();
    let ghost = PeerId::random();
    let ghost_addr: Multiaddr = "/memory/4242".parse().unwrap();
    let soon = RemoteProvider {
        peer: ghost.to_bytes(),
        expires_unix: now + 2,
        addrs: vec![ghost_addr.to_vec()],
    };
    let limits = DhtLimits::default();
    a.store
        .dht()
        .unwrap()
        .dht_add_provider(dht_key(3).as_ref(), &soon, &limits, now)
        .unwrap();
    let forever = RemoteProvider {
        expires_unix: NEVER,
        ..soon.clone()
    };
    a.store
        .dht()
        .unwrap()
        .dht_add_provider(dht_key(4).as_ref(), &forever, &limits, now)
        .unwrap();
    drop(b);

    // Restart A: same key, same data directory.
    let dir = shut_down(a).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let a = node_in(dir, a_key).await;
    assert_eq!(a.client.local_peer_id(), a_id);
    let now = unix_now();
    assert!(a
        .store
        .dht()
        .unwrap()
        .dht_is_provided(dht_key(1).as_ref())
        .unwrap());
    let remote = a
        .store
        .dht()
        .unwrap()
        .dht_providers(dht_key(2).as_ref(), now)
        .unwrap();
    assert_eq!(remote.len(), 1);
    assert_eq!(remote[0].peer, b_id.to_bytes());
    assert!(remote[0].expires_unix > now + 47 * 3600, "48 h TTL kept");
    assert!(a
        .store
        .dht()
        .unwrap()
        .dht_providers(dht_key(3).as_ref(), now)
        .unwrap()
        .is_empty());

    // A newcomer asks the restarted A (no re-announcement happened).
    let c = node().await;
    within("C dials A", c.client.dial(a.addr.clone()))
        .await
        .unwrap();
    let p = find_provider(&c.client, dht_key(1), a_id).await;
    assert!(p.contains(&a_id), "A's own key: {p:?}");
    let p = find_provider(&c.client, dht_key(2), b_id).await;
    assert!(p.contains(&b_id), "B's record kept by A: {p:?}");
    let p = find_provider(&c.client, dht_key(4), ghost).await;
    assert!(p.contains(&ghost), "unexpired remote record: {p:?}");
    let p = within("C asks", c.client.get_providers_key(dht_key(3)))
        .await
        .unwrap_or_default();
    assert!(!p.contains(&ghost), "expired remote record returned: {p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_add_provider_flood_is_capped() {
    const FLOOD: usize = 30;
    let a = node().await;
    let key = dht_key(42);
    let mut ids = Vec::new();
    let mut floods = Vec::new();
    for _ in 0..FLOOD {
        let m = memory_node().await;
        ids.push(m.local_peer_id());
        floods.push(m);
    }
    // Each provides the same key; A is the only peer each knows, so A gets every ADD_PROVIDER.
    for m in &floods {
        within("dial A", m.dial(a.addr.clone())).await.unwrap();
    }
    let results = futures_util::future::join_all(
        floods
            .iter()
            .map(|m| within("provide", m.start_providing_key(key.clone()))),
    )
    .await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    // Let the last ADD_PROVIDER messages land.
    let started = Instant::now();
    let stored = loop {
        let n = a
            .store
            .dht()
            .unwrap()
            .dht_providers(key.as_ref(), unix_now())
            .unwrap();
        if n.len() >= 20 || started.elapsed() > Duration::from_secs(10) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored_after = a
        .store
        .dht()
        .unwrap()
        .dht_providers(key.as_ref(), unix_now())
        .unwrap();
    assert_eq!(stored.len(), 20);
    assert_eq!(stored_after, stored, "a key keeps its first 20 providers");
    assert_eq!(
        a.store
            .dht()
            .unwrap()
            .dht_counts()
            .unwrap()
            .remote_providers,
        20
    );
    for p in &stored {
        assert!(ids.iter().any(|id| id.to_bytes() == p.peer));
    }
    // Another key is not affected.
    within("provide", floods[0].start_providing_key(dht_key(43)))
        .await
        .unwrap();
    eventually("another key is stored", || {
        live_providers(&a.store, 43) == 1
    })
    .await;
}

/// The swarm keeps answering while the index's writer is taken (a long ingest commit or an
/// eviction batch): kad's record store writes `dht.redb`, never `index.redb`. With the DHT
/// tables in the index, A's swarm task would block in its first record-store write and none
/// of this would complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_and_requests_are_answered_while_the_index_writer_is_held() {
    const LONG: Duration = Duration::from_secs(20);
    async fn answered<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(LONG, f)
            .await
            .unwrap_or_else(|_| panic!("no answer while the index is busy: {what}"))
    }
    let a = node().await;
    let b = node().await;
    let (a_id, b_id) = (a.client.local_peer_id(), b.client.local_peer_id());
    within("B dials A", b.client.dial(a.addr.clone()))
        .await
        .unwrap();
    within("B bootstraps", b.client.bootstrap()).await.unwrap();

    let held = a.store.hold_index_write();
    // Another index write (as an ingest would do) now waits for `held`.
    let waiting_write = std::thread::spawn({
        let store = a.store.clone();
        move || store.unpin(&"z".repeat(32))
    });

    // B's ADD_PROVIDER makes A's record store write (a remote provider record)…
    answered("B provides", b.client.start_providing_key(dht_key(1)))
        .await
        .unwrap();
    let started = Instant::now();
    while live_providers(&a.store, 1) == 0 {
        assert!(
            started.elapsed() < LONG,
            "A never stored B's provider record"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // …and so does A's own provide (a provided key), before its query to B.
    answered("A provides", a.client.start_providing_key(dht_key(2)))
        .await
        .unwrap();
    assert!(a
        .store
        .dht()
        .unwrap()
        .dht_is_provided(dht_key(2).as_ref())
        .unwrap());
    // A answers DHT lookups from B, exchange requests and commands.
    let p = find_provider(&b.client, dht_key(2), a_id).await;
    assert!(p.contains(&a_id), "{p:?}");
    let p = find_provider(&a.client, dht_key(1), b_id).await;
    assert!(p.contains(&b_id), "{p:?}");
    let res = answered(
        "B asks A for a narinfo",
        b.client.request(
            a_id,
            pb::Request {
                kind: Some(pb::request::Kind::Narinfo(pb::NarInfoRequest {
                    store_path_hash: "y".repeat(32),
                })),
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(res, pb::Response::default());
    let peers = answered("A's peers", a.client.connected_peers())
        .await
        .unwrap();
    assert!(peers.contains(&b_id));

    // All of that happened with the index's writer still taken.
    assert!(
        !waiting_write.is_finished(),
        "the index write did not wait: the index was not busy"
    );
    held.abort().unwrap();
    assert!(
        !waiting_write.join().unwrap().unwrap(),
        "nothing was pinned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_announcer_all_mode_makes_chunks_findable() {
    let a = node().await;
    let b = node().await;
    let a_id = a.client.local_peer_id();
    let key = SecretKey::generate("test-1", [5; 32]);
    let trusted = [key.public_key()];
    let (public, private) = {
        let store = a.store.clone();
        let (k, t) = (key.clone(), trusted.clone());
        tokio::task::spawn_blocking(move || {
            (
                ingest(&store, &"a".repeat(32), &sample_nar(20), Some(&k), &t),
                ingest(&store, &"b".repeat(32), &sample_nar(40), None, &t),
            )
        })
        .await
        .unwrap()
    };
    within("B dials A", b.client.dial(a.addr.clone()))
        .await
        .unwrap();
    within("B bootstraps", b.client.bootstrap()).await.unwrap();

    let announcer = Arc::new(Announcer::new(
        a.client.clone(),
        a.store.clone(),
        Announce::All,
    ));
    let task = tokio::spawn({
        let a = announcer.clone();
        async move { a.run().await }
    });
    let started = Instant::now();
    while announcer.stats().reprovides == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no first round"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = a.store.manifest(&public.nar_hash).unwrap().unwrap();
    let mut chunks: Vec<ChunkId> = m.chunks.iter().map(|c| c.id).collect();
    chunks.sort();
    chunks.dedup();
    assert!(chunks.len() >= 2);
    let stats = announcer.stats();
    assert_eq!(stats.keys_provided, 1 + chunks.len() as u64, "{stats:?}");
    assert_eq!(stats.last_reprovide_keys, stats.keys_provided);
    assert_eq!(stats.failures, 0);
    assert!(stats.last_reprovide_ms.is_some());

    for id in &chunks {
        let p = find_provider(&b.client, chunk_record_key(id), a_id).await;
        assert!(p.contains(&a_id), "chunk {id}: {p:?}");
    }
    let p = find_provider(&b.client, nar_record_key(&public.nar_hash.nar_key()), a_id).await;
    assert!(p.contains(&a_id));
    // The untrusted NAR and its chunks are not announced.
    let pm = a.store.manifest(&private.nar_hash).unwrap().unwrap();
    for k in [
        nar_record_key(&private.nar_hash.nar_key()),
        chunk_record_key(&pm.chunks[0].id),
    ] {
        let p = within("B asks", b.client.get_providers_key(k))
            .await
            .unwrap_or_default();
        assert!(!p.contains(&a_id));
    }

    // A NAR ingested later is announced through the queue.
    let later = {
        let store = a.store.clone();
        let (k, t) = (key.clone(), trusted.clone());
        tokio::task::spawn_blocking(move || {
            ingest(&store, &"c".repeat(32), &sample_nar(60), Some(&k), &t)
        })
        .await
        .unwrap()
    };
    announcer.announce(later.nar_hash);
    let p = find_provider(&b.client, nar_record_key(&later.nar_hash.nar_key()), a_id).await;
    assert!(p.contains(&a_id));
    let lm = a.store.manifest(&later.nar_hash).unwrap().unwrap();
    let p = find_provider(&b.client, chunk_record_key(&lm.chunks[0].id), a_id).await;
    assert!(p.contains(&a_id));
    task.abort();
}

/// The protocol timers come from the config: with a 2 s record lifetime and a 1 s reprovide
/// interval, B's record of A is republished while A reprovides and expires when it stops;
/// the DHT call counters count each side's calls by type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_timers_come_from_config_and_calls_are_counted() {
    let timers = crate::config::Timers {
        reprovide_interval_secs: 1.0,
        provider_record_ttl_secs: 2.0,
        dht_purge_interval_secs: 1.0,
        ..Default::default()
    };
    let mut config = memory_config();
    config.behaviour.timers = timers;
    let spawn = |config: NetConfig| async move {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let responder = Arc::new(StoreResponder::new(store.clone()));
        spawn_node(dir, store, Keypair::generate_ed25519(), &config, responder).await
    };
    let a = spawn(config.clone()).await;
    let b = spawn(config).await;
    let key = SecretKey::generate("test-1", [5; 32]);
    let trusted = [key.public_key()];
    let info = {
        let store = a.store.clone();
        tokio::task::spawn_blocking(move || {
            ingest(
                &store,
                &"a".repeat(32),
                &sample_nar(30),
                Some(&key),
                &trusted,
            )
        })
        .await
        .unwrap()
    };
    within("A dials B", a.client.dial(b.addr.clone()))
        .await
        .unwrap();
    let nar_key = nar_record_key(&info.nar_hash.nar_key());
    let b_holds_a = |b: &Node| {
        !b.store
            .dht()
            .unwrap()
            .dht_providers(nar_key.as_ref(), unix_now())
            .unwrap()
            .is_empty()
    };

    let announcer = Arc::new(
        Announcer::new(a.client.clone(), a.store.clone(), Announce::Roots)
            .with_intervals(timers.reprovide_interval(), timers.dht_purge_interval()),
    );
    let task = tokio::spawn({
        let a = announcer.clone();
        async move { a.run().await }
    });
    eventually("B stores A's provider record", || b_holds_a(&b)).await;
    let first_stored = Instant::now();
    // Reprovided every second: once more than twice the lifetime has passed and three rounds
    // are done, B still holds (or soon holds again) a live record, which only a republication
    // after the first record expired can give. No deadline but the generous one of
    // `eventually`: a loaded machine may delay rounds.
    let ttl = timers.provider_record_ttl();
    eventually("three reprovide rounds over twice the lifetime", || {
        announcer.stats().reprovides >= 3 && first_stored.elapsed() > 2 * ttl
    })
    .await;
    eventually("B holds a republished record", || b_holds_a(&b)).await;
    let p = find_provider(&b.client, nar_key.clone(), a.client.local_peer_id()).await;
    assert!(p.contains(&a.client.local_peer_id()));

    let (sa, sb) = (
        a.client.stats().dht.snapshot(),
        b.client.stats().dht.snapshot(),
    );
    assert!(sa.out_start_providing >= 3, "{sa:?}");
    assert!(sb.in_add_provider >= 3, "{sb:?}");
    assert!(sb.out_get_providers >= 1, "{sb:?}");
    assert!(sa.in_get_providers >= 1, "{sa:?}");

    // Stopped reproviding: the 2 s record expires (and B's purge, every 1 s, is not needed
    // for that: expired records are never handed out).
    task.abort();
    eventually("A's record expires at B", || !b_holds_a(&b)).await;
}
