//! `nix-p2p-cache-bench-stream`: time to first byte of a NAR the daemon does not hold, fetched
//! from an upstream that sends it slowly (design §8, "miss path": first byte ≤ 1 s whatever the
//! NAR size).
//!
//! In one run: a throttled HTTP binary cache in this process (one unsigned narinfo and one
//! uncompressed NAR of `--size-mib` MiB of pseudo-random bytes, sent at `--rate-mbs` MB/s), the
//! real daemon (`nix-p2p-cache daemon --upstream …` on a temp data dir), and a client that
//! asks the daemon for the narinfo, then the NAR, and reads `--read-mib` MiB of it. Reported:
//! the time to the first body byte through the daemon and straight from the upstream (the
//! reference), their ratio, the time a store-then-serve path would need at best (the whole
//! download, NarSize / rate), and the daemon's peak RSS (VmHWM) over the run.
//!
//! Usage: `nix-p2p-cache-bench-stream [--size-mib 512] [--rate-mbs 5] [--read-mib 16]
//! [--daemon-bin PATH]` (default: `nix-p2p-cache` next to this binary).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix_p2p_cache::core::nar::{write_nar, Node};
use nix_p2p_cache::core::NarHash;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Args {
    size_mib: u64,
    rate_mbs: f64,
    read_mib: u64,
    daemon_bin: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        size_mib: 512,
        rate_mbs: 5.0,
        read_mib: 16,
        daemon_bin: std::env::current_exe()?
            .parent()
            .context("no parent dir")?
            .join("nix-p2p-cache"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--size-mib" => a.size_mib = v()?.parse()?,
            "--rate-mbs" => a.rate_mbs = v()?.parse()?,
            "--read-mib" => a.read_mib = v()?.parse()?,
            "--daemon-bin" => a.daemon_bin = v()?.into(),
            _ => bail!(
                "usage: nix-p2p-cache-bench-stream [--size-mib N] [--rate-mbs R] \
                 [--read-mib N] [--daemon-bin PATH]"
            ),
        }
    }
    Ok(a)
}

/// A NAR of one regular file of `len` pseudo-random bytes.
fn make_nar(len: usize) -> Result<Vec<u8>> {
    let mut contents = vec![0u8; len];
    blake3::Hasher::new()
        .update(b"bench-stream")
        .finalize_xof()
        .fill(&mut contents);
    let mut out = Vec::with_capacity(len + 256);
    write_nar(
        &mut out,
        &Node::Regular {
            executable: false,
            contents,
        },
    )?;
    Ok(out)
}

/// Serves `files` (path → body); NAR bodies (under `/nar/`) at `rate` bytes per second.
async fn serve(l: TcpListener, files: Arc<Vec<(String, Arc<Vec<u8>>)>>, rate: f64) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            return;
        };
        let files = files.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut r = tokio::io::BufReader::new(r);
            let mut line = String::new();
            if r.read_line(&mut line).await.is_err() {
                return;
            }
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            let path = line.split(' ').nth(1).unwrap_or("");
            let Some((_, body)) = files.iter().find(|(p, _)| p == path) else {
                let _ = w
                    .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    .await;
                return;
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if w.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            if !path.starts_with("/nar/") {
                let _ = w.write_all(body).await;
                return;
            }
            let slice = ((rate / 50.0) as usize).max(1);
            let start = tokio::time::Instant::now();
            let mut sent = 0usize;
            for part in body.chunks(slice) {
                if w.write_all(part).await.is_err() {
                    return;
                }
                sent += part.len();
                let due = start + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(due).await;
            }
        });
    }
}

