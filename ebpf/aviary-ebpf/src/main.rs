//! Aviary's outbound capture.
//!
//! - connect4/connect6 send an enrolled pod's TCP connects to a captured service to the proxy,
//!   and remember the original destination under the socket's cookie.
//! - sock_ops moves that destination under the connection's 4-tuple once the source port is
//!   known, puts pod<->proxy sockets into a SockHash, and forgets both when the socket closes.
//! - sk_msg hands bytes between the two ends of a pod<->proxy connection without TCP.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aviary_abi::{
    capacity, counter, local_port, remote_port, AgentConfig, SockAddr, SockKey, AF_INET, AF_INET6,
    CONFIG_IPV6, CONFIG_SK_MSG, INBOUND_MARK, LISTENER_INBOUND_V4, LISTENER_INBOUND_V6,
    LISTENER_SLOTS, LISTENER_V4, LISTENER_V6, MAX_CGROUP_DEPTH,
};
use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, sk_action::SK_PASS, BPF_F_CURRENT_NETNS, BPF_F_INGRESS,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, TC_ACT_OK,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie, bpf_map_lookup_elem,
        bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::{cgroup_sock_addr, classifier, map, sk_lookup, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash, SockMap},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, TcContext},
    EbpfContext,
};

/// What a cgroup/connect program returns to let the connect proceed (rewritten or not).
const CONNECT_PROCEED: i32 = 1;
const SOCK_STREAM: u32 = 1;

/// The layout version of these maps (aviary_abi::ABI_VERSION), written by the agent; the
/// programs never read it.
#[map]
static ABI: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static CONFIG: Array<AgentConfig> = Array::with_max_entries(1, 0);

/// Pod-level cgroup ids of enrolled pods.
#[map]
static ENROLLED: HashMap<u64, u32> = HashMap::with_max_entries(capacity::ENROLLED, 0);

/// Captured service addresses (ClusterIP:port).
#[map]
static SERVICES: HashMap<SockAddr, u32> = HashMap::with_max_entries(capacity::SERVICES, 0);

#[map]
static LISTENERS: SockMap = SockMap::with_max_entries(LISTENER_SLOTS, 0);

#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, SockAddr> =
    LruHashMap::with_max_entries(capacity::ORIG_BY_COOKIE, 0);

/// Original destinations keyed by the pod's end of the connection; the proxy looks them up by
/// its peer's address.
#[map]
static ORIG_DST: LruHashMap<SockKey, SockAddr> =
    LruHashMap::with_max_entries(capacity::ORIG_DST, 0);

#[map]
static SOCKETS: SockHash<SockKey> = SockHash::with_max_entries(capacity::SOCKETS, 0);

/// Sockets whose messages stay on the TCP path (see counter::SK_MSG_FALLBACK).
#[map]
static MSG_BYPASS: LruHashMap<SockKey, u32> = LruHashMap::with_max_entries(capacity::MSG_BYPASS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Enrolled pods' addresses on this node (port 0), for inbound capture.
#[map]
static INBOUND: HashMap<SockAddr, u32> = HashMap::with_max_entries(capacity::INBOUND, 0);

/// Their ports that inbound capture leaves alone.
#[map]
static INBOUND_EXCLUDED: HashMap<SockAddr, u32> =
    HashMap::with_max_entries(capacity::INBOUND_EXCLUDED, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and programs do not migrate between CPUs while they run.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn config() -> Option<&'static AgentConfig> {
    CONFIG.get(0).filter(|cfg| cfg.proxy_port != 0)
}

/// Whether the calling task belongs to an enrolled pod: one of its cgroup ancestors is an
/// enrolled pod's cgroup.
#[inline(always)]
fn caller_enrolled() -> bool {
    for level in 1..=MAX_CGROUP_DEPTH {
        // SAFETY: plain helper call; returns 0 below the task's own cgroup.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            return false;
        }
        // SAFETY: the value is only tested for presence.
        if unsafe { ENROLLED.get(id) }.is_some() {
            return true;
        }
    }
    false
}

