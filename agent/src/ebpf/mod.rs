//! The eBPF datapath: loads the embedded programs, attaches them at the pod cgroup root (and,
//! for inbound capture, on the node's interfaces and in its network namespace), and pins maps
//! and links under the bpf filesystem, where they outlive the agent: a restarted or upgraded
//! agent reuses the maps, with every connection's state in them, and swaps its programs into
//! the pinned links in one step each, so capture never pauses. Only `aviary-agent uninstall`
//! takes the datapath away.
//!
//! Layout under the pin directory: `maps/<NAME>` for every map; `links/<program>` for the
//! cgroup and network namespace attachments, `links/tc-<ifindex>` for inbound capture on an
//! interface. sk_msg is attached to the pinned SOCKETS map and lives as long as it does.

mod link;
pub mod maps;
mod netlink;
mod probe;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use aviary_abi::{map_name, AgentConfig, ABI_VERSION};
use aya::{
    maps::{Array, MapData, SockHash},
    programs::{
        links::{FdLink, Link as _},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, SkLookup, SkMsg, SockOps,
        TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use tracing::{debug, info, warn};

/// The compiled programs, built by build.rs from ebpf/aviary-ebpf.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/aviary"));

const CONNECT4: &str = "aviary_connect4";
const CONNECT6: &str = "aviary_connect6";
const SOCK_OPS: &str = "aviary_sock_ops";
const SK_MSG: &str = "aviary_sk_msg";
const INBOUND: &str = "aviary_inbound";
const INBOUND_BRIDGED: &str = "aviary_inbound_bridged";
const INBOUND_LOOKUP: &str = "aviary_inbound_lookup";

/// The pin directory's subdirectories.
const MAPS_DIR: &str = "maps";
const LINKS_DIR: &str = "links";

/// The uplinks by their default routes, as the only value of `--inbound-interfaces`.
pub const AUTO_UPLINKS: &str = "auto";

/// Linux 5.10: listening sockets in a SockMap (fail-open check), cgroup bpf_link, ancestor
/// cgroup ids in connect programs, and sk_msg on TCP.
const MIN_KERNEL: (u32, u32) = (5, 10);

/// Linux 6.6: TCX, whose bpf_links can be pinned and have their program replaced, which is how
/// inbound capture on the interfaces outlives the agent and is handed from one to the next.
const MIN_TCX_KERNEL: (u32, u32) = (6, 6);

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
    /// How inbound capture attaches to interfaces.
    pub tc_attach: TcAttach,
    pub bpffs: PathBuf,
    pub pin_dir: PathBuf,
    pub programs: AgentConfig,
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

/// What a start finds of the maps a previous agent pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PinnedMaps {
    /// None: this is the first agent (since an uninstall).
    Absent,
    /// Of this agent's layout: reused, with the state in them.
    Compatible,
    /// Of another layout (`found`; None: from before layouts had versions): replaced by new
    /// ones.
    Incompatible { found: Option<u32> },
}

impl PinnedMaps {
    /// `any_pinned`: whether any map is pinned; `found`: the version in the pinned ABI map.
    fn judge(any_pinned: bool, found: Option<u32>) -> Self {
        match found {
            Some(ABI_VERSION) => Self::Compatible,
            found if any_pinned => Self::Incompatible { found },
            _ => Self::Absent,
        }
    }

    fn inspect(maps_dir: &Path) -> Self {
        let any_pinned = fs::read_dir(maps_dir).is_ok_and(|mut entries| entries.next().is_some());
        let found = MapData::from_pin(maps_dir.join(map_name::ABI))
            .ok()
            .and_then(|data| Array::<_, u32>::try_from(aya::maps::Map::Array(data)).ok())
            .and_then(|abi| abi.get(&0, 0).ok());
        Self::judge(any_pinned, found)
    }
}

/// Where a pinned link stands to the program a load puts through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attached {
    /// The link a previous agent pinned now runs this agent's program.
    Replaced,
    /// The link runs a newer agent's program already (two agents overlap in an upgrade).
    Newer,
    /// A new link, pinned.
    New,
}

/// How many attachments a load replaced and made.
#[derive(Debug, Default)]
struct AttachCount {
    replaced: usize,
    new: usize,
}

impl AttachCount {
    fn add(&mut self, attached: Attached) {
        match attached {
            Attached::Replaced => self.replaced += 1,
            Attached::New => self.new += 1,
            Attached::Newer => {}
        }
    }
}

