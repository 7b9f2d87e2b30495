//! Outbound capture, for real: eBPF programs attached to a test kubepods cgroup, pods in network
//! namespaces, the agent as a separate process. Run as root (CI does); elsewhere they skip, and
//! under CI=true they fail if they cannot run.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use aviary_tests::{policy, Agent, CgroupLayout, Greeting, Node, Pod, NODE_IP};

const VIP_A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// A node with backends `a` (VIP_A) and `b` (VIP_B) serving TCP 80 and UDP 53, and pods
/// `client` and `other`.
struct Setup {
    node: Node,
    client: Pod,
    other: Pod,
    a: Pod,
}

fn setup() -> Option<Setup> {
    setup_in(CgroupLayout::Cgroupfs)
}

fn setup_in(layout: CgroupLayout) -> Option<Setup> {
    let node = Node::with_cgroup_layout(layout)?;
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    node.serve(&a, 80, Some(53));
    node.serve(&b, 80, None);
    node.add_vip(VIP_A, &a);
    node.add_vip(VIP_B, &b);
    let client = node.add_pod("client");
    let other = node.add_pod("other");
    Some(Setup {
        node,
        client,
        other,
        a,
    })
}

/// Namespace `shop` holds the client; `client_capture` is its pod annotation.
fn policy_yaml(s: &Setup, client_capture: Option<&str>, extra: &[String]) -> String {
    let mut objects = vec![
        policy::namespace("shop", None),
        policy::pod(&s.client, "shop", client_capture),
        policy::pod(&s.other, "shop", None),
        policy::service("a", "shop", VIP_A.into(), &[(80, "TCP"), (53, "UDP")]),
        policy::service("b", "shop", VIP_B.into(), &[(80, "TCP")]),
    ];
    objects.extend_from_slice(extra);
    policy::documents(&objects)
}

/// The agent, with the client enrolled and services `a` and `b` captured.
fn start_enrolled(s: &Setup) -> Agent {
    s.node.write_policy(&policy_yaml(s, Some("enabled"), &[]));
    let agent = s.node.start_agent(&[]);
    agent.wait_for_capture(&[&s.client], 2);
    agent
}

fn connect(s: &Setup, pod: &Pod, to: SocketAddr) -> Greeting {
    Greeting::of(
        &s.node
            .run(pod, &["connect", &to.to_string()], CLIENT_TIMEOUT),
    )
}

/// Through the proxy, the backend sees the node's address; directly, the client's own.
fn assert_proxied(greeting: &Greeting, backend: &str) {
    assert_eq!(greeting.name, backend, "{greeting:?}");
    assert_eq!(
        greeting.peer.ip(),
        IpAddr::V4(NODE_IP),
        "not proxied: {greeting:?}"
    );
}

fn assert_direct(greeting: &Greeting, backend: &str, client: &Pod) {
    assert_eq!(greeting.name, backend, "{greeting:?}");
    assert_eq!(
        greeting.peer.ip(),
        IpAddr::V4(client.ip),
        "not direct: {greeting:?}"
    );
}

#[test]
fn enrolled_pod_reaches_each_service_through_the_proxy_at_its_original_destination() {
    let Some(s) = setup() else { return };
    let agent = start_enrolled(&s);

    // Two services on two backends: the proxy forwarded each to the destination the pod asked
    // for, which it could only know from the recorded original destination.
    let via_a = connect(&s, &s.client, addr(VIP_A, 80));
    assert_proxied(&via_a, "a");
    assert_eq!(via_a.local, addr(VIP_A, 80));
    assert_proxied(&connect(&s, &s.client, addr(VIP_B, 80)), "b");

    // A dual-stack socket connecting to the v4-mapped VIP is captured too.
    let mapped: SocketAddr = format!("[::ffff:{VIP_A}]:80").parse().unwrap();
    assert_proxied(&connect(&s, &s.client, mapped), "a");
    assert_eq!(agent.counter("connect_captured"), 3);
    assert_eq!(agent.counter("orig_dst_recorded"), 3);
}

