//! Model mode: a seeded, single-threaded discrete-event simulation of the network.
//!
//! Owns: the event queue (a binary heap ordered by time in microseconds, then by insertion
//! sequence — no two events tie, so a run is a pure function of scenario and seed), node state
//! as struct-of-arrays with `u32` ids, flows with flow-level bandwidth sharing, provider
//! bookkeeping, and every counter the outputs are made from.
//! Must not: write files or print — `output` turns an `Outcome` into files.
//!
//! Bandwidth sharing: a flow's rate is min(source uplink / source's concurrent uploads of that
//! link kind, receiver downlink / receiver's concurrent downloads of that kind). This never
//! exceeds any link's capacity (what the closed-form bounds need); it does not hand unused
//! share to other flows, so it is pessimistic against max-min fairness.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use serde::Serialize;

use crate::dht::{Probe, ServerIndex};
use crate::rng::{Discrete, Rng};
use crate::scenario::{Announce, Kind, ResolvedClass, Scenario, SessionDist};
use crate::Error;

const NONE: u32 = u32::MAX;
/// Width of one timing-wheel slot, µs.
const WHEEL_SLOT_US: u64 = 10_000_000;

// Node flags.
const F_NAT: u8 = 1;
const F_ONLINE: u8 = 2;
const F_SERVES: u8 = 4;
const F_ALWAYS: u8 = 8;
const F_WAIT_SEED: u8 = 16;
const F_PENDING: u8 = 32;
const F_LEAVE_AFTER: u8 = 64;
const F_SEED: u8 = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    SessionStart(u32),
    SessionEnd(u32),
    Release(u16),
    UpgradeDue(u32),
    /// The k-th fetch of the scenario's trace.
    Want(u32),
    Lookup {
        node: u32,
        epoch: u32,
    },
    Retry {
        node: u32,
        epoch: u32,
    },
    FlowDone {
        flow: u32,
        epoch: u32,
    },
    Reprovide {
        node: u32,
        epoch: u32,
    },
    Sample,
    ProbePlace,
    ProbeCheck,
}

/// One fetch in progress (at most one per node).
#[derive(Clone, Debug, Default)]
struct Fetch {
    active: bool,
    fresh: bool,
    looked_up: bool,
    target: i16,
    closure: u32,
    /// Unassigned bytes that holders of target or target − 1 (or a seed) can send.
    old_left: u64,
    /// Unassigned bytes that only holders of target (or a seed) can send.
    new_left: u64,
    total: u64,
    online_since: f64,
    accum: f64,
    epoch: u32,
    /// Consecutive retries with nothing flowing (the wait doubles each time, up to 64×).
    retries: u32,
    /// A Retry event is queued for this epoch.
    retry_pending: bool,
    /// A seed joined because the peers were slow: it may send old-part bytes too.
    seed_boost: bool,
}

#[derive(Clone, Debug)]
struct Flow {
    src: u32,
    dst: u32,
    lan: bool,
    /// Part the current piece came from: false = old, true = new.
    new_part: bool,
    /// The source holds the fetch's target generation (or is a seed).
    full: bool,
    rate: f64,
    piece_total: u64,
    piece_credited: u64,
    piece_moved: f64,
    last_t: f64,
    epoch: u32,
    alive: bool,
}

/// A node class as the model uses it.
#[derive(Clone, Debug)]
struct Class {
    rc: ResolvedClass,
    tiers: Discrete,
}

/// One row of the time series.
#[derive(Clone, Debug, Serialize)]
pub struct SampleRow {
    /// Time, hours.
    pub t_h: f64,
    /// Online non-seed nodes.
    pub online_nodes: u64,
    /// Online DHT servers.
    pub online_servers: u64,
    /// Fetches in progress.
    pub active_fetches: u64,
    /// Bytes delivered in the interval.
    pub delivered_bytes: u64,
    /// Bytes sent by seeds in the interval.
    pub seed_bytes: u64,
    /// Seed share of the interval's delivered bytes (0 when nothing was delivered).
    pub seed_share: f64,
    /// Seed share of all bytes delivered so far.
    pub seed_share_cum: f64,
    /// Live provider records per online DHT server.
    pub dht_records_per_server: f64,
    /// Provider-lookup messages per online DHT server per second, over the interval.
    pub lookup_msgs_per_server_per_s: f64,
    /// Announce messages per online DHT server per second, over the interval.
    pub announce_msgs_per_server_per_s: f64,
    /// Mean bytes held per non-seed node.
    pub stored_bytes_per_node: f64,
}

/// Per-class results.
#[derive(Clone, Debug, Serialize)]
pub struct ClassStats {
    /// Class name.
    pub class: String,
    /// Nodes in the class.
    pub nodes: u64,
    /// Completed full-closure fetches.
    pub fresh_fetches: u64,
    /// Fresh fetch time percentiles, seconds (online time from request to last byte).
    pub fresh_p50_s: Option<f64>,
    /// p95.
    pub fresh_p95_s: Option<f64>,
    /// p99.
    pub fresh_p99_s: Option<f64>,
    /// Completed upgrades (fetching only what changed).
    pub upgrade_fetches: u64,
    /// Upgrade time p50, seconds.
    pub upgrade_p50_s: Option<f64>,
    /// p95.
    pub upgrade_p95_s: Option<f64>,
    /// p99.
    pub upgrade_p99_s: Option<f64>,
    /// Bytes sent by the class.
    pub sent_bytes: u64,
    /// Bytes received by the class.
    pub received_bytes: u64,
}

/// Everything a run produces, before it is written out.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// "model" or "real".
    pub mode: &'static str,
    /// Scenario name.
    pub name: String,
    /// Non-seed nodes.
    pub nodes: u64,
    /// Seed nodes.
    pub seeds: u64,
    /// The seed used.
    pub seed: u64,
    /// Simulated seconds.
    pub sim_seconds: f64,
    /// Bytes received by all nodes.
    pub delivered_bytes: u64,
    /// Bytes sent, summed over senders.
    pub sent_bytes: u64,
    /// Bytes sent by seeds.
    pub seed_egress_bytes: u64,
    /// Bytes delivered for the popular closures.
    pub popular_delivered_bytes: u64,
    /// Bytes sent by seeds for the popular closures.
    pub popular_seed_bytes: u64,
    /// Fresh fetch times, all classes, seconds (sorted).
    pub fresh_times: Vec<f64>,
    /// Upgrade times, all classes, seconds (sorted).
    pub upgrade_times: Vec<f64>,
    /// Fresh fetch completions: (time s, node).
    pub fresh_completions: Vec<(f64, u32)>,
    /// Per-class results.
    pub classes: Vec<ClassStats>,
    /// Time series.
    pub samples: Vec<SampleRow>,
    /// Provider-lookup messages in total.
    pub lookup_msgs: u64,
    /// Announce messages in total.
    pub announce_msgs: u64,
    /// Time-averaged online DHT servers.
    pub mean_online_servers: f64,
    /// Time-averaged live provider records per online server.
    pub mean_records_per_server: f64,
    /// Mean bytes held per non-seed node at the end.
    pub stored_bytes_per_node: f64,
    /// Distinct bytes the seeds must have sent at least once (lower bound on seed egress).
    pub seed_lower_bound_bytes: u64,
    /// Bytes the seeds store (every generation of every closure, deduplicated).
    pub seed_stored_bytes: u64,
    /// Flows started from a source that could not serve (must be 0).
    pub serve_violations: u64,
    /// Link-capacity violations seen by `checks` (must be 0).
    pub capacity_violations: u64,
    /// Aggregate capacities for the closed-form bound: (sum of uplinks incl. seeds, seed uplink,
    /// smallest downlink), bytes/s.
    pub capacity: (f64, f64, f64),
    /// Bytes of each closure's generation 0.
    pub closure_bytes: Vec<u64>,
    /// Survival of probe records after `probe_age_h` without republication.
    pub probe_survival: Option<f64>,
    /// Fraction of probe holders online at the check (empirical p).
    pub probe_holder_online: Option<f64>,
    /// Failed dials (NAT, stale records).
    pub dial_failures: u64,
    /// Events processed.
    pub events: u64,
    /// Fetches still in progress (or stuck) at the end: not in the percentiles.
    pub unfinished_fetches: u64,
}