/// A program to put in force through a pinned link.
struct Attach<'a> {
    fd: BorrowedFd<'a>,
    id: u32,
}

/// Attaches `program` through the link pinned at `pin`. A link pinned there (a previous
/// agent's) gets the program in one step (bpf_link_update), so what it is attached to is never
/// without one; unless it already runs a newer program: program ids grow with each load, and a
/// link never goes back to an older agent's program (the old agent still scans for new pods'
/// interfaces while its successor starts). A link `in_place` rejects (its target is not this
/// agent's) is detached. Without a link, `attach` makes one, which is pinned there.
fn attach_pinned(
    pin: &Path,
    program: Attach<'_>,
    in_place: impl FnOnce(&link::LinkInfo) -> bool,
    attach: impl FnOnce() -> anyhow::Result<FdLink>,
) -> anyhow::Result<Attached> {
    match link::open(pin) {
        Ok(old) => {
            let info = link::info(old.as_fd()).map_err(|e| {
                explain(&format!("reading the link pinned at {}", pin.display()), &e)
            })?;
            if !in_place(&info) {
                info!(pin = %pin.display(), "a pinned link is attached elsewhere than this agent attaches: detaching it");
                detach_pinned(pin)?;
            } else if info.program_id >= program.id {
                debug!(pin = %pin.display(), "a newer agent's program is attached here already");
                return Ok(Attached::Newer);
            } else {
                match link::update(old.as_fd(), program.fd) {
                    Ok(()) => return Ok(Attached::Replaced),
                    // What it was attached to went away, and the link with it.
                    Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
                        debug!(pin = %pin.display(), "a pinned link whose target is gone: replacing it");
                        remove_pin(pin)?;
                    }
                    Err(e) => {
                        warn!(pin = %pin.display(), error = %e, "could not replace the program of a pinned link; detaching it and attaching anew");
                        detach_pinned(pin)?;
                    }
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(explain(
                &format!("opening the link pinned at {}", pin.display()),
                &e,
            ))
        }
    }
    attach()?
        .pin(pin)
        .map_err(|e| explain(&format!("pinning link {}", pin.display()), &e))?;
    Ok(Attached::New)
}

fn remove_pin(pin: &Path) -> anyhow::Result<()> {
    match fs::remove_file(pin) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", pin.display()))
        }
        _ => Ok(()),
    }
}

/// How inbound capture's TC programs are attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcAttach {
    /// A TCX link (Linux 6.6+), pinned at `links/tc-<ifindex>` and updated in place.
    Tcx,
    /// A netlink filter on the interface's clsact qdisc, as older kernels need: the filter
    /// outlives the agent, and its program is pinned at `links/tc-nl-<ifindex>`, which names the
    /// interface for the next agent (it replaces the program in the same filter) and for
    /// `uninstall` (it deletes the filter).
    Netlink,
}

impl TcAttach {
    /// TCX where the kernel has it (Linux 6.6+), else netlink filters.
    pub fn for_this_kernel() -> Self {
        let (major, minor) = MIN_TCX_KERNEL;
        match aya::util::KernelVersion::current() {
            Ok(v) if v >= aya::util::KernelVersion::new(major as u8, minor as u8, 0) => Self::Tcx,
            _ => Self::Netlink,
        }
    }
}

/// The netlink filter's place on an interface's ingress: a fixed priority and handle, so that
/// each agent finds (and replaces) its predecessor's. Priority 1 runs first, as TCX's
/// attachment does.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: TcHandle = TcHandle::new(0, 0xa71b);

/// The pin of inbound capture's attachment on the interface with index `index`.
fn tc_pin(links_dir: &Path, index: u32, mode: TcAttach) -> PathBuf {
    match mode {
        TcAttach::Tcx => links_dir.join(format!("tc-{index}")),
        TcAttach::Netlink => links_dir.join(format!("{TC_NETLINK_PIN}{index}")),
    }
}

const TC_NETLINK_PIN: &str = "tc-nl-";

