//! `nix-p2p-cache doctor`: the checks of what usually keeps Nix from using the daemon, each a
//! [`Check`] saying ok, warn, fail or skip, what it found and what to change.
//!
//! Owns the diagnosis only: it reads the daemon's `/nix-cache-info` and `/api/status`, Nix's
//! settings and narinfo disk cache (`nix.rs`), the system's ports, disk space and the
//! upstreams' clocks (`system.rs`), and changes nothing. It runs in the CLI process: the
//! blocking reads (`nix show-config`, `sqlite3`, `statvfs`) happen between its awaits, with
//! nothing else on the runtime.

mod nix;
mod system;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::DaemonConfig;
use crate::core::human_bytes as human;
pub use nix::{NixConfig, NixReadError};

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but something should change.
    Warn,
    /// Keeps Nix from using the daemon (or the daemon from working).
    Fail,
    /// Could not be checked; the detail says why.
    Skip,
}

impl Status {
    /// As printed: `ok`, `warn`, `FAIL`, `skip`.
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// A stable name: `daemon`, `http-port`, `substituters`, `substituter-order`,
    /// `trusted-keys`, `narinfo-cache`, `p2p-ports`, `reachability`, `clock`, `disk-space`,
    /// `open-files`.
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to change (fail and warn).
    pub fix: Option<String>,
}

impl Check {
    fn new(check: &'static str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            check,
            status,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = Some(fix.into());
        self
    }
}

/// The process exit status for a report: 0 when every check is ok (or skipped), 1 when one
/// failed, 3 when some only warn (2 is a usage error).
pub fn exit_code(checks: &[Check]) -> u8 {
    if checks.iter().any(|c| c.status == Status::Fail) {
        1
    } else if checks.iter().any(|c| c.status == Status::Warn) {
        3
    } else {
        0
    }
}

/// What to diagnose.
pub struct Options {
    /// The daemon's base URL, e.g. `http://127.0.0.1:7420`.
    pub url: String,
    /// The daemon's config file, if given: its ports and data dir are checked when the daemon
    /// does not answer.
    pub config: Option<DaemonConfig>,
}

/// Below this much free space (or [`MIN_FREE_PERCENT`]) the data dir's disk is a warning.
pub const MIN_FREE_BYTES: u64 = 1 << 30;
pub const MIN_FREE_PERCENT: f64 = 5.0;
/// A daemon serving peers with a lower soft open-files limit is a warning.
pub const MIN_OPEN_FILES: u64 = 4096;
/// A clock this far from an upstream's is a warning; [`CLOCK_FAIL`], a failure.
pub const CLOCK_WARN: Duration = Duration::from_secs(60);
pub const CLOCK_FAIL: Duration = Duration::from_secs(3600);
/// How many of Nix's remembered misses are asked of the daemon again, for how long at most.
const MAX_MISSES_ASKED: usize = 50;
const MISSES_DEADLINE: Duration = Duration::from_secs(30);

const FIX_START: &str = "start it (`systemctl start nix-p2p-cache`, or `nix-p2p-cache daemon`), \
                         or give its address with --url";
const FIX_NIX_CONF: &str = "then restart nix-daemon (NixOS: services.nix-p2p-cache.\
                            addToNixSubstituters does this)";

/// Runs every check, in order.
pub async fn diagnose(opts: &Options) -> Vec<Check> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let mut out = Vec::new();
    let daemon = probe_daemon(&client, &opts.url).await;
    out.push(daemon.check.clone());
    out.push(http_port(&opts.url, &daemon));
    let nix_config = NixConfig::load();
    out.extend(substituters(&client, &opts.url, &daemon, &nix_config).await);
    out.push(trusted_keys(&daemon, &nix_config));
    out.push(narinfo_cache(&client, &opts.url, &daemon, &nix_config).await);
    out.push(p2p_ports(&daemon, opts.config.as_ref()));
    out.push(reachability(&daemon));
    out.push(clock(&client, &daemon).await);
    out.push(disk_space(&daemon, opts.config.as_ref()));
    out.push(open_files(&daemon));
    out
}

/// What the daemon answered.
struct Daemon {
    check: Check,
    /// `/api/status`, when it answered as nix-p2p-cache.
    status: Option<serde_json::Value>,
    /// It answered `/nix-cache-info` as a binary cache.
    answered: bool,
    /// That answer's `Priority`.
    priority: Option<i64>,
}

