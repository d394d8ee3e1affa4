//! Store maintenance an operator asks for — `pin`, `unpin`, `gc` (to a size or by a policy),
//! `undelete` — one function each over a `&Store`, each returning a report that serialises to
//! JSON and back. The CLI calls them on a stopped store; the daemon's API (`POST /api/pin`, …)
//! calls the same functions on its own store, and the CLI prints either report the same way.
//!
//! Owns: input checking (store paths, GC policy text) and the order of the store calls of a
//! GC. Must not: touch the database itself (only `Store` methods), do async or network I/O.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::core::store_path::{parse_hash_or_path, StorePathHash};
use crate::gc_policy::{parse_date, Policy, PolicyError, PRICES_PER_GB_MONTH};
use crate::store::{GcPolicy, GcReport, PathFacts, Store, StoreError};

/// Errors of a maintenance call: bad input (the caller's fault) or the store's.
#[derive(Debug, thiserror::Error)]
pub enum MaintainError {
    #[error("bad store path {0:?}")]
    BadPath(String),
    #[error("no store paths given")]
    NoPaths,
    #[error("bad GC policy: {0}")]
    BadPolicy(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Store(Box<StoreError>),
}

impl From<StoreError> for MaintainError {
    fn from(e: StoreError) -> Self {
        MaintainError::Store(Box::new(e))
    }
}

impl MaintainError {
    /// The caller's input was wrong (an API answers 400), not the store.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, MaintainError::Store(_))
    }
}

/// Parses store paths or their hashes, all of them before anything is changed.
pub fn parse_paths(names: &[String]) -> Result<Vec<StorePathHash>, MaintainError> {
    names
        .iter()
        .map(|n| parse_hash_or_path(n).map_err(|_| MaintainError::BadPath(n.clone())))
        .collect()
}

/// What `pin` or `unpin` did to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinOutcome {
    Pinned,
    AlreadyPinned,
    Unpinned,
    WasNotPinned,
    /// `pin` of a path the store does not have (a failure).
    NotStored,
}

/// One path of a [`PinReport`], named as the caller gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinResult {
    pub path: String,
    pub outcome: PinOutcome,
}

/// What `pin` / `unpin` did, path by path, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinReport {
    pub paths: Vec<PinResult>,
}

impl PinReport {
    /// A path could not be pinned (not in the store).
    pub fn failed(&self) -> bool {
        self.paths
            .iter()
            .any(|p| p.outcome == PinOutcome::NotStored)
    }
}

/// Pins (`pin`) or unpins store paths (or hashes). Bad names refuse the whole call.
pub fn pin(store: &Store, names: &[String], pin: bool) -> Result<PinReport, MaintainError> {
    if names.is_empty() {
        return Err(MaintainError::NoPaths);
    }
    let hashes = parse_paths(names)?;
    let mut report = PinReport::default();
    for (name, hash) in names.iter().zip(&hashes) {
        let outcome = if pin {
            match store.pin(hash.as_str()) {
                Ok(true) => PinOutcome::Pinned,
                Ok(false) => PinOutcome::AlreadyPinned,
                Err(StoreError::NotStored(_)) => PinOutcome::NotStored,
                Err(e) => return Err(e.into()),
            }
        } else if store.unpin(hash.as_str())? {
            PinOutcome::Unpinned
        } else {
            PinOutcome::WasNotPinned
        };
        tracing::info!(path = %name, ?outcome, "pin");
        report.paths.push(PinResult {
            path: name.clone(),
            outcome,
        });
    }
    Ok(report)
}

/// What `undelete` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndeleteReport {
    /// Paths brought back.
    pub undeleted: u64,
    /// Paths asked for (0 with `all`).
    pub asked: u64,
    pub all: bool,
}

impl UndeleteReport {
    /// Some of the paths asked for were not hidden.
    pub fn failed(&self) -> bool {
        !self.all && self.undeleted < self.asked
    }
}

