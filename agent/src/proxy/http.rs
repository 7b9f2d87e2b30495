//! HTTP/1.1 and HTTP/2 proxying with per-request policy: route matching, weighted splits, header
//! filters, timeouts, one retry on connect errors, and mirroring of idempotent requests.
//!
//! Forwarding headers: like Envoy, the proxy appends the client's address to `x-forwarded-for`
//! and sets `x-forwarded-proto` when absent; trace context (`traceparent`, `tracestate`) passes
//! untouched. Hop-by-hop headers are removed in both directions.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::{
    body::{Body as _, Incoming},
    upgrade::OnUpgrade,
};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tracing::debug;

use crate::metrics::{self, MethodClass, Metrics, RequestLabels};

use super::{
    balance::{self, InFlight},
    route::{
        Backend, BackendRef, Endpoint, Mirror, RequestView, RouteTable, Rule, ServiceRoutes,
        WeightedBackend, Workload,
    },
    split::{pick_weighted, sampled, with_rng},
};

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Marks mirrored requests, so a backend (and its metrics) can tell them apart.
pub const MIRROR_HEADER: &str = "x-aviary-mirror";

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Request bodies up to this size are buffered, so they can be mirrored or retried.
    pub body_buffer_limit: usize,
    /// Mirrored requests in flight per mirror backend; more are dropped (and counted).
    pub mirror_in_flight: usize,
    pub mirror_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            body_buffer_limit: 1024 * 1024,
            mirror_in_flight: 100,
            mirror_timeout: Duration::from_secs(10),
            max_headers: 100,
            max_header_bytes: 64 * 1024,
        }
    }
}

/// What happened to each request that a mirror rule applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MirrorOutcome {
    Sent,
    SkippedNotIdempotent,
    SkippedBodyTooLarge,
    DroppedOverload,
    Failed,
    TimedOut,
}

/// What answered a request, for its metrics.
#[derive(Default)]
struct Answered {
    backend: Option<Arc<Backend>>,
    endpoint: Option<Arc<Endpoint>>,
}

/// Connects upstream sockets with the proxy's mark, so the capture programs leave them alone.
#[derive(Debug, Clone, Copy)]
pub struct MarkedConnector {
    pub mark: u32,
}

impl tower_service::Service<Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mark = self.mark;
        Box::pin(async move {
            // Upstream URIs always carry the endpoint's socket address.
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("not an endpoint: {uri}"),
                    )
                })?;
            Ok(TokioIo::new(super::connect_marked(addr, mark).await?))
        })
    }
}

pub struct HttpProxy {
    cfg: HttpConfig,
    /// Looked up per request, so a policy change applies to the next request on every open
    /// connection.
    routes: Arc<ArcSwap<RouteTable>>,
    h1: Client<MarkedConnector, ProxyBody>,
    h2: Client<MarkedConnector, ProxyBody>,
    server: auto::Builder<TokioExecutor>,
    metrics: Arc<Metrics>,
}

/// A request body the proxy holds whole (so it can send it again), or one it streams.
enum RequestBody {
    Buffered(Bytes),
    Streaming(Incoming),
}

impl HttpProxy {
    pub fn new(
        cfg: HttpConfig,
        routes: Arc<ArcSwap<RouteTable>>,
        mark: u32,
        metrics: Arc<Metrics>,
    ) -> Self {
        let connector = MarkedConnector { mark };
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(Duration::from_secs(60));
        let h1 = builder.build(connector);
        let h2 = builder.clone().http2_only(true).build(connector);
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .max_headers(cfg.max_headers)
            .max_buf_size(cfg.max_header_bytes.max(8192));
        server
            .http2()
            .max_header_list_size(cfg.max_header_bytes as u32);
        Self {
            cfg,
            routes,
            h1,
            h2,
            server,
            metrics,
        }
    }

