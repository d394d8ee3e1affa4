//! `Manifest`: how a NAR is rebuilt from chunks (design §2), and its prost encoding.
//!
//! A manifest's identity is its NAR key; its integrity is proven only by the reassembled NAR
//! hashing to `nar_hash`. `decode` checks everything that can be checked without the chunks:
//! sizes add up, slots are in range and ordered, ids are chunk CIDs. Pure code, no I/O.

use nix_p2p_cache_proto::v1 as pb;
use prost::Message;

use super::chunker::ChunkingParams;
use super::hash::{ChunkId, HashError, NarHash};
use super::normalise::{HashBytes, SlotError, SlotTable, HASH_LEN};

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
    #[error("manifest chunk sizes add up to {sum}, but nar_size is {nar_size}")]
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
    pub slots: SlotTable,
}

impl Manifest {
    /// Offsets of each chunk in the NAR, in order.
    pub fn chunk_offsets(&self) -> impl Iterator<Item = (u64, &ChunkEntry)> {
        self.chunks.iter().scan(0u64, |off, c| {
            let o = *off;
            *off += c.size as u64;
            Some((o, c))
        })
    }

    /// Checks that the manifest was cut with `params`: the same parameter id, and every chunk
    /// within the maximum (a peer's manifest sizes the buffers its blocks are decompressed
    /// into). The last chunk, and a NAR smaller than the minimum, may be short.
    pub fn check_chunking(&self, params: &ChunkingParams) -> Result<(), ManifestError> {
        if self.chunking != params.id {
            return Err(ManifestError::UnknownChunking(self.chunking));
        }
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
        let mut prev = 0u64;
        let offset_deltas = self
            .slots
            .offsets
            .iter()
            .map(|&o| {
                let d = o - prev;
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
                hashes: self
                    .slots
                    .hashes
                    .iter()
                    .map(|h| String::from_utf8_lossy(h).into_owned())
                    .collect(),
                offset_deltas,
                hash_index: self.slots.hash_index.clone(),
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
        let sum: u64 = chunks.iter().map(|c| c.size as u64).sum();
        if sum != m.nar_size {
            return Err(ManifestError::SizeMismatch {
                sum,
                nar_size: m.nar_size,
            });
        }
        let s = m.store_path_slots.unwrap_or_default();
        let hashes = s
            .hashes
            .iter()
            .map(|h| <HashBytes>::try_from(h.as_bytes()).map_err(|_| SlotError::BadHash(h.clone())))
            .collect::<Result<Vec<_>, _>>()?;
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
        let slots = SlotTable {
            hashes,
            offsets,
            hash_index: s.hash_index,
        };
        slots.validate(m.nar_size)?;
        debug_assert!(slots.hashes.iter().all(|h| h.len() == HASH_LEN));
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
    use crate::core::normalise::Normaliser;
    use proptest::prelude::*;

    fn build(data: &[u8], params: ChunkingParams) -> Manifest {
        let mut norm = Normaliser::new(data);
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
        let data = b"x /nix/store/7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc y".repeat(100);
        let m = build(&data, ChunkingParams::V1);
        let mut bad = m.clone();
        bad.nar_size += 1;
        assert!(matches!(
            Manifest::decode(&bad.encode()),
            Err(ManifestError::SizeMismatch { .. })
        ));
        let mut bad = m.clone();
        bad.slots.offsets[3] = bad.slots.offsets[2];
        assert!(matches!(
            Manifest::decode(&bad.encode()),
            Err(ManifestError::Slots(_))
        ));
        assert!(matches!(
            Manifest::decode(b"\xff\xff\xff"),
            Err(ManifestError::Decode(_))
        ));
        assert!(m.check_chunking(&ChunkingParams::V1).is_ok());
        let mut bad = m.clone();
        bad.chunking = 77;
        assert!(matches!(
            bad.check_chunking(&ChunkingParams::V1),
            Err(ManifestError::UnknownChunking(77))
        ));
        let mut bad = m.clone();
        bad.chunks[0].size = ChunkingParams::V1.max + 1;
        assert!(matches!(
            bad.check_chunking(&ChunkingParams::V1),
            Err(ManifestError::ChunkTooLarge { index: 0, .. })
        ));
        let mut pbm = pb::NarManifest::decode(&m.encode()[..]).unwrap();
        pbm.chunks[0].id = vec![1, 2, 3];
        assert!(matches!(
            Manifest::decode(&pbm.encode_to_vec()),
            Err(ManifestError::BadChunkId { index: 0, .. })
        ));
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(
            body in proptest::collection::vec(any::<u8>(), 0..5000),
            n in 0usize..20,
        ) {
            let mut data = body;
            for i in 0..n {
                data.extend_from_slice(format!("/nix/store/{}-p{i} ", "0123456789abcdfghijklmnpqrsvwxyz").as_bytes());
            }
            let small = ChunkingParams { id: 0, min: 64, avg: 256, max: 1024 };
            let m = build(&data, small);
            prop_assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        }
    }
}