/// Brings back hidden paths: these, or every hidden path with `all`.
pub fn undelete(
    store: &Store,
    names: &[String],
    all: bool,
) -> Result<UndeleteReport, MaintainError> {
    if !all && names.is_empty() {
        return Err(MaintainError::NoPaths);
    }
    if all && !names.is_empty() {
        return Err(MaintainError::BadPath(
            "give store paths or `all`, not both".into(),
        ));
    }
    let hashes: Vec<String> = parse_paths(names)?
        .iter()
        .map(|h| h.as_str().to_string())
        .collect();
    let undeleted = store.undelete(&hashes)?;
    Ok(UndeleteReport {
        undeleted,
        asked: hashes.len() as u64,
        all,
    })
}

/// What an eviction to a size removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evicted {
    pub paths: u64,
    pub nars: u64,
    pub nar_bytes: u64,
    pub chunks: u64,
}

/// What `gc [--max-size]` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SizeGcReport {
    pub max_size: Option<u64>,
    /// With `max_size`: what eviction removed.
    pub evicted: Option<Evicted>,
    /// Packs compacted, records moved and bytes freed on disk.
    pub packs: u64,
    pub records_copied: u64,
    pub bytes_copied: u64,
    pub bytes_reclaimed: u64,
    pub elapsed_secs: f64,
    /// Packs left alone because a record did not read back intact (run `verify`).
    pub skipped: Vec<String>,
    pub stored_bytes_before: u64,
    pub stored_bytes_after: u64,
    pub pinned_nars: u64,
    /// The index was compacted too (only on a stopped store).
    pub index_compacted: bool,
}

impl SizeGcReport {
    /// Still above `max_size` (the rest is pinned).
    pub fn still_above(&self) -> bool {
        self.max_size.is_some_and(|m| self.stored_bytes_after > m)
    }
}

/// Evicts least-recently-used unpinned paths down to `max_size` (if given), then compacts
/// every pack holding dead records. The caller compacts the index if it can (stopped store).
pub fn gc_to_size(store: &Store, max_size: Option<u64>) -> Result<SizeGcReport, MaintainError> {
    let before = store.stats()?;
    let mut gc = GcReport::default();
    let mut evicted = None;
    if let Some(max) = max_size {
        let r = store.evict_to(max)?;
        evicted = Some(Evicted {
            paths: r.paths,
            nars: r.nars,
            nar_bytes: r.nar_bytes,
            chunks: r.chunks,
        });
        gc = r.gc;
    }
    let g = store.gc_packs(GcPolicy::AllDead)?;
    gc.packs += g.packs;
    gc.records_copied += g.records_copied;
    gc.bytes_copied += g.bytes_copied;
    gc.bytes_reclaimed += g.bytes_reclaimed;
    gc.elapsed += g.elapsed;
    gc.skipped.extend(g.skipped);
    let after = store.stats()?;
    tracing::info!(
        max_size,
        packs = gc.packs,
        reclaimed = gc.bytes_reclaimed,
        "gc"
    );
    Ok(SizeGcReport {
        max_size,
        evicted,
        packs: gc.packs,
        records_copied: gc.records_copied,
        bytes_copied: gc.bytes_copied,
        bytes_reclaimed: gc.bytes_reclaimed,
        elapsed_secs: gc.elapsed.as_secs_f64(),
        skipped: gc.skipped,
        stored_bytes_before: before.stored_bytes,
        stored_bytes_after: after.stored_bytes,
        pinned_nars: after.pinned_nars,
        index_compacted: false,
    })
}

/// A path a policy GC hides now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HideEntry {
    pub store_path: String,
    pub nar_size: u64,
    pub added_unix: u64,
}

/// A hidden path whose grace period is over: collected now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectEntry {
    pub store_path: String,
    pub hidden_since_unix: u64,
}

/// What a policy GC changed (absent on a dry run).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyGcApplied {
    pub hidden: u64,
    pub collected_paths: u64,
    pub collected_nars: u64,
    pub collected_nar_bytes: u64,
    pub reclaimed_bytes: u64,
    /// Packs left alone because a record did not read back intact (run `verify`).
    pub skipped: Vec<String>,
}

