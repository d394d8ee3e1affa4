//! What Nix is configured with and what its narinfo disk cache remembers, read without changing
//! either: the effective settings from `nix show-config` (else `nix.conf` files and
//! `NIX_CONFIG`, as Nix reads them), and `binary-cache-v6.sqlite` through the `sqlite3`
//! program (no SQLite library is linked for one query).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::core::signing::CACHE_NIXOS_ORG_KEY;

/// Errors reading Nix's settings or its narinfo cache.
#[derive(Debug, thiserror::Error)]
pub enum NixReadError {
    #[error("running {program}: {error}")]
    Spawn {
        program: &'static str,
        error: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Failed {
        program: &'static str,
        stderr: String,
    },
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Nix's effective settings: `key = value` text, lists separated by whitespace.
#[derive(Debug, Clone)]
pub struct NixConfig {
    values: BTreeMap<String, String>,
    /// Where the settings came from (`nix show-config`, or the files read).
    pub source: String,
}

/// Nix's defaults for the settings `doctor` reads, for when only files are read.
const DEFAULTS: &[(&str, &str)] = &[
    ("substituters", "https://cache.nixos.org/"),
    ("trusted-substituters", ""),
    ("trusted-public-keys", CACHE_NIXOS_ORG_KEY),
    ("require-sigs", "true"),
    ("narinfo-cache-negative-ttl", "3600"),
];

impl NixConfig {
    /// `nix show-config`; if that fails, the files Nix reads and `NIX_CONFIG`.
    pub fn load() -> NixConfig {
        match Self::from_nix() {
            Ok(c) => c,
            Err(e) => {
                let mut c = Self::from_files();
                c.source = format!("{} (`nix show-config`: {e})", c.source);
                c
            }
        }
    }

    /// The settings `nix show-config` prints (Nix ≥ 2.4; the flag enables the command on the
    /// versions where it is experimental).
    pub fn from_nix() -> Result<NixConfig, NixReadError> {
        let out = Command::new("nix")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "show-config",
            ])
            .output()
            .map_err(|error| NixReadError::Spawn {
                program: "nix",
                error,
            })?;
        if !out.status.success() {
            return Err(NixReadError::Failed {
                program: "nix show-config",
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let mut c = NixConfig::empty("nix show-config");
        c.apply_text(&String::from_utf8_lossy(&out.stdout), None);
        Ok(c)
    }

    /// Nix's defaults, then `$NIX_CONF_DIR/nix.conf` (`/etc/nix`), the user's files
    /// (`$NIX_USER_CONF_FILES`, else `$XDG_CONFIG_HOME/nix/nix.conf`), then `$NIX_CONFIG`.
    pub fn from_files() -> NixConfig {
        let mut c = NixConfig::empty("");
        for (k, v) in DEFAULTS {
            c.values.insert((*k).to_string(), (*v).to_string());
        }
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let system = env("NIX_CONF_DIR")
            .map_or_else(|| PathBuf::from("/etc/nix"), PathBuf::from)
            .join("nix.conf");
        let mut files = vec![system];
        match env("NIX_USER_CONF_FILES") {
            Some(list) => files.extend(std::env::split_paths(&list)),
            None => files.extend(
                crate::config::xdg_dir("XDG_CONFIG_HOME", ".config")
                    .map(|h| h.join("nix/nix.conf")),
            ),
        }
        let mut read = Vec::new();
        for f in &files {
            if c.apply_file(f, 0) {
                read.push(f.display().to_string());
            }
        }
        if let Ok(text) = std::env::var("NIX_CONFIG") {
            c.apply_text(&text, None);
            read.push("$NIX_CONFIG".to_string());
        }
        c.source = if read.is_empty() {
            "Nix's defaults (no nix.conf found)".to_string()
        } else {
            read.join(", ")
        };
        c
    }

    fn empty(source: &str) -> NixConfig {
        NixConfig {
            values: BTreeMap::new(),
            source: source.to_string(),
        }
    }

    /// Settings from `key = value` text (`nix.conf` or `nix show-config`): `extra-KEY` appends
    /// to KEY, `include F` / `!include F` read F relative to `dir`.
    pub fn parse(text: &str) -> NixConfig {
        let mut c = NixConfig::empty("");
        c.apply_text(text, None);
        c
    }

    fn apply_file(&mut self, path: &Path, depth: u32) -> bool {
        match std::fs::read_to_string(path) {
            Ok(text) if depth < 8 => {
                self.apply_text(&text, path.parent().map(|d| (d, depth)));
                true
            }
            _ => false,
        }
    }

    fn apply_text(&mut self, text: &str, dir: Option<(&Path, u32)>) {
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if let Some(f) = line
                .strip_prefix("!include ")
                .or_else(|| line.strip_prefix("include "))
            {
                let (base, depth) = dir.unwrap_or((Path::new("/"), 0));
                self.apply_file(&base.join(f.trim()), depth + 1);
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            match k.strip_prefix("extra-") {
                Some(base) => {
                    let cur = self.values.entry(base.to_string()).or_default();
                    if !cur.is_empty() && !v.is_empty() {
                        cur.push(' ');
                    }
                    cur.push_str(v);
                }
                None => {
                    self.values.insert(k.to_string(), v.to_string());
                }
            }
        }
    }

    /// A setting's value (Nix's default when `nix show-config` did not print it).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .or_else(|| DEFAULTS.iter().find(|(k, _)| *k == key).map(|(_, v)| *v))
    }

    /// A list setting, split on whitespace.
    pub fn list(&self, key: &str) -> Vec<String> {
        self.get(key)
            .unwrap_or("")
            .split_whitespace()
            .map(String::from)
            .collect()
    }
}

/// Nix's narinfo disk cache: `$XDG_CACHE_HOME/nix/binary-cache-v6.sqlite`, else under
/// `~/.cache`.
pub fn narinfo_cache_path() -> PathBuf {
    crate::config::xdg_dir("XDG_CACHE_HOME", ".cache")
        .unwrap_or_else(|| PathBuf::from("/root/.cache"))
        .join("nix/binary-cache-v6.sqlite")
}

/// A path Nix remembers as missing from a binary cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegativeEntry {
    /// The cache's URL as Nix recorded it.
    pub cache_url: String,
    /// The store path's hash part.
    pub hash: String,
    /// When Nix looked it up (unix seconds).
    pub timestamp: u64,
}

/// The misses in the narinfo cache `db` looked up at or after `since` (unix seconds), newest
/// first, at most `limit`; `Ok(None)` when the `sqlite3` program is not installed.
pub fn negative_entries(
    db: &Path,
    since: u64,
    limit: usize,
) -> Result<Option<Vec<NegativeEntry>>, NixReadError> {
    let query = format!(
        "SELECT b.url, n.hashPart, n.timestamp FROM NARs n JOIN BinaryCaches b ON b.id = n.cache \
         WHERE n.present = 0 AND n.timestamp >= {since} ORDER BY n.timestamp DESC LIMIT {limit};"
    );
    let out = match Command::new("sqlite3")
        .args(["-readonly", "-batch", "-noheader", "-separator", "|"])
        .args(["-cmd", ".timeout 3000"])
        .arg(db)
        .arg(&query)
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(NixReadError::Spawn {
                program: "sqlite3",
                error,
            })
        }
        Ok(o) => o,
    };
    if !out.status.success() {
        return Err(NixReadError::Failed {
            program: "sqlite3",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let rows = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // The URL may hold a `|`; the hash and the timestamp do not.
            let mut it = l.rsplitn(3, '|');
            let timestamp = it.next()?.trim().parse().ok()?;
            let hash = it.next()?.to_string();
            let cache_url = it.next()?.to_string();
            Some(NegativeEntry {
                cache_url,
                hash,
                timestamp,
            })
        })
        .collect();
    Ok(Some(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_config_and_nix_conf_text() {
        let c = NixConfig::parse(
            "substituters = http://127.0.0.1:7420 https://cache.nixos.org/\n\
             # a comment\n\
             trusted-public-keys = a:b\n\
             extra-trusted-public-keys = c:d # trailing comment\n\
             require-sigs = false\n",
        );
        assert_eq!(
            c.list("substituters"),
            ["http://127.0.0.1:7420", "https://cache.nixos.org/"]
        );
        assert_eq!(c.list("trusted-public-keys"), ["a:b", "c:d"]);
        assert_eq!(c.get("require-sigs"), Some("false"));
        // Unprinted settings take Nix's defaults.
        assert_eq!(c.get("narinfo-cache-negative-ttl"), Some("3600"));
        assert!(c.list("trusted-substituters").is_empty());
    }

    #[test]
    fn files_follow_includes() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("nix.conf"),
            "substituters = http://a\ninclude more.conf\n!include missing.conf\n",
        )
        .unwrap();
        std::fs::write(
            tmp.path().join("more.conf"),
            "extra-substituters = http://b\n",
        )
        .unwrap();
        let mut c = NixConfig::empty("");
        assert!(c.apply_file(&tmp.path().join("nix.conf"), 0));
        assert_eq!(c.list("substituters"), ["http://a", "http://b"]);
    }
}
