//! Content-defined chunking (design §2): FastCDC 2020 over the normalised NAR stream.
//!
//! The parameter sets are protocol constants: a manifest names the set it was cut with, and
//! changing a set means a new id. Pure code: no I/O beyond the `Read` handed in.

use std::io::{self, Read};

use fastcdc::v2020::StreamCDC;

use super::hash::ChunkId;
use super::normalise::Normalisation;

/// A named FastCDC parameter set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkingParams {
    /// Id recorded in manifests (`NarManifest.chunking`).
    pub id: u32,
    pub min: u32,
    pub avg: u32,
    pub max: u32,
    /// What is cut out of the NAR before chunking.
    pub normalisation: Normalisation,
}

impl ChunkingParams {
    /// Frozen v1 parameters: FastCDC 2020, min 32 KiB / avg 128 KiB / max 512 KiB,
    /// normalisation level 1 (the crate's default). Chosen from measurements of 32/64/128 KiB
    /// on multi-generation closures: `docs/chunking.md`.
    pub const V1: Self = Self {
        id: 1,
        min: 32 * 1024,
        avg: 128 * 1024,
        max: 512 * 1024,
        normalisation: Normalisation::Hashes,
    };

    /// v2: the v1 FastCDC parameters over a stream with whole references cut out (hash and
    /// name), so renamed dependencies dedup too: `docs/chunking.md`. What this build writes.
    pub const V2: Self = Self {
        id: 2,
        normalisation: Normalisation::References,
        ..Self::V1
    };

    /// The parameters new manifests are cut with.
    pub const CURRENT: Self = Self::V2;

    /// Candidates measured before freezing v1 (ids above 1000 are never written to a store).
    pub const CANDIDATES: [Self; 3] = [
        Self {
            id: 1032,
            min: 8 * 1024,
            avg: 32 * 1024,
            max: 128 * 1024,
            normalisation: Normalisation::Hashes,
        },
        Self {
            id: 1064,
            min: 16 * 1024,
            avg: 64 * 1024,
            max: 256 * 1024,
            normalisation: Normalisation::Hashes,
        },
        Self::V1,
    ];

    /// The parameter sets this build rebuilds NARs from.
    pub const READ: [Self; 2] = [Self::V1, Self::V2];

    /// The parameter set a manifest's id names, if this build reads it.
    pub fn by_id(id: u32) -> Option<Self> {
        Self::READ.into_iter().find(|p| p.id == id)
    }
}

/// One chunk of the normalised stream.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Offset of the chunk in the stream.
    pub offset: u64,
    pub data: Vec<u8>,
}

impl Chunk {
    pub fn id(&self) -> ChunkId {
        ChunkId::of(&self.data)
    }
}

/// Cuts `source` into chunks. A stream shorter than `min` is one chunk; an empty stream none.
pub fn chunks<R: Read>(
    source: R,
    params: ChunkingParams,
) -> impl Iterator<Item = io::Result<Chunk>> {
    StreamCDC::new(source, params.min, params.avg, params.max).map(|r| {
        r.map(|c| Chunk {
            offset: c.offset,
            data: c.data,
        })
        .map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            other => io::Error::other(other.to_string()),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::normalise::{Normaliser, RefSet};
    use crate::core::store_path::StorePath;
    use proptest::prelude::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn sizes_respect_params_and_cover_input() {
        let data = pseudo_random(6 * 1024 * 1024, 7);
        let p = ChunkingParams::V1;
        let cs: Vec<Chunk> = chunks(&data[..], p).map(Result::unwrap).collect();
        let mut off = 0u64;
        for (i, c) in cs.iter().enumerate() {
            assert_eq!(c.offset, off);
            assert!(c.data.len() <= p.max as usize);
            if i + 1 < cs.len() {
                assert!(c.data.len() >= p.min as usize);
            }
            off += c.data.len() as u64;
        }
        assert_eq!(off, data.len() as u64);
        let avg = data.len() / cs.len();
        let target = p.avg as usize;
        assert!((target / 2..target * 2).contains(&avg), "average {avg}");
    }

    #[test]
    fn small_and_empty_inputs() {
        assert_eq!(chunks(&b""[..], ChunkingParams::V1).count(), 0);
        let small = pseudo_random(1000, 3);
        let cs: Vec<_> = chunks(&small[..], ChunkingParams::V1).collect();
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].as_ref().unwrap().data, small);
    }

    #[test]
    fn insertion_only_disturbs_nearby_chunks() {
        let a = pseudo_random(4 * 1024 * 1024, 11);
        let mut b = a.clone();
        b.splice(1_000_000..1_000_000, b"inserted bytes".iter().copied());
        let ids = |d: &[u8]| -> std::collections::HashSet<ChunkId> {
            chunks(d, ChunkingParams::V1)
                .map(|c| c.unwrap().id())
                .collect()
        };
        let (ia, ib) = (ids(&a), ids(&b));
        let shared = ia.intersection(&ib).count();
        assert!(shared + 3 >= ia.len(), "{shared} of {} shared", ia.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// normalise → chunk → restore each chunk → concatenate is the identity, with hashes
        /// anywhere (start, end, cut by chunk boundaries).
        #[test]
        fn normalise_chunk_restore_identity(
            seed in any::<u64>(),
            len in 0usize..400_000,
            at in proptest::collection::vec(any::<prop::sample::Index>(), 0..50),
        ) {
            let mut data = pseudo_random(len, seed);
            let path = b"/nix/store/7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc";
            if len >= path.len() {
                let span = len - path.len() + 1;
                for ix in &at {
                    let p = ix.index(span);
                    data[p..p + path.len()].copy_from_slice(path);
                }
                data[..path.len()].copy_from_slice(path);
                data[len - path.len()..].copy_from_slice(path);
            }
            let small = ChunkingParams { id: 0, min: 64, avg: 256, max: 1024, normalisation: Normalisation::Hashes };
            let glibc = StorePath::from_base_name("7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc").unwrap();
            for params in [small, ChunkingParams::V1, ChunkingParams::V2] {
                let mut norm = Normaliser::of(&data[..], params.normalisation, || {
                    RefSet::from_paths([&glibc])
                });
                let cs: Vec<Chunk> = chunks(&mut norm, params).map(Result::unwrap).collect();
                let (_, slots) = norm.into_parts();
                let nar_offsets = slots.nar_offsets(cs.iter().map(|c| c.offset));
                let mut out = Vec::with_capacity(len);
                let mut norm_off = 0u64;
                for (c, nar_off) in cs.into_iter().zip(nar_offsets) {
                    prop_assert_eq!(c.offset, norm_off);
                    prop_assert_eq!(nar_off, out.len() as u64);
                    norm_off += c.data.len() as u64;
                    out.extend(slots.restore(c.offset, c.data));
                }
                prop_assert_eq!(&out, &data);
            }
        }
    }
}