/// Attaches the TC program `name` to the ingress of `interface` (with index `index`), as
/// `mode` says.
fn attach_tc(
    ebpf: &mut Ebpf,
    name: &str,
    links_dir: &Path,
    (index, interface): (u32, &str),
    mode: TcAttach,
) -> anyhow::Result<Attached> {
    let prog: &mut SchedClassifier = program(ebpf, name)?;
    let pin = tc_pin(links_dir, index, mode);
    if mode == TcAttach::Netlink {
        return attach_tc_netlink(prog, name, &pin, interface);
    }
    let fd = prog.fd()?.try_clone()?;
    let ours = Attach {
        fd: fd.as_fd(),
        id: prog.info()?.id(),
    };
    // The pin names the interface.
    attach_pinned(
        &pin,
        ours,
        |_| true,
        || {
            let id = prog
                .attach(interface, TcAttachType::Ingress)
                .map_err(|e| explain(&format!("attaching {name} to {interface}"), &e))?;
            Ok(prog.take_link(id)?.try_into()?)
        },
    )
}

/// The netlink errno behind a TC error, if any.
fn netlink_errno(e: &TcError) -> Option<i32> {
    match e {
        TcError::NetlinkError(e) => e.raw_os_error(),
        TcError::IoError(e) => e.raw_os_error(),
        _ => None,
    }
}

fn attach_tc_netlink(
    prog: &mut SchedClassifier,
    name: &str,
    pin: &Path,
    interface: &str,
) -> anyhow::Result<Attached> {
    // The qdisc filters hang from: made unless the CNI or a previous agent made it.
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => info!(interface, "added a clsact qdisc for inbound capture"),
        Err(TcError::AlreadyAttached) => {}
        Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(explain(
                &format!("adding a clsact qdisc to {interface}"),
                &e,
            ))
        }
    }
    let options = TcAttachOptions::Netlink(NlOptions {
        priority: TC_PRIORITY,
        handle: TC_HANDLE,
        ..Default::default()
    });
    let (id, attached) = match prog.attach_with_options(interface, TcAttachType::Ingress, options) {
        Ok(id) => (id, Attached::New),
        // A previous agent's filter: its program is replaced in the same filter, so the
        // interface is never without one.
        Err(ProgramError::TcError(e)) if netlink_errno(&e) == Some(libc::EEXIST) => {
            let theirs = netlink_filter(interface)?;
            let id = prog
                .attach_to_link(theirs)
                .map_err(|e| explain(&format!("replacing {name}'s filter on {interface}"), &e))?;
            (id, Attached::Replaced)
        }
        Err(e) => return Err(explain(&format!("attaching {name} to {interface}"), &e)),
    };
    // The filter outlives the agent, as a TCX link does: not detached with the handle.
    std::mem::forget(prog.take_link(id)?);
    remove_pin(pin)?;
    prog.pin(pin)
        .map_err(|e| explain(&format!("pinning {name} at {}", pin.display()), &e))?;
    Ok(attached)
}

/// Inbound capture's netlink filter on `interface`'s ingress (its fixed priority and handle).
fn netlink_filter(interface: &str) -> anyhow::Result<SchedClassifierLink> {
    SchedClassifierLink::attached(
        interface,
        TcAttachType::Ingress,
        TC_PRIORITY,
        TC_HANDLE,
        None,
    )
    .map_err(|e| {
        explain(
            &format!("finding inbound capture's filter on {interface}"),
            &e,
        )
    })
}

/// Deletes the netlink filter whose program is pinned at `pin` (`tc-nl-<ifindex>`), unless
/// its interface is gone (and the filter with it), and removes the pin.
fn detach_tc_netlink(pin: &Path, index: u32) -> anyhow::Result<()> {
    if let Ok(interface) = nix::net::if_::if_indextoname(index) {
        let interface = interface.to_string_lossy();
        let filter = netlink_filter(&interface)?;
        match filter.detach() {
            Ok(()) => {}
            // Deleted already.
            Err(ProgramError::TcError(e)) if netlink_errno(&e) == Some(libc::ENOENT) => {}
            Err(e) => {
                return Err(explain(
                    &format!("deleting inbound capture's filter on {interface}"),
                    &e,
                ))
            }
        }
    }
    remove_pin(pin)
}

/// Inbound capture's interfaces.
struct InboundCapture {
    mode: TcAttach,
    /// The uplinks, by index.
    uplinks: BTreeSet<u32>,
    /// The index of the pods' bridge.
    bridge: Option<u32>,
    /// The pods' host-side veths (by index) it is attached to.
    pods: BTreeSet<u32>,
}

