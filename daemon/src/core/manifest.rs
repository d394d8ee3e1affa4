//! `Manifest`: how a NAR is rebuilt from chunks (design §2), and its prost encoding.
//!
//! A manifest's identity is its NAR key; its integrity is proven only by the reassembled NAR
//! hashing to `nar_hash`. `decode` checks everything that can be checked without the chunks:
//! sizes add up, slots are in range and ordered, ids are chunk CIDs. Pure code, no I/O.

use nix_p2p_cache_proto::v1 as pb;
use prost::Message;

use super::chunker::ChunkingParams;
use super::hash::{ChunkId, HashError, NarHash};
use super::normalise::{HashBytes, InsertTable, Normalisation, SlotError, SlotTable, Slots};

/// Errors when decoding or checking a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not a valid protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("manifest nar_hash is not a 32-byte sha256 digest")]
    BadNarHash,
    #[error("manifest chunk {index}: {source}")]
    BadChunkId { index: usize, source: HashError },
    #[error("manifest chunk {index} is empty")]
    EmptyChunk { index: usize },
    #[error("manifest chunk sizes and slots add up to {sum}, but nar_size is {nar_size}")]
    SizeMismatch { sum: u64, nar_size: u64 },
    #[error("manifest store-path slots: {0}")]
    Slots(#[from] SlotError),
    #[error("manifest uses unknown chunking parameters id {0}")]
    UnknownChunking(u32),
    #[error("manifest of another NAR (NarHash or NarSize differ from the narinfo's)")]
    OtherNar,
    #[error("manifest chunk {index} is {size} bytes, more than the chunking maximum {max}")]
    ChunkTooLarge { index: usize, size: u32, max: u32 },
}

/// A chunk entry: id and uncompressed length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    pub id: ChunkId,
    pub size: u32,
}

/// The recipe of one NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub chunking: u32,
    pub chunks: Vec<ChunkEntry>,
    pub slots: Slots,
}

impl Manifest {
    /// Offsets of each chunk in the normalised stream, in order (NAR offsets for chunking v1).
    pub fn chunk_offsets(&self) -> impl Iterator<Item = (u64, &ChunkEntry)> {
        self.chunks.iter().scan(0u64, |off, c| {
            let o = *off;
            *off += c.size as u64;
            Some((o, c))
        })
    }

    /// The NAR offset at which each chunk starts once restored.
    pub fn nar_offsets(&self) -> Vec<u64> {
        self.slots.nar_offsets(self.chunk_offsets().map(|(o, _)| o))
    }

    /// Restores chunk bytes `data` (normalised, at stream offset `offset`) to NAR bytes.
    pub fn restore(&self, offset: u64, data: Vec<u8>) -> Vec<u8> {
        self.slots.restore(offset, data)
    }

