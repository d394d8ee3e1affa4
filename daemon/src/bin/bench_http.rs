//! `nix-p2p-cache-bench-http`: the localhost substituter against a static file server (nginx)
//! serving the same uncompressed NARs and narinfos, measured in one run by the same client
//! (a minimal HTTP/1.1 keep-alive client on tokio's `TcpStream`):
//! - NAR throughput over the whole closure, on one connection and on `--concurrency` ones;
//! - narinfo latency (p50/p99) on one keep-alive connection;
//! - with `--daemon-pid` and `--big-nar`: the daemon's RSS (VmRSS sampled every 50 ms from
//!   `/proc/<pid>/status`, and VmHWM after resetting it through `clear_refs`) while one large
//!   NAR streams through it, and the time nginx takes for the same file.
//!
//! With `--daemon-pid`/`--nginx-pid`, the throughput table also shows each server's CPU time
//! and run-queue wait (summed over its threads, from `/proc/<pid>/task/*/schedstat`) per GB.
//!
//! Every NAR body is checked once (warm-up) against the NarHash in its file name; timed runs
//! only count bytes against the expected size. Servers are measured alternately, run by run,
//! and each figure is the median over `--runs` runs.
//!
//! Usage:
//! `nix-p2p-cache-bench-http --daemon URL --nginx URL --narinfos FILE --nars FILE
//!    [--runs 3] [--concurrency 4] [--narinfo-requests 2000] [--min-mb 512]
//!    [--daemon-pid PID [--big-nar nar/<narhash>.nar]] [--nginx-pid WORKER_PID]`
//!
//! `--narinfos FILE`: one `<hash>.narinfo` URL path per line. `--nars FILE`: one
//! `nar/<narhash>.nar <size>` per line. URLs are `http://127.0.0.1:PORT`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

#[path = "common/http1.rs"]
mod http1;
use http1::{nar_hash_of, parse_url, read_list, read_nars, Conn};

const USAGE: &str = "usage: nix-p2p-cache-bench-http --daemon URL --nginx URL --narinfos FILE \
--nars FILE [--runs N] [--concurrency N] [--narinfo-requests N] [--min-mb MB] \
[--daemon-pid PID [--big-nar nar/<narhash>.nar]] [--nginx-pid WORKER_PID]";

