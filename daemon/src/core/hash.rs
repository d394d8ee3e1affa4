//! Content identifiers: `NarHash` (sha256 of a NAR, as narinfo spells it), `NarKey` (its CID),
//! and `ChunkId` (CIDv1 raw + BLAKE3-256 of a normalised chunk). See design §2.
//!
//! Pure code, no I/O.

use std::fmt;

use cid::Cid;
use multihash::Multihash;

use super::base32;

/// Multicodec `raw`.
pub const RAW_CODEC: u64 = 0x55;
/// Multihash code of sha2-256.
pub const SHA2_256: u64 = 0x12;
/// Multihash code of BLAKE3 (256-bit output).
pub const BLAKE3: u64 = 0x1e;

/// Errors when parsing hashes and ids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("hash {0:?} is not of the form sha256:<digest>")]
    NotSha256(String),
    #[error("sha256 digest {0:?} is neither 52 nix-base32, 64 hex nor base64 characters")]
    BadDigest(String),
    #[error("invalid CID: {0}")]
    BadCid(String),
    #[error("CID has codec {codec:#x} / multihash {hash:#x}, expected raw/{expected:#x}")]
    WrongCidKind {
        codec: u64,
        hash: u64,
        expected: u64,
    },
}

/// sha256 digest of a whole NAR (the narinfo's `NarHash`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NarHash(pub [u8; 32]);

impl NarHash {
    /// Parses `sha256:<nix-base32 | hex>` or the SRI form `sha256-<base64>`.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        use base64::Engine as _;
        let digest = if let Some(d) = s.strip_prefix("sha256:") {
            d
        } else if let Some(d) = s.strip_prefix("sha256-") {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(d)
                .map_err(|_| HashError::BadDigest(d.to_string()))?;
            return Self::from_slice(&bytes).ok_or_else(|| HashError::BadDigest(d.to_string()));
        } else {
            return Err(HashError::NotSha256(s.to_string()));
        };
        Self::parse_digest(digest)
    }

    /// Parses a bare digest: 52 nix-base32 or 64 hex characters.
    pub fn parse_digest(d: &str) -> Result<Self, HashError> {
        let bytes = match d.len() {
            52 => base32::decode_len(d, 32).map_err(|_| HashError::BadDigest(d.to_string()))?,
            64 => hex::decode(d).map_err(|_| HashError::BadDigest(d.to_string()))?,
            _ => return Err(HashError::BadDigest(d.to_string())),
        };
        Self::from_slice(&bytes).ok_or_else(|| HashError::BadDigest(d.to_string()))
    }

    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(Self(b.try_into().ok()?))
    }

    /// sha256 of `data`.
    pub fn digest(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(sha2::Sha256::digest(data).into())
    }

    /// The 52-character nix-base32 digest (as used in `nar/<digest>.nar` URLs).
    pub fn to_base32(&self) -> String {
        base32::encode(&self.0)
    }

    /// The NAR key: CIDv1 raw with sha2-256 multihash of this digest.
    pub fn nar_key(&self) -> NarKey {
        NarKey(*self)
    }
}

impl fmt::Display for NarHash {
    /// `sha256:<nix-base32>`, the narinfo form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_base32())
    }
}

impl fmt::Debug for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarHash({self})")
    }
}

/// CID of a NAR (design §2): CIDv1, codec raw, multihash sha2-256 over the NarHash digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NarKey(pub NarHash);

impl NarKey {
    pub fn cid(&self) -> Cid {
        let mh = Multihash::<64>::wrap(SHA2_256, &self.0 .0).expect("32-byte digest fits");
        Cid::new_v1(RAW_CODEC, mh)
    }

    /// Multihash bytes `0x12 0x20 ‖ digest`: the DHT provider key.
    pub fn multihash_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(34);
        v.extend_from_slice(&[0x12, 0x20]);
        v.extend_from_slice(&self.0 .0);
        v
    }

    pub fn parse(s: &str) -> Result<Self, HashError> {
        let digest = parse_cid(s, SHA2_256)?;
        Ok(Self(NarHash(digest)))
    }
}

impl fmt::Display for NarKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cid())
    }
}

impl fmt::Debug for NarKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarKey({self})")
    }
}

