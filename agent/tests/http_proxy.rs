//! The HTTP proxy against real hyper backends and clients on loopback: splits per request on
//! one connection, A/B matches, errors, timeouts, retries, mirroring and hygiene.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use aviary_agent::{metrics::sample, proxy::metrics::Metrics};
use aviary_agent::{
    proxy::{
        drain::{Drain, DrainSignal, Moved},
        http::{HttpConfig, HttpProxy},
    },
    table::{
        flags::{NamespaceFlags, RequestFlag, RequestFlags},
        AppProtocol, Backend, BackendRef, Endpoint, HeaderMatch, HeaderModifier, KeySource, Mirror,
        PathMatch, RequestMatch, RouteTable, Rule, SafeMethods, ServiceRoutes, SplitKey,
        StringMatch, WeightedBackend, Workload,
    },
};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

const SERVICE: &str = "10.96.0.10:80";

/// What a backend saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    headers: HeaderMap,
    body_len: usize,
    /// The body arrived whole (it ended as its framing said), not cut off.
    body_complete: bool,
}

/// A real HTTP backend (HTTP/1.1 and HTTP/2) that names itself in `x-backend`, records every
/// request, and sleeps for `delay` before answering.
struct TestBackend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn backend(name: &'static str, delay: Duration) -> TestBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let record = record.clone();
            tokio::spawn(async move {
                let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let record = record.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes());
                        record.lock().unwrap().push(Seen {
                            method: parts.method,
                            headers: parts.headers,
                            body_complete: body.is_ok(),
                            body_len: body.map_or(0, |b| b.len()),
                        });
                        tokio::time::sleep(delay).await;
                        let response = Response::builder()
                            .header("x-backend", name)
                            .header("connection", "x-hop")
                            .header("x-hop", "1")
                            .body(Full::new(Bytes::from(name)))
                            .unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), handler)
                    .await;
            });
        }
    });
    TestBackend { addr, seen }
}

