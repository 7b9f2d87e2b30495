//! Mutual TLS between nodes: two nodes joined by their uplinks, each with its own agent, and
//! the signer against the API server fixture. A pod's connections to a pod enrolled on the
//! other node go through a tunnel between the two agents (HTTP/2 CONNECT over mutual TLS, on
//! port 15008), which the destination's agent authorizes by the pod's annotations.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use aviary_agent::metrics::sample;
use aviary_tests::{
    apiserver::ApiServer,
    patience, policy,
    signer::{agent_token, pod, Scratch, Signer, NAMESPACE},
    tally, wait_until, Agent, Node, Pod, UPLINK,
};

const PORT: u16 = 8080;
const OPAQUE: u16 = 9000;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const TCP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 51);
const PRIMARY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 52);
const CANARY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const AUDIT: &str = "spiffe://cluster.local/ns/shop/sa/audit";
const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";
const BATCH: &str = "spiffe://cluster.local/ns/shop/sa/batch";

/// The cluster's policy, as both agents read it: `shop` is enrolled; web and audit run on
/// node-a, payments and its canary (with `annotations`) on node-b; plain, in a namespace that
/// is not enrolled, on node-a. The payments Service splits its requests 50/50 between the two
/// and mirrors them to the canary.
fn policy(pods: &Pods, annotations: &[(&str, &str)]) -> String {
    let split = [
        ("aviary.dev/split", "payments-primary=50,payments-canary=50"),
        ("aviary.dev/mirror", "payments-canary"),
    ];
    policy::documents(&[
        policy::namespace("shop", Some("enabled")),
        policy::namespace("other", None),
        policy::pod_on(&pods.web, "shop", "node-a", "web", &[]),
        policy::pod_on(&pods.audit, "shop", "node-a", "audit", &[]),
        policy::pod_on(&pods.plain, "other", "node-a", "default", &[]),
        policy::pod_on(&pods.payments, "shop", "node-b", "payments", annotations),
        policy::pod_on(&pods.canary, "shop", "node-b", "payments", annotations),
        policy::pod_on(&pods.batch, "shop", "node-b", "batch", &[]),
        policy::http_service("payments", "shop", VIP.into(), PORT, &split),
        policy::http_service("payments-primary", "shop", PRIMARY_VIP.into(), PORT, &[]),
        policy::http_service("payments-canary", "shop", CANARY_VIP.into(), PORT, &[]),
        policy::endpoint_slice("payments-primary", "shop", &[&pods.payments], PORT),
        policy::endpoint_slice("payments-canary", "shop", &[&pods.canary], PORT),
        policy::tcp_service(
            "ledger",
            "shop",
            TCP_VIP.into(),
            OPAQUE,
            OPAQUE,
            &[&pods.payments],
        ),
    ])
}

struct Pods {
    web: Pod,
    audit: Pod,
    plain: Pod,
    payments: Pod,
    canary: Pod,
    /// An enrolled pod on payments' own node.
    batch: Pod,
}

/// What the agents logged of the requests they answered themselves, and why.
fn answered_by_the_proxy(agents: &[&Agent]) -> String {
    let lines: Vec<String> = agents
        .iter()
        .flat_map(|agent| agent.logs())
        .filter(|line| line.contains("answered a request itself"))
        .collect();
    format!("the agents' own answers:\n{}", lines.join("\n"))
}

/// Writes the same policy to both nodes.
fn write_policy(a: &Node, b: &Node, yaml: &str) {
    a.write_policy(yaml);
    b.write_policy(yaml);
}

/// Starts `node`'s agent as `node_name`, with its signer, bundle and token.
fn start_agent(node: &Node, node_name: &str, signer: &str, files: &Scratch) -> Agent {
    let (bundle, token) = (files.join("ca.crt"), files.join(node_name));
    let (bundle, token) = (path(&bundle), path(&token));
    node.start_agent(&[
        "--node-name",
        node_name,
        "--inbound-interfaces",
        UPLINK,
        "--inbound-bridge",
        "br0",
        "--identity-signer",
        signer,
        "--trust-bundle",
        &bundle,
        "--identity-token",
        &token,
    ])
}

