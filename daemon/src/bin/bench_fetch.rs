//! `nix-p2p-cache-bench-fetch`: fetches every NAR of a list once from one server, over
//! `--concurrency` keep-alive connections sharing one work queue, and prints one JSON line:
//! NARs, bytes, seconds, MB/s, and the per-NAR time (request to last body byte) p50/p99.
//! `scripts/bench-s3.sh` runs it against a daemon whose packs are on S3 (cold, then warm)
//! and one whose packs are on local disk.
//!
//! Bodies are counted against the expected size; with `--verify` each body is also hashed
//! and checked against the NarHash in its file name (the hashing is then in the time, so a
//! timed pass leaves it out and a check pass comes after).
//!
//! Usage: `nix-p2p-cache-bench-fetch --url http://127.0.0.1:PORT --nars FILE
//! [--concurrency 4] [--verify]`; `--nars FILE`: one `nar/<narhash>.nar <size>` per line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

#[path = "common/http1.rs"]
mod http1;
use http1::{nar_hash_of, parse_url, read_nars, Conn};

const USAGE: &str = "usage: nix-p2p-cache-bench-fetch --url http://IP:PORT --nars FILE \
[--concurrency N] [--verify]";

struct Args {
    addr: SocketAddr,
    nars: PathBuf,
    concurrency: usize,
    verify: bool,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut addr, mut nars) = (None, None);
    let (mut concurrency, mut verify) = (4, false);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .with_context(|| format!("{a} needs a value; {USAGE}"))
        };
        match a.as_str() {
            "--url" => addr = Some(parse_url(&val()?)?),
            "--nars" => nars = Some(PathBuf::from(val()?)),
            "--concurrency" => concurrency = val()?.parse()?,
            "--verify" => verify = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    ensure!(concurrency >= 1, "--concurrency must be ≥ 1");
    Ok(Args {
        addr: addr.with_context(|| format!("--url is required; {USAGE}"))?,
        nars: nars.with_context(|| format!("--nars is required; {USAGE}"))?,
        concurrency,
        verify,
    })
}

/// One NAR: GET, size check and (with `verify`) NarHash check; returns its time.
async fn fetch_one(c: &mut Conn, path: &str, size: u64, verify: bool) -> Result<Duration> {
    let t = Instant::now();
    let mut h = verify.then(Sha256::new);
    let n = c.get(path, h.as_mut()).await?;
    let d = t.elapsed();
    ensure!(n == size, "{path}: {n} bytes, expected {size}");
    if let Some(h) = h {
        ensure!(
            h.finalize().as_slice() == nar_hash_of(path)?.0.as_slice(),
            "{path}: body does not match its NarHash"
        );
    }
    Ok(d)
}

/// Nearest-rank percentile of sorted samples, in milliseconds.
fn pct_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
}

async fn run(args: Args) -> Result<()> {
    let nars = Arc::new(read_nars(&args.nars)?);
    ensure!(!nars.is_empty(), "{}: no NARs", args.nars.display());
    let conns = args.concurrency.min(nars.len());
    let mut cs = Vec::with_capacity(conns);
    for _ in 0..conns {
        cs.push(Conn::connect(args.addr).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(conns);
    for mut c in cs {
        let (next, nars, verify) = (next.clone(), nars.clone(), args.verify);
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((path, size)) = nars.get(i) else {
                    return Ok::<_, anyhow::Error>(times);
                };
                times.push(fetch_one(&mut c, path, *size, verify).await?);
            }
        }));
    }
    let mut times = Vec::with_capacity(nars.len());
    for task in tasks {
        times.extend(task.await??);
    }
    let secs = t.elapsed().as_secs_f64();
    times.sort();
    let bytes: u64 = nars.iter().map(|(_, s)| s).sum();
    let v = serde_json::json!({
        "url": format!("http://{}", args.addr),
        "nars": nars.len(),
        "bytes": bytes,
        "concurrency": conns,
        "verified": args.verify,
        "secs": secs,
        "mb_per_s": bytes as f64 / 1e6 / secs,
        "nar_p50_ms": pct_ms(&times, 50.0),
        "nar_p99_ms": pct_ms(&times, 99.0),
    });
    println!("{v}");
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(pct_ms(&v, 50.0), 50.0);
        assert_eq!(pct_ms(&v, 99.0), 99.0);
        assert_eq!(pct_ms(&[], 50.0), 0.0);
    }
}
