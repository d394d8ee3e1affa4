//! Nix's ed25519 narinfo signatures: public keys (`name:base64(32 bytes)`), secret keys
//! (`name:base64(seed ‖ public key)`, the format of `nix-store --generate-binary-cache-key`),
//! `Sig:` values (`name:base64(64 bytes)`), and the trust decision for a narinfo.
//!
//! Owns the rule "a narinfo is trusted iff a `Sig` by a trusted key verifies over its
//! fingerprint". It never reads key files (callers pass the text) and keeps no key state.
//! Pure code, no I/O.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use super::narinfo::NarInfo;

/// The key cache.nixos.org signs with; trusted by default.
pub const CACHE_NIXOS_ORG_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// Errors about keys and signatures. Key errors name the key (never secret bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    #[error("key is not of the form <name>:<base64>")]
    MalformedKey,
    #[error("key {name:?}: {reason}")]
    BadKey { name: String, reason: &'static str },
    #[error("signature {sig:?} is malformed: {reason}")]
    MalformedSig { sig: String, reason: &'static str },
    #[error("signature by trusted key {key:?} does not verify")]
    BadSignature { key: String },
}

/// Whether a narinfo carries a valid signature by a trusted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Signed by the trusted key with this name.
    Trusted { key: String },
    /// No signature by any trusted key (signatures by unknown keys are ignored).
    Untrusted,
}

/// A named ed25519 public key, `name:base64(32 bytes)`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, SigningError> {
        let (name, bytes) = split_key(s, 32)?;
        let bytes: [u8; 32] = bytes.try_into().expect("length checked");
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| SigningError::BadKey {
            name: name.to_string(),
            reason: "not an ed25519 public key",
        })?;
        Ok(Self {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.key
    }

    /// True if `sig` (a whole `Sig:` value) is by this key and verifies over `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &str) -> bool {
        verify_signature(fingerprint, sig, self)
    }
}

impl fmt::Display for PublicKey {
    /// `name:base64`, as Nix prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = SigningError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A named ed25519 secret key, `name:base64(seed ‖ public key)` (64 bytes, libsodium's layout).
/// Its `Debug` shows only the name and public key.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Parses Nix's secret key format; surrounding whitespace (a key file's newline) is ignored.
    /// The public half must match the seed.
    pub fn parse(s: &str) -> Result<Self, SigningError> {
        let (name, bytes) = split_key(s, 64)?;
        let seed: [u8; 32] = bytes[..32].try_into().expect("length checked");
        let key = SigningKey::from_bytes(&seed);
        if key.verifying_key().as_bytes()[..] != bytes[32..] {
            return Err(SigningError::BadKey {
                name: name.to_string(),
                reason: "public half does not match the seed",
            });
        }
        Ok(Self {
            name: name.to_string(),
            key,
        })
    }

