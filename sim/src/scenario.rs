//! Scenario files (`sim/scenarios/*.toml`) and the workload data files (`sim/data/*.toml`).
//!
//! Owns: parsing with `deny_unknown_fields`, dotted-key overrides for `sweep`
//! (`dht.k=10`, `class.home.off_mean_h=4`), validation, and resolving a class's named session
//! and bandwidth profiles against the data files compiled into the binary.
//! Must not: run anything — a `Scenario` is plain data.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Data files compiled into the binary, so a scenario runs from any directory.
pub const SESSIONS_TOML: &str = include_str!("../data/sessions.toml");
/// Access-link bandwidth profiles.
pub const BANDWIDTH_TOML: &str = include_str!("../data/bandwidth.toml");
/// Closure-shape mixes.
pub const CLOSURES_TOML: &str = include_str!("../data/closures.toml");
/// Dated object-storage price table.
pub const PRICES_TOML: &str = include_str!("../data/prices.toml");

/// One scenario: everything a model run depends on besides the seed.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, copied into the summary.
    pub name: String,
    /// Number of non-seed nodes (peer and CI classes share them by `share`).
    pub nodes: u32,
    /// Default seed; `--seed` overrides it.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Simulated time, hours.
    pub sim_hours: f64,
    /// Interval between time-series samples, minutes.
    #[serde(default = "default_sample_minutes")]
    pub sample_minutes: f64,
    /// Debug checks (capacity of every link after every rate change); slow, for tests.
    #[serde(default)]
    pub checks: bool,
    /// What nodes fetch and when.
    pub workload: Workload,
    /// Flow and source-selection parameters.
    pub net: Net,
    /// DHT parameters.
    pub dht: Dht,
    /// Cost-layer parameters.
    #[serde(default)]
    pub bill: Bill,
    /// Node classes.
    #[serde(rename = "class")]
    pub classes: Vec<ClassCfg>,
    /// An explicit trace of fetches (`trace.rs`): replaces the model's own demand; real mode
    /// always runs one (the defaults when absent).
    #[serde(default)]
    pub trace: Option<crate::trace::TraceCfg>,
    /// Real-mode parameters (ignored by model mode).
    #[serde(default)]
    pub real: crate::real::RealCfg,
    /// Parameters `sweep` varies when no `--param` is given: key → values.
    #[serde(default)]
    pub sweep: BTreeMap<String, Vec<toml::Value>>,
}

fn default_seed() -> u64 {
    1
}
fn default_sample_minutes() -> f64 {
    30.0
}

/// Workload: closures, popularity, generations, upgrades.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Distinct closures in the catalogue.
    pub closures: u32,
    /// Zipf exponent of closure popularity (rank r has weight 1/r^s).
    pub zipf_s: f64,
    /// Name of a mix in `data/closures.toml`.
    pub closure_mix: String,
    /// Hours between channel generations (a new generation of every closure).
    pub gen_interval_h: f64,
    /// Time of the first new generation, hours (generation 0 exists at t = 0).
    pub first_release_h: f64,
    /// Every n-th generation is a mass rebuild (0 = never).
    pub mass_rebuild_every: u32,
    /// Fraction of a closure's bytes in NARs whose hash changes in an ordinary bump.
    pub bump_changed_nar_frac: f64,
    /// Fraction of a closure's bytes that are new chunks after an ordinary bump.
    pub bump_new_bytes_frac: f64,
    /// Fraction of a closure's bytes that are new chunks after a mass rebuild (all NARs change).
    pub rebuild_new_bytes_frac: f64,
    /// Mean delay between a release and a node wanting it, hours (exponential).
    pub upgrade_delay_mean_h: f64,
    /// Fraction of peer nodes that hold generation 0 of their closure at t = 0.
    pub warm_frac: f64,
    /// Number of top-ranked closures counted as "popular" in the report.
    pub popular_closures: u32,
}