impl TestBackend {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A backend process and the Service-like backend `podinfo-<name>` in front of it.
async fn backend_service(name: &'static str, delay: Duration) -> (TestBackend, Arc<Backend>) {
    let process = backend(name, delay).await;
    let service = service_backend(&format!("podinfo-{name}"), &[process.addr]);
    (process, service)
}

fn service_backend(name: &str, endpoints: &[SocketAddr]) -> Arc<Backend> {
    Arc::new(Backend {
        namespace: "shop".into(),
        name: name.into(),
        port: 80,
        endpoints: endpoints
            .iter()
            .map(|&a| Endpoint::new(a, None, false, None))
            .collect(),
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

fn service(rules: Vec<Rule>, default: Arc<Backend>) -> ServiceRoutes {
    ServiceRoutes {
        flags: None,
        namespace: "shop".into(),
        name: "podinfo".into(),
        port: 80,
        protocol: AppProtocol::Detect,
        rules,
        default,
    }
}

/// The proxy on loopback, serving every connection as traffic to SERVICE.
struct TestProxy {
    addr: SocketAddr,
    routes: Arc<ArcSwap<RouteTable>>,
    metrics: Arc<Metrics>,
}

impl TestProxy {
    /// The sum of the samples of `series` whose labels include all of `labels`.
    fn sample(&self, series: &str, labels: &[(&str, &str)]) -> f64 {
        sample(&self.metrics.render(), series, labels)
    }
}

/// A routing table holding just SERVICE.
fn table(routes: ServiceRoutes) -> RouteTable {
    table_at(SERVICE.parse().unwrap(), routes)
}

/// A routing table holding just the service at `addr`.
fn table_at(addr: SocketAddr, routes: ServiceRoutes) -> RouteTable {
    RouteTable {
        services: [(addr, Arc::new(routes))].into_iter().collect(),
        ..Default::default()
    }
}

async fn start_proxy_with(cfg: HttpConfig, routes: ServiceRoutes) -> TestProxy {
    start_proxy_at(SERVICE.parse().unwrap(), cfg, routes).await
}

/// The proxy on loopback, serving every connection as traffic the client sent to `dst`.
async fn start_proxy_at(dst: SocketAddr, cfg: HttpConfig, routes: ServiceRoutes) -> TestProxy {
    start_proxy_draining_on(dst, cfg, routes, DrainSignal::new().1).await
}

/// The same, draining its connections when `drain` says so.
async fn start_proxy_draining_on(
    dst: SocketAddr,
    cfg: HttpConfig,
    routes: ServiceRoutes,
    drain: Drain,
) -> TestProxy {
    let routes = Arc::new(ArcSwap::from_pointee(table_at(dst, routes)));
    // Mark 0: no socket mark (that needs CAP_NET_ADMIN, and nothing captures here).
    let metrics = Arc::new(Metrics::new(true, None));
    let proxy =
        Arc::new(HttpProxy::new(cfg, routes.clone(), 0, metrics.clone()).draining_on(drain));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = proxy;
    tokio::spawn(async move {
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            tokio::spawn(serving.clone().serve(stream, dst, peer));
        }
    });
    TestProxy {
        addr,
        routes,
        metrics,
    }
}

async fn start_proxy(routes: ServiceRoutes) -> TestProxy {
    start_proxy_with(HttpConfig::default(), routes).await
}

/// One HTTP/1.1 keep-alive connection to the proxy.
async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "podinfo.shop")
        .body(Full::default())
        .unwrap()
}

fn request(method: Method, path: &str, body: &[u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "podinfo.shop")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap()
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, String) {
    sender.ready().await.unwrap();
    let response = sender.send_request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn backend_of(headers: &HeaderMap) -> String {
    headers
        .get("x-backend")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn split_setup() -> (TestBackend, TestBackend, ServiceRoutes) {
    let (primary, p) = backend_service("primary", Duration::ZERO).await;
    let (canary, c) = backend_service("canary", Duration::ZERO).await;
    let rule = Rule {
        backends: vec![weighted(&p, 90), weighted(&c, 10)],
        ..Default::default()
    };
    (primary, canary, service(vec![rule], p))
}

#[tokio::test]
async fn one_http1_connection_sees_the_split_per_request() {
    let (_primary, _canary, routes) = split_setup().await;
    let proxy = start_proxy(routes).await;
    let mut conn = h1(proxy.addr).await;
    let mut canary = 0;
    for _ in 0..2000 {
        let (status, headers, _) = send(&mut conn, get("/")).await;
        assert_eq!(status, StatusCode::OK);
        canary += usize::from(backend_of(&headers) == "canary");
    }
    // 10% of 2000 is 200, with a standard deviation of 13.4: ±60 is ±4.5 sigma.
    assert!((140..=260).contains(&canary), "canary got {canary} of 2000");
}

#[tokio::test]
async fn one_http2_connection_sees_the_split_per_stream() {
    let (_primary, _canary, routes) = split_setup().await;
    let proxy = start_proxy(routes).await;
    let mut conn = h2(proxy.addr).await;
    let mut canary = 0;
    for _ in 0..1000 {
        conn.ready().await.unwrap();
        let response = conn
            .send_request(get("http://podinfo.shop/"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        canary += usize::from(backend_of(response.headers()) == "canary");
    }
    // 100 expected, standard deviation 9.5.
    assert!((55..=145).contains(&canary), "canary got {canary} of 1000");
}

#[tokio::test]
async fn a_weight_change_applies_to_the_next_request_on_the_same_connection() {
    let (_primary, _canary, routes) = split_setup().await;
    let proxy = start_proxy(routes.clone()).await;
    let mut conn = h1(proxy.addr).await;
    send(&mut conn, get("/")).await;

    // Promotion: the same backends, new weights.
    let mut promoted = routes;
    promoted.rules[0].backends[0].weight = 0;
    promoted.rules[0].backends[1].weight = 100;
    proxy.routes.store(Arc::new(table(promoted)));
    for _ in 0..100 {
        let (status, headers, _) = send(&mut conn, get("/")).await;
        assert_eq!(
            (status, backend_of(&headers).as_str()),
            (StatusCode::OK, "canary")
        );
    }
}

#[tokio::test]
async fn a_split_key_keeps_each_user_on_one_backend_as_the_canary_grows() {
    let (_primary, _canary, mut routes) = split_setup().await;
    routes.rules[0].split_key = Some(Arc::new(SplitKey {
        source: KeySource::Header(http::HeaderName::from_static("x-user-id")),
        salt: "shop/podinfo".into(),
    }));
    let proxy = start_proxy(routes.clone()).await;
    let mut conn = h1(proxy.addr).await;
    let as_user = |user: u32| {
        let mut req = get("/");
        req.headers_mut().insert("x-user-id", user.into());
        req
    };
    let mut landed = Vec::new();
    for user in 0..400 {
        let (_, first, _) = send(&mut conn, as_user(user)).await;
        let (_, again, _) = send(&mut conn, as_user(user)).await;
        assert_eq!(backend_of(&first), backend_of(&again), "user {user} moved");
        landed.push(backend_of(&first));
    }
    let on_canary = landed.iter().filter(|b| *b == "canary").count();
    // 10% of 400 by hash: 40 expected; the hash is fixed, so this is exact for these users.
    assert!(
        (20..=60).contains(&on_canary),
        "{on_canary} of 400 on the canary"
    );

    // The next step of the rollout: every user already on the canary stays there.
    routes.rules[0].backends[0].weight = 50;
    routes.rules[0].backends[1].weight = 50;
    proxy.routes.store(Arc::new(table(routes)));
    let mut now_on_canary = 0;
    for (user, before) in landed.iter().enumerate() {
        let (_, headers, _) = send(&mut conn, as_user(user as u32)).await;
        let now = backend_of(&headers);
        assert!(
            before != "canary" || now == "canary",
            "user {user} left the canary"
        );
        now_on_canary += usize::from(now == "canary");
    }
    assert!(
        now_on_canary > on_canary + 100,
        "{now_on_canary} of 400 at 50%"
    );
}

/// The flags of namespace shop: `new-checkout` on for `percent`% of users by targeting key.
fn checkout_flags(percent: u32) -> Arc<NamespaceFlags> {
    let set = aviary_flags::FlagSet::parse(&serde_json::json!({"flags": {"new-checkout": {
        "state": "ENABLED",
        "variants": {"on": true, "off": false},
        "defaultVariant": "off",
        "targeting": {"fractional": [["on", percent], ["off", 100 - percent]]},
    }}}))
    .unwrap();
    Arc::new(NamespaceFlags {
        sets: vec![("checkout".into(), Arc::new(set))],
    })
}

#[tokio::test]
async fn a_flag_decides_before_the_routes_match_and_keeps_its_users_as_it_grows() {
    let (_primary, p) = backend_service("primary", Duration::ZERO).await;
    let (canary, c) = backend_service("canary", Duration::ZERO).await;
    let flag_on = RequestMatch {
        headers: vec![HeaderMatch {
            name: "x-aviary-flag-new-checkout".parse().unwrap(),
            value: StringMatch::Exact("on".into()),
        }],
        ..Default::default()
    };
    let rules = vec![
        Rule {
            matches: vec![flag_on],
            backends: vec![weighted(&c, 1)],
            ..Default::default()
        },
        Rule {
            backends: vec![weighted(&p, 1)],
            ..Default::default()
        },
    ];
    let mut routes = service(rules, p);
    routes.flags = Some(Arc::new(RequestFlags {
        namespace: "shop".into(),
        flags: vec![RequestFlag {
            key: "new-checkout".into(),
            header: "x-aviary-flag-new-checkout".parse().unwrap(),
        }],
        targeting_key: Some(KeySource::Header("x-user-id".parse().unwrap())),
        context_headers: Vec::new(),
    }));
    let with_flags = |percent| {
        let mut table = table(routes.clone());
        table.flags.insert("shop".into(), checkout_flags(percent));
        Arc::new(table)
    };
    let proxy = start_proxy(routes.clone()).await;
    proxy.routes.store(with_flags(20));
    let mut conn = h1(proxy.addr).await;
    // Each user says the flag is on: the proxy decides, not the client.
    let as_user = |user: u32| {
        let mut req = get("/");
        req.headers_mut().insert("x-user-id", user.into());
        req.headers_mut()
            .insert("x-aviary-flag-new-checkout", "on".parse().unwrap());
        req
    };
    let users = 500;
    let mut on_canary = Vec::new();
    for user in 0..users {
        let (status, headers, _) = send(&mut conn, as_user(user)).await;
        assert_eq!(status, StatusCode::OK);
        if backend_of(&headers) == "canary" {
            on_canary.push(user);
        }
    }
    // 100 expected; the hash is fixed, so this is exact for these users.
    assert!(
        (70..=130).contains(&on_canary.len()),
        "{} of {users} on the canary at 20%",
        on_canary.len()
    );
    // The canary saw the variant the flag chose, and only it.
    let seen = canary.seen();
    assert_eq!(seen.len(), on_canary.len());
    assert!(seen
        .iter()
        .all(|s| s.headers["x-aviary-flag-new-checkout"] == "on"));

    proxy.routes.store(with_flags(50));
    let mut now_on_canary = 0;
    for user in 0..users {
        let (_, headers, _) = send(&mut conn, as_user(user)).await;
        let on = backend_of(&headers) == "canary";
        assert!(
            on || !on_canary.contains(&user),
            "user {user} left the canary"
        );
        now_on_canary += u32::from(on);
    }
    assert!(
        (200..=300).contains(&now_on_canary),
        "{now_on_canary} at 50%"
    );
    let evaluations = |variant: &str| {
        proxy.sample(
            "aviary_flag_evaluations_total",
            &[
                ("feature_flag_key", "new-checkout"),
                ("feature_flag_result_variant", variant),
                ("feature_flag_result_reason", "TARGETING_MATCH"),
            ],
        )
    };
    assert_eq!(
        evaluations("on"),
        (on_canary.len() as u32 + now_on_canary) as f64
    );
    assert_eq!(evaluations("on") + evaluations("off"), f64::from(2 * users));
}

#[tokio::test]
async fn header_and_cookie_matches_route_ab_traffic() {
    let (_primary, p) = backend_service("primary", Duration::ZERO).await;
    let (_canary, c) = backend_service("canary", Duration::ZERO).await;
    let cookie = RequestMatch {
        headers: vec![HeaderMatch {
            name: http::header::COOKIE,
            value: StringMatch::Regex(regex::Regex::new("^(.*?;)?(canary=always)(;.*)?$").unwrap()),
        }],
        ..Default::default()
    };
    let header = RequestMatch {
        headers: vec![HeaderMatch {
            name: "x-canary".parse().unwrap(),
            value: StringMatch::Exact("insider".into()),
        }],
        ..Default::default()
    };
    let rules = vec![
        Rule {
            matches: vec![cookie, header],
            backends: vec![weighted(&c, 100)],
            ..Default::default()
        },
        Rule {
            backends: vec![weighted(&p, 100)],
            ..Default::default()
        },
    ];
    let proxy = start_proxy(service(rules, p)).await;
    let mut conn = h1(proxy.addr).await;
    let with = |name: &'static str, value: &'static str| {
        let mut req = get("/");
        req.headers_mut().insert(name, value.parse().unwrap());
        req
    };
    let cases = [
        (with("cookie", "canary=always"), "canary"),
        (with("cookie", "user=1;canary=always"), "canary"),
        (with("cookie", "canary=never"), "primary"),
        (with("x-canary", "insider"), "canary"),
        (with("x-canary", "outsider"), "primary"),
        (get("/"), "primary"),
    ];
    for (req, want) in cases {
        let (_, headers, _) = send(&mut conn, req).await;
        assert_eq!(backend_of(&headers), want);
    }
}

#[tokio::test]
async fn the_proxy_answers_what_it_cannot_route_with_a_clear_status() {
    let primary = backend("primary", Duration::ZERO).await;
    let p = service_backend("podinfo-primary", &[primary.addr]);
    let nobody = service_backend("podinfo-empty", &[]);
    let only_posts = RequestMatch {
        method: Some(Method::POST),
        ..Default::default()
    };
    let by_path = |path: &str| RequestMatch {
        path: Some(aviary_agent::table::PathMatch::Prefix(path.into())),
        ..Default::default()
    };
    let rules = vec![
        Rule {
            matches: vec![by_path("/zero")],
            backends: vec![weighted(&p, 0)],
            ..Default::default()
        },
        Rule {
            matches: vec![by_path("/missing")],
            backends: vec![WeightedBackend {
                backend: BackendRef::Invalid {
                    name: "ghost".into(),
                    reason: "Service not found".into(),
                },
                ..weighted(&p, 1)
            }],
            ..Default::default()
        },
        Rule {
            matches: vec![by_path("/empty")],
            backends: vec![weighted(&nobody, 1)],
            ..Default::default()
        },
        Rule {
            matches: vec![only_posts],
            backends: vec![weighted(&p, 1)],
            ..Default::default()
        },
    ];
    let proxy = start_proxy(service(rules, p)).await;
    let mut conn = h1(proxy.addr).await;
    let cases = [
        (
            "/zero",
            StatusCode::INTERNAL_SERVER_ERROR,
            "weight 0",
            "invalid_backend",
        ),
        (
            "/missing",
            StatusCode::INTERNAL_SERVER_ERROR,
            "ghost is unavailable: Service not found",
            "invalid_backend",
        ),
        (
            "/empty",
            StatusCode::SERVICE_UNAVAILABLE,
            "podinfo-empty has no endpoints",
            "no_endpoints",
        ),
        (
            "/other",
            StatusCode::NOT_FOUND,
            "no route matches",
            "no_route",
        ),
    ];
    for (path, status, text, reason) in cases {
        let (got, headers, body) = send(&mut conn, get(path)).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.contains(text), "{path}: {body}");
        assert_eq!(headers["x-aviary-error"], reason, "{path}");
    }
    assert_eq!(
        send(&mut conn, request(Method::POST, "/other", b"x"))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn timeouts_answer_504() {
    let slow = backend("slow", Duration::from_millis(500)).await;
    let b = service_backend("slow", &[slow.addr]);
    let per_try = Rule {
        backends: vec![weighted(&b, 1)],
        backend_timeout: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let proxy = start_proxy(service(vec![per_try], b.clone())).await;
    let start = Instant::now();
    let (status, _, body) = send(&mut h1(proxy.addr).await, get("/")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(start.elapsed() < Duration::from_millis(450));

    let whole = Rule {
        backends: vec![weighted(&b, 1)],
        timeout: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let proxy = start_proxy(service(vec![whole], b)).await;
    assert_eq!(
        send(&mut h1(proxy.addr).await, get("/")).await.0,
        StatusCode::GATEWAY_TIMEOUT
    );
}

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn a_request_no_endpoint_received_is_retried_once_on_another_endpoint() {
    let live = backend("live", Duration::ZERO).await;
    let dead = closed_port().await;
    let b = service_backend("podinfo", &[dead, live.addr]);
    let proxy = start_proxy(service(
        vec![Rule {
            backends: vec![weighted(&b, 1)],
            ..Default::default()
        }],
        b,
    ))
    .await;
    let mut conn = h1(proxy.addr).await;
    for _ in 0..50 {
        assert_eq!(send(&mut conn, get("/")).await.0, StatusCode::OK);
    }
    // A refused connect sent nothing, so even a POST goes again, whole, to the live endpoint.
    for _ in 0..50 {
        let (status, _, body) = send(&mut conn, request(Method::POST, "/", b"payload")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert!(live
        .seen()
        .iter()
        .filter(|s| s.method == Method::POST)
        .all(|s| s.body_complete && s.body_len == 7));

    let all_dead = service_backend("podinfo", &[dead]);
    let proxy = start_proxy(service(vec![], all_dead)).await;
    let (status, _, body) = send(&mut h1(proxy.addr).await, get("/")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body.contains(&format!("connecting to {dead} failed")),
        "{body}"
    );
    assert!(body.contains("no other endpoint"), "{body}");
}

#[tokio::test]
async fn an_endpoint_whose_connect_fails_is_ejected_after_the_first_failure() {
    let healthy = backend("healthy", Duration::from_millis(50)).await;
    let refusing = closed_port().await;
    let b = service_backend("podinfo", &[refusing, healthy.addr]);
    let proxy = start_proxy(service(vec![], b)).await;
    let mut conn = h1(proxy.addr).await;
    // The refusing endpoint is never measured, so it looks cheaper than the healthy one at
    // 50 ms: without ejection, every request would try it first.
    for _ in 0..10 {
        let (status, _, body) = send(&mut conn, request(Method::POST, "/", b"payload")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(send(&mut conn, get("/")).await.0, StatusCode::OK);
    }
    let failures = [
        ("reason", "connect_failure"),
        ("destination_service", "podinfo"),
    ];
    assert_eq!(
        proxy.sample("aviary_endpoint_failures_total", &failures),
        1.0,
        "one failed connect, then no request paid for another"
    );
    assert_eq!(
        proxy.sample("aviary_endpoint_ejections_total", &failures),
        1.0
    );
    assert_eq!(healthy.seen().len(), 20);
}

/// A backend that answers every request with `status` after `delay`, counting them.
async fn answering(
    status: StatusCode,
    delay: Duration,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let counted = counted.clone();
            let handler = hyper::service::service_fn(move |_: Request<Incoming>| {
                counted.fetch_add(1, Ordering::Relaxed);
                let response = Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::new()));
                async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(response.unwrap())
                }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), handler)
                    .await;
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn an_endpoint_answering_server_errors_in_a_row_is_ejected() {
    use std::sync::atomic::Ordering;
    // Failing fast looks cheap to latency-aware balancing: without ejection, the failing
    // endpoint would take nearly every request.
    let (failing, failed) = answering(StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO).await;
    let (healthy, served) = answering(StatusCode::OK, Duration::from_millis(40)).await;
    let b = service_backend("podinfo", &[failing, healthy]);
    let proxy = start_proxy(service(vec![], b)).await;
    let mut conn = h1(proxy.addr).await;
    for _ in 0..40 {
        send(&mut conn, get("/")).await;
    }
    // Five 5xx in a row eject it (the default), for longer than this test runs.
    assert_eq!(failed.load(Ordering::Relaxed), 5);
    assert_eq!(served.load(Ordering::Relaxed), 35);
    let server_errors = [("reason", "server_error")];
    assert_eq!(
        proxy.sample("aviary_endpoint_failures_total", &server_errors),
        5.0
    );
    assert_eq!(
        proxy.sample("aviary_endpoint_ejections_total", &server_errors),
        1.0
    );
}

fn mirrored(backend: &Arc<Backend>, percent: u32, safe: SafeMethods) -> Mirror {
    Mirror::new(backend.clone(), percent, 100, safe)
}

async fn wait_for(mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "condition not met in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn only_idempotent_requests_are_mirrored() {
    let (primary, p) = backend_service("primary", Duration::ZERO).await;
    let (shadow, s) = backend_service("shadow", Duration::ZERO).await;
    let rule = Rule {
        backends: vec![weighted(&p, 1)],
        mirror: Some(mirrored(&s, 100, SafeMethods::default())),
        ..Default::default()
    };
    let proxy = start_proxy(service(vec![rule], p)).await;
    let mut conn = h1(proxy.addr).await;
    for method in [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::POST,
        Method::PATCH,
        Method::PUT,
        Method::DELETE,
    ] {
        let (status, _, _) = send(&mut conn, request(method.clone(), "/", b"")).await;
        assert_eq!(status, StatusCode::OK, "{method}");
    }
    wait_for(|| shadow.seen().len() == 3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = shadow.seen();
    let methods: Vec<&Method> = seen.iter().map(|s| &s.method).collect();
    assert_eq!(methods, [&Method::GET, &Method::HEAD, &Method::OPTIONS]);
    for s in &seen {
        assert_eq!(s.headers["x-aviary-mirror"], "1");
        assert_eq!(s.headers["host"], "podinfo-shadow.shop.svc.cluster.local");
    }
    wait_for(|| proxy.sample("aviary_mirror_requests_total", &[("outcome", "sent")]) == 3.0).await;
    assert_eq!(
        proxy.sample(
            "aviary_mirror_requests_total",
            &[("outcome", "skipped_not_idempotent")]
        ),
        4.0
    );
    assert_eq!(
        proxy.sample(
            "aviary_requests_total",
            &[("mirror", "true"), ("status_code", "200")]
        ),
        3.0,
        "the mirrors' responses are measured"
    );
    // The primary saw every request, and no mirror marker.
    assert_eq!(primary.seen().len(), 7);
    assert!(primary
        .seen()
        .iter()
        .all(|s| !s.headers.contains_key("x-aviary-mirror")));
}

#[tokio::test]
async fn declared_methods_are_mirrored_and_large_bodies_are_not() {
    let (primary, p) = backend_service("primary", Duration::ZERO).await;
    let (shadow, s) = backend_service("shadow", Duration::ZERO).await;
    let safe = SafeMethods {
        extra: vec![Method::PUT],
        idempotency_key: true,
    };
    let rule = Rule {
        backends: vec![weighted(&p, 1)],
        mirror: Some(mirrored(&s, 100, safe)),
        ..Default::default()
    };
    let cfg = HttpConfig {
        body_buffer_limit: 1024,
        ..Default::default()
    };
    let proxy = start_proxy_with(cfg, service(vec![rule], p)).await;
    let mut conn = h1(proxy.addr).await;

    send(&mut conn, request(Method::PUT, "/", b"small")).await;
    let mut keyed = request(Method::POST, "/", b"order");
    keyed
        .headers_mut()
        .insert("idempotency-key", "k1".parse().unwrap());
    send(&mut conn, keyed).await;
    send(&mut conn, request(Method::PATCH, "/", b"no")).await;
    let (status, _, _) = send(&mut conn, request(Method::PUT, "/", &[b'x'; 4096])).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the primary still gets a body too large to mirror"
    );

    wait_for(|| shadow.seen().len() == 2).await;
    let outcome = |o| proxy.sample("aviary_mirror_requests_total", &[("outcome", o)]);
    wait_for(|| outcome("sent") == 2.0).await;
    assert_eq!(outcome("skipped_not_idempotent"), 1.0);
    assert_eq!(outcome("skipped_body_too_large"), 1.0);
    assert_eq!(shadow.seen()[0].body_len, 5, "the mirror gets the body too");
    assert_eq!(primary.seen()[3].body_len, 4096);
}

#[tokio::test]
async fn bodies_past_the_buffer_budget_stream_and_skip_their_mirror() {
    let (primary, p) = backend_service("primary", Duration::ZERO).await;
    let (shadow, s) = backend_service("shadow", Duration::ZERO).await;
    let safe = SafeMethods {
        extra: vec![Method::PUT],
        idempotency_key: false,
    };
    let rule = Rule {
        backends: vec![weighted(&p, 1)],
        mirror: Some(mirrored(&s, 100, safe)),
        ..Default::default()
    };
    let cfg = HttpConfig {
        body_buffer_limit: 100,
        body_buffer_budget: 150,
        ..Default::default()
    };
    let proxy = start_proxy_with(cfg, service(vec![rule], p)).await;
    // A slow upload: its 100 bytes are reserved while they arrive.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"PUT / HTTP/1.1\r\nhost: podinfo.shop\r\ncontent-length: 100\r\n\r\n")
        .await
        .unwrap();
    slow.write_all(&[b'x'; 50]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut conn = h1(proxy.addr).await;
    let put = || request(Method::PUT, "/", &[b'x'; 100]);
    assert_eq!(send(&mut conn, put()).await.0, StatusCode::OK);
    let outcome = |o| proxy.sample("aviary_mirror_requests_total", &[("outcome", o)]);
    assert_eq!(
        outcome("skipped_buffer_budget"),
        1.0,
        "it streamed, unmirrored"
    );

    slow.write_all(&[b'x'; 50]).await.unwrap();
    let mut buf = [0u8; 1024];
    assert!(slow.read(&mut buf).await.unwrap() > 0);
    wait_for(|| outcome("sent") == 1.0).await;
    // The upload is done and its copy sent: the budget is back.
    assert_eq!(send(&mut conn, put()).await.0, StatusCode::OK);
    wait_for(|| outcome("sent") == 2.0).await;
    assert_eq!(shadow.seen().len(), 2);
    assert_eq!(primary.seen().len(), 3);
    assert!(primary
        .seen()
        .iter()
        .all(|s| s.body_len == 100 && s.body_complete));
}

/// Reads until the proxy closes the connection; how long that took.
async fn closed_after(stream: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the proxy kept the connection open"),
        }
    }
}

#[tokio::test]
async fn a_client_slow_to_send_its_headers_or_idle_between_requests_is_closed() {
    let (_primary, p) = backend_service("primary", Duration::ZERO).await;
    let cfg = HttpConfig {
        header_read_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let proxy = start_proxy_with(cfg, service(vec![], p)).await;

    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: podinfo.shop\r\n")
        .await
        .unwrap();
    let waited = closed_after(&mut slow).await;
    assert!(waited >= Duration::from_millis(250), "{waited:?}");

    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: podinfo.shop\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    assert!(
        idle.read(&mut buf).await.unwrap() > 0,
        "the first request is answered"
    );
    let waited = closed_after(&mut idle).await;
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
}

#[tokio::test]
async fn a_connection_that_moves_no_bytes_for_the_idle_timeout_is_closed() {
    let (_primary, p) = backend_service("primary", Duration::ZERO).await;
    let cfg = HttpConfig {
        header_read_timeout: None,
        idle_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let proxy = start_proxy_with(cfg, service(vec![], p)).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    // Bytes every 100 ms keep it open: a request, slowly.
    for part in [
        "GET / HTTP/1.1\r\n",
        "host: podinfo.shop\r\n",
        "x-slow: 1\r\n",
    ] {
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.write_all(part.as_bytes()).await.unwrap();
    }
    conn.write_all(b"\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    assert!(conn.read(&mut buf).await.unwrap() > 0, "answered");
    let waited = closed_after(&mut conn).await;
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
}

#[tokio::test]
async fn an_http2_client_that_stops_answering_pings_is_closed() {
    let (_primary, p) = backend_service("primary", Duration::ZERO).await;
    let cfg = HttpConfig {
        http2_keepalive_interval: Some(Duration::from_millis(200)),
        http2_keepalive_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let proxy = start_proxy_with(cfg, service(vec![], p)).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    // The connection preface and an empty SETTINGS frame, then silence: the proxy's SETTINGS
    // and PINGs are never acknowledged.
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let waited = closed_after(&mut conn).await;
    assert!(waited >= Duration::from_millis(350), "{waited:?}");
}

#[tokio::test]
async fn a_slow_mirror_never_slows_the_primary_and_overload_is_dropped() {
    let (_primary, p) = backend_service("primary", Duration::ZERO).await;
    let (_shadow, s) = backend_service("shadow", Duration::from_secs(5)).await;
    let with_mirror = Rule {
        backends: vec![weighted(&p, 1)],
        mirror: Some(mirrored(&s, 100, SafeMethods::default())),
        ..Default::default()
    };
    // Longer than the 300 requests take (even on a slow, busy machine), shorter than the
    // mirror's 5 s: all four permits stay taken for the whole run, then every mirror times out.
    let cfg = HttpConfig {
        mirror_timeout: Duration::from_secs(4),
        mirror_in_flight: 4,
        ..Default::default()
    };
    let mirrored_proxy = start_proxy_with(cfg, service(vec![with_mirror], p)).await;
    let mut conn = h1(mirrored_proxy.addr).await;
    for _ in 0..300 {
        let start = Instant::now();
        assert_eq!(send(&mut conn, get("/")).await.0, StatusCode::OK);
        // Had it waited for its mirror, it would have taken the mirror's 4 s timeout. How much
        // faster it is than without a mirror is the benchmark's to measure, not a test's.
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "a request took {took:?} beside a 5 s mirror"
        );
    }

    let outcome = |o| mirrored_proxy.sample("aviary_mirror_requests_total", &[("outcome", o)]);
    assert_eq!(outcome("dropped_overload"), 296.0, "4 in flight at most");
    wait_for(|| outcome("timed_out") == 4.0).await;
}

#[tokio::test]
async fn hop_by_hop_headers_go_and_forwarding_headers_come() {
    let primary = backend("primary", Duration::ZERO).await;
    let p = service_backend("podinfo-primary", &[primary.addr]);
    let proxy = start_proxy(service(vec![], p)).await;
    let mut conn = h1(proxy.addr).await;
    let mut req = get("/");
    let headers = req.headers_mut();
    headers.insert("connection", "x-secret, keep-alive".parse().unwrap());
    headers.insert("x-secret", "1".parse().unwrap());
    headers.insert("proxy-authorization", "Basic eA==".parse().unwrap());
    headers.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    headers.insert("x-forwarded-for", "192.0.2.7".parse().unwrap());
    let (_, response_headers, _) = send(&mut conn, req).await;
    let seen = &primary.seen()[0].headers;
    assert!(!seen.contains_key("x-secret"));
    assert!(!seen.contains_key("proxy-authorization"));
    assert_eq!(
        seen["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(seen["x-forwarded-for"], "192.0.2.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["host"], "podinfo.shop");
    // The backend's own hop-by-hop header does not reach the client.
    assert!(!response_headers.contains_key("x-hop"));
}

#[tokio::test]
async fn per_backend_header_filters_apply_to_requests_and_responses() {
    let canary = backend("canary", Duration::ZERO).await;
    let c = service_backend("podinfo-canary", &[canary.addr]);
    let mut w = weighted(&c, 1);
    w.request_headers
        .set
        .push(("x-route".parse().unwrap(), "canary".parse().unwrap()));
    w.response_headers.add.push((
        "set-cookie".parse().unwrap(),
        "canary=always; Max-Age=3600".parse().unwrap(),
    ));
    let proxy = start_proxy(service(
        vec![Rule {
            backends: vec![w],
            ..Default::default()
        }],
        c,
    ))
    .await;
    let (_, headers, _) = send(&mut h1(proxy.addr).await, get("/")).await;
    assert_eq!(headers["set-cookie"], "canary=always; Max-Age=3600");
    assert_eq!(canary.seen()[0].headers["x-route"], "canary");
}

#[tokio::test]
async fn the_mirror_copy_has_the_rules_filters_but_not_the_chosen_backends() {
    let (primary, p) = backend_service("primary", Duration::ZERO).await;
    let (shadow, s) = backend_service("shadow", Duration::ZERO).await;
    let mut w = weighted(&p, 1);
    w.request_headers
        .set
        .push(("x-backend-only".parse().unwrap(), "1".parse().unwrap()));
    let mut rule = Rule {
        backends: vec![w],
        mirror: Some(mirrored(&s, 100, SafeMethods::default())),
        ..Default::default()
    };
    rule.request_headers
        .set
        .push(("x-rule".parse().unwrap(), "1".parse().unwrap()));
    let proxy = start_proxy(service(vec![rule], p)).await;
    assert_eq!(
        send(&mut h1(proxy.addr).await, get("/")).await.0,
        StatusCode::OK
    );
    wait_for(|| shadow.seen().len() == 1).await;
    let (copy, original) = (&shadow.seen()[0].headers, &primary.seen()[0].headers);
    assert_eq!(copy["x-rule"], "1");
    assert!(!copy.contains_key("x-backend-only"), "{copy:?}");
    assert_eq!(original["x-rule"], "1");
    assert_eq!(original["x-backend-only"], "1");
}

#[tokio::test]
async fn a_malformed_request_gets_400_and_others_are_still_served() {
    let primary = backend("primary", Duration::ZERO).await;
    let p = service_backend("podinfo-primary", &[primary.addr]);
    let proxy = start_proxy(service(vec![], p)).await;

    let mut raw = TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let mut many = TcpStream::connect(proxy.addr).await.unwrap();
    let headers: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    many.write_all(format!("GET / HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    many.read_to_end(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    assert_eq!(
        send(&mut h1(proxy.addr).await, get("/")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_truncated_body_never_reaches_the_backend() {
    let (primary, p) = backend_service("primary", Duration::ZERO).await;
    let proxy = start_proxy(service(vec![], p)).await;
    let mut raw = TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part")
        .await
        .unwrap();
    raw.shutdown().await.unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The body streams, so the backend may see the request begin; it must see it cut off.
    assert!(
        primary.seen().iter().all(|seen| !seen.body_complete),
        "the backend got a truncated request as if it were whole"
    );
}

/// A backend Service whose one endpoint is a known pod of `workload`.
fn pod_backend(name: &str, workload: &str, pod: &str, addr: SocketAddr) -> Arc<Backend> {
    let pod = Workload {
        namespace: "shop".into(),
        workload: workload.into(),
        pod: pod.into(),
    };
    Arc::new(Backend {
        namespace: "shop".into(),
        name: name.into(),
        port: 80,
        endpoints: vec![Endpoint::new(addr, Some(Arc::new(pod)), false, None)],
    })
}

#[tokio::test]
async fn metrics_count_every_request_by_version_status_and_destination_pod() {
    let primary = backend("primary", Duration::ZERO).await;
    let canary = backend("canary", Duration::ZERO).await;
    let p = pod_backend(
        "podinfo-primary",
        "podinfo-primary",
        "podinfo-primary-5b6c8d-aaaaa",
        primary.addr,
    );
    let c = pod_backend(
        "podinfo-canary",
        "podinfo",
        "podinfo-7d9f8b-bbbbb",
        canary.addr,
    );
    let rule = Rule {
        matches: vec![RequestMatch {
            path: Some(PathMatch::Prefix("/api".into())),
            ..Default::default()
        }],
        backends: vec![weighted(&p, 50), weighted(&c, 50)],
        ..Default::default()
    };
    let proxy = start_proxy(service(vec![rule], p)).await;
    let mut conn = h1(proxy.addr).await;
    for _ in 0..20 {
        send(&mut conn, get("/api/items")).await;
    }
    for _ in 0..5 {
        send(&mut conn, request(Method::POST, "/api/items", b"{}")).await;
    }
    for _ in 0..3 {
        let (status, _, _) = send(&mut conn, get("/elsewhere")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    let text = proxy.metrics.render();
    let count = |labels: &[(&str, &str)]| sample(&text, "aviary_requests_total", labels);
    let seen =
        |b: &TestBackend, m: Method| b.seen().iter().filter(|s| s.method == m).count() as f64;
    let common = [
        ("direction", "outbound"),
        ("source_namespace", "unknown"),
        ("source_workload", "unknown"),
        ("destination_namespace", "shop"),
        ("destination_service", "podinfo"),
        ("mirror", "false"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| [&common[..], extra].concat();
    for (backend, version, workload) in [
        (&primary, "podinfo-primary", "podinfo-primary"),
        (&canary, "podinfo-canary", "podinfo"),
    ] {
        let labels = [
            ("destination_version", version),
            ("destination_workload", workload),
            ("status_code", "200"),
        ];
        assert_eq!(
            count(&with(&[labels[0], labels[1], labels[2], ("method", "GET")])),
            seen(backend, Method::GET),
            "{text}"
        );
        assert_eq!(
            count(&with(&[
                labels[0],
                labels[1],
                labels[2],
                ("method", "POST")
            ])),
            seen(backend, Method::POST)
        );
    }
    assert_eq!(
        count(&with(&[("method", "GET"), ("status_code", "200")])),
        20.0
    );
    assert_eq!(count(&with(&[("method", "POST")])), 5.0);
    assert_eq!(
        count(&with(&[
            ("destination_version", "unknown"),
            ("status_code", "404")
        ])),
        3.0,
        "answers the proxy makes itself count too"
    );
    assert_eq!(
        sample(
            &text,
            "aviary_request_duration_seconds_count",
            &[("destination_version", "podinfo-canary")]
        ),
        seen(&canary, Method::GET) + seen(&canary, Method::POST)
    );

    // Flagger's family, by destination pod: what its request-success-rate query reads.
    let flagger = |pod: &str| {
        sample(
            &text,
            "http_request_duration_seconds_count",
            &[
                ("kubernetes_namespace", "shop"),
                ("kubernetes_pod_name", pod),
                ("status", "200"),
            ],
        )
    };
    assert_eq!(flagger("podinfo-7d9f8b-bbbbb"), canary.seen().len() as f64);
    assert_eq!(
        flagger("podinfo-primary-5b6c8d-aaaaa"),
        primary.seen().len() as f64
    );
    assert!(
        text.contains("http_request_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(text.contains("# TYPE aviary_requests counter"), "{text}");
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
}

#[tokio::test]
async fn a_pod_measured_at_its_destination_is_left_out_of_flaggers_family() {
    let remote = backend("remote", Duration::ZERO).await;
    let pod = Workload {
        namespace: "shop".into(),
        workload: "podinfo".into(),
        pod: "podinfo-7d9f8b-ccccc".into(),
    };
    let on_another_node = Arc::new(Backend {
        namespace: "shop".into(),
        name: "podinfo".into(),
        port: 80,
        endpoints: vec![Endpoint::new(remote.addr, Some(Arc::new(pod)), true, None)],
    });
    let proxy = start_proxy(service(vec![], on_another_node)).await;
    let mut conn = h1(proxy.addr).await;
    for _ in 0..3 {
        send(&mut conn, get("/")).await;
    }
    let text = proxy.metrics.render();
    assert_eq!(
        sample(
            &text,
            "aviary_requests_total",
            &[
                ("direction", "outbound"),
                ("destination_workload", "podinfo")
            ]
        ),
        3.0
    );
    assert_eq!(
        sample(&text, "http_request_duration_seconds_count", &[]),
        0.0,
        "the pod's own agent reports them: {text}"
    );
}

/// The client of the inbound tests, at an address of its own (the pods listen on 127.0.0.1).
const INBOUND_CLIENT: [u8; 4] = [127, 0, 0, 2];

/// The inbound proxy in front of the pod at `pod`, as the inbound listener hands it each
/// connection (here from a plain loopback listener: TPROXY needs root). The routing table knows
/// the pod, and the client at [`INBOUND_CLIENT`].
async fn start_inbound(pod: SocketAddr) -> (SocketAddr, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(true, None));
    let workload = |namespace: &str, workload: &str, pod: &str| {
        Arc::new(Workload {
            namespace: namespace.into(),
            workload: workload.into(),
            pod: pod.into(),
        })
    };
    let table = RouteTable {
        pods: [
            (
                pod.ip(),
                workload("shop", "podinfo", "podinfo-7d9f8b-bbbbb"),
            ),
            (
                INBOUND_CLIENT.into(),
                workload("web", "frontend", "frontend-1"),
            ),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let routes = Arc::new(ArcSwap::from_pointee(table));
    let proxy = Arc::new(HttpProxy::new(
        HttpConfig::default(),
        routes,
        0,
        metrics.clone(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            tokio::spawn(proxy.clone().serve_inbound(stream, pod, peer));
        }
    });
    (addr, metrics)
}

/// One HTTP/1.1 keep-alive connection to `addr` from [`INBOUND_CLIENT`].
async fn h1_from_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((INBOUND_CLIENT, 0))).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn inbound_requests_reach_the_pod_as_sent_and_are_measured_at_the_destination() {
    let pod = backend("canary", Duration::ZERO).await;
    let (inbound, metrics) = start_inbound(pod.addr).await;
    let mut conn = h1_from_client(inbound).await;
    for _ in 0..4 {
        let (status, headers, body) = send(&mut conn, get("/api")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "canary"));
        assert!(headers.get("x-hop").is_none(), "hop-by-hop headers go");
    }
    send(&mut conn, request(Method::POST, "/api", b"{}")).await;
    let mut mirrored = get("/api");
    mirrored
        .headers_mut()
        .insert("x-aviary-mirror", "1".parse().unwrap());
    send(&mut conn, mirrored).await;
    let seen = pod.seen();
    assert_eq!(seen.len(), 6);
    assert_eq!(seen[4].body_len, 2);
    assert_eq!(seen[0].headers["host"], "podinfo.shop", "the Host is kept");
    assert_eq!(seen[0].headers["x-forwarded-for"], "127.0.0.2");

    let text = metrics.render();
    let inbound = [
        ("direction", "inbound"),
        ("source_namespace", "web"),
        ("source_workload", "frontend"),
        ("destination_namespace", "shop"),
        ("destination_workload", "podinfo"),
        ("status_code", "200"),
    ];
    let with = |method, mirror| [&inbound[..], &[("method", method), ("mirror", mirror)]].concat();
    assert_eq!(
        sample(&text, "aviary_requests_total", &with("GET", "false")),
        4.0
    );
    assert_eq!(
        sample(&text, "aviary_requests_total", &with("POST", "false")),
        1.0
    );
    assert_eq!(
        sample(&text, "aviary_requests_total", &with("GET", "true")),
        1.0,
        "a mirror copy another agent sent"
    );
    assert_eq!(
        sample(
            &text,
            "http_request_duration_seconds_count",
            &[
                ("kubernetes_pod_name", "podinfo-7d9f8b-bbbbb"),
                ("status", "200")
            ]
        ),
        6.0,
        "every request the pod served, the mirror copy included: {text}"
    );

    // The pod gone: the client gets the proxy's 503, and it is measured.
    let (inbound, metrics) = start_inbound(closed_port().await).await;
    let (status, headers, _) = send(&mut h1(inbound).await, get("/")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("x-aviary-error"));
    assert_eq!(
        sample(
            &metrics.render(),
            "aviary_requests_total",
            &[("direction", "inbound"), ("status_code", "503")]
        ),
        1.0
    );
}

/// A pod that accepts upgrades to the `echo` protocol and then echoes bytes.
async fn echo_upgrade_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let handler = hyper::service::service_fn(|mut req: Request<Incoming>| async move {
                assert_eq!(req.headers()["upgrade"], "echo");
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let mut io = TokioIo::new(upgrade.await.unwrap());
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = io.read(&mut buf).await {
                        io.write_all(&buf[..n]).await.unwrap();
                    }
                });
                let response = Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header("connection", "upgrade")
                    .header("upgrade", "echo")
                    .body(Full::<Bytes>::default())
                    .unwrap();
                Ok::<_, Infallible>(response)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), handler)
                    .with_upgrades(),
            );
        }
    });
    addr
}

/// Asks the proxy at `proxy` for an upgrade to `echo`, then echoes through it.
async fn upgrade_and_echo(proxy: SocketAddr) {
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET /ws HTTP/1.1\r\nhost: pod\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(client.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for message in [&b"ping"[..], b"pong"] {
        client.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message);
    }
}

#[tokio::test]
async fn upgrades_are_passed_on_and_then_joined_byte_for_byte() {
    let echo = echo_upgrade_backend().await;
    let (inbound, metrics) = start_inbound(echo).await;
    upgrade_and_echo(inbound).await;
    assert_eq!(
        sample(
            &metrics.render(),
            "aviary_requests_total",
            &[("direction", "inbound"), ("status_code", "101")]
        ),
        1.0
    );
    let outbound = start_proxy(service(vec![], service_backend("echo", &[echo]))).await;
    upgrade_and_echo(outbound.addr).await;
}

/// A backend that reports each request's head as soon as it arrives, before reading its body,
/// then answers with the body's length.
async fn head_reporting_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Method>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (heads, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let heads = heads.clone();
            tokio::spawn(async move {
                let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let _ = heads.send(req.method().clone());
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                            body.len().to_string(),
                        ))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), handler)
                    .await;
            });
        }
    });
    (addr, received)
}

/// Sends `method` with a 10-byte body in two halves, 300 ms apart, on a raw connection; returns
/// whether the backend saw the request's head before the second half was sent, and the answer.
async fn send_in_halves(
    proxy: SocketAddr,
    method: &str,
    heads: &mut tokio::sync::mpsc::UnboundedReceiver<Method>,
) -> (bool, String) {
    let mut raw = TcpStream::connect(proxy).await.unwrap();
    raw.write_all(
        format!("{method} / HTTP/1.1\r\nHost: podinfo.shop\r\nContent-Length: 10\r\n\r\n01234")
            .as_bytes(),
    )
    .await
    .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), heads.recv())
        .await
        .is_ok();
    raw.write_all(b"56789").await.unwrap();
    if !early {
        tokio::time::timeout(Duration::from_secs(5), heads.recv())
            .await
            .expect("the backend got the request");
    }
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    (early, String::from_utf8_lossy(&answer[..n]).into_owned())
}

#[tokio::test]
async fn bodies_stream_unless_a_mirror_will_send_them_again() {
    let (addr, mut heads) = head_reporting_backend().await;
    let (shadow, s) = backend_service("shadow", Duration::ZERO).await;
    let p = service_backend("podinfo-primary", &[addr]);
    let safe = SafeMethods {
        extra: vec![Method::PUT],
        idempotency_key: false,
    };
    // PUT is mirrored, so its body is held; POST is not, so it streams.
    let rule = Rule {
        backends: vec![weighted(&p, 1)],
        mirror: Some(mirrored(&s, 100, safe)),
        ..Default::default()
    };
    let proxy = start_proxy(service(vec![rule], p)).await;

    let (early, answer) = send_in_halves(proxy.addr, "POST", &mut heads).await;
    assert!(
        early,
        "a POST's body streamed: its head went ahead of the body's end"
    );
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("10"),
        "{answer}"
    );

    let (early, answer) = send_in_halves(proxy.addr, "PUT", &mut heads).await;
    assert!(
        !early,
        "a mirrored PUT's body was held whole before it went out"
    );
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("10"),
        "{answer}"
    );
    wait_for(|| shadow.seen().len() == 1).await;
    assert!(shadow.seen()[0].body_complete && shadow.seen()[0].body_len == 10);
}

/// An HTTP/2 backend answering as a gRPC server does: a body, then the status in trailers. It
/// answers 400 unless the request carried `te: trailers`, as gRPC servers require.
async fn trailers_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let handler = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let te = req.headers().get("te").cloned();
                    if te.as_ref().is_none_or(|v| v != "trailers") {
                        let response = Response::builder()
                            .status(400)
                            .body(http_body_util::Either::Left(Full::new(Bytes::from(
                                "te: trailers is missing",
                            ))))
                            .unwrap();
                        return Ok::<_, Infallible>(response);
                    }
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", "5".parse().unwrap());
                    trailers.insert("grpc-message", "not found".parse().unwrap());
                    let frames = futures::stream::iter([
                        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(
                            b"\0\0\0\0\0",
                        ))),
                        Ok(hyper::body::Frame::trailers(trailers)),
                    ]);
                    let body = http_body_util::StreamBody::new(frames);
                    Ok(Response::new(http_body_util::Either::Right(body)))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), handler)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn te_trailers_reaches_the_backend_and_trailers_reach_the_client() {
    let addr = trailers_backend().await;
    let b = service_backend("grpc", &[addr]);
    let rule = Rule {
        backends: vec![weighted(&b, 90), weighted(&b, 10)],
        ..Default::default()
    };
    let proxy = start_proxy(service(vec![rule], b)).await;
    let mut conn = h2(proxy.addr).await;
    let request = Request::post("http://grpc.shop/pkg.Service/Get")
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let response = conn.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reached the client");
    assert_eq!(trailers["grpc-status"], "5");
    assert_eq!(trailers["grpc-message"], "not found");
}

