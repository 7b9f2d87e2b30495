//! The datapath's lifecycle, for real: connection-tracking state returns to empty, the fast path
//! switches off, shutdown leaves nothing behind, and load failures say what to do.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use aviary_agent::ebpf::maps::Occupancy;
use aviary_tests::{policy, wait_until, workspace_bin, Greeting, Node, Pod, NODE_IP};

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

    let out = node.run(
        &client,
        &[
            "connect",
            &vip().to_string(),
            "--count",
            "100000",
            "--parallel",
            "4",
        ],
        Duration::from_secs(600),
    );
    let greeting = Greeting::of(&out);
    assert_eq!(greeting.peer.ip(), IpAddr::V4(NODE_IP), "{greeting:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok 100000"));

    assert_eq!(agent.counter("connect_captured"), 100_000);
    assert_eq!(agent.counter("orig_dst_recorded"), 100_000);
    // The fast path carried the traffic: every connection's bytes went socket to socket.
    assert!(agent.counter("sk_msg_redirected") >= 200_000);
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

fn aviary_programs_loaded() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("aviary_")))
        .count()
}

#[test]
fn sigterm_detaches_everything_and_removes_the_pins() {
    let Some((node, client)) = setup() else {
        return;
    };
    let mut agent = node.start_agent(&[]);
    agent.wait_for_capture(&[&client], 1);
    assert_eq!(aviary_programs_loaded(), 4);

    let status = agent.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        !agent.pin_dir.exists(),
        "pins left at {}",
        agent.pin_dir.display()
    );
    // The kernel frees programs once their last reference goes, shortly after the agent exits.
    let unloaded = wait_until(Duration::from_secs(5), || {
        (aviary_programs_loaded() == 0).then_some(())
    });
    assert!(unloaded.is_some(), "programs still loaded after shutdown");

    let out = node.run(
        &client,
        &["connect", &vip().to_string()],
        Duration::from_secs(20),
    );
    assert_eq!(
        Greeting::of(&out).peer.ip(),
        IpAddr::V4(client.ip),
        "captured after shutdown"
    );
}

#[test]
fn a_restarted_agent_replaces_the_pins_a_killed_one_left() {
    let Some((node, client)) = setup() else {
        return;
    };
    let mut first = node.start_agent(&[]);
    first.wait_for_capture(&[&client], 1);
    first.kill();

    let second = node.start_agent(&[]);
    second.wait_for_log(
        "removing pins left by a previous agent",
        Duration::from_secs(1),
    );
    second.wait_for_capture(&[&client], 1);
    let out = node.run(
        &client,
        &["connect", &vip().to_string()],
        Duration::from_secs(20),
    );
    assert_eq!(Greeting::of(&out).peer.ip(), IpAddr::V4(NODE_IP));
    // Only the new agent's programs are attached.
    assert_eq!(second.counter("connect_captured"), 1);
    assert_eq!(aviary_programs_loaded(), 4);
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