/// Id of a chunk: BLAKE3-256 of its (normalised, uncompressed) bytes, shown as a CIDv1 raw.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Number of bytes of the binary CID form: version, codec, mh code, mh len, digest.
    pub const CID_LEN: usize = 36;
    const CID_PREFIX: [u8; 4] = [0x01, 0x55, 0x1e, 0x20];

    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    pub fn cid(&self) -> Cid {
        let mh = Multihash::<64>::wrap(BLAKE3, &self.0).expect("32-byte digest fits");
        Cid::new_v1(RAW_CODEC, mh)
    }

    /// Binary CID bytes (36 bytes), as carried in manifests and on the wire.
    pub fn to_cid_bytes(&self) -> [u8; Self::CID_LEN] {
        let mut out = [0u8; Self::CID_LEN];
        out[..4].copy_from_slice(&Self::CID_PREFIX);
        out[4..].copy_from_slice(&self.0);
        out
    }

    /// Parses binary CID bytes; only CIDv1 raw + BLAKE3-256 is a chunk id.
    pub fn from_cid_bytes(b: &[u8]) -> Result<Self, HashError> {
        if b.len() == Self::CID_LEN && b[..4] == Self::CID_PREFIX {
            let mut d = [0u8; 32];
            d.copy_from_slice(&b[4..]);
            return Ok(Self(d));
        }
        let cid = Cid::try_from(b).map_err(|e| HashError::BadCid(e.to_string()))?;
        Self::from_cid(&cid)
    }

    pub fn from_cid(cid: &Cid) -> Result<Self, HashError> {
        let d = check_cid(cid, BLAKE3)?;
        Ok(Self(d))
    }

    pub fn parse(s: &str) -> Result<Self, HashError> {
        Ok(Self(parse_cid(s, BLAKE3)?))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cid())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

fn parse_cid(s: &str, expected: u64) -> Result<[u8; 32], HashError> {
    let cid = Cid::try_from(s).map_err(|e| HashError::BadCid(e.to_string()))?;
    check_cid(&cid, expected)
}

fn check_cid(cid: &Cid, expected: u64) -> Result<[u8; 32], HashError> {
    let mh = cid.hash();
    if cid.version() != cid::Version::V1 || cid.codec() != RAW_CODEC || mh.code() != expected {
        return Err(HashError::WrongCidKind {
            codec: cid.codec(),
            hash: mh.code(),
            expected,
        });
    }
    mh.digest()
        .try_into()
        .map_err(|_| HashError::BadCid("digest is not 32 bytes".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nar_hash_forms() {
        let h =
            NarHash::parse("sha256:1ddv0iqq47j0awyw7a8dmm8bz71c6ifrliq53kmmsfzjxf3rwvb8").unwrap();
        assert_eq!(
            h.to_string(),
            "sha256:1ddv0iqq47j0awyw7a8dmm8bz71c6ifrliq53kmmsfzjxf3rwvb8"
        );
        let hexd = hex::encode(h.0);
        assert_eq!(NarHash::parse(&format!("sha256:{hexd}")).unwrap(), h);
        assert!(NarHash::parse("md5:abc").is_err());
        assert!(NarHash::parse("sha256:xyz").is_err());
        // Empty-input digest: known hex and nix-base32 forms agree.
        assert_eq!(
            NarHash::digest(b"").to_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn cid_round_trips() {
        let c = ChunkId::of(b"hello");
        let s = c.to_string();
        assert!(s.starts_with('b'), "multibase base32 lower: {s}");
        assert_eq!(ChunkId::parse(&s).unwrap(), c);
        assert_eq!(ChunkId::from_cid_bytes(&c.to_cid_bytes()).unwrap(), c);
        assert_eq!(c.cid().to_bytes(), c.to_cid_bytes().to_vec());
        let k = NarHash::digest(b"x").nar_key();
        assert_eq!(NarKey::parse(&k.to_string()).unwrap(), k);
        assert_eq!(&k.cid().hash().to_bytes(), &k.multihash_bytes());
        // A NAR key is not a chunk id and vice versa.
        assert!(ChunkId::parse(&k.to_string()).is_err());
        assert!(NarKey::parse(&s).is_err());
    }
}
