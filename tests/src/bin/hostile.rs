//! `nix-p2p-cache-hostile`: a hostile peer for the end-to-end tests (`tests/tests/hostile.rs`).
//! A test tool, never shipped and never to be run against anyone but our own test daemons.
//!
//! It is built from our own library: it opens a real data directory (populated beforehand by
//! the test), runs a real libp2p node (`net::new`, TCP), joins the DHT through `--bootstrap`
//! and announces every trusted NAR it holds, like a daemon would. Inbound exchange requests go
//! to [`Hostile`], which wraps the honest [`StoreResponder`] and lies according to `--mode`:
//!
//! - `wrong-bytes`: narinfos and manifests honest; every block's data replaced, in turn by a
//!   valid zstd frame of the chunk with its last byte flipped (right length, wrong BLAKE3), by
//!   garbage (not a zstd frame), by a frame one byte longer than the chunk, and by nothing.
//! - `lying-have`: answers HAVE to every want (HAVE and BLOCK alike) and never sends a block;
//!   every other request answers DONT_HAVE instead to the BLOCK wants that ask for it.
//! - `bogus-manifest`: narinfos honest; each manifest keeps the right nar_hash/nar_size but one
//!   chunk is replaced by a forged one (one byte of a regular file's contents flipped, outside
//!   the store-path slots), which it serves consistently: every block checks against its id,
//!   the NAR keeps a valid structure and its size, only NarHash tells the lie.
//! - `slow`: honest answers after `--delay-ms` (default 20 s).
//!
//! narinfos are answered at once from memory (every mode but `slow`), so this peer usually
//! wins a daemon's narinfo race and becomes the first provider asked. Each lie is logged to
//! stderr as a line starting with `lie ` (the tests count them: a test whose hostile peer was
//! never asked proves nothing). stdout carries exactly one line, `listening <addr>/p2p/<id>`.
//! Nothing here panics on what peers send; channels are the library's (bounded).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use nix_p2p_cache::core::manifest::{ChunkEntry, Manifest};
use nix_p2p_cache::core::nar::{NarValidator, NarVisitor};
use nix_p2p_cache::core::normalise::{Slots, HASH_LEN};
use nix_p2p_cache::core::{ChunkId, NarHash};
use nix_p2p_cache::net::responder::ResponseFuture;
use nix_p2p_cache::net::{self, BehaviourConfig, NetConfig, Responder, StoreResponder, Transport};
use nix_p2p_cache::store::{Store, TrustClass};
use nix_p2p_cache_proto::v1 as pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    WrongBytes,
    LyingHave,
    BogusManifest,
    Slow,
}

/// A hostile peer for tests: serves a real store, lying as `--mode` says.
#[derive(Parser)]
#[command(name = "nix-p2p-cache-hostile")]
struct Args {
    /// Data directory of the store to serve (populated beforehand, e.g. by `import`).
    #[arg(long)]
    data_dir: PathBuf,
    /// How to lie.
    #[arg(long, value_enum)]
    mode: Mode,
    /// libp2p listen multiaddr.
    #[arg(long, default_value = "/ip4/127.0.0.1/tcp/0")]
    p2p_listen: Multiaddr,
    /// Peers to dial (multiaddrs ending in /p2p/<peer id>).
    #[arg(long, num_args = 1..)]
    bootstrap: Vec<Multiaddr>,
    /// `slow`: how long each answer is held back, in milliseconds.
    #[arg(long, default_value_t = 20_000)]
    delay_ms: u64,
}

/// `bogus-manifest`: the forged manifests (by NarHash) and the forged chunks they name.
#[derive(Default)]
struct Forged {
    manifests: HashMap<NarHash, Vec<u8>>,
    chunks: HashMap<ChunkId, Vec<u8>>,
}

/// The lying responder (see the module docs).
struct Hostile {
    mode: Mode,
    honest: StoreResponder,
    /// Trusted narinfo texts by store-path hash, answered without a store call.
    narinfos: HashMap<String, String>,
    forged: Forged,
    delay: Duration,
    requests: AtomicU64,
    /// Blocks spoilt so far (picks the next way to spoil one).
    blocks: Arc<AtomicU64>,
}

fn lie(mode: Mode, peer: &PeerId, what: &str) {
    eprintln!("lie {mode:?}: {what} (to {peer})");
}

