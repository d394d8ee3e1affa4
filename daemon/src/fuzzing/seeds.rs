//! Generated seeds of the corpora that are not plain test vectors: encoded manifests of the
//! test NARs (both chunkings), exchange messages of every kind (bodies and frames), and HTTP
//! request scripts. Written by `corpus_replay::write_seed_corpus`.

use nix_p2p_cache_proto::v1 as pb;
use prost::Message;

use super::http_harness::{fixture_nar, fixture_narinfo, xz, NEXT, STORE_PATH};
use crate::core::chunker::{chunks, ChunkingParams};
use crate::core::manifest::{ChunkEntry, Manifest};
use crate::core::normalise::{Normaliser, RefSet};
use crate::core::store_path::StorePath;
use crate::core::{ChunkId, NarHash};

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata");

pub(crate) fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("manifest", manifests()),
        ("codec", exchange()),
        ("http", requests()),
    ]
}

fn test_nars() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(format!("{TESTDATA}/nar"))
        .expect("testdata/nar")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "nar"))
        .map(|e| std::fs::read(e.path()).expect("a test NAR"))
        .collect();
    out.push(fixture_nar());
    out
}

fn manifests() -> Vec<Vec<u8>> {
    let refs = [StorePath::parse(STORE_PATH).expect("a store path")];
    let mut out = Vec::new();
    for nar in test_nars() {
        for params in ChunkingParams::READ {
            let mut norm =
                Normaliser::of(&nar[..], params.normalisation, || RefSet::from_paths(&refs));
            let cs: Vec<ChunkEntry> = chunks(&mut norm, params)
                .map(|c| {
                    let c = c.expect("reading from memory");
                    ChunkEntry {
                        id: ChunkId::of(&c.data),
                        size: c.data.len() as u32,
                    }
                })
                .collect();
            let (_, slots) = norm.into_parts();
            let m = Manifest {
                nar_hash: NarHash::digest(&nar),
                nar_size: nar.len() as u64,
                chunking: params.id,
                chunks: cs,
                slots,
            };
            out.push(m.encode());
        }
    }
    out
}

fn frame(m: &impl Message) -> Vec<u8> {
    m.encode_length_delimited_to_vec()
}