    /// Serves one client connection to the service at `dst` (HTTP/1.1 or HTTP/2, told apart
    /// by the HTTP/2 preface). A malformed request gets 400 and its connection closes; other
    /// connections carry on.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, dst: SocketAddr, peer: SocketAddr) {
        let this = self.clone();
        let handler = hyper::service::service_fn(move |req| {
            let this = this.clone();
            async move {
                let table = this.routes.load();
                let response = match table.service_for(&dst, peer.ip()) {
                    Some(service) => {
                        let source = table.pod(peer.ip());
                        this.handle(req, service, &source, peer).await
                    }
                    None => error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("{dst} is no longer routed"),
                    ),
                };
                Ok::<_, Infallible>(response)
            }
        });
        if let Err(e) = self
            .server
            .serve_connection_with_upgrades(TokioIo::new(stream), handler)
            .await
        {
            debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
    }

    /// Answers one request and records it in the metrics.
    async fn handle(
        &self,
        req: Request<Incoming>,
        service: &ServiceRoutes,
        source: &Workload,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = MethodClass::from(req.method());
        let mut answered = Answered::default();
        let response = self
            .route_request(req, service, source, peer, &mut answered)
            .await;
        let endpoint = answered.endpoint.as_deref();
        let pod = endpoint.and_then(|e| e.pod.as_deref());
        let labels = RequestLabels {
            route: metrics::Route::outbound(
                source,
                service,
                answered.backend.as_ref().map(|b| &b.name),
                pod,
            ),
            method,
            status_code: response.status().as_u16(),
            mirror: false,
        };
        // A pod whose own agent measures its requests is left to that agent in Flagger's family.
        let flagger_pod = pod.filter(|_| endpoint.is_some_and(|e| !e.measured_at_destination));
        let took = started.elapsed();
        self.metrics
            .request_series(&labels, flagger_pod)
            .record(took);
        response
    }

    /// Serves one connection the inbound listener took for the enrolled pod at `pod`: each
    /// request goes to the pod as it came, and is measured from the destination's side, as
    /// `route` from `destination`.
    pub async fn serve_inbound(
        self: Arc<Self>,
        stream: TcpStream,
        pod: SocketAddr,
        peer: SocketAddr,
        route: metrics::Route,
        destination: Arc<Workload>,
    ) {
        let this = self.clone();
        let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let route = route.clone();
            let destination = destination.clone();
            async move {
                let started = Instant::now();
                let method = MethodClass::from(req.method());
                // Another agent's mirror copy: measured as one, and so not in Flagger's family.
                let mirror = req.headers().contains_key(MIRROR_HEADER);
                let response = this.forward_inbound(req, pod, peer).await;
                let labels = RequestLabels {
                    route,
                    method,
                    status_code: response.status().as_u16(),
                    mirror,
                };
                let took = started.elapsed();
                this.metrics
                    .request_series(&labels, Some(&destination))
                    .record(took);
                Ok::<_, Infallible>(response)
            }
        });
        let connection = self
            .server
            .serve_connection_with_upgrades(TokioIo::new(stream), handler);
        if let Err(e) = connection.await {
            debug!(%peer, error = %e, "inbound HTTP connection ended with an error");
        }
    }

    /// Sends one inbound request to the pod.
    async fn forward_inbound(
        &self,
        mut req: Request<Incoming>,
        pod: SocketAddr,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let upgrade = Upgrade::take(&mut req);
        let (mut parts, body) = req.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        add_forwarding_headers(&mut parts.headers, peer);
        if let Some(upgrade) = &upgrade {
            upgrade.ask(&mut parts.headers);
        }
        let request = upstream_request(&parts, pod, body.boxed());
        let mut response = match self.client(parts.version).request(request).await {
            Ok(response) => response.map(|body| body.boxed()),
            Err(e) if e.is_connect() => return connect_failed(pod, &e, ""),
            Err(e) => return error(StatusCode::BAD_GATEWAY, &format!("{pod} failed: {e}")),
        };
        if !upgrade.is_some_and(|u| u.join(&mut response)) {
            remove_hop_by_hop(response.headers_mut());
        }
        response
    }

    async fn route_request(
        &self,
        mut req: Request<Incoming>,
        service: &ServiceRoutes,
        source: &Workload,
        peer: SocketAddr,
        answered: &mut Answered,
    ) -> Response<ProxyBody> {
        let upgrade = Upgrade::take(&mut req);
        let (mut parts, body) = req.into_parts();
        let view = RequestView {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        let rule = if service.rules.is_empty() {
            None
        } else {
            match service.route(&view) {
                Some(rule) => Some(rule),
                None => return error(StatusCode::NOT_FOUND, "no route matches the request"),
            }
        };
        let (backend, weighted) = match rule.map(choose_backend) {
            None => (service.default.clone(), None),
            Some(Ok((backend, weighted))) => (backend, Some(weighted)),
            Some(Err(why)) => return error(StatusCode::INTERNAL_SERVER_ERROR, &why),
        };
        answered.backend = Some(backend.clone());

        remove_hop_by_hop(&mut parts.headers);
        add_forwarding_headers(&mut parts.headers, peer);
        if let Some(rule) = rule {
            rule.request_headers.apply(&mut parts.headers);
        }
        if let Some(weighted) = weighted {
            weighted.request_headers.apply(&mut parts.headers);
        }

        let Ok(body) = self.read_body(body).await else {
            // A truncated body must never reach the backend as if it were whole.
            return error(StatusCode::BAD_REQUEST, "the request body ended early");
        };
        if let Some(mirror) = rule.and_then(|r| r.mirror.as_ref()) {
            self.mirror(mirror, &parts, &body, service, source);
        }

        // Asked for after the mirror took its copy: a mirror never upgrades.
        if let Some(upgrade) = &upgrade {
            upgrade.ask(&mut parts.headers);
        }
        let attempt = self.forward(&parts, body, &backend, rule, &mut answered.endpoint);
        let mut response = match rule.and_then(|r| r.timeout) {
            Some(limit) => match tokio::time::timeout(limit, attempt).await {
                Ok(response) => response,
                Err(_) => error(StatusCode::GATEWAY_TIMEOUT, "the request timed out"),
            },
            None => attempt.await,
        };
        if !upgrade.is_some_and(|u| u.join(&mut response)) {
            remove_hop_by_hop(response.headers_mut());
        }
        let (mut parts, body) = response.into_parts();
        if let Some(rule) = rule {
            rule.response_headers.apply(&mut parts.headers);
        }
        if let Some(weighted) = weighted {
            weighted.response_headers.apply(&mut parts.headers);
        }
        Response::from_parts(parts, body)
    }

    /// The client for a request of `version`: HTTP/2 upstream for HTTP/2 clients.
    fn client(&self, version: Version) -> &Client<MarkedConnector, ProxyBody> {
        if version == Version::HTTP_2 {
            &self.h2
        } else {
            &self.h1
        }
    }

    /// Buffers a body whose length is known and within the limit; streams any other.
    async fn read_body(&self, body: Incoming) -> Result<RequestBody, hyper::Error> {
        let small = body.is_end_stream()
            || body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= self.cfg.body_buffer_limit as u64);
        if !small {
            return Ok(RequestBody::Streaming(body));
        }
        Ok(RequestBody::Buffered(body.collect().await?.to_bytes()))
    }

    /// Sends the request to an endpoint of `backend`; retries once on another endpoint when the
    /// connect fails and the request is idempotent and held whole. `used` is the endpoint that
    /// answered, or was tried last.
    async fn forward(
        &self,
        parts: &http::request::Parts,
        body: RequestBody,
        backend: &Backend,
        rule: Option<&Rule>,
        used: &mut Option<Arc<Endpoint>>,
    ) -> Response<ProxyBody> {
        let retryable = matches!(body, RequestBody::Buffered(_)) && is_idempotent(&parts.method);
        let mut body = Some(body);
        // The endpoint whose connect failed, and why.
        let mut failed: Option<(
            Arc<super::route::Endpoint>,
            hyper_util::client::legacy::Error,
        )> = None;
        loop {
            let skip = failed.as_ref().map(|(endpoint, _)| endpoint);
            let Some(endpoint) = with_rng(|rng| balance::pick(&backend.endpoints, skip, rng))
            else {
                return match failed {
                    Some((endpoint, e)) => {
                        connect_failed(endpoint.addr, &e, "; no other endpoint to retry on")
                    }
                    None => error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("{} has no endpoints", backend.name),
                    ),
                };
            };
            let attempt_body = match body.take().expect("a body for each attempt") {
                RequestBody::Buffered(bytes) => {
                    body = Some(RequestBody::Buffered(bytes.clone()));
                    full(bytes)
                }
                RequestBody::Streaming(incoming) => incoming.boxed(),
            };
            let request = upstream_request(parts, endpoint.addr, attempt_body);
            *used = Some(endpoint.clone());
            let in_flight = InFlight::start(endpoint.clone());
            let sent = self.client(parts.version).request(request);
            let result = match rule.and_then(|r| r.backend_timeout) {
                Some(limit) => match tokio::time::timeout(limit, sent).await {
                    Ok(result) => result,
                    Err(_) => {
                        return error(StatusCode::GATEWAY_TIMEOUT, "the backend request timed out")
                    }
                },
                None => sent.await,
            };
            match result {
                Ok(response) => {
                    in_flight.done();
                    return response.map(|body| body.boxed());
                }
                Err(e) if e.is_connect() && retryable && failed.is_none() => {
                    debug!(endpoint = %endpoint.addr, error = %e, "connect failed; retrying on another endpoint");
                    failed = Some((endpoint, e));
                }
                Err(e) if e.is_connect() => return connect_failed(endpoint.addr, &e, ""),
                Err(e) => {
                    return error(
                        StatusCode::BAD_GATEWAY,
                        &format!("{} failed: {e}", endpoint.addr),
                    )
                }
            }
        }
    }

    /// Sends a copy of the request to the mirror backend, in the background: the primary never
    /// waits for it, and nothing about the mirror reaches the client.
    fn mirror(
        &self,
        mirror: &Mirror,
        parts: &http::request::Parts,
        body: &RequestBody,
        service: &ServiceRoutes,
        source: &Workload,
    ) {
        if !with_rng(|rng| sampled(mirror.numerator, mirror.denominator, rng)) {
            return;
        }
        let target = &mirror.backend;
        let record = |outcome| {
            self.metrics
                .mirror(outcome, &target.namespace, &target.name)
        };
        if !mirror.safe_methods.allows(&parts.method, &parts.headers) {
            return record(MirrorOutcome::SkippedNotIdempotent);
        }
        let RequestBody::Buffered(bytes) = body else {
            return record(MirrorOutcome::SkippedBodyTooLarge);
        };
        let Ok(permit) = mirror.in_flight.clone().try_acquire_owned() else {
            return record(MirrorOutcome::DroppedOverload);
        };
        let Some(endpoint) = with_rng(|rng| balance::pick(&target.endpoints, None, rng)) else {
            return record(MirrorOutcome::Failed);
        };
        let mut request = upstream_request(parts, endpoint.addr, full(bytes.clone()));
        let host = mirror_host(&mirror.backend);
        request.headers_mut().insert(header::HOST, host);
        request
            .headers_mut()
            .insert(MIRROR_HEADER, HeaderValue::from_static("1"));
        let client = self.client(parts.version).clone();
        let timeout = self.cfg.mirror_timeout;
        let metrics = self.metrics.clone();
        let pod = endpoint.pod.clone();
        let mut labels = RequestLabels {
            route: metrics::Route::outbound(source, service, Some(&target.name), pod.as_deref()),
            method: MethodClass::from(&parts.method),
            status_code: 0,
            mirror: true,
        };
        let target = target.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let start = Instant::now();
            let exchange = async {
                let response = client.request(request).await?;
                let status = response.status();
                // Read the whole response, then drop it: measured, never seen.
                response.into_body().collect().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
            };
            let outcome = match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok(status)) => {
                    labels.status_code = status.as_u16();
                    let took = start.elapsed();
                    metrics.request_series(&labels, pod.as_deref()).record(took);
                    MirrorOutcome::Sent
                }
                Ok(Err(_)) => MirrorOutcome::Failed,
                Err(_) => MirrorOutcome::TimedOut,
            };
            metrics.mirror(outcome, &target.namespace, &target.name);
        });
    }
}