/// Transfer and source selection.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Net {
    /// Concurrent sources per fetch.
    pub parallel_sources: u32,
    /// Bytes a flow takes from the fetch's pool at a time (work stealing granularity), MiB.
    pub piece_mib: f64,
    /// Ask a seed when fewer than this many peer sources can serve a part (0 = never).
    pub seed_if_fewer_than: u32,
    /// Also ask a seed when the peer flows of a fetch deliver less than this, Mbit/s (0 = off).
    #[serde(default)]
    pub seed_if_peers_below_mbps: f64,
    /// Probability that a connection to a NATed source succeeds (hole punching).
    pub holepunch_success: f64,
    /// Time lost on a failed dial before retrying when nothing else is flowing, seconds.
    pub dial_timeout_s: f64,
    /// Candidate draws per free source slot when sampling providers.
    pub sample_tries: u32,
    /// Multiplier on every peer uplink.
    pub uplink_scale: f64,
    /// Cap on concurrent uploads per seed; further requests wait in a FIFO.
    pub seed_slots: u32,
}

/// DHT parameters.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dht {
    /// Replication: provider records go to the k closest online servers.
    pub k: u32,
    /// Lookup parallelism (messages per hop).
    pub alpha: u32,
    /// `roots` (NAR keys) or `all` (NAR and chunk keys).
    pub announce: Announce,
    /// Reprovide interval, hours.
    pub reprovide_h: f64,
    /// Provider-record lifetime, hours.
    pub record_ttl_h: f64,
    /// Hops of a lookup are 1 + Poisson(extra_hops_mean).
    pub extra_hops_mean: f64,
    /// Latency per hop, milliseconds (mean of an exponential).
    pub hop_latency_ms: f64,
    /// Lookup walks per announced key (batching makes it < 1).
    pub announce_walks_per_key: f64,
    /// Average chunk size, KiB (counts chunk keys for `all`).
    pub chunk_kib: f64,
    /// Probe records placed for the survival check (0 = none).
    #[serde(default)]
    pub probe_keys: u32,
    /// When the probe records are placed, hours.
    #[serde(default)]
    pub probe_at_h: f64,
    /// How long after placement survival is checked, hours.
    #[serde(default)]
    pub probe_age_h: f64,
}

/// What is announced to the DHT.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Announce {
    /// NAR keys only.
    Roots,
    /// NAR keys and chunk keys.
    All,
}

/// Cost-layer parameters.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Bill {
    /// Pack size on object storage, MiB.
    pub pack_mib: f64,
    /// History size for the headline bill (bytes of compressed NARs as cache.nixos.org holds them).
    pub history_nar_bytes: f64,
    /// Stored bytes per byte of xz-compressed NAR after chunking, dedup and zstd (project figure).
    pub stored_ratio: f64,
    /// Bytes delivered per month for the headline bill (cache.nixos.org's CDN, April 2023).
    pub monthly_delivered_bytes: f64,
}

impl Default for Bill {
    fn default() -> Bill {
        Bill {
            pack_mib: 64.0,
            history_nar_bytes: 600e12,
            stored_ratio: 162.4 / 340.2,
            monthly_delivered_bytes: 1508.0 * 1024f64.powi(4),
        }
    }
}

/// Kind of node class.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Holds a closure, upgrades it, serves it.
    Peer,
    /// Download-only, forgets everything between jobs.
    Ci,
    /// Always on, holds every generation of every closure.
    Seed,
}

/// One node class.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassCfg {
    /// Name (used in outputs and dotted override keys).
    pub name: String,
    /// What the class does.
    pub kind: Kind,
    /// Share of `nodes` (peer and CI classes).
    #[serde(default)]
    pub share: f64,
    /// Number of nodes (seed classes).
    #[serde(default)]
    pub count: u32,
    /// Fraction behind NAT (DHT clients only, reachable by hole punching).
    #[serde(default)]
    pub nat_frac: f64,
    /// Session profile name in `data/sessions.toml`.
    pub sessions: String,
    /// Override of the profile's `always_on_frac`.
    #[serde(default)]
    pub always_on_frac: Option<f64>,
    /// Override of the profile's `off_mean_h`.
    #[serde(default)]
    pub off_mean_h: Option<f64>,
    /// Bandwidth profile name in `data/bandwidth.toml`.
    pub bandwidth: String,
    /// Concurrent uploads per node.
    #[serde(default)]
    pub upload_slots: u32,
    /// Members grouped into LAN clusters of this size (0 = no LAN).
    #[serde(default)]
    pub lan_cluster_size: u32,
    /// LAN bandwidth per node, Mbit/s.
    #[serde(default = "default_lan_mbps")]
    pub lan_mbps: f64,
}

