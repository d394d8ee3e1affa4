//! Three nodes over libp2p's memory transport: DHT provider lookup, manifest and block
//! exchange with every block checked, trust rules, and limits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use tempfile::TempDir;

use super::*;
use crate::core::manifest::Manifest;
use crate::core::signing::SecretKey;
use crate::core::{ChunkId, NarHash};
use crate::store::testing::{ingest, sample_nar};
use crate::store::Store;
use nix_p2p_cache_proto::MAX_WANTS_PER_REQUEST;

struct Node {
    client: Client,
    addr: Multiaddr,
    store: Arc<Store>,
    _dir: TempDir,
}

async fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let config = NetConfig {
        transport: Transport::Memory,
        behaviour: BehaviourConfig { mdns: false },
        share: crate::config::Share::All,
        upload_rate_limit: None,
    };
    let responder = Arc::new(StoreResponder::new(store.clone()));
    let (client, event_loop) = new(Keypair::generate_ed25519(), &config, responder).unwrap();
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
    let res = client
        .request(
            peer,
            pb::Request {
                kind: Some(pb::request::Kind::Manifest(pb::ManifestRequest {
                    nar_key: key.multihash_bytes(),
                })),
            },
        )
        .await
        .unwrap();
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
        let mut data = chunks[&c.id].clone();
        manifest.slots.restore(offset, &mut data);
        nar.extend_from_slice(&data);
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
