//! `Flight`: one NAR on its way in from a source, streamed to any number of clients while it
//! is stored.
//!
//! The source writes the NAR's bytes in order ([`Flight::write`]); they go to an unlinked
//! spool file and through a running sha256. Clients ([`Flight::stream`]) read the spool at
//! their own pace, so memory stays bounded however many clients there are and however slow
//! they read, and a client that joins late starts from byte 0 like the first. Every byte but the
//! last is handed out as soon as it is written (the source checked it already: a peer's chunk
//! against its id; an upstream's bytes are only proven by NarHash); the last one only once the
//! whole NAR has hashed to NarHash with exactly NarSize bytes ([`Flight::finish`]). A NAR that
//! fails ends every client's body with an error, so a client never sees a complete wrong 200.
//! The store's ingest of an upstream NAR reads the spool too ([`Flight::spool_reader`]), at its
//! own pace: clients never wait for chunking, compression or the commit.
//!
//! A flight can be *held*: bytes are spooled but no client sees any until it is verified, and
//! a held flight can be [`Flight::reset`] to try another source from byte 0. Fetches whose
//! manifests disagree between providers run held (one of them lies).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::core::NarHash;

/// Bytes read from the spool per body block.
const BLOCK: u64 = 256 * 1024;

/// What clients see of a flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// `visible` bytes may be handed out.
    Running { visible: u64 },
    /// All NarSize bytes hashed to NarHash.
    Verified,
    /// The NAR could not be had from this flight's sources; bodies end with this error.
    Failed(Arc<str>),
}

/// Why a flight's bytes were refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FlightError {
    #[error("the source sent more than NarSize ({nar_size}) bytes")]
    TooLong { nar_size: u64 },
    #[error("the NAR is {actual} bytes, but its narinfo says NarSize {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("the NAR hashes to {actual}, but its narinfo says NarHash {expected}")]
    HashMismatch { expected: NarHash, actual: NarHash },
    #[error("writing the spool: {0}")]
    Spool(String),
    #[error("the flight already failed: {0}")]
    Failed(Arc<str>),
}

struct Writer {
    written: u64,
    sha: Sha256,
    held: bool,
    /// [`Flight::finish`] checked the NAR.
    verified: bool,
    /// Why the flight failed (ends the spool readers).
    failed: Option<Arc<str>>,
    /// Bumped by every [`Flight::reset`] (a spool reader of an earlier attempt stops).
    epoch: u64,
}

/// One NAR in flight; see the module docs.
pub struct Flight {
    nar_hash: NarHash,
    nar_size: u64,
    spool: Arc<File>,
    writer: Mutex<Writer>,
    /// Signalled on every write and at the end, for [`SpoolReader`]s.
    written: std::sync::Condvar,
    progress: watch::Sender<Progress>,
    /// Bytes written (what the dashboard shows of the fetch; back to 0 at a reset).
    written_bytes: Arc<AtomicU64>,
}

