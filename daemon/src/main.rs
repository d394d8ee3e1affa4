//! The `nix-p2p-cache` binary: command-line entry points. Errors become `anyhow` here only.

use std::path::PathBuf;
use std::process::ExitCode;

/// `println!` that ends the process quietly when stdout's reader has gone (`stats | head`)
/// instead of panicking, and with an error for any other write failure.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            stdout_failed(e)
        }
    }};
}

/// `print!`, as [`outln!`].
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($t)*) {
            stdout_failed(e)
        }
    }};
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: writing to stdout: {e}");
    std::process::exit(1);
}

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory as _, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use nix_p2p_cache::config::{default_data_dir, Announce, ByteSize, DaemonConfig, Role, Share};
use nix_p2p_cache::core::human_bytes as human;
use nix_p2p_cache::core::store_path::parse_hash_or_path;
use nix_p2p_cache::daemon::trusted_keys;
use nix_p2p_cache::import::{self, BinaryCache, Selection};
use nix_p2p_cache::maintain::{
    self, PinOutcome, PinReport, PolicyGcReport, SizeGcReport, UndeleteReport,
};
use nix_p2p_cache::store::{
    CompactOptions, PathState, StorageOptions, Store, StoreError, DEFAULT_ZSTD_LEVEL,
};

#[derive(Parser)]
#[command(
    name = "nix-p2p-cache",
    version,
    about = "Peer-to-peer, content-addressed binary cache for Nix"
)]
struct Cli {
    /// Log lines as text or as one JSON object per line (level from RUST_LOG, default warn).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct DataDir {
    /// Data directory (packs and index).
    #[arg(long, env = "NIX_P2P_CACHE_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    #[command(flatten)]
    storage: StorageArgs,
}

impl DataDir {
    fn storage_options(&self) -> StorageOptions {
        self.storage.options()
    }
}

/// Where sealed packs are (the data dir's `packs/` unless `--storage`).
#[derive(Args, Clone, Default)]
struct StorageArgs {
    /// Keep sealed packs in S3-compatible object storage: s3://BUCKET[/PREFIX]. Credentials
    /// from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (AWS_REGION) or a credentials file.
    #[arg(long, env = "NIX_P2P_CACHE_STORAGE")]
    storage: Option<String>,
    /// The S3 endpoint, e.g. https://s3.example.com or http://127.0.0.1:9000 (path-style).
    #[arg(long, env = "NIX_P2P_CACHE_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Local cache of remote pack ranges (e.g. 1G) [default: 1GiB].
    #[arg(long)]
    s3_cache_size: Option<ByteSize>,
}

impl StorageArgs {
    fn options(&self) -> StorageOptions {
        StorageOptions {
            storage: self.storage.clone(),
            s3_endpoint: self.s3_endpoint.clone(),
            cache_size: self.s3_cache_size.map(u64::from),
        }
    }
}

/// How to reach a running daemon.
#[derive(Args)]
struct ApiArgs {
    /// The daemon's HTTP address [default: `listen` of --config, else 127.0.0.1:7420].
    #[arg(long)]
    url: Option<String>,
    /// The daemon's config file (its `listen` address is used).
    #[arg(long, env = "NIX_P2P_CACHE_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON (status, peers: the daemon's answer; doctor: the checks).
    #[arg(long)]
    json: bool,
}

impl ApiArgs {
    /// Prints the daemon's answer to `path`: as JSON with `--json`, else with `human`.
    fn show(&self, path: &str, human: fn(&serde_json::Value)) -> Result<ExitCode> {
        let v = self.get(path)?;
        if self.json {
            outln!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            human(&v);
        }
        Ok(ExitCode::SUCCESS)
    }

    /// The daemon's base URL: --url, else `listen` of --config, else the default address.
    fn base(&self) -> Result<String> {
        Ok(match (&self.url, &self.config) {
            (Some(u), _) => base_url(u),
            (None, Some(f)) => format!("http://{}", DaemonConfig::from_file(f)?.listen),
            (None, None) => format!("http://{}", nix_p2p_cache::config::DEFAULT_LISTEN),
        })
    }

    /// GETs `path` from the daemon's API and parses the JSON.
    fn get(&self, path: &str) -> Result<serde_json::Value> {
        let url = format!("{}{path}", self.base()?);
        block_on(async {
            let resp = reqwest::Client::new()
                .get(&url)
                .timeout(std::time::Duration::from_secs(10))
                .send()
                .await
                .with_context(|| format!("{url}: is the daemon running?"))?;
            let status = resp.status();
            if !status.is_success() {
                bail!("{url}: HTTP {status}");
            }
            let body = resp
                .bytes()
                .await
                .with_context(|| format!("{url}: reading"))?;
            serde_json::from_slice(&body).with_context(|| format!("{url}: not the daemon's JSON"))
        })
    }
}

/// Runs `f` on a one-off current-thread runtime (the CLI is synchronous).
fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

/// Where `pin`, `unpin`, `gc` and `undelete` act: the store itself when no daemon holds it,
/// else the running daemon's API.
#[derive(Args)]
struct LiveArgs {
    /// Data directory [default: `data_dir` of --config, else $XDG_DATA_HOME/nix-p2p-cache].
    #[arg(long, env = "NIX_P2P_CACHE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Send the request to the daemon at this address (e.g. http://127.0.0.1:7420) instead of
    /// opening the store [default: when a daemon holds the store, `listen` of --config, else
    /// 127.0.0.1:7420].
    #[arg(long)]
    url: Option<String>,
    /// The daemon's config file: its data_dir, listen address and upload_token_file are used.
    #[arg(long, env = "NIX_P2P_CACHE_CONFIG")]
    config: Option<PathBuf>,
    /// File holding the daemon's upload token, needed to act through a running daemon
    /// [default: upload_token_file of --config].
    #[arg(long, env = "NIX_P2P_CACHE_UPLOAD_TOKEN_FILE")]
    upload_token_file: Option<PathBuf>,
    /// [default: storage of --config]
    #[command(flatten)]
    storage: StorageArgs,
}

/// A running daemon's state-changing API.
struct Admin {
    base: String,
    token: String,
}

/// Where a maintenance command runs.
enum Target {
    Store(Box<Store>),
    Daemon(Admin),
}