fn connect_failed(
    addr: SocketAddr,
    e: &hyper_util::client::legacy::Error,
    note: &str,
) -> Response<ProxyBody> {
    // The connector's own error says why (refused, unreachable), under hyper's wrapper.
    let cause = std::error::Error::source(e).map_or_else(|| e.to_string(), |c| c.to_string());
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("connecting to {addr} failed: {cause}{note}"),
    )
}

/// Picks a rule's backend by weight. A share with no backend is an error (the client gets 500,
/// as the Gateway API requires), described here.
fn choose_backend(rule: &Rule) -> Result<(Arc<Backend>, &WeightedBackend), String> {
    let Some(index) = with_rng(|rng| pick_weighted(rule.weights(), rng)) else {
        return Err("every backend of the matching route has weight 0".into());
    };
    let weighted = &rule.backends[index];
    match &weighted.backend {
        BackendRef::Service(backend) => Ok((backend.clone(), weighted)),
        BackendRef::Invalid { name, reason } => {
            Err(format!("backend {name} is unavailable: {reason}"))
        }
    }
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// The request as it goes to `endpoint`: same method, path, headers and version.
fn upstream_request(
    parts: &http::request::Parts,
    endpoint: SocketAddr,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = format!("http://{endpoint}{path}");
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri
        .parse()
        .expect("an endpoint and a valid path make a valid URI");
    *request.version_mut() = if parts.version == Version::HTTP_2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *request.headers_mut() = parts.headers.clone();
    if parts.version == Version::HTTP_2 && !request.headers().contains_key(header::HOST) {
        // HTTP/2 carries the host in :authority, which now names the endpoint.
        if let Some(authority) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            request.headers_mut().insert(header::HOST, authority);
        }
    }
    request
}