fn ready(response: pb::Response) -> ResponseFuture {
    Box::pin(std::future::ready(response))
}

fn presence(cid: Vec<u8>, t: pb::response::PresenceType) -> pb::response::BlockPresence {
    pb::response::BlockPresence {
        cid,
        r#type: t as i32,
    }
}

impl Responder for Hostile {
    fn respond(&self, peer: PeerId, request: pb::Request) -> ResponseFuture {
        use pb::request::Kind;
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let mode = self.mode;
        match (mode, &request.kind) {
            (Mode::Slow, _) => {
                lie(
                    mode,
                    &peer,
                    &format!("holding an answer back {:?}", self.delay),
                );
                let honest = self.honest.respond(peer, request);
                let delay = self.delay;
                Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    honest.await
                })
            }
            (_, Some(Kind::Narinfo(q))) => ready(pb::Response {
                narinfo: self.narinfos.get(&q.store_path_hash).cloned(),
                ..Default::default()
            }),
            (Mode::WrongBytes, Some(Kind::Wantlist(_))) => {
                // The blocks are chosen by the honest responder, then spoilt one by one.
                let honest = self.honest.respond(peer, request);
                let counter = self.blocks.clone();
                Box::pin(async move {
                    let mut r = honest.await;
                    for block in &mut r.blocks {
                        let k = counter.fetch_add(1, Ordering::Relaxed);
                        let (data, what) = spoil(&block.data, k);
                        lie(mode, &peer, what);
                        block.data = data;
                    }
                    r
                })
            }
            (Mode::LyingHave, Some(Kind::Wantlist(w))) => {
                use pb::response::PresenceType::{DontHave, Have};
                let mut r = pb::Response::default();
                for e in w.entries.iter().filter(|e| !e.cancel) {
                    let block = e.want_type == pb::wantlist::WantType::Block as i32;
                    let t = if block && e.send_dont_have && n % 2 == 1 {
                        DontHave
                    } else {
                        Have
                    };
                    r.block_presences.push(presence(e.cid.clone(), t));
                }
                lie(
                    mode,
                    &peer,
                    &format!("presences without blocks for {} wants", w.entries.len()),
                );
                ready(r)
            }
            (Mode::BogusManifest, Some(Kind::Manifest(m))) => {
                let nar = match m.nar_key.as_slice() {
                    [0x12, 0x20, digest @ ..] => NarHash::from_slice(digest),
                    _ => None,
                };
                let manifest = nar.and_then(|h| self.forged.manifests.get(&h)).cloned();
                if let (Some(h), Some(_)) = (nar, &manifest) {
                    lie(mode, &peer, &format!("forged manifest of {h}"));
                }
                ready(pb::Response {
                    manifest,
                    ..Default::default()
                })
            }
            (Mode::BogusManifest, Some(Kind::Wantlist(w))) => {
                // Forged chunks from memory, the rest from the store: consistent lies.
                let mut forged = Vec::new();
                let mut rest = w.clone();
                rest.entries.retain(|e| {
                    let frame = ChunkId::from_cid_bytes(&e.cid)
                        .ok()
                        .and_then(|id| self.forged.chunks.get(&id));
                    match frame {
                        Some(f) if !e.cancel => {
                            forged.push(pb::response::Block {
                                cid: e.cid.clone(),
                                data: f.clone(),
                            });
                            false
                        }
                        _ => true,
                    }
                });
                if !forged.is_empty() {
                    lie(mode, &peer, &format!("{} forged blocks", forged.len()));
                }
                let honest = self.honest.respond(
                    peer,
                    pb::Request {
                        kind: Some(Kind::Wantlist(rest)),
                    },
                );
                Box::pin(async move {
                    let mut r = honest.await;
                    r.blocks.extend(forged);
                    r
                })
            }
            _ => self.honest.respond(peer, request),
        }
    }
}

