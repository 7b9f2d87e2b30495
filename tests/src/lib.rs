//! A test node built from network namespaces, veth pairs and cgroups, with pods laid out the
//! way a kubelet lays them out, and the real agent running on it.
//!
//! - The node is a network namespace with a bridge (10.244.1.1/24). The agent runs there, in
//!   the cgroup of its own pod, as a DaemonSet pod would on a real node. The node namespace has
//!   no default route and an `unreachable` route for the service range, so nothing a test sends
//!   can leave the machine.
//! - A pod is a network namespace with `eth0` on the bridge, plus a cgroup
//!   `<root>/pod<uid>/<container>` under a test kubepods root.
//! - Service VIPs exist only inside the node: a backend pod holds the VIP on its loopback, and
//!   the node routes the VIP to it (what kube-proxy's DNAT achieves on a real node).
//!
//! - Two nodes ([`Node::pair`]) are joined by their uplinks, each routing the other's pod range
//!   to it, as two machines of a cluster: the second node's bridge is 10.244.3.1/24.
//!
//! Everything created is removed on drop, also when a test panics: the datapath an agent leaves
//! attached and pinned when it exits, with `aviary-agent uninstall` as on a real node, and the
//! namespaces and cgroups. Resources left by a test process that was killed are swept by the
//! next one.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod grpc;
pub mod policy;
pub mod signer;

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aviary_agent::ebpf::maps::{CaptureTable, Stats};

/// Where cgroup v2 is mounted here, found as the agent finds it (`/sys/fs/cgroup` on most
/// machines, `/sys/fs/cgroup/unified` beside cgroup v1), or None without cgroup v2.
pub fn cgroup2() -> Option<&'static Path> {
    static MOUNT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            aviary_agent::cgroup::cgroup2_mounts(&mountinfo)
                .into_iter()
                .next()
        })
        .as_deref()
}

/// How the kubelet lays out pod cgroups, by its cgroup driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// `kubepods/pod<uid>/<container>` (a Guaranteed pod).
    Cgroupfs,
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/<container>`.
    Systemd,
}
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where the agents of test nodes keep their hand-off sockets.
pub const HANDOFF_DIR: &str = "/run/aviary-tests";
/// The node's uplink to a remote host ([`Node::add_remote_host`]), and that host's addresses.
pub const UPLINK: &str = "up0";
pub const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const REMOTE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
/// The node's IPv6 address on the uplink.
const UPLINK_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);

/// The node name of test pods (spec.nodeName) and of an agent that reads the API server.
pub const TEST_NODE: &str = "aviary-test-node";
/// The node's addresses on the pod bridge; pods reach the proxy here.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 1);
/// The service ranges, unreachable inside the node except for the VIPs a test adds.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const SERVICE_CIDR6: &str = "fd00:96::/108";
/// Prefix of every name the harness creates, followed by the owning process id.
const PREFIX: &str = "avt";

/// Privileged tests run one at a time in a process: they measure node-wide counters.
static SERIAL: Mutex<()> = Mutex::new(());
static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

/// How many times slower than this machine's own kernel the tests run here: 1, or what
/// `AVIARY_TEST_SLOWDOWN` says (`cargo xtask test --kernel` sets it in its emulated guest). Every
/// bound on waiting is stretched by it ([`patience`]); what the tests check is not.
pub fn slowdown() -> u32 {
    static SLOWDOWN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SLOWDOWN.get_or_init(|| match std::env::var("AVIARY_TEST_SLOWDOWN") {
        Err(_) => 1,
        Ok(factor) => factor.parse().ok().filter(|f| *f >= 1).unwrap_or_else(|| {
            panic!("AVIARY_TEST_SLOWDOWN={factor:?} is not a whole number >= 1")
        }),
    })
}

/// A heavy test's `count` (of connections, requests), scaled down by the [`slowdown`]: the
/// guest of the kernel matrix runs the same test in about the host's time, with fewer.
pub fn heavy(count: u32) -> u32 {
    (count / slowdown()).max(1)
}

/// `timeout`, stretched for a slow machine: see [`slowdown`].
pub fn patience(timeout: Duration) -> Duration {
    timeout * slowdown()
}

/// Whether privileged tests can run here. Outside CI a test without privileges is skipped with
/// a message; under CI=true it fails, so that CI never passes without running it.
pub fn privileged() -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("not running as root".to_owned())
    } else if cgroup2().is_none() {
        Some("no cgroup v2 hierarchy is mounted".to_owned())
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("the `ip` command (iproute2) is missing; run `cargo xtask setup`".to_owned())
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("privileged test cannot run under CI=true: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED privileged test: {why}");
            false
        }
    }
}

/// Runs a command and returns its stdout; fails with its stderr.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A binary of this workspace, from the target directory the caller was built into (tests run
/// from `target/<profile>/deps`, binaries from `target/<profile>`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut profile_dir = exe.parent().expect("the executable's directory");
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir.parent().expect("target/<profile>");
    }
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build --bins`, which `cargo xtask test` does)",
        path.display()
    );
    path
}

