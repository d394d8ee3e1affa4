//! Nix store paths: `StorePathHash` (the 32 nix-base32 characters that name a path) and
//! `StorePath` (hash + name), with Nix's own validation rules.
//!
//! Owns the textual forms `/nix/store/<hash>-<name>` (absolute) and `<hash>-<name>` (base
//! name, as narinfo `References:` spell them). Pure code, no I/O: it never looks at the
//! file system, so a valid `StorePath` need not exist.

use std::fmt;
use std::str::FromStr;

use super::base32;

/// The only store directory this cache serves.
pub const STORE_DIR: &str = "/nix/store";

/// Length of the hash part of a store path, in nix-base32 characters (160 bits).
pub const HASH_LEN: usize = 32;

/// Longest name Nix accepts (255 minus the hash and the dash).
pub const MAX_NAME_LEN: usize = 211;

/// Errors when parsing store paths and their parts. Each variant carries the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("store path hash {0:?} is not 32 nix-base32 characters")]
    BadHash(String),
    #[error("path {0:?} is not directly under {STORE_DIR}/")]
    NotInStore(String),
    #[error("store path {0:?} is not of the form <hash>-<name>")]
    MissingName(String),
    #[error("store path name {name:?} is invalid: {reason}")]
    BadName { name: String, reason: &'static str },
}

/// The hash part of a store path: exactly 32 nix-base32 characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathHash(String);

impl StorePathHash {
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        if s.len() == HASH_LEN && s.bytes().all(base32::is_base32_char) {
            Ok(Self(s.to_string()))
        } else {
            Err(StorePathError::BadHash(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({})", self.0)
    }
}

impl FromStr for StorePathHash {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A store path `/nix/store/<hash>-<name>`.
///
/// Ordering is that of the base names, which is the order Nix keeps reference sets in.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    hash: StorePathHash,
    name: String,
}

impl StorePath {
    /// Parses the absolute form `/nix/store/<hash>-<name>` (no trailing slash, no sub-path).
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        let base = s
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .filter(|b| !b.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_string()))?;
        Self::from_base_name(base)
    }

    /// Parses the base name `<hash>-<name>`.
    pub fn from_base_name(s: &str) -> Result<Self, StorePathError> {
        let (hash, name) = match (s.get(..HASH_LEN), s.get(HASH_LEN..)) {
            (Some(h), Some(rest)) => match rest.strip_prefix('-') {
                Some(name) => (h, name),
                None => return Err(StorePathError::MissingName(s.to_string())),
            },
            _ => return Err(StorePathError::MissingName(s.to_string())),
        };
        let hash = StorePathHash::parse(hash)?;
        check_name(name)?;
        Ok(Self {
            hash,
            name: name.to_string(),
        })
    }

    /// Builds a store path from its parts, validating the name.
    pub fn from_parts(hash: StorePathHash, name: &str) -> Result<Self, StorePathError> {
        check_name(name)?;
        Ok(Self {
            hash,
            name: name.to_string(),
        })
    }

    pub fn hash(&self) -> &StorePathHash {
        &self.hash
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}-{}", self.hash, self.name)
    }
}

impl fmt::Display for StorePath {
    /// The absolute form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash, self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Checks a store path name the way Nix does: 1..=211 characters from `[A-Za-z0-9+-._?=]`,
/// not starting with `.`.
/// Whether `c` may appear in a store path name (`[A-Za-z0-9+-._?=]`).
pub fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"+-._?=".contains(&c)
}