    /// A key from a fixed seed (tests, or a seed from a secure source).
    pub fn generate(name: &str, seed: [u8; 32]) -> Self {
        Self {
            name: name.to_string(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs a fingerprint (see `NarInfo::fingerprint`), giving a `Sig:` value `name:base64`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, BASE64.encode(sig.to_bytes()))
    }

    /// The secret key in Nix's file format (without a trailing newline).
    pub fn to_nix_format(&self) -> String {
        let mut bytes = [0u8; 64];
        bytes[..32].copy_from_slice(self.key.as_bytes());
        bytes[32..].copy_from_slice(self.key.verifying_key().as_bytes());
        format!("{}:{}", self.name, BASE64.encode(bytes))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({} / public {})", self.name, self.public_key())
    }
}

/// Splits `name:base64` and decodes exactly `len` bytes.
fn split_key(s: &str, len: usize) -> Result<(&str, Vec<u8>), SigningError> {
    let (name, b64) = s.trim().split_once(':').ok_or(SigningError::MalformedKey)?;
    if name.is_empty() || b64.is_empty() {
        return Err(SigningError::MalformedKey);
    }
    let bad = |reason| SigningError::BadKey {
        name: name.to_string(),
        reason,
    };
    let bytes = BASE64.decode(b64).map_err(|_| bad("invalid base64"))?;
    if bytes.len() != len {
        return Err(bad(if len == 32 {
            "public key is not 32 bytes"
        } else {
            "secret key is not 64 bytes"
        }));
    }
    Ok((name, bytes))
}

/// Splits a `Sig:` value `name:base64(64 bytes)` into its key name and signature.
pub fn parse_sig(sig: &str) -> Result<(&str, Signature), SigningError> {
    let malformed = |reason| SigningError::MalformedSig {
        sig: sig.to_string(),
        reason,
    };
    let (name, b64) = sig.split_once(':').ok_or_else(|| malformed("no ':'"))?;
    if name.is_empty() {
        return Err(malformed("empty key name"));
    }
    let bytes = BASE64
        .decode(b64)
        .map_err(|_| malformed("invalid base64"))?;
    let bytes: [u8; 64] = bytes
        .try_into()
        .map_err(|_| malformed("signature is not 64 bytes"))?;
    Ok((name, Signature::from_bytes(&bytes)))
}

/// True if `sig` is well formed, names `key`, and verifies over `fingerprint`.
///
/// Uses strict verification (rejects small-order keys and `R`, non-canonical `S`), like the
/// libsodium check Nix itself uses.
pub fn verify_signature(fingerprint: &str, sig: &str, key: &PublicKey) -> bool {
    match parse_sig(sig) {
        Ok((name, sig)) => {
            name == key.name && key.key.verify_strict(fingerprint.as_bytes(), &sig).is_ok()
        }
        Err(_) => false,
    }
}

/// Decides whether `info` is signed by one of `trusted`.
///
/// Every `Sig` must be well formed (else `MalformedSig`); a `Sig` whose key name matches a
/// trusted key must verify with it (else `BadSignature`, even if another one verifies: a
/// narinfo with a forged signature is suspect as a whole); signatures by other names are
/// ignored. `Trusted` names the first trusted key that verified.
pub fn verify_narinfo(info: &NarInfo, trusted: &[PublicKey]) -> Result<Trust, SigningError> {
    let fingerprint = info.fingerprint();
    let mut trust = Trust::Untrusted;
    for sig in &info.sigs {
        let (name, signature) = parse_sig(sig)?;
        let mut candidates = trusted.iter().filter(|k| k.name == name).peekable();
        if candidates.peek().is_none() {
            continue;
        }
        let ok = candidates.any(|k| {
            k.key
                .verify_strict(fingerprint.as_bytes(), &signature)
                .is_ok()
        });
        if !ok {
            return Err(SigningError::BadSignature {
                key: name.to_string(),
            });
        }
        if trust == Trust::Untrusted {
            trust = Trust::Trusted {
                key: name.to_string(),
            };
        }
    }
    Ok(trust)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::hash::NarHash;
    use crate::core::store_path::StorePath;
    use proptest::prelude::*;

    const VECTORS: [(&str, &str); 4] = [
        (
            "curl",
            include_str!("../../../testdata/cache.nixos.org/curl-7.82.0-bin.narinfo"),
        ),
        (
            "hello-gdh8",
            include_str!("../../../testdata/cache.nixos.org/hello-2.10-gdh8.narinfo"),
        ),
        (
            "hello-w9yy",
            include_str!("../../../testdata/cache.nixos.org/hello-2.10-w9yy.narinfo"),
        ),
        (
            "ripgrep",
            include_str!("../../../testdata/cache.nixos.org/ripgrep-15.2.0.narinfo"),
        ),
    ];
    const NIX_SK: &str = include_str!("../../../testdata/nix/test-key-1.sk");
    const NIX_PK: &str = include_str!("../../../testdata/nix/test-key-1.pk");
    const NIX_NARINFOS: [&str; 2] = [
        include_str!("../../../testdata/nix/sig-vec.narinfo"),
        include_str!("../../../testdata/nix/sig-vec-dep.narinfo"),
    ];

    fn cache_key() -> PublicKey {
        PublicKey::parse(CACHE_NIXOS_ORG_KEY).unwrap()
    }

    fn trusted_by(key: &str) -> Result<Trust, SigningError> {
        Ok(Trust::Trusted { key: key.into() })
    }

    fn bad_sig(key: &str) -> Result<Trust, SigningError> {
        Err(SigningError::BadSignature { key: key.into() })
    }

    #[test]
    fn public_key_round_trips() {
        let k = cache_key();
        assert_eq!(k.name(), "cache.nixos.org-1");
        assert_eq!(k.to_string(), CACHE_NIXOS_ORG_KEY);
        assert_eq!(CACHE_NIXOS_ORG_KEY.parse::<PublicKey>().unwrap(), k);
        assert_eq!(
            PublicKey::parse(&format!(" {CACHE_NIXOS_ORG_KEY}\n")).unwrap(),
            k
        );
    }

    #[test]
    fn rejects_bad_keys() {
        use SigningError::*;
        for s in [
            "",
            "nocolon",
            ":6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
            "name:",
        ] {
            assert_eq!(PublicKey::parse(s), Err(MalformedKey), "{s:?}");
        }
        assert!(matches!(
            PublicKey::parse("k:not base64!"),
            Err(BadKey {
                reason: "invalid base64",
                ..
            })
        ));
        assert!(matches!(
            PublicKey::parse(&format!("k:{}", BASE64.encode([1u8; 31]))),
            Err(BadKey {
                reason: "public key is not 32 bytes",
                ..
            })
        ));
        // A 64-byte secret key is not a public key, and vice versa.
        assert!(PublicKey::parse(NIX_SK).is_err());
        assert!(SecretKey::parse(NIX_PK).is_err());
        // Secret key whose public half does not belong to the seed.
        let mut bytes = [7u8; 64];
        bytes[32..].copy_from_slice(
            SecretKey::generate("x", [8; 32])
                .public_key()
                .key
                .as_bytes(),
        );
        let e = SecretKey::parse(&format!("x:{}", BASE64.encode(bytes))).unwrap_err();
        assert!(matches!(e, BadKey { ref name, .. } if name == "x"), "{e}");
    }

    #[test]
    fn hydra_vectors_verify() {
        let trusted = [cache_key()];
        for (what, text) in VECTORS {
            let info = NarInfo::parse(text).unwrap();
            assert_eq!(
                verify_narinfo(&info, &trusted),
                trusted_by("cache.nixos.org-1"),
                "{what}"
            );
            assert!(verify_signature(
                &info.fingerprint(),
                &info.sigs[0],
                &trusted[0]
            ));
            assert!(trusted[0].verify(&info.fingerprint(), &info.sigs[0]));
            // No trusted keys at all: nothing is trusted, nothing fails.
            assert_eq!(verify_narinfo(&info, &[]), Ok(Trust::Untrusted), "{what}");
            assert_eq!(NarInfo::parse(&info.to_text()).unwrap(), info, "{what}");
        }
    }

    #[test]
    fn signed_fields_are_covered() {
        let trusted = [cache_key()];
        let other = StorePath::from_base_name("00000000000000000000000000000000-other").unwrap();
        for (what, text) in VECTORS {
            let info = NarInfo::parse(text).unwrap();
            let mut tampered: Vec<(&str, NarInfo)> = Vec::new();
            let mut t = info.clone();
            t.store_path = other.clone();
            tampered.push(("StorePath", t));
            let mut t = info.clone();
            t.nar_hash = NarHash::digest(b"not this nar");
            tampered.push(("NarHash", t));
            let mut t = info.clone();
            t.nar_size += 1;
            tampered.push(("NarSize", t));
            let mut t = info.clone();
            t.references.pop();
            tampered.push(("References (removed)", t));
            let mut t = info.clone();
            t.references.push(other.clone());
            tampered.push(("References (added)", t));
            for (field, t) in tampered {
                assert_eq!(
                    verify_narinfo(&t, &trusted),
                    bad_sig("cache.nixos.org-1"),
                    "{what}: {field}"
                );
                assert!(!verify_signature(&t.fingerprint(), &t.sigs[0], &trusted[0]));
            }

            // Unsigned fields: the daemon rewrites these and the signature must still hold.
            let mut t = info.clone();
            t.url = format!("nar/{}.nar", info.nar_hash.to_base32());
            t.compression = Some("none".into());
            t.file_hash = None;
            t.file_size = None;
            t.deriver = None;
            t.extra.push(("X-Served-By".into(), "peer".into()));
            assert_eq!(
                verify_narinfo(&t, &trusted),
                trusted_by("cache.nixos.org-1"),
                "{what}"
            );
            let mut t = info.clone();
            t.file_hash = Some(info.nar_hash.to_string());
            t.file_size = Some(info.nar_size);
            assert_eq!(
                verify_narinfo(&t, &trusted),
                trusted_by("cache.nixos.org-1")
            );
        }
    }

    #[test]
    fn sig_handling_rules() {
        let cache = cache_key();
        let mine = SecretKey::generate("mine-1", [42; 32]);
        let info = NarInfo::parse(VECTORS[1].1).unwrap();
        let hydra_sig = info.sigs[0].clone();

        // Unknown names are ignored; a valid trusted sig alongside wins.
        let mut t = info.clone();
        t.sigs.insert(0, mine.sign("something else entirely"));
        assert_eq!(
            verify_narinfo(&t, std::slice::from_ref(&cache)),
            trusted_by("cache.nixos.org-1")
        );
        // Only unknown names: untrusted.
        t.sigs.retain(|s| s != &hydra_sig);
        assert_eq!(
            verify_narinfo(&t, std::slice::from_ref(&cache)),
            Ok(Trust::Untrusted)
        );
        // No sigs at all.
        t.sigs.clear();
        assert_eq!(
            verify_narinfo(&t, std::slice::from_ref(&cache)),
            Ok(Trust::Untrusted)
        );

        // A second trusted key that signed the same narinfo.
        let mut t = info.clone();
        t.sigs.push(mine.sign(&info.fingerprint()));
        let both = [mine.public_key(), cache.clone()];
        assert_eq!(verify_narinfo(&t, &both), trusted_by("cache.nixos.org-1"));
        assert_eq!(
            verify_narinfo(&t, &[mine.public_key()]),
            trusted_by("mine-1")
        );

        // A trusted name whose signature does not verify is an error, even next to a good one.
        let mut t = info.clone();
        t.sigs.push(mine.sign("wrong fingerprint"));
        assert_eq!(verify_narinfo(&t, &both), bad_sig("mine-1"));
        // A different key under a trusted name.
        let impostor = SecretKey::generate("cache.nixos.org-1", [1; 32]);
        let mut t = info.clone();
        t.sigs = vec![impostor.sign(&info.fingerprint())];
        assert_eq!(
            verify_narinfo(&t, std::slice::from_ref(&cache)),
            bad_sig("cache.nixos.org-1")
        );

        // Malformed Sig lines.
        for bad in [
            "no-colon",
            ":AAAA",
            "k:not base64!",
            "k:AAAA",
            &format!("k:{}", BASE64.encode([0u8; 63])),
            &format!("k:{}", BASE64.encode([0u8; 65])),
        ] {
            let mut t = info.clone();
            t.sigs.push(bad.to_string());
            assert!(
                matches!(
                    verify_narinfo(&t, std::slice::from_ref(&cache)),
                    Err(SigningError::MalformedSig { ref sig, .. }) if sig == bad
                ),
                "{bad:?}"
            );
            assert!(!verify_signature(&info.fingerprint(), bad, &cache));
        }
        // verify_signature checks the name too.
        let renamed = hydra_sig.replacen("cache.nixos.org-1", "other", 1);
        assert!(!verify_signature(&info.fingerprint(), &renamed, &cache));
    }

    #[test]
    fn nix_generated_keys_and_signatures() {
        let sk = SecretKey::parse(NIX_SK).unwrap();
        let pk = PublicKey::parse(NIX_PK).unwrap();
        assert_eq!(sk.name(), "test-key-1");
        assert_eq!(sk.public_key(), pk);
        assert_eq!(pk.to_string(), NIX_PK.trim());
        assert_eq!(sk.to_nix_format(), NIX_SK.trim());
        for text in NIX_NARINFOS {
            let info = NarInfo::parse(text).unwrap();
            assert_eq!(info.sigs.len(), 1);
            // ed25519 is deterministic: our signature is byte-for-byte Nix's.
            assert_eq!(sk.sign(&info.fingerprint()), info.sigs[0]);
            assert_eq!(
                verify_narinfo(&info, std::slice::from_ref(&pk)),
                trusted_by("test-key-1")
            );
            assert_eq!(verify_narinfo(&info, &[cache_key()]), Ok(Trust::Untrusted));
            assert_eq!(
                verify_narinfo(&info, &[cache_key(), pk.clone()]),
                trusted_by("test-key-1")
            );
        }
    }

    #[test]
    fn secret_key_debug_hides_seed() {
        let sk = SecretKey::parse(NIX_SK).unwrap();
        let dbg = format!("{sk:?}");
        let secret_b64 = NIX_SK.trim().split_once(':').unwrap().1;
        assert!(
            !dbg.contains(secret_b64) && !dbg.contains(&secret_b64[..20]),
            "{dbg}"
        );
        assert!(dbg.contains("test-key-1"));
    }

    proptest! {
        #[test]
        fn sign_verify_round_trip(seed in any::<[u8; 32]>(), fp in "\\PC{0,100}", other in "\\PC{0,100}") {
            let sk = SecretKey::generate("k-1", seed);
            let pk = sk.public_key();
            prop_assert_eq!(PublicKey::parse(&pk.to_string()).unwrap(), pk.clone());
            let reparsed = SecretKey::parse(&sk.to_nix_format()).unwrap();
            prop_assert_eq!(reparsed.public_key(), pk.clone());
            let sig = sk.sign(&fp);
            prop_assert!(verify_signature(&fp, &sig, &pk));
            prop_assert_eq!(verify_signature(&other, &sig, &pk), other == fp);
        }
    }
}
