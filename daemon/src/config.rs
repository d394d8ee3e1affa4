//! Daemon configuration: an embedded default, a TOML file (`--config`), then flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is in the message and deliberately not a `source` (anyhow would print it twice).
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("upload token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

/// What the node is for (design §5, "Retention").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Caches what it fetches (under `max-cache-size`) and falls back to the upstreams.
    #[default]
    Peer,
    /// Keeps everything it holds (never evicts) and serves the network; no upstream fallback.
    Seed,
}

/// Which peers may fetch from this node (design §5, "Privacy").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Share {
    /// Serve no peer (fetch only).
    None,
    /// Serve only peers discovered with mDNS on the LAN.
    Lan,
    /// Serve every peer.
    #[default]
    All,
}

/// What is announced in the DHT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Announce {
    /// The NAR key of every trusted NAR held.
    #[default]
    Roots,
    /// NAR keys and every chunk id of those NARs.
    All,
}

/// A byte count: an integer, or a string with a binary/decimal suffix ("50G", "512MiB", "1.5T").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ByteSizeRepr", into = "u64")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum ByteSizeRepr {
    Int(u64),
    Str(String),
}

impl TryFrom<ByteSizeRepr> for ByteSize {
    type Error = String;
    fn try_from(r: ByteSizeRepr) -> Result<Self, String> {
        match r {
            ByteSizeRepr::Int(n) => Ok(ByteSize(n)),
            ByteSizeRepr::Str(s) => s.parse(),
        }
    }
}

impl From<ByteSize> for u64 {
    fn from(b: ByteSize) -> u64 {
        b.0
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    /// `K`/`M`/`G`/`T` (and `KB`…) are powers of 1000, `KiB`/`MiB`/`GiB`/`TiB` powers of 1024;
    /// a bare number or `B` is bytes. Case-insensitive.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || format!("bad size {s:?} (expected e.g. 1073741824, 50G or 512MiB)");
        let value: f64 = num.parse().map_err(|_| bad())?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "m" | "mb" => 1e6,
            "g" | "gb" => 1e9,
            "t" | "tb" => 1e12,
            "ki" | "kib" => 1024.0,
            "mi" | "mib" => 1024.0 * 1024.0,
            "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
            "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad()),
        };
        let bytes = value * mult;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

/// The daemon's settings. Every field can come from the TOML file; flags override.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Keys whose signatures make a narinfo trusted (`trusted-public-key`: deprecated).
    #[serde(alias = "trusted-public-key")]
    pub trusted_public_keys: Vec<String>,
    /// File holding the upload token (HTTP basic password). No file: uploads are refused.
    pub upload_token_file: Option<PathBuf>,
    /// Largest NAR upload accepted, in bytes.
    pub max_upload_size: ByteSize,
    /// Upstream HTTP binary caches asked, in order, for what the store does not have
    /// (`upstreams`; `upstream`: deprecated).
    #[serde(rename = "upstreams", alias = "upstream")]
    pub upstream: Vec<String>,
    /// libp2p listen multiaddrs; none turns the P2P layer off.
    pub p2p_listen: Vec<String>,
    /// Bootstrap peers, multiaddrs ending in `/p2p/<peer id>` (`bootstrap-peers`;
    /// `bootstrap`: deprecated).
    #[serde(rename = "bootstrap-peers", alias = "bootstrap")]
    pub bootstrap: Vec<String>,
    /// Turn mDNS discovery off.
    pub no_mdns: bool,
    /// `peer` or `seed`.
    pub role: Role,
    /// Which peers this node serves: `none`, `lan` (mDNS peers only) or `all`.
    pub share: Share,
    /// What is announced in the DHT: `roots` (NAR keys) or `all` (also chunk ids).
    pub announce: Announce,
    /// Evict least-recently-used unpinned NARs above this many stored bytes (peers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cache_size: Option<ByteSize>,
    /// Cap on bytes per second sent to peers (all peers together).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_rate_limit: Option<ByteSize>,
    /// zstd level cold packs are rewritten at in the background (0: off). Unset: 19 on a
    /// seed, off on a peer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compact_level: Option<u8>,
    /// A pack is cold once unmodified for this many seconds.
    pub compact_min_age_secs: u64,
    /// Where sealed packs go: `s3://BUCKET[/PREFIX]`; unset: the data dir.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// S3 endpoint URL (path-style; `http://` for loopback).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// Local cache of remote pack ranges [default: 1 GiB].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_cache_size: Option<ByteSize>,
    /// Protocol timers (`[timers]`): the real network's by default.
    pub timers: Timers,
    /// The P2P transport: TCP, or libp2p's in-process memory transport (for a simulator that
    /// runs many daemons in one process; not settable from a file or flag).
    #[serde(skip)]
    pub p2p_transport: crate::net::Transport,
}

