//! Real gRPC through the proxy (tonic clients and servers, `aviary_tests::grpc`): calls split
//! 50/50 over two backends of a Service declared `kubernetes.io/h2c`, with the statuses, which
//! travel in trailers, reaching the client. First in process, with the HTTP proxy on loopback;
//! then end to end, the client in an enrolled pod calling a Service VIP through eBPF capture.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use aviary_agent::{
    proxy::{
        http::{HttpConfig, HttpProxy},
        metrics::Metrics,
    },
    table::{
        AppProtocol, Backend, BackendRef, Endpoint, HeaderModifier, RouteTable, Rule,
        ServiceRoutes, WeightedBackend,
    },
};
use aviary_tests::{
    grpc::{self, EchoRequest},
    policy, tally, Node,
};
use tokio::net::TcpListener;
use tonic::Code;

/// Unary calls: with 50/50 weights, the odds that one backend gets none are 2^-49.
const CALLS: u32 = 50;
/// Replies per server-streaming call.
const REPLIES: u32 = 100;
const NOT_FOUND: &str = "no echo here";

fn ask(code: Code, count: u32) -> EchoRequest {
    EchoRequest {
        text: match code {
            Code::Ok => "echo".into(),
            _ => NOT_FOUND.into(),
        },
        code: i32::from(code),
        count,
    }
}

/// A tonic server on loopback, and the Service-like backend `echo-<name>` in front of it.
async fn grpc_backend(name: &str) -> Arc<Backend> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = name.to_owned();
    tokio::spawn(async move { grpc::serve(listener, &serving).await });
    Arc::new(Backend {
        namespace: "shop".into(),
        name: format!("echo-{name}").into(),
        port: 80,
        endpoints: vec![Endpoint::new(addr, None, false, None)],
    })
}

fn weighted(backend: &Arc<Backend>, weight: u32) -> WeightedBackend {
    WeightedBackend {
        backend: BackendRef::Service(backend.clone()),
        weight,
        request_headers: HeaderModifier::default(),
        response_headers: HeaderModifier::default(),
    }
}

/// The HTTP proxy on loopback, serving each connection as traffic sent to `service`.
async fn start_proxy(service: SocketAddr, routes: ServiceRoutes) -> SocketAddr {
    let table = RouteTable {
        services: [(service, Arc::new(routes))].into_iter().collect(),
        ..Default::default()
    };
    let routes = Arc::new(ArcSwap::from_pointee(table));
    // Mark 0: no socket mark (that needs CAP_NET_ADMIN, and nothing captures here).
    let metrics = Arc::new(Metrics::new(true, None));
    let proxy = Arc::new(HttpProxy::new(HttpConfig::default(), routes, 0, metrics));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            tokio::spawn(proxy.clone().serve(stream, service, peer));
        }
    });
    addr
}

#[tokio::test]
async fn grpc_calls_are_split_and_their_statuses_reach_the_client() {
    let (primary, canary) = (grpc_backend("primary").await, grpc_backend("canary").await);
    let rule = Rule {
        backends: vec![weighted(&primary, 50), weighted(&canary, 50)],
        ..Default::default()
    };
    let routes = ServiceRoutes {
        flags: None,
        namespace: "shop".into(),
        name: "echo".into(),
        port: 80,
        protocol: AppProtocol::Http2,
        rules: vec![rule],
        default: primary,
    };
    let proxy = start_proxy("10.96.0.30:80".parse().unwrap(), routes).await;
    let mut client = grpc::Client::connect(proxy).await.unwrap();

    // Unary calls on one HTTP/2 connection, split per call.
    let mut backends = BTreeMap::<String, u32>::new();
    for _ in 0..CALLS {
        let reply = client.unary(ask(Code::Ok, 0)).await.unwrap();
        assert_eq!(reply.text, "echo");
        *backends.entry(reply.backend).or_default() += 1;
    }
    assert_eq!(backends.keys().collect::<Vec<_>>(), ["canary", "primary"]);
    assert_eq!(backends.values().sum::<u32>(), CALLS);

    // A failed unary call's status comes alone, in the headers of a response without a body.
    let failed = client.unary(ask(Code::NotFound, 0)).await.unwrap_err();
    assert_eq!(
        (failed.code(), failed.message()),
        (Code::NotFound, NOT_FOUND)
    );

    // A stream's status follows its replies, in trailers.
    for code in [Code::Ok, Code::NotFound] {
        let streamed = client.server_streaming(ask(code, REPLIES)).await;
        let indices: Vec<u32> = streamed.replies.iter().map(|r| r.index).collect();
        assert_eq!(indices, (0..REPLIES).collect::<Vec<_>>());
        let backend = &streamed.replies[0].backend;
        assert!(streamed.replies.iter().all(|r| &r.backend == backend));
        assert_eq!(streamed.status.code(), code, "{:?}", streamed.status);
        if code != Code::Ok {
            assert_eq!(streamed.status.message(), NOT_FOUND);
        }
    }
}