/// The closures' sizes and NAR counts, drawn from the closure mix (the first draws of the
/// "init" stream: real mode draws the same catalogue).
pub fn catalogue(sc: &Scenario, r: &mut Rng) -> Result<(Vec<u64>, Vec<u64>), Error> {
    let mix = sc.closure_mix()?;
    let cat = Discrete::new(&mix.categories.iter().map(|c| c.weight).collect::<Vec<_>>());
    let n_clos = sc.workload.closures as usize;
    let mut closure_bytes = Vec::with_capacity(n_clos);
    let mut closure_nars = Vec::with_capacity(n_clos);
    let gib = 1024f64.powi(3);
    for _ in 0..n_clos {
        let c = &mix.categories[cat.sample(r)];
        let bytes = r.lognormal(c.gib * gib, mix.size_sigma).max(1.0) as u64;
        closure_bytes.push(bytes);
        closure_nars.push(
            ((bytes as f64) / (mix.mean_nar_mib * 1024.0 * 1024.0))
                .ceil()
                .max(1.0) as u64,
        );
    }
    Ok((closure_bytes, closure_nars))
}

/// Nodes per class: seeds by `count`, the others by `share` of `nodes` (the last takes the
/// rest).
pub fn class_counts(sc: &Scenario) -> Vec<u32> {
    let classes = &sc.classes;
    let mut counts = vec![0u32; classes.len()];
    let non_seed: Vec<usize> = (0..classes.len())
        .filter(|&i| classes[i].kind != Kind::Seed)
        .collect();
    let mut assigned = 0u32;
    for (j, &i) in non_seed.iter().enumerate() {
        let c = if j + 1 == non_seed.len() {
            sc.nodes - assigned
        } else {
            ((classes[i].share * f64::from(sc.nodes)).round() as u32).min(sc.nodes - assigned)
        };
        counts[i] = c;
        assigned += c;
    }
    for (i, cl) in classes.iter().enumerate() {
        if cl.kind == Kind::Seed {
            counts[i] = cl.count;
        }
    }
    counts
}

/// The classes in node order: seeds first, then the others in file order (each class's nodes
/// are consecutive; model, trace and real mode number nodes this way).
pub fn class_order(sc: &Scenario) -> Vec<usize> {
    let seed = |i: &usize| sc.classes[*i].kind == Kind::Seed;
    let n = sc.classes.len();
    (0..n)
        .filter(seed)
        .chain((0..n).filter(|i| !seed(i)))
        .collect()
}

/// The simulation state.
pub struct Model {
    sc: Scenario,
    seed: u64,
    classes: Vec<Class>,
    now: f64,
    end: f64,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    wheel: Vec<Vec<(u64, u64, Ev)>>,
    wheel_pos: usize,
    seq: u64,
    events: u64,

    // Nodes (struct of arrays).
    class: Vec<u8>,
    flags: Vec<u8>,
    dht_id: Vec<u64>,
    closure: Vec<u32>,
    held: Vec<i16>,
    holder_pos: Vec<u32>,
    cluster: Vec<u32>,
    cluster_len: Vec<u32>,
    up_bps: Vec<f32>,
    down_bps: Vec<f32>,
    lan_bps: Vec<f32>,
    session_epoch: Vec<u32>,
    announced_at: Vec<f32>,
    up_flows: Vec<Vec<u32>>,
    down_flows: Vec<Vec<u32>>,
    n_up: Vec<[u16; 2]>,
    n_down: Vec<[u16; 2]>,
    /// Divisors the links are shared by (≥ the flow counts; see `next_divisor`).
    q_up: Vec<[u32; 2]>,
    q_down: Vec<[u32; 2]>,
    sent: Vec<u64>,
    recv: Vec<u64>,
    fetch: Vec<Fetch>,
    seeds: Vec<u32>,

    // Flows.
    flows: Vec<Flow>,
    free_flows: Vec<u32>,
    seed_queue: VecDeque<u32>,

    // Catalogue.
    closure_bytes: Vec<u64>,
    closure_nars: Vec<u64>,
    popularity: Discrete,
    gens: usize,
    latest: i16,
    new_frac: Vec<f64>,
    changed_frac: Vec<f64>,
    holders: Vec<Vec<u32>>,
    stale: Vec<u32>,
    first_done: Vec<bool>,
    warm_holders: Vec<u32>,

    // DHT.
    servers: ServerIndex,
    probe: Probe,
    probe_result: Option<(f64, f64)>,

    // Random streams.
    r_sess: Rng,
    r_work: Rng,
    r_sel: Rng,
    r_dht: Rng,

    // Counters.
    delivered: u64,
    seed_sent: u64,
    by_closure_delivered: Vec<u64>,
    by_closure_seed: Vec<u64>,
    lookup_msgs: u64,
    announce_msgs: u64,
    dial_failures: u64,
    serve_violations: u64,
    capacity_violations: u64,
    fresh_times: Vec<Vec<f64>>,
    upgrade_times: Vec<Vec<f64>>,
    fresh_completions: Vec<(f64, u32)>,
    samples: Vec<SampleRow>,
    last_sample: (f64, u64, u64, u64, u64),
    server_time: f64,
    records_time: f64,
    seed_lower_bound: u64,
    /// The scenario's `[trace]`: the only fetches started (none at session starts).
    wants: Option<Vec<crate::trace::Want>>,
}

/// The `p`-quantile (nearest rank) of an ascending slice; None if it is empty.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[idx])
}