#[test]
fn everything_not_captured_passes_untouched() {
    let Some(s) = setup() else { return };
    let agent = start_enrolled(&s);

    // A pod that is not enrolled goes straight to the service.
    assert_direct(&connect(&s, &s.other, addr(VIP_A, 80)), "a", &s.other);
    // An enrolled pod's connection to an address that is not a service is not captured.
    assert_direct(&connect(&s, &s.client, addr(s.a.ip, 80)), "a", &s.client);
    // DNS-style UDP to a captured service's address passes untouched.
    let out = s.node.run(
        &s.client,
        &["udp", &addr(VIP_A, 53).to_string()],
        CLIENT_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.starts_with(&format!("udp from {}:", s.client.ip)),
        "{reply}"
    );
    assert_eq!(agent.counter("connect_captured"), 0);

    // The proxy is not an open relay: a connection it did not capture is reset.
    let out = s.node.run(
        &s.other,
        &["connect", &addr(NODE_IP, 15001).to_string()],
        CLIENT_TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "the proxy relayed an uncaptured connection"
    );
}

#[test]
fn enrolling_and_unenrolling_at_runtime_changes_new_connections_only() {
    let Some(s) = setup() else { return };
    let agent = start_enrolled(&s);
    let mut proxied = s.node.session(&s.client, addr(VIP_A, 80));
    assert_proxied(&proxied.greeting, "a");

    s.node.write_policy(&policy_yaml(&s, Some("disabled"), &[]));
    agent.wait_for_capture(&[], 2);
    assert_direct(&connect(&s, &s.client, addr(VIP_A, 80)), "a", &s.client);
    let mut direct = s.node.session(&s.client, addr(VIP_A, 80));
    assert_direct(&direct.greeting, "a", &s.client);
    // The connection opened while enrolled still works, still through the proxy.
    assert_eq!(proxied.echo("still here"), "still here");

    s.node.write_policy(&policy_yaml(&s, Some("enabled"), &[]));
    agent.wait_for_capture(&[&s.client], 2);
    assert_proxied(&connect(&s, &s.client, addr(VIP_A, 80)), "a");
    assert_eq!(direct.echo("left alone"), "left alone");
    assert_eq!(proxied.echo("and this one"), "and this one");
}

#[test]
fn namespace_enrollment_covers_its_pods_unless_a_pod_opts_out() {
    let Some(s) = setup() else { return };
    let objects = vec![
        policy::namespace("shop", Some("enabled")),
        policy::pod(&s.client, "shop", None),
        policy::pod(&s.other, "shop", Some("disabled")),
        policy::service("a", "shop", VIP_A.into(), &[(80, "TCP")]),
    ];
    s.node.write_policy(&policy::documents(&objects));
    let agent = s.node.start_agent(&[]);
    agent.wait_for_capture(&[&s.client], 1);
    assert_proxied(&connect(&s, &s.client, addr(VIP_A, 80)), "a");
    assert_direct(&connect(&s, &s.other, addr(VIP_A, 80)), "a", &s.other);
}

#[test]
fn capture_fails_open_when_the_proxy_is_down() {
    let Some(s) = setup() else { return };
    let mut agent = start_enrolled(&s);
    assert_proxied(&connect(&s, &s.client, addr(VIP_A, 80)), "a");

    // SIGKILL: the programs stay attached (their links are pinned), but the proxy's listener is
    // gone, so new connects go where they were aimed.
    agent.kill();
    assert!(
        agent.pin_dir.join("links").exists(),
        "pins outlive a killed agent"
    );
    assert_direct(&connect(&s, &s.client, addr(VIP_A, 80)), "a", &s.client);
    assert_eq!(agent.counter("connect_failed_open"), 1);
}