fn path(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// How many of `count` requests from `client` to `addr` got each status.
fn statuses(node: &Node, client: &Pod, addr: SocketAddr, count: u32) -> BTreeMap<String, u32> {
    let out = node.run(
        client,
        &[
            "http-load",
            &addr.to_string(),
            "--count",
            &count.to_string(),
        ],
        Duration::from_secs(20),
    );
    tally(&out, "status")
}

/// The body of one GET from `client` to `addr`.
fn get(node: &Node, client: &Pod, addr: SocketAddr) -> String {
    let out = node.run(
        client,
        &["http-get", &addr.to_string(), "/"],
        Duration::from_secs(20),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `count` connections from `client` to the opaque Service are greeted and echoed.
fn opaque_ok(node: &Node, client: &Pod, count: u32) -> bool {
    let out = node.run(
        client,
        &[
            "connect",
            &format!("{TCP_VIP}:{OPAQUE}"),
            "--count",
            &count.to_string(),
        ],
        Duration::from_secs(20),
    );
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&format!("ok {count}"))
}

/// What `node.sniff` saw: word → count.
fn sniffed(mut output: impl std::io::Read) -> BTreeMap<String, u32> {
    let mut text = String::new();
    output.read_to_string(&mut text).unwrap();
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(word, n)| (word.to_owned(), n.parse().unwrap()))
        .collect()
}

#[test]
fn pods_on_two_nodes_talk_over_mutual_tls_and_the_destination_authorizes() {
    let Some((a, b)) = Node::pair() else { return };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let api = runtime.block_on(ApiServer::start()).unwrap();
    let pods = Pods {
        web: a.add_pod("web"),
        audit: a.add_pod("audit"),
        plain: a.add_pod("plain"),
        payments: b.add_pod("payments"),
        canary: b.add_pod("canary"),
        batch: b.add_pod("batch"),
    };
    b.serve_http(&pods.payments, PORT);
    b.serve_http(&pods.canary, PORT);
    b.serve(&pods.payments, OPAQUE, None);

    // The fixture: each node's agent pod and token, and the workloads the signer certifies.
    for node in ["node-a", "node-b"] {
        let agent = format!("aviary-{node}");
        let uid = pod(&api, NAMESPACE, &agent, "aviary", node);
        api.issue_token(node, agent_token(&agent, &uid, node));
    }
    pod(&api, "shop", "web", "web", "node-a");
    pod(&api, "shop", "audit", "audit", "node-a");
    pod(&api, "shop", "payments", "payments", "node-b");
    pod(&api, "shop", "canary", "payments", "node-b");
    pod(&api, "shop", "batch", "batch", "node-b");
    // Short-lived certificates: each is renewed every 5 s, under the long stream below.
    let signer = Signer::start_with(
        &api,
        &["--listen", "127.0.0.1:0", "--certificate-lifetime", "10s"],
    );
    let files = Scratch::default();
    std::fs::write(files.join("ca.crt"), Signer::bundle_pem(&api)).unwrap();
    for node in ["node-a", "node-b"] {
        std::fs::write(files.join(node), node).unwrap();
    }

    // Permissive, and no allow-from: anyone may call payments.
    write_policy(&a, &b, &policy(&pods, &[]));
    let signer_a = signer.forwarded_into(&a, runtime.handle());
    let signer_b = signer.forwarded_into(&b, runtime.handle());
    let agent_a = start_agent(&a, "node-a", &signer_a, &files);
    let agent_b = start_agent(&b, "node-b", &signer_b, &files);
    for (agent, identity) in [(&agent_a, WEB), (&agent_a, AUDIT), (&agent_b, PAYMENTS)] {
        agent.wait_for_log(
            &format!("identity={identity}"),
            patience(Duration::from_secs(20)),
        );
    }

    // Requests from web reach payments through the tunnel, and the wire between the nodes
    // carries TLS only: no request line crosses it.
    let service = SocketAddr::new(VIP.into(), 80);
    let sniffer = a.sniff(UPLINK, 15008, "GET /", 4 * aviary_tests::slowdown());
    let out = a.run(
        &pods.web,
        &["http-load", &service.to_string(), "--count", "40"],
        Duration::from_secs(20),
    );
    assert_eq!(
        tally(&out, "status"),
        BTreeMap::from([("200".into(), 40)]),
        "{}",
        answered_by_the_proxy(&[&agent_a, &agent_b])
    );
    // Split as the weights say (20 expected of each; all 40 to one side: 2 in 10^12).
    let backends = tally(&out, "backend");
    assert_eq!(backends.values().sum::<u32>(), 40, "{backends:?}");
    assert!(backends.len() == 2, "{backends:?}");
    let wire = sniffed(sniffer);
    assert!(wire["segments"] > 0, "{wire:?}");
    assert_eq!(
        wire["port"], wire["segments"],
        "every segment is the tunnel's: {wire:?}"
    );
    assert!(wire["tls"] > 0, "{wire:?}");
    assert_eq!(
        wire["needle"], 0,
        "a request line crossed the wire: {wire:?}"
    );

    // Every GET mirrored to the canary, through a tunnel of its own.
    let stats = SocketAddr::new(pods.canary.ip.into(), PORT);
    wait_until(patience(Duration::from_secs(10)), || {
        let out = b.run(
            &pods.payments,
            &["http-get", &stats.to_string(), "/stats"],
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout)
            .contains("mirrored GET 40")
            .then_some(())
    })
    .expect("the canary got a copy of each GET");

    // Both agents name both identities; the destination's measures the requests.
    let mtls = [
        ("source_principal", WEB),
        ("destination_principal", PAYMENTS),
        ("connection_security_policy", "mutual_tls"),
    ];
    let requests = |node: &Node, pod: &Pod, direction: &str| {
        let labels: Vec<_> = [
            ("direction", direction),
            ("status_code", "200"),
            ("mirror", "false"),
        ]
        .into_iter()
        .chain(mtls)
        .collect();
        sample(&node.metrics(pod), "aviary_requests_total", &labels)
    };
    let inbound = requests(&b, &pods.payments, "inbound");
    assert_eq!(
        inbound,
        40.0,
        "where node-b counted the requests:\n{}",
        b.metrics(&pods.payments)
            .lines()
            .filter(|l| l.starts_with("aviary_requests_total{") && l.contains("inbound"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(requests(&a, &pods.web, "outbound"), 40.0);

    // Opaque TCP goes through the tunnel too, and so does an HTTP upgrade.
    assert!(opaque_ok(&a, &pods.web, 3));
    let out = a.run(
        &pods.web,
        &[
            "echo-stream",
            &service.to_string(),
            "--secs",
            "2",
            "--upgrade",
        ],
        patience(Duration::from_secs(20)),
    );
    let stream = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stream.contains(" ok"), "{stream}");

    // Plain text from outside the mesh is accepted, and labelled so.
    let direct = SocketAddr::new(pods.payments.ip.into(), PORT);
    assert_eq!(
        statuses(&a, &pods.plain, direct, 3),
        BTreeMap::from([("200".into(), 3)])
    );
    let plain = [
        ("direction", "inbound"),
        ("destination_workload", "payments"),
        ("source_principal", "unknown"),
        ("connection_security_policy", "none"),
    ];
    let metrics = b.metrics(&pods.payments);
    assert_eq!(sample(&metrics, "aviary_requests_total", &plain), 3.0);

    // A pod of payments' own node reaches it without a tunnel.
    assert_eq!(
        statuses(&b, &pods.batch, service, 3),
        BTreeMap::from([("200".into(), 3)])
    );

    // Strict, and only web allowed: audit is refused with the reason (HTTP) or a reset
    // (TCP), plain text is refused, and each denial is counted by who asked. What audit had
    // open before (a pooled HTTP tunnel, a TCP session) is closed by the change.
    assert_eq!(
        statuses(&a, &pods.audit, service, 2),
        BTreeMap::from([("200".into(), 2)])
    );
    let mut held = a.session(&pods.audit, SocketAddr::new(TCP_VIP.into(), OPAQUE));
    assert_eq!(held.echo("before"), "before");
    let strict = [
        ("aviary.dev/mtls", "strict"),
        ("aviary.dev/allow-from", "shop/web"),
    ];
    write_policy(&a, &b, &policy(&pods, &strict));
    let mut last = String::new();
    let refused = wait_until(patience(Duration::from_secs(10)), || {
        last = get(&a, &pods.audit, service);
        last.contains("not among the identities")
            .then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("allow-from took no effect: {last}"));
    assert_eq!(
        refused.trim(),
        format!(
            "aviary: {AUDIT} is not among the identities the destination's \
             aviary.dev/allow-from admits (shop/web)"
        )
    );
    assert_eq!(
        statuses(&a, &pods.audit, service, 5),
        BTreeMap::from([("403".into(), 5)])
    );
    assert!(!opaque_ok(&a, &pods.audit, 1), "audit's TCP is reset");
    assert_eq!(
        statuses(&a, &pods.web, service, 20),
        BTreeMap::from([("200".into(), 20)])
    );
    assert!(opaque_ok(&a, &pods.web, 3));
    assert_eq!(
        get(&a, &pods.plain, direct).trim(),
        "aviary: plain text is refused: the destination's aviary.dev/mtls is strict"
    );
    wait_until(patience(Duration::from_secs(5)), || {
        held.try_echo("after").is_none().then_some(())
    })
    .expect("the session the new policy denies is closed");
    // The same holds on payments' own node, where no connection passes an inbound proxy of
    // another agent: batch is refused through the Service and at the pod's address.
    let batch_refused = format!(
        "aviary: {BATCH} is not among the identities the destination's aviary.dev/allow-from \
         admits (shop/web)"
    );
    assert_eq!(get(&b, &pods.batch, service).trim(), batch_refused);
    assert_eq!(get(&b, &pods.batch, direct).trim(), batch_refused);
    let metrics = b.metrics(&pods.payments);
    let denied = |source: &str, reason: &str| {
        let labels = [("source_principal", source), ("reason", reason)];
        sample(&metrics, "aviary_inbound_denied_total", &labels)
    };
    // At least, over payments and its canary: the session, a request, the 5 requests and the
    // connection after the change (and their mirror copies, and the tunnels pooled before
    // unless a request met them first).
    assert!(denied(AUDIT, "not_allowed") >= 8.0, "{metrics}");
    assert_eq!(denied("unknown", "plaintext"), 1.0);

    // A stream that outlives several certificates: renewed under it, it carries on.
    let renewed = agent_a.logs().iter().filter(|l| l.contains(WEB)).count();
    let out = a.run(
        &pods.web,
        &[
            "echo-stream",
            &format!("{TCP_VIP}:{OPAQUE}"),
            "--secs",
            "12",
        ],
        patience(Duration::from_secs(40)),
    );
    let stream = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stream.contains(" ok"), "{stream}");
    let after = agent_a.logs().iter().filter(|l| l.contains(WEB)).count();
    assert!(
        after >= renewed + 2,
        "web's certificate was renewed during the stream"
    );

    // The destination's agent gone: a clear error, and still nothing in plain text on the wire.
    drop(agent_b);
    let sniffer = a.sniff(UPLINK, 15008, "GET /", 3 * aviary_tests::slowdown());
    let down = format!(
        "connecting to {}:15008, the destination's agent, failed",
        pods.payments.ip
    );
    // Once the tunnels pooled before have seen their peer go.
    wait_until(patience(Duration::from_secs(2)), || {
        get(&a, &pods.web, service).contains(&down).then_some(())
    })
    .expect("the source is told the destination's agent is down");
    assert_eq!(sniffed(sniffer)["needle"], 0);
    drop(signer);
}