async fn get_text(client: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
    let resp = client.get(url).send().await.map_err(|e| cause(&e))?;
    let code = resp.status().as_u16();
    let text = resp.text().await.map_err(|e| cause(&e))?;
    Ok((code, text))
}

/// The innermost cause of an HTTP client error ("Connection refused (os error 111)"), which is
/// what an operator can act on; the URL is said by the caller.
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `Priority` of a `nix-cache-info` text.
fn cache_info_priority(text: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix("Priority:"))
        .and_then(|p| p.trim().parse().ok())
}

async fn probe_daemon(client: &reqwest::Client, url: &str) -> Daemon {
    let down = |check: Check| Daemon {
        check,
        status: None,
        answered: false,
        priority: None,
    };
    let priority = match get_text(client, &format!("{url}/nix-cache-info")).await {
        Err(e) => {
            return down(
                Check::new(
                    "daemon",
                    Status::Fail,
                    format!("nothing answers at {url}: {e}"),
                )
                .fix(FIX_START),
            )
        }
        Ok((200, text)) if text.contains("StoreDir:") => cache_info_priority(&text),
        Ok((code, _)) => {
            return down(
                Check::new(
                    "daemon",
                    Status::Fail,
                    format!(
                    "{url} answers, but not as a binary cache (GET /nix-cache-info: HTTP {code})"
                ),
                )
                .fix(format!("another program has this address: {FIX_START}")),
            )
        }
    };
    let status = match get_text(client, &format!("{url}/api/status")).await {
        Ok((200, text)) => serde_json::from_str::<serde_json::Value>(&text).ok(),
        _ => None,
    };
    let check = match &status {
        Some(s) => Check::new(
            "daemon",
            Status::Ok,
            format!(
                "nix-p2p-cache {} ({}) answers at {url}, up {} s",
                s["version"].as_str().unwrap_or("?"),
                s["role"].as_str().unwrap_or("?"),
                s["uptime_secs"].as_u64().unwrap_or(0)
            ),
        ),
        None => Check::new(
            "daemon",
            Status::Warn,
            format!("a binary cache answers at {url}, but not nix-p2p-cache's /api/status (another cache, or an older daemon)"),
        )
        .fix("point --url at nix-p2p-cache's address (`listen` of its config)"),
    };
    Daemon {
        check,
        status,
        answered: true,
        priority,
    }
}

/// `host:port` of an `http://` URL.
fn url_socket_addr(url: &str) -> Option<SocketAddr> {
    let u = reqwest::Url::parse(url).ok()?;
    let host = u.host_str()?.trim_start_matches('[').trim_end_matches(']');
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    Some(SocketAddr::new(
        host.parse().ok()?,
        u.port_or_known_default()?,
    ))
}

fn http_port(url: &str, daemon: &Daemon) -> Check {
    let Some(addr) = url_socket_addr(url) else {
        return Check::new(
            "http-port",
            Status::Skip,
            format!("{url} does not name an IP address and port"),
        );
    };
    if daemon.answered {
        return Check::new("http-port", Status::Ok, format!("{addr} answers"));
    }
    match system::port_state(addr) {
        system::PortState::Free => Check::new(
            "http-port",
            Status::Ok,
            format!("{addr} is free (nothing listens: the daemon is not running there)"),
        ),
        system::PortState::InUse => Check::new(
            "http-port",
            Status::Fail,
            format!("{addr} is taken by a program that does not answer as a binary cache"),
        )
        .fix(format!(
            "find it (`ss -ltnp 'sport = :{}'`) and stop it, or give the daemon another `listen`",
            addr.port()
        )),
        system::PortState::Unusable(e) => {
            Check::new("http-port", Status::Skip, format!("{addr}: {e}"))
        }
    }
}

/// A substituter URL as Nix compares stores: scheme, host (`localhost` as `127.0.0.1`), port
/// and path without a trailing `/`, query parameters dropped.
fn cache_key(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let host = match u.host_str() {
                Some("localhost") => "127.0.0.1",
                Some(h) => h,
                None => "",
            };
            format!(
                "{}://{host}:{}{}",
                u.scheme(),
                u.port_or_known_default().unwrap_or(0),
                u.path().trim_end_matches('/')
            )
        }
        Err(_) => url.trim_end_matches('/').to_string(),
    }
}

fn same_cache(a: &str, b: &str) -> bool {
    cache_key(a) == cache_key(b)
}

