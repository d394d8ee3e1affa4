//! The benchmarks' HTTP client: a minimal HTTP/1.1 keep-alive client on tokio's `TcpStream`
//! (status, Content-Length bodies, reconnect when the server closes), and the NAR lists the
//! bench scripts write. Shared by `nix-p2p-cache-bench-http` and `nix-p2p-cache-bench-fetch`
//! (each includes it with `#[path]`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use bytes::{Buf, BytesMut};
use nix_p2p_cache::core::NarHash;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Body read size.
const BODY_BUF: usize = 256 * 1024;

/// A parsed response head.
struct Head {
    status: u16,
    content_length: u64,
    close: bool,
}

fn parse_head(raw: &[u8]) -> Result<Head> {
    let text = std::str::from_utf8(raw).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    ensure!(
        version.starts_with("HTTP/1."),
        "bad status line {status_line:?}"
    );
    let status: u16 = parts
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut close = version == "HTTP/1.0";
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line {line:?}");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse().context("bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("Transfer-Encoding {value:?}: the bench expects Content-Length");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(Head {
        status,
        content_length: content_length.context("response without Content-Length")?,
        close,
    })
}

/// One keep-alive HTTP/1.1 connection; reconnects when the server closes it.
pub(crate) struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    rbuf: BytesMut,
    body: Vec<u8>,
    used: u64,
}

impl Conn {
    pub(crate) async fn connect(addr: SocketAddr) -> Result<Self> {
        let mut c = Conn {
            addr,
            stream: None,
            rbuf: BytesMut::with_capacity(16 * 1024),
            body: vec![0; BODY_BUF],
            used: 0,
        };
        c.reconnect().await?;
        Ok(c)
    }

    async fn reconnect(&mut self) -> Result<()> {
        let s = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        s.set_nodelay(true)?;
        self.stream = Some(s);
        self.rbuf.clear();
        self.used = 0;
        Ok(())
    }

    /// `GET path`; returns the body length. Fails on a status other than 200 or a short body.
    /// `hasher`, if any, sees the body.
    pub(crate) async fn get(&mut self, path: &str, mut hasher: Option<&mut Sha256>) -> Result<u64> {
        if self.stream.is_none() {
            self.reconnect().await?;
        }
        let head = match self.send_and_read_head(path).await {
            Ok(h) => h,
            // The server may close an idle keep-alive connection: retry once on a fresh one.
            Err(_) if self.used > 0 => {
                self.reconnect().await?;
                self.send_and_read_head(path).await?
            }
            Err(e) => return Err(e),
        };
        ensure!(head.status == 200, "GET {path}: status {}", head.status);
        let stream = self.stream.as_mut().context("not connected")?;
        let mut remaining = head.content_length;
        let have = (self.rbuf.len() as u64).min(remaining) as usize;
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&self.rbuf[..have]);
        }
        self.rbuf.advance(have);
        remaining -= have as u64;
        while remaining > 0 {
            let want = (remaining as usize).min(self.body.len());
            let n = stream.read(&mut self.body[..want]).await?;
            if n == 0 {
                bail!(
                    "GET {path}: connection closed with {remaining} of {} body bytes missing",
                    head.content_length
                );
            }
            if let Some(h) = hasher.as_deref_mut() {
                h.update(&self.body[..n]);
            }
            remaining -= n as u64;
        }
        self.used += 1;
        if head.close {
            self.stream = None;
        }
        Ok(head.content_length)
    }

    async fn send_and_read_head(&mut self, path: &str) -> Result<Head> {
        let stream = self.stream.as_mut().context("not connected")?;
        let req = format!(
            "GET /{path} HTTP/1.1\r\nHost: {}\r\nAccept: */*\r\n\r\n",
            self.addr
        );
        stream.write_all(req.as_bytes()).await?;
        loop {
            if let Some(end) = memchr::memmem::find(&self.rbuf, b"\r\n\r\n") {
                let head = parse_head(&self.rbuf[..end])?;
                self.rbuf.advance(end + 4);
                return Ok(head);
            }
            ensure!(self.rbuf.len() < 64 * 1024, "response head too long");
            if stream.read_buf(&mut self.rbuf).await? == 0 {
                bail!("GET {path}: connection closed before the response head");
            }
        }
    }
}

pub(crate) fn read_list(path: &PathBuf) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

/// `nar/<narhash>.nar <size>` lines.
pub(crate) fn read_nars(path: &PathBuf) -> Result<Vec<(String, u64)>> {
    read_list(path)?
        .into_iter()
        .map(|l| {
            let (p, s) = l
                .split_once(char::is_whitespace)
                .with_context(|| format!("{l:?}: expected `nar/<narhash>.nar <size>`"))?;
            Ok((p.to_string(), s.trim().parse()?))
        })
        .collect()
}

pub(crate) fn nar_hash_of(path: &str) -> Result<NarHash> {
    let digest = path
        .strip_prefix("nar/")
        .and_then(|p| p.strip_suffix(".nar"))
        .with_context(|| format!("{path:?} is not nar/<narhash>.nar"))?;
    NarHash::parse_digest(digest).map_err(|e| anyhow::anyhow!("{path:?}: {e}"))
}

/// `http://IP:PORT` → the address.
pub(crate) fn parse_url(u: &str) -> Result<SocketAddr> {
    let hostport = u
        .strip_prefix("http://")
        .with_context(|| format!("{u:?}: only http://HOST:PORT URLs"))?
        .trim_end_matches('/');
    hostport
        .parse()
        .with_context(|| format!("{u:?}: expected http://IP:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h =
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\nConnection: keep-alive").unwrap();
        assert_eq!((h.status, h.content_length, h.close), (200, 12, false));
        let h = parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close")
            .unwrap();
        assert_eq!((h.status, h.content_length, h.close), (404, 0, true));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK").is_err());
    }
}