impl Flight {
    /// A new flight spooling into an unlinked file in `dir`.
    pub(crate) fn new(dir: &Path, nar_hash: NarHash, nar_size: u64) -> io::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        let spool = tempfile::tempfile_in(dir)?;
        Ok(Arc::new(Self {
            nar_hash,
            nar_size,
            spool: Arc::new(spool),
            writer: Mutex::new(Writer {
                written: 0,
                sha: Sha256::new(),
                held: false,
                verified: false,
                failed: None,
                epoch: 0,
            }),
            written: std::sync::Condvar::new(),
            progress: watch::Sender::new(Progress::Running { visible: 0 }),
            written_bytes: Arc::default(),
        }))
    }

    pub(crate) fn nar_size(&self) -> u64 {
        self.nar_size
    }

    /// The count of bytes written so far, kept up to date by the flight (for
    /// [`crate::metrics::transfers::Transfers::begin`]).
    pub(crate) fn written_counter(&self) -> Arc<AtomicU64> {
        self.written_bytes.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes written so far.
    #[cfg(test)]
    pub(crate) fn written(&self) -> u64 {
        self.lock().written
    }

    /// Whether any byte may have reached a client.
    pub(crate) fn exposed(&self) -> bool {
        let w = self.lock();
        !w.held && w.written > 0
    }

    /// Holds (or releases) the bytes: while held, clients see none of them.
    pub(crate) fn hold(&self, held: bool) {
        let mut w = self.lock();
        w.held = held;
        if !held && w.verified {
            self.progress.send_replace(Progress::Verified);
            return;
        }
        let visible = if held { 0 } else { self.visible(w.written) };
        self.publish_running(visible);
    }

    /// Starts over from byte 0 (another source); only while nothing was exposed.
    pub(crate) fn reset(&self) -> bool {
        let mut w = self.lock();
        if w.verified || (!w.held && w.written > 0) {
            return false;
        }
        w.written = 0;
        self.written_bytes.store(0, Ordering::Relaxed);
        w.sha = Sha256::new();
        w.epoch += 1;
        self.written.notify_all();
        true
    }

    /// What clients may read of `written` bytes before the NarHash check: all but the last.
    fn visible(&self, written: u64) -> u64 {
        written.min(self.nar_size.saturating_sub(1))
    }

    fn publish_running(&self, visible: u64) {
        self.progress.send_if_modified(|p| match p {
            Progress::Running { visible: v } if *v != visible => {
                *v = visible;
                true
            }
            _ => false,
        });
    }

    /// Appends the next bytes of the NAR (blocking file I/O: call from a blocking thread).
    pub(crate) fn write(&self, data: &[u8]) -> Result<(), FlightError> {
        let mut w = self.lock();
        if let Some(e) = &w.failed {
            return Err(FlightError::Failed(e.clone()));
        }
        if w.written + data.len() as u64 > self.nar_size {
            return Err(FlightError::TooLong {
                nar_size: self.nar_size,
            });
        }
        self.spool
            .write_all_at(data, w.written)
            .map_err(|e| FlightError::Spool(e.to_string()))?;
        w.sha.update(data);
        w.written += data.len() as u64;
        self.written_bytes.store(w.written, Ordering::Relaxed);
        self.written.notify_all();
        if !w.held {
            self.publish_running(self.visible(w.written));
        }
        Ok(())
    }

    /// Checks the whole NAR against NarSize and NarHash. On success every client may read to
    /// the end (unless the flight is held: then at [`Flight::release`]). On failure nothing
    /// changes: the caller decides (fail, or reset and retry).
    pub(crate) fn finish(&self) -> Result<(), FlightError> {
        let mut w = self.lock();
        if w.verified {
            return Ok(()); // a reader may meet its end twice
        }
        if w.written != self.nar_size {
            return Err(FlightError::SizeMismatch {
                expected: self.nar_size,
                actual: w.written,
            });
        }
        let actual = NarHash(std::mem::take(&mut w.sha).finalize().into());
        if actual != self.nar_hash {
            return Err(FlightError::HashMismatch {
                expected: self.nar_hash,
                actual,
            });
        }
        w.verified = true;
        let held = w.held;
        drop(w);
        self.written.notify_all();
        if !held {
            self.progress.send_replace(Progress::Verified);
        }
        Ok(())
    }

    /// Lets every client read a verified NAR to its end (no-op unless [`Flight::finish`]
    /// succeeded).
    pub(crate) fn release(&self) {
        if self.is_verified() {
            self.progress.send_replace(Progress::Verified);
        }
    }

    /// Ends the spool readers (the store's ingest) with an error, without telling the clients:
    /// the source gave up; the resolver fails the flight (or tries another source).
    pub(crate) fn end_spool(&self, reason: &str) {
        {
            let mut w = self.lock();
            if !w.verified {
                w.failed = Some(Arc::from(reason));
            }
        }
        self.written.notify_all();
    }

    /// Ends the flight as failed (no-op once released): every client's body ends in an error.
    pub(crate) fn fail(&self, reason: &str) {
        self.end_spool(reason);
        self.progress.send_if_modified(|p| match p {
            Progress::Verified | Progress::Failed(_) => false,
            _ => {
                *p = Progress::Failed(Arc::from(reason));
                true
            }
        });
    }

    /// Whether the NAR checked ([`Flight::finish`]).
    pub(crate) fn is_verified(&self) -> bool {
        self.lock().verified
    }

    /// A blocking reader of everything written to the spool, in order, waiting for the writer;
    /// it ends once the NAR is verified and read to its end, and fails when the flight fails.
    /// (For the store's ingest: it checks NarHash itself, so it reads the last byte at once.)
    pub(crate) fn spool_reader(self: &Arc<Self>) -> SpoolReader {
        SpoolReader {
            flight: self.clone(),
            pos: 0,
            epoch: self.lock().epoch,
        }
    }

    /// Waits until the first bytes are visible (or, with `whole`, until the NAR is verified).
    /// `Err`: the flight failed first.
    pub(crate) async fn ready(&self, whole: bool) -> Result<(), Arc<str>> {
        let mut rx = self.progress.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Progress::Verified => return Ok(()),
                Progress::Failed(e) => return Err(e.clone()),
                Progress::Running { visible } if *visible > 0 && !whole => return Ok(()),
                Progress::Running { .. } => {}
            }
            if rx.changed().await.is_err() {
                return Err(Arc::from("flight dropped"));
            }
        }
    }

    /// The bytes `start..end` of the NAR as they become visible; ends with an error if the
    /// flight fails before they are all out.
    pub(crate) fn stream(
        self: &Arc<Self>,
        start: u64,
        end: u64,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let rx = self.progress.subscribe();
        let end = end.min(self.nar_size);
        let state = (self.clone(), rx, start.min(end));
        futures_util::stream::unfold(state, move |(flight, mut rx, pos)| async move {
            if pos >= end {
                return None;
            }
            loop {
                let progress = rx.borrow_and_update().clone();
                let visible = match progress {
                    Progress::Verified => flight.nar_size,
                    Progress::Running { visible } => visible,
                    Progress::Failed(e) => {
                        let err = io::Error::other(format!("NAR {} aborted: {e}", flight.nar_hash));
                        return Some((Err(err), (flight, rx, end)));
                    }
                };
                if visible > pos {
                    let n = (visible.min(end) - pos).min(BLOCK);
                    let spool = flight.spool.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; n as usize];
                        spool.read_exact_at(&mut buf, pos).map(|()| buf)
                    })
                    .await
                    .map_err(io::Error::other)
                    .and_then(|r| r);
                    return Some(match read {
                        Ok(buf) => (Ok(Bytes::from(buf)), (flight, rx, pos + n)),
                        Err(e) => (Err(e), (flight, rx, end)),
                    });
                }
                if rx.changed().await.is_err() {
                    let err = io::Error::other("NAR flight ended");
                    return Some((Err(err), (flight, rx, end)));
                }
            }
        })
    }
}

