//! Inbound capture: a client on another host (over the uplink) and a pod of this node that is not
//! enrolled (over the bridge) reach an enrolled pod through the inbound proxy; other pods and
//! excluded ports are reached directly, and every pod directly once the agent is gone.

use std::{collections::BTreeMap, time::Duration};

use aviary_tests::{policy, tally, wait_until, Node, Pod, NODE_IP, REMOTE_IP, UPLINK};

const PORT: u16 = 8080;
const EXCLUDED: u16 = 8081;
const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 30);
const AGENT_ARGS: &[&str] = &["--inbound-interfaces", UPLINK, "--inbound-bridge", "br0"];

/// Who the server saw each of 20 requests (on one connection) come from.
fn peers(node: &Node, client: &Pod, server: &Pod) -> BTreeMap<String, u32> {
    peers_on(node, client, server, PORT)
}

fn peers_on(node: &Node, client: &Pod, server: &Pod, port: u16) -> BTreeMap<String, u32> {
    let out = node.run(
        client,
        &[
            "http-load",
            &format!("{}:{port}", server.ip),
            "--count",
            "20",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(tally(&out, "status"), BTreeMap::from([("200".into(), 20)]));
    assert_eq!(
        tally(&out, "backend").keys().collect::<Vec<_>>(),
        [&server.name]
    );
    tally(&out, "peer")
}

#[test]
fn remote_and_local_clients_reach_an_enrolled_pod_through_the_inbound_proxy() {
    let Some(node) = Node::new() else { return };
    let [enrolled, plain] = node.add_http_pods(["enrolled", "plain"], PORT);
    let caller = node.add_pod("caller");
    let remote = node.add_remote_host("remote");
    // The enrolled pod also serves on 8081, which it opts out of inbound capture.
    node.serve_http(&enrolled, EXCLUDED);
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
    // Not enrolled, or an excluded port: untouched.
    let direct = BTreeMap::from([(REMOTE_IP.to_string(), 20)]);
    assert_eq!(peers(&node, &remote, &plain), direct);
    assert_eq!(peers_on(&node, &remote, &enrolled, EXCLUDED), direct);
    assert_eq!(agent.counter("inbound_captured"), 2);

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
    assert_eq!(agent.counter("inbound_captured"), 2);

    let metrics = wait_until(Duration::from_secs(5), || {
        let out = node.run(
            &plain,
            &["http-get", &format!("{NODE_IP}:15020"), "/metrics"],
            Duration::from_secs(10),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let closed = aviary_agent::metrics::sample(
            &text,
            "aviary_tcp_connections_closed_total",
            &[
                ("direction", "inbound"),
                ("destination_namespace", "shop"),
                ("destination_workload", "enrolled"),
            ],
        );
        (closed == 2.0).then_some(text)
    });
    assert!(metrics.is_some(), "both inbound connections are counted");

    // Without the agent, inbound traffic reaches the pod directly.
    agent.kill();
    assert_eq!(peers(&node, &remote, &enrolled), direct);

    // A new agent replaces the policy routing the killed one left; a stopped one removes it.
    let rules = || aviary_tests::sh(&["ip", "-n", &node.netns, "rule"]).unwrap();
    assert!(rules().contains("fwmark 0xa71b"), "{}", rules());
    let mut agent = node.start_agent(AGENT_ARGS);
    agent.wait_for_log("inbound_added=2", Duration::from_secs(10));
    assert_eq!(rules().matches("fwmark 0xa71b").count(), 1, "{}", rules());
    assert_eq!(peers(&node, &remote, &enrolled), via_node);
    assert!(agent.terminate().success());
    assert!(!rules().contains("fwmark 0xa71b"), "{}", rules());
    assert_eq!(peers(&node, &remote, &enrolled), direct);
}