impl LiveArgs {
    /// The store, opened, if no daemon holds it; else (or with --url) the daemon's API.
    fn target(&self) -> Result<Target> {
        let cfg = match &self.config {
            Some(f) => Some(DaemonConfig::from_file(f)?),
            None => None,
        };
        let token_file = self
            .upload_token_file
            .clone()
            .or_else(|| cfg.as_ref().and_then(|c| c.upload_token_file.clone()));
        let admin = |base: String, token_file: Option<PathBuf>| -> Result<Target> {
            let token_file = token_file.context("no upload token file (--upload-token-file)")?;
            let token = DaemonConfig {
                upload_token_file: Some(token_file),
                ..DaemonConfig::default()
            }
            .upload_token()?
            .context("no upload token")?;
            Ok(Target::Daemon(Admin { base, token }))
        };
        if let Some(u) = &self.url {
            return admin(base_url(u), token_file);
        }
        let dir = self
            .data_dir
            .clone()
            .or_else(|| cfg.as_ref().map(|c| c.data_dir.clone()))
            .unwrap_or_else(default_data_dir);
        let mut opts = self.storage.options();
        if let (None, Some(c)) = (&opts.storage, &cfg) {
            opts = c.storage_options();
        }
        if !dir.join("index.redb").is_file() {
            open_existing(&dir, &opts)?; // says there is no store
        }
        match Store::open_with_storage(&dir, DEFAULT_ZSTD_LEVEL, &opts) {
            Ok(s) => Ok(Target::Store(Box::new(s))),
            Err(StoreError::Locked(_)) => {
                let listen = cfg.as_ref().map_or_else(
                    || nix_p2p_cache::config::DEFAULT_LISTEN.to_string(),
                    |c| c.listen.to_string(),
                );
                let base = format!("http://{listen}");
                if token_file.is_none() {
                    bail!(
                        "the daemon is running on {} (it holds the index): give                          --upload-token-file (or --config) to act through its API at {base}                          (--url for another address), or stop it",
                        dir.display()
                    );
                }
                tracing::debug!(%base, "store held by the daemon: using its API");
                admin(base, token_file)
            }
            Err(e) => Err(e).with_context(|| format!("opening store {}", dir.display())),
        }
    }
}

impl Admin {
    /// POSTs `body` to the daemon's `path` with the upload token; its JSON report.
    fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        block_on(async {
            let resp = reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(5))
                .build()
                .context("building the HTTP client")?
                .post(&url)
                .basic_auth("nix-p2p-cache", Some(&self.token))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(body)?)
                .send()
                .await
                .with_context(|| format!("{url}: is the daemon running?"))?;
            let status = resp.status();
            let body = resp
                .bytes()
                .await
                .with_context(|| format!("{url}: reading"))?;
            if !status.is_success() {
                let msg = String::from_utf8_lossy(&body);
                let hint = match status.as_u16() {
                    401 => " (is this the daemon's upload token?)",
                    404 | 405 => " (is the daemon older than this command?)",
                    _ => "",
                };
                bail!("{url}: HTTP {status}: {}{hint}", msg.trim());
            }
            serde_json::from_slice(&body).with_context(|| format!("{url}: not the daemon's JSON"))
        })
    }
}

/// The daemon's flags (each also a key of the TOML config file).
#[derive(Args)]
struct DaemonArgs {
    /// TOML config file (keys as the long flags); flags override it.
    #[arg(long, env = "NIX_P2P_CACHE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: $XDG_DATA_HOME/nix-p2p-cache].
    #[arg(long, env = "NIX_P2P_CACHE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:7420].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// A trusted public key (name:base64), repeatable; cache.nixos.org-1 is always trusted.
    /// (`--trusted-public-key`: deprecated spelling.)
    #[arg(
        long = "trusted-public-keys",
        alias = "trusted-public-key",
        value_name = "KEY"
    )]
    trusted_public_keys: Vec<String>,
    /// File holding the upload token (the HTTP basic password Nix sends from its netrc).
    #[arg(long)]
    upload_token_file: Option<PathBuf>,
    /// Largest NAR upload accepted (e.g. 64GiB, 500M).
    #[arg(long)]
    max_upload_size: Option<ByteSize>,
    /// An upstream HTTP binary cache asked for what the store lacks (repeatable; tried in
    /// order), e.g. https://cache.nixos.org. (`--upstream`: deprecated spelling.)
    #[arg(long = "upstreams", alias = "upstream", value_name = "URL")]
    upstream: Vec<String>,
    /// libp2p listen multiaddrs, e.g. /ip4/0.0.0.0/tcp/7421; none: P2P off.
    #[arg(long = "p2p-listen", num_args = 1..)]
    p2p_listen: Vec<String>,
    /// Bootstrap peers: multiaddrs ending in /p2p/<peer id>. (`--bootstrap`: deprecated
    /// spelling.)
    #[arg(long = "bootstrap-peers", alias = "bootstrap", num_args = 1..)]
    bootstrap: Vec<String>,
    /// Do not discover peers on the LAN with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// peer: cache under --max-cache-size, fall back to upstreams; seed: keep everything.
    #[arg(long, value_enum)]
    role: Option<Role>,
    /// Which peers may fetch from this node [default: all].
    #[arg(long, value_enum)]
    share: Option<Share>,
    /// What to announce in the DHT: roots (NAR keys) or all (also chunk ids) [default: roots].
    #[arg(long, value_enum)]
    announce: Option<Announce>,
    /// Evict least-recently-used unpinned NARs above this size (e.g. 50G, 512MiB).
    #[arg(long)]
    max_cache_size: Option<ByteSize>,
    /// Cap on bytes per second sent to peers, all peers together (e.g. 10M).
    #[arg(long)]
    upload_rate_limit: Option<ByteSize>,
    /// Rewrite cold packs at this zstd level in the background, 0 for off [default: 19 on a
    /// seed, off on a peer].
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=22))]
    compact_level: Option<u8>,
    /// A pack is cold once unmodified for this many seconds [default: 3600].
    #[arg(long)]
    compact_min_age_secs: Option<u64>,
    #[command(flatten)]
    storage: StorageArgs,
}

impl DaemonArgs {
    /// The config file (if any) with these flags applied over it.
    fn into_config(self) -> Result<DaemonConfig> {
        let mut cfg = match &self.config {
            Some(f) => DaemonConfig::from_file(f)?,
            None => DaemonConfig::default(),
        };
        self.apply(&mut cfg);
        Ok(cfg)
    }