/// The loaded and attached programs. Dropping it leaves everything attached and pinned: capture
/// goes on without the agent, failing open (new connections go direct) while no proxy listens,
/// until the next agent takes over or `aviary-agent uninstall` removes it.
pub struct Datapath {
    pin_dir: PathBuf,
    /// While inbound capture is on.
    inbound: Option<InboundCapture>,
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the programs and puts them in force, taking over what a previous agent left: the
    /// pinned maps when their layout is this agent's, and every pinned link.
    pub fn load(cfg: &DatapathConfig) -> anyhow::Result<Self> {
        preflight(cfg)?;
        let first = !cfg.pin_dir.exists();
        let maps_dir = cfg.pin_dir.join(MAPS_DIR);
        let links_dir = cfg.pin_dir.join(LINKS_DIR);
        match PinnedMaps::inspect(&maps_dir) {
            PinnedMaps::Absent => {}
            PinnedMaps::Compatible => info!(
                pins = %maps_dir.display(),
                abi = ABI_VERSION,
                "reusing the pinned maps: connection tracking and capture state carry over"
            ),
            PinnedMaps::Incompatible { found } => {
                let found = found.map_or_else(|| "none".to_owned(), |v| v.to_string());
                warn!(
                    pins = %maps_dir.display(),
                    found,
                    want = ABI_VERSION,
                    "the pinned maps have another layout (ABI version {found}, this agent's is {ABI_VERSION}): replacing them; connections captured before lose their state"
                );
                fs::remove_dir_all(&maps_dir)
                    .with_context(|| format!("removing {}", maps_dir.display()))?;
            }
        }
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut loader = EbpfLoader::new();
        for name in map_name::ALL {
            // Opened when pinned there, else created and pinned there.
            loader.map_pin_path(name, maps_dir.join(name));
        }
        let mut datapath = Self {
            pin_dir: cfg.pin_dir.clone(),
            inbound: None,
            ebpf: loader
                .load(PROGRAMS)
                .map_err(|e| explain("loading the eBPF object", &e))?,
        };
        match datapath.attach(cfg, &links_dir) {
            Ok(()) => Ok(datapath),
            Err(e) => {
                // A previous agent's datapath stays as it is; a first one must not stay half made.
                if first {
                    if let Err(e) = uninstall(&cfg.pin_dir) {
                        warn!(error = %format!("{e:#}"), "removing the partly installed datapath");
                    }
                }
                Err(e)
            }
        }
    }

