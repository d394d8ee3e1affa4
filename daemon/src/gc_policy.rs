//! Seed GC policies (issue 11): which stored paths a garbage collection would take. Pure: it
//! decides from [`PathFacts`] the store hands over, and the caller hides what it selects
//! (`Store::hide`), to be collected only after the grace period (`store::retire`).
//!
//! A path is *kept* when any keep rule holds; every other path is collected if it was stored
//! before `collect-older-than` (or at any time when that is unset).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::core::store_path::parse_hash_or_path;
use crate::store::PathFacts;

/// Errors reading a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("{what}: {value:?} is not {expected}")]
    Bad {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// A GC policy file (TOML, kebab-case keys; unknown keys are errors).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Policy {
    /// Keep pinned paths (uploads and imports are pinned).
    pub keep_pinned: bool,
    /// Keep paths without references (fixed-output sources, tarballs).
    pub keep_without_references: bool,
    /// Keep the closures of these store paths (or hashes).
    pub keep_roots: Vec<String>,
    /// Keep the closures of the store paths listed in these files, one per line (e.g. a
    /// channel's `store-paths`, decompressed); relative to the policy file.
    pub keep_roots_files: Vec<PathBuf>,
    /// Keep paths whose NAR was stored or served within this many days.
    pub keep_accessed_within_days: Option<f64>,
    /// Only paths stored before this date (`YYYY-MM-DD`, UTC) are collected.
    pub collect_older_than: Option<String>,
    /// Days a selected path stays hidden (undeletable) before it is collected.
    pub grace_days: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            keep_pinned: true,
            keep_without_references: false,
            keep_roots: Vec::new(),
            keep_roots_files: Vec::new(),
            keep_accessed_within_days: None,
            collect_older_than: None,
            grace_days: 7.0,
        }
    }
}

impl Policy {
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|error| PolicyError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let mut p: Policy = toml::from_str(&text).map_err(|error| PolicyError::Parse {
            path: path.to_path_buf(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for f in &mut p.keep_roots_files {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<(), PolicyError> {
        if !(self.grace_days >= 0.0 && self.grace_days.is_finite()) {
            return Err(PolicyError::Bad {
                what: "grace-days",
                value: self.grace_days.to_string(),
                expected: "a number of days ≥ 0",
            });
        }
        if let Some(d) = &self.collect_older_than {
            parse_date(d)?;
        }
        Ok(())
    }

    /// The store-path hashes of the roots: `keep-roots` and every line of `keep-roots-files`.
    pub fn roots(&self) -> Result<HashSet<String>, PolicyError> {
        let mut out = HashSet::new();
        let mut add = |s: &str| -> Result<(), PolicyError> {
            let h = parse_hash_or_path(s).map_err(|_| PolicyError::Bad {
                what: "keep root",
                value: s.to_string(),
                expected: "a store path or its hash",
            })?;
            out.insert(h.as_str().to_string());
            Ok(())
        };
        for r in &self.keep_roots {
            add(r)?;
        }
        for f in &self.keep_roots_files {
            let text = std::fs::read_to_string(f).map_err(|error| PolicyError::Read {
                path: f.clone(),
                error,
            })?;
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                add(line)?;
            }
        }
        Ok(out)
    }

    /// Splits `facts` into what is kept (with why) and what is selected for collection;
    /// `roots` as [`Policy::roots`], `now` in unix seconds.
    pub fn select<'a>(
        &self,
        facts: &'a [PathFacts],
        roots: &HashSet<String>,
        now: u64,
    ) -> Result<Selection<'a>, PolicyError> {
        let by_hash: HashMap<&str, &PathFacts> =
            facts.iter().map(|f| (f.hash.as_str(), f)).collect();
        // The closures of the roots that are stored (a missing reference ends the walk).
        let mut in_closure: HashSet<&str> = HashSet::new();
        let mut stack: Vec<&str> = roots
            .iter()
            .filter_map(|r| by_hash.get(r.as_str()).map(|f| f.hash.as_str()))
            .collect();
        while let Some(h) = stack.pop() {
            if !in_closure.insert(h) {
                continue;
            }
            if let Some(f) = by_hash.get(h) {
                stack.extend(
                    f.references
                        .iter()
                        .filter_map(|r| by_hash.get(r.as_str()).map(|g| g.hash.as_str())),
                );
            }
        }
        let cutoff = self
            .collect_older_than
            .as_deref()
            .map(parse_date)
            .transpose()?;
        let recent = self
            .keep_accessed_within_days
            .map(|d| now.saturating_sub((d * 86_400.0) as u64));
        let mut sel = Selection::default();
        for f in facts {
            let keep = (self.keep_pinned && f.pinned)
                || (self.keep_without_references && f.references.is_empty())
                || in_closure.contains(f.hash.as_str())
                || recent.is_some_and(|r| f.last_access.unwrap_or(f.added_unix) >= r)
                || cutoff.is_some_and(|c| f.added_unix >= c);
            if keep {
                sel.kept.push(f);
            } else {
                sel.collect.push(f);
            }
        }
        Ok(sel)
    }

    /// Unix seconds until which a path hidden at `now` stays undeletable.
    pub fn hidden_until(&self, now: u64) -> u64 {
        now.saturating_add((self.grace_days * 86_400.0) as u64)
    }
}

/// A policy's verdict.
#[derive(Debug, Default)]
pub struct Selection<'a> {
    pub kept: Vec<&'a PathFacts>,
    pub collect: Vec<&'a PathFacts>,
}

