//! The L4 shapes from a pod of one node to a pod of another, over the uplink between them:
//! direct, through both nodes' agents in plain text (the source's outbound proxy, the
//! destination's inbound proxy), and through them in mutual TLS (a tunnel between the agents,
//! with certificates from the signer against the API server fixture).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::bail;
use aviary_tests::{
    apiserver::ApiServer,
    policy,
    signer::{agent_token, pod, Scratch, Signer, NAMESPACE},
    Agent, Node, Pod, UPLINK,
};

use crate::{
    measure::{failures, measure, shapes_table},
    report::Report,
    topology::{reserve_ports, uninstall},
    Args,
};

pub const TITLE: &str = "Between two nodes";

/// What the section measures, for the page.
pub const METHOD: &str = "\
Two nodes joined by their uplinks (`--only cross-node`, and the full run), and the L4 section's
three shapes from a pod of one to a greeting/echo pod of the other behind a service VIP: direct
(the VIP routed across), through both agents in plain text (the source's outbound proxy, the
destination's inbound proxy), and through both in mutual TLS (a tunnel between the agents,
certificates from the signer against the API server fixture; the source expects exactly the
destination pod's identity).";

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const NODES: [&str; 2] = ["node-a", "node-b"];

pub fn run(a: &Args, report: &mut Report) -> anyhow::Result<()> {
    let Some((node_a, node_b)) = Node::pair() else {
        bail!("the benchmark needs root")
    };
    let nodes = [&node_a, &node_b];
    let client = setup(nodes)?;
    let service = SocketAddr::new(VIP.into(), 80);

    eprintln!("measuring between two nodes, direct (no agent)...");
    let direct = measure(&node_a, &client, service, a);

    eprintln!("measuring between two nodes through Aviary, in plain text...");
    let agents = start_agents(a, nodes, |_| Vec::new());
    agents[0].wait_for_capture(&[&client], 1);
    let plain = measure(&node_a, &client, service, a);
    drop(agents);

    eprintln!("measuring between two nodes through Aviary, in mutual TLS...");
    let mtls = mutual_tls(a, nodes, |agents| {
        agents[0].wait_for_capture(&[&client], 1);
        measure(&node_a, &client, service, a)
    })?;

    report.section(TITLE, METHOD);
    report.text(&format!(
        "Between two nodes: a greeting/echo backend on node-b behind a service VIP, from a \
         pod of node-a, direct and through both agents (opaque TCP); {} s each",
        a.secs
    ));
    let configs = [
        ("Aviary, plain text", &plain),
        ("Aviary, mutual TLS", &mtls),
    ];
    report.table(&shapes_table(&direct, &configs));
    failures(report, &[("direct", &direct), configs[0], configs[1]]);
    Ok(())
}

/// The client on node-a and the server on node-b, behind the VIP; the client.
fn setup(nodes: [&Node; 2]) -> anyhow::Result<Pod> {
    let [node_a, node_b] = nodes;
    for node in nodes {
        reserve_ports(node)?;
    }
    let client = node_a.add_pod("client");
    let server = node_b.add_pod("server");
    node_b.serve(&server, 80, None);
    // Without agents, node-a routes the VIP to node-b, and node-b to the server.
    node_b.add_vip(VIP, &server);
    aviary_tests::sh(&[
        "ip",
        "-n",
        &node_a.netns,
        "route",
        "add",
        &format!("{VIP}/32"),
        "via",
        "10.0.0.2",
    ])?;
    let yaml = policy::documents(&[
        policy::namespace("bench", Some("enabled")),
        policy::pod_on(&client, "bench", NODES[0], "client", &[]),
        policy::pod_on(&server, "bench", NODES[1], "server", &[]),
        policy::tcp_service("server", "bench", VIP.into(), 80, 80, &[&server]),
    ]);
    for node in nodes {
        node.write_policy(&yaml);
    }
    Ok(client)
}

/// Runs `measure` with both agents in mutual TLS: the API server fixture knows the agents and
/// the pods, the signer issues their certificates, and each agent holds its pod's identity.
fn mutual_tls<T>(
    a: &Args,
    nodes: [&Node; 2],
    measure: impl FnOnce(&[Agent]) -> T,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Runtime::new()?;
    let api = runtime.block_on(ApiServer::start())?;
    for node in NODES {
        let agent = format!("aviary-{node}");
        let uid = pod(&api, NAMESPACE, &agent, "aviary", node);
        api.issue_token(node, agent_token(&agent, &uid, node));
    }
    pod(&api, "bench", "client", "client", NODES[0]);
    pod(&api, "bench", "server", "server", NODES[1]);
    let signer = Signer::start(&api);
    let files = Scratch::default();
    let bundle = files.join("ca.crt");
    std::fs::write(&bundle, Signer::bundle_pem(&api))?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let agents = start_agents(a, nodes, |i| {
        let token = files.join(NODES[i]);
        std::fs::write(&token, NODES[i]).expect("writing a token");
        let address = signer.forwarded_into(nodes[i], runtime.handle());
        [
            "--identity-signer".into(),
            address,
            "--trust-bundle".into(),
            path(&bundle),
            "--identity-token".into(),
            path(&token),
        ]
        .into()
    });
    for (agent, identity) in agents.iter().zip(["client", "server"]) {
        agent.wait_for_log(
            &format!("identity=spiffe://cluster.local/ns/bench/sa/{identity}"),
            Duration::from_secs(20),
        );
    }
    Ok(measure(&agents))
}

/// Each node's agent, as its node, capturing inbound on the uplink and the bridge, with
/// `extra(i)` for the i-th node.
fn start_agents(a: &Args, nodes: [&Node; 2], extra: impl Fn(usize) -> Vec<String>) -> Vec<Agent> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            uninstall(node);
            let extra = extra(i);
            let mut args = vec![
                "--node-name",
                NODES[i],
                "--inbound-interfaces",
                UPLINK,
                "--inbound-bridge",
                "br0",
            ];
            args.extend(extra.iter().map(String::as_str));
            a.start_successor(node, &args)
        })
        .collect()
}