/// GETs `path` and reads `read` body bytes: (time to the head, time to the first body byte,
/// time to `read` bytes).
async fn timed_get(port: u16, path: &str, read: u64) -> Result<(Duration, Duration, Duration)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let (mut t_head, mut t_first) = (None, None);
    let mut body = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("connection closed after {body} body bytes");
        }
        let mut data = &buf[..n];
        if t_head.is_none() {
            head.extend_from_slice(data);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            if !head.starts_with(b"HTTP/1.1 200") {
                bail!("{path}: {}", String::from_utf8_lossy(&head[..end]));
            }
            t_head = Some(t0.elapsed());
            let rest = head.len() - (end + 4);
            data = &buf[n - rest..n];
        }
        if !data.is_empty() {
            t_first.get_or_insert_with(|| t0.elapsed());
            body += data.len() as u64;
        }
        if body >= read {
            break;
        }
    }
    Ok((
        t_head.unwrap_or_default(),
        t_first.unwrap_or_default(),
        t0.elapsed(),
    ))
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let rate = args.rate_mbs * 1e6;
    eprintln!("making a {} MiB NAR…", args.size_mib);
    let nar = make_nar((args.size_mib << 20) as usize)?;
    let nar_hash = NarHash::digest(&nar);
    let hash = "0123456789abcdfghijklmnpqrsvwxyz";
    let narinfo = format!(
        "StorePath: /nix/store/{hash}-bench-stream\nURL: nar/big.nar\nCompression: none\n\
         NarHash: {nar_hash}\nNarSize: {}\nReferences: \n",
        nar.len()
    );
    let nar_size = nar.len() as u64;
    let files = Arc::new(vec![
        (format!("/{hash}.narinfo"), Arc::new(narinfo.into_bytes())),
        ("/nar/big.nar".to_string(), Arc::new(nar)),
    ]);
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let up_port = l.local_addr()?.port();
    tokio::spawn(serve(l, files, rate));

    let data = tempfile::tempdir()?;
    let mut daemon = Command::new(&args.daemon_bin)
        .args(["daemon", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .args(["--upstream", &format!("http://127.0.0.1:{up_port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", args.daemon_bin.display()))?;
    let mut line = String::new();
    BufReader::new(daemon.stdout.take().context("stdout")?).read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .strip_prefix("listening http://127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("daemon said {line:?}"))?;
    let pid = daemon.id();

    let read = args.read_mib << 20;
    let result = async {
        let direct = timed_get(up_port, "/nar/big.nar", read).await?;
        let (_, _, _) = timed_get(port, &format!("/{hash}.narinfo"), 1).await?;
        let via = timed_get(port, &format!("/nar/{}.nar", nar_hash.to_base32()), read).await?;
        Ok::<_, anyhow::Error>((direct, via))
    }
    .await;
    let hwm = vm_hwm_kib(pid);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let (direct, via) = result?;
    let whole = Duration::from_secs_f64(nar_size as f64 / rate);
    println!(
        "NAR {} MiB from an upstream at {} MB/s; {} MiB read\n",
        args.size_mib, args.rate_mbs, args.read_mib
    );
    println!(
        "| path | headers | first byte | {} MiB read |",
        args.read_mib
    );
    println!("|---|---|---|---|");
    for (name, (h, f, r)) in [("upstream direct", direct), ("through the daemon", via)] {
        println!(
            "| {name} | {:.3} s | {:.3} s | {:.2} s |",
            h.as_secs_f64(),
            f.as_secs_f64(),
            r.as_secs_f64()
        );
    }
    println!(
        "\nfirst byte through the daemon: {:.3} s (target ≤ 1 s); upstream direct {:.3} s; \
         a store-then-serve path: ≥ {:.0} s (the whole download)",
        via.1.as_secs_f64(),
        direct.1.as_secs_f64(),
        whole.as_secs_f64()
    );
    println!(
        "{} MiB read through the daemon / direct = {:.2}",
        args.read_mib,
        via.2.as_secs_f64() / direct.2.as_secs_f64()
    );
    if let Some(k) = hwm {
        println!("daemon peak RSS (VmHWM): {:.1} MiB", k as f64 / 1024.0);
    }
    Ok(())
}