impl Model {
    /// Builds the initial state: nodes, catalogue, sessions, first events.
    pub fn new(sc: &Scenario, seed: u64) -> Result<Model, Error> {
        let sc = sc.clone();
        let resolved = sc.resolve_classes()?;
        let classes: Vec<Class> = resolved
            .into_iter()
            .map(|rc| {
                let w: Vec<f64> = rc.bandwidth.tiers.iter().map(|t| t.weight).collect();
                Class {
                    tiers: Discrete::new(&w),
                    rc,
                }
            })
            .collect();
        if classes.len() > 255 {
            return Err(Error::Scenario {
                path: sc.name.clone(),
                msg: "at most 255 classes".into(),
            });
        }
        let n_classes = classes.len();
        let mut r_init = Rng::stream(seed, "init");

        let counts = class_counts(&sc);
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if total >= NONE as usize {
            return Err(Error::Scenario {
                path: sc.name.clone(),
                msg: "too many nodes".into(),
            });
        }

        // Catalogue.
        let (closure_bytes, closure_nars) = catalogue(&sc, &mut r_init)?;
        let n_clos = closure_bytes.len();
        let w = &sc.workload;
        let end = sc.sim_hours * 3600.0;
        let gens = if w.first_release_h * 3600.0 < end {
            2 + ((sc.sim_hours - w.first_release_h) / w.gen_interval_h).floor() as usize
        } else {
            1
        };
        let mut new_frac = vec![1.0; gens];
        let mut changed_frac = vec![1.0; gens];
        for g in 1..gens {
            let rebuild = w.mass_rebuild_every > 0 && g % w.mass_rebuild_every as usize == 0;
            if rebuild {
                new_frac[g] = w.rebuild_new_bytes_frac;
                changed_frac[g] = 1.0;
            } else {
                new_frac[g] = w.bump_new_bytes_frac;
                changed_frac[g] = w.bump_changed_nar_frac;
            }
        }
        if gens > i16::MAX as usize {
            return Err(Error::Scenario {
                path: sc.name.clone(),
                msg: "too many generations".into(),
            });
        }

        let mut m = Model {
            classes,
            now: 0.0,
            end,
            heap: BinaryHeap::new(),
            wheel: vec![Vec::new(); (end * 1e6 / WHEEL_SLOT_US as f64) as usize + 2],
            wheel_pos: 0,
            seq: 0,
            events: 0,
            class: Vec::with_capacity(total),
            flags: Vec::with_capacity(total),
            dht_id: Vec::with_capacity(total),
            closure: vec![0; total],
            held: vec![-1; total],
            holder_pos: vec![NONE; total],
            cluster: vec![NONE; total],
            cluster_len: vec![0; total],
            up_bps: Vec::with_capacity(total),
            down_bps: Vec::with_capacity(total),
            lan_bps: Vec::with_capacity(total),
            session_epoch: vec![0; total],
            announced_at: vec![f32::NEG_INFINITY; total],
            up_flows: vec![Vec::new(); total],
            down_flows: vec![Vec::new(); total],
            n_up: vec![[0; 2]; total],
            n_down: vec![[0; 2]; total],
            q_up: vec![[0; 2]; total],
            q_down: vec![[0; 2]; total],
            sent: vec![0; total],
            recv: vec![0; total],
            fetch: vec![Fetch::default(); total],
            seeds: Vec::new(),
            flows: Vec::new(),
            free_flows: Vec::new(),
            seed_queue: VecDeque::new(),
            popularity: Discrete::zipf(n_clos, w.zipf_s),
            closure_bytes,
            closure_nars,
            gens,
            latest: 0,
            new_frac,
            changed_frac,
            holders: vec![Vec::new(); n_clos * gens],
            stale: vec![0; n_clos * gens],
            first_done: vec![false; n_clos * gens],
            warm_holders: vec![0; n_clos],
            servers: ServerIndex::new(Vec::new()),
            probe: Probe::default(),
            probe_result: None,
            r_sess: Rng::stream(seed, "sessions"),
            r_work: Rng::stream(seed, "workload"),
            r_sel: Rng::stream(seed, "select"),
            r_dht: Rng::stream(seed, "dht"),
            delivered: 0,
            seed_sent: 0,
            by_closure_delivered: vec![0; n_clos],
            by_closure_seed: vec![0; n_clos],
            lookup_msgs: 0,
            announce_msgs: 0,
            dial_failures: 0,
            serve_violations: 0,
            capacity_violations: 0,
            fresh_times: vec![Vec::new(); n_classes],
            upgrade_times: vec![Vec::new(); n_classes],
            fresh_completions: Vec::new(),
            samples: Vec::new(),
            last_sample: (0.0, 0, 0, 0, 0),
            server_time: 0.0,
            records_time: 0.0,
            seed_lower_bound: 0,
            wants: None,
            sc,
            seed,
        };

        // Nodes: seeds first, then the other classes in file order.
        let order = class_order(&m.sc);
        let mbit = 1e6 / 8.0;
        let mut server_ids = Vec::new();
        for &ci in &order {
            let first = m.class.len() as u32;
            for j in 0..counts[ci] {
                let node = m.class.len() as u32;
                let cl = &m.classes[ci];
                let cfg = &cl.rc.cfg;
                let tier = &cl.rc.bandwidth.tiers[cl.tiers.sample(&mut r_init)];
                let mut f = 0u8;
                let scale = if cfg.kind == Kind::Peer {
                    m.sc.net.uplink_scale
                } else {
                    1.0
                };
                m.up_bps.push((tier.up_mbps * mbit * scale) as f32);
                m.down_bps.push((tier.down_mbps * mbit) as f32);
                m.lan_bps.push((cfg.lan_mbps * mbit) as f32);
                if r_init.chance(cfg.nat_frac) {
                    f |= F_NAT;
                }
                if cfg.kind == Kind::Peer {
                    f |= F_SERVES;
                }
                if cfg.kind == Kind::Seed {
                    f |= F_SEED | F_ALWAYS;
                    m.seeds.push(node);
                } else if r_init.chance(cl.rc.sessions.always_on_frac)
                    || cl.rc.sessions.dist == SessionDist::Always
                {
                    f |= F_ALWAYS;
                }
                let id = r_init.next_u64();
                m.dht_id.push(id);
                if f & F_NAT == 0 && cfg.kind != Kind::Ci {
                    server_ids.push((id, node));
                }
                if cfg.lan_cluster_size > 0 {
                    let size = cfg.lan_cluster_size;
                    let start = first + (j / size) * size;
                    m.cluster[node as usize] = start;
                    m.cluster_len[node as usize] = size.min(first + counts[ci] - start);
                }
                if cfg.kind == Kind::Peer {
                    let c = m.popularity.sample(&mut m.r_work) as u32;
                    m.closure[node as usize] = c;
                    if r_init.chance(m.sc.workload.warm_frac) {
                        m.held[node as usize] = 0;
                        m.warm_holders[c as usize] += 1;
                    }
                }
                m.flags.push(f);
                m.class.push(ci as u8);
            }
        }
        m.servers = ServerIndex::new(server_ids);

        // Initial sessions: stationary start (online with probability E[on] / (E[on] + E[off])).
        for node in 0..total as u32 {
            let n = node as usize;
            let model = &m.classes[m.class[n] as usize].rc.sessions;
            let online = if m.flags[n] & F_ALWAYS != 0 {
                true
            } else {
                let on = mean_session_h(model);
                let p = on / (on + model.off_mean_h);
                m.r_sess.chance(p)
            };
            if online {
                m.push(0.0, Ev::SessionStart(node));
            } else {
                let off = m.r_sess.exp(model.off_mean_h * 3600.0);
                m.push(off, Ev::SessionStart(node));
            }
        }
        if m.gens > 1 {
            m.push(m.sc.workload.first_release_h * 3600.0, Ev::Release(1));
        }
        if m.sc.trace.is_some() {
            let wants = crate::trace::wants(&m.sc, seed)?;
            for (k, w) in wants.iter().enumerate() {
                m.push(w.at_s, Ev::Want(k as u32));
            }
            m.wants = Some(wants);
        }
        m.push(0.0, Ev::Sample);
        if m.sc.dht.probe_keys > 0 {
            m.push(m.sc.dht.probe_at_h * 3600.0, Ev::ProbePlace);
        }
        Ok(m)
    }

    /// Each node's uplink, bytes per second (node order: seeds first, then the classes in file
    /// order), as drawn for this scenario and seed.
    pub fn uplinks(&self) -> Vec<f64> {
        self.up_bps.iter().map(|&b| f64::from(b)).collect()
    }

    /// Queues an event. Events past the current wheel slot wait in their slot's vector and
    /// enter the heap only when the clock reaches that slot, so the heap stays small (far-future
    /// session, upgrade and reprovide timers of a million nodes would otherwise fill it). Order is
    /// still (time, sequence): a slot's events enter the heap before any of them can be popped.
    fn push(&mut self, t: f64, ev: Ev) {
        let key = (t * 1e6).ceil().max(0.0) as u64;
        self.seq += 1;
        let slot = (key / WHEEL_SLOT_US) as usize;
        if slot <= self.wheel_pos {
            self.heap.push(Reverse((key, self.seq, ev)));
        } else if slot < self.wheel.len() {
            self.wheel[slot].push((key, self.seq, ev));
        }
        // Past the end of the run: never processed.
    }

    /// The next event in (time, sequence) order.
    fn pop(&mut self) -> Option<(u64, Ev)> {
        loop {
            let slot_end = (self.wheel_pos as u64 + 1) * WHEEL_SLOT_US;
            match self.heap.peek() {
                Some(Reverse((key, _, _))) if *key < slot_end => {
                    return self.heap.pop().map(|Reverse((k, _, ev))| (k, ev));
                }
                _ => {
                    if self.wheel_pos + 1 >= self.wheel.len() {
                        return self.heap.pop().map(|Reverse((k, _, ev))| (k, ev));
                    }
                    self.wheel_pos += 1;
                    let due = std::mem::take(&mut self.wheel[self.wheel_pos]);
                    self.heap.extend(due.into_iter().map(Reverse));
                }
            }
        }
    }

    fn is_seed(&self, n: u32) -> bool {
        self.flags[n as usize] & F_SEED != 0
    }

    fn online(&self, n: u32) -> bool {
        self.flags[n as usize] & F_ONLINE != 0
    }

    fn kind(&self, n: u32) -> Kind {
        self.classes[self.class[n as usize] as usize].rc.cfg.kind
    }

    fn version(&self, c: u32, g: i16) -> usize {
        c as usize * self.gens + g as usize
    }

    fn slots(&self, n: u32) -> u32 {
        if self.is_seed(n) {
            self.sc.net.seed_slots
        } else {
            self.classes[self.class[n as usize] as usize]
                .rc
                .cfg
                .upload_slots
        }
    }

    fn keys_of(&self, c: u32) -> u64 {
        let nars = self.closure_nars[c as usize];
        match self.sc.dht.announce {
            Announce::Roots => nars,
            Announce::All => nars + self.chunks_in(self.closure_bytes[c as usize] as f64),
        }
    }

    fn chunks_in(&self, bytes: f64) -> u64 {
        (bytes / (self.sc.dht.chunk_kib * 1024.0)).ceil() as u64
    }

    fn msgs_per_announced_key(&self) -> f64 {
        let d = &self.sc.dht;
        f64::from(d.k) + d.announce_walks_per_key * (1.0 + d.extra_hops_mean) * f64::from(d.alpha)
    }

    fn count_announce(&mut self, keys: u64) {
        self.announce_msgs += (keys as f64 * self.msgs_per_announced_key()).round() as u64;
    }

