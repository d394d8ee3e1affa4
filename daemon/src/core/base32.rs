//! Nix's base32 ("nix-base32"): the alphabet without `e o u t`, least significant bits first.
//!
//! Pure code, no I/O.

/// The 32 characters of nix-base32, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Errors when decoding nix-base32 text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Base32Error {
    #[error("invalid nix-base32 character {0:?}")]
    InvalidChar(char),
    #[error("nix-base32 string of length {0} does not encode a whole number of bytes")]
    InvalidLength(usize),
    #[error("nix-base32 string has non-zero padding bits")]
    NonZeroPadding,
}

const INVALID: u8 = 0xff;
const DECODE: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut i = 0;
    while i < 32 {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// True if `c` is one of the 32 nix-base32 characters.
#[inline]
pub fn is_base32_char(c: u8) -> bool {
    DECODE[c as usize] != INVALID
}

/// Length of the nix-base32 text for `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * 8 - 1) / 5 + 1
    }
}

/// Encodes bytes as nix-base32 (the form Nix prints for hashes).
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = (bytes[i] as u16) >> j;
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Decodes nix-base32 text into `out_len` bytes.
pub fn decode_len(s: &str, out_len: usize) -> Result<Vec<u8>, Base32Error> {
    if s.len() != encoded_len(out_len) {
        return Err(Base32Error::InvalidLength(s.len()));
    }
    let mut out = vec![0u8; out_len];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = DECODE[c as usize];
        if digit == INVALID {
            return Err(Base32Error::InvalidChar(c as char));
        }
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= digit << j;
        let carry = ((digit as u16) >> (8 - j)) as u8;
        if i + 1 < out_len {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(Base32Error::NonZeroPadding);
        }
    }
    Ok(out)
}

/// Decodes nix-base32 text, deriving the byte length from the text length.
pub fn decode(s: &str) -> Result<Vec<u8>, Base32Error> {
    let out_len = s.len() * 5 / 8;
    decode_len(s, out_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vectors() {
        // sha256("") as Nix prints it: `nix-hash --type sha256 --to-base32 e3b0c4...`
        let digest =
            hex::decode("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
                .unwrap();
        assert_eq!(
            encode(&digest),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            decode("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").unwrap(),
            digest
        );
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode("e0"), Err(Base32Error::InvalidChar('e')));
        assert!(matches!(
            decode_len("abc", 32),
            Err(Base32Error::InvalidLength(3))
        ));
        // 52 chars encode 260 bits; a top digit above 1 overflows 256 bits.
        let s = format!("z{}", "0".repeat(51));
        assert_eq!(decode_len(&s, 32), Err(Base32Error::NonZeroPadding));
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode_len(&s, bytes.len()).unwrap(), bytes);
        }
    }
}
