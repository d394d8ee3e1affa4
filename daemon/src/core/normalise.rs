//! Store-path normalisation (design §2): before chunking, the 32-character hash of every
//! `/nix/store/<hash>` occurrence is replaced by a fixed placeholder of the same length, and its
//! position recorded as a slot; reassembly writes the hashes back. A mass rebuild that only
//! changes dependency hashes then produces the same normalised bytes, hence the same chunks.
//!
//! The transform is streaming ([`Normaliser`] is a `Read` adapter with a bounded buffer) and
//! exact: restoring the slots into the normalised bytes gives back the input, whatever it is,
//! because slots carry explicit offsets (a placeholder-looking run in the input is left alone).
//!
//! Pure code: no I/O beyond the `Read` handed in.

use std::collections::HashMap;
use std::io::{self, Read};

use memchr::memmem;

use super::base32::is_base32_char;

/// The literal that introduces a store path (the store dir is fixed to `/nix/store`).
pub const PREFIX: &[u8] = b"/nix/store/";
/// Length of a store-path hash in nix-base32.
pub const HASH_LEN: usize = 32;
/// What replaces every hash: `e` is not a nix-base32 character, so a normalised slot can never
/// be mistaken for a real hash.
pub const PLACEHOLDER: [u8; HASH_LEN] = [b'e'; HASH_LEN];
const MATCH_LEN: usize = PREFIX.len() + HASH_LEN;
const BUF_LEN: usize = 256 * 1024;

/// A 32-character store-path hash, as ASCII bytes.
pub type HashBytes = [u8; HASH_LEN];

/// Errors of a slot table that does not describe a valid normalisation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("slot {slot} at offset {offset} overlaps the previous slot or is out of order")]
    Unordered { slot: usize, offset: u64 },
    #[error("slot {slot} at offset {offset} runs past the end of the NAR ({nar_size} bytes)")]
    OutOfRange {
        slot: usize,
        offset: u64,
        nar_size: u64,
    },
    #[error("slot {slot} refers to hash {index}, but the table has {len}")]
    BadIndex { slot: usize, index: u32, len: usize },
    #[error("hash {0:?} in the slot table is not 32 nix-base32 characters")]
    BadHash(String),
    #[error("slot table has {offsets} offsets but {indices} hash indices")]
    LengthMismatch { offsets: usize, indices: usize },
}

/// Where hashes were cut out: distinct hashes in order of first appearance, and for each slot
/// (in increasing offset order) its offset in the NAR and its index into `hashes`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotTable {
    pub hashes: Vec<HashBytes>,
    pub offsets: Vec<u64>,
    pub hash_index: Vec<u32>,
}

impl SlotTable {
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Checks the table is well-formed for a NAR of `nar_size` bytes.
    pub fn validate(&self, nar_size: u64) -> Result<(), SlotError> {
        if self.offsets.len() != self.hash_index.len() {
            return Err(SlotError::LengthMismatch {
                offsets: self.offsets.len(),
                indices: self.hash_index.len(),
            });
        }
        for h in &self.hashes {
            if !h.iter().all(|&c| is_base32_char(c)) {
                return Err(SlotError::BadHash(String::from_utf8_lossy(h).into_owned()));
            }
        }
        let mut next_free = 0u64;
        for (slot, (&offset, &index)) in self.offsets.iter().zip(&self.hash_index).enumerate() {
            if offset < next_free {
                return Err(SlotError::Unordered { slot, offset });
            }
            let end = offset
                .checked_add(HASH_LEN as u64)
                .filter(|&e| e <= nar_size)
                .ok_or(SlotError::OutOfRange {
                    slot,
                    offset,
                    nar_size,
                })?;
            if index as usize >= self.hashes.len() {
                return Err(SlotError::BadIndex {
                    slot,
                    index,
                    len: self.hashes.len(),
                });
            }
            next_free = end;
        }
        Ok(())
    }

