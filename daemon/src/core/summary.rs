//! `PathFilter`: a Bloom filter over store-path hashes, the summary a node sends its peers of
//! the paths it shares (`PathSummary` in the exchange protocol, `docs/protocol.md`), so that a
//! narinfo is asked only of the peers that may hold it. Pure code.
//!
//! Bit `i` is bit `i % 8` of byte `i / 8`; a hash sets bits `(h1 + j·h2) mod m` for `j <
//! hashes`, where `h1`, `h2` are the first two little-endian u64 of BLAKE3 of the 32-character
//! hash string. No false negatives; false positives at about the rate the filter was sized for.

use super::store_path::StorePathHash;

/// Largest filter accepted from a peer or built here (bytes): 1 MiB, ~900 000 paths at 1 %.
pub const MAX_FILTER_BYTES: usize = 1 << 20;
/// Most hash functions accepted.
pub const MAX_HASHES: u32 = 16;
/// False-positive rate filters are sized for.
pub const TARGET_FP_RATE: f64 = 0.01;

/// Why a received filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("summary filter of {0} bytes (1..={MAX_FILTER_BYTES} allowed)")]
    Size(usize),
    #[error("summary filter with {0} hash functions (1..={MAX_HASHES} allowed)")]
    Hashes(u32),
}

/// A Bloom filter over store-path hashes; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathFilter {
    bits: Vec<u8>,
    hashes: u32,
}

fn indexes(hash: &StorePathHash, m: u64, k: u32) -> impl Iterator<Item = u64> {
    let d = blake3::hash(hash.as_str().as_bytes());
    let b = d.as_bytes();
    let h1 = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let h2 = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")) | 1;
    (0..u64::from(k)).map(move |j| h1.wrapping_add(j.wrapping_mul(h2)) % m)
}

impl PathFilter {
    /// An empty filter sized for `items` paths at [`TARGET_FP_RATE`] (capped at
    /// [`MAX_FILTER_BYTES`]: past that the rate grows).
    pub fn with_capacity(items: usize) -> Self {
        let n = items.max(1) as f64;
        let ln2 = std::f64::consts::LN_2;
        let m_bits = (-n * TARGET_FP_RATE.ln() / (ln2 * ln2)).ceil().max(64.0);
        let bytes = ((m_bits / 8.0).ceil() as usize).clamp(8, MAX_FILTER_BYTES);
        let k = ((bytes as f64 * 8.0 / n) * ln2).round() as u32;
        Self {
            bits: vec![0; bytes],
            hashes: k.clamp(1, MAX_HASHES),
        }
    }

    /// A filter received from a peer, checked.
    pub fn from_parts(bits: Vec<u8>, hashes: u32) -> Result<Self, FilterError> {
        if bits.is_empty() || bits.len() > MAX_FILTER_BYTES {
            return Err(FilterError::Size(bits.len()));
        }
        if hashes == 0 || hashes > MAX_HASHES {
            return Err(FilterError::Hashes(hashes));
        }
        Ok(Self { bits, hashes })
    }

    pub fn bits(&self) -> &[u8] {
        &self.bits
    }

    pub fn hashes(&self) -> u32 {
        self.hashes
    }

    fn m(&self) -> u64 {
        self.bits.len() as u64 * 8
    }

    pub fn insert(&mut self, hash: &StorePathHash) {
        for i in indexes(hash, self.m(), self.hashes) {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    /// The filter's generation as peers compare it: the first 8 bytes of BLAKE3 of its bits
    /// (never 0, which means "none"): it changes with the set and survives restarts.
    pub fn generation(&self) -> u64 {
        let d = blake3::hash(&self.bits);
        u64::from_le_bytes(d.as_bytes()[..8].try_into().expect("8 bytes")) | 1
    }

    /// `false`: the path is certainly not in the set.
    pub fn may_contain(&self, hash: &StorePathHash) -> bool {
        indexes(hash, self.m(), self.hashes)
            .all(|i| self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u32) -> StorePathHash {
        const ALPHA: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
        let mut s = String::new();
        let mut x = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xdead_beef;
        for _ in 0..32 {
            s.push(ALPHA[(x % 32) as usize] as char);
            x = x.rotate_left(5).wrapping_mul(31).wrapping_add(7);
        }
        StorePathHash::parse(&s).unwrap()
    }

    #[test]
    fn no_false_negatives_and_about_the_target_rate() {
        let mut f = PathFilter::with_capacity(5000);
        for i in 0..5000 {
            f.insert(&hash(i));
        }
        assert!((0..5000).all(|i| f.may_contain(&hash(i))));
        let fp = (100_000..120_000)
            .filter(|&i| f.may_contain(&hash(i)))
            .count();
        assert!(fp < 20_000 * 3 / 100, "{fp} false positives of 20000");
        let g = PathFilter::from_parts(f.bits().to_vec(), f.hashes()).unwrap();
        assert_eq!(g, f);
    }

    #[test]
    fn received_filters_are_bounded() {
        assert_eq!(PathFilter::from_parts(vec![], 3), Err(FilterError::Size(0)));
        assert!(PathFilter::from_parts(vec![0; MAX_FILTER_BYTES + 1], 3).is_err());
        assert_eq!(
            PathFilter::from_parts(vec![0; 8], 0),
            Err(FilterError::Hashes(0))
        );
        assert!(PathFilter::from_parts(vec![0; 8], MAX_HASHES + 1).is_err());
        let huge = PathFilter::with_capacity(100_000_000);
        assert_eq!(huge.bits().len(), MAX_FILTER_BYTES);
        assert!(!PathFilter::with_capacity(0).may_contain(&hash(1)));
    }
}
