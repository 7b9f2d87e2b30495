//! The map types shared by Aviary's eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]` and laid out exactly as the kernel sees it. Addresses are kept
//! as the kernel hands them to the programs: IPv4 in word 0, network byte order in memory, so the
//! programs never convert; ports are in host order, converted once where they are read.
#![no_std]
#![deny(unsafe_code)]

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// The layout of the pinned maps. A new agent reuses the maps a running (or killed) one pinned
/// only when their versions match, so bump it with any change to a map's type, key, value or
/// capacity, or to what an entry means; a new map needs no bump (it is created beside the old
/// ones).
pub const ABI_VERSION: u32 = 1;

/// Map names, as the loader finds and pins them.
pub mod map_name {
    /// The single entry: the [`ABI_VERSION`](super::ABI_VERSION) of the agent that created the
    /// maps. Its own layout never changes.
    pub const ABI: &str = "ABI";
    pub const CONFIG: &str = "CONFIG";
    pub const ENROLLED: &str = "ENROLLED";
    pub const SERVICES: &str = "SERVICES";
    pub const LISTENERS: &str = "LISTENERS";
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const SOCKETS: &str = "SOCKETS";
    pub const MSG_BYPASS: &str = "MSG_BYPASS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const INBOUND: &str = "INBOUND";
    pub const INBOUND_EXCLUDED: &str = "INBOUND_EXCLUDED";

    /// Every map that holds state, and so is pinned. (The compiler's read-only data maps are not.)
    pub const ALL: [&str; 12] = [
        ABI,
        CONFIG,
        ENROLLED,
        SERVICES,
        LISTENERS,
        ORIG_BY_COOKIE,
        ORIG_DST,
        SOCKETS,
        MSG_BYPASS,
        COUNTERS,
        INBOUND,
        INBOUND_EXCLUDED,
    ];
}

/// Map sizes. A node runs at most a few hundred pods, but services are cluster-wide.
pub mod capacity {
    pub const ENROLLED: u32 = 16_384;
    pub const SERVICES: u32 = 131_072;
    /// Connects between connect4 and TCP_CONNECT_CB: only in flight for microseconds.
    pub const ORIG_BY_COOKIE: u32 = 65_536;
    pub const ORIG_DST: u32 = 262_144;
    pub const SOCKETS: u32 = 262_144;
    pub const MSG_BYPASS: u32 = 65_536;
    /// Addresses of enrolled pods on this node, for inbound capture.
    pub const INBOUND: u32 = 16_384;
    pub const INBOUND_EXCLUDED: u32 = 16_384;
}

/// Slots of the LISTENERS SockMap: the proxy's listening sockets. A slot empties by itself when
/// the socket closes, which is how the programs know the proxy is gone and fail open.
pub const LISTENER_V4: u32 = 0;
pub const LISTENER_V6: u32 = 1;
/// The inbound listeners (15006), which new inbound connections are handed to.
pub const LISTENER_INBOUND_V4: u32 = 2;
pub const LISTENER_INBOUND_V6: u32 = 3;
pub const LISTENER_SLOTS: u32 = 4;

/// The mark inbound packets carry so that policy routing delivers them to the host, where the
/// socket assigned to them (the proxy's) receives them.
pub const INBOUND_MARK: u32 = 0xa71b;

/// How deep the connect programs look for an enrolled pod among the caller's cgroup ancestors.
/// Pod cgroups sit at different depths (the kubelet puts Guaranteed pods at `kubepods/pod<uid>`,
/// the other QoS classes one level lower, the systemd driver adds slices), so the programs walk
/// from the top instead of assuming a level.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// Indexes into the COUNTERS per-CPU array.
pub mod counter {
    /// A connect from an enrolled pod to a captured service, sent to the proxy.
    pub const CONNECT_CAPTURED: u32 = 0;
    /// A connect that should have been captured, left alone because no proxy listener exists.
    pub const CONNECT_FAILED_OPEN: u32 = 1;
    /// A connect to a captured service by the proxy itself (its socket mark), left alone.
    pub const CONNECT_OWN_TRAFFIC: u32 = 2;
    /// A capture abandoned because the original destination could not be stored.
    pub const CONNECT_NOT_RECORDED: u32 = 3;
    /// An original destination moved under its connection's 4-tuple.
    pub const ORIG_DST_RECORDED: u32 = 4;
    /// A message sent socket to socket by sk_msg.
    pub const SK_MSG_REDIRECTED: u32 = 5;
    /// A connection whose messages take the TCP path, because its peer was not in the SockHash
    /// when it first sent (once a connection used TCP it stays on TCP, to keep bytes in order).
    pub const SK_MSG_FALLBACK: u32 = 6;
    /// A new inbound connection to an enrolled pod, handed to the inbound listener.
    pub const INBOUND_CAPTURED: u32 = 7;
    /// A new inbound connection left to go to the pod directly: no inbound listener exists.
    pub const INBOUND_FAILED_OPEN: u32 = 8;
    pub const COUNT: u32 = 9;

