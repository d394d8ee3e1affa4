//! The `.narinfo` text format: parsing, serialising in Nix's field order, and the signature
//! fingerprint.
//!
//! Owns `NarInfo` and its `Key: value` grammar. It does not check signatures (see
//! `core::signing`) and does not fetch or store anything. Pure code, no I/O.

use std::fmt;

use super::hash::{HashError, NarHash};
use super::store_path::{StorePath, StorePathError};

/// A parsed narinfo. Every field Nix writes has its own member; any other `Key: value` line is
/// kept, in order, in `extra`, so that a narinfo passes through unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    pub url: String,
    pub compression: Option<String>,
    pub file_hash: Option<String>,
    pub file_size: Option<u64>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// In file order (Nix writes them sorted); see `fingerprint` for the signed order.
    pub references: Vec<StorePath>,
    /// Base name of the deriver (`<hash>-<name>.drv`), kept verbatim.
    pub deriver: Option<String>,
    pub system: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    pub extra: Vec<(String, String)>,
}

/// A narinfo that could not be parsed: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("narinfo line {line}: {reason}")]
pub struct NarInfoError {
    /// 1-based line number; 0 for a required field missing at the end.
    pub line: usize,
    pub reason: NarInfoErrorReason,
}

/// Why a narinfo was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoErrorReason {
    #[error("{0:?} is not of the form `Key: value`")]
    NotKeyValue(String),
    #[error("bad StorePath: {0}")]
    BadStorePath(StorePathError),
    #[error("bad NarHash: {0}")]
    BadNarHash(HashError),
    #[error("{field} {value:?} is not a non-negative integer")]
    BadNumber { field: &'static str, value: String },
    #[error("NarSize must not be 0")]
    ZeroNarSize,
    #[error("bad reference: {0}")]
    BadReference(StorePathError),
    #[error("duplicate field {0}")]
    Duplicate(&'static str),
    #[error("missing required field {0}")]
    Missing(&'static str),
}

/// The compression Nix assumes when a narinfo has no `Compression:` line.
pub const DEFAULT_COMPRESSION: &str = "bzip2";

/// Keys with a dedicated `NarInfo` field; anything else goes to `extra`.
const KNOWN_KEYS: [&str; 12] = [
    "StorePath",
    "URL",
    "Compression",
    "FileHash",
    "FileSize",
    "NarHash",
    "NarSize",
    "References",
    "Deriver",
    "System",
    "Sig",
    "CA",
];

/// True if `key` has its own `NarInfo` field (and so must not appear in `extra`).
pub fn is_known_key(key: &str) -> bool {
    KNOWN_KEYS.contains(&key)
}

impl NarInfo {
    /// Parses narinfo text. Empty lines are ignored, `\r\n` line ends and a missing final
    /// newline are accepted, and `Key:` with nothing after it counts as an empty value.
    pub fn parse(text: &str) -> Result<NarInfo, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut system = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        let mut extra = Vec::new();

        for (i, line) in text.lines().enumerate() {
            let lineno = i + 1;
            let err = |reason| NarInfoError {
                line: lineno,
                reason,
            };
            if line.trim().is_empty() {
                continue;
            }
            let (key, value) = split_line(line)
                .ok_or_else(|| err(NarInfoErrorReason::NotKeyValue(line.to_string())))?;

            // Stores a single-valued field, refusing a second occurrence.
            fn set<T>(
                slot: &mut Option<T>,
                key: &'static str,
                v: T,
            ) -> Result<(), NarInfoErrorReason> {
                if slot.is_some() {
                    return Err(NarInfoErrorReason::Duplicate(key));
                }
                *slot = Some(v);
                Ok(())
            }

            let r = match key {
                "StorePath" => StorePath::parse(value)
                    .map_err(NarInfoErrorReason::BadStorePath)
                    .and_then(|p| set(&mut store_path, "StorePath", p)),
                "URL" => set(&mut url, "URL", value.to_string()),
                "Compression" => set(&mut compression, "Compression", value.to_string()),
                "FileHash" => set(&mut file_hash, "FileHash", value.to_string()),
                "FileSize" => {
                    parse_u64("FileSize", value).and_then(|n| set(&mut file_size, "FileSize", n))
                }
                "NarHash" => NarHash::parse(value)
                    .map_err(NarInfoErrorReason::BadNarHash)
                    .and_then(|h| set(&mut nar_hash, "NarHash", h)),
                "NarSize" => parse_u64("NarSize", value).and_then(|n| {
                    if n == 0 {
                        Err(NarInfoErrorReason::ZeroNarSize)
                    } else {
                        set(&mut nar_size, "NarSize", n)
                    }
                }),
                "References" => value
                    .split(' ')
                    .filter(|r| !r.is_empty())
                    .map(StorePath::from_base_name)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(NarInfoErrorReason::BadReference)
                    .and_then(|refs| set(&mut references, "References", refs)),
                "Deriver" => set(&mut deriver, "Deriver", value.to_string()),
                "System" => set(&mut system, "System", value.to_string()),
                "Sig" => {
                    sigs.push(value.to_string());
                    Ok(())
                }
                "CA" => set(&mut ca, "CA", value.to_string()),
                _ => {
                    extra.push((key.to_string(), value.to_string()));
                    Ok(())
                }
            };
            r.map_err(err)?;
        }

        let missing = |field| NarInfoError {
            line: 0,
            reason: NarInfoErrorReason::Missing(field),
        };
        Ok(NarInfo {
            store_path: store_path.ok_or_else(|| missing("StorePath"))?,
            url: url.ok_or_else(|| missing("URL"))?,
            compression,
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size: nar_size.ok_or_else(|| missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver,
            system,
            sigs,
            ca,
            extra,
        })
    }

    /// Serialises in the order Nix writes: StorePath, URL, Compression, FileHash, FileSize,
    /// NarHash, NarSize, References, Deriver, System, Sig…, CA, then `extra` in order.
    ///
    /// `parse(to_text(x)) == x` holds as long as no value contains a line break, no value
    /// ends in `\r`, and no `extra` key is empty, contains `:` or is a known key.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(512);
        // Writing to a String cannot fail.
        let mut line = |key: &str, value: &dyn fmt::Display| {
            let _ = writeln!(out, "{key}: {value}");
        };
        line("StorePath", &self.store_path);
        line("URL", &self.url);
        if let Some(c) = &self.compression {
            line("Compression", c);
        }
        if let Some(h) = &self.file_hash {
            line("FileHash", h);
        }
        if let Some(s) = &self.file_size {
            line("FileSize", s);
        }
        line("NarHash", &self.nar_hash);
        line("NarSize", &self.nar_size);
        let refs: Vec<String> = self.references.iter().map(StorePath::base_name).collect();
        line("References", &refs.join(" "));
        if let Some(d) = &self.deriver {
            line("Deriver", d);
        }
        if let Some(s) = &self.system {
            line("System", s);
        }
        for s in &self.sigs {
            line("Sig", s);
        }
        if let Some(ca) = &self.ca {
            line("CA", ca);
        }
        for (k, v) in &self.extra {
            line(k, v);
        }
        out
    }

    /// The string Nix signs: `1;<store path>;<NarHash>;<NarSize>;<references>`, with the
    /// NarHash as `sha256:<nix-base32>` and the references as absolute paths, sorted and
    /// de-duplicated (Nix keeps them in a set), joined by commas.
    pub fn fingerprint(&self) -> String {
        let mut refs: Vec<&StorePath> = self.references.iter().collect();
        refs.sort();
        refs.dedup();
        let refs: Vec<String> = refs.into_iter().map(StorePath::to_absolute).collect();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash,
            self.nar_size,
            refs.join(",")
        )
    }

    /// The compression of the file at `url`, with Nix's default when the line is absent.
    pub fn compression_or_default(&self) -> &str {
        self.compression.as_deref().unwrap_or(DEFAULT_COMPRESSION)
    }
}

