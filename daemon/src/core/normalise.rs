//! Store-path normalisation (design §2, `docs/chunking.md`): before chunking, store paths are
//! cut out of the NAR stream and their places recorded as *slots*; reassembly puts them back.
//! Two modes, named by a manifest's chunking id ([`Normalisation`]):
//!
//! - **Hashes** (chunking v1): the 32-character hash of every `/nix/store/<hash>` occurrence is
//!   replaced by a placeholder of the same length. Normalised offsets are NAR offsets. A mass
//!   rebuild that only changes dependency hashes produces the same normalised bytes.
//! - **References** (chunking v2): every occurrence of a path named in the narinfo's
//!   `References` (or the path itself) is cut out whole, `<hash>-<name>`, and every other
//!   `/nix/store/<hash>` loses its hash. Slots are insertions at offsets of the (shorter)
//!   normalised stream. A mass rebuild that renames a dependency (`glibc-2.39` →
//!   `glibc-2.40.1`) then produces the same normalised bytes too, whatever the name lengths.
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
use super::store_path::{is_name_char, StorePath, MAX_NAME_LEN};

/// The literal that introduces a store path (the store dir is fixed to `/nix/store`).
pub const PREFIX: &[u8] = b"/nix/store/";
/// Length of a store-path hash in nix-base32.
pub const HASH_LEN: usize = 32;
/// What replaces every hash in [`Normalisation::Hashes`]: `e` is not a nix-base32 character,
/// so a normalised slot can never be mistaken for a real hash.
pub const PLACEHOLDER: [u8; HASH_LEN] = [b'e'; HASH_LEN];
#[cfg(test)]
const MATCH_LEN: usize = PREFIX.len() + HASH_LEN;
/// Bytes a match may need from its start to be decided: the prefix, the hash, the dash, the
/// longest name, and one byte to see that the name ends there.
const LOOKAHEAD: usize = PREFIX.len() + HASH_LEN + 1 + MAX_NAME_LEN + 1;
const BUF_LEN: usize = 256 * 1024;

/// What is cut out of a NAR before chunking; a manifest's chunking id names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalisation {
    /// v1: the hash of every store path, replaced by [`PLACEHOLDER`].
    Hashes,
    /// v2: whole references (`<hash>-<name>`), and the hash of every other store path.
    References,
}

/// The store paths a NAR may refer to by name: its narinfo's `References` and its own path.
#[derive(Debug, Clone, Default)]
pub struct RefSet {
    names: HashMap<HashBytes, Box<[u8]>>,
}

impl RefSet {
    pub fn from_paths<'a>(paths: impl IntoIterator<Item = &'a StorePath>) -> Self {
        let mut set = Self::default();
        for p in paths {
            let mut h = [0u8; HASH_LEN];
            h.copy_from_slice(p.hash().as_str().as_bytes());
            set.names.insert(h, p.name().as_bytes().into());
        }
        set
    }

    fn name(&self, hash: &[u8]) -> Option<&[u8]> {
        let h: &HashBytes = hash.try_into().ok()?;
        self.names.get(h).map(|n| &n[..])
    }
}

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
    #[error(
        "slot {slot} at offset {offset} is past the end of the normalised stream ({len} bytes)"
    )]
    PastEnd { slot: usize, offset: u64, len: u64 },
    #[error("slot string {0:?} is neither a store-path hash nor a store path's base name")]
    BadString(String),
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

/// The slots of [`Normalisation::References`]: strings cut out of the NAR, each to be inserted
/// back before the byte at its offset in the normalised stream (or at its end).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InsertTable {
    /// Distinct strings in order of first appearance: a 32-character hash, or a whole
    /// reference `<hash>-<name>`.
    pub strings: Vec<Vec<u8>>,
    /// Offset of each slot in the normalised stream, non-decreasing.
    pub offsets: Vec<u64>,
    /// For each slot, its index into `strings`.
    pub index: Vec<u32>,
    /// Length of the normalised stream.
    pub norm_len: u64,
}

impl InsertTable {
    /// Bytes the slots add back: NAR size = `norm_len` + this.
    pub fn inserted_len(&self) -> u64 {
        self.index
            .iter()
            .map(|&i| self.strings.get(i as usize).map_or(0, |s| s.len() as u64))
            .sum()
    }