/// Protocol timers, in seconds (`[timers]` in the config file). The defaults are the real
/// network's; a simulation shortens them so hours of protocol time fit in minutes
/// (`sim/`, real mode).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Timers {
    /// How often every trusted NAR is provided again (default 12 h).
    pub reprovide_interval_secs: f64,
    /// How long a provider record lives in the DHT (default 48 h).
    pub provider_record_ttl_secs: f64,
    /// How often expired DHT records are deleted from the store (default 1 h).
    pub dht_purge_interval_secs: f64,
    /// How long a DHT query (provider lookup, announcement, walk) may run (default 30 s).
    pub dht_query_timeout_secs: f64,
    /// How long a peer may take to answer one exchange request (default 30 s).
    pub request_timeout_secs: f64,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            reprovide_interval_secs: 12.0 * 3600.0,
            provider_record_ttl_secs: 48.0 * 3600.0,
            dht_purge_interval_secs: 3600.0,
            dht_query_timeout_secs: 30.0,
            request_timeout_secs: 30.0,
        }
    }
}

impl Timers {
    /// Each timer, with its config key.
    fn each(&self) -> [(&'static str, f64); 5] {
        [
            ("reprovide-interval-secs", self.reprovide_interval_secs),
            ("provider-record-ttl-secs", self.provider_record_ttl_secs),
            ("dht-purge-interval-secs", self.dht_purge_interval_secs),
            ("dht-query-timeout-secs", self.dht_query_timeout_secs),
            ("request-timeout-secs", self.request_timeout_secs),
        ]
    }

    /// Every timer as a duration (validated ones; a bad value falls back to the default).
    pub fn reprovide_interval(&self) -> std::time::Duration {
        secs(
            self.reprovide_interval_secs,
            Self::default().reprovide_interval_secs,
        )
    }
    pub fn provider_record_ttl(&self) -> std::time::Duration {
        secs(
            self.provider_record_ttl_secs,
            Self::default().provider_record_ttl_secs,
        )
    }
    pub fn dht_purge_interval(&self) -> std::time::Duration {
        secs(
            self.dht_purge_interval_secs,
            Self::default().dht_purge_interval_secs,
        )
    }
    pub fn dht_query_timeout(&self) -> std::time::Duration {
        secs(
            self.dht_query_timeout_secs,
            Self::default().dht_query_timeout_secs,
        )
    }
    pub fn request_timeout(&self) -> std::time::Duration {
        secs(
            self.request_timeout_secs,
            Self::default().request_timeout_secs,
        )
    }

    /// Problems with the values, one per timer.
    fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .each()
            .iter()
            .filter(|(_, v)| !(v.is_finite() && *v >= 0.01 && *v <= 365.0 * 86400.0))
            .map(|(k, v)| format!("timers.{k}: {v} is not between 0.01 and 31536000 seconds"))
            .collect();
        if self.reprovide_interval_secs >= self.provider_record_ttl_secs {
            out.push(
                "timers.reprovide-interval-secs: must be shorter than provider-record-ttl-secs \
                 (records would expire before they are renewed)"
                    .into(),
            );
        }
        out
    }
}

fn secs(v: f64, default: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .unwrap_or_else(|| std::time::Duration::from_secs_f64(default))
}

/// The background compaction level of a seed unless configured (`docs/chunking.md`).
pub const DEFAULT_SEED_COMPACT_LEVEL: u8 = 19;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            trusted_public_keys: Vec::new(),
            upload_token_file: None,
            max_upload_size: ByteSize(64 << 30),
            upstream: Vec::new(),
            p2p_listen: Vec::new(),
            bootstrap: Vec::new(),
            no_mdns: false,
            role: Role::Peer,
            share: Share::All,
            announce: Announce::Roots,
            max_cache_size: None,
            upload_rate_limit: None,
            compact_level: None,
            compact_min_age_secs: 3600,
            storage: None,
            s3_endpoint: None,
            s3_cache_size: None,
            timers: Timers::default(),
            p2p_transport: crate::net::Transport::Tcp,
        }
    }
}

