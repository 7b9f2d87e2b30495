//! The eBPF datapath: loads the embedded programs, attaches them at the pod cgroup root, pins
//! maps and links under the bpf filesystem, and removes all of it on shutdown.
//!
//! Layout under the pin directory: `maps/<NAME>` for every map, `links/<program>` for every
//! cgroup attachment. sk_msg is attached to the pinned SOCKETS map and lives as long as it does.

pub mod maps;
mod netlink;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use aviary_abi::{map_name, AgentConfig, SockAddr, CONFIG_IPV6, CONFIG_SK_MSG};
use aya::{
    maps::{Array, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, SkLookup, SkMsg, SockOps,
        TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use tracing::{info, warn};

use crate::config::Config;

/// The compiled programs, built by build.rs from ebpf/aviary-ebpf.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/aviary"));

const CONNECT4: &str = "aviary_connect4";
const CONNECT6: &str = "aviary_connect6";
const SOCK_OPS: &str = "aviary_sock_ops";
const SK_MSG: &str = "aviary_sk_msg";
const INBOUND: &str = "aviary_inbound";
const INBOUND_BRIDGED: &str = "aviary_inbound_bridged";
const INBOUND_LOOKUP: &str = "aviary_inbound_lookup";

/// The uplinks by their default routes, as the only value of `--inbound-interfaces`.
pub const AUTO_UPLINKS: &str = "auto";

/// Linux 5.10: listening sockets in a SockMap (fail-open check), cgroup bpf_link, ancestor
/// cgroup ids in connect programs, and sk_msg on TCP.
const MIN_KERNEL: (u32, u32) = (5, 10);

/// Cgroup programs attach through bpf_link (Linux 5.7+), which takes no attach flags and always
/// runs alongside other programs on the same cgroup (a CNI's, a security agent's).
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// What the programs need to know about this agent.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub cgroup_root: PathBuf,
    /// The uplinks, where inbound capture runs for clients elsewhere (TC ingress); `["auto"]`:
    /// the default routes' interfaces; empty: no inbound capture.
    pub inbound_interfaces: Vec<String>,
    /// The pods' bridge (a bridge CNI), whose ports are the pods' host-side veths.
    pub inbound_bridge: Option<String>,
    pub bpffs: PathBuf,
    pub pin_dir: PathBuf,
    pub programs: AgentConfig,
}

impl DatapathConfig {
    pub fn from_config(cfg: &Config) -> Self {
        let mut flags = 0;
        if cfg.sk_msg {
            flags |= CONFIG_SK_MSG;
        }
        let proxy_v6 = cfg.proxy_v6.map(|ip| {
            flags |= CONFIG_IPV6;
            SockAddr::from(std::net::SocketAddr::from((ip, 0))).addr
        });
        Self {
            cgroup_root: cfg.cgroup_root.clone(),
            inbound_interfaces: cfg.inbound_interfaces.clone(),
            inbound_bridge: cfg.inbound_bridge.clone(),
            bpffs: cfg.bpffs.clone(),
            pin_dir: cfg.pin_dir.clone(),
            programs: AgentConfig {
                proxy_v4: u32::from_ne_bytes(cfg.proxy_v4.octets()),
                proxy_v6: proxy_v6.unwrap_or_default(),
                proxy_port: cfg.outbound_port.into(),
                proxy_mark: cfg.proxy_mark,
                flags,
                // Read from the bridge when inbound capture attaches to it.
                bridge_mac: [0; 6],
                _pad: [0; 2],
            },
        }
    }
}

/// The uplinks named, by index: `["auto"]` stands for the default routes' interfaces.
fn uplinks(names: &[String]) -> anyhow::Result<BTreeMap<u32, String>> {
    if names == [AUTO_UPLINKS] {
        let found = netlink::default_route_interfaces()?;
        anyhow::ensure!(
            !found.is_empty(),
            "--inbound-interfaces auto: this node has no IPv4 default route to find its uplink by; name the uplink instead"
        );
        return Ok(found);
    }
    names
        .iter()
        .map(|name| Ok((netlink::interface(name)?.0, name.clone())))
        .collect()
}

/// The loaded and attached programs. Dropping it without [`Datapath::shutdown`] leaves the pins,
/// and with them the attachments, in place, as a SIGKILL would: capture then fails open.
pub struct Datapath {
    pin_dir: PathBuf,
    links: Vec<PinnedLink>,
    /// Whether the inbound policy routing is installed (and so removed at shutdown).
    inbound_routing: bool,
    /// The uplinks inbound capture runs on, by index.
    inbound_uplinks: BTreeSet<u32>,
    /// The index of the pods' bridge.
    inbound_bridge: Option<u32>,
    /// The pods' host-side veths (by index) inbound capture is attached to.
    inbound_pods: BTreeSet<u32>,
    ebpf: Ebpf,
}

impl Datapath {
    pub fn load(cfg: &DatapathConfig) -> anyhow::Result<Self> {
        preflight(cfg)?;
        clear_stale_pins(&cfg.pin_dir)?;
        let maps_dir = cfg.pin_dir.join("maps");
        let links_dir = cfg.pin_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // From here on a failure must not leave half a datapath pinned.
        let mut datapath = Self {
            pin_dir: cfg.pin_dir.clone(),
            links: Vec::new(),
            inbound_routing: false,
            inbound_uplinks: BTreeSet::new(),
            inbound_bridge: None,
            inbound_pods: BTreeSet::new(),
            ebpf: EbpfLoader::new()
                .load(PROGRAMS)
                .map_err(|e| explain("loading the eBPF object", &e))?,
        };
        match datapath.attach(cfg, &maps_dir, &links_dir) {
            Ok(()) => Ok(datapath),
            Err(e) => {
                datapath.shutdown();
                Err(e)
            }
        }
    }

    fn attach(
        &mut self,
        cfg: &DatapathConfig,
        maps_dir: &Path,
        links_dir: &Path,
    ) -> anyhow::Result<()> {
        let ebpf = &mut self.ebpf;
        let config_map = ebpf
            .map_mut(map_name::CONFIG)
            .context("CONFIG map missing")?;
        let mut programs = cfg.programs;
        if let Some(bridge) = &cfg.inbound_bridge {
            let (index, mac) = netlink::interface(bridge)?;
            programs.bridge_mac = mac;
            self.inbound_bridge = Some(index);
        }
        Array::<_, AgentConfig>::try_from(config_map)?
            .set(0, programs, 0)
            .map_err(|e| explain("writing the program configuration", &e))?;
        for name in map_name::ALL {
            let map = ebpf
                .map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))?;
            map.pin(maps_dir.join(name))
                .map_err(|e| explain(&format!("pinning map {name}"), &e))?;
        }

        let cgroup = fs::File::open(&cfg.cgroup_root)
            .with_context(|| format!("opening cgroup root {}", cfg.cgroup_root.display()))?;
        for name in [CONNECT4, CONNECT6] {
            let prog: &mut CgroupSockAddr = program(ebpf, name)?;
            prog.load()
                .map_err(|e| explain(&format!("loading {name}"), &e))?;
            let id = prog
                .attach(&cgroup, LINK_MODE)
                .map_err(|e| explain(&format!("attaching {name}"), &e))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            self.links.push(pin_link(link, links_dir, name)?);
        }
        let prog: &mut SockOps = program(ebpf, SOCK_OPS)?;
        prog.load().map_err(|e| explain("loading sock_ops", &e))?;
        let id = prog
            .attach(&cgroup, LINK_MODE)
            .map_err(|e| explain("attaching sock_ops", &e))?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        self.links.push(pin_link(link, links_dir, SOCK_OPS)?);

        let sockets = SockHash::<_, aviary_abi::SockKey>::try_from(
            ebpf.map(map_name::SOCKETS).context("SOCKETS map missing")?,
        )?;
        let sockets_fd = sockets.fd().try_clone()?;
        let prog: &mut SkMsg = program(ebpf, SK_MSG)?;
        prog.load().map_err(|e| explain("loading sk_msg", &e))?;
        prog.attach(&sockets_fd)
            .map_err(|e| explain("attaching sk_msg", &e))?;

        if !cfg.inbound_interfaces.is_empty() {
            let uplinks = uplinks(&cfg.inbound_interfaces)?;
            self.inbound_uplinks = uplinks.keys().copied().collect();
            if cfg.inbound_bridge.is_some() {
                let prog: &mut SchedClassifier = program(ebpf, INBOUND_BRIDGED)?;
                prog.load()
                    .map_err(|e| explain("loading inbound_bridged", &e))?;
            }
            // Links held by the loaded object, not pinned: a killed agent's TC programs go
            // with it, and inbound traffic reaches the pods directly.
            let prog: &mut SchedClassifier = program(&mut self.ebpf, INBOUND)?;
            prog.load().map_err(|e| explain("loading inbound", &e))?;
            // The bridge's own ingress is where frames from its ports reach the host.
            for interface in uplinks.values().chain(&cfg.inbound_bridge) {
                prog.attach(interface, TcAttachType::Ingress)
                    .map_err(|e| explain(&format!("attaching inbound to {interface}"), &e))?;
            }
            let netns = fs::File::open("/proc/self/ns/net")
                .context("opening the agent's network namespace")?;
            let prog: &mut SkLookup = program(&mut self.ebpf, INBOUND_LOOKUP)?;
            prog.load()
                .map_err(|e| explain("loading inbound_lookup", &e))?;
            prog.attach(netns)
                .map_err(|e| explain("attaching inbound_lookup", &e))?;
            netlink::install_inbound()?;
            self.inbound_routing = true;
            let pods = self.attach_inbound_pod_interfaces()?;
            info!(uplinks = ?uplinks.values().collect::<Vec<_>>(), bridge = ?cfg.inbound_bridge, pod_interfaces = pods, "inbound capture attached");
        }
        info!(
            cgroup_root = %cfg.cgroup_root.display(),
            pins = %self.pin_dir.display(),
            "eBPF programs attached"
        );
        Ok(())
    }

    /// Attaches inbound capture to the pods' host-side veths it is not on yet (pods come and
    /// go); returns how many it is on. A bridge port gets the program that hands frames to the
    /// host; a routed veth's frames reach the host anyway, and get the uplinks' program. Only
    /// while inbound capture is on.
    pub fn attach_inbound_pod_interfaces(&mut self) -> anyhow::Result<usize> {
        let interfaces = netlink::pod_interfaces(self.inbound_bridge, &self.inbound_uplinks)?;
        // Interfaces that went away took their attachments with them.
        self.inbound_pods
            .retain(|index| interfaces.contains_key(index));
        for (index, interface) in interfaces {
            if self.inbound_pods.contains(&index) {
                continue;
            }
            let name = if interface.bridged {
                INBOUND_BRIDGED
            } else {
                INBOUND
            };
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            match prog.attach(&interface.name, TcAttachType::Ingress) {
                Ok(_) => {
                    self.inbound_pods.insert(index);
                }
                // The interface may be gone already; the next scan settles it.
                Err(e) => {
                    warn!(interface = interface.name, error = %e, "attaching inbound capture to a pod's interface")
                }
            }
        }
        Ok(self.inbound_pods.len())
    }

    /// Whether inbound capture is attached, and so needs the inbound listener.
    pub fn captures_inbound(&self) -> bool {
        self.inbound_routing
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Detaches every program and removes every pin.
    pub fn shutdown(mut self) {
        if self.inbound_routing {
            if let Err(e) = netlink::remove_inbound() {
                warn!(error = %format!("{e:#}"), "removing the inbound policy routing");
            }
        }
        for link in self.links.drain(..) {
            // Unpinning drops the last reference to the link, which detaches it.
            if let Err(e) = link.unpin() {
                warn!(error = %e, "unpinning a link");
            }
        }
        match fs::remove_dir_all(&self.pin_dir) {
            Ok(()) => info!(pins = %self.pin_dir.display(), "eBPF programs detached and unpinned"),
            Err(e) => warn!(error = %e, pins = %self.pin_dir.display(), "removing pins"),
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    Ok(prog.try_into()?)
}

fn pin_link(link: FdLink, dir: &Path, name: &str) -> anyhow::Result<PinnedLink> {
    link.pin(dir.join(name))
        .map_err(|e| explain(&format!("pinning link {name}"), &e))
}

/// Checks what a load needs, so that a missing piece is named, with its remedy, before the
/// kernel answers with a bare errno.
fn preflight(cfg: &DatapathConfig) -> anyhow::Result<()> {
    let current = aya::util::KernelVersion::current()
        .map_err(|e| anyhow!("cannot read the kernel version: {e}"))?;
    let (major, minor) = MIN_KERNEL;
    if current < aya::util::KernelVersion::new(major as u8, minor as u8, 0) {
        anyhow::bail!(
            "kernel {current:?} is too old: Aviary needs Linux {major}.{minor} or later (sockmap \
             listeners, cgroup bpf links); upgrade the node's kernel"
        );
    }
    crate::cgroup::ensure_cgroup2(&cfg.cgroup_root)?;
    ensure_bpffs(&cfg.bpffs)?;
    raise_memlock();
    Ok(())
}

/// Mounts a bpf filesystem at `path` unless one is there.
pub fn ensure_bpffs(path: &Path) -> anyhow::Result<()> {
    let mounted = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
    };
    if mounted(path) {
        return Ok(());
    }
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        anyhow!(
            "no bpf filesystem at {} and mounting one failed ({e}); mount it \
             (`mount -t bpf bpf {}`) or give the agent CAP_SYS_ADMIN",
            path.display(),
            path.display()
        )
    })?;
    info!(path = %path.display(), "mounted the bpf filesystem (nothing was mounted there)");
    Ok(())
}

