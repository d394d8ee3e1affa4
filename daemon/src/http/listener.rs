//! The substituter's listener: at most [`max_connections`] connections at once (more wait in
//! the kernel's backlog until one closes), and a connection that moves no byte in either
//! direction for [`IDLE_TIMEOUT`] is closed — half-sent request heads and forgotten keep-alive
//! connections cannot pile up and use the daemon's file descriptors (issue 14).
//!
//! The idle clock only runs while the connection is polled for reading or writing: a response
//! waiting for bytes of a NAR in flight (its own stall timeout is shorter) is not idle.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Concurrent HTTP connections when the descriptor limit is unknown (Nix opens at most
/// `http-connections`, 25 by default).
pub const MAX_CONNECTIONS: usize = 512;

/// The connection cap: `NIX_P2P_CACHE_HTTP_MAX_CONNECTIONS`, else half the process's soft
/// descriptor limit (the rest is for packs, databases, spools and peers), between 64 and 4096.
pub fn max_connections() -> usize {
    if let Some(n) = std::env::var("NIX_P2P_CACHE_HTTP_MAX_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    open_files_limit().map_or(MAX_CONNECTIONS, |soft| {
        usize::try_from(soft / 2).map_or(4096, |n| n.clamp(64, 4096))
    })
}

/// This process's soft open-files limit (`RLIMIT_NOFILE`), from `/proc/self/limits`; `None`
/// when unknown or unlimited.
pub fn open_files_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| soft_open_files(&t))
}

/// The soft "Max open files" of a `/proc/<pid>/limits` text.
fn soft_open_files(limits: &str) -> Option<u64> {
    let rest = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    rest.split_whitespace().next()?.parse().ok()
}

/// A connection with no byte read or written for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// [`IDLE_TIMEOUT`], or `NIX_P2P_CACHE_HTTP_IDLE_SECS` (tests).
pub fn idle_timeout() -> Duration {
    std::env::var("NIX_P2P_CACHE_HTTP_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(IDLE_TIMEOUT, Duration::from_secs)
}

/// A TCP listener with a connection cap and an idle timeout; see the module docs.
pub struct BoundedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
}

impl BoundedListener {
    pub fn new(inner: TcpListener, max: usize, idle: Duration) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(max.max(1))),
            idle,
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed; without a permit the connection is served anyway.
        let permit = self.slots.clone().acquire_owned().await.ok();
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    // Responses are written in large blocks; Nagle would only delay their tails.
                    if let Err(e) = io.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY");
                    }
                    return (GuardedStream::new(io, permit, self.idle), addr);
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection: holds its slot, and fails with `TimedOut` once idle too long.
pub struct GuardedStream {
    io: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl GuardedStream {
    fn new(io: TcpStream, slot: Option<OwnedSemaphorePermit>, idle: Duration) -> Self {
        Self {
            io,
            _slot: slot,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn progress(&mut self) {
        let at = Instant::now() + self.idle;
        self.deadline.as_mut().reset(at);
    }

    /// What a write of the inner stream came to: bytes written are progress, `Pending` runs
    /// the idle clock.
    fn wrote(
        &mut self,
        r: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.progress();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.idle_error(cx),
        }
    }

    /// After the inner stream said `Pending`: an error once the deadline has passed.
    fn idle_error<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP connection idle too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.progress();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.idle_error(cx),
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        self.wrote(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_soft_descriptor_limit() {
        let t = "Limit                     Soft Limit           Hard Limit           Units     \n\
                 Max cpu time              unlimited            unlimited            seconds   \n\
                 Max open files            1024                 524288               files     \n";
        assert_eq!(soft_open_files(t), Some(1024));
        assert_eq!(
            soft_open_files("Max open files  unlimited unlimited files"),
            None
        );
        assert!((64..=4096).contains(&max_connections()));
    }
}
