//! Real gRPC through the proxy (tonic clients and servers, `aviary_tests::grpc`): calls split
//! 50/50 over two backends of a Service declared `kubernetes.io/h2c`, with the statuses, which
//! travel in trailers, reaching the client, in process, with the HTTP proxy on loopback.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use arc_swap::ArcSwap;
use aviary_agent::{
    metrics::Metrics,
    proxy::{
        http::{HttpConfig, HttpProxy},
        route::{
            AppProtocol, Backend, BackendRef, Endpoint, HeaderModifier, RouteTable, Rule,
            ServiceRoutes, WeightedBackend,
        },
    },
};
use aviary_tests::grpc::{self, EchoRequest};
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
        endpoints: vec![Endpoint::new(addr, None, false)],
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
        services: HashMap::from([(service, Arc::new(routes))]),
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