const PORT: u16 = 50051;

/// A ClusterIP Service at 10.96.0.`n` whose port declares HTTP/2 without TLS.
fn h2c_service(name: &str, n: u8) -> String {
    policy::h2c_service(name, "demo", [10, 96, 0, n].into(), PORT)
}

#[test]
fn grpc_calls_from_an_enrolled_pod_are_split_and_their_statuses_reach_it() {
    let Some(node) = Node::new() else { return };
    let client = node.add_pod("client");
    let [primary, canary] = ["primary", "canary"].map(|name| {
        let pod = node.add_pod(name);
        node.serve_grpc(&pod, PORT);
        pod
    });
    node.write_policy(&policy::documents(&[
        policy::namespace("demo", None),
        policy::pod(&client, "demo", Some("enabled")),
        h2c_service("echo", 30),
        h2c_service("echo-primary", 31),
        h2c_service("echo-canary", 32),
        policy::endpoint_slice("echo-primary", "demo", &[&primary], PORT),
        policy::endpoint_slice("echo-canary", "demo", &[&canary], PORT),
        policy::split_route("echo", "demo", &[("echo-primary", 50), ("echo-canary", 50)]),
    ]));
    let agent = node.start_agent(&[]);
    agent.wait_for_capture(&[&client], 3);
    agent.wait_for_log("routed=3", Duration::from_secs(10));

    let service = "10.96.0.30:80";
    let call = |args: &[&str]| {
        let out = node.run(&client, args, Duration::from_secs(30));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out, stdout)
    };
    let calls = CALLS.to_string();
    let (unary, _) = call(&["grpc-unary", service, "--count", &calls]);
    assert_eq!(
        tally(&unary, "status"),
        BTreeMap::from([("Ok".into(), CALLS)])
    );
    let backends = tally(&unary, "backend");
    assert_eq!(backends.keys().collect::<Vec<_>>(), ["canary", "primary"]);
    assert_eq!(backends.values().sum::<u32>(), CALLS);
    assert_eq!(
        agent.counter("connect_captured"),
        1,
        "one connection carried them"
    );

    let not_found = i32::from(Code::NotFound).to_string();
    let failure = format!("failed NotFound {NOT_FOUND}");
    let (failed, stdout) = call(&[
        "grpc-unary",
        service,
        "--code",
        &not_found,
        "--text",
        NOT_FOUND,
    ]);
    assert_eq!(
        tally(&failed, "status"),
        BTreeMap::from([("NotFound".into(), 1)])
    );
    assert!(stdout.contains(&failure), "{stdout}");

    let replies = REPLIES.to_string();
    let (ok, _) = call(&["grpc-stream", service, "--replies", &replies]);
    assert_stream(&ok, "Ok");
    let (failed, stdout) = call(&[
        "grpc-stream",
        service,
        "--replies",
        &replies,
        "--code",
        &not_found,
        "--text",
        NOT_FOUND,
    ]);
    assert_stream(&failed, "NotFound");
    assert!(stdout.contains(&failure), "{stdout}");
}

/// Every reply of a stream came, from one backend, and then its status `code`.
fn assert_stream(out: &std::process::Output, code: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("replies {REPLIES}\n")), "{stdout}");
    let backends = tally(out, "backend");
    assert_eq!(
        backends.values().collect::<Vec<_>>(),
        [&REPLIES],
        "{stdout}"
    );
    assert_eq!(tally(out, "status"), BTreeMap::from([(code.into(), 1)]));
}
