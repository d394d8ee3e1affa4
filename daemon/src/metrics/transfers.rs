//! `Transfers`: the NARs moving right now — fetches from a source into the store, and bodies
//! served to HTTP clients — with bytes done out of the total, for the dashboard
//! (`GET /api/transfers`).
//!
//! Owns a bounded table (at most [`MAX_TRANSFERS`] entries; more are counted, not listed).
//! The code moving the bytes registers a transfer with [`Transfers::begin`], counts its bytes
//! in the [`AtomicU64`] it handed in (no lock per block), and the entry leaves the table when
//! the returned [`TransferGuard`] is dropped, however the transfer ends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// Transfers listed at once; more are only counted (`untracked`).
pub const MAX_TRANSFERS: usize = 64;

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A NAR the store lacks, coming in from a source (peers, an upstream).
    Fetch,
    /// A NAR body going out to an HTTP client.
    Serve,
}

/// One transfer as `GET /api/transfers` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferInfo {
    pub id: u64,
    pub direction: Direction,
    /// The store path (fetches) or `nar/<NarHash>.nar` (serves).
    pub what: String,
    /// Where the bytes come from (`peers`, `upstream`) or go to (`http`).
    pub peer: &'static str,
    pub bytes_done: u64,
    /// `None` when the length is not known up front (a recompressed NAR).
    pub bytes_total: Option<u64>,
    pub elapsed_secs: f64,
}

struct Entry {
    direction: Direction,
    what: String,
    peer: &'static str,
    total: Option<u64>,
    done: Arc<AtomicU64>,
    started: Instant,
}

#[derive(Default)]
struct Table {
    next: u64,
    entries: BTreeMap<u64, Entry>,
    /// Transfers running that did not fit in the table.
    untracked: u64,
}

/// The table of running transfers; see the module docs.
#[derive(Default)]
pub struct Transfers {
    table: Arc<Mutex<Table>>,
}

impl std::fmt::Debug for Transfers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfers").finish_non_exhaustive()
    }
}

/// What `GET /api/transfers` answers.
#[derive(Debug, Clone, Serialize)]
pub struct TransfersView {
    pub transfers: Vec<TransferInfo>,
    /// Transfers running that the table had no room for.
    pub untracked: u64,
}

/// A registered transfer: it leaves the table when this is dropped.
#[must_use = "the transfer leaves the table when the guard is dropped"]
pub struct TransferGuard {
    table: Arc<Mutex<Table>>,
    /// `None`: not in the table (it was full).
    id: Option<u64>,
}

impl Transfers {
    fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
        table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a transfer whose bytes are counted in `done`.
    pub fn begin(
        &self,
        direction: Direction,
        what: String,
        peer: &'static str,
        total: Option<u64>,
        done: Arc<AtomicU64>,
    ) -> TransferGuard {
        let mut t = Self::lock(&self.table);
        let id = if t.entries.len() < MAX_TRANSFERS {
            t.next += 1;
            let id = t.next;
            t.entries.insert(
                id,
                Entry {
                    direction,
                    what,
                    peer,
                    total,
                    done,
                    started: Instant::now(),
                },
            );
            Some(id)
        } else {
            t.untracked += 1;
            None
        };
        TransferGuard {
            table: self.table.clone(),
            id,
        }
    }

    /// The running transfers, oldest first.
    pub fn view(&self) -> TransfersView {
        let t = Self::lock(&self.table);
        TransfersView {
            transfers: t
                .entries
                .iter()
                .map(|(id, e)| TransferInfo {
                    id: *id,
                    direction: e.direction,
                    what: e.what.clone(),
                    peer: e.peer,
                    bytes_done: e.done.load(Ordering::Relaxed),
                    bytes_total: e.total,
                    elapsed_secs: e.started.elapsed().as_secs_f64(),
                })
                .collect(),
            untracked: t.untracked,
        }
    }
}

impl Drop for TransferGuard {
    fn drop(&mut self) {
        let mut t = Transfers::lock(&self.table);
        match self.id {
            Some(id) => {
                t.entries.remove(&id);
            }
            None => t.untracked = t.untracked.saturating_sub(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_while_running_bounded_and_gone_when_dropped() {
        let t = Transfers::default();
        let done = Arc::new(AtomicU64::new(0));
        let g = t.begin(
            Direction::Fetch,
            "/nix/store/x".into(),
            "upstream",
            Some(100),
            done.clone(),
        );
        done.fetch_add(40, Ordering::Relaxed);
        let v = t.view();
        assert_eq!(v.transfers.len(), 1);
        assert_eq!(v.transfers[0].bytes_done, 40);
        assert_eq!(v.transfers[0].bytes_total, Some(100));
        assert_eq!(v.transfers[0].direction, Direction::Fetch);
        let many: Vec<TransferGuard> = (0..MAX_TRANSFERS + 3)
            .map(|_| t.begin(Direction::Serve, "n".into(), "http", None, done.clone()))
            .collect();
        let v = t.view();
        assert_eq!(v.transfers.len(), MAX_TRANSFERS, "bounded");
        assert_eq!(v.untracked, 4);
        drop(many);
        drop(g);
        let v = t.view();
        assert!(v.transfers.is_empty());
        assert_eq!(v.untracked, 0);
    }
}