/// See [`Flight::spool_reader`].
pub(crate) struct SpoolReader {
    flight: Arc<Flight>,
    pos: u64,
    epoch: u64,
}

impl io::Read for SpoolReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let f = &self.flight;
        let mut w = f.lock();
        loop {
            if let Some(e) = &w.failed {
                return Err(io::Error::other(format!("NAR flight failed: {e}")));
            }
            if w.epoch != self.epoch || w.written < self.pos {
                return Err(io::Error::other("the NAR flight started over"));
            }
            if w.written > self.pos {
                break;
            }
            if w.verified {
                return Ok(0);
            }
            w = f.written.wait(w).unwrap_or_else(|e| e.into_inner());
        }
        let n = ((w.written - self.pos) as usize).min(buf.len());
        drop(w);
        f.spool.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    async fn collect(s: impl Stream<Item = io::Result<Bytes>>) -> (Vec<u8>, Option<String>) {
        let mut out = Vec::new();
        futures_util::pin_mut!(s);
        while let Some(item) = s.next().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn clients_get_every_byte_only_after_the_hash_checks() {
        let dir = tempfile::tempdir().unwrap();
        let nar = b"some NAR bytes, long enough to split".repeat(1000);
        let f = Flight::new(dir.path(), NarHash::digest(&nar), nar.len() as u64).unwrap();
        let early = tokio::spawn(collect(f.stream(0, u64::MAX)));
        let (a, b) = nar.split_at(nar.len() / 2);
        let w = f.clone();
        let (a2, b2) = (a.to_vec(), b.to_vec());
        tokio::task::spawn_blocking(move || w.write(&a2))
            .await
            .unwrap()
            .unwrap();
        f.ready(false).await.unwrap();
        let w = f.clone();
        tokio::task::spawn_blocking(move || w.write(&b2))
            .await
            .unwrap()
            .unwrap();
        // Everything written, nothing verified: the last byte is still held back.
        let mut rx = f.progress.subscribe();
        let visible = match &*rx.borrow_and_update() {
            Progress::Running { visible } => *visible,
            p => panic!("{p:?}"),
        };
        assert_eq!(visible, nar.len() as u64 - 1);
        let late = tokio::spawn(collect(f.stream(10, 20)));
        f.finish().unwrap();
        f.release();
        assert_eq!(early.await.unwrap(), (nar.clone(), None));
        assert_eq!(late.await.unwrap(), (nar[10..20].to_vec(), None));
    }

    #[tokio::test]
    async fn a_wrong_nar_aborts_every_body_and_too_many_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let nar = vec![7u8; 100_000];
        let f = Flight::new(dir.path(), NarHash::digest(&nar), nar.len() as u64).unwrap();
        let client = tokio::spawn(collect(f.stream(0, u64::MAX)));
        let mut wrong = nar.clone();
        wrong[99_000] = 8;
        assert!(matches!(
            f.write(&[0u8; 100_001]),
            Err(FlightError::TooLong { .. })
        ));
        f.write(&wrong).unwrap();
        assert!(matches!(f.finish(), Err(FlightError::HashMismatch { .. })));
        f.fail("wrong bytes");
        let (got, err) = client.await.unwrap();
        assert!(got.len() < nar.len(), "never the whole length");
        assert!(err.unwrap().contains("wrong bytes"));
        assert!(f.ready(false).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_spool_reader_follows_the_writer_to_the_end() {
        use std::io::Read as _;
        let dir = tempfile::tempdir().unwrap();
        let nar = b"0123456789".repeat(10_000);
        let f = Flight::new(dir.path(), NarHash::digest(&nar), nar.len() as u64).unwrap();
        let mut r = f.spool_reader();
        let reader = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            r.read_to_end(&mut out).map(|_| out)
        });
        let w = f.clone();
        let n2 = nar.clone();
        tokio::task::spawn_blocking(move || {
            for part in n2.chunks(7000) {
                w.write(part).unwrap();
            }
            w.finish().unwrap();
        })
        .await
        .unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), nar);
        // A failed flight ends its spool readers with an error.
        let g = Flight::new(dir.path(), NarHash::digest(b"x"), 10).unwrap();
        let mut r = g.spool_reader();
        let reader = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            r.read_to_end(&mut out)
        });
        g.write(b"abc").unwrap();
        g.fail("gone");
        assert!(reader.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_held_flight_shows_nothing_and_can_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let nar = vec![5u8; 5000];
        let f = Flight::new(dir.path(), NarHash::digest(&nar), nar.len() as u64).unwrap();
        f.hold(true);
        let client = tokio::spawn(collect(f.stream(0, u64::MAX)));
        f.write(&[1u8; 5000]).unwrap();
        assert!(!f.exposed());
        assert!(f.finish().is_err());
        assert!(f.reset());
        f.write(&nar).unwrap();
        f.finish().unwrap();
        f.release();
        assert_eq!(client.await.unwrap(), (nar, None));
        assert!(!f.reset(), "a verified flight stays");
    }
}
