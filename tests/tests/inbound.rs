//! Inbound capture: a client on another host (over the uplink) and a pod of this node that is not
//! enrolled (over the bridge) reach an enrolled pod through the inbound proxy; other pods and
//! excluded ports are reached directly, and every pod directly once the agent is gone.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use aviary_agent::metrics::sample;
use aviary_tests::{
    policy, tally, wait_until, Node, Pod, NODE_IP, NODE_IP6, REMOTE_IP, REMOTE_IP6, UPLINK,
};

const PORT: u16 = 8080;
const EXCLUDED: u16 = 8081;
const OPAQUE: u16 = 9000;
const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 30);
const AGENT_ARGS: &[&str] = &["--inbound-interfaces", UPLINK, "--inbound-bridge", "br0"];

/// Who the server saw each of 20 requests (on one connection) come from.
fn peers(node: &Node, client: &Pod, server: &Pod) -> BTreeMap<String, u32> {
    peers_on(node, client, server, PORT)
}

fn peers_on(node: &Node, client: &Pod, server: &Pod, port: u16) -> BTreeMap<String, u32> {
    peers_at(
        node,
        client,
        server,
        SocketAddr::new(server.ip.into(), port),
    )
}

fn peers_at(node: &Node, client: &Pod, server: &Pod, addr: SocketAddr) -> BTreeMap<String, u32> {
    let out = node.run(
        client,
        &["http-load", &addr.to_string(), "--count", "20"],
        Duration::from_secs(20),
    );
    assert_eq!(tally(&out, "status"), BTreeMap::from([("200".into(), 20)]));
    assert_eq!(
        tally(&out, "backend").keys().collect::<Vec<_>>(),
        [&server.name]
    );
    tally(&out, "peer")
}

