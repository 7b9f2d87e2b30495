//! Upgrades under load: a successor agent takes over from the running one (listeners and open
//! connections through the hand-off socket) while clients keep going, and not one request or
//! connection fails.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use aviary_tests::{patience, policy, slowdown, tally_lines, Agent, Node, Pod};

const PORT: u16 = 8080;
const GRPC_PORT: u16 = 50051;
const ECHO_PORT: u16 = 9000;

/// A service VIP, 10.96.0.n.
fn vip(n: u8) -> IpAddr {
    Ipv4Addr::new(10, 96, 0, n).into()
}

/// Starts a successor on the node, waits until the running agent has drained into it, and stops
/// the running agent (its SIGTERM, as the DaemonSet controller sends it once the successor is
/// ready). Returns the successor, and how many connections moved to it.
fn upgrade(node: &Node, mut running: Agent) -> (Agent, u32) {
    let successor = node.start_agent(&[]);
    successor.wait_for_log("took over from the running agent", Duration::from_secs(10));
    let drained = running.wait_for_log("drained into the successor", Duration::from_secs(30));
    let moved = drained
        .split_whitespace()
        .find_map(|w| w.strip_prefix("moved="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of moved connections in {drained:?}"));
    let status = running.terminate();
    assert!(status.success(), "{status:?}");
    // A hand-off that went well leaves no warning about it.
    let logs = running.logs();
    let warned: Vec<_> = logs
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("successor"))
        .collect();
    assert!(warned.is_empty(), "{warned:#?}");
    (successor, moved)
}

/// How long a load or stream may run at most: it is told to stop (its standard input closes)
/// once the upgrades are over, however long they took.
fn at_most() -> String {
    patience(Duration::from_secs(120)).as_secs().to_string()
}

fn http_pods(node: &Node) -> (Pod, [Pod; 2], [Pod; 2]) {
    let client = node.add_pod("client");
    let http = node.add_http_pods(["primary", "canary"], PORT);
    let grpc = ["grpc-primary", "grpc-canary"].map(|name| {
        let pod = node.add_pod(name);
        node.serve_grpc(&pod, GRPC_PORT);
        pod
    });
    (client, http, grpc)
}

#[test]
fn keep_alive_load_over_http1_and_http2_sees_no_failure_across_an_upgrade() {
    let Some(node) = Node::new() else { return };
    let (client, [primary, canary], [grpc_primary, grpc_canary]) = http_pods(&node);
    let split = [("aviary.dev/split", "podinfo-primary=90,podinfo-canary=10")];
    let h2c = |name: &str, n: u8| policy::h2c_service(name, "demo", vip(n), GRPC_PORT);
    node.write_policy(&policy::documents(&[
        policy::namespace("demo", None),
        policy::pod(&client, "demo", Some("enabled")),
        policy::http_service("podinfo", "demo", vip(10), PORT, &split),
        policy::http_service("podinfo-primary", "demo", vip(11), PORT, &[]),
        policy::http_service("podinfo-canary", "demo", vip(12), PORT, &[]),
        policy::endpoint_slice("podinfo-primary", "demo", &[&primary], PORT),
        policy::endpoint_slice("podinfo-canary", "demo", &[&canary], PORT),
        h2c("echo", 30),
        h2c("echo-primary", 31),
        h2c("echo-canary", 32),
        policy::endpoint_slice("echo-primary", "demo", &[&grpc_primary], GRPC_PORT),
        policy::endpoint_slice("echo-canary", "demo", &[&grpc_canary], GRPC_PORT),
        policy::split_route("echo", "demo", &[("echo-primary", 90), ("echo-canary", 10)]),
    ]));
    let agent = node.start_agent(&[]);
    agent.wait_for_capture(&[&client], 6);
    agent.wait_for_log("routed=6", Duration::from_secs(10));

    // Several keep-alive HTTP/1.1 connections, and gRPC over one HTTP/2 connection, from
    // before the upgrade until after it: 2 s of traffic, the upgrade, 2 s more.
    let secs = at_most();
    let http1 = node.start_until_stopped(
        &client,
        &[
            "http-load",
            "10.96.0.10:80",
            "--secs",
            &secs,
            "--connections",
            "4",
            "--until-stdin-closes",
        ],
    );
    let grpc = node.start_until_stopped(
        &client,
        &[
            "grpc-unary",
            "10.96.0.30:80",
            "--secs",
            &secs,
            "--count",
            "1000000",
            "--until-stdin-closes",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let (successor, _) = upgrade(&node, agent);
    std::thread::sleep(Duration::from_secs(2));

    let http1 = http1.stop();
    let statuses = tally_lines(&http1, "status");
    assert_eq!(statuses.keys().collect::<Vec<_>>(), ["200"], "{http1}");
    assert_eq!(tally_lines(&http1, "errors").len(), 0, "{http1}");
    assert!(http1.contains("\nerrors 0\n"), "{http1}");
    // Enough requests to show the load ran across the upgrade, on a machine this fast.
    let enough = 100 / slowdown();
    assert!(statuses["200"] > enough, "{http1}");
    let grpc = grpc.stop();
    let statuses = tally_lines(&grpc, "status");
    assert_eq!(statuses.keys().collect::<Vec<_>>(), ["Ok"], "{grpc}");
    assert!(statuses["Ok"] > enough, "{grpc}");
    // The listeners moved, so not one connect found none and went direct.
    assert_eq!(successor.counter("connect_failed_open"), 0);
    assert!(successor.counter("connect_captured") > 4);
}

#[test]
fn long_lived_streams_survive_three_upgrades_byte_for_byte() {
    let Some(node) = Node::new() else { return };
    let client = node.add_pod("client");
    let echo = node.add_pod("echo");
    node.serve(&echo, ECHO_PORT, None);
    let [web] = node.add_http_pods(["web"], PORT);
    node.write_policy(&policy::documents(&[
        policy::namespace("demo", None),
        policy::pod(&client, "demo", Some("enabled")),
        policy::http_service("db", "demo", vip(20), ECHO_PORT, &[]),
        policy::endpoint_slice("db", "demo", &[&echo], ECHO_PORT),
        policy::http_service("web", "demo", vip(21), PORT, &[]),
        policy::endpoint_slice("web", "demo", &[&web], PORT),
    ]));
    let mut agent = node.start_agent(&[]);
    agent.wait_for_capture(&[&client], 2);
    agent.wait_for_log("routed=2", Duration::from_secs(10));

    // An opaque stream (the backend greets first) and a WebSocket-style upgraded one, each
    // checking every byte that comes back. They are under way before the first upgrade and
    // stream until told to stop, after the third, however long the upgrades take.
    let secs = at_most();
    let stream = |addr: &str, upgrade: bool| {
        let mut args = vec!["echo-stream", addr, "--secs", &secs, "--until-stdin-closes"];
        if upgrade {
            args.push("--upgrade");
        }
        node.start_until_stopped(&client, &args)
    };
    let mut opaque = stream("10.96.0.20:80", false);
    let mut upgraded = stream("10.96.0.21:80", true);
    for stream in [&mut opaque, &mut upgraded] {
        assert_eq!(stream.read_line(), "streaming\n");
    }
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(2));
        let moved;
        (agent, moved) = upgrade(&node, agent);
        assert_eq!(moved, 2, "both streams moved");
    }
    for (name, stream) in [("opaque", opaque), ("upgraded", upgraded)] {
        let out = stream.stop();
        assert!(
            out.starts_with("stream ") && out.trim_end().ends_with(" ok"),
            "the {name} stream broke: {out:?}; agent logs:\n{}",
            agent.logs().join("\n")
        );
    }
    assert_eq!(
        agent.counter("connect_captured"),
        2,
        "the two streams were captured once, and never again"
    );
}