    /// Writes the original hashes back into `data`, the normalised bytes at NAR offset
    /// `offset`. Slots that straddle the edges of `data` are restored partially, so chunks can
    /// be restored one at a time in any order.
    pub fn restore(&self, offset: u64, data: &mut [u8]) {
        let end = offset + data.len() as u64;
        // First slot whose hash ends after `offset`.
        let first = self
            .offsets
            .partition_point(|&o| o + HASH_LEN as u64 <= offset);
        for (&slot_off, &index) in self.offsets[first..].iter().zip(&self.hash_index[first..]) {
            if slot_off >= end {
                break;
            }
            let hash = &self.hashes[index as usize];
            let from = slot_off.max(offset);
            let to = (slot_off + HASH_LEN as u64).min(end);
            let src = &hash[(from - slot_off) as usize..(to - slot_off) as usize];
            data[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
        }
    }
}

/// Builds a [`SlotTable`] while scanning.
#[derive(Debug, Default)]
struct SlotBuilder {
    table: SlotTable,
    index: HashMap<HashBytes, u32>,
}

impl SlotBuilder {
    fn push(&mut self, offset: u64, hash: &[u8]) {
        let mut h = [0u8; HASH_LEN];
        h.copy_from_slice(hash);
        let next = self.table.hashes.len() as u32;
        let idx = *self.index.entry(h).or_insert_with(|| {
            self.table.hashes.push(h);
            next
        });
        self.table.offsets.push(offset);
        self.table.hash_index.push(idx);
    }
}

/// Streaming normaliser: reads raw NAR bytes from `inner`, yields normalised bytes, and
/// records the slots. Memory: one fixed buffer of 256 KiB plus the slot table.
pub struct Normaliser<R> {
    inner: R,
    buf: Box<[u8]>,
    /// Next byte to hand out.
    start: usize,
    /// Bytes before `ready` are final (no match can still change them).
    ready: usize,
    /// Bytes before `end` are filled.
    end: usize,
    /// Next position at which a match may start.
    scan: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    eof: bool,
    slots: SlotBuilder,
    finder: memmem::Finder<'static>,
}

impl<R: Read> Normaliser<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            start: 0,
            ready: 0,
            end: 0,
            scan: 0,
            base: 0,
            eof: false,
            slots: SlotBuilder::default(),
            finder: memmem::Finder::new(PREFIX),
        }
    }

    /// The slots found so far (all of them once the stream is read to its end).
    pub fn slots(&self) -> &SlotTable {
        &self.slots.table
    }

    /// Ends the transform, giving back the inner reader and the slot table.
    pub fn into_parts(self) -> (R, SlotTable) {
        (self.inner, self.slots.table)
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.scan -= self.start;
            self.base += self.start as u64;
            self.start = 0;
        }
        while self.end < self.buf.len() && !self.eof {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // A match starting before `limit` can be decided with the bytes at hand.
        let limit = if self.eof {
            self.end
        } else {
            self.end - (MATCH_LEN - 1)
        };
        while self.scan < limit {
            let Some(i) = self.finder.find(&self.buf[self.scan..self.end]) else {
                break;
            };
            let p = self.scan + i;
            if p >= limit {
                break;
            }
            let h = p + PREFIX.len();
            if p + MATCH_LEN <= self.end
                && self.buf[h..h + HASH_LEN].iter().all(|&c| is_base32_char(c))
            {
                self.slots
                    .push(self.base + h as u64, &self.buf[h..h + HASH_LEN]);
                self.buf[h..h + HASH_LEN].copy_from_slice(&PLACEHOLDER);
                self.scan = p + MATCH_LEN;
            } else {
                self.scan = p + 1;
            }
        }
        self.scan = self.scan.max(limit);
        self.ready = limit;
        Ok(())
    }
}