    fn apply(self, cfg: &mut DaemonConfig) {
        if let Some(d) = self.data_dir {
            cfg.data_dir = d;
        }
        if let Some(l) = self.listen {
            cfg.listen = l;
        }
        cfg.trusted_public_keys.extend(self.trusted_public_keys);
        if self.upload_token_file.is_some() {
            cfg.upload_token_file = self.upload_token_file;
        }
        if let Some(m) = self.max_upload_size {
            cfg.max_upload_size = m;
        }
        cfg.upstream.extend(self.upstream);
        cfg.p2p_listen.extend(self.p2p_listen);
        cfg.bootstrap.extend(self.bootstrap);
        cfg.no_mdns |= self.no_mdns;
        if let Some(r) = self.role {
            cfg.role = r;
        }
        if let Some(s) = self.share {
            cfg.share = s;
        }
        if let Some(a) = self.announce {
            cfg.announce = a;
        }
        if self.max_cache_size.is_some() {
            cfg.max_cache_size = self.max_cache_size;
        }
        if self.upload_rate_limit.is_some() {
            cfg.upload_rate_limit = self.upload_rate_limit;
        }
        if self.compact_level.is_some() {
            cfg.compact_level = self.compact_level;
        }
        if let Some(s) = self.compact_min_age_secs {
            cfg.compact_min_age_secs = s;
        }
        if self.storage.storage.is_some() {
            cfg.storage = self.storage.storage;
        }
        if self.storage.s3_endpoint.is_some() {
            cfg.s3_endpoint = self.storage.s3_endpoint;
        }
        if self.storage.s3_cache_size.is_some() {
            cfg.s3_cache_size = self.storage.s3_cache_size;
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print a shell completion script (e.g. `nix-p2p-cache completions bash >
    /// /usr/share/bash-completion/completions/nix-p2p-cache`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), generated from the command line definition.
    Man,
    /// Run the daemon: the localhost substituter Nix uses and, with --p2p-listen, the P2P node.
    Daemon {
        #[command(flatten)]
        args: DaemonArgs,
    },
    /// Check a daemon config file (and daemon flags given after it) without starting anything;
    /// prints the effective configuration as TOML (JSON with --json).
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
        /// Print the effective configuration as JSON instead of TOML.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        args: DaemonArgs,
    },
    /// Import (mirror) narinfos and NARs from a binary cache: a directory (file://) or an
    /// HTTP(S) server. Paths whose NAR is stored already are not downloaded again, so a run
    /// cut short continues where it stopped.
    Import {
        #[command(flatten)]
        data: DataDir,
        /// Binary cache to read: file:///var/cache/nix, http://… or https://cache.nixos.org.
        #[arg(long)]
        from: String,
        /// A trusted public key (name:base64), repeatable; cache.nixos.org-1 is always
        /// trusted. (`--trusted-public-key`: deprecated spelling.)
        #[arg(
            long = "trusted-public-keys",
            alias = "trusted-public-key",
            value_name = "KEY"
        )]
        trusted_public_keys: Vec<String>,
        /// A store-paths list to import: a file or an http(s) URL, plain or xz (a channel's
        /// store-paths.xz), one store path (or hash) per line. Repeatable.
        #[arg(long = "store-paths", alias = "paths-file", value_name = "FILE|URL")]
        lists: Vec<String>,
        /// Also import everything the given paths reference, transitively.
        #[arg(long)]
        closure: bool,
        /// Paths downloaded and ingested at once.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
        /// zstd level for new chunks.
        #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL)]
        zstd_level: i32,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Store paths to import; none (and no --store-paths) imports the whole cache (a
        /// directory only: an HTTP cache cannot be listed).
        store_paths: Vec<String>,
    },
    /// Print counts and sizes of the store.
    Stats {
        #[command(flatten)]
        data: DataDir,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Ask the running daemon at this address instead of opening the store (also done when
        /// the daemon holds the store: then at the default address).
        #[arg(long)]
        url: Option<String>,
    },
    /// Write the NAR of a stored path to stdout (reassembled and verified against NarHash).
    Nar {
        #[command(flatten)]
        data: DataDir,
        /// Store path or its hash.
        store_path: String,
    },
    /// Show the running daemon's state: role, store and cache use, peers, bytes up/down.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the running daemon's peers with their traffic and bans.
    Peers {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Check what usually keeps Nix from using the daemon — is it running, is it in Nix's
    /// substituters (first), are its keys trusted, is Nix's narinfo cache hiding it, ports,
    /// clock, disk space, open-files limit — and say what to change. Exit status: 0 all ok,
    /// 1 a check failed, 3 only warnings.
    Doctor {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Re-read and re-hash every chunk, manifest and narinfo; exit non-zero on damage.
    Verify {
        #[command(flatten)]
        data: DataDir,
        /// First rebuild the index from the packs alone (when it is lost, damaged or older
        /// than the packs); the old index is moved aside, not deleted. Needs the daemon
        /// stopped.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pin store paths: their NARs are never evicted (uploads and imports are pinned already).
    /// With the daemon running, goes through its API (needs the upload token).
    Pin {
        #[command(flatten)]
        live: LiveArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Store paths or their hashes.
        #[arg(required = true)]
        store_paths: Vec<String>,
    },
    /// Unpin store paths: they become cache entries, evicted least-recently-used first.
    /// With the daemon running, goes through its API (needs the upload token).
    Unpin {
        #[command(flatten)]
        live: LiveArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Store paths or their hashes.
        #[arg(required = true)]
        store_paths: Vec<String>,
    },
    /// Evict least-recently-used unpinned paths down to --max-size (if given), or apply a GC
    /// policy (--policy: hide what it selects for its grace period, collect what was hidden
    /// longer, keeping tombstones), then compact every pack holding dead records (and, on a
    /// stopped store, the index). With the daemon running, goes through its API (needs the
    /// upload token).
    Gc {
        #[command(flatten)]
        live: LiveArgs,
        /// Keep the data directory (packs + index) within this size, e.g. 10G or 512MiB.
        #[arg(long, conflicts_with = "policy")]
        max_size: Option<ByteSize>,
        /// A GC policy file (TOML; docs/operations.md, "Seed GC").
        #[arg(long)]
        policy: Option<PathBuf>,
        /// With --policy: only list what it would hide and collect, with the bytes and the
        /// monthly storage cost it would save.
        #[arg(long, requires = "policy")]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bring back paths a GC policy hid (before their grace period ends). With the daemon
    /// running, goes through its API (needs the upload token).
    Undelete {
        #[command(flatten)]
        live: LiveArgs,
        /// Every hidden path.
        #[arg(long, conflicts_with = "store_paths")]
        all: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Store paths or their hashes.
        #[arg(required_unless_present = "all")]
        store_paths: Vec<String>,
    },
    /// Rewrite cold packs with every chunk recompressed at a higher zstd level (smaller at
    /// rest; reads and peers are served as before), then compact the index. Needs the daemon
    /// stopped (a running daemon does this itself with --compact-level).
    Compact {
        #[command(flatten)]
        data: DataDir,
        /// zstd level of the rewritten chunks (docs/chunking.md: 19 is the measured choice).
        #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(1..=22))]
        level: i32,
        /// Only packs unmodified for this many seconds.
        #[arg(long, default_value_t = 0)]
        min_age_secs: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// SIGINT or SIGTERM. The handlers are installed at once (before the daemon says it listens),
/// so a signal right after start still shuts it down cleanly; needs the runtime.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Opens an existing store for a command that changes it; says so if the daemon has it.
fn open_unshared(data: &DataDir) -> Result<Store> {
    let dir = &data.data_dir;
    if !dir.join("index.redb").is_file() {
        return open_existing(dir, &data.storage_options()); // says there is no store
    }
    match Store::open_with_storage(dir, DEFAULT_ZSTD_LEVEL, &data.storage_options()) {
        Err(StoreError::Locked(_)) => bail!(
            "the daemon is running on {} (it holds the index): stop it first",
            dir.display()
        ),
        r => r.with_context(|| format!("opening store {}", dir.display())),
    }
}

/// `pin` / `unpin`, on the store or through the daemon.
fn pin_command(live: &LiveArgs, store_paths: &[String], pin: bool, json: bool) -> Result<ExitCode> {
    let report: PinReport = match live.target()? {
        Target::Store(store) => maintain::pin(&store, store_paths, pin)?,
        Target::Daemon(api) => api.post(
            if pin { "/api/pin" } else { "/api/unpin" },
            &serde_json::json!({ "paths": store_paths }),
        )?,
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    }
    for r in &report.paths {
        let what = match r.outcome {
            PinOutcome::Pinned => "pinned",
            PinOutcome::AlreadyPinned => "already pinned",
            PinOutcome::Unpinned => "unpinned",
            PinOutcome::WasNotPinned => "was not pinned",
            PinOutcome::NotStored => {
                eprintln!("{}: not in the store", r.path);
                continue;
            }
        };
        if !json {
            outln!("{what}: {}", r.path);
        }
    }
    Ok(if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `undelete`, on the store or through the daemon.
fn undelete_command(
    live: &LiveArgs,
    store_paths: &[String],
    all: bool,
    json: bool,
) -> Result<ExitCode> {
    let report: UndeleteReport = match live.target()? {
        Target::Store(store) => maintain::undelete(&store, store_paths, all)?,
        Target::Daemon(api) => api.post(
            "/api/undelete",
            &serde_json::json!({ "paths": store_paths, "all": all }),
        )?,
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!("undeleted {} paths", report.undeleted);
    }
    Ok(if report.failed() {
        eprintln!(
            "{} of the paths were not hidden",
            report.asked - report.undeleted
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `gc [--max-size SIZE]`.
fn compact_command(data: &DataDir, level: i32, min_age_secs: u64, json: bool) -> Result<ExitCode> {
    let mut store = open_unshared(data)?;
    let before = store.stats()?;
    let opts = CompactOptions {
        level,
        min_age: std::time::Duration::from_secs(min_age_secs),
        max_packs: None,
    };
    let r = store.compact(opts, &|| false)?;
    upload_all(&store)?;
    store.compact_index().context("compacting the index")?;
    let after = store.stats()?;
    if json {
        let v = serde_json::json!({
            "level": level,
            "packs_in": r.packs_in,
            "packs_out": r.packs_out,
            "records": r.records,
            "records_kept": r.records_kept,
            "bytes_in": r.bytes_in,
            "bytes_out": r.bytes_out,
            "skipped": r.skipped,
            "elapsed_s": r.elapsed.as_secs_f64(),
            "stored_bytes_before": before.stored_bytes,
            "stored_bytes_after": after.stored_bytes,
        });
        outln!("{v}");
    } else {
        outln!(
            "compacted {} packs into {} at zstd level {level}: {} records ({} kept as they were), {} -> {} in {:.1} s ({:.1} MiB/s)",
            r.packs_in,
            r.packs_out,
            r.records,
            r.records_kept,
            human(r.bytes_in),
            human(r.bytes_out),
            r.elapsed.as_secs_f64(),
            r.bytes_in as f64 / (1 << 20) as f64 / r.elapsed.as_secs_f64().max(1e-6)
        );
        outln!(
            "store {} -> {} (freed {})",
            human(before.stored_bytes),
            human(after.stored_bytes),
            human(before.stored_bytes.saturating_sub(after.stored_bytes))
        );
    }
    for s in &r.skipped {
        eprintln!("skipped {s} (run `nix-p2p-cache verify`)");
    }
    Ok(if r.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `gc --policy F [--dry-run] [--json]`: collects the hidden paths whose grace period is over,
/// hides what the policy selects now, then reclaims the dead bytes — on the store or through
/// the daemon (the policy sent as text, its roots files read here).
fn policy_gc_command(
    live: &LiveArgs,
    policy_file: &std::path::Path,
    dry_run: bool,
    json: bool,
) -> Result<ExitCode> {
    use nix_p2p_cache::gc_policy::Policy;
    let r: PolicyGcReport = match live.target()? {
        Target::Store(mut store) => {
            let policy = Policy::from_file(policy_file)?;
            let r = maintain::gc_by_policy(&store, &policy, dry_run, maintain::now_unix())?;
            if !dry_run {
                upload_all(&store)?;
                store.compact_index().context("compacting the index")?;
            }
            r
        }
        Target::Daemon(api) => {
            let text = maintain::policy_text_for_daemon(policy_file)?;
            api.post(
                "/api/gc",
                &serde_json::json!({ "policy": text, "dry_run": dry_run }),
            )?
        }
    };
    let skipped = r
        .applied
        .as_ref()
        .map(|a| a.skipped.clone())
        .unwrap_or_default();
    if json {
        outln!("{}", serde_json::to_string(&r)?);
    } else {
        print_policy_gc(&r);
    }
    for s in &skipped {
        eprintln!("not compacted: {s}");
    }
    Ok(if skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_policy_gc(r: &PolicyGcReport) {
    use nix_p2p_cache::gc_policy::PRICES_PER_GB_MONTH;
    for f in &r.hide {
        outln!("hide    {} ({})", f.store_path, human(f.nar_size));
    }
    for f in &r.collect {
        outln!(
            "collect {} (hidden since {})",
            f.store_path,
            f.hidden_since_unix
        );
    }
    let prices: Vec<String> = PRICES_PER_GB_MONTH
        .iter()
        .map(|(name, _)| {
            let usd = r.monthly_savings_usd.get(*name).copied().unwrap_or(0.0);
            format!("{name} ${usd:.4}")
        })
        .collect();
    outln!(
        "{}{} paths to hide ({} of NARs) for {:.1} days, {} hidden paths to collect, {} kept ({} of them hidden before: undeleted); frees about {} of packs, saving per month: {}",
        if r.dry_run { "dry run: " } else { "" },
        r.hide.len(),
        human(r.hide_nar_bytes),
        r.grace_days,
        r.collect.len(),
        r.kept,
        r.undelete,
        human(r.freed_bytes),
        prices.join(", ")
    );
    if let Some(a) = &r.applied {
        outln!(
            "hid {} paths; collected {} paths ({} NARs, {} of NARs); reclaimed {} of packs",
            a.hidden,
            a.collected_paths,
            a.collected_nars,
            human(a.collected_nar_bytes),
            human(a.reclaimed_bytes)
        );
    }
}

/// `gc [--max-size SIZE]`, on the store or through the daemon.
fn gc_command(live: &LiveArgs, max_size: Option<ByteSize>, json: bool) -> Result<ExitCode> {
    let max_size = max_size.map(|m| m.0);
    let r: SizeGcReport = match live.target()? {
        Target::Store(mut store) => {
            let mut r = maintain::gc_to_size(&store, max_size)?;
            upload_all(&store)?;
            store.compact_index().context("compacting the index")?;
            let after = store.stats()?;
            r.stored_bytes_after = after.stored_bytes;
            r.pinned_nars = after.pinned_nars;
            r.index_compacted = true;
            r
        }
        Target::Daemon(api) => api.post("/api/gc", &serde_json::json!({ "max_size": max_size }))?,
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        if let Some(e) = &r.evicted {
            outln!(
                "evicted {} paths ({} NARs, {} of NARs, {} chunks)",
                e.paths,
                e.nars,
                human(e.nar_bytes),
                e.chunks
            );
        }
        outln!(
            "compacted {} packs: moved {} live records ({}) in {:.2} s ({:.0} MiB/s), packs {} smaller",
            r.packs,
            r.records_copied,
            human(r.bytes_copied),
            r.elapsed_secs,
            r.bytes_copied as f64 / (1 << 20) as f64 / r.elapsed_secs.max(1e-6),
            human(r.bytes_reclaimed)
        );
        outln!(
            "store {} -> {} (freed {})",
            human(r.stored_bytes_before),
            human(r.stored_bytes_after),
            human(r.stored_bytes_before.saturating_sub(r.stored_bytes_after))
        );
        if let (true, Some(max)) = (r.still_above(), r.max_size) {
            outln!(
                "still above {}: the rest is pinned ({} NARs)",
                human(max),
                r.pinned_nars
            );
        }
    }
    for s in &r.skipped {
        eprintln!("not compacted: {s}");
    }
    Ok(if r.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `import`'s arguments.
struct ImportArgs {
    data: DataDir,
    from: String,
    trusted_public_keys: Vec<String>,
    lists: Vec<String>,
    closure: bool,
    jobs: usize,
    zstd_level: i32,
    json: bool,
    store_paths: Vec<String>,
}

/// An import's counts as it goes, for its progress line.
struct ImportTally {
    /// Paths known (grows while a closure is walked).
    total: u64,
    new: u64,
    present: u64,
    failed: u64,
    /// NAR bytes of the new paths.
    nar_bytes: u64,
    last_log: std::time::Instant,
}

impl Default for ImportTally {
    fn default() -> Self {
        Self {
            total: 0,
            new: 0,
            present: 0,
            failed: 0,
            nar_bytes: 0,
            last_log: std::time::Instant::now(),
        }
    }
}

impl ImportTally {
    fn done(&self) -> u64 {
        self.new + self.present + self.failed
    }

    /// "12 new, 3 already present, 1 failed, 1.2 GiB of NARs, 400.0 MiB read".
    fn counts(&self, read: u64) -> String {
        let failed = if self.failed > 0 {
            format!(", {} failed", self.failed)
        } else {
            String::new()
        };
        format!(
            "{} new, {} already present{failed}, {} of NARs, {} read",
            self.new,
            self.present,
            human(self.nar_bytes),
            human(read)
        )
    }

    /// "16 of 40 paths, eta 1m05s" (the ETA at the rate so far; "of at least" while a
    /// closure grows).
    fn progress(&self, elapsed: std::time::Duration, growing: bool) -> String {
        let done = self.done();
        let of = if growing { "of at least" } else { "of" };
        let eta = if done == 0 || self.total <= done {
            String::new()
        } else {
            let left = elapsed.as_secs_f64() * (self.total - done) as f64 / done as f64;
            let s = left.round() as u64;
            format!(", eta {}m{:02}s", s / 60, s % 60)
        };
        format!("{done} {of} {} paths{eta}", self.total)
    }
}

/// `import --from URL [--store-paths F] [--closure] [--jobs N] [PATH…]`.
fn import_command(a: ImportArgs) -> Result<ExitCode> {
    use std::io::IsTerminal as _;
    let trusted = trusted_keys(&a.trusted_public_keys)?;
    let cache = BinaryCache::open(&a.from)?;
    let mut roots = a
        .store_paths
        .iter()
        .map(|n| parse_hash_or_path(n).with_context(|| format!("bad store path {n:?}")))
        .collect::<Result<Vec<_>>>()?;
    for l in &a.lists {
        roots.extend(import::read_store_paths(l)?);
    }
    let selection = if roots.is_empty() {
        if a.closure {
            bail!("--closure needs store paths (arguments or --store-paths)");
        }
        if !cache.can_list() {
            bail!(
                "{}: an HTTP binary cache cannot be listed: give store paths, --store-paths FILE \
                 (e.g. a channel's store-paths.xz) and/or --closure",
                a.from
            );
        }
        Selection::All
    } else {
        Selection::Paths {
            roots,
            closure: a.closure,
        }
    };
    let mut store =
        Store::open_with_storage(&a.data.data_dir, a.zstd_level, &a.data.storage_options())
            .with_context(|| format!("opening store {}", a.data.data_dir.display()))?;
    let tty = std::io::stderr().is_terminal();
    let pb = if tty {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} paths, {msg} (eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let start = std::time::Instant::now();
    // Without a terminal: a progress line this often (NIX_P2P_CACHE_PROGRESS_SECS, tests).
    let log_every = std::time::Duration::from_secs(
        std::env::var("NIX_P2P_CACHE_PROGRESS_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    );
    // Whether more paths may still join the total (a closure being walked).
    let growing = a.closure;
    let tally = std::sync::Mutex::new(ImportTally::default());
    let report = import::import_with(&store, &cache, selection, &trusted, a.jobs, &|e| {
        let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
        match e {
            import::Event::Total(n) => {
                t.total = n;
                pb.set_length(n);
                return;
            }
            import::Event::Done { outcome, .. } if outcome.already_present => t.present += 1,
            import::Event::Done { outcome, .. } => {
                t.new += 1;
                t.nar_bytes += outcome.nar_size;
            }
            import::Event::Failed(_) => t.failed += 1,
        }
        pb.inc(1);
        pb.set_message(t.counts(cache.read_bytes()));
        if !tty && t.last_log.elapsed() >= log_every {
            t.last_log = std::time::Instant::now();
            eprintln!(
                "import: {}, {}",
                t.progress(start.elapsed(), growing),
                t.counts(cache.read_bytes())
            );
        }
    })?;
    pb.finish_and_clear();
    upload_all(&store)?;
    if report.imported > 0 {
        store.compact_index().context("compacting the index")?;
    }
    // Paths no configured key vouches for are stored but never announced nor shared: say so.
    let untrusted = store
        .narinfo_count()?
        .saturating_sub(store.shareable_paths()?.len() as u64);
    if a.json {
        // Storage requests of this process (the import and its uploads): a later `stats`
        // opens the store afresh and counts from zero.
        let storage = store.stats()?.storage;
        let v = serde_json::json!({
            "imported": report.imported,
            "already_present": report.already_present,
            "failed": report.failed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "nar_bytes": report.nar_bytes,
            "already_present_nar_bytes": report.already_present_nar_bytes,
            "new_chunk_bytes": report.new_chunk_bytes,
            "new_compressed_bytes": report.new_compressed_bytes,
            "nars_read": cache.nars_opened(),
            "read_bytes": cache.read_bytes(),
            "untrusted_paths_in_store": untrusted,
            "storage": storage,
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        outln!(
            "imported {} paths, {} of NARs ({} NAR files read, {}), {} of new chunks stored as {}; {} paths already present ({} of NARs, not read again)",
            report.imported,
            human(report.nar_bytes),
            cache.nars_opened(),
            human(cache.read_bytes()),
            human(report.new_chunk_bytes),
            human(report.new_compressed_bytes),
            report.already_present,
            human(report.already_present_nar_bytes),
        );
        if untrusted > 0 {
            outln!(
                "{untrusted} stored paths are untrusted (no signature by a trusted key): kept, but \
                 never announced nor shared with peers; a daemon started with their \
                 --trusted-public-keys trusts them"
            );
        }
    }
    if report.failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for e in &report.failed {
            eprintln!("refused: {e}");
        }
        eprintln!(
            "{} paths refused or not fetched (run again to retry them)",
            report.failed.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

/// Opens a store that must already exist (read-side commands never create one).
fn print_repair(r: &nix_p2p_cache::store::RepairReport) {
    if let Some(old) = &r.old_index {
        outln!("old index moved to {}", old.display());
    }
    outln!(
        "read {} packs ({}): {} chunk records ({} duplicates), {} metadata records ({} damaged)",
        r.packs,
        human(r.pack_bytes),
        r.chunk_records,
        r.duplicate_chunk_records,
        r.metadata_records,
        r.damaged_metadata_records
    );
    outln!(
        "restored {} paths ({} pinned), {} NARs; {} dead bytes, {} torn bytes",
        r.paths_restored,
        r.pinned_restored,
        r.nars_restored,
        r.dead_bytes,
        r.torn_bytes
    );
    for p in &r.paths_incomplete {
        outln!("NOT RESTORED: {p}: a chunk of its NAR is in no pack");
    }
    for p in &r.unreadable_packs {
        outln!("NOT A PACK: {p}");
    }
}

/// `verify [--repair] [--json]`: exit 1 on damage.
fn verify_command(data: &DataDir, repair: bool, json: bool) -> Result<ExitCode> {
    let repaired = if repair {
        let r = nix_p2p_cache::store::repair(&data.data_dir, &data.storage_options())
            .with_context(|| format!("repairing {}", data.data_dir.display()))?;
        if !json {
            print_repair(&r);
        }
        Some(r)
    } else {
        None
    };
    let store = open_existing(&data.data_dir, &data.storage_options())?;
    let pb = ProgressBar::new(store.stats()?.chunk_compressed_bytes);
    pb.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} chunks read")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let problems = store.verify(|n| pb.inc(n))?;
    pb.finish_and_clear();
    let s = store.stats()?;
    if json {
        let v = serde_json::json!({
            "ok": problems.is_empty(),
            "chunks": s.chunks,
            "nars": s.nars,
            "narinfos": s.narinfos,
            "problems": problems,
            "repair": repaired,
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else if problems.is_empty() {
        outln!(
            "ok: {} chunks, {} NARs, {} narinfos verified",
            s.chunks,
            s.nars,
            s.narinfos
        );
    } else {
        for p in &problems {
            outln!("DAMAGED: {p}");
        }
    }
    if problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} problems found", problems.len());
        Ok(ExitCode::FAILURE)
    }
}

/// With remote storage: seals the open pack and uploads every sealed one, so the bucket
/// alone holds what this command stored (and deletes what it collected).
fn upload_all(store: &Store) -> Result<()> {
    let r = store
        .seal_and_upload()
        .context("uploading sealed packs to the storage")?;
    if r.packs > 0 || r.deleted > 0 {
        eprintln!(
            "storage: uploaded {} packs ({}), deleted {}",
            r.packs,
            human(r.bytes),
            r.deleted
        );
    }
    Ok(())
}

fn open_existing(dir: &std::path::Path, opts: &StorageOptions) -> Result<Store> {
    if !dir.join("index.redb").is_file() {
        if dir
            .join("packs")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some())
        {
            bail!(
                "{} has packs but no index: rebuild it with `nix-p2p-cache verify --repair \
                 --data-dir {}`",
                dir.display(),
                dir.display()
            );
        }
        bail!(
            "no store in {} (nothing imported or uploaded there yet)",
            dir.display()
        );
    }
    Store::open_with_storage(dir, DEFAULT_ZSTD_LEVEL, opts)
        .with_context(|| format!("opening store {}", dir.display()))
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

fn s<'a>(v: &'a serde_json::Value, k: &str) -> &'a str {
    v.get(k).and_then(serde_json::Value::as_str).unwrap_or("-")
}

fn print_status(v: &serde_json::Value) {
    outln!(
        "nix-p2p-cache {} ({}), up {} s",
        s(v, "version"),
        s(v, "role"),
        u(v, "uptime_secs")
    );
    let st = &v["store"];
    let quota = match v.get("max_cache_size").and_then(serde_json::Value::as_u64) {
        Some(q) => format!(
            " of {} ({:.0} %)",
            human(q),
            100.0 * u(st, "stored_bytes") as f64 / q.max(1) as f64
        ),
        None => String::new(),
    };
    outln!(
        "store      {} paths, {} NARs ({}), {} on disk{quota}",
        u(st, "narinfos"),
        u(st, "nars"),
        human(u(st, "nar_bytes")),
        human(u(st, "stored_bytes"))
    );
    let ups = v["upstreams"].as_array().map(|a| a.len()).unwrap_or(0);
    outln!("upstreams  {ups}");
    match v.get("p2p").filter(|p| !p.is_null()) {
        None => outln!("p2p        off"),
        Some(p) => {
            outln!("peer id    {}", s(v, "peer_id"));
            for a in v["p2p_addresses"].as_array().into_iter().flatten() {
                outln!("listening  {}", a.as_str().unwrap_or("-"));
            }
            outln!(
                "share      {} (announce {})",
                s(v, "share"),
                s(v, "announce")
            );
            if let Some(r) = v
                .get("upload_rate_limit")
                .and_then(serde_json::Value::as_u64)
            {
                outln!("upload cap {}/s", human(r));
            }
            outln!(
                "peers      {} connected, {} banned",
                u(p, "connected_peers"),
                u(p, "peers_banned")
            );
            outln!(
                "traffic    {} up, {} down",
                human(u(p, "bytes_up")),
                human(u(p, "bytes_down"))
            );
            outln!(
                "fetched    {} NARs ({} failed), {} blocks, {} chunks reused locally",
                u(p, "nars_fetched"),
                u(p, "nar_fetch_failures"),
                u(p, "blocks_received"),
                u(p, "chunks_reused_locally")
            );
            outln!(
                "providers  {} found in {} DHT lookups",
                u(p, "providers_found"),
                u(p, "provider_lookups")
            );
            outln!(
                "refused    {} bad blocks, {} bad manifests",
                u(p, "bad_blocks"),
                u(p, "bad_manifests")
            );
            if let Some(a) = p.get("announce").filter(|a| !a.is_null()) {
                outln!(
                    "announced  {} keys ({} failed), {} full rounds",
                    u(a, "keys_provided"),
                    u(a, "failures"),
                    u(a, "reprovides")
                );
            }
        }
    }
}

fn print_peers(v: &serde_json::Value) {
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        outln!("no peers");
        return;
    }
    outln!(
        "{:<54} {:<5} {:>10} {:>10} {:<8} address",
        "peer",
        "lan",
        "up",
        "down",
        "state"
    );
    for p in &list {
        let state = if let Some(b) = p.get("banned_secs").and_then(serde_json::Value::as_u64) {
            format!("banned {b}s")
        } else if p["connected"].as_bool() == Some(true) {
            "connected".into()
        } else {
            "gone".into()
        };
        outln!(
            "{:<54} {:<5} {:>10} {:>10} {:<8} {}",
            s(p, "peer_id"),
            if p["lan"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            human(u(p, "bytes_up")),
            human(u(p, "bytes_down")),
            state,
            s(p, "address")
        );
    }
}

/// `doctor [--url URL] [--config F] [--json]`: one line per check (or a JSON array); the exit
/// status says the worst.
fn doctor_command(api: &ApiArgs) -> Result<ExitCode> {
    use nix_p2p_cache::doctor;
    let config = match &api.config {
        Some(f) => Some(DaemonConfig::from_file(f)?),
        None => None,
    };
    let opts = doctor::Options {
        url: api.base()?,
        config,
    };
    let checks = block_on(async { Ok(doctor::diagnose(&opts).await) })?;
    if api.json {
        outln!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            match &c.fix {
                Some(fix) => outln!(
                    "{:<4} {}: {} — fix: {fix}",
                    c.status.label(),
                    c.check,
                    c.detail
                ),
                None => outln!("{:<4} {}: {}", c.status.label(), c.check, c.detail),
            }
        }
    }
    Ok(ExitCode::from(doctor::exit_code(&checks)))
}

/// The store numbers of the daemon at `url` (`/api/status`'s `store`).
fn daemon_stats(url: &str) -> Result<serde_json::Value> {
    let api = ApiArgs {
        url: Some(url.to_string()),
        config: None,
        json: true,
    };
    let v = api.get("/api/status")?;
    Ok(v["store"].clone())
}

/// A daemon address as given to `--url`: `http://` is assumed when no scheme is given
/// (`127.0.0.1:7420`), a trailing `/` dropped.
fn base_url(u: &str) -> String {
    let u = u.trim_end_matches('/');
    if u.contains("://") {
        u.to_string()
    } else {
        format!("http://{u}")
    }
}

/// Tells systemd (`Type=notify`) about the daemon's state through `$NOTIFY_SOCKET`, if set
/// (a datagram to a path or an abstract socket); nothing otherwise.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt as _;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
            None => std::os::unix::net::SocketAddr::from_pathname(&path)?,
        };
        sock.send_to_addr(state.as_bytes(), &addr)
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "telling systemd the daemon's state failed");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // No colour codes into journald or files: only on a terminal.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // Warnings and errors also go to the dashboard's recent errors (a bounded ring).
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let recent = nix_p2p_cache::metrics::events::layer();
    match cli.log_format {
        LogFormat::Text => logs.finish().with(recent).init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .finish()
            .with(recent)
            .init(),
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", nix_p2p_cache::core::error_text(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let json_logs = cli.log_format == LogFormat::Json;
    match cli.command {
        Command::Daemon { args } => {
            let cfg = args.into_config()?;
            cfg.validate()?;
            let data_dir = cfg.data_dir.clone();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async {
                let signal = shutdown_signal()?;
                let shutdown = async move {
                    signal.await;
                    notify_systemd("STOPPING=1");
                };
                nix_p2p_cache::daemon::run(cfg, shutdown, |addr, p2p| {
                    use std::io::Write as _;
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "listening http://{addr}");
                    for a in p2p {
                        let _ = writeln!(out, "listening {a}");
                    }
                    let _ = out.flush();
                    // Where the data goes and how Nix reaches it, once, on stderr (the journal);
                    // with JSON logs as a log event, so that stderr stays JSON.
                    if json_logs {
                        tracing::info!(
                            url = %format!("http://{addr}"),
                            data_dir = %data_dir.display(),
                            "serving; in nix.conf: substituters = http://{addr} https://cache.nixos.org"
                        );
                    } else {
                        eprintln!(
                            "nix-p2p-cache: serving http://{addr} (data in {}); in nix.conf: \
                             substituters = http://{addr} https://cache.nixos.org",
                            data_dir.display()
                        );
                    }
                    if !p2p.is_empty() {
                        let list: Vec<String> = p2p.iter().map(ToString::to_string).collect();
                        if json_logs {
                            tracing::info!(
                                addresses = ?list,
                                "P2P node reachable at these addresses (other nodes' --bootstrap-peers)"
                            );
                        } else {
                            eprintln!(
                                "nix-p2p-cache: P2P node reachable at {} (give one to other nodes' \
                                 --bootstrap-peers)",
                                list.join(" ")
                            );
                        }
                    }
                    notify_systemd("READY=1\nSTATUS=serving");
                })
                .await
                .map_err(anyhow::Error::from)
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "nix-p2p-cache", &mut out);
            out!("{}", String::from_utf8_lossy(&out));
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .context("rendering the man page")?;
            out!("{}", String::from_utf8_lossy(&out));
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig {
            file,
            json,
            mut args,
        } => {
            if args.config.is_some() {
                bail!("give the config file once, as the argument");
            }
            args.config = Some(file.clone());
            let cfg = args.into_config()?;
            cfg.validate()
                .with_context(|| format!("{} is not a valid configuration", file.display()))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&cfg)?);
            } else {
                out!(
                    "{}",
                    toml::to_string(&cfg).context("printing the configuration")?
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Import {
            data,
            from,
            trusted_public_keys,
            lists,
            closure,
            jobs,
            zstd_level,
            json,
            store_paths,
        } => import_command(ImportArgs {
            data,
            from,
            trusted_public_keys,
            lists,
            closure,
            jobs: jobs.into(),
            zstd_level,
            json,
            store_paths,
        }),
        Command::Stats { data, json, url } => {
            // The store itself, or — while the daemon holds it — the daemon's own numbers.
            let s: serde_json::Value = match url {
                Some(u) => daemon_stats(&u)?,
                None => match open_existing(&data.data_dir, &data.storage_options()) {
                    Ok(store) => serde_json::to_value(store.stats()?)?,
                    Err(e)
                        if matches!(
                            e.downcast_ref::<StoreError>(),
                            Some(StoreError::Locked(_))
                        ) =>
                    {
                        daemon_stats(nix_p2p_cache::config::DEFAULT_LISTEN).with_context(|| {
                            format!("{e:#}; and asking the daemon at the default address failed (give --url)")
                        })?
                    }
                    Err(e) => return Err(e),
                },
            };
            if json {
                outln!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let g = |k: &str| u(&s, k);
                outln!("narinfos            {}", g("narinfos"));
                outln!("nars                {}", g("nars"));
                outln!(
                    "nar_bytes           {} ({})",
                    g("nar_bytes"),
                    human(g("nar_bytes"))
                );
                outln!("chunks              {}", g("chunks"));
                outln!(
                    "unique_chunk_bytes  {} ({})",
                    g("unique_chunk_bytes"),
                    human(g("unique_chunk_bytes"))
                );
                outln!(
                    "stored_bytes        {} ({})",
                    g("stored_bytes"),
                    human(g("stored_bytes"))
                );
                outln!(
                    "  packs             {} in {} files",
                    human(g("pack_bytes")),
                    g("packs")
                );
                outln!(
                    "  index             {} ({} of manifests)",
                    human(g("index_bytes")),
                    human(g("manifest_bytes"))
                );
                if g("unique_chunk_bytes") > 0 {
                    outln!(
                        "dedup {:.2}x, compression {:.2}x, overall {:.2}x",
                        g("nar_bytes") as f64 / g("unique_chunk_bytes") as f64,
                        g("unique_chunk_bytes") as f64 / g("chunk_compressed_bytes").max(1) as f64,
                        g("nar_bytes") as f64 / g("stored_bytes").max(1) as f64
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Nar { data, store_path } => {
            let hash = parse_hash_or_path(&store_path)
                .with_context(|| format!("bad store path {store_path:?}"))?;
            let store = open_existing(&data.data_dir, &data.storage_options())?;
            let Some(rec) = store.narinfo(hash.as_str())? else {
                let why = match store.path_state(hash.as_str())? {
                    PathState::Hidden { until, .. } => format!(
                        "hidden by a GC policy (collected after unix time {until}; `undelete` brings it back)"
                    ),
                    PathState::Collected { at } => {
                        format!("collected by a GC policy at unix time {at} (its narinfo is kept)")
                    }
                    _ => "not in the store".to_string(),
                };
                anyhow::bail!("{store_path}: {why}");
            };
            let mut reader = store.nar_reader(&rec.nar_hash)?;
            let mut out = std::io::stdout().lock();
            std::io::copy(&mut reader, &mut out)
                .with_context(|| format!("{store_path}: reading its NAR"))?;
            std::io::Write::flush(&mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { api } => api.show("/api/status", print_status),
        Command::Peers { api } => api.show("/api/peers", print_peers),
        Command::Doctor { api } => doctor_command(&api),
        Command::Pin {
            live,
            json,
            store_paths,
        } => pin_command(&live, &store_paths, true, json),
        Command::Unpin {
            live,
            json,
            store_paths,
        } => pin_command(&live, &store_paths, false, json),
        Command::Gc {
            live,
            policy: Some(policy),
            dry_run,
            json,
            ..
        } => policy_gc_command(&live, &policy, dry_run, json),
        Command::Gc {
            live,
            max_size,
            json,
            ..
        } => gc_command(&live, max_size, json),
        Command::Undelete {
            live,
            all,
            json,
            store_paths,
        } => undelete_command(&live, &store_paths, all, json),
        Command::Compact {
            data,
            level,
            min_age_secs,
            json,
        } => compact_command(&data, level, min_age_secs, json),
        Command::Verify { data, repair, json } => verify_command(&data, repair, json),
    }
}

#[cfg(test)]
mod tests {
    use super::ImportTally;
    use std::time::Duration;

    #[test]
    fn import_progress_says_the_total_and_an_eta() {
        let t = ImportTally {
            total: 40,
            new: 8,
            present: 2,
            ..ImportTally::default()
        };
        // 10 paths in 20 s: 30 more take 60 s.
        assert_eq!(
            t.progress(Duration::from_secs(20), false),
            "10 of 40 paths, eta 1m00s"
        );
        assert_eq!(
            t.progress(Duration::from_secs(20), true),
            "10 of at least 40 paths, eta 1m00s"
        );
        assert!(t.counts(0).starts_with("8 new, 2 already present, "));
        let none = ImportTally::default();
        assert_eq!(none.progress(Duration::from_secs(1), false), "0 of 0 paths");
    }
}
