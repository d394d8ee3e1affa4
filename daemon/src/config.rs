//! Daemon configuration: an embedded default, a TOML file (`--config`), then flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("upload token file {0} is empty")]
    EmptyToken(PathBuf),
}

/// The daemon's settings. Every field can come from the TOML file; flags override.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub trusted_public_keys: Vec<String>,
    /// File holding the upload token (HTTP basic password). No file: uploads are refused.
    pub upload_token_file: Option<PathBuf>,
    /// Largest NAR upload accepted, in bytes.
    pub max_upload_size: u64,
    /// Upstream HTTP binary caches asked, in order, for what the store does not have.
    pub upstream: Vec<String>,
    /// libp2p listen multiaddrs; none turns the P2P layer off.
    pub p2p_listen: Vec<String>,
    /// Bootstrap peers (multiaddrs ending in `/p2p/<peer id>`).
    pub bootstrap: Vec<String>,
    /// Turn mDNS discovery off.
    pub no_mdns: bool,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            trusted_public_keys: Vec::new(),
            upload_token_file: None,
            max_upload_size: 64 << 30,
            upstream: Vec::new(),
            p2p_listen: Vec::new(),
            bootstrap: Vec::new(),
            no_mdns: false,
        }
    }
}

impl DaemonConfig {
    /// Reads a TOML config file (unknown keys are errors).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads the upload token, if a file is configured (surrounding whitespace trimmed).
    pub fn upload_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.upload_token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(ConfigError::EmptyToken(path.clone()));
        }
        Ok(Some(token))
    }
}

/// `$XDG_DATA_HOME/nix-p2p-cache`, else `~/.local/share/nix-p2p-cache`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("nix-p2p-cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toml_and_refuses_unknown_keys() {
        let c: DaemonConfig = toml::from_str(
            "data-dir = \"/tmp/x\"\nlisten = \"127.0.0.1:9999\"\ntrusted-public-keys = [\"a:b\"]\nupstream = [\"http://x\"]\n",
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.trusted_public_keys, vec!["a:b".to_string()]);
        assert_eq!(c.upstream, vec!["http://x".to_string()]);
        assert!(c.p2p_listen.is_empty() && c.bootstrap.is_empty() && !c.no_mdns);
        let p: DaemonConfig = toml::from_str(
            "p2p-listen = [\"/ip4/0.0.0.0/tcp/7421\"]\nbootstrap = [\"/ip4/10.0.0.1/tcp/7421/p2p/x\"]\nno-mdns = true\n",
        )
        .unwrap();
        assert_eq!(p.p2p_listen, vec!["/ip4/0.0.0.0/tcp/7421".to_string()]);
        assert_eq!(p.bootstrap.len(), 1);
        assert!(p.no_mdns);
        assert!(toml::from_str::<DaemonConfig>("bogus = 1\n").is_err());
    }
}