/// Whether the proxy's listener for this family exists right now.
#[inline(always)]
fn proxy_listening(slot: u32) -> bool {
    let key = slot;
    // SAFETY: a SockMap lookup returns a referenced socket or null; the reference is dropped
    // straight away, on the only path that has one.
    unsafe {
        let sk = bpf_map_lookup_elem(
            core::ptr::addr_of!(LISTENERS) as *mut c_void,
            core::ptr::addr_of!(key) as *const c_void,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}

/// Decides whether a TCP connect to `dst` is captured. On Some, the caller rewrites the
/// destination to the proxy; the original destination is already recorded.
#[inline(always)]
fn capture(ctx: &SockAddrContext, dst: &SockAddr, slot: u32) -> Option<&'static AgentConfig> {
    // SAFETY: the value is only tested for presence.
    unsafe { SERVICES.get(dst) }?;
    let cfg = config()?;
    // SAFETY: ctx.sock_addr is the program's context; `sk` is always set for connect.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    if mark == cfg.proxy_mark {
        count(counter::CONNECT_OWN_TRAFFIC);
        return None;
    }
    if !caller_enrolled() {
        return None;
    }
    if !proxy_listening(slot) {
        count(counter::CONNECT_FAILED_OPEN);
        return None;
    }
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE.insert(cookie, dst, 0).is_err() {
        // Without a recorded destination the proxy would refuse the connection: go direct.
        count(counter::CONNECT_NOT_RECORDED);
        return None;
    }
    count(counter::CONNECT_CAPTURED);
    Some(cfg)
}

#[cgroup_sock_addr(connect4)]
pub fn aviary_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context is valid for the whole program.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return CONNECT_PROCEED;
    }
    let dst = SockAddr::v4(sa.user_ip4, u16::from_be(sa.user_port as u16));
    if let Some(cfg) = capture(&ctx, &dst, LISTENER_V4) {
        sa.user_ip4 = cfg.proxy_v4;
        sa.user_port = (cfg.proxy_port as u16).to_be() as u32;
    }
    CONNECT_PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn aviary_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context is valid for the whole program.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return CONNECT_PROCEED;
    }
    let user_ip6 = sa.user_ip6;
    let dst = SockAddr::v6(user_ip6, u16::from_be(sa.user_port as u16));
    // A dual-stack socket reaching an IPv4 service goes to the IPv4 listener, v4-mapped.
    let slot = if dst.family == AF_INET {
        LISTENER_V4
    } else {
        match config() {
            Some(cfg) if cfg.flags & CONFIG_IPV6 != 0 => LISTENER_V6,
            _ => return CONNECT_PROCEED,
        }
    };
    if let Some(cfg) = capture(&ctx, &dst, slot) {
        sa.user_ip6 = if dst.family == AF_INET {
            SockAddr::v4_mapped(cfg.proxy_v4)
        } else {
            cfg.proxy_v6
        };
        sa.user_port = (cfg.proxy_port as u16).to_be() as u32;
    }
    CONNECT_PROCEED
}

/// The connection as seen from this socket's end.
#[inline(always)]
fn sock_ops_key(ctx: &SockOpsContext) -> Option<SockKey> {
    let (src, dst) = match ctx.family() as u16 {
        AF_INET => (
            SockAddr::v4(ctx.local_ip4(), local_port(ctx.local_port())),
            SockAddr::v4(ctx.remote_ip4(), remote_port(ctx.remote_port())),
        ),
        AF_INET6 => (
            SockAddr::v6(ctx.local_ip6(), local_port(ctx.local_port())),
            SockAddr::v6(ctx.remote_ip6(), remote_port(ctx.remote_port())),
        ),
        _ => return None,
    };
    Some(SockKey::new(src, dst))
}