    fn attach(&mut self, cfg: &DatapathConfig, links_dir: &Path) -> anyhow::Result<()> {
        let mut programs = cfg.programs;
        let bridge = match &cfg.inbound_bridge {
            Some(bridge) if !cfg.inbound_interfaces.is_empty() => {
                let (index, mac) = netlink::interface(bridge)?;
                programs.bridge_mac = mac;
                Some((index, bridge.clone()))
            }
            _ => None,
        };
        let ebpf = &mut self.ebpf;
        Array::<_, AgentConfig>::try_from(
            ebpf.map_mut(map_name::CONFIG)
                .context("CONFIG map missing")?,
        )?
        .set(0, programs, 0)
        .map_err(|e| explain("writing the program configuration", &e))?;
        Array::<_, u32>::try_from(ebpf.map_mut(map_name::ABI).context("ABI map missing")?)?
            .set(0, ABI_VERSION, 0)
            .map_err(|e| explain("writing the maps' ABI version", &e))?;

        let mut count = AttachCount::default();
        let mut wanted: BTreeSet<PathBuf> = BTreeSet::new();
        let cgroup = fs::File::open(&cfg.cgroup_root)
            .with_context(|| format!("opening cgroup root {}", cfg.cgroup_root.display()))?;
        let cgroup_id = crate::cgroup::cgroup_id(&cfg.cgroup_root)
            .with_context(|| format!("reading cgroup root {}", cfg.cgroup_root.display()))?;
        // A link a previous agent attached to another cgroup root (--cgroup-root changed) is
        // detached, not taken over.
        let on_cgroup_root = |info: &link::LinkInfo| info.cgroup_id == cgroup_id;
        for name in [CONNECT4, CONNECT6] {
            let prog: &mut CgroupSockAddr = program(ebpf, name)?;
            prog.load()
                .map_err(|e| explain(&format!("loading {name}"), &e))?;
            let fd = prog.fd()?.try_clone()?;
            let ours = Attach {
                fd: fd.as_fd(),
                id: prog.info()?.id(),
            };
            let pin = links_dir.join(name);
            count.add(attach_pinned(&pin, ours, on_cgroup_root, || {
                let id = prog
                    .attach(&cgroup, LINK_MODE)
                    .map_err(|e| explain(&format!("attaching {name}"), &e))?;
                Ok(prog.take_link(id)?.try_into()?)
            })?);
            wanted.insert(pin);
        }
        let prog: &mut SockOps = program(ebpf, SOCK_OPS)?;
        prog.load().map_err(|e| explain("loading sock_ops", &e))?;
        let fd = prog.fd()?.try_clone()?;
        let ours = Attach {
            fd: fd.as_fd(),
            id: prog.info()?.id(),
        };
        let pin = links_dir.join(SOCK_OPS);
        count.add(attach_pinned(&pin, ours, on_cgroup_root, || {
            let id = prog
                .attach(&cgroup, LINK_MODE)
                .map_err(|e| explain("attaching sock_ops", &e))?;
            Ok(prog.take_link(id)?.try_into()?)
        })?);
        wanted.insert(pin);

        let sockets = SockHash::<_, aviary_abi::SockKey>::try_from(
            ebpf.map(map_name::SOCKETS).context("SOCKETS map missing")?,
        )?;
        let sockets_fd = sockets.fd().try_clone()?;
        let prog: &mut SkMsg = program(ebpf, SK_MSG)?;
        prog.load().map_err(|e| explain("loading sk_msg", &e))?;
        // Takes the place of the program a previous agent attached to the same map.
        let id = prog
            .attach(&sockets_fd)
            .map_err(|e| explain("attaching sk_msg", &e))?;
        // An attachment to a map, not a link: dropping its handle would detach it, and it must
        // stay for as long as the map.
        std::mem::forget(prog.take_link(id)?);

        let had_inbound = links_dir.join(INBOUND_LOOKUP).exists();
        if !cfg.inbound_interfaces.is_empty() {
            self.attach_inbound(cfg, links_dir, bridge, &mut count, &mut wanted)?;
        } else if had_inbound {
            // The previous agent captured inbound connections and this one does not.
            netlink::remove_inbound()?;
        }
        // What a previous agent attached and this one does not: inbound capture it had on,
        // interfaces gone since.
        let mut detached = 0;
        for entry in
            fs::read_dir(links_dir).with_context(|| format!("listing {}", links_dir.display()))?
        {
            let pin = entry?.path();
            if !wanted.contains(&pin) {
                detach_pinned(&pin)?;
                detached += 1;
            }
        }
        info!(
            cgroup_root = %cfg.cgroup_root.display(),
            pins = %self.pin_dir.display(),
            replaced = count.replaced,
            new = count.new,
            detached,
            "eBPF programs attached"
        );
        Ok(())
    }