/// What `gc --policy` selects (and, unless a dry run, did).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyGcReport {
    pub dry_run: bool,
    pub hide: Vec<HideEntry>,
    pub hide_nar_bytes: u64,
    pub hidden_until_unix: u64,
    pub grace_days: f64,
    pub collect: Vec<CollectEntry>,
    /// Hidden paths the policy keeps now (brought back).
    pub undelete: u64,
    pub kept: u64,
    /// Pack bytes the hidden and collected paths free once collected.
    pub freed_bytes: u64,
    pub monthly_savings_usd: BTreeMap<String, f64>,
    pub applied: Option<PolicyGcApplied>,
}

/// Applies a GC policy at `now` (unix seconds): collects the hidden paths whose grace period
/// is over, hides what the policy selects now, brings back hidden paths it keeps, then
/// compacts every pack holding dead records. A dry run only reports.
pub fn gc_by_policy(
    store: &Store,
    policy: &Policy,
    dry_run: bool,
    now: u64,
) -> Result<PolicyGcReport, MaintainError> {
    let roots = policy.roots()?;
    // The policy judges every path, hidden ones too: a root's closure is walked through them,
    // and a hidden path the policy keeps now is brought back instead of collected.
    let facts = store.path_facts()?;
    let sel = policy.select(&facts, &roots, now)?;
    let (hide, hidden_before): (Vec<&PathFacts>, Vec<&PathFacts>) =
        sel.collect.iter().partition(|f| f.hidden.is_none());
    let due: Vec<&PathFacts> = hidden_before
        .into_iter()
        .filter(|f| f.hidden.is_some_and(|(_, until)| until <= now))
        .collect();
    let rescued: Vec<String> = sel
        .kept
        .iter()
        .filter(|f| f.hidden.is_some())
        .map(|f| f.hash.clone())
        .collect();
    let going: HashSet<String> = hide.iter().chain(&due).map(|f| f.hash.clone()).collect();
    let freed = store.freed_by(&going)?;
    let until = policy.hidden_until(now);
    let mut report = PolicyGcReport {
        dry_run,
        hide: hide
            .iter()
            .map(|f| HideEntry {
                store_path: f.store_path.clone(),
                nar_size: f.nar_size,
                added_unix: f.added_unix,
            })
            .collect(),
        hide_nar_bytes: hide.iter().map(|f| f.nar_size).sum(),
        hidden_until_unix: until,
        grace_days: policy.grace_days,
        collect: due
            .iter()
            .map(|f| CollectEntry {
                store_path: f.store_path.clone(),
                hidden_since_unix: f.hidden.map_or(0, |h| h.0),
            })
            .collect(),
        undelete: rescued.len() as u64,
        kept: sel.kept.len() as u64,
        freed_bytes: freed,
        monthly_savings_usd: PRICES_PER_GB_MONTH
            .iter()
            .map(|(name, p)| ((*name).to_string(), freed as f64 / 1e9 * p))
            .collect(),
        applied: None,
    };
    if dry_run {
        return Ok(report);
    }
    if !rescued.is_empty() {
        store.undelete(&rescued)?;
    }
    // What is still hidden and due is what the policy selected.
    let collected = store.collect_hidden(now)?;
    let hide: Vec<String> = hide.iter().map(|f| f.hash.clone()).collect();
    let hidden = store.hide(&hide, until)?;
    let g = store.gc_packs(GcPolicy::AllDead)?;
    tracing::info!(
        hidden,
        collected = collected.paths,
        reclaimed = g.bytes_reclaimed,
        "gc by policy"
    );
    report.applied = Some(PolicyGcApplied {
        hidden,
        collected_paths: collected.paths,
        collected_nars: collected.nars,
        collected_nar_bytes: collected.nar_bytes,
        reclaimed_bytes: g.bytes_reclaimed,
        skipped: g.skipped,
    });
    Ok(report)
}