struct Args {
    daemon: SocketAddr,
    nginx: SocketAddr,
    narinfos: PathBuf,
    nars: PathBuf,
    runs: usize,
    concurrency: usize,
    narinfo_requests: usize,
    min_mb: u64,
    daemon_pid: Option<u32>,
    nginx_pid: Option<u32>,
    big_nar: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut daemon, mut nginx, mut narinfos, mut nars) = (None, None, None, None);
    let mut args = Args {
        daemon: "127.0.0.1:0".parse()?,
        nginx: "127.0.0.1:0".parse()?,
        narinfos: PathBuf::new(),
        nars: PathBuf::new(),
        runs: 3,
        concurrency: 4,
        narinfo_requests: 2000,
        min_mb: 512,
        daemon_pid: None,
        nginx_pid: None,
        big_nar: None,
    };
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .with_context(|| format!("{a} needs a value; {USAGE}"))
        };
        match a.as_str() {
            "--daemon" => daemon = Some(parse_url(&val()?)?),
            "--nginx" => nginx = Some(parse_url(&val()?)?),
            "--narinfos" => narinfos = Some(PathBuf::from(val()?)),
            "--nars" => nars = Some(PathBuf::from(val()?)),
            "--runs" => args.runs = val()?.parse()?,
            "--concurrency" => args.concurrency = val()?.parse()?,
            "--narinfo-requests" => args.narinfo_requests = val()?.parse()?,
            "--min-mb" => args.min_mb = val()?.parse()?,
            "--daemon-pid" => args.daemon_pid = Some(val()?.parse()?),
            "--nginx-pid" => args.nginx_pid = Some(val()?.parse()?),
            "--big-nar" => args.big_nar = Some(val()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    args.daemon = daemon.with_context(|| format!("--daemon is required; {USAGE}"))?;
    args.nginx = nginx.with_context(|| format!("--nginx is required; {USAGE}"))?;
    args.narinfos = narinfos.with_context(|| format!("--narinfos is required; {USAGE}"))?;
    args.nars = nars.with_context(|| format!("--nars is required; {USAGE}"))?;
    ensure!(
        args.runs >= 1 && args.concurrency >= 1 && args.narinfo_requests >= 1,
        "--runs, --concurrency and --narinfo-requests must be ≥ 1"
    );
    ensure!(
        args.big_nar.is_none() || args.daemon_pid.is_some(),
        "--big-nar needs --daemon-pid"
    );
    Ok(args)
}

/// Fetches every NAR once and checks it against its NarHash and size (also the warm-up).
async fn verify_nars(addr: SocketAddr, nars: &[(String, u64)]) -> Result<()> {
    let mut c = Conn::connect(addr).await?;
    for (path, size) in nars {
        let mut h = Sha256::new();
        let n = c.get(path, Some(&mut h)).await?;
        ensure!(n == *size, "{addr} {path}: {n} bytes, expected {size}");
        let want = nar_hash_of(path)?;
        ensure!(
            h.finalize().as_slice() == want.0.as_slice(),
            "{addr} {path}: body does not match its NarHash"
        );
    }
    Ok(())
}

/// GETs `passes` × the NAR list over `conns` keep-alive connections sharing one work queue.
async fn throughput(
    addr: SocketAddr,
    nars: &Arc<Vec<(String, u64)>>,
    conns: usize,
    passes: usize,
) -> Result<(u64, Duration)> {
    let mut cs = Vec::with_capacity(conns);
    for _ in 0..conns {
        cs.push(Conn::connect(addr).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let total = nars.len() * passes;
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(conns);
    for mut c in cs {
        let (next, nars) = (next.clone(), nars.clone());
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<u64, anyhow::Error>(bytes);
                }
                let (path, size) = &nars[i % nars.len()];
                let n = c.get(path, None).await?;
                ensure!(n == *size, "{path}: {n} bytes, expected {size}");
                bytes += n;
            }
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await??;
    }
    Ok((bytes, t.elapsed()))
}

/// Latencies of `n` narinfo GETs on one keep-alive connection, after `n / 10` unmeasured.
async fn narinfo_latency(addr: SocketAddr, paths: &[String], n: usize) -> Result<Vec<Duration>> {
    let mut c = Conn::connect(addr).await?;
    for p in paths.iter().cycle().take(n / 10) {
        c.get(p, None).await?;
    }
    let mut out = Vec::with_capacity(n);
    for p in paths.iter().cycle().take(n) {
        let t = Instant::now();
        c.get(p, None).await?;
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (VmRSS, VmHWM) in KiB.
fn proc_mem(pid: u32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = s
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad {line:?}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// (on-CPU, waiting-for-CPU) nanoseconds summed over the process's threads; zeros if unknown.
fn sched(pid: Option<u32>) -> (u64, u64) {
    let Some(pid) = pid else { return (0, 0) };
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let (mut run, mut wait) = (0, 0);
    for t in rd.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            let mut f = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
            run += f.next().unwrap_or(0);
            wait += f.next().unwrap_or(0);
        }
    }
    (run, wait)
}

/// One stream of the big NAR through the daemon while sampling its memory.
struct BigRun {
    time: Duration,
    bytes: u64,
    rss_before_kib: u64,
    peak_rss_kib: u64,
    hwm_kib: Option<u64>,
    samples: usize,
}

async fn big_daemon_run(addr: SocketAddr, pid: u32, path: &str, size: u64) -> Result<BigRun> {
    let mut c = Conn::connect(addr).await?;
    // Resetting the peak (Linux ≥ 4.0) makes VmHWM the peak of this stream alone.
    let hwm_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let (rss_before_kib, _) = proc_mem(pid)?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(u64, usize)> {
            let (mut peak, mut n) = (0u64, 0usize);
            loop {
                let (rss, _) = proc_mem(pid)?;
                peak = peak.max(rss);
                n += 1;
                if stop.load(Ordering::Relaxed) {
                    return Ok((peak, n));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let t = Instant::now();
    let r = c.get(path, None).await;
    let time = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (peak_rss_kib, samples) = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))??;
    let bytes = r?;
    ensure!(bytes == size, "{path}: {bytes} bytes, expected {size}");
    let (_, hwm) = proc_mem(pid)?;
    Ok(BigRun {
        time,
        bytes,
        rss_before_kib,
        peak_rss_kib,
        hwm_kib: hwm_reset.then_some(hwm),
        samples,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let narinfos = read_list(&args.narinfos)?;
    let nars = Arc::new(read_nars(&args.nars)?);
    ensure!(
        !narinfos.is_empty() && !nars.is_empty(),
        "empty narinfo or NAR list"
    );
    let closure_bytes: u64 = nars.iter().map(|(_, s)| s).sum();
    let passes = ((args.min_mb * 1_000_000).div_ceil(closure_bytes.max(1))).max(1) as usize;
    let servers = [("daemon", args.daemon), ("nginx", args.nginx)];
    eprintln!(
        "closure: {} NARs, {:.1} MB; {} narinfos; {} passes per throughput run; {} runs",
        nars.len(),
        closure_bytes as f64 / 1e6,
        narinfos.len(),
        passes,
        args.runs
    );

    // Warm-up and correctness: every NAR from both servers, checked against its NarHash.
    for (name, addr) in servers {
        let t = Instant::now();
        verify_nars(addr, &nars)
            .await
            .with_context(|| format!("checking {name}'s NARs"))?;
        eprintln!(
            "{name}: all {} NARs match their NarHash ({:.2} s)",
            nars.len(),
            t.elapsed().as_secs_f64()
        );
        narinfo_latency(addr, &narinfos, 200).await?;
    }

    // (a) Throughput: [server][mode] → MB/s per run.
    let modes = [1, args.concurrency];
    let pids = [args.daemon_pid, args.nginx_pid];
    let mut tput = vec![vec![Vec::new(); modes.len()]; servers.len()];
    // [server][mode] → (CPU ms per GB, run-queue wait ms per GB) per run.
    let mut cpu = vec![vec![(Vec::new(), Vec::new()); modes.len()]; servers.len()];
    for run in 0..args.runs {
        for (mi, &conns) in modes.iter().enumerate() {
            for (si, (name, addr)) in servers.iter().enumerate() {
                let before = sched(pids[si]);
                let (bytes, d) = throughput(*addr, &nars, conns, passes).await?;
                let after = sched(pids[si]);
                let gb = bytes as f64 / 1e9;
                let run_ms = (after.0 - before.0) as f64 / 1e6 / gb;
                let wait_ms = (after.1 - before.1) as f64 / 1e6 / gb;
                let v = mbps(bytes, d);
                eprintln!(
                    "run {run}: {name} {conns} conn: {bytes} B in {d:.2?} = {v:.0} MB/s; \
                     server CPU {run_ms:.0} ms/GB, run-queue wait {wait_ms:.0} ms/GB"
                );
                tput[si][mi].push(v);
                cpu[si][mi].0.push(run_ms);
                cpu[si][mi].1.push(wait_ms);
            }
        }
    }

    // (b) narinfo latency: [server] → (p50 ms, p99 ms, mean ms) per run.
    let mut lat = vec![(Vec::new(), Vec::new(), Vec::new()); servers.len()];
    for run in 0..args.runs {
        for (si, (name, addr)) in servers.iter().enumerate() {
            let s = narinfo_latency(*addr, &narinfos, args.narinfo_requests).await?;
            let mean = s.iter().map(|d| ms(*d)).sum::<f64>() / s.len() as f64;
            let (p50, p99) = (ms(pct(&s, 50.0)), ms(pct(&s, 99.0)));
            eprintln!(
                "run {run}: {name} narinfo p50 {p50:.3} ms p99 {p99:.3} ms mean {mean:.3} ms"
            );
            lat[si].0.push(p50);
            lat[si].1.push(p99);
            lat[si].2.push(mean);
        }
    }

    // (c) The big NAR: daemon memory and time; nginx time on the same file.
    let mut big = None;
    if let (Some(path), Some(pid)) = (&args.big_nar, args.daemon_pid) {
        let mut c = Conn::connect(args.nginx).await?;
        let mut h = Sha256::new();
        let size = c.get(path, Some(&mut h)).await?;
        ensure!(
            h.finalize().as_slice() == nar_hash_of(path)?.0.as_slice(),
            "nginx's big NAR does not match its NarHash"
        );
        let t = Instant::now();
        let mut h = Sha256::new();
        let n = Conn::connect(args.daemon)
            .await?
            .get(path, Some(&mut h))
            .await?;
        ensure!(
            n == size && h.finalize().as_slice() == nar_hash_of(path)?.0.as_slice(),
            "the daemon's big NAR does not match its NarHash"
        );
        eprintln!(
            "big NAR {path}: {size} B, both servers match its NarHash (daemon warm-up {:.2} s)",
            t.elapsed().as_secs_f64()
        );
        let (mut runs, mut nginx_times) = (Vec::new(), Vec::new());
        for run in 0..args.runs {
            let r = big_daemon_run(args.daemon, pid, path, size).await?;
            eprintln!(
                "run {run}: daemon big NAR {:.2?} ({:.0} MB/s), RSS before {:.1} MiB, peak {:.1} MiB \
                 ({} samples), VmHWM {}",
                r.time,
                mbps(r.bytes, r.time),
                mib(r.rss_before_kib),
                mib(r.peak_rss_kib),
                r.samples,
                r.hwm_kib
                    .map_or("n/a (clear_refs refused)".into(), |k| format!("{:.1} MiB", mib(k)))
            );
            runs.push(r);
            let t = Instant::now();
            let n = c.get(path, None).await?;
            ensure!(n == size, "nginx big NAR: {n} bytes, expected {size}");
            let d = t.elapsed();
            eprintln!("run {run}: nginx big NAR {d:.2?} ({:.0} MB/s)", mbps(n, d));
            nginx_times.push(d.as_secs_f64());
        }
        big = Some((path.clone(), size, runs, nginx_times));
    }

    // The table.
    let med = |v: &Vec<f64>| median(v.clone());
    println!(
        "\n## NAR throughput: {} NARs, {:.1} MB, ×{passes} per run; median of {} runs",
        nars.len(),
        closure_bytes as f64 / 1e6,
        args.runs
    );
    println!(
        "| connections | daemon MB/s | nginx MB/s | daemon / nginx | target | \
         daemon CPU / wait ms per GB | nginx CPU / wait ms per GB |"
    );
    println!("|---|---|---|---|---|---|---|");
    let cpu_cell = |si: usize, mi: usize| -> String {
        if pids[si].is_none() {
            return "n/a".into();
        }
        let (r, w) = &cpu[si][mi];
        format!("{:.0} / {:.0}", med(r), med(w))
    };
    for (mi, conns) in modes.iter().enumerate() {
        let (d, n) = (med(&tput[0][mi]), med(&tput[1][mi]));
        let ratio = d / n;
        println!(
            "| {conns} | {d:.0} | {n:.0} | {ratio:.2} {} | ≥ 0.8 | {} | {} |",
            if ratio >= 0.8 { "✓" } else { "✗" },
            cpu_cell(0, mi),
            cpu_cell(1, mi)
        );
    }
    println!(
        "\n## narinfo latency: {} requests on one keep-alive connection, {} narinfos; median of {} runs",
        args.narinfo_requests,
        narinfos.len(),
        args.runs
    );
    println!("| | daemon ms | nginx ms | daemon / nginx | target |");
    println!("|---|---|---|---|---|");
    let (dp50, np50) = (med(&lat[0].0), med(&lat[1].0));
    let ratio = dp50 / np50;
    println!(
        "| p50 | {dp50:.3} | {np50:.3} | {ratio:.2} {} | ≤ 1.2 |",
        if ratio <= 1.2 { "✓" } else { "✗" }
    );
    let (dp99, np99) = (med(&lat[0].1), med(&lat[1].1));
    println!("| p99 | {dp99:.3} | {np99:.3} | {:.2} | — |", dp99 / np99);
    let (dm, nm) = (med(&lat[0].2), med(&lat[1].2));
    println!("| mean | {dm:.3} | {nm:.3} | {:.2} | — |", dm / nm);
    if let Some((path, size, runs, nginx_times)) = big {
        let peak = runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
        let hwm = runs.iter().map(|r| r.hwm_kib).collect::<Option<Vec<_>>>();
        let before = runs.iter().map(|r| r.rss_before_kib).max().unwrap_or(0);
        let dtime = median(runs.iter().map(|r| r.time.as_secs_f64()).collect());
        let ntime = median(nginx_times);
        println!(
            "\n## Streaming one {:.2} GiB NAR ({path}); {} runs",
            size as f64 / (1u64 << 30) as f64,
            runs.len()
        );
        println!("| | value | target |");
        println!("|---|---|---|");
        let limit = 64.0;
        let worst = hwm
            .as_ref()
            .and_then(|v| v.iter().max().copied())
            .map_or(mib(peak), |h| mib(h.max(peak)));
        println!(
            "| daemon peak VmRSS (50 ms samples, max over runs) | {:.1} MiB {} | ≤ 64 MiB |",
            mib(peak),
            if mib(peak) <= limit { "✓" } else { "✗" }
        );
        match &hwm {
            Some(v) => println!(
                "| daemon VmHWM during the stream (reset before each run, max) | {:.1} MiB {} | ≤ 64 MiB |",
                mib(v.iter().copied().max().unwrap_or(0)),
                if worst <= limit { "✓" } else { "✗" }
            ),
            None => println!("| daemon VmHWM | n/a (clear_refs refused) | — |"),
        }
        println!(
            "| daemon VmRSS before the stream (max) | {:.1} MiB | — |",
            mib(before)
        );
        println!(
            "| daemon time (median) | {dtime:.2} s = {:.0} MB/s | — |",
            size as f64 / 1e6 / dtime
        );
        println!(
            "| nginx time (median) | {ntime:.2} s = {:.0} MB/s | — |",
            size as f64 / 1e6 / ntime
        );
        println!(
            "| daemon / nginx throughput | {:.2} | ≥ 0.8 |",
            ntime / dtime
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(pct(&v, 50.0), Duration::from_millis(50));
        assert_eq!(pct(&v, 99.0), Duration::from_millis(99));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