/// The `k`-th spoilt version of an honest block (`frame`: one zstd frame from our own store).
fn spoil(frame: &[u8], k: u64) -> (Vec<u8>, &'static str) {
    let chunk = || zstd::stream::decode_all(frame).unwrap_or_default();
    let compress = |c: &[u8]| zstd::bulk::compress(c, 3).unwrap_or_default();
    match k % 4 {
        0 => {
            let mut c = chunk();
            if let Some(b) = c.last_mut() {
                *b ^= 0xff;
            }
            (
                compress(&c),
                "block: zstd frame of other bytes, same length",
            )
        }
        1 => (
            frame.iter().map(|b| b ^ 0x5a).collect(),
            "block: garbage, not zstd",
        ),
        2 => {
            let mut c = chunk();
            c.push(0);
            (compress(&c), "block: zstd frame one byte too long")
        }
        _ => (Vec::new(), "block: empty data"),
    }
}

/// Where NAR byte `pos` comes from in the chunks of `m`: (chunk index, index in the chunk's
/// normalised bytes), or `None` when a store-path slot puts it back on reassembly.
fn locate(m: &Manifest, pos: u64) -> Option<(usize, usize)> {
    let norm: Vec<u64> = m.chunk_offsets().map(|(o, _)| o).collect();
    let nar = m.nar_offsets();
    let i = nar.partition_point(|&o| o <= pos).checked_sub(1)?;
    let (a, size) = (norm[i], u64::from(m.chunks[i].size));
    match &m.slots {
        Slots::Hashes(t) => {
            let k = t.offsets.partition_point(|&o| o <= pos);
            let in_slot = k > 0 && pos < t.offsets[k - 1] + HASH_LEN as u64;
            (!in_slot && pos < a + size).then(|| (i, (pos - a) as usize))
        }
        Slots::References(t) => {
            let last = i + 1 == norm.len();
            let (mut at_norm, mut at_nar) = (a, nar[i]);
            for (&o, &s) in t.offsets.iter().zip(&t.index) {
                if o < a || o > a + size || (o == a + size && !last) {
                    continue;
                }
                if pos < at_nar + (o - at_norm) {
                    return Some((i, (at_norm - a + pos - at_nar) as usize));
                }
                at_nar += o - at_norm;
                at_norm = o;
                let len = t.strings[s as usize].len() as u64;
                if pos < at_nar + len {
                    return None;
                }
                at_nar += len;
            }
            (pos < at_nar + (a + size - at_norm))
                .then(|| (i, (at_norm - a + pos - at_nar) as usize))
        }
    }
}

/// Finds the NAR offset of the first regular-file byte outside the store-path slots (whose
/// bytes the receiver overwrites when it restores the chunks).
struct ContentByte<'a> {
    manifest: &'a Manifest,
    /// NAR offset and address of the piece being fed.
    base: u64,
    piece: usize,
    found: Option<u64>,
}

impl NarVisitor for ContentByte<'_> {
    fn contents(&mut self, data: &[u8]) {
        if self.found.is_some() {
            return;
        }
        // The validator hands out sub-slices of the piece it was fed.
        let Some(start) = (data.as_ptr() as usize).checked_sub(self.piece) else {
            return;
        };
        let start = self.base + start as u64;
        self.found =
            (start..start + data.len() as u64).find(|&p| locate(self.manifest, p).is_some());
    }
}

/// A manifest of `nar_hash` with one forged chunk: (encoded manifest, chunk id, zstd frame).
fn forge(store: &Store, nar_hash: &NarHash) -> Result<(Vec<u8>, ChunkId, Vec<u8>), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut manifest = store
        .manifest(nar_hash)
        .map_err(|x| e(&x))?
        .ok_or("no manifest")?;
    let mut reader = store.nar_reader(nar_hash).map_err(|x| e(&x))?;
    let mut validator = NarValidator::new();
    let shown = manifest.clone();
    let mut finder = ContentByte {
        manifest: &shown,
        base: 0,
        piece: 0,
        found: None,
    };
    while let Some(piece) = reader.next_block().map_err(|x| e(&x))? {
        finder.piece = piece.as_ptr() as usize;
        validator
            .feed_with(&piece, &mut finder)
            .map_err(|x| e(&x))?;
        finder.base += piece.len() as u64;
        if finder.found.is_some() {
            break;
        }
    }
    // No file contents at all (symlinks, empty files): spoil the NAR's first byte instead.
    let pos = finder.found.unwrap_or(0);
    let (index, at) = locate(&manifest, pos).ok_or("NAR offset not in a chunk")?;
    let entry = manifest.chunks[index];
    let frame = store
        .chunk_frame(&entry.id)
        .map_err(|x| e(&x))?
        .ok_or("chunk missing")?;
    let mut data = zstd::bulk::decompress(&frame, entry.size as usize).map_err(|x| e(&x))?;
    let byte = data.get_mut(at).ok_or("chunk shorter than its entry")?;
    *byte ^= 0x01;
    let id = ChunkId::of(&data);
    let frame = zstd::bulk::compress(&data, 3).map_err(|x| e(&x))?;
    manifest.chunks[index] = ChunkEntry {
        id,
        size: entry.size,
    };
    Ok((manifest.encode(), id, frame))
}

