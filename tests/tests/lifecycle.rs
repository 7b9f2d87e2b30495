//! The datapath's lifecycle, for real: connection-tracking state returns to empty, the fast path
//! switches off, the datapath outlives the agent (SIGTERM, SIGKILL) and passes to the next one
//! without a gap, `uninstall` leaves nothing behind, and load failures say what to do.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    time::Duration,
};

use aviary_abi::{map_name, ABI_VERSION};
use aviary_agent::ebpf::maps::Occupancy;
use aviary_tests::{heavy, policy, wait_until, workspace_bin, Greeting, Node, Pod, NODE_IP};
use aya::{
    maps::{Array, Map, MapData, MapInfo},
    programs::links::{FdLink, PinnedLink},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), 80)
}

/// A node with backend `a` behind VIP and an enrolled `client`.
fn setup() -> Option<(Node, Pod)> {
    let node = Node::new()?;
    let backend = node.add_pod("a");
    node.serve(&backend, 80, None);
    node.add_vip(VIP, &backend);
    let client = node.add_pod("client");
    node.write_policy(&policy::documents(&[
        policy::namespace("shop", Some("enabled")),
        policy::pod(&client, "shop", None),
        policy::service("a", "shop", VIP.into(), &[(80, "TCP")]),
    ]));
    Some((node, client))
}

fn occupancy_drains(agent: &aviary_tests::Agent) -> Occupancy {
    let stats = agent.stats();
    let drained = wait_until(Duration::from_secs(30), || {
        let occupancy = stats.occupancy().ok()?;
        (occupancy.total() == 0).then_some(occupancy)
    });
    drained.unwrap_or_else(|| panic!("entries left: {:?}", stats.occupancy().unwrap()))
}

#[test]
fn no_map_entry_is_left_after_100k_connections() {
    let Some((node, client)) = setup() else {
        return;
    };
    // With the fast path on, so that every map, SOCKETS included, is exercised.
    let agent = node.start_agent(&["--sk-msg", "true"]);
    agent.wait_for_capture(&[&client], 1);

    // 100,000 on the host; fewer in the slower guest of the kernel matrix.
    let count = heavy(100_000);
    let out = node.run(
        &client,
        &[
            "connect",
            &vip().to_string(),
            "--count",
            &count.to_string(),
            "--parallel",
            "4",
        ],
        Duration::from_secs(600),
    );
    let greeting = Greeting::of(&out);
    assert_eq!(greeting.peer.ip(), IpAddr::V4(NODE_IP), "{greeting:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("ok {count}")));

    let count = u64::from(count);
    assert_eq!(agent.counter("connect_captured"), count);
    assert_eq!(agent.counter("orig_dst_recorded"), count);
    // The fast path carried the traffic: every connection's bytes went socket to socket.
    assert!(agent.counter("sk_msg_redirected") >= 2 * count);
    assert_eq!(occupancy_drains(&agent), Occupancy::default());
}

#[test]
fn sk_msg_is_off_by_default() {
    let Some((node, client)) = setup() else {
        return;
    };
    let agent = node.start_agent(&[]);
    agent.wait_for_capture(&[&client], 1);

    let mut session = node.session(&client, vip());
    assert_eq!(session.greeting.peer.ip(), IpAddr::V4(NODE_IP));
    assert_eq!(session.echo("over plain TCP"), "over plain TCP");
    let open = agent.stats().occupancy().unwrap();
    assert_eq!(
        open.sockets, 0,
        "no socket joins the SockHash with sk_msg off"
    );
    assert_eq!(open.orig_dst, 1);
    drop(session);

    assert_eq!(agent.counter("sk_msg_redirected"), 0);
    assert_eq!(occupancy_drains(&agent), Occupancy::default());
}

/// The ids of the maps pinned in `pin_dir`, by name.
fn map_ids(pin_dir: &Path) -> BTreeMap<&'static str, u32> {
    map_name::ALL
        .iter()
        .map(|&name| {
            let info = MapInfo::from_pin(pin_dir.join("maps").join(name))
                .unwrap_or_else(|e| panic!("map {name}: {e}"));
            (name, info.id())
        })
        .collect()
}

/// The ids of the links pinned in `pin_dir`, by pin name.
fn link_ids(pin_dir: &Path) -> BTreeMap<String, u32> {
    std::fs::read_dir(pin_dir.join("links"))
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let link = FdLink::from(PinnedLink::from_pin(entry.path()).unwrap());
            (
                entry.file_name().to_string_lossy().into_owned(),
                link.info().unwrap().id(),
            )
        })
        .collect()
}