    /// Inbound capture: the TC programs on the uplinks (and the bridge's own ingress), the
    /// sk_lookup program in the node's network namespace, the policy routing, and the pods'
    /// interfaces found so far.
    fn attach_inbound(
        &mut self,
        cfg: &DatapathConfig,
        links_dir: &Path,
        bridge: Option<(u32, String)>,
        count: &mut AttachCount,
        wanted: &mut BTreeSet<PathBuf>,
    ) -> anyhow::Result<()> {
        let ebpf = &mut self.ebpf;
        let uplinks = uplinks(&cfg.inbound_interfaces)?;
        let prog: &mut SchedClassifier = program(ebpf, INBOUND)?;
        prog.load().map_err(|e| explain("loading inbound", &e))?;
        if bridge.is_some() {
            let prog: &mut SchedClassifier = program(ebpf, INBOUND_BRIDGED)?;
            prog.load()
                .map_err(|e| explain("loading inbound_bridged", &e))?;
        }
        // The bridge's own ingress is where frames from its ports reach the host.
        for (&index, interface) in uplinks.iter().chain(bridge.as_ref().map(|(i, n)| (i, n))) {
            count.add(attach_tc(
                ebpf,
                INBOUND,
                links_dir,
                (index, interface),
                cfg.tc_attach,
            )?);
            wanted.insert(tc_pin(links_dir, index, cfg.tc_attach));
        }
        let netns =
            fs::File::open("/proc/self/ns/net").context("opening the agent's network namespace")?;
        let prog: &mut SkLookup = program(ebpf, INBOUND_LOOKUP)?;
        prog.load()
            .map_err(|e| explain("loading inbound_lookup", &e))?;
        let fd = prog.fd()?.try_clone()?;
        let ours = Attach {
            fd: fd.as_fd(),
            id: prog.info()?.id(),
        };
        let pin = links_dir.join(INBOUND_LOOKUP);
        // The agent's network namespace is the node's: where the previous agent's was.
        count.add(attach_pinned(
            &pin,
            ours,
            |_| true,
            || {
                let id = prog
                    .attach(netns)
                    .map_err(|e| explain("attaching inbound_lookup", &e))?;
                Ok(prog.take_link(id)?.into())
            },
        )?);
        wanted.insert(pin);
        netlink::install_inbound()?;
        self.inbound = Some(InboundCapture {
            mode: cfg.tc_attach,
            uplinks: uplinks.keys().copied().collect(),
            bridge: bridge.as_ref().map(|(index, _)| *index),
            pods: BTreeSet::new(),
        });
        let pods = self.scan_pod_interfaces(count)?;
        let inbound = self
            .inbound
            .as_ref()
            .expect("inbound capture was just set up");
        wanted.extend(
            inbound
                .pods
                .iter()
                .map(|&index| tc_pin(links_dir, index, inbound.mode)),
        );
        info!(uplinks = ?uplinks.values().collect::<Vec<_>>(), bridge = ?cfg.inbound_bridge, pod_interfaces = pods, "inbound capture attached");
        Ok(())
    }

    /// Attaches inbound capture to the pods' host-side veths it is not on yet (pods come and
    /// go), and lets go of those that went away; returns how many it is on. A bridge port gets
    /// the program that hands frames to the host; a routed veth's frames reach the host anyway,
    /// and get the uplinks' program. Nothing while inbound capture is off.
    pub fn attach_inbound_pod_interfaces(&mut self) -> anyhow::Result<usize> {
        self.scan_pod_interfaces(&mut AttachCount::default())
    }

    fn scan_pod_interfaces(&mut self, count: &mut AttachCount) -> anyhow::Result<usize> {
        let Some(inbound) = &mut self.inbound else {
            return Ok(0);
        };
        let links_dir = self.pin_dir.join(LINKS_DIR);
        let interfaces = netlink::pod_interfaces(inbound.bridge, &inbound.uplinks)?;
        // Interfaces that went away took their attachments with them; their pins go too.
        for &index in inbound.pods.iter() {
            if !interfaces.contains_key(&index) {
                remove_pin(&tc_pin(&links_dir, index, inbound.mode))?;
            }
        }
        inbound.pods.retain(|index| interfaces.contains_key(index));
        for (index, interface) in interfaces {
            if inbound.pods.contains(&index) {
                continue;
            }
            let name = if interface.bridged {
                INBOUND_BRIDGED
            } else {
                INBOUND
            };
            let target = (index, interface.name.as_str());
            match attach_tc(&mut self.ebpf, name, &links_dir, target, inbound.mode) {
                Ok(attached) => {
                    count.add(attached);
                    inbound.pods.insert(index);
                }
                // The interface may be gone already; the next scan settles it.
                Err(e) => {
                    warn!(interface = interface.name, error = %format!("{e:#}"), "attaching inbound capture to a pod's interface")
                }
            }
        }
        Ok(inbound.pods.len())
    }