fn exchange() -> Vec<Vec<u8>> {
    use pb::request::Kind;
    let cid = ChunkId::of(b"chunk").to_cid_bytes().to_vec();
    let nar = NarHash::digest(b"nar");
    let requests = [
        Kind::Wantlist(pb::Wantlist {
            entries: vec![pb::wantlist::Entry {
                cid: cid.clone(),
                priority: 1,
                cancel: false,
                want_type: 1,
                send_dont_have: true,
            }],
            full: true,
        }),
        Kind::Manifest(pb::ManifestRequest {
            nar_key: nar.nar_key().cid().to_bytes(),
            chunkings: vec![1, 2],
        }),
        Kind::Narinfo(pb::NarInfoRequest {
            store_path_hash: "0123456789abcdfghijklmnpqrsvwxyz".into(),
        }),
        Kind::Summary(pb::SummaryRequest { have_generation: 7 }),
    ];
    let mut out = Vec::new();
    for k in requests {
        let r = pb::Request { kind: Some(k) };
        out.push(r.encode_to_vec());
        out.push(frame(&r));
    }
    let response = pb::Response {
        blocks: vec![pb::response::Block {
            cid: cid.clone(),
            data: zstd::encode_all(&b"chunk"[..], 1).expect("zstd in memory"),
        }],
        block_presences: vec![pb::response::BlockPresence { cid, r#type: 1 }],
        manifest: Some(vec![1, 2, 3]),
        narinfo: Some("StorePath: x\n".into()),
        summary: Some(pb::PathSummary {
            generation: 1,
            hashes: 3,
            bits: vec![0xff; 16],
            paths: 2,
        }),
    };
    out.push(response.encode_to_vec());
    out.push(frame(&response));
    out
}

fn requests() -> Vec<Vec<u8>> {
    let nar = fixture_nar();
    let compressed = xz(&nar);
    let info = fixture_narinfo(&nar, &compressed);
    let plain = format!("/nar/{}.nar", NarHash::digest(&nar).to_base32());
    let hex = format!("/nar/{}.nar", hex::encode(NarHash::digest(&nar).0));
    let xz_name = format!("/nar/{}.nar.xz", NarHash::digest(&compressed).to_base32());
    let narinfo = format!("/{}.narinfo", &STORE_PATH[11..43]);
    let auth = "Authorization: Basic bml4OmZ1eno=";
    let text = |s: String| s.into_bytes();
    let mut out = vec![
        text("GET /nix-cache-info\n".into()),
        text(format!("GET {narinfo}\n")),
        text(format!("HEAD {narinfo}\n")),
        text("GET /00000000000000000000000000000000.narinfo\n".into()),
        text("GET /not-a-hash.narinfo\n".into()),
        text(format!("GET {plain}\n")),
        text(format!("HEAD {plain}\n")),
        text(format!("GET {hex}\n")),
        text(format!("GET {xz_name}\n")),
        text(format!("GET {plain}\nRange: bytes=0-99\n")),
        text(format!("GET {plain}\nRange: bytes=-100\n")),
        text(format!("GET {plain}\nRange: bytes=199990-\n")),
        text(format!("GET {plain}\nRange: bytes=5-1\n")),
        text(format!("GET {plain}\nRange: bytes=0-1,5-9\n")),
        text(format!("GET {plain}\nRange: bytes=999999999-\n")),
        text(format!("HEAD {plain}\nRange: bytes=10-20\n")),
        text("GET /nar/zzz.nar.xz\n".into()),
        text("GET /metrics\n".into()),
        text("GET /\nHost: localhost:8080\n".into()),
        text("GET /api/status\n".into()),
        text("GET /api/peers\n".into()),
        text(format!(
            "PUT /nix-cache-info\n{auth}\n\nStoreDir: /nix/store\n"
        )),
        text(format!("PUT /log/x.drv\n{auth}\n\nlog\n")),
        text(format!("PUT {narinfo}\n{auth}\n\n{info}")),
        text(format!("PUT {narinfo}\nAuthorization: Basic bad\n\n{info}")),
        text(format!("PUT /x.ls\n{auth}\n\n{{}}")),
        text(format!(
            "POST /api/pin\n{auth}\nContent-Type: application/json\n\n[\"{STORE_PATH}\"]"
        )),
        text(format!(
            "POST /api/gc\n{auth}\nContent-Type: application/json\n\n{{\"dry_run\":true}}"
        )),
        text(format!(
            "PUT /nar/abc.nar\n{auth}\nContent-Length: 99999999999\n\n"
        )),
    ];
    // An upload of a small NAR then its narinfo, in one input.
    let small = std::fs::read(format!("{TESTDATA}/nar/regular.nar")).expect("regular.nar");
    let small_hash = NarHash::digest(&small);
    let small_info = format!(
        "StorePath: /nix/store/11111111111111111111111111111111-small\nURL: nar/{}.nar\n\
         Compression: none\nNarHash: {small_hash}\nNarSize: {}\nReferences: \n",
        small_hash.to_base32(),
        small.len()
    );
    let mut upload = text(format!(
        "PUT /nar/{}.nar\n{auth}\n\n",
        small_hash.to_base32()
    ));
    upload.extend_from_slice(&small);
    upload.extend_from_slice(NEXT);
    upload.extend(text(format!(
        "PUT /11111111111111111111111111111111.narinfo\n{auth}\n\n{small_info}"
    )));
    upload.extend_from_slice(NEXT);
    upload.extend(text(format!(
        "GET /nar/{}.nar\nRange: bytes=8-\n",
        small_hash.to_base32()
    )));
    out.push(upload);
    out
}