/// `ip -n <ns> <args>`.
fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    sh(&[&["ip", "-n", ns], args].concat())
}

/// The file of a network namespace the harness made (`/var/run/netns/<name>`), for `setns` or
/// `nsenter --net=`.
pub fn ns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

/// Removes what killed test processes left behind: every harness name carries its owner's pid.
fn sweep_stale() {
    let stale = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return false;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        !pid.is_empty() && !Path::new("/proc").join(&pid).exists()
    };
    for ns in sh(&["ip", "netns", "list"]).unwrap_or_default().lines() {
        let name = ns.split_whitespace().next().unwrap_or_default();
        if stale(name) {
            let _ = sh(&["ip", "netns", "del", name]);
        }
    }
    for dir in [
        cgroup2().expect("checked by privileged()"),
        Path::new(BPFFS),
    ] {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if stale(&entry.file_name().to_string_lossy()) {
                remove_tree(&entry.path());
            }
        }
    }
    for entry in fs::read_dir(HANDOFF_DIR).into_iter().flatten().flatten() {
        if stale(&entry.file_name().to_string_lossy()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Removes a cgroup or bpffs tree: cgroups must be removed bottom-up with rmdir.
fn remove_tree(path: &Path) {
    if cgroup2().is_some_and(|mount| path.starts_with(mount)) {
        let _ = fs::write(path.join("cgroup.kill"), "1");
        let mut dirs = vec![path.to_owned()];
        let mut all = Vec::new();
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(entry.path());
                }
            }
            all.push(dir);
        }
        for dir in all.iter().rev() {
            // Killed processes take a moment to leave their cgroup.
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    } else {
        let _ = fs::remove_dir_all(path);
    }
}

pub struct Node {
    pub id: String,
    pub netns: String,
    cgroup_base: PathBuf,
    /// The kubepods-style root the agent attaches to.
    pub cgroup_root: PathBuf,
    pub cgroup_layout: CgroupLayout,
    pub pin_name: String,
    pub policy_dir: PathBuf,
    /// The third octet of its pod range, 10.244.<subnet>.0/24 (1, and 3 for a pair's second).
    subnet: u8,
    pods: Mutex<Vec<String>>,
    children: Mutex<Vec<Child>>,
    next_host: AtomicU32,
    /// Held by the first node of a test; the second of a pair runs under the first's.
    _serial: Option<MutexGuard<'static, ()>>,
}

impl Node {
    /// A fresh node, or None when privileged tests are skipped (see [`privileged`]).
    pub fn new() -> Option<Node> {
        Self::with_cgroup_layout(CgroupLayout::Cgroupfs)
    }

    /// The same, with pod cgroups laid out as the kubelet's `layout` driver does.
    pub fn with_cgroup_layout(layout: CgroupLayout) -> Option<Node> {
        if !privileged() {
            return None;
        }
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        sweep_stale();
        Some(Node::build_as(layout, 1, Some(serial)))
    }

    /// Two nodes of one cluster, joined by their uplinks ([`UPLINK`]: 10.0.0.1/30 on the first,
    /// 10.0.0.2/30 on the second), each routing the other's pod range over it.
    pub fn pair() -> Option<(Node, Node)> {
        let first = Node::new()?;
        let second = Node::build_as(CgroupLayout::Cgroupfs, 3, None);
        let join = || -> anyhow::Result<()> {
            let (a, b) = (first.netns.as_str(), second.netns.as_str());
            ip_in(
                a,
                &[
                    "link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK, "netns", b,
                ],
            )?;
            for (ns, ip, peer, range) in [
                (a, "10.0.0.1/30", "10.0.0.2", second.pod_range()),
                (b, "10.0.0.2/30", "10.0.0.1", first.pod_range()),
            ] {
                ip_in(ns, &["addr", "add", ip, "dev", UPLINK])?;
                ip_in(ns, &["link", "set", UPLINK, "up"])?;
                ip_in(ns, &["route", "add", &range, "via", peer])?;
            }
            Ok(())
        };
        join().expect("joining the two nodes");
        Some((first, second))
    }

    fn build_as(layout: CgroupLayout, subnet: u8, serial: Option<MutexGuard<'static, ()>>) -> Node {
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NEXT_NODE.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup_base = cgroup2().expect("checked by privileged()").join(&id);
        let root = match layout {
            CgroupLayout::Cgroupfs => "kubepods",
            CgroupLayout::Systemd => "kubepods.slice",
        };
        let node = Node {
            netns: format!("{id}-node"),
            cgroup_root: cgroup_base.join(root),
            cgroup_layout: layout,
            cgroup_base,
            pin_name: id.clone(),
            policy_dir: std::env::temp_dir().join(format!("{id}-policy")),
            subnet,
            pods: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            next_host: AtomicU32::new(10),
            id,
            _serial: serial,
        };
        node.build().expect("building the test node");
        node
    }