    /// Checks that this build reads the manifest's chunking: a known parameter id, and every
    /// chunk within its maximum (a peer's manifest sizes the buffers its blocks are
    /// decompressed into). The last chunk, and a NAR smaller than the minimum, may be short.
    pub fn check_chunking(&self) -> Result<(), ManifestError> {
        let params = ChunkingParams::by_id(self.chunking)
            .ok_or(ManifestError::UnknownChunking(self.chunking))?;
        for (index, c) in self.chunks.iter().enumerate() {
            if c.size > params.max {
                return Err(ManifestError::ChunkTooLarge {
                    index,
                    size: c.size,
                    max: params.max,
                });
            }
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let (strings, offsets, index): (Vec<String>, &[u64], &[u32]) = match &self.slots {
            Slots::Hashes(t) => (
                t.hashes
                    .iter()
                    .map(|h| String::from_utf8_lossy(h).into_owned())
                    .collect(),
                &t.offsets,
                &t.hash_index,
            ),
            Slots::References(t) => (
                t.strings
                    .iter()
                    .map(|h| String::from_utf8_lossy(h).into_owned())
                    .collect(),
                &t.offsets,
                &t.index,
            ),
        };
        let mut prev = 0u64;
        let offset_deltas = offsets
            .iter()
            .map(|&o| {
                let d = o.saturating_sub(prev);
                prev = o;
                d
            })
            .collect();
        pb::NarManifest {
            nar_hash: self.nar_hash.0.to_vec(),
            nar_size: self.nar_size,
            chunking: self.chunking,
            chunks: self
                .chunks
                .iter()
                .map(|c| pb::ChunkRef {
                    id: c.id.to_cid_bytes().to_vec(),
                    size: c.size,
                })
                .collect(),
            store_path_slots: Some(pb::StorePathSlots {
                hashes: strings,
                offset_deltas,
                hash_index: index.to_vec(),
            }),
        }
        .encode_to_vec()
    }

    /// Decodes and checks a manifest (from our own store or from a peer).
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m = pb::NarManifest::decode(bytes)?;
        let nar_hash = NarHash::from_slice(&m.nar_hash).ok_or(ManifestError::BadNarHash)?;
        let chunks = m
            .chunks
            .iter()
            .enumerate()
            .map(|(index, c)| {
                if c.size == 0 {
                    return Err(ManifestError::EmptyChunk { index });
                }
                let id = ChunkId::from_cid_bytes(&c.id)
                    .map_err(|source| ManifestError::BadChunkId { index, source })?;
                Ok(ChunkEntry { id, size: c.size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let params =
            ChunkingParams::by_id(m.chunking).ok_or(ManifestError::UnknownChunking(m.chunking))?;
        let sum: u64 = chunks.iter().map(|c| c.size as u64).sum();
        let s = m.store_path_slots.unwrap_or_default();
        let mut offsets = Vec::with_capacity(s.offset_deltas.len());
        let mut acc = 0u64;
        for (slot, d) in s.offset_deltas.iter().enumerate() {
            acc = acc.checked_add(*d).ok_or(SlotError::OutOfRange {
                slot,
                offset: u64::MAX,
                nar_size: m.nar_size,
            })?;
            offsets.push(acc);
        }
        let slots = match params.normalisation {
            Normalisation::Hashes => {
                if sum != m.nar_size {
                    return Err(ManifestError::SizeMismatch {
                        sum,
                        nar_size: m.nar_size,
                    });
                }
                let hashes = s
                    .hashes
                    .iter()
                    .map(|h| {
                        <HashBytes>::try_from(h.as_bytes())
                            .map_err(|_| SlotError::BadHash(h.clone()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let t = SlotTable {
                    hashes,
                    offsets,
                    hash_index: s.hash_index,
                };
                t.validate(m.nar_size)?;
                Slots::Hashes(t)
            }
            Normalisation::References => {
                let t = InsertTable {
                    strings: s.hashes.into_iter().map(String::into_bytes).collect(),
                    offsets,
                    index: s.hash_index,
                    norm_len: sum,
                };
                t.validate()?;
                let restored = sum.saturating_add(t.inserted_len());
                if restored != m.nar_size {
                    return Err(ManifestError::SizeMismatch {
                        sum: restored,
                        nar_size: m.nar_size,
                    });
                }
                Slots::References(t)
            }
        };
        Ok(Self {
            nar_hash,
            nar_size: m.nar_size,
            chunking: m.chunking,
            chunks,
            slots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::chunker::{chunks, ChunkingParams};
    use crate::core::normalise::{Normaliser, RefSet};
    use crate::core::store_path::StorePath;
    use proptest::prelude::*;

    const GLIBC: &str = "7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc";

    fn build(data: &[u8], params: ChunkingParams) -> Manifest {
        let glibc = StorePath::from_base_name(GLIBC).unwrap();
        let mut norm = Normaliser::of(data, params.normalisation, || RefSet::from_paths([&glibc]));
        let cs: Vec<_> = chunks(&mut norm, params)
            .map(|c| {
                let c = c.unwrap();
                ChunkEntry {
                    id: c.id(),
                    size: c.data.len() as u32,
                }
            })
            .collect();
        let (_, slots) = norm.into_parts();
        Manifest {
            nar_hash: NarHash::digest(data),
            nar_size: data.len() as u64,
            chunking: params.id,
            chunks: cs,
            slots,
        }
    }

    #[test]
    fn rejects_inconsistent_manifests() {
        let data = format!("x /nix/store/{GLIBC} y").repeat(100).into_bytes();
        for params in [ChunkingParams::V1, ChunkingParams::V2] {
            let m = build(&data, params);
            assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
            let mut bad = m.clone();
            bad.nar_size += 1;
            assert!(matches!(
                Manifest::decode(&bad.encode()),
                Err(ManifestError::SizeMismatch { .. })
            ));
            let mut bad = m.clone();
            match &mut bad.slots {
                Slots::Hashes(t) => t.offsets[3] = t.offsets[2],
                Slots::References(t) => t.index[3] = 99,
            }
            assert!(matches!(
                Manifest::decode(&bad.encode()),
                Err(ManifestError::Slots(_))
            ));
            assert!(m.check_chunking().is_ok());
            let mut bad = m.clone();
            bad.chunking = 77;
            assert!(matches!(
                bad.check_chunking(),
                Err(ManifestError::UnknownChunking(77))
            ));
            assert!(matches!(
                Manifest::decode(&bad.encode()),
                Err(ManifestError::UnknownChunking(77))
            ));
            let mut bad = m.clone();
            bad.chunks[0].size = params.max + 1;
            assert!(matches!(
                bad.check_chunking(),
                Err(ManifestError::ChunkTooLarge { index: 0, .. })
            ));
            let mut pbm = pb::NarManifest::decode(&m.encode()[..]).unwrap();
            pbm.chunks[0].id = vec![1, 2, 3];
            assert!(matches!(
                Manifest::decode(&pbm.encode_to_vec()),
                Err(ManifestError::BadChunkId { index: 0, .. })
            ));
        }
        assert!(matches!(
            Manifest::decode(b"\xff\xff\xff"),
            Err(ManifestError::Decode(_))
        ));
    }

    #[test]
    fn v2_manifests_restore_renamed_references() {
        let data: Vec<u8> = (0..3000u32)
            .flat_map(|i| format!("{i}: rpath=/nix/store/{GLIBC}/lib {}\n", i * 7919).into_bytes())
            .collect();
        let small = ChunkingParams {
            min: 64,
            avg: 256,
            max: 1024,
            ..ChunkingParams::V2
        };
        let m = build(&data, small);
        assert!(m.chunks.len() > 1);
        let sum: u64 = m.chunks.iter().map(|c| c.size as u64).sum();
        assert!(sum < m.nar_size, "references are cut out of the stream");
        // Rebuild from the chunks' normalised bytes.
        let glibc = StorePath::from_base_name(GLIBC).unwrap();
        let mut norm = Vec::new();
        std::io::Read::read_to_end(
            &mut Normaliser::with_references(&data[..], RefSet::from_paths([&glibc])),
            &mut norm,
        )
        .unwrap();
        let mut out = Vec::new();
        for ((o, c), nar_off) in m.chunk_offsets().zip(m.nar_offsets()) {
            assert_eq!(nar_off, out.len() as u64);
            let piece = norm[o as usize..o as usize + c.size as usize].to_vec();
            assert_eq!(ChunkId::of(&piece), c.id);
            out.extend(m.restore(o, piece));
        }
        assert_eq!(out, data);
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(
            body in proptest::collection::vec(any::<u8>(), 0..5000),
            n in 0usize..20,
            v2 in any::<bool>(),
        ) {
            let mut data = body;
            for i in 0..n {
                data.extend_from_slice(format!("/nix/store/{}-p{i} ", "0123456789abcdfghijklmnpqrsvwxyz").as_bytes());
                data.extend_from_slice(format!("/nix/store/{GLIBC}/lib").as_bytes());
            }
            let base = if v2 { ChunkingParams::V2 } else { ChunkingParams::V1 };
            let small = ChunkingParams { min: 64, avg: 256, max: 1024, ..base };
            let m = build(&data, small);
            prop_assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        }
    }
}