    /// Checks the table is well-formed: offsets in order and within the stream, indices in
    /// range, every string a hash or a store path's base name.
    pub fn validate(&self) -> Result<(), SlotError> {
        if self.offsets.len() != self.index.len() {
            return Err(SlotError::LengthMismatch {
                offsets: self.offsets.len(),
                indices: self.index.len(),
            });
        }
        for s in &self.strings {
            let ok = match s.len() {
                HASH_LEN => s.iter().all(|&c| is_base32_char(c)),
                _ => std::str::from_utf8(s).is_ok_and(|t| StorePath::from_base_name(t).is_ok()),
            };
            if !ok {
                return Err(SlotError::BadString(
                    String::from_utf8_lossy(s).into_owned(),
                ));
            }
        }
        let mut prev = 0u64;
        for (slot, (&offset, &index)) in self.offsets.iter().zip(&self.index).enumerate() {
            if offset < prev {
                return Err(SlotError::Unordered { slot, offset });
            }
            // A slot at the very end belongs to the last chunk, so there must be one.
            if offset > self.norm_len || (offset == self.norm_len && self.norm_len == 0) {
                return Err(SlotError::PastEnd {
                    slot,
                    offset,
                    len: self.norm_len,
                });
            }
            if index as usize >= self.strings.len() {
                return Err(SlotError::BadIndex {
                    slot,
                    index,
                    len: self.strings.len(),
                });
            }
            prev = offset;
        }
        Ok(())
    }

    /// Restores `data`, the normalised bytes at stream offset `offset`: inserts the slots at
    /// `offset..offset + len` (and those at the very end of the stream when `data` reaches
    /// it), so chunks can be restored one at a time in any order.
    pub fn restore(&self, offset: u64, data: Vec<u8>) -> Vec<u8> {
        let end = offset + data.len() as u64;
        let first = self.offsets.partition_point(|&o| o < offset);
        let stop = if end >= self.norm_len {
            self.offsets.len()
        } else {
            self.offsets.partition_point(|&o| o < end)
        };
        if first >= stop {
            return data;
        }
        let extra: usize = self.index[first..stop]
            .iter()
            .map(|&i| self.strings[i as usize].len())
            .sum();
        let mut out = Vec::with_capacity(data.len() + extra);
        let mut at = 0usize;
        for (&o, &i) in self.offsets[first..stop]
            .iter()
            .zip(&self.index[first..stop])
        {
            let rel = (o - offset) as usize;
            out.extend_from_slice(&data[at..rel]);
            out.extend_from_slice(&self.strings[i as usize]);
            at = rel;
        }
        out.extend_from_slice(&data[at..]);
        out
    }
}

/// The slots of one NAR, in the mode its chunking names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slots {
    Hashes(SlotTable),
    References(InsertTable),
}

impl Slots {
    /// Restores the normalised bytes `data` found at stream offset `offset` to NAR bytes.
    pub fn restore(&self, offset: u64, mut data: Vec<u8>) -> Vec<u8> {
        match self {
            Self::Hashes(t) => {
                t.restore(offset, &mut data);
                data
            }
            Self::References(t) => t.restore(offset, data),
        }
    }

    /// The NAR offset at which each piece of the normalised stream starts once restored,
    /// given the normalised offsets of the pieces (increasing).
    pub fn nar_offsets(&self, norm_offsets: impl IntoIterator<Item = u64>) -> Vec<u64> {
        match self {
            Self::Hashes(_) => norm_offsets.into_iter().collect(),
            Self::References(t) => {
                let (mut j, mut added) = (0usize, 0u64);
                norm_offsets
                    .into_iter()
                    .map(|a| {
                        while j < t.offsets.len() && t.offsets[j] < a {
                            added += t.strings[t.index[j] as usize].len() as u64;
                            j += 1;
                        }
                        a + added
                    })
                    .collect()
            }
        }
    }
}

/// Builds the slots while scanning.
#[derive(Debug, Default)]
struct SlotBuilder {
    strings: Vec<Vec<u8>>,
    by_string: HashMap<Vec<u8>, u32>,
    offsets: Vec<u64>,
    index: Vec<u32>,
}

impl SlotBuilder {
    fn push(&mut self, offset: u64, s: &[u8]) {
        let next = self.strings.len() as u32;
        let idx = match self.by_string.get(s) {
            Some(&i) => i,
            None => {
                self.strings.push(s.to_vec());
                self.by_string.insert(s.to_vec(), next);
                next
            }
        };
        self.offsets.push(offset);
        self.index.push(idx);
    }

    fn into_hashes(self) -> SlotTable {
        SlotTable {
            hashes: self
                .strings
                .into_iter()
                .map(|s| {
                    let mut h = [0u8; HASH_LEN];
                    h.copy_from_slice(&s);
                    h
                })
                .collect(),
            offsets: self.offsets,
            hash_index: self.index,
        }
    }

