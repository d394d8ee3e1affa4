//! What the operating system says: free space of a filesystem (`statvfs`), whether a TCP port
//! is free or answers, and the TCP socket address of a multiaddr.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

/// Space of the filesystem holding a path, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct DiskSpace {
    /// Available to an unprivileged user.
    pub available: u64,
    pub total: u64,
}

/// `statvfs` of `path`, or of its nearest existing ancestor (a data dir not created yet).
pub fn disk_space(path: &Path) -> std::io::Result<DiskSpace> {
    use std::os::unix::ffi::OsStrExt as _;
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory of the size
    // statvfs fills; it is read only after statvfs reported success.
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        st.assume_init()
    };
    // The field types are narrower than u64 on some targets.
    #[allow(clippy::useless_conversion)]
    let (frsize, bavail, blocks) = (
        u64::from(st.f_frsize),
        u64::from(st.f_bavail),
        u64::from(st.f_blocks),
    );
    Ok(DiskSpace {
        available: bavail.saturating_mul(frsize),
        total: blocks.saturating_mul(frsize),
    })
}

/// Whether something listens on a TCP address.
#[derive(Debug, PartialEq, Eq)]
pub enum PortState {
    /// Nothing listens: it could be bound.
    Free,
    /// Bound by some process.
    InUse,
    /// Could not be bound for another reason (the text says which).
    Unusable(String),
}

/// Tries to bind `addr` (released at once).
pub fn port_state(addr: SocketAddr) -> PortState {
    match TcpListener::bind(addr) {
        Ok(_) => PortState::Free,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => PortState::InUse,
        Err(e) => PortState::Unusable(e.to_string()),
    }
}

/// Whether a TCP connection to `addr` is accepted within `timeout`.
pub fn answers(addr: SocketAddr, timeout: Duration) -> Result<(), std::io::Error> {
    TcpStream::connect_timeout(&addr, timeout).map(drop)
}

/// The TCP address of an `/ip4|ip6/…/tcp/…` multiaddr.
pub fn tcp_addr(m: &Multiaddr) -> Option<SocketAddr> {
    let mut ip = None;
    let mut port = None;
    for p in m.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
            Protocol::Tcp(t) => port = Some(t),
            _ => {}
        }
    }
    Some(SocketAddr::new(ip?, port?))
}

/// Where to connect to reach a listener on `addr` from this machine: an unspecified address
/// (`0.0.0.0`, `::`) through loopback.
pub fn reachable_locally(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(a) if a.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(a) if a.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// Whether an address is publicly routable (not loopback, private, link-local, CGNAT, ULA,
/// documentation or unspecified).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_documentation()
                || a.is_broadcast()
                || (o[0] == 100 && (64..128).contains(&o[1])))
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let m: Multiaddr =
            "/ip4/0.0.0.0/tcp/4001/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
                .parse()
                .unwrap();
        let a = tcp_addr(&m).unwrap();
        assert_eq!(a.to_string(), "0.0.0.0:4001");
        assert_eq!(reachable_locally(a).to_string(), "127.0.0.1:4001");
        assert!(tcp_addr(&"/ip4/1.2.3.4/udp/1".parse().unwrap()).is_none());
        for (ip, public) in [
            ("192.168.1.2", false),
            ("10.0.0.1", false),
            ("100.64.0.1", false),
            ("127.0.0.1", false),
            ("8.8.8.8", true),
            ("fd00::1", false),
            ("fe80::1", false),
            ("2a01:4f8::1", true),
        ] {
            assert_eq!(is_public(ip.parse().unwrap()), public, "{ip}");
        }
    }

    #[test]
    fn ports_and_space() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(port_state(addr), PortState::InUse);
        answers(addr, Duration::from_secs(5)).unwrap();
        drop(l);
        assert_eq!(port_state(addr), PortState::Free);
        let tmp = tempfile::tempdir().unwrap();
        let s = disk_space(&tmp.path().join("not/yet")).unwrap();
        assert!(s.total > 0 && s.available <= s.total, "{s:?}");
    }
}