/// Three requests from `client` to `addr`, each on a new connection from the same port
/// (`aviary-testpod reconnect`); all must succeed.
fn reconnect(node: &Node, client: &Pod, addr: SocketAddr) {
    let out = node.run(
        client,
        &[
            "reconnect",
            &addr.to_string(),
            "--port",
            "40000",
            "--count",
            "3",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(tally(&out, "status"), BTreeMap::from([("200".into(), 3)]));
}

#[test]
fn remote_and_local_clients_reach_an_enrolled_pod_through_the_inbound_proxy() {
    let Some(node) = Node::new() else { return };
    let [enrolled, plain] = node.add_http_pods(["enrolled", "plain"], PORT);
    let caller = node.add_pod("caller");
    let remote = node.add_remote_host("remote");
    // The enrolled pod also serves on 8081, which it opts out of inbound capture, and opaque
    // TCP on 9000.
    node.serve_http(&enrolled, EXCLUDED);
    node.serve(&enrolled, OPAQUE, None);
    let enrolled_pod = policy::pod(&enrolled, "shop", None).replacen(
        &format!("uid: {}", enrolled.uid),
        &format!(
            "uid: {}, annotations: {{aviary.dev/inbound-ports-exclude: \"{EXCLUDED}\"}}",
            enrolled.uid
        ),
        1,
    );
    node.write_policy(&policy::documents(&[
        policy::namespace("shop", Some("enabled")),
        policy::namespace("other", None),
        enrolled_pod,
        policy::pod(&plain, "other", None),
        policy::pod(&caller, "shop", None),
        policy::http_service("web", "shop", VIP.into(), PORT, &[]),
        policy::endpoint_slice("web", "shop", &[&enrolled], PORT),
    ]));
    let mut agent = node.start_agent(AGENT_ARGS);
    agent.wait_for_log("inbound_added=2", Duration::from_secs(10));

    // Through the proxy: the pod sees the node, and its replies reach the client intact. From
    // another host over the uplink, and from a pod of this node that is not enrolled.
    let via_node = BTreeMap::from([(NODE_IP.to_string(), 20)]);
    assert_eq!(peers(&node, &remote, &enrolled), via_node);
    assert_eq!(agent.counter("inbound_captured"), 1);
    assert_eq!(peers(&node, &plain, &enrolled), via_node);
    assert_eq!(agent.counter("inbound_captured"), 2);
    // The proxy closes first when the client asks it to, and holds a TIME_WAIT socket; a new
    // connection from the same client port recycles it, as the pod itself would.
    reconnect(&node, &remote, SocketAddr::new(enrolled.ip.into(), PORT));
    assert_eq!(agent.counter("inbound_captured"), 5);
    // Not enrolled, or an excluded port: untouched.
    let direct = BTreeMap::from([(REMOTE_IP.to_string(), 20)]);
    assert_eq!(peers(&node, &remote, &plain), direct);
    assert_eq!(peers_on(&node, &remote, &enrolled, EXCLUDED), direct);
    assert_eq!(agent.counter("inbound_captured"), 5);

    // An enrolled caller's request to the pod's Service goes through the outbound proxy, whose
    // connection to the pod leaves from the node's stack: it is not captured again.
    let out = node.run(
        &caller,
        &["http-load", &format!("{VIP}:80"), "--count", "20"],
        Duration::from_secs(20),
    );
    assert_eq!(tally(&out, "status"), BTreeMap::from([("200".into(), 20)]));
    assert_eq!(tally(&out, "peer"), via_node);
    assert_eq!(agent.counter("connect_captured"), 1);
    assert_eq!(agent.counter("inbound_captured"), 5);

    // Opaque TCP (the server speaks first) is forwarded byte for byte.
    let out = node.run(
        &remote,
        &[
            "connect",
            &format!("{}:{OPAQUE}", enrolled.ip),
            "--count",
            "3",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(
        tally(&out, "name"),
        BTreeMap::from([(enrolled.name.clone(), 3)])
    );
    assert_eq!(agent.counter("inbound_captured"), 8);

    // Each request is measured from the destination's side, with its source when the peer is a
    // known pod; Flagger's family counts every request to the pod once: 43 inbound, and 20 the
    // outbound proxy delivered on this node.
    let inbound = [
        ("direction", "inbound"),
        ("destination_workload", "enrolled"),
    ];
    let metrics = wait_until(Duration::from_secs(5), || {
        let text = node.metrics(&plain);
        let closed = sample(&text, "aviary_tcp_connections_closed_total", &inbound);
        (closed == 3.0).then_some(text)
    })
    .expect("the opaque connections are counted once closed");
    let requests = |source: &[(&str, &str)]| {
        let labels: Vec<_> = inbound.iter().chain(source).copied().collect();
        sample(&metrics, "aviary_requests_total", &labels)
    };
    assert_eq!(requests(&[("status_code", "200"), ("method", "GET")]), 43.0);
    assert_eq!(
        requests(&[("source_workload", "unknown")]),
        23.0,
        "the remote host"
    );
    assert_eq!(
        requests(&[("source_namespace", "other"), ("source_workload", "plain")]),
        20.0
    );
    assert_eq!(
        sample(
            &metrics,
            "aviary_requests_total",
            &[
                ("direction", "outbound"),
                ("destination_workload", "enrolled")
            ]
        ),
        20.0
    );
    let flagger = [
        ("kubernetes_namespace", "shop"),
        ("kubernetes_pod_name", enrolled.name.as_str()),
    ];
    assert_eq!(
        sample(&metrics, "http_request_duration_seconds_count", &flagger),
        63.0
    );
    assert_eq!(
        sample(
            &metrics,
            "aviary_tcp_connections_closed_total",
            &[("direction", "inbound")]
        ),
        3.0,
        "HTTP connections are counted as requests"
    );

    // Without the agent, inbound traffic reaches the pod directly.
    agent.kill();
    assert_eq!(peers(&node, &remote, &enrolled), direct);

    // A new agent keeps the policy routing the killed one left, takes over its attachments
    // (the uplink's, the bridge's, the pods' veths', sk_lookup's) and its maps, which already
    // hold the enrolled pods; a stopped one leaves them, failing open; uninstall removes them.
    // The rules of both families: one each.
    let rules = || {
        let family = |f: &str| aviary_tests::sh(&["ip", f, "-n", &node.netns, "rule"]).unwrap();
        family("-4") + &family("-6")
    };
    assert_eq!(rules().matches("fwmark 0xa71b").count(), 2, "{}", rules());
    let mut agent = node.start_agent(AGENT_ARGS);
    agent.wait_for_log("replaced=9 new=0 detached=0", Duration::from_secs(1));
    assert_eq!(rules().matches("fwmark 0xa71b").count(), 2, "{}", rules());
    assert_eq!(peers(&node, &remote, &enrolled), via_node);
    assert!(agent.terminate().success());
    assert_eq!(rules().matches("fwmark 0xa71b").count(), 2, "{}", rules());
    assert_eq!(peers(&node, &remote, &enrolled), direct);
    assert!(node.uninstall().unwrap().status.success());
    assert!(!rules().contains("fwmark 0xa71b"), "{}", rules());
    assert_eq!(peers(&node, &remote, &enrolled), direct);
}

/// A routed CNI (no bridge): a pod of this node that is not enrolled, and another host, reach an
/// enrolled pod through the inbound proxy. The uplink is the default route's interface.
#[test]
fn routed_pods_are_captured_and_the_uplink_is_found_by_the_default_route() {
    let Some(node) = Node::new() else { return };
    let enrolled = node.add_routed_pod("enrolled");
    node.serve_http(&enrolled, PORT);
    let client = node.add_routed_pod("client");
    let remote = node.add_remote_host("remote");
    aviary_tests::sh(&[
        "ip",
        "-n",
        &node.netns,
        "route",
        "add",
        "default",
        "via",
        &REMOTE_IP.to_string(),
    ])
    .unwrap();
    node.write_policy(&policy::documents(&[
        policy::namespace("shop", Some("enabled")),
        policy::namespace("other", None),
        policy::pod(&enrolled, "shop", None),
        policy::pod(&client, "other", None),
    ]));
    let mut agent = node.start_agent(&["--inbound-interfaces", "auto"]);
    agent.wait_for_log("inbound_added=1", Duration::from_secs(10));
    agent.wait_for_log("uplinks=[\"up0\"]", Duration::from_secs(1));

    let via_node = BTreeMap::from([(NODE_IP.to_string(), 20)]);
    assert_eq!(peers(&node, &remote, &enrolled), via_node);
    assert_eq!(peers(&node, &client, &enrolled), via_node);
    assert_eq!(agent.counter("inbound_captured"), 2);
    // The enrolled pod's own requests, and the replies to them, pass untouched.
    let direct = BTreeMap::from([(enrolled.ip.to_string(), 20)]);
    node.serve_http(&client, PORT);
    assert_eq!(peers(&node, &enrolled, &client), direct);
    assert_eq!(agent.counter("inbound_captured"), 2);
    assert!(agent.terminate().success());
}

/// IPv6: a client on another host reaches a dual-stack enrolled pod at its IPv6 address through
/// the inbound proxy, and directly once the agent is gone.
#[test]
fn ipv6_clients_reach_an_enrolled_pod_through_the_inbound_proxy() {
    let Some(node) = Node::new() else { return };
    let [enrolled] = node.add_http_pods(["enrolled"], PORT);
    let remote = node.add_remote_host("remote");
    node.write_policy(&policy::documents(&[
        policy::namespace("shop", Some("enabled")),
        policy::dual_stack_pod(&enrolled, "shop", None),
    ]));
    let mut agent = node.start_agent(AGENT_ARGS);
    agent.wait_for_log("inbound_added=2", Duration::from_secs(10));

    let pod6 = SocketAddr::new(enrolled.ip6.into(), PORT);
    let via_node = BTreeMap::from([(NODE_IP6.to_string(), 20)]);
    assert_eq!(peers_at(&node, &remote, &enrolled, pod6), via_node);
    assert_eq!(agent.counter("inbound_captured"), 1);
    reconnect(&node, &remote, pod6);
    assert_eq!(agent.counter("inbound_captured"), 4);
    let metrics = node.metrics(&enrolled);
    let inbound = [
        ("direction", "inbound"),
        ("destination_workload", "enrolled"),
    ];
    assert_eq!(sample(&metrics, "aviary_requests_total", &inbound), 23.0);

    agent.kill();
    let direct = BTreeMap::from([(REMOTE_IP6.to_string(), 20)]);
    assert_eq!(peers_at(&node, &remote, &enrolled, pod6), direct);
}

/// Kernels before 6.6 have no TCX: inbound capture attaches netlink filters to the interfaces'
/// clsact qdiscs, made when missing (forced here, on a kernel with TCX). The filters outlive
/// the agent, the next agent replaces their program in place (one filter each, never none),
/// and uninstall deletes them.
#[test]
fn netlink_filters_on_clsact_capture_inbound_and_pass_to_the_next_agent() {
    let Some(node) = Node::new() else { return };
    let [enrolled] = node.add_http_pods(["enrolled"], PORT);
    let remote = node.add_remote_host("remote");
    node.write_policy(&policy::documents(&[
        policy::namespace("shop", Some("enabled")),
        policy::pod(&enrolled, "shop", None),
    ]));
    let args = [AGENT_ARGS, &["--tc-attach", "netlink"]].concat();
    let ours = || {
        let filters = aviary_tests::sh(&[
            "tc",
            "-n",
            &node.netns,
            "filter",
            "show",
            "dev",
            UPLINK,
            "ingress",
        ])
        .unwrap();
        filters.matches("handle 0xa71b").count()
    };
    let mut agent = node.start_agent(&args);
    agent.wait_for_log("added a clsact qdisc", Duration::from_secs(1));
    agent.wait_for_log("inbound_added=1", Duration::from_secs(10));
    assert_eq!(ours(), 1);
    let via_node = BTreeMap::from([(NODE_IP.to_string(), 20)]);
    assert_eq!(peers(&node, &remote, &enrolled), via_node);
    assert_eq!(agent.counter("inbound_captured"), 1);

    // Killed: the filters stay, and fail open.
    agent.kill();
    let direct = BTreeMap::from([(REMOTE_IP.to_string(), 20)]);
    assert_eq!(peers(&node, &remote, &enrolled), direct);
    assert_eq!(ours(), 1);
    let mut agent = node.start_agent(&args);
    agent.wait_for_log("new=0 detached=0", Duration::from_secs(1));
    assert_eq!(ours(), 1, "replaced in place, not added");
    assert_eq!(peers(&node, &remote, &enrolled), via_node);
    assert!(agent.terminate().success());

    let uninstalled = node.uninstall().unwrap();
    assert!(uninstalled.status.success());
    assert_eq!(ours(), 0);
    assert_eq!(peers(&node, &remote, &enrolled), direct);
}