impl<R: Read> Read for Normaliser<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.start == self.ready {
            if self.eof {
                return Ok(0);
            }
            self.fill()?;
        }
        let n = out.len().min(self.ready - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

/// Normalises a whole in-memory buffer (tests and small inputs).
pub fn normalise_bytes(data: &[u8]) -> (Vec<u8>, SlotTable) {
    let mut n = Normaliser::new(data);
    let mut out = Vec::with_capacity(data.len());
    n.read_to_end(&mut out)
        .expect("reading from a slice cannot fail");
    let (_, slots) = n.into_parts();
    (out, slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H1: &str = "gdh8165b7rg4y53v64chjys7mbbw89f9";
    const H2: &str = "7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc";

    #[test]
    fn replaces_hashes_and_restores() {
        let input = format!("#!/nix/store/{H1}-bash/bin/sh\nexec /nix/store/{H2}-x /nix/store/{H1}-bash\n/nix/store/short\n/nix/store/{}", &H2[..31]);
        let (norm, slots) = normalise_bytes(input.as_bytes());
        assert_eq!(norm.len(), input.len());
        let text = String::from_utf8(norm.clone()).unwrap();
        assert!(!text.contains(H1) && !text.contains(H2));
        assert_eq!(
            text.matches("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee")
                .count(),
            3
        );
        assert!(text.contains("/nix/store/short"));
        assert_eq!(slots.len(), 3);
        assert_eq!(slots.hashes.len(), 2, "distinct hashes are stored once");
        assert_eq!(slots.hash_index, vec![0, 1, 0]);
        assert_eq!(slots.offsets[0], 13);
        slots.validate(input.len() as u64).unwrap();
        let mut back = norm;
        slots.restore(0, &mut back);
        assert_eq!(back, input.as_bytes());
    }

    #[test]
    fn mass_rebuild_normalises_to_same_bytes() {
        let a = format!("rpath=/nix/store/{H1}-glibc/lib ELF....");
        let b = format!("rpath=/nix/store/{H2}-glibc/lib ELF....");
        assert_eq!(
            normalise_bytes(a.as_bytes()).0,
            normalise_bytes(b.as_bytes()).0
        );
    }

    #[test]
    fn matches_across_buffer_refills() {
        // Put hashes right around the internal buffer edge, and at the very start and end.
        for shift in [0usize, 1, 10, 11, 20, 42, 43, 44] {
            let mut data = vec![b'x'; BUF_LEN * 2 + 100];
            let put = |data: &mut Vec<u8>, at: usize| {
                let s = format!("/nix/store/{H1}");
                data[at..at + s.len()].copy_from_slice(s.as_bytes());
            };
            put(&mut data, 0);
            put(&mut data, BUF_LEN - shift);
            put(&mut data, 2 * BUF_LEN - 30 - shift);
            let len = data.len();
            put(&mut data, len - MATCH_LEN);
            let (norm, slots) = normalise_bytes(&data);
            assert_eq!(slots.len(), 4, "shift {shift}");
            let mut back = norm;
            slots.restore(0, &mut back);
            assert_eq!(back, data);
        }
    }

    #[test]
    fn validate_rejects_bad_tables() {
        let (_, mut slots) = normalise_bytes(format!("/nix/store/{H1} /nix/store/{H2}").as_bytes());
        assert!(slots.validate(10).is_err());
        slots.offsets.swap(0, 1);
        assert!(matches!(
            slots.validate(100),
            Err(SlotError::Unordered { .. })
        ));
        slots.offsets.swap(0, 1);
        slots.hash_index[1] = 7;
        assert!(matches!(
            slots.validate(100),
            Err(SlotError::BadIndex { .. })
        ));
    }

    fn arb_input() -> impl Strategy<Value = Vec<u8>> {
        // Random bytes interleaved with store-path prefixes, full and truncated hashes.
        let piece = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            Just(format!("/nix/store/{H1}").into_bytes()),
            Just(format!("/nix/store/{H2}-name").into_bytes()),
            Just(b"/nix/store/".to_vec()),
            Just(format!("/nix/store/{}", &H1[..20]).into_bytes()),
            Just(PLACEHOLDER.to_vec()),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn restore_is_identity(data in arb_input(), cut in 1usize..200) {
            let (norm, slots) = normalise_bytes(&data);
            prop_assert_eq!(norm.len(), data.len());
            slots.validate(data.len() as u64).unwrap();
            // Restore piecewise, with boundaries cutting through hashes.
            let mut back = norm.clone();
            for (i, piece) in back.chunks_mut(cut).enumerate() {
                slots.restore((i * cut) as u64, piece);
            }
            prop_assert_eq!(back, data);
        }
    }
}