#[test]
fn the_proxys_upstream_connection_is_not_captured_even_if_its_pod_is_enrolled() {
    let Some(s) = setup() else { return };
    // Enrol the agent's own pod too: only its socket mark keeps it from capturing itself.
    let agent_pod =
        policy::pod_with_uid("aviary-agent", &s.node.agent_uid(), "shop", Some("enabled"));
    s.node
        .write_policy(&policy_yaml(&s, Some("enabled"), &[agent_pod]));
    let agent = s.node.start_agent(&[]);
    let agent_cgroup = s.node.agent_cgroup();
    let agent_pod_id = aviary_agent::cgroup::cgroup_id(agent_cgroup.parent().unwrap()).unwrap();
    let table = aviary_agent::ebpf::maps::CaptureTable::open(&agent.pin_dir).unwrap();
    let both = aviary_tests::wait_until(Duration::from_secs(10), || {
        (table.enrolled().ok()? == [s.client.cgroup_id(), agent_pod_id].into()).then_some(())
    });
    assert!(both.is_some(), "agent pod never enrolled");

    assert_proxied(&connect(&s, &s.client, addr(VIP_A, 80)), "a");
    assert_eq!(agent.counter("connect_captured"), 1);
    assert_eq!(agent.counter("connect_own_traffic"), 1);
}

#[test]
fn ipv6_services_are_captured_through_the_ipv6_listener() {
    let Some(s) = setup() else { return };
    let vip6: std::net::Ipv6Addr = "fd00:96::a".parse().unwrap();
    s.node.add_vip6(vip6, &s.a);
    let v6_service = policy::service("a6", "shop", vip6.into(), &[(80, "TCP")]);
    s.node
        .write_policy(&policy_yaml(&s, Some("enabled"), &[v6_service]));
    let agent = s
        .node
        .start_agent(&["--proxy-ip6", &aviary_tests::NODE_IP6.to_string()]);
    agent.wait_for_capture(&[&s.client], 3);

    let to = SocketAddr::new(vip6.into(), 80);
    let direct = connect(&s, &s.other, to);
    assert_eq!(
        direct.peer.ip(),
        IpAddr::V6(s.other.ip6),
        "not direct: {direct:?}"
    );
    let via = connect(&s, &s.client, to);
    assert_eq!(via.name, "a");
    assert_eq!(
        via.peer.ip(),
        IpAddr::V6(aviary_tests::NODE_IP6),
        "not proxied: {via:?}"
    );
    assert_eq!(
        via.local, to,
        "the proxy forwarded to the original IPv6 destination"
    );
    assert_eq!(agent.counter("connect_captured"), 1);
    // The entry goes when the connection reaches TCP_CLOSE, which the programs see a moment
    // after the client has its answer: wait for it, within a bound.
    let emptied = aviary_tests::wait_until(Duration::from_secs(5), || {
        (agent.stats().occupancy().ok()?.orig_dst == 0).then_some(())
    });
    assert!(
        emptied.is_some(),
        "ORIG_DST still holds {:?} entries",
        agent.stats().occupancy().map(|o| o.orig_dst)
    );
}

/// A kubelet with the systemd cgroup driver puts pods in QoS slices below `kubepods.slice`
/// (`kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/<container>`). Told nothing, the
/// agent finds that root at the top of the cgroup v2 mount, and captures those pods.
#[test]
fn the_systemd_drivers_pod_root_is_found_and_its_pods_are_captured() {
    let Some(s) = setup_in(CgroupLayout::Systemd) else {
        return;
    };
    s.node.write_policy(&policy_yaml(&s, Some("enabled"), &[]));
    let agent = s.node.start_agent_finding_cgroups(&[]);
    let found = agent.wait_for_log("found the kubelet's pod cgroups", Duration::from_secs(1));
    assert!(
        found.contains("kubepods.slice") && found.contains("systemd"),
        "{found}"
    );
    agent.wait_for_capture(&[&s.client], 2);
    assert_proxied(&connect(&s, &s.client, addr(VIP_A, 80)), "a");
    // Not enrolled, in the same layout: untouched.
    let direct = connect(&s, &s.other, addr(VIP_A, 80));
    assert_eq!(direct.peer.ip(), IpAddr::V4(s.other.ip), "{direct:?}");
}