    fn into_inserts(self, norm_len: u64) -> InsertTable {
        InsertTable {
            strings: self.strings,
            offsets: self.offsets,
            index: self.index,
            norm_len,
        }
    }
}

enum Mode {
    Hashes,
    References(RefSet),
}

/// Streaming normaliser: reads raw NAR bytes from `inner`, yields normalised bytes, and
/// records the slots. Memory: one fixed buffer of 256 KiB plus the slot table.
pub struct Normaliser<R> {
    inner: R,
    mode: Mode,
    /// `buf[start..ready]`: normalised bytes not yet handed out; `buf[ready..end]`: raw bytes
    /// not yet decided (a store path may start there).
    buf: Box<[u8]>,
    start: usize,
    ready: usize,
    end: usize,
    /// Normalised stream offset of `buf[0]`.
    base: u64,
    eof: bool,
    slots: SlotBuilder,
    finder: memmem::Finder<'static>,
}

impl<R: Read> Normaliser<R> {
    /// A [`Normalisation::Hashes`] (chunking v1) normaliser.
    pub fn new(inner: R) -> Self {
        Self::with_mode(inner, Mode::Hashes)
    }

    /// A [`Normalisation::References`] (chunking v2) normaliser cutting out `refs` whole.
    pub fn with_references(inner: R, refs: RefSet) -> Self {
        Self::with_mode(inner, Mode::References(refs))
    }

    /// The normaliser of `normalisation`; `refs` (the paths a NAR may name) are used by
    /// [`Normalisation::References`] only.
    pub fn of(inner: R, normalisation: Normalisation, refs: impl FnOnce() -> RefSet) -> Self {
        match normalisation {
            Normalisation::Hashes => Self::new(inner),
            Normalisation::References => Self::with_references(inner, refs()),
        }
    }

    fn with_mode(inner: R, mode: Mode) -> Self {
        Self {
            inner,
            mode,
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            start: 0,
            ready: 0,
            end: 0,
            base: 0,
            eof: false,
            slots: SlotBuilder::default(),
            finder: memmem::Finder::new(PREFIX),
        }
    }

    /// Ends the transform, giving back the inner reader and the slots (all of them once the
    /// stream was read to its end).
    pub fn into_parts(self) -> (R, Slots) {
        let norm_len = self.base + self.ready as u64;
        let slots = match self.mode {
            Mode::Hashes => Slots::Hashes(self.slots.into_hashes()),
            Mode::References(_) => Slots::References(self.slots.into_inserts(norm_len)),
        };
        (self.inner, slots)
    }