    /// Names, in index order, as the agent reports them.
    pub const NAMES: [&str; COUNT as usize] = [
        "connect_captured",
        "connect_failed_open",
        "connect_own_traffic",
        "connect_not_recorded",
        "orig_dst_recorded",
        "sk_msg_redirected",
        "sk_msg_fallback",
        "inbound_captured",
        "inbound_failed_open",
    ];
}

/// AgentConfig.flags bits.
pub const CONFIG_SK_MSG: u32 = 1;
/// The proxy listens on IPv6 too; without it connect6 captures only v4-mapped destinations.
pub const CONFIG_IPV6: u32 = 2;

/// The single entry of the CONFIG array, written by the agent before it attaches anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// Where captured connects are sent, as the pods reach the proxy.
    pub proxy_v4: u32,
    pub proxy_v6: [u32; 4],
    pub proxy_port: u32,
    /// The socket mark on the proxy's own upstream sockets: never captured.
    pub proxy_mark: u32,
    pub flags: u32,
    /// The MAC of the bridge pods hang off: frames from one pod to another that inbound
    /// capture takes are readdressed to it, so that the bridge hands them to the host.
    pub bridge_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// An IP socket address: a captured service, or a connection's original destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockAddr {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

impl SockAddr {
    pub const fn v4(addr: u32, port: u16) -> Self {
        Self {
            addr: [addr, 0, 0, 0],
            port,
            family: AF_INET,
        }
    }

    /// An IPv6 address as the kernel gives it; a v4-mapped address (`::ffff:a.b.c.d`) becomes
    /// IPv4, so that a dual-stack socket and a v4 socket reach the same entries.
    pub const fn v6(addr: [u32; 4], port: u16) -> Self {
        if is_v4_mapped(addr) {
            Self::v4(addr[3], port)
        } else {
            Self {
                addr,
                port,
                family: AF_INET6,
            }
        }
    }

    /// The v4-mapped IPv6 form of an IPv4 address, for rewriting a dual-stack socket's connect.
    pub const fn v4_mapped(addr: u32) -> [u32; 4] {
        [0, 0, V4_MAPPED_PREFIX, addr]
    }
}

impl From<core::net::SocketAddr> for SockAddr {
    fn from(sa: core::net::SocketAddr) -> Self {
        match sa {
            core::net::SocketAddr::V4(v4) => {
                Self::v4(u32::from_ne_bytes(v4.ip().octets()), v4.port())
            }
            core::net::SocketAddr::V6(v6) => {
                let o = v6.ip().octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                Self::v6([word(0), word(4), word(8), word(12)], v6.port())
            }
        }
    }
}

impl SockAddr {
    /// None for a family the programs never write.
    pub fn to_socket_addr(&self) -> Option<core::net::SocketAddr> {
        let ip: core::net::IpAddr = match self.family {
            AF_INET => core::net::Ipv4Addr::from(self.addr[0].to_ne_bytes()).into(),
            AF_INET6 => {
                let mut octets = [0u8; 16];
                for (chunk, word) in octets.chunks_exact_mut(4).zip(self.addr) {
                    chunk.copy_from_slice(&word.to_ne_bytes());
                }
                core::net::Ipv6Addr::from(octets).into()
            }
            _ => return None,
        };
        Some(core::net::SocketAddr::new(ip, self.port))
    }
}