    /// Runs to the end and returns the outcome.
    pub fn run(mut self) -> Outcome {
        while let Some((key, ev)) = self.pop() {
            let t = key as f64 / 1e6;
            if t > self.end {
                break;
            }
            self.now = t;
            self.events += 1;
            self.handle(ev);
        }
        self.now = self.end;
        self.settle_all();
        self.sample_row();
        self.finish()
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::SessionStart(n) => self.session_start(n),
            Ev::SessionEnd(n) => self.session_end(n),
            Ev::Release(g) => self.release(g as i16),
            Ev::Want(k) => self.want(k),
            Ev::UpgradeDue(n) => {
                let i = n as usize;
                self.flags[i] |= F_PENDING;
                if self.online(n) && !self.fetch[i].active {
                    self.start_fetch(n);
                }
            }
            Ev::Lookup { node, epoch } => {
                let f = &mut self.fetch[node as usize];
                if f.active && f.epoch == epoch && self.flags[node as usize] & F_ONLINE != 0 {
                    f.looked_up = true;
                    self.fill_sources(node);
                }
            }
            Ev::Retry { node, epoch } => {
                let f = &mut self.fetch[node as usize];
                if f.epoch == epoch {
                    f.retry_pending = false;
                    if f.active && self.flags[node as usize] & F_ONLINE != 0 {
                        self.fill_sources(node);
                    }
                }
            }
            Ev::FlowDone { flow, epoch } => {
                let fl = &self.flows[flow as usize];
                if fl.alive && fl.epoch == epoch {
                    self.piece_done(flow);
                }
            }
            Ev::Reprovide { node, epoch } => {
                let i = node as usize;
                if self.online(node) && self.session_epoch[i] == epoch {
                    if self.flags[i] & F_SERVES != 0 && self.held[i] >= 0 {
                        let keys = self.keys_of(self.closure[i]);
                        self.count_announce(keys);
                        self.announced_at[i] = self.now as f32;
                    }
                    let next = self.now + self.sc.dht.reprovide_h * 3600.0;
                    self.push(next, Ev::Reprovide { node, epoch });
                }
            }
            Ev::Sample => {
                self.settle_all();
                self.sample_row();
                let next = self.now + self.sc.sample_minutes * 60.0;
                self.push(next, Ev::Sample);
            }
            Ev::ProbePlace => self.probe_place(),
            Ev::ProbeCheck => self.probe_check(),
        }
    }

    // ---------------------------------------------------------------- sessions

    fn draw_session(&mut self, n: u32) -> f64 {
        let s = &self.classes[self.class[n as usize] as usize].rc.sessions;
        match s.dist {
            SessionDist::Always => f64::INFINITY,
            SessionDist::Exp => self.r_sess.exp(s.mean_h * 3600.0),
            SessionDist::Weibull => self.r_sess.weibull(s.shape, s.scale_h * 3600.0),
        }
    }

    fn session_start(&mut self, n: u32) {
        let i = n as usize;
        if self.online(n) {
            return;
        }
        self.flags[i] |= F_ONLINE;
        self.session_epoch[i] = self.session_epoch[i].wrapping_add(1);
        if self.flags[i] & F_ALWAYS == 0 {
            let len = self.draw_session(n);
            if len.is_finite() {
                self.push(self.now + len, Ev::SessionEnd(n));
            }
        }
        match self.kind(n) {
            Kind::Seed => {}
            Kind::Ci if self.wants.is_some() => {}
            Kind::Ci => {
                self.held[i] = -1;
                self.closure[i] = self.popularity.sample(&mut self.r_work) as u32;
                self.start_fetch(n);
            }
            Kind::Peer => {
                let interval = self.sc.dht.reprovide_h * 3600.0;
                let epoch = self.session_epoch[i];
                if self.now == 0.0 {
                    // Sessions running at t = 0 started earlier: their reprovide timers are at a
                    // random phase, not all due now.
                    let u = self.r_dht.f64();
                    self.add_holder(n);
                    self.announced_at[i] = (-u * interval) as f32;
                    self.push((1.0 - u) * interval, Ev::Reprovide { node: n, epoch });
                } else {
                    if self.held[i] >= 0 {
                        self.add_holder(n);
                        let keys = self.keys_of(self.closure[i]);
                        self.count_announce(keys);
                        self.announced_at[i] = self.now as f32;
                    }
                    self.push(self.now + interval, Ev::Reprovide { node: n, epoch });
                }
                if self.fetch[i].active {
                    let f = &mut self.fetch[i];
                    f.online_since = self.now;
                    f.epoch = f.epoch.wrapping_add(1);
                    f.retry_pending = false;
                    f.looked_up = false;
                    self.begin_lookup(n);
                } else if self.wants.is_none()
                    && (self.held[i] < 0 || self.flags[i] & F_PENDING != 0)
                {
                    self.start_fetch(n);
                }
            }
        }
    }

    /// A fetch of the trace: the node now wants that closure, from scratch. Skipped while the
    /// node is still fetching (or offline: a trace is meant for always-on nodes).
    fn want(&mut self, k: u32) {
        let Some(w) = self.wants.as_ref().map(|w| w[k as usize]) else {
            return;
        };
        let (n, i) = (w.node, w.node as usize);
        if self.is_seed(n) || !self.online(n) || self.fetch[i].active {
            return;
        }
        if self.held[i] >= 0 {
            self.settle_node(n);
            self.remove_holder(n);
        }
        self.closure[i] = w.closure;
        self.held[i] = -1;
        self.start_fetch(n);
    }

    fn session_end(&mut self, n: u32) {
        let i = n as usize;
        if !self.online(n) {
            return;
        }
        if self.kind(n) == Kind::Ci && self.fetch[i].active {
            // A CI job does not end before its closure is there.
            self.flags[i] |= F_LEAVE_AFTER;
            return;
        }
        self.go_offline(n);
    }

    fn go_offline(&mut self, n: u32) {
        let i = n as usize;
        // Bytes moved up to now were moved while the node was online.
        self.settle_node(n);
        self.flags[i] &= !(F_ONLINE | F_WAIT_SEED | F_LEAVE_AFTER);
        self.remove_holder(n);
        while let Some(&fl) = self.up_flows[i].last() {
            self.abort_flow(fl);
        }
        while let Some(&fl) = self.down_flows[i].last() {
            self.abort_flow(fl);
        }
        if self.fetch[i].active {
            let f = &mut self.fetch[i];
            f.accum += self.now - f.online_since;
            f.epoch = f.epoch.wrapping_add(1);
            f.retry_pending = false;
        }
        let off = self.classes[self.class[i] as usize].rc.sessions.off_mean_h;
        let gap = self.r_sess.exp(off * 3600.0);
        self.push(self.now + gap, Ev::SessionStart(n));
    }

    fn release(&mut self, g: i16) {
        self.latest = g;
        let mean = self.sc.workload.upgrade_delay_mean_h * 3600.0;
        for n in 0..self.class.len() as u32 {
            if self.kind(n) == Kind::Peer {
                let d = self.r_work.exp(mean);
                self.push(self.now + d, Ev::UpgradeDue(n));
            }
        }
        if (g as usize) + 1 < self.gens {
            let next = self.now + self.sc.workload.gen_interval_h * 3600.0;
            self.push(next, Ev::Release((g + 1) as u16));
        }
    }

    // ---------------------------------------------------------------- holders

    fn add_holder(&mut self, n: u32) {
        let i = n as usize;
        if self.flags[i] & F_SERVES == 0 || self.held[i] < 0 || self.holder_pos[i] != NONE {
            return;
        }
        let v = self.version(self.closure[i], self.held[i]);
        self.holder_pos[i] = self.holders[v].len() as u32;
        self.holders[v].push(n);
    }

    fn remove_holder(&mut self, n: u32) {
        let i = n as usize;
        let pos = self.holder_pos[i];
        if pos == NONE {
            return;
        }
        let v = self.version(self.closure[i], self.held[i]);
        let list = &mut self.holders[v];
        list.swap_remove(pos as usize);
        if let Some(&moved) = list.get(pos as usize) {
            self.holder_pos[moved as usize] = pos;
        }
        self.holder_pos[i] = NONE;
    }

    // ---------------------------------------------------------------- fetches

    fn start_fetch(&mut self, n: u32) {
        let i = n as usize;
        self.flags[i] &= !F_PENDING;
        let c = self.closure[i];
        let g = self.latest;
        let held = self.held[i];
        if held >= g {
            return;
        }
        let size = self.closure_bytes[c as usize];
        let sz = size as f64;
        let (old_left, new_left, fresh, lookups) = if held >= 0 {
            let frac: f64 = ((held + 1)..=g).map(|h| self.new_frac[h as usize]).sum();
            let changed: f64 = ((held + 1)..=g)
                .map(|h| self.changed_frac[h as usize])
                .sum::<f64>()
                .min(1.0);
            let need = (sz * frac.min(1.0)).ceil() as u64;
            let nars = (self.closure_nars[c as usize] as f64 * changed).ceil() as u64;
            (0, need.min(size), false, nars)
        } else if g == 0 {
            (0, size, true, self.closure_nars[c as usize])
        } else {
            let gi = g as usize;
            let shareable = match self.sc.dht.announce {
                Announce::All => 1.0 - self.new_frac[gi],
                Announce::Roots => 1.0 - self.changed_frac[gi],
            };
            let old = (sz * shareable).floor() as u64;
            let mut lookups = self.closure_nars[c as usize];
            if self.sc.dht.announce == Announce::All {
                // Chunks reused inside changed NARs are found only through chunk records.
                let reused = sz * (self.changed_frac[gi] - self.new_frac[gi]).max(0.0);
                lookups += self.chunks_in(reused);
            }
            (old, size - old, true, lookups)
        };
        let f = &mut self.fetch[i];
        f.active = true;
        f.fresh = fresh;
        f.looked_up = false;
        f.target = g;
        f.closure = c;
        f.old_left = old_left;
        f.new_left = new_left;
        f.total = old_left + new_left;
        f.online_since = self.now;
        f.accum = 0.0;
        f.epoch = f.epoch.wrapping_add(1);
        f.retries = 0;
        f.retry_pending = false;
        f.seed_boost = false;
        if f.total == 0 {
            self.complete_fetch(n);
            return;
        }
        // LAN first: a cluster member holding the target is found by mDNS, without a DHT walk.
        if self.lan_holder_of_target(n) {
            self.fetch[i].looked_up = true;
            self.fill_sources(n);
            return;
        }
        let hops = 1 + self.r_dht.poisson(self.sc.dht.extra_hops_mean);
        self.lookup_msgs += lookups * u64::from(hops) * u64::from(self.sc.dht.alpha);
        self.schedule_lookup(n, hops);
    }

    fn begin_lookup(&mut self, n: u32) {
        if self.lan_holder_of_target(n) {
            self.fetch[n as usize].looked_up = true;
            self.fill_sources(n);
            return;
        }
        let hops = 1 + self.r_dht.poisson(self.sc.dht.extra_hops_mean);
        let f = &self.fetch[n as usize];
        let nars = (self.closure_nars[f.closure as usize] as f64 * (f.old_left + f.new_left) as f64
            / f.total.max(1) as f64)
            .ceil() as u64;
        self.lookup_msgs += nars * u64::from(hops) * u64::from(self.sc.dht.alpha);
        self.schedule_lookup(n, hops);
    }

    fn schedule_lookup(&mut self, n: u32, hops: u32) {
        let mut lat = 0.0;
        for _ in 0..hops {
            lat += self.r_dht.exp(self.sc.dht.hop_latency_ms / 1000.0);
        }
        let epoch = self.fetch[n as usize].epoch;
        self.push(self.now + lat, Ev::Lookup { node: n, epoch });
    }

    fn lan_holder_of_target(&self, n: u32) -> bool {
        let i = n as usize;
        let start = self.cluster[i];
        if start == NONE {
            return false;
        }
        let f = &self.fetch[i];
        (start..start + self.cluster_len[i]).any(|m| {
            m != n
                && self.online(m)
                && self.flags[m as usize] & F_SERVES != 0
                && self.closure[m as usize] == f.closure
                && self.held[m as usize] == f.target
        })
    }

    /// Whether `src` can serve `dst`'s fetch: (the old part, the new part too). A holder of the
    /// previous generation serves only the old part.
    fn can_serve(&self, src: u32, dst: u32) -> (bool, bool) {
        if self.is_seed(src) {
            return (true, true);
        }
        let s = src as usize;
        let f = &self.fetch[dst as usize];
        if !self.online(src) || self.flags[s] & F_SERVES == 0 || self.closure[s] != f.closure {
            return (false, false);
        }
        let h = self.held[s];
        if h == f.target {
            (true, true)
        } else if h >= 0 && h + 1 == f.target {
            (true, false)
        } else {
            (false, false)
        }
    }

    fn has_source(&self, dst: u32, src: u32) -> bool {
        self.down_flows[dst as usize]
            .iter()
            .any(|&fl| self.flows[fl as usize].src == src)
    }

    fn fill_sources(&mut self, n: u32) {
        let i = n as usize;
        if !self.fetch[i].active || !self.online(n) {
            return;
        }
        let parallel = self.sc.net.parallel_sources as usize;
        // 1. LAN members.
        let start = self.cluster[i];
        if start != NONE {
            for m in start..start + self.cluster_len[i] {
                if self.down_flows[i].len() >= parallel || self.fetch_unassigned(n) == 0 {
                    break;
                }
                if m == n || self.has_source(n, m) || self.up_count(m) >= self.slots(m) {
                    continue;
                }
                let (any, full) = self.can_serve(m, n);
                if any && (full || self.fetch[i].old_left > 0) {
                    self.start_flow(m, n, true, full);
                }
            }
        }
        // 2. DHT providers (the lookup has returned).
        if self.fetch[i].looked_up {
            let tries = self.sc.net.sample_tries;
            while self.down_flows[i].len() < parallel && self.fetch_unassigned(n) > 0 {
                let Some((src, full)) = (0..tries).find_map(|_| self.sample_provider(n)) else {
                    break;
                };
                self.start_flow(src, n, false, full);
            }
        }
        // 3. Seeds, when too few peers can serve a part.
        if self.fetch[i].looked_up {
            self.maybe_seed(n);
        }
        let f = &mut self.fetch[i];
        if !self.down_flows[i].is_empty() {
            f.retries = 0;
        } else if self.flags[i] & F_WAIT_SEED == 0 && f.active && !f.retry_pending {
            // Nothing flows and no seed is coming: try again later, backing off.
            let wait = self.sc.net.dial_timeout_s.max(0.001) * f64::from(1u32 << f.retries.min(6));
            f.retries += 1;
            f.retry_pending = true;
            let epoch = f.epoch;
            self.push(self.now + wait, Ev::Retry { node: n, epoch });
        }
    }

    fn fetch_unassigned(&self, n: u32) -> u64 {
        let f = &self.fetch[n as usize];
        f.old_left + f.new_left
    }

    fn up_count(&self, n: u32) -> u32 {
        let c = self.n_up[n as usize];
        u32::from(c[0]) + u32::from(c[1])
    }

    /// One draw from the provider records of the fetch's target (and target − 1 when the old
    /// part is still open): the source and whether it can send the new part too. Failed dials
    /// (NAT, stale record) count and return None.
    fn sample_provider(&mut self, n: u32) -> Option<(u32, bool)> {
        let f = &self.fetch[n as usize];
        let (c, g) = (f.closure, f.target);
        let vt = self.version(c, g);
        let old_open = f.old_left > 0 && g >= 1;
        let vo = if old_open { self.version(c, g - 1) } else { vt };
        let live_t = self.holders[vt].len() as u64;
        let (live_o, stale_o) = if old_open {
            (self.holders[vo].len() as u64, u64::from(self.stale[vo]))
        } else {
            (0, 0)
        };
        let stale = u64::from(self.stale[vt]) + stale_o;
        let total = live_t + live_o + stale;
        if total == 0 {
            return None;
        }
        let r = self.r_sel.below(total);
        if r >= live_t + live_o {
            self.dial_failures += 1;
            return None;
        }
        let src = if r < live_t {
            self.holders[vt][r as usize]
        } else {
            self.holders[vo][(r - live_t) as usize]
        };
        if src == n || self.has_source(n, src) || self.up_count(src) >= self.slots(src) {
            return None;
        }
        let (any, full) = self.can_serve(src, n);
        if !any || (!full && self.fetch[n as usize].old_left == 0) {
            return None;
        }
        let same_lan = self.cluster[n as usize] != NONE
            && self.cluster[n as usize] == self.cluster[src as usize];
        if !same_lan
            && self.flags[src as usize] & F_NAT != 0
            && !self.r_sel.chance(self.sc.net.holepunch_success)
        {
            self.dial_failures += 1;
            return None;
        }
        Some((src, full))
    }

    fn maybe_seed(&mut self, n: u32) {
        let i = n as usize;
        let want = self.sc.net.seed_if_fewer_than as usize;
        if want == 0 || self.flags[i] & F_WAIT_SEED != 0 {
            return;
        }
        let mut peers_full = 0;
        let mut peers_any = 0;
        let mut peer_rate = 0.0;
        let mut has_seed = false;
        for &fl in &self.down_flows[i] {
            let f = &self.flows[fl as usize];
            if self.is_seed(f.src) {
                has_seed = true;
            } else {
                peers_any += 1;
                peer_rate += f.rate;
                if f.full {
                    peers_full += 1;
                }
            }
        }
        if has_seed {
            return;
        }
        let f = &self.fetch[i];
        let few = (f.new_left > 0 && peers_full < want) || (f.old_left > 0 && peers_any < want);
        let floor = self.sc.net.seed_if_peers_below_mbps * 1e6 / 8.0;
        let slow = floor > 0.0 && peers_any > 0 && peer_rate < floor && f.old_left + f.new_left > 0;
        if !(few || slow) || self.down_flows[i].len() > self.sc.net.parallel_sources as usize {
            return;
        }
        if slow {
            self.fetch[i].seed_boost = true;
        }
        // The seed with the fewest uploads, if it has a free slot.
        let mut best = None;
        let mut best_count = u32::MAX;
        for &s in &self.seeds {
            let cnt = self.up_count(s);
            if cnt < best_count {
                best_count = cnt;
                best = Some(s);
            }
        }
        match best {
            Some(s) if best_count < self.sc.net.seed_slots => {
                self.start_flow(s, n, false, true);
            }
            _ => {
                self.flags[i] |= F_WAIT_SEED;
                self.seed_queue.push_back(n);
            }
        }
    }

    /// Takes the next piece for a flow from `src`: the new part first when the source can send
    /// it. A seed is the last resort: it sends old-part bytes only while no peer flow is open,
    /// or when it was called in because the peers were too slow.
    fn take_piece(&mut self, src: u32, dst: u32, full: bool) -> Option<(bool, u64)> {
        let piece = (self.sc.net.piece_mib * 1024.0 * 1024.0) as u64;
        let seed_src = self.is_seed(src);
        let peers_open = seed_src
            && !self.fetch[dst as usize].seed_boost
            && self.down_flows[dst as usize]
                .iter()
                .any(|&fl| !self.is_seed(self.flows[fl as usize].src));
        let f = &mut self.fetch[dst as usize];
        if full && f.new_left > 0 {
            let b = piece.min(f.new_left).max(1);
            f.new_left -= b;
            Some((true, b))
        } else if f.old_left > 0 && !peers_open {
            let b = piece.min(f.old_left).max(1);
            f.old_left -= b;
            Some((false, b))
        } else {
            None
        }
    }

    fn alloc_flow(&mut self, fl: Flow) -> u32 {
        if let Some(id) = self.free_flows.pop() {
            let epoch = self.flows[id as usize].epoch.wrapping_add(1);
            self.flows[id as usize] = Flow { epoch, ..fl };
            id
        } else {
            self.flows.push(fl);
            (self.flows.len() - 1) as u32
        }
    }

    fn start_flow(&mut self, src: u32, dst: u32, lan: bool, full: bool) {
        let Some((new_part, bytes)) = self.take_piece(src, dst, full) else {
            return;
        };
        let (any, can_full) = self.can_serve(src, dst);
        if !any || (new_part && !can_full) || !self.online(src) {
            self.serve_violations += 1;
        }
        let id = self.alloc_flow(Flow {
            src,
            dst,
            lan,
            new_part,
            full,
            rate: 0.0,
            piece_total: bytes,
            piece_credited: 0,
            piece_moved: 0.0,
            last_t: self.now,
            epoch: 0,
            alive: true,
        });
        let k = usize::from(lan);
        self.up_flows[src as usize].push(id);
        self.down_flows[dst as usize].push(id);
        self.n_up[src as usize][k] += 1;
        self.n_down[dst as usize][k] += 1;
        self.rerate_node(src, true);
        self.rerate_node(dst, false);
    }

    /// Capacity of one of `n`'s links, bytes/s: the LAN link, else its uplink or downlink.
    fn link_cap(&self, n: u32, up: bool, lan: bool) -> f32 {
        let i = n as usize;
        if lan {
            self.lan_bps[i]
        } else if up {
            self.up_bps[i]
        } else {
            self.down_bps[i]
        }
    }

    /// A flow's share of one of `n`'s links.
    fn share(&self, n: u32, up: bool, lan: bool) -> f64 {
        let (i, k) = (n as usize, usize::from(lan));
        let q = if up {
            self.q_up[i][k]
        } else {
            self.q_down[i][k]
        };
        f64::from(self.link_cap(n, up, lan)) / f64::from(q.max(1))
    }

    fn settle(&mut self, id: u32) {
        let now = self.now;
        let fl = &mut self.flows[id as usize];
        let dt = now - fl.last_t;
        fl.last_t = now;
        if dt <= 0.0 || fl.rate <= 0.0 {
            return;
        }
        fl.piece_moved = (fl.piece_moved + fl.rate * dt).min(fl.piece_total as f64);
        let whole = (fl.piece_moved.floor() as u64).min(fl.piece_total);
        let credit = whole - fl.piece_credited;
        fl.piece_credited = whole;
        let (src, dst) = (fl.src, fl.dst);
        self.credit(src, dst, credit);
    }

    fn credit(&mut self, src: u32, dst: u32, bytes: u64) {
        if bytes == 0 {
            return;
        }
        if self.sc.checks && !(self.online(src) && self.can_serve(src, dst).0) {
            // Bytes credited from a node that could not serve them at this instant.
            self.serve_violations += 1;
        }
        self.sent[src as usize] += bytes;
        self.recv[dst as usize] += bytes;
        self.delivered += bytes;
        let c = self.fetch[dst as usize].closure as usize;
        self.by_closure_delivered[c] += bytes;
        if self.is_seed(src) {
            self.seed_sent += bytes;
            self.by_closure_seed[c] += bytes;
        }
    }

    fn settle_node(&mut self, n: u32) {
        let ups = std::mem::take(&mut self.up_flows[n as usize]);
        for &id in &ups {
            self.settle(id);
        }
        self.up_flows[n as usize] = ups;
        let downs = std::mem::take(&mut self.down_flows[n as usize]);
        for &id in &downs {
            self.settle(id);
        }
        self.down_flows[n as usize] = downs;
    }

    fn settle_all(&mut self) {
        for id in 0..self.flows.len() as u32 {
            if self.flows[id as usize].alive {
                self.settle(id);
            }
        }
    }

    /// Updates the node's link divisors; rates change only if one moved (then every flow of the
    /// node on that side is re-rated), otherwise only its new flows get a rate.
    fn rerate_node(&mut self, n: u32, up: bool) {
        let i = n as usize;
        let mut moved = false;
        for k in 0..2 {
            let (cnt, q) = if up {
                (self.n_up[i][k], &mut self.q_up[i][k])
            } else {
                (self.n_down[i][k], &mut self.q_down[i][k])
            };
            let next = next_divisor(u32::from(cnt), *q);
            if next != *q {
                *q = next;
                moved = true;
            }
        }
        let list = if up {
            std::mem::take(&mut self.up_flows[i])
        } else {
            std::mem::take(&mut self.down_flows[i])
        };
        for &id in &list {
            if moved || self.flows[id as usize].rate == 0.0 {
                self.rerate(id);
            }
        }
        if self.sc.checks {
            for lan in [false, true] {
                let sum: f64 = list
                    .iter()
                    .map(|&id| &self.flows[id as usize])
                    .filter(|f| f.lan == lan)
                    .map(|f| f.rate)
                    .sum();
                if sum > f64::from(self.link_cap(n, up, lan)) * (1.0 + 1e-9) {
                    self.capacity_violations += 1;
                }
            }
        }
        if up {
            self.up_flows[n as usize] = list;
        } else {
            self.down_flows[n as usize] = list;
        }
    }

    fn rerate(&mut self, id: u32) {
        let (src, dst, lan) = {
            let f = &self.flows[id as usize];
            (f.src, f.dst, f.lan)
        };
        let rate = self.share(src, true, lan).min(self.share(dst, false, lan));
        if rate == self.flows[id as usize].rate {
            return;
        }
        self.settle(id);
        let fl = &mut self.flows[id as usize];
        fl.rate = rate;
        fl.epoch = fl.epoch.wrapping_add(1);
        let left = fl.piece_total as f64 - fl.piece_moved;
        let epoch = fl.epoch;
        if rate > 0.0 {
            let t = self.now + left.max(0.0) / rate;
            self.push(t, Ev::FlowDone { flow: id, epoch });
        }
    }

    fn piece_done(&mut self, id: u32) {
        self.settle(id);
        // Credit what the float settle left of the piece (it stops at whole bytes).
        let (src, dst, full, rest) = {
            let f = &mut self.flows[id as usize];
            let rest = f.piece_total - f.piece_credited;
            f.piece_credited = f.piece_total;
            f.piece_moved = f.piece_total as f64;
            (f.src, f.dst, f.full, rest)
        };
        self.credit(src, dst, rest);
        // Next piece from the same source, if any.
        let (still_any, still_full) = self.can_serve(src, dst);
        let next = if still_any && self.online(src) {
            self.take_piece(src, dst, full && still_full)
        } else {
            None
        };
        match next {
            Some((new_part, bytes)) => {
                let now = self.now;
                let fl = &mut self.flows[id as usize];
                fl.new_part = new_part;
                fl.piece_total = bytes;
                fl.piece_credited = 0;
                fl.piece_moved = 0.0;
                fl.last_t = now;
                fl.epoch = fl.epoch.wrapping_add(1);
                let (rate, epoch) = (fl.rate, fl.epoch);
                if rate > 0.0 {
                    self.push(now + bytes as f64 / rate, Ev::FlowDone { flow: id, epoch });
                }
            }
            None => {
                self.end_flow(id);
                self.after_flow_end(src, dst);
            }
        }
    }

    fn end_flow(&mut self, id: u32) {
        let (src, dst, lan) = {
            let f = &mut self.flows[id as usize];
            f.alive = false;
            f.epoch = f.epoch.wrapping_add(1);
            (f.src, f.dst, f.lan)
        };
        let k = usize::from(lan);
        remove_from(&mut self.up_flows[src as usize], id);
        remove_from(&mut self.down_flows[dst as usize], id);
        self.n_up[src as usize][k] -= 1;
        self.n_down[dst as usize][k] -= 1;
        self.free_flows.push(id);
        self.rerate_node(src, true);
        self.rerate_node(dst, false);
    }

    /// Stops a flow early: what was moved stays delivered, the rest goes back to the pool.
    fn abort_flow(&mut self, id: u32) {
        self.settle(id);
        let (src, dst, new_part, rest) = {
            let f = &self.flows[id as usize];
            (f.src, f.dst, f.new_part, f.piece_total - f.piece_credited)
        };
        {
            let f = &mut self.fetch[dst as usize];
            if new_part {
                f.new_left += rest;
            } else {
                f.old_left += rest;
            }
        }
        self.end_flow(id);
        self.after_flow_end(src, dst);
    }

    fn after_flow_end(&mut self, src: u32, dst: u32) {
        let d = dst as usize;
        if self.fetch[d].active
            && self.fetch[d].old_left == 0
            && self.fetch[d].new_left == 0
            && self.down_flows[d].is_empty()
        {
            self.complete_fetch(dst);
        } else if self.online(dst) && self.fetch[d].active {
            self.fill_sources(dst);
        }
        if self.is_seed(src) {
            self.wake_seed_waiter();
        }
    }

    fn wake_seed_waiter(&mut self) {
        while self.seed_has_free_slot() {
            let Some(n) = self.seed_queue.pop_front() else {
                return;
            };
            let i = n as usize;
            if self.flags[i] & F_WAIT_SEED == 0 || !self.online(n) || !self.fetch[i].active {
                continue;
            }
            self.flags[i] &= !F_WAIT_SEED;
            self.fill_sources(n);
        }
    }

    fn seed_has_free_slot(&self) -> bool {
        self.seeds
            .iter()
            .any(|&s| self.up_count(s) < self.sc.net.seed_slots)
    }

    fn complete_fetch(&mut self, n: u32) {
        let i = n as usize;
        let (fresh, target, closure, accum, since) = {
            let f = &mut self.fetch[i];
            f.active = false;
            f.epoch = f.epoch.wrapping_add(1);
            f.retry_pending = false;
            (f.fresh, f.target, f.closure, f.accum, f.online_since)
        };
        self.flags[i] &= !F_WAIT_SEED;
        let took = accum + (self.now - since);
        let ci = self.class[i] as usize;
        if fresh {
            self.fresh_times[ci].push(took);
            self.fresh_completions.push((self.now, n));
        } else {
            self.upgrade_times[ci].push(took);
        }
        let v = self.version(closure, target);
        if !self.first_done[v] {
            self.first_done[v] = true;
            let size = self.closure_bytes[closure as usize] as f64;
            if target >= 1 {
                self.seed_lower_bound += (size * self.new_frac[target as usize]).floor() as u64;
            } else if self.warm_holders[closure as usize] == 0 {
                self.seed_lower_bound += size as u64;
            }
        }
        // Hold the new generation, drop the old one (uploads so far were of the old one).
        self.settle_node(n);
        let old_changed = self.held[i] != target;
        self.remove_holder(n);
        let keys_new = if self.held[i] >= 0 {
            let changed = self.changed_frac[target as usize];
            let nars = (self.closure_nars[closure as usize] as f64 * changed).ceil() as u64;
            match self.sc.dht.announce {
                Announce::Roots => nars,
                Announce::All => {
                    nars + self.chunks_in(
                        self.closure_bytes[closure as usize] as f64
                            * self.new_frac[target as usize],
                    )
                }
            }
        } else {
            self.keys_of(closure)
        };
        self.held[i] = target;
        if self.online(n) {
            self.add_holder(n);
            if self.flags[i] & F_SERVES != 0 {
                self.count_announce(keys_new);
                self.announced_at[i] = self.now as f32;
            }
        }
        if old_changed {
            // Uploads this node was making of the generation it dropped may no longer be servable.
            let ups: Vec<u32> = self.up_flows[i].clone();
            for id in ups {
                if !self.flows[id as usize].alive {
                    continue;
                }
                let dst = self.flows[id as usize].dst;
                let (any, full) = self.can_serve(n, dst);
                if !any {
                    self.abort_flow(id);
                } else {
                    self.flows[id as usize].full = full;
                }
            }
        }
        if self.kind(n) == Kind::Ci {
            if self.flags[i] & F_LEAVE_AFTER != 0 {
                self.go_offline(n);
            }
            return;
        }
        if self.online(n) && self.flags[i] & F_PENDING != 0 && self.latest > target {
            self.start_fetch(n);
        }
    }

    // ---------------------------------------------------------------- DHT probes

    fn probe_place(&mut self) {
        let k = self.sc.dht.k as usize;
        let mut out = Vec::new();
        let mut holders = Vec::with_capacity(self.sc.dht.probe_keys as usize);
        for _ in 0..self.sc.dht.probe_keys {
            let key = self.r_dht.next_u64();
            let flags = &self.flags;
            self.servers
                .closest_online(key, k, |nd| flags[nd as usize] & F_ONLINE != 0, &mut out);
            holders.push(out.clone());
        }
        self.probe = Probe { holders };
        self.push(self.now + self.sc.dht.probe_age_h * 3600.0, Ev::ProbeCheck);
    }

    fn probe_check(&mut self) {
        let mut alive = 0usize;
        let mut on = 0usize;
        let mut all = 0usize;
        for h in &self.probe.holders {
            let up = h.iter().filter(|&&nd| self.online(nd)).count();
            if up > 0 {
                alive += 1;
            }
            on += up;
            all += h.len();
        }
        let keys = self.probe.holders.len().max(1);
        self.probe_result = Some((alive as f64 / keys as f64, on as f64 / all.max(1) as f64));
    }

    // ---------------------------------------------------------------- sampling and results

    fn sample_row(&mut self) {
        let ttl = self.sc.dht.record_ttl_h * 3600.0;
        for s in &mut self.stale {
            *s = 0;
        }
        let mut online_nodes = 0u64;
        let mut online_servers = 0u64;
        let mut active = 0u64;
        let mut records = 0u64;
        let mut stored = 0f64;
        let mut non_seed = 0u64;
        for i in 0..self.class.len() {
            let f = self.flags[i];
            let online = f & F_ONLINE != 0;
            if online && f & F_NAT == 0 && self.kind(i as u32) != Kind::Ci {
                online_servers += 1;
            }
            if f & F_SEED != 0 {
                continue;
            }
            non_seed += 1;
            if online {
                online_nodes += 1;
            }
            if self.fetch[i].active {
                active += 1;
            }
            if self.held[i] >= 0 {
                let c = self.closure[i];
                stored += self.closure_bytes[c as usize] as f64;
                if f & F_SERVES != 0 {
                    if online {
                        records += self.keys_of(c);
                    } else if f64::from(self.announced_at[i]) + ttl > self.now {
                        records += self.keys_of(c);
                        let v = self.version(c, self.held[i]);
                        self.stale[v] += 1;
                    }
                }
            }
        }
        let k = u64::from(self.sc.dht.k).min(online_servers.max(1));
        let per_server = (records * k) as f64 / online_servers.max(1) as f64;
        let (t0, d0, s0, l0, a0) = self.last_sample;
        let dt = self.now - t0;
        let dd = self.delivered - d0;
        let ds = self.seed_sent - s0;
        let dl = self.lookup_msgs - l0;
        let da = self.announce_msgs - a0;
        if dt > 0.0 {
            self.server_time += online_servers as f64 * dt;
            self.records_time += per_server * dt;
        }
        let per_s = |x: u64| {
            if dt > 0.0 {
                x as f64 / online_servers.max(1) as f64 / dt
            } else {
                0.0
            }
        };
        self.samples.push(SampleRow {
            t_h: self.now / 3600.0,
            online_nodes,
            online_servers,
            active_fetches: active,
            delivered_bytes: dd,
            seed_bytes: ds,
            seed_share: if dd > 0 { ds as f64 / dd as f64 } else { 0.0 },
            seed_share_cum: if self.delivered > 0 {
                self.seed_sent as f64 / self.delivered as f64
            } else {
                0.0
            },
            dht_records_per_server: per_server,
            lookup_msgs_per_server_per_s: per_s(dl),
            announce_msgs_per_server_per_s: per_s(da),
            stored_bytes_per_node: stored / non_seed.max(1) as f64,
        });
        self.last_sample = (
            self.now,
            self.delivered,
            self.seed_sent,
            self.lookup_msgs,
            self.announce_msgs,
        );
    }

    fn finish(mut self) -> Outcome {
        // (nodes, sent, received) per class, in one pass over the nodes.
        let mut totals = vec![(0u64, 0u64, 0u64); self.classes.len()];
        for (i, &ci) in self.class.iter().enumerate() {
            let t = &mut totals[ci as usize];
            t.0 += 1;
            t.1 += self.sent[i];
            t.2 += self.recv[i];
        }
        let mut fresh_all: Vec<f64> = Vec::new();
        let mut upg_all: Vec<f64> = Vec::new();
        let mut classes = Vec::with_capacity(self.classes.len());
        for (ci, cl) in self.classes.iter().enumerate() {
            let mut fr = std::mem::take(&mut self.fresh_times[ci]);
            let mut up = std::mem::take(&mut self.upgrade_times[ci]);
            fr.sort_by(f64::total_cmp);
            up.sort_by(f64::total_cmp);
            let (nodes, sent, recv) = totals[ci];
            classes.push(ClassStats {
                class: cl.rc.cfg.name.clone(),
                nodes,
                fresh_fetches: fr.len() as u64,
                fresh_p50_s: percentile(&fr, 0.50),
                fresh_p95_s: percentile(&fr, 0.95),
                fresh_p99_s: percentile(&fr, 0.99),
                upgrade_fetches: up.len() as u64,
                upgrade_p50_s: percentile(&up, 0.50),
                upgrade_p95_s: percentile(&up, 0.95),
                upgrade_p99_s: percentile(&up, 0.99),
                sent_bytes: sent,
                received_bytes: recv,
            });
            fresh_all.extend(fr);
            upg_all.extend(up);
        }
        fresh_all.sort_by(f64::total_cmp);
        upg_all.sort_by(f64::total_cmp);
        let popular = self.sc.workload.popular_closures as usize;
        let pop_d: u64 = self.by_closure_delivered.iter().take(popular).sum();
        let pop_s: u64 = self.by_closure_seed.iter().take(popular).sum();
        let sum_up: f64 = self.up_bps.iter().map(|&x| f64::from(x)).sum();
        let seed_up: f64 = self
            .seeds
            .iter()
            .map(|&s| f64::from(self.up_bps[s as usize]))
            .sum();
        let min_down = (0..self.class.len())
            .filter(|&i| self.flags[i] & F_SEED == 0)
            .map(|i| f64::from(self.down_bps[i]))
            .fold(f64::INFINITY, f64::min);
        let generations: f64 = 1.0 + self.new_frac[1..].iter().sum::<f64>();
        let seed_stored: f64 = self
            .closure_bytes
            .iter()
            .map(|&b| b as f64 * generations)
            .sum();
        let non_seed = (self.class.len() - self.seeds.len()) as u64;
        let stored_end = self.samples.last().map_or(0.0, |s| s.stored_bytes_per_node);
        let sim_seconds = self.end;
        Outcome {
            mode: "model",
            name: self.sc.name.clone(),
            nodes: non_seed,
            seeds: self.seeds.len() as u64,
            seed: self.seed,
            sim_seconds,
            delivered_bytes: self.delivered,
            sent_bytes: self.sent.iter().sum(),
            seed_egress_bytes: self.seed_sent,
            popular_delivered_bytes: pop_d,
            popular_seed_bytes: pop_s,
            fresh_times: fresh_all,
            upgrade_times: upg_all,
            fresh_completions: self.fresh_completions,
            classes,
            lookup_msgs: self.lookup_msgs,
            announce_msgs: self.announce_msgs,
            mean_online_servers: self.server_time / sim_seconds,
            mean_records_per_server: self.records_time / sim_seconds,
            stored_bytes_per_node: stored_end,
            seed_lower_bound_bytes: self.seed_lower_bound,
            seed_stored_bytes: seed_stored as u64,
            serve_violations: self.serve_violations,
            capacity_violations: self.capacity_violations,
            capacity: (sum_up, seed_up, min_down),
            closure_bytes: self.closure_bytes,
            probe_survival: self.probe_result.map(|p| p.0),
            probe_holder_online: self.probe_result.map(|p| p.1),
            dial_failures: self.dial_failures,
            events: self.events,
            unfinished_fetches: self.fetch.iter().filter(|f| f.active).count() as u64,
            samples: self.samples,
        }
    }
}

