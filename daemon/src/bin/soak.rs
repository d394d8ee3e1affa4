//! `nix-p2p-cache-soak`: holds load against a running daemon for a while and reports errors,
//! narinfo latency, and the daemon's RSS and file descriptors over time (issue 14).
//!
//! Load: `--narinfo-clients` (1000) connections asking for narinfos back to back (the path of
//! `--hash`, else random hashes: a 404 is an answer, not an error), `--nar-streams` (32)
//! clients downloading the NAR of `--hash` again and again (checked: status 200 and the whole
//! body), and `--slow-readers` (200) clients that ask for that NAR and read 1 KiB a second.
//! An error is a failed connection, a status other than 200/404, or a short body.
//!
//! Usage: `nix-p2p-cache-soak --url http://127.0.0.1:PORT [--hash H] [--seconds N] [--pid PID]`
//! (`scripts/soak.sh`). The last line: `soak: errors=E narinfo_p99_ms=X rss_growth_mib=Y`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: String,
    hash: Option<String>,
    seconds: u64,
    pid: Option<u32>,
    narinfo_clients: usize,
    nar_streams: usize,
    slow_readers: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        addr: String::new(),
        hash: None,
        seconds: 60,
        pid: None,
        narinfo_clients: 1000,
        nar_streams: 32,
        slow_readers: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--url" => {
                let url = v()?;
                a.addr = url
                    .strip_prefix("http://")
                    .context("--url must be http://HOST:PORT")?
                    .trim_end_matches('/')
                    .to_string();
            }
            "--hash" => a.hash = Some(v()?),
            "--seconds" => a.seconds = v()?.parse()?,
            "--pid" => a.pid = Some(v()?.parse()?),
            "--narinfo-clients" => a.narinfo_clients = v()?.parse()?,
            "--nar-streams" => a.nar_streams = v()?.parse()?,
            "--slow-readers" => a.slow_readers = v()?.parse()?,
            other => bail!("unknown argument {other:?}; usage: nix-p2p-cache-soak --url http://127.0.0.1:PORT [--hash H] [--seconds N] [--pid PID] [--narinfo-clients N] [--nar-streams N] [--slow-readers N]"),
        }
    }
    if a.addr.is_empty() {
        bail!("--url http://127.0.0.1:PORT is required");
    }
    Ok(a)
}

/// One `GET` on a new connection: (status, body, whether the body had its Content-Length).
async fn get(addr: &str, path: &str) -> Result<(u16, Vec<u8>, bool)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no response head")?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let declared = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    let body = raw.split_off(head_end + 4);
    let complete = !matches!(declared, Some(d) if d != body.len());
    Ok((status, body, complete))
}

fn random_hash(x: &mut u64) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    (0..32)
        .map(|_| {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            ALPHABET[(*x % 32) as usize] as char
        })
        .collect()
}

/// VmRSS (KiB) and open descriptors of a process.
fn sample(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let nar_url = match &args.hash {
        Some(h) => {
            let (status, body, _) = get(&args.addr, &format!("/{h}.narinfo")).await?;
            if status != 200 {
                bail!("{h}.narinfo: status {status}");
            }
            let url = String::from_utf8_lossy(&body)
                .lines()
                .find_map(|l| l.strip_prefix("URL: ").map(str::to_string))
                .context("narinfo without URL")?;
            Some(format!("/{url}"))
        }
        None => {
            println!("no --hash: narinfo requests for random hashes only, no NAR streams");
            None
        }
    };
    let mut tasks = Vec::new();
    for i in 0..args.narinfo_clients {
        let (addr, hash, errors, lat) = (
            args.addr.clone(),
            args.hash.clone(),
            errors.clone(),
            latencies.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
            while Instant::now() < deadline {
                let h = hash.clone().unwrap_or_else(|| random_hash(&mut x));
                let t = Instant::now();
                match get(&addr, &format!("/{h}.narinfo")).await {
                    Ok((200 | 404, _, true)) => {
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        lat.lock().unwrap_or_else(|e| e.into_inner()).push(ms);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    if let Some(url) = &nar_url {
        for _ in 0..args.nar_streams {
            let (addr, url, errors) = (args.addr.clone(), url.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    if !matches!(get(&addr, &url).await, Ok((200, _, true))) {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for _ in 0..args.slow_readers {
            let (addr, url, errors) = (args.addr.clone(), url.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let r: Result<()> = async {
                    let mut s = TcpStream::connect(&addr).await?;
                    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: soak\r\n\r\n").as_bytes())
                        .await?;
                    let mut buf = [0u8; 1024];
                    while Instant::now() < deadline {
                        if s.read(&mut buf).await? == 0 {
                            break; // the whole NAR came (a small one)
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Ok(())
                }
                .await;
                if r.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    // Samples every second, a line every ten.
    let start = Instant::now();
    let (mut first, mut last, mut max_fds) = (None, None, 0usize);
    let mut tick = 0u32;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick += 1;
        let s = args.pid.and_then(sample);
        if let Some((rss, fds)) = s {
            // The first ten seconds are warm-up (caches, buffers): growth is counted after.
            if start.elapsed() >= Duration::from_secs(10.min(args.seconds / 2)) && first.is_none() {
                first = Some(rss);
            }
            last = Some(rss);
            max_fds = max_fds.max(fds);
        }
        let t = start.elapsed().as_secs();
        if tick == 10 {
            tick = 0;
            let mut l = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
            l.sort_by(f64::total_cmp);
            println!(
                "t={t}s requests={} narinfo_p50_ms={:.1} narinfo_p99_ms={:.1} errors={}{}",
                l.len(),
                percentile(&l, 0.5),
                percentile(&l, 0.99),
                errors.load(Ordering::Relaxed),
                s.map(|(rss, fds)| format!(" rss_mib={:.1} fds={fds}", rss as f64 / 1024.0))
                    .unwrap_or_default()
            );
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut l = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    l.sort_by(f64::total_cmp);
    let growth = match (first, last) {
        (Some(a), Some(b)) => (b as f64 - a as f64) / 1024.0,
        _ => 0.0,
    };
    println!(
        "narinfo requests={} p50_ms={:.2} p99_ms={:.2}; max_fds={max_fds}",
        l.len(),
        percentile(&l, 0.5),
        percentile(&l, 0.99)
    );
    println!(
        "soak: errors={} narinfo_p99_ms={:.2} rss_growth_mib={growth:.1}",
        errors.load(Ordering::Relaxed),
        percentile(&l, 0.99)
    );
    Ok(())
}