fn default_lan_mbps() -> f64 {
    1000.0
}

/// A session-length model from `data/sessions.toml`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionModel {
    /// Fraction of nodes that never leave.
    pub always_on_frac: f64,
    /// Distribution of online sessions.
    pub dist: SessionDist,
    /// Weibull shape.
    #[serde(default)]
    pub shape: f64,
    /// Weibull scale, hours.
    #[serde(default)]
    pub scale_h: f64,
    /// Exponential mean, hours.
    #[serde(default)]
    pub mean_h: f64,
    /// Mean offline gap, hours.
    pub off_mean_h: f64,
    /// Source.
    pub source: String,
}

/// Online-session distribution.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SessionDist {
    /// Weibull(shape, scale).
    Weibull,
    /// Exponential(mean).
    Exp,
    /// Never ends.
    Always,
}

/// One bandwidth tier.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Uplink, Mbit/s.
    pub up_mbps: f64,
    /// Downlink, Mbit/s.
    pub down_mbps: f64,
    /// Relative weight.
    pub weight: f64,
}

/// A bandwidth profile.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BandwidthProfile {
    /// Source.
    pub source: String,
    /// Tiers.
    pub tiers: Vec<Tier>,
}

/// One closure category.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Category {
    /// Name.
    pub name: String,
    /// Typical size, GiB.
    pub gib: f64,
    /// Share of closures.
    pub weight: f64,
}

/// A closure mix.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClosureMix {
    /// Source.
    pub source: String,
    /// Mean NAR size, MiB.
    pub mean_nar_mib: f64,
    /// Log-normal σ around each category's size.
    pub size_sigma: f64,
    /// Categories.
    pub categories: Vec<Category>,
}

/// A class with its profiles resolved.
#[derive(Clone, Debug)]
pub struct ResolvedClass {
    /// The class as written.
    pub cfg: ClassCfg,
    /// Its session model, overrides applied.
    pub sessions: SessionModel,
    /// Its bandwidth profile.
    pub bandwidth: BandwidthProfile,
}

fn parse_table<T: for<'de> Deserialize<'de>>(
    text: &str,
    file: &str,
) -> Result<BTreeMap<String, T>, Error> {
    toml::from_str(text).map_err(|e| Error::Data {
        file: file.to_string(),
        msg: e.to_string(),
    })
}