/// Kernels from 5.11 charge BPF memory to the memory cgroup and ignore RLIMIT_MEMLOCK; raising it
/// is only for older kernels, and some sandboxes refuse it.
fn raise_memlock() {
    use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!(
            error = %e,
            "could not raise RLIMIT_MEMLOCK; fine on Linux 5.11+, which accounts BPF memory to the memcg"
        );
    }
}

/// Pins left by an agent that did not shut down (SIGKILL, a crash). Their programs are still
/// attached and fail open with no proxy; removing the pins detaches them before ours attach.
fn clear_stale_pins(pin_dir: &Path) -> anyhow::Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    warn!(pins = %pin_dir.display(), "removing pins left by a previous agent (detaches its programs)");
    fs::remove_dir_all(pin_dir)
        .with_context(|| format!("removing stale pins in {}", pin_dir.display()))
}

/// One line that names the cause of a load failure and its remedy.
pub(crate) fn explain(step: &str, err: &(dyn std::error::Error + 'static)) -> anyhow::Error {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) = e.downcast_ref::<ProgramError>()
        {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(4).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return anyhow!(
                "{step}: the kernel's verifier rejected the program ({io_error}): {}; this kernel \
                 lacks a feature Aviary needs (Linux {}.{}+ with BTF is supported)",
                tail.join(" | "),
                MIN_KERNEL.0,
                MIN_KERNEL.1
            );
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                return if nix::unistd::geteuid().is_root() {
                    anyhow!(
                        "{step}: permission denied ({io}) although the agent runs as root; a \
                         seccomp profile, an LSM or kernel lockdown forbids bpf(): run the agent \
                         unconfined (seccompProfile Unconfined) with CAP_BPF, CAP_NET_ADMIN, \
                         CAP_PERFMON and CAP_SYS_ADMIN"
                    )
                } else {
                    anyhow!(
                        "{step}: permission denied ({io}); run the agent as root, or with \
                         CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_SYS_ADMIN"
                    )
                };
            }
        }
        source = e.source();
    }
    anyhow!("{step}: {}", chain(err))
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        parts.push(e.to_string());
        source = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_errors_name_the_capabilities() {
        let err = aya::sys::SyscallError {
            call: "bpf_prog_load",
            io_error: io::Error::from_raw_os_error(libc::EPERM),
        };
        let msg = explain("loading connect4", &err).to_string();
        assert!(
            msg.starts_with("loading connect4: permission denied"),
            "{msg}"
        );
        assert!(
            msg.contains("seccomp") == nix::unistd::geteuid().is_root(),
            "{msg}"
        );
        assert!(msg.contains("CAP_BPF"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn verifier_rejections_quote_the_log_on_one_line() {
        let err = ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(libc::EINVAL),
            verifier_log: aya_obj::VerifierLog::new(
                "0: r1 = 0\n1: invalid access\nprocessed 2 insns".into(),
            ),
        };
        let msg = explain("loading sock_ops", &err).to_string();
        assert!(msg.contains("verifier rejected"), "{msg}");
        assert!(msg.contains("invalid access | processed 2 insns"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn other_errors_keep_their_chain() {
        let err = io::Error::new(io::ErrorKind::NotFound, "no such map");
        assert_eq!(explain("pinning", &err).to_string(), "pinning: no such map");
    }

    #[test]
    fn program_config_carries_the_proxy_address_in_kernel_order() {
        use clap::Parser as _;
        let args = crate::config::Args::try_parse_from([
            "aviary-agent",
            "--local",
            "p",
            "--proxy-ip",
            "10.244.1.1",
            "--proxy-ip6",
            "fd00::1",
        ])
        .unwrap();
        let cfg = DatapathConfig::from_config(&Config::try_from(args).unwrap());
        assert_eq!(cfg.programs.proxy_v4.to_ne_bytes(), [10, 244, 1, 1]);
        assert_eq!(cfg.programs.proxy_port, 15001);
        assert_eq!(cfg.programs.flags, CONFIG_IPV6);
        assert_eq!(cfg.programs.proxy_v6[3].to_ne_bytes(), [0, 0, 0, 1]);
    }
}