/// `?priority=N` of a substituter URL.
fn url_priority(url: &str) -> Option<i64> {
    let u = reqwest::Url::parse(url).ok()?;
    let p = u
        .query_pairs()
        .find(|(k, _)| k == "priority")
        .map(|(_, v)| v.to_string())?;
    p.parse().ok()
}

/// The priority Nix gives another substituter: `?priority=`, else its `nix-cache-info`'s;
/// `None` when it cannot be read (Nix then disables that substituter).
async fn other_priority(client: &reqwest::Client, url: &str) -> Option<i64> {
    if let Some(p) = url_priority(url) {
        return Some(p);
    }
    let u = reqwest::Url::parse(url).ok()?;
    let base = url.split('?').next().unwrap_or(url).trim_end_matches('/');
    match u.scheme() {
        "http" | "https" => match get_text(client, &format!("{base}/nix-cache-info")).await {
            Ok((200, text)) => cache_info_priority(&text).or(Some(0)),
            _ => None,
        },
        "file" => std::fs::read_to_string(std::path::Path::new(u.path()).join("nix-cache-info"))
            .ok()
            .map(|t| cache_info_priority(&t).unwrap_or(0)),
        _ => None,
    }
}

async fn substituters(
    client: &reqwest::Client,
    url: &str,
    daemon: &Daemon,
    nix: &NixConfig,
) -> Vec<Check> {
    let subs = nix.list("substituters");
    let Some(pos) = subs.iter().position(|s| same_cache(s, url)) else {
        let trusted_only = nix
            .list("trusted-substituters")
            .iter()
            .any(|s| same_cache(s, url));
        let detail = format!(
            "{url} is not in Nix's substituters ({}: {}){}",
            nix.source,
            if subs.is_empty() {
                "none".to_string()
            } else {
                subs.join(" ")
            },
            if trusted_only {
                "; it is in trusted-substituters, used only when a command asks for it"
            } else {
                ""
            }
        );
        return vec![
            Check::new("substituters", Status::Fail, detail).fix(format!(
                "in nix.conf: `substituters = {}`; {FIX_NIX_CONF}",
                std::iter::once(url.to_string())
                    .chain(subs.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            Check::new(
                "substituter-order",
                Status::Skip,
                "the daemon is not a substituter",
            ),
        ];
    };
    let listed = Check::new(
        "substituters",
        Status::Ok,
        format!("{} is in Nix's substituters ({})", subs[pos], nix.source),
    );
    // Nix asks substituters in the order of their priority (lower first), the listed order
    // among equals (a stable sort).
    let mine = url_priority(&subs[pos]).or(daemon.priority);
    let Some(mine) = mine else {
        return vec![
            listed,
            Check::new(
                "substituter-order",
                Status::Skip,
                "the daemon's priority is unknown (it does not answer)",
            ),
        ];
    };
    let mut ahead = Vec::new();
    let mut unknown = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        if i == pos {
            continue;
        }
        match other_priority(client, s).await {
            Some(p) if p < mine || (p == mine && i < pos) => ahead.push(format!("{s} ({p})")),
            Some(_) => {}
            None => unknown.push(s.clone()),
        }
    }
    let unknown_note = if unknown.is_empty() {
        String::new()
    } else {
        format!("; not reachable, so not counted: {}", unknown.join(" "))
    };
    let order = if ahead.is_empty() {
        Check::new(
            "substituter-order",
            Status::Ok,
            format!("Nix asks the daemon first (priority {mine}){unknown_note}"),
        )
    } else {
        let bare = subs[pos]
            .split('?')
            .next()
            .unwrap_or(&subs[pos])
            .to_string();
        Check::new(
            "substituter-order",
            Status::Fail,
            format!(
                "Nix asks {} before the daemon (priority {mine}; Nix asks lower priorities first, the listed order among equals){unknown_note}",
                ahead.join(", ")
            ),
        )
        .fix(format!(
            "list the daemon first with a lower priority: `substituters = {bare}?priority=10 …`; {FIX_NIX_CONF}"
        ))
    };
    vec![listed, order]
}

fn trusted_keys(daemon: &Daemon, nix: &NixConfig) -> Check {
    let Some(keys) = daemon
        .status
        .as_ref()
        .filter(|s| s["trusted_public_keys"].is_array())
        .map(|s| strings(s, "trusted_public_keys"))
    else {
        return Check::new(
            "trusted-keys",
            Status::Skip,
            "the daemon's trusted keys are unknown (no /api/status, or a daemon older than this command)",
        );
    };
    if nix.get("require-sigs") == Some("false") {
        return Check::new(
            "trusted-keys",
            Status::Ok,
            "Nix does not check signatures (require-sigs = false)",
        );
    }
    let nix_keys = nix.list("trusted-public-keys");
    let missing: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| !nix_keys.iter().any(|n| n == k))
        .collect();
    if missing.is_empty() {
        Check::new(
            "trusted-keys",
            Status::Ok,
            format!("Nix trusts every key the daemon trusts ({})", keys.len()),
        )
    } else {
        Check::new(
            "trusted-keys",
            Status::Fail,
            format!(
                "Nix does not trust {} of the daemon's keys: Nix refuses the paths they sign ({})",
                missing.join(" "),
                nix.source
            ),
        )
        .fix(format!(
            "in nix.conf: `extra-trusted-public-keys = {}`; {FIX_NIX_CONF}",
            missing.join(" ")
        ))
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn narinfo_cache(
    client: &reqwest::Client,
    url: &str,
    daemon: &Daemon,
    nix: &NixConfig,
) -> Check {
    let db = nix::narinfo_cache_path();
    let name = "narinfo-cache";
    if !db.is_file() {
        return Check::new(
            name,
            Status::Ok,
            format!("{} does not exist: Nix remembers no lookups", db.display()),
        );
    }
    let ttl: u64 = nix
        .get("narinfo-cache-negative-ttl")
        .and_then(|t| t.parse().ok())
        .unwrap_or(3600);
    let misses = match nix::negative_entries(&db, now_unix().saturating_sub(ttl), 100_000) {
        Ok(Some(rows)) => rows,
        Ok(None) => {
            return Check::new(
                name,
                Status::Skip,
                format!(
                    "the sqlite3 program is not installed: cannot read {}",
                    db.display()
                ),
            )
            .fix("install sqlite3 to have this checked")
        }
        Err(e) => return Check::new(name, Status::Skip, e.to_string()),
    };
    let mine: Vec<_> = misses
        .iter()
        .filter(|m| same_cache(&m.cache_url, url))
        .collect();
    if mine.is_empty() {
        return Check::new(
            name,
            Status::Ok,
            format!("{} remembers no miss of {url}", db.display()),
        );
    }
    if !daemon.answered {
        return Check::new(
            name,
            Status::Skip,
            format!(
                "{} remembers {} misses of {url} (for up to {ttl} s); whether the daemon has them now is unknown (it does not answer)",
                db.display(),
                mine.len()
            ),
        );
    }
    // A few at once, and not for longer than MISSES_DEADLINE in all (a daemon with upstreams
    // may ask them for each).
    use futures_util::StreamExt as _;
    let asks = futures_util::stream::iter(mine.iter().take(MAX_MISSES_ASKED))
        .map(|m| async move {
            match get_text(client, &format!("{url}/{}.narinfo", m.hash)).await {
                Ok((200, _)) => Some(m.hash.clone()),
                _ => None,
            }
        })
        .buffered(8)
        .take_until(tokio::time::sleep(MISSES_DEADLINE))
        .collect::<Vec<Option<String>>>()
        .await;
    let asked = asks.len();
    let hidden: Vec<String> = asks.into_iter().flatten().collect();
    if hidden.is_empty() {
        return Check::new(
            name,
            Status::Ok,
            format!(
                "{} remembers {} misses of {url}; of the {asked} asked again, the daemon has none",
                db.display(),
                mine.len(),
            ),
        );
    }
    Check::new(
        name,
        Status::Fail,
        format!(
            "Nix remembers {} paths as missing from {url} that the daemon has now (e.g. {}): Nix will not ask for them for up to {ttl} s ({})",
            hidden.len(),
            hidden[0],
            db.display()
        ),
    )
    .fix(format!(
        "delete {} (Nix recreates it; nix-daemon's is /root/.cache/nix/binary-cache-v6.sqlite), or run Nix with `--option narinfo-cache-negative-ttl 0`",
        db.display()
    ))
}

/// The strings of an array of `/api/status` (none when absent).
fn strings<'a>(status: &'a serde_json::Value, key: &str) -> Vec<&'a str> {
    status[key]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default()
}

/// The daemon's P2P listen addresses (`/api/status`), else `p2p-listen` of its config.
fn p2p_addresses(daemon: &Daemon, config: Option<&DaemonConfig>) -> Option<Vec<String>> {
    match &daemon.status {
        Some(s) => Some(
            strings(s, "p2p_addresses")
                .into_iter()
                .map(String::from)
                .collect(),
        ),
        None => config.map(|c| c.p2p_listen.clone()),
    }
}

fn p2p_ports(daemon: &Daemon, config: Option<&DaemonConfig>) -> Check {
    let name = "p2p-ports";
    let Some(addrs) = p2p_addresses(daemon, config) else {
        return Check::new(
            name,
            Status::Skip,
            "the P2P addresses are unknown (the daemon does not answer; --config names them)",
        );
    };
    if addrs.is_empty() {
        return Check::new(name, Status::Ok, "P2P is off (no p2p-listen)");
    }
    let running = daemon.status.is_some();
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for a in &addrs {
        let Some(sock) = a
            .parse::<libp2p::Multiaddr>()
            .ok()
            .as_ref()
            .and_then(system::tcp_addr)
        else {
            continue;
        };
        if running {
            match system::answers(system::reachable_locally(sock), Duration::from_secs(3)) {
                Ok(()) => good.push(sock.to_string()),
                Err(e) => bad.push(format!("{sock} does not answer: {e}")),
            }
        } else if sock.port() != 0 {
            match system::port_state(sock) {
                system::PortState::Free => good.push(sock.to_string()),
                system::PortState::InUse => bad.push(format!("{sock} is taken by another program")),
                system::PortState::Unusable(e) => bad.push(format!("{sock}: {e}")),
            }
        }
    }
    match (bad.is_empty(), running) {
        (true, true) => Check::new(name, Status::Ok, format!("answering: {}", good.join(", "))),
        (true, false) => Check::new(name, Status::Ok, format!("free: {}", good.join(", "))),
        (false, _) => Check::new(name, Status::Fail, bad.join("; ")).fix(
            "free the port (`ss -ltnp`) or give p2p-listen another one; a daemon that does not answer on its own port: restart it",
        ),
    }
}

fn reachability(daemon: &Daemon) -> Check {
    let name = "reachability";
    let Some(s) = &daemon.status else {
        return Check::new(name, Status::Skip, "unknown (the daemon does not answer)");
    };
    let addrs = strings(s, "p2p_addresses");
    if addrs.is_empty() {
        return Check::new(name, Status::Skip, "P2P is off");
    }
    let public: Vec<&str> = addrs
        .iter()
        .copied()
        .filter(|a| {
            a.parse::<libp2p::Multiaddr>()
                .ok()
                .as_ref()
                .and_then(system::tcp_addr)
                .is_some_and(|s| system::is_public(s.ip()))
        })
        .collect();
    let detail = if public.is_empty() {
        format!(
            "unknown: the node listens on no public address ({}); behind NAT, peers outside the LAN reach it only through a forwarded port (this daemon does not detect NAT yet)",
            addrs.join(", ")
        )
    } else {
        format!(
            "unknown: the node listens on public address(es) {} (whether a firewall lets peers in is not tested; this daemon does not detect NAT yet)",
            public.join(", ")
        )
    };
    Check::new(name, Status::Skip, detail)
}

async fn clock(client: &reqwest::Client, daemon: &Daemon) -> Check {
    let name = "clock";
    let Some(s) = &daemon.status else {
        return Check::new(
            name,
            Status::Skip,
            "the daemon's upstreams are unknown (it does not answer)",
        );
    };
    let ups = strings(s, "upstreams");
    if ups.is_empty() {
        return Check::new(name, Status::Skip, "no upstream to compare the clock with");
    }
    let mut errors = Vec::new();
    for up in &ups {
        let t0 = SystemTime::now();
        let resp = client
            .get(format!("{}/nix-cache-info", up.trim_end_matches('/')))
            .send()
            .await;
        let t1 = SystemTime::now();
        let date = match resp {
            Err(e) => {
                errors.push(format!("{up}: {}", cause(&e)));
                continue;
            }
            Ok(r) => r
                .headers()
                .get(reqwest::header::DATE)
                .and_then(|d| d.to_str().ok())
                .and_then(|d| httpdate::parse_http_date(d).ok()),
        };
        let Some(date) = date else {
            errors.push(format!("{up}: no Date header"));
            continue;
        };
        let mid = t0 + t1.duration_since(t0).unwrap_or_default() / 2;
        // The Date header has whole seconds: up to 1 s of the difference is its rounding.
        let (off, ahead) = match mid.duration_since(date) {
            Ok(d) => (d.saturating_sub(Duration::from_secs(1)), true),
            Err(e) => (e.duration(), false),
        };
        let say = format!(
            "this clock is {} s {} {up}'s",
            off.as_secs(),
            if ahead { "ahead of" } else { "behind" }
        );
        let fix = "set the clock right: enable NTP (`timedatectl set-ntp true`, NixOS: services.timesyncd)";
        return if off > CLOCK_FAIL {
            Check::new(
                name,
                Status::Fail,
                format!("{say}: TLS certificates and DHT record expiries go wrong"),
            )
            .fix(fix)
        } else if off > CLOCK_WARN {
            Check::new(name, Status::Warn, say).fix(fix)
        } else {
            Check::new(
                name,
                Status::Ok,
                format!("within {} s of {up}'s", CLOCK_WARN.as_secs()),
            )
        };
    }
    Check::new(
        name,
        Status::Skip,
        format!("no upstream answered with a date: {}", errors.join("; ")),
    )
}

fn disk_space(daemon: &Daemon, config: Option<&DaemonConfig>) -> Check {
    let name = "disk-space";
    let dir = daemon
        .status
        .as_ref()
        .and_then(|s| s["data_dir"].as_str().map(std::path::PathBuf::from))
        .or_else(|| config.map(|c| c.data_dir.clone()));
    let Some(dir) = dir else {
        return Check::new(
            name,
            Status::Skip,
            "the data dir is unknown (the daemon does not answer; --config names it)",
        );
    };
    let space = match system::disk_space(&dir) {
        Ok(s) => s,
        Err(e) => return Check::new(name, Status::Skip, format!("{}: {e}", dir.display())),
    };
    let pct = 100.0 * space.available as f64 / space.total.max(1) as f64;
    let detail = format!(
        "{} free of {} ({pct:.0} %) for {}",
        human(space.available),
        human(space.total),
        dir.display()
    );
    if space.available < MIN_FREE_BYTES || pct < MIN_FREE_PERCENT {
        Check::new(name, Status::Warn, detail).fix(
            "free space there, set max-cache-size (a peer evicts down to it), or run `nix-p2p-cache gc --max-size SIZE`",
        )
    } else {
        Check::new(name, Status::Ok, detail)
    }
}

fn open_files(daemon: &Daemon) -> Check {
    let name = "open-files";
    let Some(s) = &daemon.status else {
        return Check::new(
            name,
            Status::Skip,
            "the daemon's limit is unknown (it does not answer)",
        );
    };
    let Some(limit) = s["open_files_limit"].as_u64() else {
        return Check::new(
            name,
            Status::Skip,
            "the daemon does not report its limit (unlimited, or an older daemon)",
        );
    };
    let serves_peers = s["p2p"].is_object() && s["share"].as_str() != Some("none");
    let detail = format!("the daemon's soft open-files limit is {limit}");
    if limit < MIN_OPEN_FILES && serves_peers {
        Check::new(
            name,
            Status::Warn,
            format!("{detail}: a node serving peers needs one per connection and pack read (at least {MIN_OPEN_FILES})"),
        )
        .fix("raise it: LimitNOFILE=65536 in the unit (the shipped unit and the NixOS module set it), or `ulimit -n 65536` before starting the daemon")
    } else {
        Check::new(name, Status::Ok, detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_urls_match_as_nix_compares_them() {
        assert!(same_cache(
            "http://127.0.0.1:7420",
            "http://127.0.0.1:7420/"
        ));
        assert!(same_cache(
            "http://localhost:7420?priority=10",
            "http://127.0.0.1:7420"
        ));
        assert!(!same_cache(
            "http://127.0.0.1:7421",
            "http://127.0.0.1:7420"
        ));
        assert!(same_cache(
            "https://cache.nixos.org/",
            "https://cache.nixos.org:443"
        ));
        assert_eq!(url_priority("http://x:1?priority=10"), Some(10));
        assert_eq!(url_priority("http://x:1"), None);
        assert_eq!(
            cache_info_priority("StoreDir: /nix/store\nPriority: 30\n"),
            Some(30)
        );
    }

    #[test]
    fn exit_codes() {
        let c = |s| Check::new("x", s, "");
        assert_eq!(exit_code(&[c(Status::Ok), c(Status::Skip)]), 0);
        assert_eq!(exit_code(&[c(Status::Ok), c(Status::Warn)]), 3);
        assert_eq!(exit_code(&[c(Status::Warn), c(Status::Fail)]), 1);
    }
}
