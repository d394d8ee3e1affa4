//! The addresses a listening node can be reached at, as operators give them to other nodes'
//! `--bootstrap-peers`: a listener on an unspecified address (`/ip4/0.0.0.0`, `/ip6/::`) is
//! reachable at each interface's address, not at `0.0.0.0` nor only at loopback (libp2p's first
//! listen event). Reads the interface list; touches no swarm.

use std::net::IpAddr;

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

/// Where a listener asked for on `requested` that bound `bound` (its first reported address,
/// port resolved) can be reached, given this machine's interface addresses: each interface
/// address of the requested family for an unspecified address (IPv6 link-local ones left out:
/// a multiaddr cannot carry their scope), else `bound` itself. Loopback addresses come last.
pub fn reachable_at(
    requested: &Multiaddr,
    bound: &Multiaddr,
    interfaces: &[IpAddr],
) -> Vec<Multiaddr> {
    let unspecified_v4 =
        matches!(requested.iter().next(), Some(Protocol::Ip4(a)) if a.is_unspecified());
    let unspecified_v6 =
        matches!(requested.iter().next(), Some(Protocol::Ip6(a)) if a.is_unspecified());
    if !unspecified_v4 && !unspecified_v6 {
        return vec![bound.clone()];
    }
    let mut out: Vec<Multiaddr> = interfaces
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(a) if unspecified_v4 => Some(Protocol::Ip4(*a)),
            IpAddr::V6(a) if unspecified_v6 && (a.segments()[0] & 0xffc0) != 0xfe80 => {
                Some(Protocol::Ip6(*a))
            }
            _ => None,
        })
        .map(|ip| {
            // The bound address with its IP replaced: the same port and what follows.
            std::iter::once(ip).chain(bound.iter().skip(1)).collect()
        })
        .collect();
    out.dedup();
    if out.is_empty() {
        return vec![bound.clone()];
    }
    sort_loopback_last(&mut out);
    out
}

/// Orders addresses with loopback ones last (stable otherwise).
pub fn sort_loopback_last(addrs: &mut [Multiaddr]) {
    addrs.sort_by_key(|a| match a.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    });
}

/// This machine's interface addresses (empty when they cannot be listed).
pub fn interface_addresses() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(list) => list.into_iter().map(|i| i.ip()).collect(),
        Err(e) => {
            tracing::debug!(error = %e, "listing interface addresses");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn unspecified_addresses_expand_to_each_interface_loopback_last() {
        let ifs: Vec<IpAddr> = [
            "127.0.0.1",
            "192.168.1.7",
            "::1",
            "fe80::1",
            "2001:db8::7",
            "10.0.0.2",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(
            reachable_at(
                &m("/ip4/0.0.0.0/tcp/0"),
                &m("/ip4/127.0.0.1/tcp/4001"),
                &ifs
            ),
            [
                m("/ip4/192.168.1.7/tcp/4001"),
                m("/ip4/10.0.0.2/tcp/4001"),
                m("/ip4/127.0.0.1/tcp/4001")
            ]
        );
        assert_eq!(
            reachable_at(&m("/ip6/::/tcp/4001"), &m("/ip6/::1/tcp/4001"), &ifs),
            [m("/ip6/2001:db8::7/tcp/4001"), m("/ip6/::1/tcp/4001")]
        );
        // A specific address is what was bound; no interfaces: the bound address.
        assert_eq!(
            reachable_at(&m("/ip4/10.0.0.2/tcp/0"), &m("/ip4/10.0.0.2/tcp/5"), &ifs),
            [m("/ip4/10.0.0.2/tcp/5")]
        );
        assert_eq!(
            reachable_at(&m("/ip4/0.0.0.0/tcp/0"), &m("/ip4/127.0.0.1/tcp/5"), &[]),
            [m("/ip4/127.0.0.1/tcp/5")]
        );
        assert!(interface_addresses().iter().any(|ip| ip.is_loopback()));
    }
}