impl DaemonConfig {
    /// The background compaction level in effect, if compaction is on.
    /// Where the store keeps its sealed packs.
    pub fn storage_options(&self) -> crate::store::StorageOptions {
        crate::store::StorageOptions {
            storage: self.storage.clone(),
            s3_endpoint: self.s3_endpoint.clone(),
            cache_size: self.s3_cache_size.map(u64::from),
        }
    }

    pub fn effective_compact_level(&self) -> Option<i32> {
        let level = match (self.compact_level, self.role) {
            (Some(l), _) => l,
            (None, Role::Seed) => DEFAULT_SEED_COMPACT_LEVEL,
            (None, Role::Peer) => 0,
        };
        (level > 0).then_some(i32::from(level))
    }

    /// Reads a TOML config file (unknown keys are errors).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            error,
        })
    }

    /// Checks what can be checked without the filesystem or network: trusted keys, multiaddrs,
    /// upstream URLs and option combinations. Every problem is reported, one per line.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        for k in &self.trusted_public_keys {
            if let Err(e) = crate::core::signing::PublicKey::parse(k) {
                problems.push(format!("trusted-public-keys: {k:?}: {e}"));
            }
        }
        for (field, addrs) in [
            ("p2p-listen", &self.p2p_listen),
            ("bootstrap-peers", &self.bootstrap),
        ] {
            for a in addrs {
                match a.parse::<libp2p::Multiaddr>() {
                    Err(e) => problems.push(format!("{field}: {a:?}: {e}")),
                    Ok(m)
                        if field == "bootstrap-peers"
                            && !matches!(
                                m.iter().last(),
                                Some(libp2p::multiaddr::Protocol::P2p(_))
                            ) =>
                    {
                        problems.push(format!(
                            "bootstrap-peers: {a:?} does not end in /p2p/<peer id>"
                        ))
                    }
                    Ok(_) => {}
                }
            }
        }
        for u in &self.upstream {
            let ok = reqwest::Url::parse(u)
                .map(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
                .unwrap_or(false);
            if !ok {
                problems.push(format!(
                    "upstreams: {u:?} is not an http:// or https:// URL"
                ));
            }
        }
        if self.role == Role::Seed && self.max_cache_size.is_some() {
            problems
                .push("max-cache-size: a seed never evicts; drop it or use role = \"peer\"".into());
        }
        if self.role == Role::Seed && !self.upstream.is_empty() {
            problems.push(
                "upstreams: a seed falls back on nothing (it is the source); drop upstreams or use role = \"peer\"".into(),
            );
        }
        if self.compact_level.is_some_and(|l| l > 22) {
            problems.push("compact-level: zstd levels go up to 22 (0 turns compaction off)".into());
        }
        if let Err(e) = self.storage_options().check() {
            problems.push(format!("storage: {e}"));
        }
        if self.storage.is_none() && self.s3_endpoint.is_some() {
            problems.push("s3-endpoint: only with storage = \"s3://BUCKET[/PREFIX]\"".into());
        }
        if self.upload_rate_limit == Some(ByteSize(0)) {
            problems.push("upload-rate-limit: 0 would serve nothing; use share = \"none\"".into());
        }
        problems.extend(self.timers.problems());
        if self.p2p_listen.is_empty() && !self.bootstrap.is_empty() {
            problems
                .push("bootstrap-peers: peers given but p2p-listen is empty (P2P is off)".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("\n")))
        }
    }

    /// Reads the upload token, if a file is configured (surrounding whitespace trimmed).
    pub fn upload_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.upload_token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.clone(),
            error,
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
    xdg_dir("XDG_DATA_HOME", ".local/share")
        .unwrap_or_else(|| PathBuf::from("."))
        .join("nix-p2p-cache")
}

