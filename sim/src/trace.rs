//! A workload as an explicit list of fetches, the same for model and real mode (`[trace]` in a
//! scenario): so `compare` sets both modes on identical traces.
//!
//! Node numbering is the model's: seeds first, then the other classes in file order, each
//! class's nodes consecutive ([`node_classes`]).

use serde::{Deserialize, Serialize};

use crate::rng::{Discrete, Rng};
use crate::scenario::{Kind, Scenario};
use crate::Error;

/// `[trace]`: each non-seed node fetches `fetches_per_node` closures, drawn by the workload's
/// Zipf popularity, at uniform times in the first `window_frac` of the run. With a trace, the
/// model starts fetches only from it (no fetch at session start, no upgrades).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceCfg {
    /// Closures each non-seed node fetches.
    pub fetches_per_node: u32,
    /// Fetches start within this fraction of `sim_hours` (the rest lets them finish).
    pub window_frac: f64,
}

impl Default for TraceCfg {
    fn default() -> Self {
        Self {
            fetches_per_node: 1,
            window_frac: 0.8,
        }
    }
}

/// One fetch: `node` wants `closure` (generation 0) at `at_s` seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Want {
    pub at_s: f64,
    pub node: u32,
    pub closure: u32,
}

/// Each node's class index, in the model's node order.
pub fn node_classes(sc: &Scenario) -> Vec<usize> {
    let counts = crate::model::class_counts(sc);
    crate::model::class_order(sc)
        .into_iter()
        .flat_map(|ci| std::iter::repeat_n(ci, counts[ci] as usize))
        .collect()
}

/// The fetches of `[trace]` (defaults if the scenario has none), sorted by time.
pub fn wants(sc: &Scenario, seed: u64) -> Result<Vec<Want>, Error> {
    let cfg = sc.trace.clone().unwrap_or_default();
    if !(cfg.window_frac > 0.0 && cfg.window_frac <= 1.0) {
        return Err(Error::Scenario {
            path: sc.name.clone(),
            msg: "trace.window_frac must be in (0, 1]".into(),
        });
    }
    let classes = node_classes(sc);
    let zipf = Discrete::zipf(sc.workload.closures as usize, sc.workload.zipf_s);
    let mut r = Rng::stream(seed, "trace");
    let window = sc.sim_hours * 3600.0 * cfg.window_frac;
    let mut out = Vec::new();
    for (node, &ci) in classes.iter().enumerate() {
        if sc.classes[ci].kind == Kind::Seed {
            continue;
        }
        for _ in 0..cfg.fetches_per_node {
            out.push(Want {
                at_s: r.f64() * window,
                node: node as u32,
                closure: zipf.sample(&mut r) as u32,
            });
        }
    }
    out.sort_by(|a, b| a.at_s.total_cmp(&b.at_s).then(a.node.cmp(&b.node)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/real-32.toml");
        Scenario::load(&path, &[]).unwrap()
    }

    #[test]
    fn a_trace_is_seeded_sorted_and_names_only_fetching_nodes() {
        let sc = scenario();
        let a = wants(&sc, 7).unwrap();
        assert_eq!(a, wants(&sc, 7).unwrap());
        assert_ne!(a, wants(&sc, 8).unwrap());
        assert_eq!(a.len(), 32);
        let classes = node_classes(&sc);
        assert_eq!(classes.len(), 33);
        assert_eq!(sc.classes[classes[0]].kind, Kind::Seed, "seeds come first");
        let end = sc.sim_hours * 3600.0 * 0.8;
        for w in &a {
            assert_ne!(sc.classes[classes[w.node as usize]].kind, Kind::Seed);
            assert!(w.at_s >= 0.0 && w.at_s <= end);
            assert!(w.closure < sc.workload.closures);
        }
        assert!(a.windows(2).all(|p| p[0].at_s <= p[1].at_s));
    }

    #[test]
    fn the_model_replays_the_trace_and_nothing_else() {
        let sc = scenario();
        let o = crate::run_model(&sc, 3).unwrap();
        assert_eq!(o.fresh_times.len(), 32, "one fetch per trace entry");
        assert_eq!(o.unfinished_fetches, 0);
        assert!(o.upgrade_times.is_empty());
        let fetched: u64 = wants(&sc, 3)
            .unwrap()
            .iter()
            .map(|w| o.closure_bytes[w.closure as usize])
            .sum();
        assert_eq!(
            o.delivered_bytes, fetched,
            "delivered = the trace's closures"
        );
    }
}