/// The loaded programs that use any of `maps` (ids): this node's, whatever other agents run on
/// the machine.
fn programs_using(maps: &BTreeMap<&str, u32>) -> usize {
    let ids: BTreeSet<u32> = maps.values().copied().collect();
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.map_ids()
                .ok()
                .flatten()
                .is_some_and(|used| used.iter().any(|id| ids.contains(id)))
        })
        .count()
}

/// Waits until exactly `n` programs use `maps` (the kernel frees a program shortly after its
/// last reference goes).
fn wait_for_programs(maps: &BTreeMap<&str, u32>, n: usize) {
    let settled = wait_until(Duration::from_secs(5), || {
        (programs_using(maps) == n).then_some(())
    });
    assert!(
        settled.is_some(),
        "{} programs use the maps, not {n}",
        programs_using(maps)
    );
}

fn connect_peer(node: &Node, client: &Pod) -> IpAddr {
    let out = node.run(
        client,
        &["connect", &vip().to_string()],
        Duration::from_secs(20),
    );
    Greeting::of(&out).peer.ip()
}

/// The cgroup programs' links and inbound capture's, when on.
const CGROUP_LINKS: [&str; 3] = ["aviary_connect4", "aviary_connect6", "aviary_sock_ops"];

#[test]
fn sigterm_leaves_the_datapath_failing_open_and_uninstall_removes_it() {
    let Some((node, client)) = setup() else {
        return;
    };
    let mut agent = node.start_agent(&[]);
    agent.wait_for_capture(&[&client], 1);
    let maps = map_ids(&agent.pin_dir);
    let links = link_ids(&agent.pin_dir);
    assert_eq!(links.keys().collect::<Vec<_>>(), CGROUP_LINKS);
    // connect4, connect6, sock_ops and sk_msg.
    assert_eq!(programs_using(&maps), 4);

    let status = agent.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(map_ids(&agent.pin_dir), maps, "the maps stay pinned");
    assert_eq!(
        link_ids(&agent.pin_dir),
        links,
        "the programs stay attached"
    );
    assert_eq!(programs_using(&maps), 4);
    // With no proxy listening, capture fails open.
    assert_eq!(connect_peer(&node, &client), IpAddr::V4(client.ip));
    assert_eq!(agent.counter("connect_failed_open"), 1);

    let out = node.uninstall().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("uninstalled") && said.contains("3 attachments detached"),
        "{said}"
    );
    assert!(
        !agent.pin_dir.exists(),
        "pins left at {}",
        agent.pin_dir.display()
    );
    wait_for_programs(&maps, 0);
    assert_eq!(connect_peer(&node, &client), IpAddr::V4(client.ip));

    // Nothing left to do is no failure.
    let again = node.uninstall().unwrap();
    assert!(again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to uninstall"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
}

/// Connections opened one after another while `during` runs, then until `captured` of them
/// went through the proxy (at most `bound` in all): their peers, in order. Each must succeed.
fn connect_while<T: Send>(
    node: &Node,
    client: &Pod,
    bound: usize,
    captured: usize,
    during: impl FnOnce() -> T + Send,
) -> (Vec<IpAddr>, T) {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let connecting = scope.spawn(|| {
            let mut peers = Vec::new();
            while peers.len() < bound {
                peers.push(connect_peer(node, client));
                let through_proxy = peers.iter().filter(|&&p| p == IpAddr::V4(NODE_IP)).count();
                if done.load(std::sync::atomic::Ordering::Acquire) && through_proxy >= captured {
                    break;
                }
            }
            peers
        });
        let value = during();
        done.store(true, std::sync::atomic::Ordering::Release);
        (connecting.join().expect("a connection failed"), value)
    })
}

#[test]
fn a_successor_takes_over_what_a_killed_agent_left_without_a_capture_gap() {
    let Some((node, client)) = setup() else {
        return;
    };
    let mut first = node.start_agent(&[]);
    first.wait_for_capture(&[&client], 1);
    let maps = map_ids(&first.pin_dir);
    let links = link_ids(&first.pin_dir);
    assert_eq!(connect_peer(&node, &client), IpAddr::V4(NODE_IP));
    first.kill();

    // Direct while no proxy listens, through the successor's proxy once it does; never failing.
    let (peers, second) = connect_while(&node, &client, 2000, 20, || node.start_agent(&[]));
    let first_captured = peers
        .iter()
        .position(|&p| p == IpAddr::V4(NODE_IP))
        .unwrap_or_else(|| panic!("never captured again: {peers:?}"));
    assert!(first_captured > 0, "no connection while no proxy listened");
    assert!(
        peers[..first_captured]
            .iter()
            .all(|&p| p == IpAddr::V4(client.ip)),
        "{peers:?}"
    );
    assert!(
        peers[first_captured..]
            .iter()
            .all(|&p| p == IpAddr::V4(NODE_IP)),
        "a connection went direct after capture resumed: {peers:?}"
    );

    second.wait_for_log("reusing the pinned maps", Duration::from_secs(1));
    second.wait_for_log("replaced=3 new=0 detached=0", Duration::from_secs(1));
    second.wait_for_capture(&[&client], 1);
    assert_eq!(map_ids(&second.pin_dir), maps, "the maps are the same maps");
    assert_eq!(
        link_ids(&second.pin_dir),
        links,
        "the links are the same links"
    );
    // The counters carried over too.
    assert!(second.counter("connect_captured") > 20);
    assert_eq!(second.counter("connect_failed_open"), first_captured as u64);
    // The killed agent's programs are gone: only the successor's use the maps.
    wait_for_programs(&maps, 4);
}