impl fmt::Display for NarInfo {
    /// The narinfo text, as `to_text`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// Splits `Key: value`; a bare `Key:` has the empty value.
fn split_line(line: &str) -> Option<(&str, &str)> {
    let (key, rest) = line.split_once(':')?;
    if key.is_empty() {
        return None;
    }
    if rest.is_empty() {
        return Some((key, ""));
    }
    Some((key, rest.strip_prefix(' ')?))
}

fn parse_u64(field: &'static str, value: &str) -> Result<u64, NarInfoErrorReason> {
    let bad = || NarInfoErrorReason::BadNumber {
        field,
        value: value.to_string(),
    };
    if value.is_empty() || !value.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store_path::arb_store_path;
    use proptest::prelude::*;

    const HELLO: &str = include_str!("../../../testdata/cache.nixos.org/hello-2.10-gdh8.narinfo");
    const NIX_DEP: &str = include_str!("../../../testdata/nix/sig-vec-dep.narinfo");

    pub(crate) const VECTORS: [&str; 4] = [
        include_str!("../../../testdata/cache.nixos.org/curl-7.82.0-bin.narinfo"),
        HELLO,
        include_str!("../../../testdata/cache.nixos.org/hello-2.10-w9yy.narinfo"),
        include_str!("../../../testdata/cache.nixos.org/ripgrep-15.2.0.narinfo"),
    ];

    fn err_of(text: &str) -> NarInfoError {
        NarInfo::parse(text).expect_err(text)
    }

    #[test]
    fn parses_hydra_narinfo() {
        let n = NarInfo::parse(HELLO).unwrap();
        assert_eq!(
            n.store_path.to_string(),
            "/nix/store/gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10"
        );
        assert_eq!(
            n.url,
            "nar/0i6ardx43rdg24ab1nc3mq7f5ykyiamymh1v37gxdv5xh5cm0cmb.nar.xz"
        );
        assert_eq!(n.compression.as_deref(), Some("xz"));
        assert_eq!(
            n.file_hash.as_deref(),
            Some("sha256:0i6ardx43rdg24ab1nc3mq7f5ykyiamymh1v37gxdv5xh5cm0cmb")
        );
        assert_eq!(n.file_size, Some(40360));
        assert_eq!(
            n.nar_hash.to_string(),
            "sha256:1ddv0iqq47j0awyw7a8dmm8bz71c6ifrliq53kmmsfzjxf3rwvb8"
        );
        assert_eq!(n.nar_size, 197528);
        let refs: Vec<String> = n.references.iter().map(|r| r.base_name()).collect();
        assert_eq!(
            refs,
            [
                "7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc-2.27",
                "gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10"
            ]
        );
        assert_eq!(
            n.deriver.as_deref(),
            Some("5sj6fdfym58sdaf3r5p87v4l8sj2zlvn-hello-2.10.drv")
        );
        assert_eq!(n.system, None);
        assert_eq!(n.sigs.len(), 1);
        assert!(n.sigs[0].starts_with("cache.nixos.org-1:K0thQEG60"));
        assert_eq!(n.ca, None);
        assert!(n.extra.is_empty());
        assert_eq!(
            n.fingerprint(),
            "1;/nix/store/gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10;\
             sha256:1ddv0iqq47j0awyw7a8dmm8bz71c6ifrliq53kmmsfzjxf3rwvb8;197528;\
             /nix/store/7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc-2.27,\
             /nix/store/gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10"
        );
    }

    #[test]
    fn vectors_round_trip_byte_for_byte() {
        // Nix's own writer and ours agree on the text, not just the struct.
        for text in VECTORS.iter().chain([&NIX_DEP]) {
            let n = NarInfo::parse(text).unwrap();
            assert_eq!(NarInfo::parse(&n.to_text()).unwrap(), n);
            assert_eq!(n.to_text(), text.trim_end().to_string() + "\n");
            assert_eq!(n.to_string(), n.to_text());
        }
    }

    #[test]
    fn parses_nix_written_ca_and_empty_references() {
        let n = NarInfo::parse(NIX_DEP).unwrap();
        assert!(n.references.is_empty());
        assert_eq!(
            n.ca.as_deref(),
            Some("text:sha256:1i0xww8znqa2wqbggkmgxy6was90nqc60b4wpv4hvwv1460id9dl")
        );
        assert!(n.fingerprint().ends_with(";128;"), "{}", n.fingerprint());
        assert!(n.to_text().contains("\nReferences: \n"));
    }

    #[test]
    fn liberal_input() {
        let minimal = "StorePath: /nix/store/gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10\n\
                       URL: nar/x.nar\n\
                       NarHash: sha256:1ddv0iqq47j0awyw7a8dmm8bz71c6ifrliq53kmmsfzjxf3rwvb8\n\
                       NarSize: 5";
        let n = NarInfo::parse(minimal).unwrap();
        assert!(n.references.is_empty());
        assert_eq!(n.compression_or_default(), "bzip2");
        assert_eq!(n.nar_size, 5);
        // CRLF, blank lines, bare `References:`, unknown fields kept in order.
        let crlf = format!(
            "\r\n{}\r\n\r\nReferences:\r\nX-Two: b\r\nX-One: a c \r\n",
            minimal.replace('\n', "\r\n")
        );
        let m = NarInfo::parse(&crlf).unwrap();
        assert!(m.references.is_empty());
        assert_eq!(
            m.extra,
            [
                ("X-Two".to_string(), "b".to_string()),
                ("X-One".to_string(), "a c ".to_string())
            ]
        );
        // Double spaces between references; hex NarHash.
        let hexed = HELLO.replace(" gdh8", "  gdh8").replace(
            "sha256:1ddv0iqq47j0awyw7a8dmm8bz71c6ifrliq53kmmsfzjxf3rwvb8",
            &format!(
                "sha256:{}",
                hex::encode(NarInfo::parse(HELLO).unwrap().nar_hash.0)
            ),
        );
        assert_eq!(
            NarInfo::parse(&hexed).unwrap(),
            NarInfo::parse(HELLO).unwrap()
        );
    }

    #[test]
    fn errors_carry_line_and_reason() {
        use NarInfoErrorReason as R;
        let with = |from: &str, to: &str| {
            assert!(HELLO.contains(from), "{from}");
            HELLO.replace(from, to)
        };
        // HELLO's lines: 1 StorePath, 2 URL, 3 Compression, 4 FileHash, 5 FileSize,
        // 6 NarHash, 7 NarSize, 8 References, 9 Deriver, 10 Sig.
        let e = err_of(&with("URL: ", "URL "));
        assert_eq!(e.line, 2);
        assert!(matches!(e.reason, R::NotKeyValue(_)));
        assert!(matches!(
            err_of(&with("URL: ", "URL:x")).reason,
            R::NotKeyValue(_)
        ));
        assert!(matches!(
            err_of(&with("URL: ", ": ")).reason,
            R::NotKeyValue(_)
        ));

        let e = err_of(&with("/nix/store/gdh8", "/nix/stor/gdh8"));
        assert_eq!(e.line, 1);
        assert!(matches!(
            e.reason,
            R::BadStorePath(StorePathError::NotInStore(_))
        ));

        let e = err_of(&with("NarHash: sha256:1dd", "NarHash: sha256:dd"));
        assert_eq!(e.line, 6);
        assert!(matches!(e.reason, R::BadNarHash(_)));
        assert!(matches!(
            err_of(&with("NarHash: sha256:", "NarHash: md5:")).reason,
            R::BadNarHash(_)
        ));

        let e = err_of(&with("NarSize: 197528", "NarSize: 19x"));
        assert_eq!(e.line, 7);
        assert_eq!(
            e.reason,
            R::BadNumber {
                field: "NarSize",
                value: "19x".into()
            }
        );
        for bad in ["-1", "+1", "", " 1", "99999999999999999999"] {
            let e = err_of(&with("FileSize: 40360", &format!("FileSize: {bad}")));
            assert_eq!(e.line, 5);
            assert!(
                matches!(
                    e.reason,
                    R::BadNumber {
                        field: "FileSize",
                        ..
                    }
                ),
                "{bad}"
            );
        }
        let e = err_of(&with("NarSize: 197528", "NarSize: 0"));
        assert_eq!((e.line, e.reason), (7, R::ZeroNarSize));

        let e = err_of(&with(" gdh8", " /nix/store/gdh8"));
        assert_eq!(e.line, 8);
        assert!(matches!(e.reason, R::BadReference(_)));
        let e = err_of(&with("glibc-2.27", "glibc 2.27"));
        assert!(matches!(e.reason, R::BadReference(_)));

        let e = err_of(&format!("{HELLO}NarSize: 1\n"));
        assert_eq!((e.line, e.reason), (11, R::Duplicate("NarSize")));
        let e = err_of(&format!("{HELLO}References: \n"));
        assert_eq!(e.reason, R::Duplicate("References"));
        let e = err_of(&format!("{HELLO}Deriver: x\n"));
        assert_eq!(e.reason, R::Duplicate("Deriver"));
        // Several Sig lines are fine.
        let n = NarInfo::parse(&format!("{HELLO}Sig: other:abc\n")).unwrap();
        assert_eq!(n.sigs.len(), 2);
        assert_eq!(n.sigs[1], "other:abc");

        for (field, prefix) in [
            ("StorePath", "StorePath: "),
            ("URL", "URL: "),
            ("NarHash", "NarHash: "),
            ("NarSize", "NarSize: "),
        ] {
            let text: String = HELLO
                .lines()
                .filter(|l| !l.starts_with(prefix))
                .map(|l| format!("{l}\n"))
                .collect();
            let e = err_of(&text);
            assert_eq!((e.line, e.reason), (0, R::Missing(field)));
        }
        assert_eq!(err_of("").reason, R::Missing("StorePath"));
        assert_eq!(
            err_of(&with("NarSize: 197528", "NarSize: 0")).to_string(),
            "narinfo line 7: NarSize must not be 0"
        );
    }

    #[test]
    fn fingerprint_sorts_and_dedups_references() {
        let mut n = NarInfo::parse(HELLO).unwrap();
        let fp = n.fingerprint();
        n.references.reverse();
        n.references.push(n.references[0].clone());
        assert_eq!(n.fingerprint(), fp);
    }

    fn arb_line_value() -> impl Strategy<Value = String> {
        "[^\r\n]{0,24}".prop_filter("no trailing CR", |s| !s.ends_with('\r'))
    }

    prop_compose! {
        fn arb_narinfo()(
            store_path in arb_store_path(),
            url in arb_line_value(),
            compression in proptest::option::of(arb_line_value()),
            file_hash in proptest::option::of(arb_line_value()),
            file_size in proptest::option::of(any::<u64>()),
            nar_hash in any::<[u8; 32]>(),
            nar_size in 1..=u64::MAX,
            references in proptest::collection::vec(arb_store_path(), 0..5),
            deriver in proptest::option::of(arb_line_value()),
            system in proptest::option::of(arb_line_value()),
            sigs in proptest::collection::vec(arb_line_value(), 0..3),
            ca in proptest::option::of(arb_line_value()),
            extra in proptest::collection::vec(
                ("[A-Za-z][A-Za-z0-9-]{0,12}".prop_filter("unknown key", |k| !is_known_key(k)),
                 arb_line_value()),
                0..3,
            ),
        ) -> NarInfo {
            NarInfo {
                store_path, url, compression, file_hash, file_size,
                nar_hash: NarHash(nar_hash), nar_size, references, deriver, system, sigs, ca,
                extra,
            }
        }
    }

    proptest! {
        #[test]
        fn round_trip(n in arb_narinfo()) {
            let text = n.to_text();
            prop_assert_eq!(NarInfo::parse(&text).unwrap(), n.clone());
            // A missing final newline is accepted too.
            prop_assert_eq!(NarInfo::parse(text.trim_end_matches('\n')).unwrap(), n);
        }

        #[test]
        fn never_panics(text in "(\\PC{0,40}\n){0,8}") {
            let _ = NarInfo::parse(&text);
        }
    }
}