#[tokio::test]
async fn a_service_that_loses_its_routes_passes_open_connections_through() {
    // The address the client dialled is a real server here (on loopback, never a VIP), so that
    // passing through reaches something.
    let dialled = backend("dialled", Duration::ZERO).await;
    let (_canary, c) = backend_service("canary", Duration::ZERO).await;
    let rule = Rule {
        backends: vec![weighted(&c, 1)],
        ..Default::default()
    };
    let proxy = start_proxy_at(dialled.addr, HttpConfig::default(), service(vec![rule], c)).await;
    let mut conn = h1(proxy.addr).await;
    assert_eq!(backend_of(&send(&mut conn, get("/")).await.1), "canary");
    // The service's routes go; the same connection's next request goes where it was sent.
    proxy.routes.store(Arc::new(RouteTable::default()));
    let (status, headers, _) = send(&mut conn, get("/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backend_of(&headers), "dialled");
}

#[tokio::test]
async fn options_asterisk_is_forwarded() {
    let (primary, p) = backend_service("primary", Duration::ZERO).await;
    let proxy = start_proxy(service(vec![], p)).await;
    let mut raw = TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(b"OPTIONS * HTTP/1.1\r\nHost: podinfo.shop\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(primary.seen()[0].method, Method::OPTIONS);
}

#[tokio::test]
async fn a_drain_closes_busy_http1_at_its_response_hands_idle_http1_over_and_sends_goaway() {
    let (_slow, slow) = backend_service("slow", Duration::from_millis(300)).await;
    let (signal, drain) = DrainSignal::new();
    let routes = service(vec![], slow);
    let proxy = start_proxy_draining_on(
        SERVICE.parse().unwrap(),
        HttpConfig::default(),
        routes.clone(),
        drain,
    )
    .await;
    // Idle between requests when the drain begins.
    let mut idle = h1(proxy.addr).await;
    assert_eq!(send(&mut idle, get("/")).await.0, StatusCode::OK);
    // Busy: a request in flight on HTTP/1.1 and on HTTP/2.
    let mut busy = h1(proxy.addr).await;
    let busy = tokio::spawn(async move { send(&mut busy, get("/")).await });
    let mut multiplexed = h2(proxy.addr).await;
    let in_flight = multiplexed.send_request(get("/"));
    let in_flight = tokio::spawn(in_flight);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut moved = signal.hand_over();
    // The busy HTTP/1.1 connection gets its answer, and is told to close.
    let (status, headers, body) = busy.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow"));
    assert_eq!(headers["connection"], "close");
    // HTTP/2: the stream in flight finishes; the GOAWAY refuses new ones.
    assert_eq!(in_flight.await.unwrap().unwrap().status(), StatusCode::OK);
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        multiplexed.ready().await?;
        multiplexed.send_request(get("/")).await
    });
    assert!(
        refused.await.unwrap().is_err(),
        "a stream opened after GOAWAY"
    );

    // The idle connection moves whole, with nothing of a next request read.
    let next = tokio::time::timeout(Duration::from_secs(5), moved.recv());
    let Some(Moved::Http1 {
        client,
        buffered,
        state,
    }) = next.await.unwrap()
    else {
        panic!("no HTTP/1.1 connection moved")
    };
    assert!(buffered.is_empty(), "{buffered:?}");
    assert_eq!(state.dst, SERVICE.parse::<SocketAddr>().unwrap());
    // A successor carries it on: the client's next request on the same connection is answered.
    let successor = Arc::new(HttpProxy::new(
        HttpConfig::default(),
        Arc::new(ArcSwap::from_pointee(table(routes))),
        0,
        Arc::new(Metrics::new(true, None)),
    ));
    let client = TcpStream::from_std(client).unwrap();
    tokio::spawn(successor.resume(client, buffered, state));
    let (status, _, body) = send(&mut idle, get("/")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow"));
}

#[tokio::test]
async fn a_drain_waits_for_the_mirrors_in_flight() {
    let (_primary, p) = backend_service("primary", Duration::ZERO).await;
    let (_shadow, s) = backend_service("shadow", Duration::from_millis(400)).await;
    let rule = Rule {
        backends: vec![weighted(&p, 1)],
        mirror: Some(mirrored(&s, 100, SafeMethods::default())),
        ..Default::default()
    };
    let (signal, drain) = DrainSignal::new();
    let proxy = start_proxy_draining_on(
        SERVICE.parse().unwrap(),
        HttpConfig::default(),
        service(vec![rule], p),
        drain,
    )
    .await;
    let mut conn = h1(proxy.addr).await;
    assert_eq!(send(&mut conn, get("/")).await.0, StatusCode::OK);
    // The primary answered at once; the mirror's backend takes 400 ms.
    signal.close();
    let started = Instant::now();
    assert_eq!(
        signal.finished(Duration::from_millis(100)).await,
        1,
        "the mirror is in flight"
    );
    assert_eq!(signal.finished(Duration::from_secs(5)).await, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    let sent = proxy.sample("aviary_mirror_requests_total", &[("outcome", "sent")]);
    assert_eq!(sent, 1.0, "the mirror finished before the drain did");
}