/// The divisor a link is shared by, given `n` flows on it and the current divisor `q`.
///
/// Up to 8 flows share exactly (q = n). Beyond that q is n + 10 % and is moved only when n
/// exceeds it or falls below q / 1.21: a busy seed's flows are then re-rated once per ~10 %
/// change in its flow count instead of at every flow start and end (amortised O(1) instead of
/// O(n) per event). Because q ≥ n, a link never carries more than its capacity; up to 17 % of a
/// busy link can go unused.
pub fn next_divisor(n: u32, q: u32) -> u32 {
    if n <= 8 {
        n
    } else if n > q || f64::from(n) < f64::from(q) / 1.21 {
        (f64::from(n) * 1.1).ceil() as u32
    } else {
        q
    }
}

fn remove_from(list: &mut Vec<u32>, id: u32) {
    if let Some(p) = list.iter().position(|&x| x == id) {
        list.swap_remove(p);
    }
}

/// Mean online-session length, hours.
pub fn mean_session_h(s: &crate::scenario::SessionModel) -> f64 {
    match s.dist {
        SessionDist::Always => f64::INFINITY,
        SessionDist::Exp => s.mean_h,
        SessionDist::Weibull => s.scale_h * gamma(1.0 + 1.0 / s.shape),
    }
}

/// Γ(x) for x > 0 (Lanczos approximation, g = 7).
pub fn gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x))
    } else {
        let x = x - 1.0;
        let mut a = G[0];
        let t = x + 7.5;
        for (i, g) in G.iter().enumerate().skip(1) {
            a += g / (x + i as f64);
        }
        (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisor_never_below_flow_count_and_moves_rarely() {
        let mut q = 0;
        let mut moves = 0;
        // Up to 400 flows and back down, one at a time.
        let path: Vec<u32> = (0..=400).chain((0..400).rev()).collect();
        for &n in &path {
            let next = next_divisor(n, q);
            if next != q {
                moves += 1;
            }
            q = next;
            assert!(q >= n, "q {q} < n {n}");
            if n <= 8 {
                assert_eq!(q, n);
            } else {
                assert!(
                    f64::from(n) >= f64::from(q) / 1.21 - 1.0,
                    "q {q} too far above n {n}"
                );
            }
        }
        assert!(moves < 120, "{moves} re-ratings for {} changes", path.len());
    }

    #[test]
    fn gamma_matches_known_values() {
        assert!((gamma(5.0) - 24.0).abs() < 1e-9);
        assert!((gamma(0.5) - std::f64::consts::PI.sqrt()).abs() < 1e-9);
    }
}
