//! Entry points of the fuzz targets (`fuzz/`, `docs/fuzzing.md`): one function per target that
//! takes arbitrary bytes, drives the real parsing code and asserts the properties that must
//! hold, panicking when one does not. The coverage-guided fuzzers call them, and so does the
//! ordinary test suite (`corpus_replay` below), which replays every committed corpus file and
//! seeded mutations of them, so CI exercises every target without instrumentation.
//!
//! Compiled only for tests and with the `fuzzing` feature; not part of the daemon's API.

use std::io::Read;

use nix_p2p_cache_proto::v1 as pb;
use prost::Message;

use crate::core::chunker::{chunks, ChunkingParams};
use crate::core::manifest::{ChunkEntry, Manifest};
use crate::core::nar::{self, NarValidator, MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN};
use crate::core::narinfo::NarInfo;
use crate::core::normalise::{self, Normalisation, Normaliser, RefSet, Slots};
use crate::core::store_path::StorePath;
use crate::core::NarHash;
use crate::net::codec;

mod http_harness;
mod nar_ref;
#[cfg(test)]
mod seeds;

pub use http_harness::http;

/// A fuzz target's entry point: panics when a property does not hold.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/` name them.
pub const TARGETS: [(&str, Target); 6] = [
    ("narinfo", narinfo),
    ("nar", nar),
    ("manifest", manifest),
    ("normalise", normalise),
    ("codec", codec),
    ("http", http),
];

/// A small deterministic generator (xorshift64*) seeded from the input, so a target's choices
/// (split points, sizes) are a function of its input and a crash reproduces.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn from_bytes(data: &[u8]) -> Self {
        // FNV-1a; never zero (xorshift's fixed point).
        let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self(h | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Cuts `data` into pieces of pseudo-random sizes (1..=`max`), covering it in order.
fn pieces<'a>(data: &'a [u8], rng: &mut Rng, max: u64) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (1 + rng.below(max) as usize).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

/// narinfo: parsing never panics; what parses renders to text that parses back to the same
/// value (a value ending in `\r` is the one documented exception: `lines` drops it), rendering
/// is idempotent, and the served form keeps the signed fingerprint and points at our NAR URL.
pub fn narinfo(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(info) = NarInfo::parse(text) else {
        return;
    };
    // A value ending in `\r` (a line ending `\r\r\n`) loses that `\r` when parsed again:
    // the one documented exception to the round trip (`NarInfo::to_text`).
    let exception = [&info.url]
        .into_iter()
        .chain(info.compression.as_ref())
        .chain(info.file_hash.as_ref())
        .chain(info.deriver.as_ref())
        .chain(info.system.as_ref())
        .chain(info.ca.as_ref())
        .chain(&info.sigs)
        .chain(info.extra.iter().map(|(_, v)| v))
        .any(|v| v.ends_with('\r'));
    let rendered = info.to_text();
    let again = NarInfo::parse(&rendered)
        .unwrap_or_else(|e| panic!("rendered narinfo does not parse: {e}\n{rendered}"));
    if !exception {
        assert_eq!(again, info, "parse(to_text(x)) != x");
        assert_eq!(again.to_text(), rendered, "rendering is not idempotent");
    }
    assert_eq!(again.fingerprint(), info.fingerprint());
    let served = crate::http::served_narinfo(&rendered).expect("a parsed narinfo is servable");
    let served = NarInfo::parse(&served).expect("the served narinfo parses");
    assert_eq!(
        served.fingerprint(),
        info.fingerprint(),
        "serving changed what is signed"
    );
    if !exception {
        assert_eq!(served.sigs, info.sigs, "serving changed the signatures");
    }
    assert_eq!(served.url, crate::http::nar_url(&info));
    assert_eq!(served.file_size, Some(info.nar_size));
    assert_eq!(served.compression.as_deref(), Some("none"));
}