/// Word 2 of `::ffff:0:0/96`, in network byte order.
const V4_MAPPED_PREFIX: u32 = u32::from_be(0x0000_ffff);

pub const fn is_v4_mapped(addr: [u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_PREFIX
}

/// A TCP connection seen from one of its ends: `src` is that end's own address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub family: u16,
    pub _pad: u16,
}

impl SockKey {
    pub const fn new(src: SockAddr, dst: SockAddr) -> Self {
        Self {
            src_addr: src.addr,
            dst_addr: dst.addr,
            src_port: src.port,
            dst_port: dst.port,
            family: src.family,
            _pad: 0,
        }
    }

    /// The same connection seen from its other end.
    pub const fn reversed(&self) -> Self {
        Self {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            family: self.family,
            _pad: 0,
        }
    }
}

/// The ports of sock_ops and sk_msg contexts: `remote_port` holds the port in network byte order
/// in its upper half, `local_port` is already in host order.
pub const fn remote_port(raw: u32) -> u16 {
    u32::from_be(raw) as u16
}

pub const fn local_port(raw: u32) -> u16 {
    raw as u16
}

#[cfg(feature = "user")]
mod user {
    #![allow(unsafe_code)]
    // SAFETY: all are repr(C), Copy, with no padding the kernel could leave uninitialised (SockKey
    // carries its padding as an explicit field).
    unsafe impl aya::Pod for super::AgentConfig {}
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::SockKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn v4_mapped_addresses_become_ipv4() {
        let mapped = SockAddr::v4_mapped(be([10, 96, 0, 10]));
        assert!(is_v4_mapped(mapped));
        assert_eq!(
            SockAddr::v6(mapped, 80),
            SockAddr::v4(be([10, 96, 0, 10]), 80)
        );
        // The prefix is ::ffff:0:0/96 in network byte order.
        assert_eq!(mapped[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
    }

    #[test]
    fn plain_ipv6_stays_ipv6() {
        let addr = [be([0xfd, 0, 0, 0]), 0, 0, be([0, 0, 0, 1])];
        let sa = SockAddr::v6(addr, 443);
        assert_eq!(sa.family, AF_INET6);
        assert_eq!(sa.addr, addr);
    }

    #[test]
    fn socket_addresses_round_trip_in_kernel_layout() {
        let v4: core::net::SocketAddr = "10.96.0.10:8080".parse().unwrap();
        let sa = SockAddr::from(v4);
        assert_eq!(sa, SockAddr::v4(be([10, 96, 0, 10]), 8080));
        assert_eq!(sa.to_socket_addr(), Some(v4));

        let v6: core::net::SocketAddr = "[fd00::1]:443".parse().unwrap();
        assert_eq!(SockAddr::from(v6).to_socket_addr(), Some(v6));

        // A dual-stack peer address is stored as the IPv4 address it maps.
        let mapped: core::net::SocketAddr = "[::ffff:10.244.1.2]:40000".parse().unwrap();
        let expected: core::net::SocketAddr = "10.244.1.2:40000".parse().unwrap();
        assert_eq!(SockAddr::from(mapped).to_socket_addr(), Some(expected));
        assert_eq!(SockAddr::default().to_socket_addr(), None);
    }

    #[test]
    fn a_connection_reversed_twice_is_itself() {
        let key = SockKey::new(SockAddr::v4(1, 1000), SockAddr::v4(2, 15001));
        assert_eq!(key.reversed().src_port, 15001);
        assert_eq!(key.reversed().reversed(), key);
    }

    #[test]
    fn ports_from_kernel_contexts() {
        // remote_port 15001 as sock_ops stores it on a little- or big-endian host.
        let raw = u32::to_be(15001);
        assert_eq!(remote_port(raw), 15001);
        assert_eq!(local_port(15001), 15001);
    }

    #[test]
    fn layouts_match_the_programs() {
        assert_eq!(core::mem::size_of::<SockAddr>(), 20);
        assert_eq!(core::mem::size_of::<SockKey>(), 40);
        assert_eq!(core::mem::size_of::<AgentConfig>(), 40);
    }
}
