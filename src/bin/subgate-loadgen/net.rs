//! Where a subscriber's TCP connection comes from.
//!
//! A TCP connection is named by its source and destination addresses and
//! ports. Towards one node (one address and port) a source address tells
//! its connections apart by the ephemeral port alone, and there are only
//! so many (`net.ipv4.ip_local_port_range`: 32768–60999, 28,232 ports, on
//! a stock Linux): one address cannot hold much more than 28,000
//! connections to one node, fewer with the publisher's and the scrapes'
//! beside them. On loopback the whole of 127.0.0.0/8 is this machine, so
//! when the node is a loopback IPv4 address every subscriber connection
//! binds a source address of its own, 127.0.0.2 to 127.0.0.65 by its index,
//! before it connects: each of those has the whole port range, and
//! 127.0.0.1 is left to the publisher and the scrapes. Against any other
//! address the kernel picks the source as usual.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

/// Loopback source addresses the subscribers are spread over.
const SOURCES: usize = 64;

/// The source address subscriber connection `index` binds when it
/// connects to `target`; `None`: let the kernel choose.
pub fn source_for(target: IpAddr, index: usize) -> Option<IpAddr> {
    match target {
        IpAddr::V4(v4) if v4.is_loopback() => Some(IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            2 + (index % SOURCES) as u8,
        ))),
        _ => None,
    }
}

/// `host:port` of an `http://host[:port][/…]` URL.
pub fn authority(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let host = rest.split('/').next().unwrap_or(rest);
    // `[v6]:port`, `host:port`, or a bare host (port 80).
    let has_port = match host.rfind(']') {
        Some(end) => host[end..].contains(':'),
        None => host.contains(':'),
    };
    if has_port {
        host.to_owned()
    } else {
        format!("{host}:80")
    }
}

/// Whether a URL names a loopback IPv4 node (a literal address, or
/// `localhost`): then its subscribers spread their source addresses.
pub fn is_loopback_v4(url: &str) -> bool {
    let authority = authority(url);
    let host = authority.rsplit_once(':').map_or(&*authority, |(h, _)| h);
    host == "localhost" || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// Connects subscriber connection `index` to `url`'s host, trying each
/// address it resolves to in turn (as `TcpStream::connect` does), from a
/// source address of its own on loopback ([`source_for`]).
pub async fn connect(url: &str, index: usize) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(authority(url)).await? {
        match connect_one(addr, index).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
}

async fn connect_one(addr: SocketAddr, index: usize) -> io::Result<TcpStream> {
    let Some(source) = source_for(addr.ip(), index) else {
        return TcpStream::connect(addr).await;
    };
    let socket = TcpSocket::new_v4()?;
    bind_address_no_port(&socket);
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// `IP_BIND_ADDRESS_NO_PORT`: the port of a socket bound to an address is
/// chosen at `connect()`, for the whole four-tuple, instead of at `bind()`
/// for the address alone (where every port could be used once, whatever
/// the destination). Best effort: without it the bind still works.
fn bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int of the size given, on a socket this
    // process owns.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A label for a failed connect, as the report tallies it.
pub fn error_label(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused".into(),
        // EADDRNOTAVAIL: no source port left for this destination.
        io::ErrorKind::AddrNotAvailable => "no_source_port".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        _ => "io".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_nodes_get_spread_sources_and_others_none() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(source_for(lo, 0), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(source_for(lo, 63), Some("127.0.0.65".parse().unwrap()));
        assert_eq!(source_for(lo, 64), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(source_for("10.0.0.5".parse().unwrap(), 3), None);
        assert_eq!(source_for("::1".parse().unwrap(), 3), None);
        assert!(is_loopback_v4("http://127.0.0.1:8080"));
        assert!(is_loopback_v4("http://localhost:8080/x"));
        assert!(!is_loopback_v4("http://haproxy:8080"));
        assert!(!is_loopback_v4("http://[::1]:8080"));
        assert_eq!(authority("http://haproxy"), "haproxy:80");
        assert_eq!(authority("http://[::1]:9/x"), "[::1]:9");
    }

    #[tokio::test]
    async fn a_connection_to_loopback_comes_from_its_spread_source() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stream = connect(&url, 5).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), "127.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(stream.local_addr().unwrap().ip(), peer.ip());
    }
}