    /// Whether inbound capture is attached, and so needs the inbound listener.
    pub fn captures_inbound(&self) -> bool {
        self.inbound.is_some()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// Detaches the link pinned at `pin` (or the netlink filter a `tc-nl-<ifindex>` pin stands
/// for) and removes the pin.
fn detach_pinned(pin: &Path) -> anyhow::Result<()> {
    let netlink_filter = pin
        .file_name()
        .and_then(|name| name.to_str()?.strip_prefix(TC_NETLINK_PIN)?.parse().ok());
    if let Some(index) = netlink_filter {
        return detach_tc_netlink(pin, index);
    }
    match link::open(pin) {
        Ok(fd) => match link::detach(fd.as_fd()) {
            // ENOLINK: detached already (its target went away).
            Err(e) if e.raw_os_error() != Some(libc::ENOLINK) => {
                return Err(explain(
                    &format!("detaching the link pinned at {}", pin.display()),
                    &e,
                ))
            }
            _ => {}
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        // Not a link: removing the pin is all there is to do.
        Err(e) => debug!(pin = %pin.display(), error = %e, "opening a pinned link"),
    }
    remove_pin(pin)
}

/// What [`uninstall`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Uninstalled {
    /// Attachments (links) detached.
    pub links: usize,
    /// Pinned maps removed.
    pub maps: usize,
    /// Policy routing rules and routes removed.
    pub routes: usize,
}

impl Uninstalled {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Takes the datapath pinned at `pin_dir` away: detaches every program (even from a running
/// agent), removes the inbound policy routing and every pin. Idempotent: nothing installed is
/// not an error.
pub fn uninstall(pin_dir: &Path) -> anyhow::Result<Uninstalled> {
    let mut removed = Uninstalled::default();
    let links_dir = pin_dir.join(LINKS_DIR);
    match fs::read_dir(&links_dir) {
        Ok(entries) => {
            for entry in entries {
                detach_pinned(&entry?.path())?;
                removed.links += 1;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("listing {}", links_dir.display())),
    }
    removed.routes = netlink::remove_inbound()?;
    let maps_dir = pin_dir.join(MAPS_DIR);
    removed.maps = fs::read_dir(&maps_dir).map_or(0, |entries| entries.count());
    // Without their pins (and the programs, detached above), the maps are freed, and sk_msg's
    // attachment to SOCKETS with them.
    match fs::remove_dir_all(pin_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", pin_dir.display()))?
        }
        _ => {}
    }
    Ok(removed)
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

/// Checks what a load needs, so that a missing piece is named, with its remedy, before the
/// kernel answers with a bare errno.
fn preflight(cfg: &DatapathConfig) -> anyhow::Result<()> {
    let current = aya::util::KernelVersion::current()
        .map_err(|e| anyhow!("cannot read the kernel version: {e}"))?;
    let (major, minor) = MIN_KERNEL;
    if current < aya::util::KernelVersion::new(major as u8, minor as u8, 0) {
        anyhow::bail!(
            "kernel {current} is too old: Aviary needs Linux {major}.{minor} or later (sockmap \
             listeners, cgroup bpf links); upgrade the node's kernel"
        );
    }
    let (major, minor) = MIN_TCX_KERNEL;
    if !cfg.inbound_interfaces.is_empty()
        && cfg.tc_attach == TcAttach::Tcx
        && current < aya::util::KernelVersion::new(major as u8, minor as u8, 0)
    {
        anyhow::bail!(
            "kernel {current} has no TCX links (Linux {major}.{minor} or later): use \
             --tc-attach netlink (or auto) for inbound capture's attachments"
        );
    }
    crate::cgroup::ensure_cgroup2(&cfg.cgroup_root)?;
    ensure_bpffs(&cfg.bpffs)?;
    // Before the probes, which load programs too.
    raise_memlock();
    let missing = probe::missing(!cfg.inbound_interfaces.is_empty())?;
    if !missing.is_empty() {
        anyhow::bail!(
            "kernel {current} lacks what Aviary's programs use: {}; run a kernel that has them \
             (see docs/kernels.md), or leave --inbound-interfaces unset if only \
             inbound capture's are missing",
            missing.join(", ")
        );
    }
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
    fn pinned_maps_are_reused_only_at_this_agents_abi_version() {
        assert_eq!(PinnedMaps::judge(false, None), PinnedMaps::Absent);
        assert_eq!(
            PinnedMaps::judge(true, Some(ABI_VERSION)),
            PinnedMaps::Compatible
        );
        assert_eq!(
            PinnedMaps::judge(true, Some(ABI_VERSION + 1)),
            PinnedMaps::Incompatible {
                found: Some(ABI_VERSION + 1)
            }
        );
        // Maps pinned by an agent from before layouts had versions.
        assert_eq!(
            PinnedMaps::judge(true, None),
            PinnedMaps::Incompatible { found: None }
        );
    }

    #[test]
    fn uninstalling_nothing_is_empty() {
        assert!(Uninstalled::default().is_empty());
        assert!(!Uninstalled {
            routes: 2,
            ..Default::default()
        }
        .is_empty());
    }
}