fn check_name(name: &str) -> Result<(), StorePathError> {
    let bad = |reason| {
        Err(StorePathError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 211 characters");
    }
    if name.starts_with('.') {
        return bad("starts with '.'");
    }
    if !name.bytes().all(is_name_char) {
        return bad("contains a character outside [A-Za-z0-9+-._?=]");
    }
    Ok(())
}

/// CLI convenience: the store path hash named by `s`, which may be a bare hash, a base name
/// `<hash>-<name>`, or an absolute path `/nix/store/<hash>-<name>` (a trailing sub-path such
/// as `/bin/hello` is allowed and ignored).
pub fn parse_hash_or_path(s: &str) -> Result<StorePathHash, StorePathError> {
    if let Some(rest) = s.strip_prefix(STORE_DIR) {
        let base = rest
            .strip_prefix('/')
            .and_then(|r| r.split('/').next())
            .ok_or_else(|| StorePathError::NotInStore(s.to_string()))?;
        return Ok(StorePath::from_base_name(base)?.hash);
    }
    if s.starts_with('/') {
        return Err(StorePathError::NotInStore(s.to_string()));
    }
    if s.len() == HASH_LEN {
        return StorePathHash::parse(s);
    }
    Ok(StorePath::from_base_name(s)?.hash)
}

/// Proptest strategies, shared with the narinfo tests.
#[cfg(test)]
pub(crate) use tests::arb_store_path;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HELLO: &str = "/nix/store/gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10";

    #[test]
    fn parses_absolute_and_base_name() {
        let p = StorePath::parse(HELLO).unwrap();
        assert_eq!(p.hash().as_str(), "gdh8165b7rg4y53v64chjys7mbbw89f9");
        assert_eq!(p.name(), "hello-2.10");
        assert_eq!(p.base_name(), "gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10");
        assert_eq!(p.to_absolute(), HELLO);
        assert_eq!(p.to_string(), HELLO);
        assert_eq!(StorePath::from_base_name(&p.base_name()).unwrap(), p);
        assert_eq!(HELLO.parse::<StorePath>().unwrap(), p);
        let q = StorePath::from_parts(p.hash().clone(), "hello-2.10").unwrap();
        assert_eq!(q, p);
    }

    #[test]
    fn rejects_bad_paths() {
        use StorePathError::*;
        let h = "gdh8165b7rg4y53v64chjys7mbbw89f9";
        // Not under /nix/store, or with a sub-path.
        assert!(matches!(
            StorePath::parse(&format!("/gnu/store/{h}-x")),
            Err(NotInStore(_))
        ));
        assert!(matches!(
            StorePath::parse(&format!("/nix/store/{h}-x/bin")),
            Err(NotInStore(_))
        ));
        assert!(matches!(
            StorePath::parse(&format!("/nix/store{h}-x")),
            Err(NotInStore(_))
        ));
        // Hash: wrong alphabet ('e', 'o', 'u', 't' are not nix-base32), upper case.
        assert_eq!(
            StorePath::from_base_name("edh8165b7rg4y53v64chjys7mbbw89f9-x"),
            Err(BadHash("edh8165b7rg4y53v64chjys7mbbw89f9".into()))
        );
        assert!(matches!(
            StorePath::from_base_name("GDH8165B7RG4Y53V64CHJYS7MBBW89F9-x"),
            Err(BadHash(_))
        ));
        // Missing dash or name.
        assert!(matches!(StorePath::from_base_name(h), Err(MissingName(_))));
        assert!(matches!(
            StorePath::from_base_name(&format!("{h}_x")),
            Err(MissingName(_))
        ));
        assert!(matches!(
            StorePath::from_base_name("short-x"),
            Err(MissingName(_))
        ));
        // Multi-byte character straddling the hash boundary must not panic.
        assert!(StorePath::from_base_name(&format!("{}é-x", &h[..31])).is_err());
        // Names.
        for name in ["", ".hidden", "a b", "a/b", "ü", "a:b", "a@b"] {
            let r = StorePath::from_base_name(&format!("{h}-{name}"));
            assert!(
                matches!(&r, Err(BadName { name: n, .. }) if n == name),
                "{name:?}: {r:?}"
            );
        }
        for name in ["a", "x.y", "A-Z+a_z?=0.9", "-dash", "_"] {
            assert!(
                StorePath::from_base_name(&format!("{h}-{name}")).is_ok(),
                "{name}"
            );
        }
        let long = "a".repeat(MAX_NAME_LEN);
        assert!(StorePath::from_base_name(&format!("{h}-{long}")).is_ok());
        assert!(matches!(
            StorePath::from_base_name(&format!("{h}-{long}a")),
            Err(BadName { .. })
        ));
    }

    #[test]
    fn hash_or_path() {
        let h = StorePathHash::parse("gdh8165b7rg4y53v64chjys7mbbw89f9").unwrap();
        for s in [
            "gdh8165b7rg4y53v64chjys7mbbw89f9",
            "gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10",
            HELLO,
            "/nix/store/gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10/bin/hello",
        ] {
            assert_eq!(parse_hash_or_path(s).unwrap(), h, "{s}");
        }
        for s in [
            "",
            "gdh8165b7rg4y53v64chjys7mbbw89f",
            "/tmp/gdh8165b7rg4y53v64chjys7mbbw89f9-hello",
            "/nix/store",
            "/nix/store/",
            "/nix/store/gdh8165b7rg4y53v64chjys7mbbw89f9",
            "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
        ] {
            assert!(parse_hash_or_path(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn order_is_base_name_order() {
        let a = StorePath::from_base_name("00000000000000000000000000000000-zzz").unwrap();
        let b = StorePath::from_base_name("00000000000000000000000000000001-aaa").unwrap();
        let c = StorePath::from_base_name("00000000000000000000000000000001-aab").unwrap();
        assert!(a < b && b < c);
        assert!(a.base_name() < b.base_name() && b.base_name() < c.base_name());
    }

    pub(crate) fn arb_hash() -> impl Strategy<Value = StorePathHash> {
        "[0-9a-df-np-sv-z]{32}".prop_map(|s| StorePathHash::parse(&s).unwrap())
    }

    pub(crate) fn arb_store_path() -> impl Strategy<Value = StorePath> {
        (arb_hash(), "[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,40}")
            .prop_map(|(h, n)| StorePath::from_parts(h, &n).unwrap())
    }

    proptest! {
        #[test]
        fn round_trip(p in arb_store_path()) {
            prop_assert_eq!(StorePath::parse(&p.to_absolute()).unwrap(), p.clone());
            prop_assert_eq!(StorePath::from_base_name(&p.base_name()).unwrap(), p.clone());
            prop_assert_eq!(parse_hash_or_path(&p.to_string()).unwrap(), p.hash().clone());
            prop_assert_eq!(parse_hash_or_path(p.hash().as_str()).unwrap(), p.hash().clone());
        }

        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = StorePath::parse(&s);
            let _ = StorePath::from_base_name(&s);
            let _ = parse_hash_or_path(&s);
        }
    }
}