/// NAR: the streaming validator gives the same verdict whether fed whole or in pieces of any
/// size, and agrees with an independent reference parser of the grammar (`nar_ref`): it never
/// accepts what the reference rejects, nor the reverse. An accepted NAR's summary matches the
/// reference's counts; what `parse_nar` reads, `write_nar` writes back byte for byte (a NAR's
/// encoding is canonical).
pub fn nar(data: &[u8]) {
    let mut whole = NarValidator::new();
    let verdict = whole.feed(data).and_then(|()| whole.finish());
    let mut rng = Rng::from_bytes(data);
    let mut split = NarValidator::new();
    let mut split_result = Ok(());
    for p in pieces(data, &mut rng, 64) {
        split_result = split.feed(p);
        if split_result.is_err() {
            break;
        }
    }
    let split_verdict = split_result.and_then(|()| split.finish());
    assert_eq!(
        verdict, split_verdict,
        "the verdict depends on how the NAR was cut"
    );

    let reference = nar_ref::parse(data);
    match (&verdict, &reference) {
        (Ok(summary), Ok(r)) => {
            assert_eq!(summary.nar_size, data.len() as u64);
            assert_eq!(summary.files, r.files, "files");
            assert_eq!(summary.executables, r.executables, "executables");
            assert_eq!(summary.directories, r.directories, "directories");
            assert_eq!(summary.symlinks, r.symlinks, "symlinks");
            assert_eq!(summary.contents_size, r.contents_size, "contents size");
        }
        (Err(_), Err(_)) => {}
        (Ok(_), Err(why)) => panic!("the validator accepts a NAR the reference rejects: {why}"),
        (Err(e), Ok(_)) => panic!("the validator rejects a NAR the reference accepts: {e}"),
    }
    match nar::parse_nar(data) {
        Ok(tree) => {
            assert!(
                reference.as_ref().is_ok_and(|r| r.utf8),
                "parse_nar accepts what the reference rejects (or non-UTF-8 names)"
            );
            let mut out = Vec::new();
            nar::write_nar(&mut out, &tree).expect("a parsed tree writes");
            assert!(out == data, "write_nar(parse_nar(x)) != x");
        }
        Err(e) => assert!(
            !reference.as_ref().is_ok_and(|r| r.utf8),
            "parse_nar rejects a UTF-8 NAR the reference accepts: {e}"
        ),
    }
}

/// Most bytes of synthetic chunk data the manifest target restores (a decoded manifest may
/// declare gigabytes).
const MAX_RESTORE: u64 = 1 << 20;

/// Manifest: decoding never panics; a decoded manifest encodes to bytes that decode to the
/// same manifest; its NAR offsets increase from 0; restoring its chunks one at a time gives
/// exactly `nar_size` bytes, each chunk the length its NAR offsets say, the same bytes as
/// restoring the whole normalised stream at once.
pub fn manifest(data: &[u8]) {
    let Ok(m) = Manifest::decode(data) else {
        return;
    };
    let again = Manifest::decode(&m.encode()).expect("an encoded manifest decodes");
    assert_eq!(again, m, "decode(encode(m)) != m");
    let _ = m.check_chunking();
    check_restore(&m, None);
}

/// Restores every chunk of `m` (filled with `chunk_bytes`, else a pattern) one at a time and
/// at once, checking lengths and offsets; returns the restored NAR.
fn check_restore(m: &Manifest, chunk_bytes: Option<&[Vec<u8>]>) -> Option<Vec<u8>> {
    let offsets = m.nar_offsets();
    assert_eq!(offsets.len(), m.chunks.len());
    assert_eq!(
        offsets.first().copied().unwrap_or(0),
        0,
        "first chunk not at 0"
    );
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "NAR offsets do not increase"
    );
    assert!(
        offsets.iter().all(|&o| o < m.nar_size.max(1)),
        "offset past NarSize"
    );
    let norm_len: u64 = m.chunks.iter().map(|c| u64::from(c.size)).sum();
    if norm_len > MAX_RESTORE || m.nar_size > 4 * MAX_RESTORE {
        return None;
    }
    let data: Vec<Vec<u8>> = match chunk_bytes {
        Some(b) => b.to_vec(),
        None => m
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| vec![b'a' + (i % 26) as u8; c.size as usize])
            .collect(),
    };
    let mut restored = Vec::new();
    for (i, ((norm_off, _), d)) in m.chunk_offsets().zip(&data).enumerate() {
        let r = m.restore(norm_off, d.clone());
        let end = offsets.get(i + 1).copied().unwrap_or(m.nar_size);
        assert_eq!(
            r.len() as u64,
            end - offsets[i],
            "chunk {i} restores to the wrong length"
        );
        restored.extend_from_slice(&r);
    }
    assert_eq!(
        restored.len() as u64,
        m.nar_size,
        "restored NAR is not NarSize bytes"
    );
    let at_once = m.restore(0, data.concat());
    assert!(
        at_once == restored,
        "restoring at once differs from chunk by chunk"
    );
    Some(restored)
}