impl Scenario {
    /// Reads a scenario file, applying `overrides` (`key=value`) first.
    pub fn load(path: &Path, overrides: &[(String, String)]) -> Result<Scenario, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        Scenario::from_str_with(&text, &path.display().to_string(), overrides)
    }

    /// Parses scenario text, applying `overrides` first.
    pub fn from_str_with(
        text: &str,
        origin: &str,
        overrides: &[(String, String)],
    ) -> Result<Scenario, Error> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| Error::Scenario {
            path: origin.to_string(),
            msg: e.to_string(),
        })?;
        for (k, v) in overrides {
            set_dotted(&mut value, k, parse_value(v))?;
        }
        let sc: Scenario = value
            .try_into()
            .map_err(|e: toml::de::Error| Error::Scenario {
                path: origin.to_string(),
                msg: e.to_string(),
            })?;
        sc.validate(origin)?;
        Ok(sc)
    }

    fn validate(&self, origin: &str) -> Result<(), Error> {
        let bad = |msg: String| {
            Err(Error::Scenario {
                path: origin.to_string(),
                msg,
            })
        };
        if self.nodes == 0 {
            return bad("nodes must be > 0".into());
        }
        if self.sim_hours.is_nan()
            || self.sim_hours <= 0.0
            || self.sample_minutes.is_nan()
            || self.sample_minutes <= 0.0
        {
            return bad("sim_hours and sample_minutes must be > 0".into());
        }
        if self.sim_hours > 87_600.0 {
            return bad("sim_hours is limited to ten years".into());
        }
        let w = &self.workload;
        if w.closures == 0 || w.gen_interval_h <= 0.0 {
            return bad("workload.closures and workload.gen_interval_h must be > 0".into());
        }
        for (name, f) in [
            ("workload.bump_changed_nar_frac", w.bump_changed_nar_frac),
            ("workload.bump_new_bytes_frac", w.bump_new_bytes_frac),
            ("workload.rebuild_new_bytes_frac", w.rebuild_new_bytes_frac),
            ("workload.warm_frac", w.warm_frac),
            ("net.holepunch_success", self.net.holepunch_success),
        ] {
            if !(0.0..=1.0).contains(&f) {
                return bad(format!("{name} must be in [0, 1], is {f}"));
            }
        }
        if w.bump_new_bytes_frac > w.bump_changed_nar_frac {
            return bad("bump_new_bytes_frac cannot exceed bump_changed_nar_frac".into());
        }
        if self.net.parallel_sources == 0 || self.net.piece_mib <= 0.0 || self.net.seed_slots == 0 {
            return bad("net.parallel_sources, net.piece_mib, net.seed_slots must be > 0".into());
        }
        if self.net.seed_slots > 60_000 || self.classes.iter().any(|c| c.upload_slots > 60_000) {
            return bad("upload slots are limited to 60,000 per node".into());
        }
        if self.dht.k == 0 || self.dht.alpha == 0 || self.dht.reprovide_h <= 0.0 {
            return bad("dht.k, dht.alpha, dht.reprovide_h must be > 0".into());
        }
        let share: f64 = self
            .classes
            .iter()
            .filter(|c| c.kind != Kind::Seed)
            .map(|c| c.share)
            .sum();
        if (share - 1.0).abs() > 1e-6 {
            return bad(format!(
                "shares of peer and ci classes sum to {share}, not 1"
            ));
        }
        if !self
            .classes
            .iter()
            .any(|c| c.kind == Kind::Seed && c.count > 0)
        {
            return bad("at least one seed class with count > 0 is needed".into());
        }
        self.resolve_classes()?;
        self.closure_mix()?;
        Ok(())
    }

    /// Classes with their session and bandwidth profiles looked up.
    pub fn resolve_classes(&self) -> Result<Vec<ResolvedClass>, Error> {
        let sessions: BTreeMap<String, SessionModel> =
            parse_table(SESSIONS_TOML, "data/sessions.toml")?;
        let bw: BTreeMap<String, BandwidthProfile> =
            parse_table(BANDWIDTH_TOML, "data/bandwidth.toml")?;
        self.classes
            .iter()
            .map(|c| {
                let mut s = sessions
                    .get(&c.sessions)
                    .cloned()
                    .ok_or_else(|| Error::Data {
                        file: "data/sessions.toml".into(),
                        msg: format!("no session profile {:?} (class {})", c.sessions, c.name),
                    })?;
                if let Some(a) = c.always_on_frac {
                    s.always_on_frac = a;
                }
                if let Some(o) = c.off_mean_h {
                    s.off_mean_h = o;
                }
                let b = bw.get(&c.bandwidth).cloned().ok_or_else(|| Error::Data {
                    file: "data/bandwidth.toml".into(),
                    msg: format!("no bandwidth profile {:?} (class {})", c.bandwidth, c.name),
                })?;
                if b.tiers.is_empty() {
                    return Err(Error::Data {
                        file: "data/bandwidth.toml".into(),
                        msg: format!("profile {:?} has no tiers", c.bandwidth),
                    });
                }
                Ok(ResolvedClass {
                    cfg: c.clone(),
                    sessions: s,
                    bandwidth: b,
                })
            })
            .collect()
    }

    /// The closure mix named by the workload.
    pub fn closure_mix(&self) -> Result<ClosureMix, Error> {
        let mixes: BTreeMap<String, ClosureMix> = parse_table(CLOSURES_TOML, "data/closures.toml")?;
        let m = mixes
            .get(&self.workload.closure_mix)
            .cloned()
            .ok_or_else(|| Error::Data {
                file: "data/closures.toml".into(),
                msg: format!("no closure mix {:?}", self.workload.closure_mix),
            })?;
        if m.categories.is_empty() {
            return Err(Error::Data {
                file: "data/closures.toml".into(),
                msg: "a mix needs at least one category".into(),
            });
        }
        Ok(m)
    }
}