/// What the node serves, read once at startup.
struct Loaded {
    store: Arc<Store>,
    narinfos: HashMap<String, String>,
    forged: Forged,
    nars: Vec<NarHash>,
}

fn load(dir: &std::path::Path, mode: Mode) -> Result<Loaded, String> {
    let e = |e: &dyn std::fmt::Display| format!("{}: {e}", dir.display());
    let store = Store::open(dir).map_err(|x| e(&x))?;
    let mut narinfos = HashMap::new();
    let mut forged = Forged::default();
    for (hash, info) in store.narinfos().map_err(|x| e(&x))? {
        if !matches!(info.trust, TrustClass::Trusted(_)) {
            continue;
        }
        if mode == Mode::BogusManifest && !forged.manifests.contains_key(&info.nar_hash) {
            match forge(&store, &info.nar_hash) {
                Ok((manifest, id, frame)) => {
                    forged.manifests.insert(info.nar_hash, manifest);
                    forged.chunks.insert(id, frame);
                }
                Err(x) => eprintln!("hostile: cannot forge a manifest for {hash}: {x}"),
            }
        }
        narinfos.insert(hash, info.text);
    }
    let nars = store
        .shareable_nars()
        .map_err(|x| e(&x))?
        .into_iter()
        .collect();
    Ok(Loaded {
        store: Arc::new(store),
        narinfos,
        forged,
        nars,
    })
}

async fn run(args: Args) -> Result<(), String> {
    let (dir, mode) = (args.data_dir.clone(), args.mode);
    let loaded = tokio::task::spawn_blocking(move || load(&dir, mode))
        .await
        .map_err(|e| e.to_string())??;
    eprintln!(
        "hostile: mode {mode:?}, {} narinfos, {} NARs, {} forged manifests",
        loaded.narinfos.len(),
        loaded.nars.len(),
        loaded.forged.manifests.len()
    );
    let responder = Arc::new(Hostile {
        mode,
        honest: StoreResponder::new(loaded.store),
        narinfos: loaded.narinfos,
        forged: loaded.forged,
        delay: Duration::from_millis(args.delay_ms),
        requests: AtomicU64::new(0),
        blocks: Arc::new(AtomicU64::new(0)),
    });
    let config = NetConfig {
        transport: Transport::Tcp,
        behaviour: BehaviourConfig {
            mdns: false,
            timers: Default::default(),
        },
        share: nix_p2p_cache::config::Share::All,
        upload_rate_limit: None,
    };
    let (client, event_loop) =
        net::new(Keypair::generate_ed25519(), &config, responder).map_err(|e| e.to_string())?;
    tokio::spawn(event_loop.run());
    let mut addr = client
        .listen(args.p2p_listen)
        .await
        .map_err(|e| e.to_string())?;
    addr.push(Protocol::P2p(client.local_peer_id()));
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {addr}")
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
    }
    for b in &args.bootstrap {
        match client.dial(b.clone()).await {
            Ok(peer) => eprintln!("hostile: connected to {peer}"),
            Err(e) => eprintln!("hostile: dialing {b}: {e}"),
        }
    }
    if !args.bootstrap.is_empty() {
        if let Err(e) = client.bootstrap().await {
            eprintln!("hostile: DHT bootstrap: {e}");
        }
    }
    for nar in &loaded.nars {
        if let Err(e) = client.start_providing(nar.nar_key()).await {
            eprintln!("hostile: announcing {nar}: {e}");
        }
    }
    eprintln!("hostile: announced {} NARs", loaded.nars.len());
    shutdown().await;
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hostile: {e}");
            ExitCode::FAILURE
        }
    }
}