/// `YYYY-MM-DD` (UTC midnight) → unix seconds.
pub fn parse_date(s: &str) -> Result<u64, PolicyError> {
    let bad = || PolicyError::Bad {
        what: "collect-older-than",
        value: s.to_string(),
        expected: "a date YYYY-MM-DD",
    };
    let mut it = s.trim().splitn(3, '-');
    let mut num = |lo: i64, hi: i64| -> Result<i64, PolicyError> {
        let v: i64 = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(bad())
        }
    };
    let (y, m, d) = (num(1970, 9999)?, num(1, 12)?, num(1, 31)?);
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's well-known algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400).map_err(|_| bad())
}

/// Monthly storage price per decimal GB (USD) at the providers of `docs/operations.md`'s
/// price table (list prices, checked 2026-11; storage only).
pub const PRICES_PER_GB_MONTH: [(&str, f64); 3] = [
    ("aws_s3_standard", 0.023),
    ("cloudflare_r2", 0.015),
    ("backblaze_b2", 0.006),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::NarHash;

    fn fact(hash: char, refs: &[char], added: u64, pinned: bool) -> PathFacts {
        let h = |c: char| c.to_string().repeat(32);
        PathFacts {
            hash: h(hash),
            store_path: format!("/nix/store/{}-p", h(hash)),
            references: refs.iter().map(|&c| h(c)).collect(),
            nar_hash: NarHash([hash as u8; 32]),
            nar_size: 100,
            added_unix: added,
            last_access: None,
            pinned,
            hidden: None,
        }
    }

    fn collected(p: &Policy, facts: &[PathFacts], roots: &[char], now: u64) -> Vec<char> {
        let roots = roots.iter().map(|c| c.to_string().repeat(32)).collect();
        let mut v: Vec<char> = p
            .select(facts, &roots, now)
            .unwrap()
            .collect
            .iter()
            .map(|f| f.hash.chars().next().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn keep_rules() {
        // a → b → c (c has no references); d pinned; f new; g old and alone.
        let facts = vec![
            fact('a', &['b'], 10, false),
            fact('b', &['c'], 10, false),
            fact('c', &[], 10, false),
            fact('d', &['c'], 10, true),
            fact('f', &[], 5_000_000, false),
            fact('g', &['c'], 10, false),
        ];
        let everything = Policy {
            keep_pinned: false,
            ..Policy::default()
        };
        assert_eq!(
            collected(&everything, &facts, &[], 0),
            vec!['a', 'b', 'c', 'd', 'f', 'g']
        );
        let p = Policy::default();
        assert_eq!(collected(&p, &facts, &['a'], 0), vec!['f', 'g']);
        let p = Policy {
            keep_without_references: true,
            ..Policy::default()
        };
        assert_eq!(collected(&p, &facts, &[], 0), vec!['a', 'b', 'g']);
        let p = Policy {
            collect_older_than: Some("1970-01-02".into()),
            ..Policy::default()
        };
        assert_eq!(collected(&p, &facts, &['b'], 0), vec!['a', 'g']);
        let mut recent = facts.clone();
        recent[0].last_access = Some(990_000);
        let p = Policy {
            keep_accessed_within_days: Some(1.0),
            ..Policy::default()
        };
        // a was served within the day, f stored after the cutoff, d is pinned.
        assert_eq!(collected(&p, &recent, &[], 1_000_000), vec!['b', 'c', 'g']);
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("1970-01-01").unwrap(), 0);
        assert_eq!(parse_date("2000-03-01").unwrap(), 951_868_800);
        assert_eq!(parse_date("2026-11-30").unwrap(), 1_795_996_800);
        for bad in ["2026-13-01", "2026-1", "yesterday", "1969-12-31"] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
    }
}