/// An XDG base directory: `$var` if set and not empty, else `$HOME/<under_home>`.
pub fn xdg_dir(var: &str, under_home: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(under_home)))
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

    #[test]
    fn old_key_spellings_are_accepted_and_printed_with_the_current_names() {
        let old: DaemonConfig = toml::from_str(
            "upstream = [\"http://x\"]\nbootstrap = [\"/ip4/10.0.0.1/tcp/1/p2p/x\"]\ntrusted-public-key = [\"a:b\"]\n",
        )
        .unwrap();
        let new: DaemonConfig = toml::from_str(
            "upstreams = [\"http://x\"]\nbootstrap-peers = [\"/ip4/10.0.0.1/tcp/1/p2p/x\"]\ntrusted-public-keys = [\"a:b\"]\n",
        )
        .unwrap();
        assert_eq!(old.upstream, new.upstream);
        assert_eq!(old.bootstrap, new.bootstrap);
        assert_eq!(old.trusted_public_keys, new.trusted_public_keys);
        let printed = toml::to_string(&old).unwrap();
        for key in [
            "upstreams = ",
            "bootstrap-peers = ",
            "trusted-public-keys = ",
        ] {
            assert!(printed.contains(key), "{key} missing from {printed}");
        }
        // Both spellings of one key at once: an error, not a silent pick.
        assert!(toml::from_str::<DaemonConfig>("upstream = []\nupstreams = []\n").is_err());
    }

    #[test]
    fn sizes_roles_and_validation() {
        let c: DaemonConfig = toml::from_str(
            "role = \"peer\"\nshare = \"lan\"\nannounce = \"all\"\nmax-cache-size = \"50GiB\"\nupload-rate-limit = 1000000\n",
        )
        .unwrap();
        assert_eq!(c.share, Share::Lan);
        assert_eq!(c.announce, Announce::All);
        assert_eq!(c.max_cache_size, Some(ByteSize(50 << 30)));
        assert_eq!(c.upload_rate_limit, Some(ByteSize(1_000_000)));
        c.validate().unwrap();
        assert_eq!("10M".parse::<ByteSize>().unwrap(), ByteSize(10_000_000));
        assert_eq!("1.5KiB".parse::<ByteSize>().unwrap(), ByteSize(1536));
        assert!("ten".parse::<ByteSize>().is_err());
        assert!("5 parsecs".parse::<ByteSize>().is_err());
        assert!(toml::from_str::<DaemonConfig>("role = \"leader\"\n").is_err());
        // Round trip through the serialised form (check-config prints it).
        let back: DaemonConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.max_cache_size, c.max_cache_size);
        let bad: DaemonConfig = toml::from_str(
            "role = \"seed\"\nmax-cache-size = 5\nbootstrap-peers = [\"/ip4/1.2.3.4/tcp/1\"]\nupstreams = [\"ftp://x\"]\ntrusted-public-keys = [\"nope\"]\n",
        )
        .unwrap();
        let e = bad.validate().unwrap_err().to_string();
        for needle in [
            "max-cache-size",
            "/p2p/",
            "ftp://x",
            "nope",
            "p2p-listen is empty",
        ] {
            assert!(e.contains(needle), "{needle} missing from {e}");
        }
    }

    #[test]
    fn timers_default_parse_and_validate() {
        let c: DaemonConfig = toml::from_str("").unwrap();
        assert_eq!(c.timers, Timers::default());
        assert_eq!(
            c.timers.reprovide_interval(),
            std::time::Duration::from_secs(12 * 3600)
        );
        let c: DaemonConfig = toml::from_str(
            "[timers]\nreprovide-interval-secs = 12\nprovider-record-ttl-secs = 48.5\nrequest-timeout-secs = 2\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.timers.reprovide_interval(),
            std::time::Duration::from_secs(12)
        );
        assert_eq!(
            c.timers.provider_record_ttl(),
            std::time::Duration::from_millis(48_500)
        );
        assert_eq!(
            c.timers.request_timeout(),
            std::time::Duration::from_secs(2)
        );
        assert_eq!(
            c.timers.dht_query_timeout(),
            std::time::Duration::from_secs(30)
        );
        assert!(toml::from_str::<DaemonConfig>("[timers]\nbogus = 1\n").is_err());
        let bad: DaemonConfig = toml::from_str(
            "[timers]\nreprovide-interval-secs = 100\nprovider-record-ttl-secs = 50\nrequest-timeout-secs = -1\n",
        )
        .unwrap();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("timers.request-timeout-secs"), "{e}");
        assert!(e.contains("shorter than provider-record-ttl-secs"), "{e}");
        // Round trip (check-config prints the config).
        let back: DaemonConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.timers, c.timers);
    }
}