    /// How many raw bytes from `buf[h]` (just past a prefix) are cut out: the whole reference
    /// when a path of the set is named there in full (its name not running on), else the hash.
    fn cut_at(&self, h: usize) -> Option<usize> {
        let raw = &self.buf[..self.end];
        let hash = raw.get(h..h + HASH_LEN)?;
        if !hash.iter().all(|&c| is_base32_char(c)) {
            return None;
        }
        if let Mode::References(refs) = &self.mode {
            if let Some(name) = refs.name(hash) {
                let dash = h + HASH_LEN;
                let end = dash + 1 + name.len();
                if raw.get(dash) == Some(&b'-')
                    && raw.get(dash + 1..end) == Some(name)
                    && !matches!(raw.get(end), Some(&c) if is_name_char(c))
                {
                    return Some(end - h);
                }
            }
        }
        Some(HASH_LEN)
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.ready -= self.start;
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
            self.end.saturating_sub(LOOKAHEAD - 1).max(self.ready)
        };
        // Compact as we go: `w` is the end of the normalised output, `r` the first raw byte
        // not yet moved to it.
        let (mut w, mut r) = (self.ready, self.ready);
        let mut p = r;
        while p < limit {
            let Some(i) = self.finder.find(&self.buf[p..self.end]) else {
                break;
            };
            let at = p + i;
            if at >= limit {
                break;
            }
            let h = at + PREFIX.len();
            let Some(len) = self.cut_at(h) else {
                p = at + 1;
                continue;
            };
            self.buf.copy_within(r..h, w);
            w += h - r;
            let offset = self.base + w as u64;
            self.slots.push(offset, &self.buf[h..h + len]);
            if let Mode::Hashes = self.mode {
                self.buf[w..w + HASH_LEN].copy_from_slice(&PLACEHOLDER);
                w += HASH_LEN;
            }
            r = h + len;
            p = r;
        }
        let decided = limit.max(r);
        self.buf.copy_within(r..decided, w);
        w += decided - r;
        self.buf.copy_within(decided..self.end, w);
        self.end = w + (self.end - decided);
        self.ready = w;
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

/// Normalises a whole in-memory buffer in [`Normalisation::Hashes`] (tests and small inputs).
pub fn normalise_bytes(data: &[u8]) -> (Vec<u8>, SlotTable) {
    let (out, slots) = drain(Normaliser::new(data));
    (out, slots.into_hashes())
}

/// Normalises a whole in-memory buffer in [`Normalisation::References`].
pub fn normalise_references(data: &[u8], refs: RefSet) -> (Vec<u8>, InsertTable) {
    let (out, slots) = drain(Normaliser::with_references(data, refs));
    let len = out.len() as u64;
    (out, slots.into_inserts(len))
}

fn drain(mut n: Normaliser<&[u8]>) -> (Vec<u8>, SlotBuilder) {
    let mut out = Vec::new();
    n.read_to_end(&mut out)
        .expect("reading from a slice cannot fail");
    (out, n.slots)
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

    // ---- References (chunking v2) ----

    fn refs(paths: &[&str]) -> RefSet {
        let v: Vec<StorePath> = paths
            .iter()
            .map(|p| StorePath::from_base_name(p).unwrap())
            .collect();
        RefSet::from_paths(&v)
    }

    /// Restores `norm` piece by piece (pieces of `cut` bytes) and checks the NAR offsets.
    fn restore_pieces(t: &InsertTable, norm: &[u8], cut: usize) -> Vec<u8> {
        let slots = Slots::References(t.clone());
        let starts: Vec<u64> = (0..norm.len())
            .step_by(cut.max(1))
            .map(|o| o as u64)
            .collect();
        let nar_offsets = slots.nar_offsets(starts.iter().copied());
        let mut out = Vec::new();
        for (k, piece) in norm.chunks(cut.max(1)).enumerate() {
            assert_eq!(nar_offsets[k], out.len() as u64, "NAR offset of piece {k}");
            out.extend(slots.restore(starts[k], piece.to_vec()));
        }
        out
    }

    #[test]
    fn whole_references_are_cut_out_and_restored() {
        let a = format!("#!/nix/store/{H1}-bash-5.2/bin/sh\nLD=/nix/store/{H2}-glibc-2.39/lib:/nix/store/{H2}-glibc-2.39\n");
        let (norm, t) = normalise_references(
            a.as_bytes(),
            refs(&[&format!("{H1}-bash-5.2"), &format!("{H2}-glibc-2.39")]),
        );
        assert_eq!(
            String::from_utf8(norm.clone()).unwrap(),
            "#!/nix/store//bin/sh\nLD=/nix/store//lib:/nix/store/\n"
        );
        assert_eq!(t.strings.len(), 2, "distinct strings are stored once");
        assert_eq!(t.index, vec![0, 1, 1]);
        t.validate().unwrap();
        assert_eq!(t.norm_len + t.inserted_len(), a.len() as u64);
        for cut in [1, 5, 13, 1000] {
            assert_eq!(restore_pieces(&t, &norm, cut), a.as_bytes(), "cut {cut}");
        }
    }

    #[test]
    fn renamed_references_normalise_to_the_same_bytes() {
        // A mass rebuild that renames the root: new hash, new name of another length.
        let old = format!("{H1}-glibc-2.39");
        let new = format!("{H2}-glibc-2.40.1");
        let text = |r: &str| format!("rpath=/nix/store/{r}/lib:/nix/store/{r}/lib64\0ELF....");
        let (a, _) = normalise_references(text(&old).as_bytes(), refs(&[&old]));
        let (b, _) = normalise_references(text(&new).as_bytes(), refs(&[&new]));
        assert_eq!(a, b);
        // Hash-only normalisation (v1) still sees the names.
        assert_ne!(
            normalise_bytes(text(&old).as_bytes()).0,
            normalise_bytes(text(&new).as_bytes()).0
        );
    }

    #[test]
    fn only_whole_named_references_are_cut_whole() {
        let r = format!("{H1}-foo");
        let other = format!("{H2}-foo-bar");
        let cases = [
            // the name runs on with name characters: another path, only the hash goes
            (format!("/nix/store/{H1}-foobar/x"), "/nix/store/-foobar/x"),
            (format!("/nix/store/{H1}-foo.1"), "/nix/store/-foo.1"),
            // a prefix of the name is not the name
            (format!("/nix/store/{H1}-fo/x"), "/nix/store/-fo/x"),
            // a path not in References keeps its name
            (format!("/nix/store/{H2}-foo/x"), "/nix/store/-foo/x"),
            // the referenced path, then a name that has it as a prefix, both whole
            (
                format!("/nix/store/{H1}-foo/nix/store/{H2}-foo-bar/"),
                "/nix/store//nix/store//",
            ),
            // at the very end
            (format!("x/nix/store/{H1}-foo"), "x/nix/store/"),
            // truncated hash: nothing
            (format!("/nix/store/{}-foo", &H1[..31]), ""),
        ];
        for (input, want) in cases {
            let (norm, t) = normalise_references(input.as_bytes(), refs(&[&r, &other]));
            let want = if want.is_empty() {
                input.as_str()
            } else {
                want
            };
            assert_eq!(String::from_utf8_lossy(&norm), want, "{input}");
            t.validate().unwrap();
            assert_eq!(restore_pieces(&t, &norm, 3), input.as_bytes());
        }
    }

    #[test]
    fn references_across_buffer_refills() {
        let r = format!("{H1}-glibc-2.40.1");
        let path = format!("/nix/store/{r}");
        for shift in [0usize, 1, 10, 11, 43, 44, 60, 255, 256, 257, 300] {
            // Filler that cannot continue a name.
            let mut data = vec![b' '; BUF_LEN * 2 + 100];
            let mut put = |at: usize| data[at..at + path.len()].copy_from_slice(path.as_bytes());
            put(0);
            put(BUF_LEN - shift);
            put(2 * BUF_LEN - 300 - shift);
            let len = data.len();
            data[len - path.len()..].copy_from_slice(path.as_bytes());
            let (norm, t) = normalise_references(&data, refs(&[&r]));
            assert_eq!(t.offsets.len(), 4, "shift {shift}");
            assert_eq!(t.strings, vec![r.as_bytes().to_vec()], "shift {shift}");
            assert_eq!(norm.len(), data.len() - 4 * r.len());
            assert_eq!(restore_pieces(&t, &norm, 4096), data);
        }
    }

    #[test]
    fn insert_tables_are_validated() {
        let r = format!("{H1}-foo");
        let (_, t) = normalise_references(format!("a/nix/store/{r} b").as_bytes(), refs(&[&r]));
        t.validate().unwrap();
        let mut bad = t.clone();
        bad.offsets[0] = bad.norm_len + 1;
        assert!(matches!(bad.validate(), Err(SlotError::PastEnd { .. })));
        let mut bad = t.clone();
        bad.strings[0] = b"not a store path".to_vec();
        assert!(matches!(bad.validate(), Err(SlotError::BadString(_))));
        let mut bad = t.clone();
        bad.index[0] = 3;
        assert!(matches!(bad.validate(), Err(SlotError::BadIndex { .. })));
        let empty = InsertTable {
            strings: vec![H1.as_bytes().to_vec()],
            offsets: vec![0],
            index: vec![0],
            norm_len: 0,
        };
        assert!(matches!(empty.validate(), Err(SlotError::PastEnd { .. })));
    }

    fn arb_refs_input() -> impl Strategy<Value = Vec<u8>> {
        // Random bytes interleaved with referenced paths (names that are prefixes of each
        // other, followed by name characters or not), unreferenced paths, truncated hashes.
        let piece = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            Just(format!("/nix/store/{H1}-foo").into_bytes()),
            Just(format!("/nix/store/{H1}-foo-bar").into_bytes()),
            Just(format!("/nix/store/{H2}-foo-bar/lib").into_bytes()),
            Just(format!("/nix/store/{H2}-foo").into_bytes()),
            Just(format!("/nix/store/{H3}-x").into_bytes()),
            Just(b"/nix/store/".to_vec()),
            Just(b"-foo".to_vec()),
            Just(format!("/nix/store/{}", &H1[..20]).into_bytes()),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    const H3: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    proptest! {
        #[test]
        fn references_restore_is_identity(data in arb_refs_input(), cut in 1usize..200) {
            let set = refs(&[&format!("{H1}-foo"), &format!("{H2}-foo-bar")]);
            let (norm, t) = normalise_references(&data, set);
            t.validate().unwrap();
            prop_assert_eq!(t.norm_len, norm.len() as u64);
            prop_assert_eq!(t.norm_len + t.inserted_len(), data.len() as u64);
            prop_assert_eq!(restore_pieces(&t, &norm, cut), data);
        }
    }
}