/// Store-path normalisation (both chunkings): restoring the slots gives back the input,
/// whatever it is, in one piece or any pieces; the streaming normaliser gives the same bytes
/// and slots however its reads are cut; a manifest built from it survives encode/decode and
/// its chunks restore to the input.
pub fn normalise(data: &[u8]) {
    let mut rng = Rng::from_bytes(data);
    // v1: hashes.
    let (norm, table) = normalise::normalise_bytes(data);
    assert_eq!(norm.len(), data.len(), "v1 changes the length");
    table
        .validate(data.len() as u64)
        .expect("v1 slots validate");
    let mut restored = norm.clone();
    table.restore(0, &mut restored);
    assert!(restored == data, "v1 restore(normalise(x)) != x");
    let mut at = 0usize;
    let mut pieced = Vec::new();
    for p in pieces(&norm, &mut rng, 80) {
        let mut p = p.to_vec();
        table.restore(at as u64, &mut p);
        at += p.len();
        pieced.extend_from_slice(&p);
    }
    assert!(pieced == data, "v1 restore piece by piece != x");

    // v2: whole references, taken from the input's own store paths (a real NAR's references
    // occur in it).
    let refs = references_in(data, &mut rng);
    let (norm2, inserts) = normalise::normalise_references(data, RefSet::from_paths(&refs));
    inserts.validate().expect("v2 slots validate");
    assert_eq!(inserts.norm_len, norm2.len() as u64);
    assert_eq!(
        norm2.len() as u64 + inserts.inserted_len(),
        data.len() as u64
    );
    assert!(
        inserts.restore(0, norm2.clone()) == data,
        "v2 restore(normalise(x)) != x"
    );
    let mut at = 0u64;
    let mut pieced = Vec::new();
    for p in pieces(&norm2, &mut rng, 80) {
        pieced.extend_from_slice(&inserts.restore(at, p.to_vec()));
        at += p.len() as u64;
    }
    assert!(pieced == data, "v2 restore piece by piece != x");

    for params in ChunkingParams::READ {
        let refs_set = || RefSet::from_paths(&refs);
        let streamed = Normaliser::of(
            Trickle::new(data, Rng::from_bytes(&norm)),
            params.normalisation,
            refs_set,
        );
        let mut n = streamed;
        let mut out = Vec::new();
        n.read_to_end(&mut out).expect("reading from memory");
        let (_, slots) = n.into_parts();
        match (&slots, params.normalisation) {
            (Slots::Hashes(t), Normalisation::Hashes) => {
                assert!(
                    out == norm && *t == table,
                    "streamed v1 differs from in-memory"
                )
            }
            (Slots::References(t), Normalisation::References) => {
                assert!(
                    out == norm2 && *t == inserts,
                    "streamed v2 differs from in-memory"
                )
            }
            _ => panic!("normaliser of the wrong mode"),
        }
        let mut norm_reader = Normaliser::of(data, params.normalisation, refs_set);
        let cut: Vec<Vec<u8>> = chunks(&mut norm_reader, params)
            .map(|c| c.expect("reading from memory").data)
            .collect();
        let (_, slots) = norm_reader.into_parts();
        let m = Manifest {
            nar_hash: NarHash::digest(data),
            nar_size: data.len() as u64,
            chunking: params.id,
            chunks: cut
                .iter()
                .map(|c| ChunkEntry {
                    id: crate::core::ChunkId::of(c),
                    size: c.len() as u32,
                })
                .collect(),
            slots,
        };
        let decoded = match Manifest::decode(&m.encode()) {
            Ok(d) => d,
            // An empty input has no chunks: NarSize 0 is refused by the narinfo anyway.
            Err(_) if data.is_empty() => continue,
            Err(e) => panic!("a built manifest does not decode: {e}"),
        };
        assert_eq!(decoded, m, "decode(encode(m)) != m for a built manifest");
        decoded
            .check_chunking()
            .expect("built chunks are within the chunking");
        if let Some(r) = check_restore(&decoded, Some(&cut)) {
            assert!(
                r == data,
                "chunks of a built manifest do not restore to the NAR"
            );
        }
    }
}

/// Store paths (`/nix/store/<hash>-<name>`) occurring in `data`, some of them.
fn references_in(data: &[u8], rng: &mut Rng) -> Vec<StorePath> {
    let mut out = Vec::new();
    let finder = memchr::memmem::Finder::new(normalise::PREFIX);
    for start in finder.find_iter(data) {
        let rest = &data[start + normalise::PREFIX.len()..];
        let len = rest
            .iter()
            .take(normalise::HASH_LEN + 1 + 211)
            .position(|&c| !crate::core::store_path::is_name_char(c))
            .unwrap_or(rest.len().min(normalise::HASH_LEN + 1 + 211));
        // Sometimes a shorter name: references need not end where the name chars do.
        let len = if rng.below(4) == 0 && len > normalise::HASH_LEN + 2 {
            normalise::HASH_LEN + 2 + rng.below((len - normalise::HASH_LEN - 2) as u64) as usize
        } else {
            len
        };
        if let Some(p) = std::str::from_utf8(&rest[..len])
            .ok()
            .and_then(|s| StorePath::from_base_name(s).ok())
        {
            if rng.below(4) != 0 {
                out.push(p);
            }
        }
        if out.len() >= 8 {
            break;
        }
    }
    out
}

