//! The `nix-p2p-cache` binary: command-line entry points. Errors become `anyhow` here only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use nix_p2p_cache::core::signing::{PublicKey, CACHE_NIXOS_ORG_KEY};
use nix_p2p_cache::core::store_path::parse_hash_or_path;
use nix_p2p_cache::import::{self, BinaryCache, Selection};
use nix_p2p_cache::store::{Store, DEFAULT_ZSTD_LEVEL};

#[derive(Parser)]
#[command(
    name = "nix-p2p-cache",
    version,
    about = "Peer-to-peer, content-addressed binary cache for Nix"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct DataDir {
    /// Data directory (packs and index).
    #[arg(long, env = "NIX_P2P_CACHE_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Import narinfos and NARs from a file:// binary cache.
    Import {
        #[command(flatten)]
        data: DataDir,
        /// Binary cache to read, e.g. file:///var/cache/nix.
        #[arg(long)]
        from: String,
        /// A trusted public key (name:base64); cache.nixos.org-1 is always trusted.
        #[arg(long = "trusted-public-key")]
        trusted_public_keys: Vec<String>,
        /// Read store paths (or hashes) from this file, one per line.
        #[arg(long)]
        paths_file: Option<PathBuf>,
        /// Also import everything the given paths reference, transitively.
        #[arg(long)]
        closure: bool,
        /// zstd level for new chunks.
        #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL)]
        zstd_level: i32,
        /// Store paths to import; none (and no --paths-file) imports the whole cache.
        store_paths: Vec<String>,
    },
    /// Print counts and sizes of the store.
    Stats {
        #[command(flatten)]
        data: DataDir,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the NAR of a stored path to stdout (reassembled and verified against NarHash).
    Nar {
        #[command(flatten)]
        data: DataDir,
        /// Store path or its hash.
        store_path: String,
    },
    /// Re-read and re-hash every chunk, manifest and narinfo; exit non-zero on damage.
    Verify {
        #[command(flatten)]
        data: DataDir,
    },
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("nix-p2p-cache")
}

fn trusted_keys(extra: &[String]) -> Result<Vec<PublicKey>> {
    std::iter::once(CACHE_NIXOS_ORG_KEY)
        .chain(extra.iter().map(String::as_str))
        .map(|k| PublicKey::parse(k).with_context(|| format!("bad --trusted-public-key {k:?}")))
        .collect()
}

fn progress_bar() -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {pos} paths, {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Import {
            data,
            from,
            trusted_public_keys,
            paths_file,
            closure,
            zstd_level,
            store_paths,
        } => {
            let trusted = trusted_keys(&trusted_public_keys)?;
            let cache = BinaryCache::open(&from)?;
            let mut names = store_paths;
            if let Some(f) = paths_file {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?;
                names.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(String::from),
                );
            }
            let selection = if names.is_empty() {
                if closure {
                    bail!("--closure needs store paths");
                }
                Selection::All
            } else {
                let roots = names
                    .iter()
                    .map(|n| parse_hash_or_path(n).with_context(|| format!("bad store path {n:?}")))
                    .collect::<Result<Vec<_>>>()?;
                Selection::Paths { roots, closure }
            };
            let store = Store::open_with(&data.data_dir, zstd_level)
                .with_context(|| format!("opening store {}", data.data_dir.display()))?;
            let pb = progress_bar();
            let mut bytes = 0u64;
            let report = import::import(&store, &cache, selection, &trusted, |_, o| {
                bytes += o.nar_size;
                pb.inc(1);
                pb.set_message(human(bytes));
            })?;
            pb.finish_and_clear();
            println!(
                "imported {} paths ({} already present), {} of NARs, {} of new chunks stored as {}",
                report.imported,
                report.already_present,
                human(report.nar_bytes),
                human(report.new_chunk_bytes),
                human(report.new_compressed_bytes),
            );
            if report.failed.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                for e in &report.failed {
                    eprintln!("refused: {e}");
                }
                eprintln!("{} paths refused", report.failed.len());
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Stats { data, json } => {
            let store = Store::open(&data.data_dir)
                .with_context(|| format!("opening store {}", data.data_dir.display()))?;
            let s = store.stats()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("narinfos            {}", s.narinfos);
                println!("nars                {}", s.nars);
                println!(
                    "nar_bytes           {} ({})",
                    s.nar_bytes,
                    human(s.nar_bytes)
                );
                println!("chunks              {}", s.chunks);
                println!(
                    "unique_chunk_bytes  {} ({})",
                    s.unique_chunk_bytes,
                    human(s.unique_chunk_bytes)
                );
                println!(
                    "stored_bytes        {} ({})",
                    s.stored_bytes,
                    human(s.stored_bytes)
                );
                println!(
                    "  packs             {} in {} files",
                    human(s.pack_bytes),
                    s.packs
                );
                println!("  index             {}", human(s.index_bytes));
                if s.unique_chunk_bytes > 0 {
                    println!(
                        "dedup {:.2}x, compression {:.2}x, overall {:.2}x",
                        s.nar_bytes as f64 / s.unique_chunk_bytes as f64,
                        s.unique_chunk_bytes as f64 / s.chunk_compressed_bytes.max(1) as f64,
                        s.nar_bytes as f64 / s.stored_bytes.max(1) as f64
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Nar { data, store_path } => {
            let hash = parse_hash_or_path(&store_path)
                .with_context(|| format!("bad store path {store_path:?}"))?;
            let store = Store::open(&data.data_dir)
                .with_context(|| format!("opening store {}", data.data_dir.display()))?;
            let rec = store
                .narinfo(hash.as_str())?
                .with_context(|| format!("{store_path}: not in the store"))?;
            let mut reader = store.nar_reader(&rec.nar_hash)?;
            let mut out = std::io::stdout().lock();
            std::io::copy(&mut reader, &mut out)
                .with_context(|| format!("{store_path}: reading its NAR"))?;
            std::io::Write::flush(&mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { data } => {
            let store = Store::open(&data.data_dir)
                .with_context(|| format!("opening store {}", data.data_dir.display()))?;
            let pb = ProgressBar::new(store.stats()?.chunk_compressed_bytes);
            pb.set_style(
                ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} chunks read")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let problems = store.verify(|n| pb.inc(n))?;
            pb.finish_and_clear();
            if problems.is_empty() {
                let s = store.stats()?;
                println!(
                    "ok: {} chunks, {} NARs, {} narinfos verified",
                    s.chunks, s.nars, s.narinfos
                );
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &problems {
                    println!("DAMAGED: {p}");
                }
                eprintln!("{} problems found", problems.len());
                Ok(ExitCode::FAILURE)
            }
        }
    }
}