#[inline(always)]
fn watch_close(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn sk_msg_enabled() -> bool {
    matches!(config(), Some(cfg) if cfg.flags & CONFIG_SK_MSG != 0)
}

#[inline(always)]
fn is_proxy_listener(cfg: &AgentConfig, local: &SockKey) -> bool {
    if local.src_port as u32 != cfg.proxy_port {
        return false;
    }
    match local.family {
        AF_INET => local.src_addr[0] == cfg.proxy_v4,
        _ => local.src_addr == cfg.proxy_v6,
    }
}

#[sock_ops]
pub fn aviary_sock_ops(ctx: SockOpsContext) -> u32 {
    let Some(key) = sock_ops_key(&ctx) else {
        return 0;
    };
    match ctx.op() {
        // The source port is bound now: the destination recorded at connect moves under the
        // 4-tuple, where the proxy can find it from the accepted socket.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: helper call on the program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: the value is copied out before the entry is removed.
            if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(cookie) }.copied() {
                let _ = ORIG_BY_COOKIE.remove(cookie);
                if ORIG_DST.insert(key, orig, 0).is_ok() {
                    count(counter::ORIG_DST_RECORDED);
                    watch_close(&ctx);
                }
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: the value is only tested for presence.
            if sk_msg_enabled() && unsafe { ORIG_DST.get(key) }.is_some() {
                // SAFETY: the context is a full socket at this callback.
                let _ = SOCKETS.update(key, unsafe { &mut *ctx.ops }, 0);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if let Some(cfg) = config() {
                if cfg.flags & CONFIG_SK_MSG != 0 && is_proxy_listener(cfg, &key) {
                    // SAFETY: the context is a full socket at this callback.
                    if SOCKETS.update(key, unsafe { &mut *ctx.ops }, 0).is_ok() {
                        watch_close(&ctx);
                    }
                }
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // The SockHash drops closed sockets by itself.
            let _ = ORIG_DST.remove(key);
            let _ = MSG_BYPASS.remove(key);
        }
        _ => {}
    }
    0
}

#[sk_msg]
pub fn aviary_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context is valid for the whole program.
    let md = unsafe { &*ctx.msg };
    let own = match md.family as u16 {
        AF_INET => SockKey::new(
            SockAddr::v4(md.local_ip4, local_port(md.local_port)),
            SockAddr::v4(md.remote_ip4, remote_port(md.remote_port)),
        ),
        AF_INET6 => SockKey::new(
            SockAddr::v6(md.local_ip6, local_port(md.local_port)),
            SockAddr::v6(md.remote_ip6, remote_port(md.remote_port)),
        ),
        _ => return SK_PASS,
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { MSG_BYPASS.get(own) }.is_some() {
        return SK_PASS;
    }
    let peer = own.reversed();
    if SOCKETS.redirect_msg(&ctx, peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(counter::SK_MSG_REDIRECTED);
    } else {
        // The peer's end is not in the SockHash (yet). These bytes go by TCP, and so must every
        // later byte on this connection, or the peer could read them out of order.
        let _ = MSG_BYPASS.insert(own, 1, 0);
        count(counter::SK_MSG_FALLBACK);
    }
    SK_PASS
}

#[cfg(not(test))]
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Inbound capture, at TC ingress of the node's uplink: a TCP packet to an enrolled pod goes to
/// the proxy's socket for its connection, and a new connection (a SYN) to the inbound listener
/// (through `aviary_inbound_lookup`). The mark makes policy routing deliver it to the host.
/// Everything else, and connections that existed before the pod was enrolled, pass untouched.
#[classifier]
pub fn aviary_inbound(ctx: TcContext) -> i32 {
    let _ = steer_inbound(&ctx, true);
    TC_ACT_OK
}

/// At TC ingress of the bridge's ports (the pods' host-side veths), for clients on this node: a
/// frame inbound capture takes is readdressed to the bridge, which then hands it to the host
/// instead of forwarding it to the pod. The socket is assigned on the bridge's own ingress
/// (by `aviary_inbound`), since an assignment does not survive the bridge.
#[classifier]
pub fn aviary_inbound_bridged(ctx: TcContext) -> i32 {
    if steer_inbound(&ctx, false) == Some(true) {
        if let Some(cfg) = config() {
            let _ = ctx.store(0, &cfg.bridge_mac, 0);
        }
    }
    TC_ACT_OK
}

/// Steers one packet to the proxy: Some(true) when it is the proxy's. With `assign` false it
/// only decides, and leaves the assignment (and the mark) to a later hook.
#[inline(always)]
fn steer_inbound(ctx: &TcContext, assign: bool) -> Option<bool> {
    let ethertype: u16 = ctx.load(12).ok()?;
    // SAFETY: a zeroed bpf_sock_tuple is valid; the member of the packet's family is filled.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // The pod's address, the TCP header's offset, and the tuple's size for the lookup.
    let (pod, l4, tuple_size, listener_slot) = if ethertype == ETH_P_IP.to_be() {
        let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let protocol: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        if version_ihl >> 4 != 4 || protocol != IPPROTO_TCP {
            return None;
        }
        let daddr: u32 = ctx.load(ETH_HLEN + 16).ok()?;
        tuple.__bindgen_anon_1.ipv4.saddr = ctx.load(ETH_HLEN + 12).ok()?;
        tuple.__bindgen_anon_1.ipv4.daddr = daddr;
        let l4 = ETH_HLEN + usize::from(version_ihl & 0x0f) * 4;
        (SockAddr::v4(daddr, 0), l4, 12, LISTENER_INBOUND_V4)
    } else if ethertype == ETH_P_IPV6.to_be() {
        // TCP right after the fixed header; extension headers are not followed.
        let next_header: u8 = ctx.load(ETH_HLEN + 6).ok()?;
        if next_header != IPPROTO_TCP {
            return None;
        }
        let daddr: [u32; 4] = ctx.load(ETH_HLEN + 24).ok()?;
        tuple.__bindgen_anon_1.ipv6.saddr = ctx.load(ETH_HLEN + 8).ok()?;
        tuple.__bindgen_anon_1.ipv6.daddr = daddr;
        (
            SockAddr::v6(daddr, 0),
            ETH_HLEN + 40,
            36,
            LISTENER_INBOUND_V6,
        )
    } else {
        return None;
    };
    // SAFETY: the value is only tested for presence.
    unsafe { INBOUND.get(pod) }?;
    let sport: u16 = ctx.load(l4).ok()?;
    let dport: u16 = ctx.load(l4 + 2).ok()?;
    let flags: u8 = ctx.load(l4 + 13).ok()?;
    let port = SockAddr {
        port: u16::from_be(dport),
        ..pod
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { INBOUND_EXCLUDED.get(port) }.is_some() {
        return None;
    }
    if tuple_size == 12 {
        tuple.__bindgen_anon_1.ipv4.sport = sport;
        tuple.__bindgen_anon_1.ipv4.dport = dport;
    } else {
        tuple.__bindgen_anon_1.ipv6.sport = sport;
        tuple.__bindgen_anon_1.ipv6.dport = dport;
    }
    let skb = ctx.skb.skb as *mut c_void;
    // The proxy's socket for this connection, if it has one: its local address is the pod's.
    // SAFETY: the tuple is on the stack and `tuple_size` is its filled member's; a found
    // socket is released below.
    let sk =
        unsafe { bpf_skc_lookup_tcp(skb, &mut tuple, tuple_size, BPF_F_CURRENT_NETNS as u64, 0) };
    if !sk.is_null() {
        // SAFETY: `sk` is a referenced socket the verifier lets us read `state` of.
        let state = unsafe { (*sk).state };
        if state != BPF_TCP_LISTEN && state != BPF_TCP_TIME_WAIT {
            // SAFETY: assign (if asked) and release a referenced socket.
            let assigned = unsafe {
                let assigned = if assign {
                    bpf_sk_assign(skb, sk as *mut c_void, 0)
                } else {
                    0
                };
                bpf_sk_release(sk as *mut c_void);
                assigned
            };
            if assigned == 0 {
                ctx.set_mark(INBOUND_MARK);
            }
            return Some(assigned == 0);
        }
        // SAFETY: release the reference the lookup took.
        unsafe { bpf_sk_release(sk as *mut c_void) };
    }
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        // Not the start of a connection, and not one of the proxy's: it predates enrollment.
        return None;
    }
    // A new connection: marked for local delivery, where `aviary_inbound_lookup` gives it the
    // listener. Not assigned here: the kernel must first see any TIME_WAIT socket the proxy
    // holds for a reused client port, and recycle it as it would for its own listener.
    let Some(listener) = inbound_listener(listener_slot) else {
        count(counter::INBOUND_FAILED_OPEN);
        return None;
    };
    // SAFETY: release the reference the lookup took.
    unsafe { bpf_sk_release(listener) };
    if assign {
        ctx.set_mark(INBOUND_MARK);
        count(counter::INBOUND_CAPTURED);
    }
    Some(true)
}

/// The inbound listener in `slot` (a referenced socket the caller releases), or None while no
/// agent listens: then inbound capture fails open.
#[inline(always)]
fn inbound_listener(slot: u32) -> Option<*mut c_void> {
    let key = slot;
    // SAFETY: a SockMap lookup returns a referenced socket or null.
    let listener = unsafe {
        bpf_map_lookup_elem(
            core::ptr::addr_of!(LISTENERS) as *mut c_void,
            core::ptr::addr_of!(key) as *const c_void,
        )
    };
    (!listener.is_null()).then_some(listener)
}

/// The listener lookup of a TCP packet for an enrolled pod's address: only packets
/// `aviary_inbound` marked are delivered to this host with such an address, so the lookup
/// gets the inbound listener (excluded ports keep theirs, which is none).
#[sk_lookup]
pub fn aviary_inbound_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context points at the kernel's bpf_sk_lookup for this lookup.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != u32::from(IPPROTO_TCP) {
        return SK_PASS;
    }
    let (pod, slot) = match lookup.family {
        family if family == u32::from(AF_INET) => {
            (SockAddr::v4(lookup.local_ip4, 0), LISTENER_INBOUND_V4)
        }
        family if family == u32::from(AF_INET6) => {
            (SockAddr::v6(lookup.local_ip6, 0), LISTENER_INBOUND_V6)
        }
        _ => return SK_PASS,
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { INBOUND.get(pod) }.is_none() {
        return SK_PASS;
    }
    // local_port is in host order, as SockAddr's is.
    let port = SockAddr {
        port: lookup.local_port as u16,
        ..pod
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { INBOUND_EXCLUDED.get(port) }.is_some() {
        return SK_PASS;
    }
    if let Some(listener) = inbound_listener(slot) {
        // SAFETY: assign, then release, a referenced socket.
        unsafe {
            bpf_sk_assign(ctx.as_ptr(), listener, 0);
            bpf_sk_release(listener);
        }
    }
    SK_PASS
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