/// Parses an override value as a TOML literal (number, bool, quoted string), else a bare string.
pub fn parse_value(v: &str) -> toml::Value {
    let doc = format!("x = {v}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("x")
            .unwrap_or_else(|| toml::Value::String(v.to_string())),
        Err(_) => toml::Value::String(v.to_string()),
    }
}

/// Sets `a.b.c` in a TOML value. Inside an array of tables a segment selects the element whose
/// `name` equals it (or, if numeric, the element at that index).
pub fn set_dotted(root: &mut toml::Value, key: &str, value: toml::Value) -> Result<(), Error> {
    let bad = |msg: String| Error::Param {
        key: key.to_string(),
        msg,
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad("empty key segment".into()));
    }
    let mut cur = root;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        cur = match cur {
            toml::Value::Table(t) => {
                if last {
                    // A misspelt key is caught by deny_unknown_fields afterwards.
                    t.insert((*part).to_string(), value);
                    return Ok(());
                }
                t.entry((*part).to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            }
            toml::Value::Array(a) => {
                let idx = match part.parse::<usize>() {
                    Ok(n) => Some(n),
                    Err(_) => a
                        .iter()
                        .position(|e| e.get("name").and_then(|n| n.as_str()) == Some(*part)),
                };
                let idx = idx.ok_or_else(|| bad(format!("no element {part:?} in the array")))?;
                let len = a.len();
                let elem = a
                    .get_mut(idx)
                    .ok_or_else(|| bad(format!("index {idx} out of range ({len})")))?;
                if last {
                    *elem = value;
                    return Ok(());
                }
                elem
            }
            _ => {
                return Err(bad(format!(
                    "{part:?} is below a value that is not a table"
                )))
            }
        };
    }
    Err(bad("nothing to set".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_override_reaches_array_elements_by_name() {
        let mut v: toml::Value = toml::from_str(
            "[dht]\nk = 20\n[[class]]\nname = \"home\"\noff_mean_h = 1.0\n[[class]]\nname = \"ci\"\n",
        )
        .unwrap();
        set_dotted(&mut v, "dht.k", parse_value("7")).unwrap();
        set_dotted(&mut v, "class.home.off_mean_h", parse_value("4.5")).unwrap();
        set_dotted(&mut v, "class.ci.share", parse_value("0.25")).unwrap();
        assert_eq!(v["dht"]["k"].as_integer(), Some(7));
        assert_eq!(v["class"][0]["off_mean_h"].as_float(), Some(4.5));
        assert_eq!(v["class"][1]["share"].as_float(), Some(0.25));
        assert!(set_dotted(&mut v, "class.nosuch.x", parse_value("1")).is_err());
        assert_eq!(parse_value("all"), toml::Value::String("all".into()));
    }

    #[test]
    fn data_files_parse() {
        let s: BTreeMap<String, SessionModel> = parse_table(SESSIONS_TOML, "s").unwrap();
        assert!(s.contains_key("ipfs"));
        let b: BTreeMap<String, BandwidthProfile> = parse_table(BANDWIDTH_TOML, "b").unwrap();
        assert!(b.contains_key("home"));
        let c: BTreeMap<String, ClosureMix> = parse_table(CLOSURES_TOML, "c").unwrap();
        assert!(c.contains_key("nixos"));
    }
}