#[test]
fn a_successor_replaces_maps_of_another_abi_version_and_says_why() {
    let Some((node, client)) = setup() else {
        return;
    };
    let mut first = node.start_agent(&[]);
    first.wait_for_capture(&[&client], 1);
    assert_eq!(connect_peer(&node, &client), IpAddr::V4(NODE_IP));
    let maps = map_ids(&first.pin_dir);
    let links = link_ids(&first.pin_dir);
    first.kill();
    // As an agent with another map layout would have left them.
    let abi = MapData::from_pin(first.pin_dir.join("maps").join(map_name::ABI)).unwrap();
    let mut abi: Array<MapData, u32> = Array::try_from(Map::Array(abi)).unwrap();
    abi.set(0, ABI_VERSION + 1, 0).unwrap();

    let second = node.start_agent(&[]);
    second.wait_for_log(
        &format!(
            "ABI version {}, this agent's is {ABI_VERSION}",
            ABI_VERSION + 1
        ),
        Duration::from_secs(1),
    );
    second.wait_for_capture(&[&client], 1);
    let new_maps = map_ids(&second.pin_dir);
    for (name, id) in &maps {
        assert_ne!(new_maps[name], *id, "map {name} was kept");
    }
    assert_eq!(
        link_ids(&second.pin_dir),
        links,
        "the links are the same links"
    );
    assert_eq!(connect_peer(&node, &client), IpAddr::V4(NODE_IP));
    assert_eq!(second.counter("connect_captured"), 1, "new counters");
    // The old maps went with the killed agent's programs.
    wait_for_programs(&maps, 0);
    wait_for_programs(&new_maps, 4);
}

/// Runs the agent with `args` and returns (exit code, stderr).
fn agent_fails(args: &[&str]) -> (i32, String) {
    let out = Command::new(workspace_bin("aviary-agent"))
        .args(args)
        .env("AVIARY_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn load_failures_end_the_agent_with_one_line_naming_cause_and_remedy() {
    if !aviary_tests::privileged() {
        return;
    }
    let tmp = std::env::temp_dir();
    let tmp = tmp.to_str().unwrap();
    let base = [
        "--local",
        tmp,
        "--proxy-ip",
        "10.244.1.1",
        "--pin-name",
        "avt-load-failure",
    ];

    // No pod root given, and none where a kubelet keeps one (no kubelet runs here).
    let (code, stderr) = agent_fails(&base);
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no kubelet pod cgroups found"), "{stderr}");
    assert!(stderr.contains("--cgroup-root"), "{stderr}");

    // Not a cgroup v2 directory.
    let (code, stderr) = agent_fails(&[&base[..], &["--cgroup-root", tmp]].concat());
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not on cgroup v2"), "{stderr}");
    assert!(stderr.contains("--cgroup-root"), "{stderr}");

    let (code, stderr) =
        agent_fails(&[&base[..], &["--cgroup-root", "/nonexistent/kubepods"]].concat());
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not usable"), "{stderr}");

    // Bad flags are usage errors, before anything is loaded.
    let (code, stderr) = agent_fails(&["--proxy-ip", "10.244.1.1"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--local"), "{stderr}");
    assert!(!std::path::Path::new("/sys/fs/bpf/avt-load-failure").exists());
}

/// A reader thread and a writer thread on one blocking socket: the pattern that the sk_msg fast
/// path breaks (spurious EAGAIN from read), and the reason it is off by default.
#[test]
fn bulk_streams_with_a_reader_and_a_writer_thread_arrive_intact() {
    let Some((node, client)) = setup() else {
        return;
    };
    let agent = node.start_agent(&[]);
    agent.wait_for_capture(&[&client], 1);
    for _ in 0..3 {
        let out = node.run(
            &client,
            &["load", "stream", &vip().to_string(), "--secs", "1"],
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(agent.counter("connect_captured"), 3);
}