/// A policy sent as text (the daemon's API): the file's TOML with every root inline, as
/// [`policy_text_for_daemon`] writes it. `keep-roots-files` is refused: a path in it would be
/// read by the daemon, relative to nothing the caller knows.
pub fn policy_from_text(text: &str) -> Result<Policy, MaintainError> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| MaintainError::BadPolicy(e.to_string()))?;
    if table.contains_key("keep-roots-files") {
        return Err(MaintainError::BadPolicy(
            "keep-roots-files is not accepted here: list the roots in keep-roots".into(),
        ));
    }
    let policy: Policy =
        toml::from_str(text).map_err(|e| MaintainError::BadPolicy(e.to_string()))?;
    if !(policy.grace_days >= 0.0 && policy.grace_days.is_finite()) {
        return Err(MaintainError::BadPolicy(format!(
            "grace-days: {} is not a number of days ≥ 0",
            policy.grace_days
        )));
    }
    if let Some(d) = &policy.collect_older_than {
        parse_date(d)?;
    }
    Ok(policy)
}

/// A policy file as text for the daemon's API: checked as `gc --policy` checks it, with the
/// roots of its `keep-roots-files` (read here, relative to the file) moved into `keep-roots`.
pub fn policy_text_for_daemon(path: &Path) -> Result<String, MaintainError> {
    let policy = Policy::from_file(path)?;
    let mut roots: Vec<String> = policy.roots()?.into_iter().collect();
    roots.sort();
    let text = std::fs::read_to_string(path).map_err(|error| PolicyError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| MaintainError::BadPolicy(e.to_string()))?;
    table.remove("keep-roots-files");
    table.insert(
        "keep-roots".into(),
        toml::Value::Array(roots.into_iter().map(toml::Value::String).collect()),
    );
    toml::to_string(&table).map_err(|e| MaintainError::BadPolicy(e.to_string()))
}

/// Seconds since the epoch (0 if the clock is before it).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_text_round_trips_with_roots_inline() {
        let dir = tempfile::tempdir().unwrap();
        let roots = dir.path().join("roots");
        let a = "/nix/store/0a2f8wq6f0vpyr6zqmzvqhq3s0jh2ll6-a";
        let b = "1b2f8wq6f0vpyr6zqmzvqhq3s0jh2ll6";
        std::fs::write(&roots, format!("{a}\n")).unwrap();
        let file = dir.path().join("policy.toml");
        std::fs::write(
            &file,
            format!("keep-roots = [\"{b}\"]\nkeep-roots-files = [\"roots\"]\ngrace-days = 2\n"),
        )
        .unwrap();
        let text = policy_text_for_daemon(&file).unwrap();
        let p = policy_from_text(&text).unwrap();
        assert_eq!(p.grace_days, 2.0);
        assert!(p.keep_roots_files.is_empty());
        let mut got: Vec<String> = p.roots().unwrap().into_iter().collect();
        got.sort();
        assert_eq!(got, ["0a2f8wq6f0vpyr6zqmzvqhq3s0jh2ll6", b]);
    }

    #[test]
    fn bad_policy_text_is_bad_input() {
        for t in [
            "keep-roots-files = [\"/etc/x\"]",
            "grace-days = -1",
            "collect-older-than = \"yesterday\"",
            "no-such-key = 1",
            "keep-roots = [\"not a path\"",
        ] {
            let e = policy_from_text(t).unwrap_err();
            assert!(e.is_bad_input(), "{t}: {e}");
        }
    }

    #[test]
    fn bad_paths_refuse_everything() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let e = pin(&store, &["/nix/store/nope".into()], true).unwrap_err();
        assert!(matches!(e, MaintainError::BadPath(_)), "{e}");
        assert!(matches!(
            pin(&store, &[], true),
            Err(MaintainError::NoPaths)
        ));
        let r = pin(&store, &["0a2f8wq6f0vpyr6zqmzvqhq3s0jh2ll6".into()], true).unwrap();
        assert_eq!(r.paths[0].outcome, PinOutcome::NotStored);
        assert!(r.failed());
        let r = undelete(&store, &["0a2f8wq6f0vpyr6zqmzvqhq3s0jh2ll6".into()], false).unwrap();
        assert_eq!((r.undeleted, r.asked, r.failed()), (0, 1, true));
    }
}
