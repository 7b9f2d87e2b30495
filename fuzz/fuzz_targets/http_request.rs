//! The proxy's HTTP serving path: any bytes a client sends on a connection to a captured
//! service (HTTP/1.1, or HTTP/2 after its preface) get answers or a closed connection, never a
//! panic.
//!
//! Each input is one client connection, in memory, served once as outbound (to a service
//! whose HTTPRoute has header, path, method and query matches, a split, a mirror, header
//! filters, timeouts, a backend without endpoints and one that does not exist, and feature
//! flags evaluated on each request before its routes match) and once as
//! inbound (passed through to a pod). The endpoints are one HTTP server on loopback that
//! answers at once; the client waits for answers on the runtime's paused clock, so each
//! input's work is bounded and takes no sleep.
#![no_main]

use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, LazyLock},
    time::Duration,
};

use arc_swap::ArcSwap;
use aviary_agent::{
    policy::{compiler, local, service_routes::RouteOptions, Store},
    proxy::{
        detect,
        http::{HttpConfig, HttpProxy},
        metrics::Metrics,
    },
};
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use libfuzzer_sys::fuzz_target;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    runtime::Runtime,
};

/// The cluster, with every endpoint at the loopback server (the fixture's endpoints are all at
/// 127.0.0.1:8080). The ClusterIPs are never dialled: a request to a service goes to its
/// endpoints.
const POLICY: &str = include_str!("../../tests/fixtures/shop.yaml");

/// The service clients dial (web's ClusterIP).
const SERVICE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 80);
/// The client, as the proxy sees it (no pod of the policy).
const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), 40000);
/// Bytes in flight each way on the in-memory client connection.
const CONNECTION_BUFFER: usize = 64 * 1024;
/// How long the client waits for more answers before it closes. The runtime's clock is
/// paused, and jumps ahead only when every task waits: this wait takes no real time, and ends
/// only when the proxy has nothing left to do but wait for the client.
const QUIET: Duration = Duration::from_secs(1);

struct Harness {
    runtime: Runtime,
    proxy: Arc<HttpProxy>,
    endpoint: SocketAddr,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    // A write to a socket its peer closed must fail with EPIPE, not kill the process: a Rust
    // program's own main (the agent's) ignores SIGPIPE before it starts, libFuzzer's does not.
    // SAFETY: setting a signal's disposition to "ignore" runs no code in a handler.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // One thread, as a data-plane worker: its pools and balancer statistics are per thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let endpoint = runtime.block_on(async {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the endpoint");
        let endpoint = listener.local_addr().expect("the endpoint's address");
        tokio::spawn(serve_endpoint(listener));
        endpoint
    });
    let policy = POLICY.replace("port: 8080", &format!("port: {}", endpoint.port()));
    let mut store = Store::default();
    let rejected = store.replace_all(local::parse_documents(&policy).expect("the policy parses"));
    assert!(rejected.is_empty(), "{rejected:?}");
    let table = compiler::routing_table(&store, &RouteOptions::default());
    assert!(table.services.get(&SERVICE).is_some(), "web is routed");
    let proxy = Arc::new(HttpProxy::new(
        HttpConfig::default(),
        Arc::new(ArcSwap::from_pointee(table)),
        0,
        Arc::new(Metrics::new(true, None)),
    ));
    Harness {
        runtime,
        proxy,
        endpoint,
    }
});

/// The endpoint: reads each request whole and answers 200 with a short body, over HTTP/1.1 or
/// HTTP/2; it agrees to an upgrade (101), then closes the upgraded connection.
async fn serve_endpoint(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|mut req: Request<Incoming>| async move {
                if let Some(protocol) = req.headers().get(header::UPGRADE).cloned() {
                    let upgraded = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move { drop(upgraded.await) });
                    let mut response = Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    let headers = response.headers_mut();
                    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    headers.insert(header::UPGRADE, protocol);
                    return Ok::<_, Infallible>(response);
                }
                let _ = req.into_body().collect().await;
                Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One client connection: writes `data`, reads the answers until the proxy has been silent
/// for [`QUIET`], then closes its side and reads what is left until the proxy closes too.
///
/// A client that closed its side at once would see little: the proxy drops the requests of a
/// client that has gone (as Envoy and nginx do), so they would seldom reach an endpoint.
async fn exchange(harness: &Harness, data: &[u8], inbound: bool) {
    let (client, server) = tokio::io::duplex(CONNECTION_BUFFER);
    let (proxy, endpoint) = (harness.proxy.clone(), harness.endpoint);
    let serving = tokio::spawn(async move {
        if inbound {
            proxy.serve_inbound(server, endpoint, CLIENT).await
        } else {
            proxy.serve(server, SERVICE, CLIENT).await
        }
    });
    let (mut read, mut write) = tokio::io::split(client);
    // The proxy may close first (a malformed request): what it did not read is dropped.
    let _ = write.write_all(data).await;
    let mut answers = [0; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(QUIET, read.read(&mut answers)).await {
        if n == 0 {
            break;
        }
    }
    let _ = write.shutdown().await;
    let _ = tokio::io::copy(&mut read, &mut tokio::io::sink()).await;
    serving
        .await
        .expect("the connection's task ends without a panic");
}

fuzz_target!(|data: &[u8]| {
    // Detection reads the first bytes of every captured connection.
    let _ = detect::classify(&data[..data.len().min(24)]);
    let harness = &*HARNESS;
    harness.runtime.block_on(async {
        exchange(harness, data, false).await;
        exchange(harness, data, true).await;
    });
});