/// A reader handing out its bytes in pseudo-random small reads (the normaliser's buffer
/// boundaries fall everywhere).
struct Trickle<'a> {
    data: &'a [u8],
    rng: Rng,
}

impl<'a> Trickle<'a> {
    fn new(data: &'a [u8], rng: Rng) -> Self {
        Self { data, rng }
    }
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (1 + self.rng.below(97) as usize)
            .min(buf.len())
            .min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The exchange codec: requests and responses decode without panic and re-encode to messages
/// that decode equal; a whole frame (prefix + body) is read back as its body, every truncation
/// of it is an error, and a limit one byte under its size refuses it as `InvalidData`; the
/// codec reads back what it writes.
pub fn codec(data: &[u8]) {
    use libp2p::request_response::Codec as _;

    if let Ok(req) = codec::decode_request(data) {
        let again = codec::decode_request(&req.encode_to_vec()).expect("re-encoded request");
        assert_eq!(again, req);
        check_frames(&req, data);
    }
    if let Ok(resp) = codec::decode_response(data) {
        let again = codec::decode_response(&resp.encode_to_vec()).expect("re-encoded response");
        assert_eq!(again, resp);
    }
    // The input as a frame, under a small limit and the real one.
    let mut rng = Rng::from_bytes(data);
    let small = 1 + rng.below(256) as usize;
    for max in [small, nix_p2p_cache_proto::MAX_MESSAGE_SIZE] {
        let got = block_on(async {
            let mut c = codec::ExchangeCodec::with_max_message_size(max);
            let mut io = libp2p::futures::io::Cursor::new(data);
            c.read_request(&protocol(), &mut io).await
        });
        let expected = reference_frame(data, max).and_then(|body| codec::decode_request(body).ok());
        match (got, expected) {
            (Ok(a), Some(b)) => assert_eq!(a, b),
            (Err(_), None) => {}
            (Ok(_), None) => panic!("the codec reads a frame the reference refuses"),
            (Err(e), Some(_)) => panic!("the codec refuses a frame the reference reads: {e}"),
        }
    }
}

/// The body of the frame at the start of `data` if its prefix is a varint of at most 5 bytes
/// and the body is whole and at most `max` bytes.
fn reference_frame(data: &[u8], max: usize) -> Option<&[u8]> {
    let mut len = 0u64;
    for (i, &b) in data.iter().take(5).enumerate() {
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let body = data.get(i + 1..)?;
            return (len <= max as u64)
                .then(|| body.get(..len as usize))
                .flatten();
        }
    }
    None
}

fn check_frames(req: &pb::Request, data: &[u8]) {
    use libp2p::request_response::Codec as _;

    let body = req.encode_to_vec();
    let frame = codec::encode_frame(req, body.len()).expect("within its own size");
    let mut written = Vec::new();
    block_on(async {
        let mut c = codec::ExchangeCodec::default();
        c.write_request(&protocol(), &mut written, req.clone())
            .await
            .expect("writing to memory")
    });
    assert_eq!(
        written, frame,
        "the codec writes another frame than encode_frame"
    );
    let read = |bytes: &[u8], max: usize| {
        block_on(async {
            let mut c = codec::ExchangeCodec::with_max_message_size(max);
            let mut io = libp2p::futures::io::Cursor::new(bytes);
            c.read_request(&protocol(), &mut io).await
        })
    };
    assert_eq!(read(&frame, body.len()).expect("a whole frame reads"), *req);
    let cut = Rng::from_bytes(data).below(frame.len() as u64) as usize;
    assert!(
        read(&frame[..cut], body.len()).is_err(),
        "a truncated frame was read"
    );
    if !body.is_empty() {
        let e = read(&frame, body.len() - 1).expect_err("an oversized frame was read");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(codec::encode_frame(req, body.len() - 1).is_err());
    }
}

fn protocol() -> libp2p::StreamProtocol {
    libp2p::StreamProtocol::new(nix_p2p_cache_proto::EXCHANGE_PROTOCOL)
}

/// One runtime for every target that needs one (a runtime per input would dominate the time).
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

#[cfg(test)]
mod corpus_replay;