/// The Host a mirror backend is addressed by: its Service's cluster DNS name.
fn mirror_host(backend: &Backend) -> HeaderValue {
    let host = match backend.port {
        80 => format!("{}.{}.svc.cluster.local", backend.name, backend.namespace),
        port => format!(
            "{}.{}.svc.cluster.local:{port}",
            backend.name, backend.namespace
        ),
    };
    HeaderValue::from_str(&host).unwrap_or_else(|_| HeaderValue::from_static("mirror"))
}

/// GET, HEAD, OPTIONS, TRACE, PUT and DELETE are idempotent (RFC 9110); only these are retried.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
];

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// An HTTP/1.1 upgrade (WebSocket, say) a client asked for. It is passed on to the backend, and
/// once the backend agrees (101), the two connections are joined byte for byte.
struct Upgrade {
    protocol: HeaderValue,
    client: OnUpgrade,
}

impl Upgrade {
    /// The upgrade `req` asks for (`Connection: upgrade` with `Upgrade`), if any.
    fn take(req: &mut Request<Incoming>) -> Option<Self> {
        let headers = req.headers();
        let asked = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
        let protocol = headers.get(header::UPGRADE).filter(|_| asked)?.clone();
        Some(Self {
            protocol,
            client: hyper::upgrade::on(req),
        })
    }

    /// Asks the backend for the upgrade (hop-by-hop removal took the client's own headers).
    fn ask(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
    }

    /// Joins the connections when the backend agreed; returns whether it did. The 101 keeps its
    /// Connection and Upgrade headers, which the client needs.
    fn join(self, response: &mut Response<ProxyBody>) -> bool {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return false;
        }
        let backend = hyper::upgrade::on(response);
        tokio::spawn(async move {
            if let (Ok(client), Ok(backend)) = (self.client.await, backend.await) {
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(client),
                    &mut TokioIo::new(backend),
                )
                .await;
            }
        });
        true
    }
}

fn add_forwarding_headers(headers: &mut HeaderMap, peer: SocketAddr) {
    let client = peer.ip().to_canonical().to_string();
    let forwarded = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {client}"),
        None => client,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert("x-forwarded-for", value);
    }
    headers
        .entry("x-forwarded-proto")
        .or_insert(HeaderValue::from_static("http"));
}

/// An answer the proxy makes itself, marked so that it can be told from a backend's.
fn error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from(format!("aviary: {message}\n"))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert("x-aviary-error", HeaderValue::from_static("1"));
    response
}