    /// Its address on the pod bridge, where its pods reach the proxy ([`NODE_IP`] for the
    /// first node).
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet, 1)
    }

    pub fn ip6(&self) -> Ipv6Addr {
        self.pod_ip6(1)
    }

    fn pod_ip6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x243 + u16::from(self.subnet),
            0,
            0,
            0,
            0,
            0,
            host.into(),
        )
    }

    fn pod_range(&self) -> String {
        format!("10.244.{}.0/24", self.subnet)
    }

    /// The agent's metrics, fetched from the node's metrics port by `pod`.
    pub fn metrics(&self, pod: &Pod) -> String {
        let out = self.run(
            pod,
            &["http-get", &format!("{}:15020", self.ip()), "/metrics"],
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn build(&self) -> anyhow::Result<()> {
        fs::create_dir_all(&self.cgroup_root)?;
        fs::create_dir_all(&self.policy_dir)?;
        let ns = self.netns.as_str();
        sh(&["ip", "netns", "add", ns])?;
        ip_in(ns, &["link", "set", "lo", "up"])?;
        ip_in(ns, &["link", "add", "br0", "type", "bridge"])?;
        let (ip, ip6) = (self.ip(), self.ip6());
        ip_in(ns, &["addr", "add", &format!("{ip}/24"), "dev", "br0"])?;
        // nodad: IPv6 addresses are usable at once, without duplicate address detection.
        ip_in(
            ns,
            &["addr", "add", &format!("{ip6}/64"), "dev", "br0", "nodad"],
        )?;
        ip_in(ns, &["link", "set", "br0", "up"])?;
        ip_in(ns, &["route", "add", "unreachable", SERVICE_CIDR])?;
        ip_in(ns, &["route", "add", "unreachable", SERVICE_CIDR6])?;
        self.sysctls(
            ns,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )?;
        Ok(())
    }

    /// Sysctls for a namespace that opens many short connections.
    fn sysctls(&self, ns: &str, extra: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["ip", "netns", "exec", ns, "sysctl", "-qw"];
        args.extend([
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ]);
        args.extend(extra);
        sh(&args).map(drop)
    }

    /// Pods that each serve HTTP on `port`, naming themselves in `x-backend`.
    pub fn add_http_pods<const N: usize>(&self, names: [&str; N], port: u16) -> [Pod; N] {
        names.map(|name| {
            let pod = self.add_pod(name);
            self.serve_http(&pod, port);
            pod
        })
    }

    /// Another host, routed to this node over its uplink ([`UPLINK`], 10.0.0.1/30 on the node,
    /// 10.0.0.2/30 on the host): a client on a second node. Its processes run in a cgroup
    /// outside the pods' root.
    pub fn add_remote_host(&self, name: &str) -> Pod {
        let netns = format!("{}-{name}", self.id);
        let host = Pod {
            name: name.to_owned(),
            uid: String::new(),
            ip: REMOTE_IP,
            ip6: REMOTE_IP6,
            cgroup: self.cgroup_base.join(name),
            netns,
        };
        let build = || -> anyhow::Result<()> {
            let (node, ns) = (self.netns.as_str(), host.netns.as_str());
            sh(&["ip", "netns", "add", ns])?;
            self.pods.lock().unwrap().push(ns.to_owned());
            // Fixed MACs, so that each side can pin the other's IPv6 neighbour entry.
            let (node_mac, host_mac) = ("02:00:00:00:01:01", "02:00:00:00:01:02");
            ip_in(
                node,
                &[
                    "link", "add", UPLINK, "address", node_mac, "type", "veth", "peer", "name",
                    "eth0", "address", host_mac, "netns", ns,
                ],
            )?;
            let (node6, host6) = (UPLINK_IP6.to_string(), REMOTE_IP6.to_string());
            ip_in(node, &["addr", "add", "10.0.0.1/30", "dev", UPLINK])?;
            ip_in(
                node,
                &[
                    "addr",
                    "add",
                    &format!("{node6}/64"),
                    "dev",
                    UPLINK,
                    "nodad",
                ],
            )?;
            ip_in(node, &["link", "set", UPLINK, "up"])?;
            let neigh = |ns: &str, ip: &str, mac: &str, dev: &str| {
                ip_in(
                    ns,
                    &[
                        "neigh",
                        "add",
                        ip,
                        "lladdr",
                        mac,
                        "dev",
                        dev,
                        "nud",
                        "permanent",
                    ],
                )
            };
            neigh(node, &host6, host_mac, UPLINK)?;
            ip_in(
                ns,
                &["addr", "add", &format!("{REMOTE_IP}/30"), "dev", "eth0"],
            )?;
            ip_in(
                ns,
                &[
                    "addr",
                    "add",
                    &format!("{host6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            ip_in(ns, &["link", "set", "eth0", "up"])?;
            ip_in(ns, &["link", "set", "lo", "up"])?;
            neigh(ns, &node6, node_mac, "eth0")?;
            ip_in(ns, &["route", "add", "default", "via", "10.0.0.1"])?;
            ip_in(ns, &["-6", "route", "add", "default", "via", &node6])?;
            fs::create_dir_all(&host.cgroup)?;
            Ok(())
        };
        build().unwrap_or_else(|e| panic!("building remote host {name}: {e:#}"));
        host
    }

    /// The next host number the harness hands out (.10 to .99), and a UID made from it.
    fn next_host(&self) -> (u8, String) {
        let host = self.next_host.fetch_add(1, Ordering::Relaxed) as u8;
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), host);
        (host, uid)
    }

    /// The cgroup of the container `name` of the pod `uid`, as the node's layout has it.
    fn pod_cgroup(&self, uid: &str, name: &str) -> PathBuf {
        match self.cgroup_layout {
            CgroupLayout::Cgroupfs => self.cgroup_root.join(format!("pod{uid}")),
            CgroupLayout::Systemd => {
                self.cgroup_root
                    .join("kubepods-burstable.slice")
                    .join(format!(
                        "kubepods-burstable-pod{}.slice",
                        uid.replace('-', "_")
                    ))
            }
        }
        .join(name)
    }

    /// A pod on the bridge with a cgroup for it under the root (see [`CgroupLayout`]).
    pub fn add_pod(&self, name: &str) -> Pod {
        let (host, uid) = self.next_host();
        self.add_pod_as(name, &uid, Ipv4Addr::new(10, 244, self.subnet, host))
    }

    /// A pod whose UID and address are given, e.g. by a manifest (10.244.1.0/24; the harness
    /// hands out .10 to .99 itself, so a manifest should use others).
    pub fn add_pod_as(&self, name: &str, uid: &str, ip: Ipv4Addr) -> Pod {
        let host = ip.octets()[3];
        let uid = uid.to_owned();
        let pod = Pod {
            name: name.to_owned(),
            ip,
            ip6: self.pod_ip6(host),
            netns: format!("{}-{name}", self.id),
            cgroup: self.pod_cgroup(&uid, name),
            uid,
        };
        self.build_pod(&pod)
            .unwrap_or_else(|e| panic!("building pod {name}: {e:#}"));
        pod
    }

    /// A pod on no bridge, as a routed CNI (Calico, say) makes one: a /32 address in 10.244.2.0/24
    /// behind a veth the node routes to, and the node as its gateway. IPv4 only.
    pub fn add_routed_pod(&self, name: &str) -> Pod {
        let (host, uid) = self.next_host();
        let pod = Pod {
            name: name.to_owned(),
            ip: Ipv4Addr::new(10, 244, 2, host),
            ip6: Ipv6Addr::UNSPECIFIED,
            netns: format!("{}-{name}", self.id),
            cgroup: self.pod_cgroup(&uid, name),
            uid,
        };
        let build = || -> anyhow::Result<()> {
            let (node, ns) = (self.netns.as_str(), pod.netns.as_str());
            let veth = format!("vethr{host}");
            sh(&["ip", "netns", "add", ns])?;
            self.pods.lock().unwrap().push(ns.to_owned());
            ip_in(
                node,
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            )?;
            ip_in(node, &["link", "set", &veth, "up"])?;
            let (ip, node_ip) = (format!("{}/32", pod.ip), self.ip().to_string());
            ip_in(node, &["route", "add", &ip, "dev", &veth, "src", &node_ip])?;
            ip_in(
                ns,
                &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
            )?;
            ip_in(ns, &["link", "set", "eth0", "up"])?;
            ip_in(ns, &["link", "set", "lo", "up"])?;
            let gateway = self.ip().to_string();
            ip_in(
                ns,
                &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
            )?;
            ip_in(ns, &["route", "add", "default", "via", &gateway])?;
            self.sysctls(ns, &[])?;
            fs::create_dir_all(&pod.cgroup)?;
            Ok(())
        };
        build().unwrap_or_else(|e| panic!("building routed pod {name}: {e:#}"));
        pod
    }

    fn build_pod(&self, pod: &Pod) -> anyhow::Result<()> {
        let (node, ns) = (self.netns.as_str(), pod.netns.as_str());
        // Named by address: interface names are limited to 15 bytes, pod names are not.
        let veth = format!("veth{}", pod.ip.octets()[3]);
        sh(&["ip", "netns", "add", ns])?;
        self.pods.lock().unwrap().push(ns.to_owned());
        // A fixed MAC per pod, so the node can pin its IPv6 neighbour entry (below).
        let mac = format!("02:00:00:00:00:{:02x}", pod.ip.octets()[3]);
        ip_in(
            node,
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "address", &mac,
                "netns", ns,
            ],
        )?;
        // Neighbour discovery from the bridge device to a pod does not complete in these
        // namespaces (its solicitations go unanswered), so the node's entry is static, as a
        // routed CNI would install it.
        ip_in(
            node,
            &[
                "neigh",
                "add",
                &pod.ip6.to_string(),
                "lladdr",
                &mac,
                "dev",
                "br0",
                "nud",
                "permanent",
            ],
        )?;
        ip_in(node, &["link", "set", &veth, "master", "br0", "up"])?;
        let (ip4, ip6) = (format!("{}/24", pod.ip), format!("{}/64", pod.ip6));
        ip_in(ns, &["addr", "add", &ip4, "dev", "eth0"])?;
        ip_in(ns, &["addr", "add", &ip6, "dev", "eth0", "nodad"])?;
        ip_in(ns, &["link", "set", "eth0", "up"])?;
        ip_in(ns, &["link", "set", "lo", "up"])?;
        ip_in(
            ns,
            &["route", "add", "default", "via", &self.ip().to_string()],
        )?;
        ip_in(
            ns,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &self.ip6().to_string(),
            ],
        )?;
        self.sysctls(ns, &[])?;
        fs::create_dir_all(&pod.cgroup)?;
        Ok(())
    }

    /// Makes the IPv6 `vip` answer on `backend`.
    pub fn add_vip6(&self, vip: Ipv6Addr, backend: &Pod) {
        ip_in(
            &backend.netns,
            &["addr", "add", &format!("{vip}/128"), "dev", "lo", "nodad"],
        )
        .unwrap();
        ip_in(
            &self.netns,
            &[
                "route",
                "add",
                &format!("{vip}/128"),
                "via",
                &backend.ip6.to_string(),
            ],
        )
        .unwrap();
    }

    /// Makes `vip` answer on `backend`: the backend holds it, and the node routes it there.
    pub fn add_vip(&self, vip: Ipv4Addr, backend: &Pod) {
        ip_in(
            &backend.netns,
            &["addr", "add", &format!("{vip}/32"), "dev", "lo"],
        )
        .unwrap();
        ip_in(
            &self.netns,
            &[
                "route",
                "add",
                &format!("{vip}/32"),
                "via",
                &backend.ip.to_string(),
            ],
        )
        .unwrap();
    }

    /// A command run as a process of `pod` (its cgroup, its network namespace).
    pub fn command_in(&self, netns: &str, cgroup: &Path, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(workspace_bin("aviary-testpod"));
        cmd.arg("exec")
            .arg("--netns")
            .arg(ns_path(netns))
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--")
            .arg(program)
            .args(args);
        cmd
    }

    fn testpod(&self, pod: &Pod, args: &[&str]) -> Command {
        self.command_in(
            &pod.netns,
            &pod.cgroup,
            &workspace_bin("aviary-testpod"),
            args,
        )
    }

    /// Starts the greeting/echo backend in `pod`, waiting until it listens.
    pub fn serve(&self, pod: &Pod, port: u16, udp_port: Option<u16>) {
        let port = port.to_string();
        let udp = udp_port.map(|p| p.to_string());
        let mut args = vec!["serve", "--name", &pod.name, "--port", &port];
        if let Some(udp) = &udp {
            args.extend(["--udp-port", udp]);
        }
        self.start_server(pod, &args);
    }

    /// Starts the HTTP/1.1 backend in `pod` (see `aviary-testpod http-serve`).
    pub fn serve_http(&self, pod: &Pod, port: u16) {
        self.start_named(pod, "http-serve", port);
    }

    /// Starts the gRPC backend in `pod` (see `aviary-testpod grpc-serve`).
    pub fn serve_grpc(&self, pod: &Pod, port: u16) {
        self.start_named(pod, "grpc-serve", port);
    }

    /// Starts the backend of `aviary-testpod hold-serve` in `pod`: it greets each connection,
    /// then holds it silent until its peer closes it, however many there are.
    pub fn serve_held(&self, pod: &Pod, port: u16) {
        self.start_named(pod, "hold-serve", port);
    }

    /// Starts the backend `command`, named after `pod`, on `port`.
    fn start_named(&self, pod: &Pod, command: &str, port: u16) {
        let port = port.to_string();
        self.start_server(pod, &[command, "--name", &pod.name, "--port", &port]);
    }

    fn start_server(&self, pod: &Pod, args: &[&str]) {
        let mut first = String::new();
        self.spawn(pod, args).read_line(&mut first).unwrap();
        assert!(
            first.starts_with("serving"),
            "backend {} did not start: {first:?}",
            pod.name
        );
    }

    /// Starts `aviary-testpod <args>` in `pod` and returns its output as it comes; the process
    /// is killed with the node if it is still running then.
    pub fn spawn(&self, pod: &Pod, args: &[&str]) -> BufReader<ChildStdout> {
        let mut child = self
            .testpod(pod, args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        self.children.lock().unwrap().push(child);
        stdout
    }

    /// Starts a load or a stream in `pod` that runs until [`Running::stop`] (`args` should hold
    /// `--until-stdin-closes`, and a `--secs` bound): it outlasts whatever the test does
    /// meanwhile, however slow the machine.
    pub fn start_until_stopped(&self, pod: &Pod, args: &[&str]) -> Running {
        let mut child = self
            .testpod(pod, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        self.children.lock().unwrap().push(child);
        Running { stdout, stdin }
    }

    /// Watches the segments crossing the node's `interface` for `secs` (`aviary-testpod sniff`,
    /// in the node's network namespace, outside the pods' cgroups): returns once it watches,
    /// with its output to come.
    pub fn sniff(
        &self,
        interface: &str,
        port: u16,
        needle: &str,
        secs: u32,
    ) -> BufReader<ChildStdout> {
        let cgroup = self.cgroup_base.join("sniffer");
        fs::create_dir_all(&cgroup).unwrap();
        let (port, secs) = (port.to_string(), secs.to_string());
        let args = [
            "sniff",
            "--interface",
            interface,
            "--port",
            &port,
            "--needle",
            needle,
            "--secs",
            &secs,
        ];
        let mut child = self
            .command_in(
                &self.netns,
                &cgroup,
                &workspace_bin("aviary-testpod"),
                &args,
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        self.children.lock().unwrap().push(child);
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        assert_eq!(first.trim(), "sniffing");
        stdout
    }

    /// Runs `program` in `pod` to completion (bounded by `timeout`).
    pub fn run_program(
        &self,
        pod: &Pod,
        program: &Path,
        args: &[&str],
        timeout: Duration,
    ) -> Output {
        let child = self
            .command_in(&pod.netns, &pod.cgroup, program, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_output(child, timeout)
    }

    /// Runs a client in `pod` to completion (bounded by `timeout`).
    pub fn run(&self, pod: &Pod, args: &[&str], timeout: Duration) -> Output {
        let child = self
            .testpod(pod, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_output(child, timeout)
    }

    /// One connection through which every [`Session::echo`] passes.
    pub fn session(&self, pod: &Pod, addr: SocketAddr) -> Session {
        let mut child = self
            .testpod(pod, &["session", &addr.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut greeting = String::new();
        stdout.read_line(&mut greeting).unwrap();
        Session {
            greeting: Greeting::parse(&greeting).unwrap_or_else(|e| panic!("{e:#}")),
            child,
            stdin,
            stdout,
        }
    }

    /// Writes the policy directory's single file, atomically (the agent never sees half of it).
    pub fn write_policy(&self, yaml: &str) {
        let tmp = self.policy_dir.join(".policy.yaml.tmp");
        fs::write(&tmp, yaml).unwrap();
        fs::rename(&tmp, self.policy_dir.join("policy.yaml")).unwrap();
    }

    /// The agent pod's container cgroup: inside the attach root, as on a real node, so that
    /// sock_ops sees the proxy's sockets.
    pub fn agent_cgroup(&self) -> PathBuf {
        self.pod_cgroup(&self.agent_uid(), "agent")
    }

    pub fn agent_uid(&self) -> String {
        format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), 1)
    }

    /// Starts the agent on this node, in local mode over `policy_dir`, and waits until it is
    /// ready. Its log lines are echoed to stderr (the test's output).
    pub fn start_agent(&self, extra: &[&str]) -> Agent {
        let policy_dir = self.policy_dir.to_string_lossy().into_owned();
        self.spawn_agent(
            &[&["--local", &policy_dir], extra].concat(),
            CgroupRoot::Given,
            true,
        )
    }

    /// The same with no `--cgroup-root`: the agent finds the pod root as on a real node, where
    /// it is `kubepods` or `kubepods.slice` at the top of the cgroup v2 mount. The agent runs in
    /// a mount namespace of its own in which this node's cgroup directory is mounted over the
    /// cgroup v2 mount point, so that what it finds there is this node's.
    pub fn start_agent_finding_cgroups(&self, extra: &[&str]) -> Agent {
        let policy_dir = self.policy_dir.to_string_lossy().into_owned();
        let source = [&["--local", policy_dir.as_str()], extra].concat();
        self.spawn_agent(&source, CgroupRoot::Found, true)
    }

    /// The same, keeping the log lines to itself (the demo prints its own progress).
    pub fn start_agent_quietly(&self, extra: &[&str]) -> Agent {
        let policy_dir = self.policy_dir.to_string_lossy().into_owned();
        self.spawn_agent(
            &[&["--local", &policy_dir], extra].concat(),
            CgroupRoot::Given,
            false,
        )
    }

    /// Starts the agent against an API server (the fixture), as node [`TEST_NODE`].
    pub fn start_agent_with_api_server(&self, kubeconfig: &Path, extra: &[&str]) -> Agent {
        let kubeconfig = kubeconfig.to_string_lossy().into_owned();
        let source = ["--node-name", TEST_NODE, "--kubeconfig", &kubeconfig];
        self.spawn_agent(&[&source, extra].concat(), CgroupRoot::Given, true)
    }

    /// Where this node's agents hand over to their successors (one per node, as on a real
    /// node: tests run nodes side by side).
    pub fn handoff_socket(&self) -> PathBuf {
        Path::new(HANDOFF_DIR).join(format!("{}.sock", self.pin_name))
    }

    /// `aviary-agent uninstall` for this node's agent, run where the agent runs: takes away the
    /// datapath an agent leaves when it exits.
    pub fn uninstall(&self) -> std::io::Result<Output> {
        let cgroup = self.agent_cgroup();
        fs::create_dir_all(&cgroup)?;
        self.command_in(
            &self.netns,
            &cgroup,
            &workspace_bin("aviary-agent"),
            &["uninstall", "--pin-name", &self.pin_name],
        )
        .output()
    }

    /// A listening socket in the node's network namespace, where the agent runs.
    pub fn listen_in_node(&self) -> std::net::TcpListener {
        let netns = ns_path(&self.netns);
        std::thread::spawn(move || {
            let ns = fs::File::open(netns).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            listener
        })
        .join()
        .unwrap()
    }

    fn spawn_agent(&self, source: &[&str], cgroups: CgroupRoot, echo_logs: bool) -> Agent {
        let cgroup = self.agent_cgroup();
        fs::create_dir_all(&cgroup).unwrap();
        let root = self.cgroup_root.to_string_lossy().into_owned();
        let node_ip = self.ip().to_string();
        let handoff = self.handoff_socket().to_string_lossy().into_owned();
        let mut args = source.to_vec();
        args.extend([
            "--proxy-ip",
            &node_ip,
            "--pin-name",
            &self.pin_name,
            "--handoff-socket",
            &handoff,
        ]);
        let agent = workspace_bin("aviary-agent").to_string_lossy().into_owned();
        let base = self.cgroup_base.to_string_lossy().into_owned();
        let mount = cgroup2()
            .expect("checked by privileged()")
            .to_string_lossy()
            .into_owned();
        let mut command = match cgroups {
            CgroupRoot::Given => {
                args.extend(["--cgroup-root", &root]);
                self.command_in(&self.netns, &cgroup, Path::new(&agent), &args)
            }
            CgroupRoot::Found => {
                // unshare(1) makes the mount namespace; the bind mount hides the machine's own
                // pod root (if any) behind this node's.
                let script = r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#;
                let wrapped = [
                    &[
                        "--mount",
                        "--propagation",
                        "private",
                        "sh",
                        "-c",
                        script,
                        "sh",
                    ],
                    &[base.as_str(), mount.as_str(), agent.as_str()][..],
                    &args[..],
                ]
                .concat();
                self.command_in(&self.netns, &cgroup, Path::new("unshare"), &wrapped)
            }
        };
        let child = command
            .env(
                "AVIARY_LOG",
                std::env::var("AVIARY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let agent = Agent::new(child, Path::new(BPFFS).join(&self.pin_name), echo_logs);
        agent.wait_for_log("agent ready", Duration::from_secs(30));
        agent
    }
}

/// Whether the agent is told its pod root or finds it.
enum CgroupRoot {
    Given,
    Found,
}

impl Drop for Node {
    fn drop(&mut self) {
        // First, while the node's network namespace (with the inbound policy routing and the
        // interfaces' attachments) still exists.
        if Path::new(BPFFS).join(&self.pin_name).exists() {
            match self.uninstall() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "aviary-agent uninstall failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => eprintln!("running aviary-agent uninstall: {e}"),
            }
        }
        for mut child in self.children.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.pods.lock().unwrap().drain(..) {
            let _ = sh(&["ip", "netns", "del", &ns]);
        }
        let _ = sh(&["ip", "netns", "del", &self.netns]);
        remove_tree(&self.cgroup_base);
        remove_tree(&Path::new(BPFFS).join(&self.pin_name));
        let _ = fs::remove_file(self.handoff_socket());
        let _ = fs::remove_dir_all(&self.policy_dir);
    }
}

pub struct Pod {
    pub name: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub netns: String,
    /// The container's cgroup; its parent is the pod-level cgroup.
    pub cgroup: PathBuf,
}

impl Pod {
    /// The pod-level cgroup id, as the agent enrols it.
    pub fn cgroup_id(&self) -> u64 {
        aviary_agent::cgroup::cgroup_id(self.cgroup.parent().unwrap()).unwrap()
    }
}

/// The child's output once it exits, read as it comes (a child whose output outgrew a pipe
/// would otherwise wait on it forever); killed after `timeout`.
fn wait_output(child: Child, timeout: Duration) -> Output {
    let timeout = patience(timeout);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || done_tx.send(child.wait_with_output()));
    match done.recv_timeout(timeout) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let out = done.recv().unwrap().unwrap();
            panic!(
                "command timed out after {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// What a backend says first on each connection: who it is and the addresses it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub name: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

impl Greeting {
    pub fn parse(line: &str) -> anyhow::Result<Self> {
        let parse = || -> Option<Self> {
            let rest = line.trim().strip_prefix("hello from ")?;
            let mut words = rest.split(' ');
            let name = words.next()?.to_owned();
            let peer = words.next()?.strip_prefix("peer=")?.parse().ok()?;
            let local = words.next()?.strip_prefix("local=")?.parse().ok()?;
            Some(Self { name, peer, local })
        };
        parse().with_context(|| format!("not a greeting: {line:?}"))
    }

    /// The greeting printed first by `aviary-testpod connect`.
    pub fn of(output: &Output) -> Self {
        assert!(
            output.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        Self::parse(stdout.lines().next().unwrap_or_default()).unwrap_or_else(|e| panic!("{e:#}"))
    }
}

pub struct Session {
    pub greeting: Greeting,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Session {
    /// Sends a line through the connection and returns its echo.
    pub fn echo(&mut self, line: &str) -> String {
        self.try_echo(line)
            .unwrap_or_else(|| panic!("the session ended before echoing {line:?}"))
    }

    /// The same, or None once the connection has ended.
    pub fn try_echo(&mut self, line: &str) -> Option<String> {
        writeln!(self.stdin, "{line}").ok()?;
        self.stdin.flush().ok()?;
        let mut echo = String::new();
        match self.stdout.read_line(&mut echo) {
            Ok(n) if n > 0 => Some(echo.trim_end().to_owned()),
            _ => None,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent process, with its log lines.
pub struct Agent {
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    /// Set once the last of its log lines has been read (its stderr closed).
    logs_ended: Arc<AtomicBool>,
    pub pin_dir: PathBuf,
}

impl Agent {
    fn new(mut child: Child, pin_dir: PathBuf, echo_logs: bool) -> Self {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let (sink, logs_ended) = (logs.clone(), Arc::new(AtomicBool::new(false)));
        let ended = logs_ended.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo_logs {
                    eprintln!("[agent] {line}");
                }
                sink.lock().unwrap().push(line);
            }
            ended.store(true, Ordering::Release);
        });
        Self {
            child: Some(child),
            logs,
            logs_ended,
            pin_dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent stopped").id()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let found = wait_until(timeout, || {
            self.logs().into_iter().find(|l| l.contains(needle))
        });
        found.unwrap_or_else(|| {
            panic!(
                "the agent never logged {needle:?}; logs:\n{}",
                self.logs().join("\n")
            )
        })
    }

    pub fn stats(&self) -> Stats {
        Stats::open(&self.pin_dir).expect("opening the agent's pinned counters")
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.stats().counter(name).unwrap()
    }

    /// Waits until the agent's maps enrol exactly `pods` and capture `services` addresses.
    pub fn wait_for_capture(&self, pods: &[&Pod], services: usize) {
        let want: std::collections::BTreeSet<u64> = pods.iter().map(|p| p.cgroup_id()).collect();
        let table = CaptureTable::open(&self.pin_dir).unwrap();
        let ok = wait_until(Duration::from_secs(10), || {
            let enrolled = table.enrolled().ok()?;
            let captured = table.services().ok()?.len();
            (enrolled == want && captured == services).then_some(())
        });
        assert!(
            ok.is_some(),
            "capture maps never matched; logs:\n{}",
            self.logs().join("\n")
        );
    }

    /// SIGTERM, then the exit status; the test fails if the agent does not exit in time.
    /// SIGTERM, and waits until it has exited and its last log line is read.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = self.stop().unwrap_or_else(|| {
            panic!(
                "the agent ignored SIGTERM for 10 s; logs:\n{}",
                self.logs().join("\n")
            )
        });
        let ended = &self.logs_ended;
        wait_until(Duration::from_secs(5), || {
            ended.load(Ordering::Acquire).then_some(())
        })
        .expect("the agent exited, so its stderr closes");
        status
    }

    /// SIGTERM, then SIGKILL if the agent has not exited after 10 s (None then).
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
        let status = wait_until(Duration::from_secs(10), || child.try_wait().ok().flatten());
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// SIGKILL: no chance to clean up, as when the agent crashes.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("agent already stopped");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `check` every 20 ms until it returns Some or `timeout` (stretched by [`patience`])
/// passes.
pub fn wait_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + patience(timeout);
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// "word key n" lines of a successful client's output, as key -> n.
pub fn tally(out: &Output, word: &str) -> std::collections::BTreeMap<String, u32> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tally_lines(&String::from_utf8_lossy(&out.stdout), word)
}

/// "word key n" lines of `text`, as key -> n.
pub fn tally_lines(text: &str, word: &str) -> std::collections::BTreeMap<String, u32> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix(word)?.trim().split(' ');
            Some((w.next()?.to_owned(), w.next()?.parse().ok()?))
        })
        .collect()
}

/// A test pod's load or stream that runs until told to stop: [`Node::start_until_stopped`].
pub struct Running {
    stdout: BufReader<ChildStdout>,
    stdin: Option<ChildStdin>,
}

impl Running {
    /// Its next line of output.
    pub fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line
    }

    /// Tells it to stop (its standard input closes), and returns what it printed once it
    /// ended.
    pub fn stop(mut self) -> String {
        drop(self.stdin.take());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut text).unwrap();
        text
    }
}
