//! HTTP/1.1 and HTTP/2 proxying with per-request policy: route matching, weighted splits, header
//! filters, timeouts, one retry of a request no endpoint received, and mirroring of idempotent
//! requests.
//!
//! A request is forwarded, not rebuilt: its method, URI (origin-form, or HTTP/2's scheme and
//! `:authority`), Host and headers move to the upstream request as they came, less the
//! hop-by-hop headers. Bodies stream both ways; a request body is held in memory only when a
//! mirror will send it again.
//!
//! Forwarding headers: like Envoy, the proxy appends the client's address to `x-forwarded-for`
//! and sets `x-forwarded-proto` when absent; trace context (`traceparent`, `tracestate`) passes
//! untouched. Hop-by-hop headers are removed in both directions, except `te: trailers`, which
//! gRPC servers require.

mod body;
mod flags;
mod headers;
mod mirror;
mod upgrade;

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt as _;
use hyper::{
    body::Incoming,
    server::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite},
    net::TcpStream,
};
use tracing::debug;

use self::{
    body::{BodyBudget, Held},
    headers::{add_forwarding_headers, strip_hop_by_hop, upstream_request},
    upgrade::Upgrade,
};
use super::pool::full;
pub use super::pool::ProxyBody;
use super::{
    balance::{self, Failure, InFlight, OutlierConfig},
    drain::{Detach, Detachable, Drain, DrainSignal, Http1State, Moved},
    idle::IdleTimeout,
    local_reply::{self, error},
    mesh::{Mesh, TunnelFrom},
    metrics::{
        self, DenialReason, Direction, MethodClass, Metrics, MirrorOutcome, Principals, ProxyError,
        RequestLabels,
    },
    pool::{Pool, PoolConfig, SendError, Tunnelled, Upstream},
    rewind::Rewind,
    series::{self, SeriesKey},
    split::{pick_weighted, with_rng},
};
use crate::table::{
    admission::Denied, flags::NamespaceFlags, Backend, BackendRef, Endpoint, RequestView,
    RouteTable, Rule, ServiceRoutes, TableId, WeightedBackend, Workload,
};

/// What answers the requests of one client connection.
trait ClientService:
    hyper::service::Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Unpin
    + Send
    + 'static
{
}

impl<T> ClientService for T where
    T: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = Infallible,
            Future: Send + 'static,
        > + Unpin
        + Send
        + 'static
{
}

/// An HTTP/1.1 client connection as the server reads it: replaying what was read to tell its
/// version, closed once idle for the idle timeout, and able to be let go of at a drain.
type Http1Io<S> = TokioIo<Detachable<IdleTimeout<Rewind<S>>>>;

/// The HTTP/2 connection preface, which tells HTTP/2 (prior knowledge) from HTTP/1.1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Marks mirrored requests, so a backend (and its metrics) can tell them apart.
pub const MIRROR_HEADER: &str = "x-aviary-mirror";

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// A request body up to this size is held, when a mirror will send it again.
    pub body_buffer_limit: usize,
    /// The bytes of request bodies held at once, across all requests and workers.
    pub body_buffer_budget: usize,
    /// Mirrored requests in flight per mirror backend and worker; more are dropped (and
    /// counted).
    pub mirror_in_flight: usize,
    pub mirror_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// How long a connect to an endpoint may take before the request moves on.
    pub connect_timeout: Duration,
    /// How long a tunnel to another node's agent may take once connected (handshakes and
    /// CONNECT).
    pub tunnel_handshake_timeout: Duration,
    /// How long an upstream connection may wait in the pool.
    pub pool_idle_timeout: Duration,
    /// How long an HTTP/1.1 client may take to send a request's headers (see the flag).
    pub header_read_timeout: Option<Duration>,
    /// A client connection that moves no byte for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// HTTP/2 pings, client and upstream, and how long one may go unanswered.
    pub http2_keepalive_interval: Option<Duration>,
    pub http2_keepalive_timeout: Duration,
    /// When an endpoint that fails is left out of load balancing.
    pub outlier: OutlierConfig,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            body_buffer_limit: 1024 * 1024,
            body_buffer_budget: 64 * 1024 * 1024,
            mirror_in_flight: 100,
            mirror_timeout: Duration::from_secs(10),
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(1),
            tunnel_handshake_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(60),
            header_read_timeout: Some(Duration::from_secs(60)),
            idle_timeout: Some(Duration::from_secs(3600)),
            http2_keepalive_interval: Some(Duration::from_secs(20)),
            http2_keepalive_timeout: Duration::from_secs(20),
            outlier: OutlierConfig::default(),
        }
    }
}

/// What answered a request, for its metrics.
#[derive(Default)]
struct Answered {
    backend: Option<Arc<Backend>>,
    endpoint: Option<Arc<Endpoint>>,
}

pub struct HttpProxy {
    cfg: HttpConfig,
    /// Looked up per request, so a policy change applies to the next request on every open
    /// connection.
    routes: Arc<ArcSwap<RouteTable>>,
    pool: Pool,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    metrics: Arc<Metrics>,
    body_budget: Arc<BodyBudget>,
    /// When to stop serving client connections, or hand them over.
    drain: Drain,
    /// The node's mesh identities: with them, requests to pods enrolled on other nodes go
    /// through mutual-TLS tunnels.
    mesh: Option<Arc<Mesh>>,
}

/// What a client connection resolved in one routing table: reused by each of its requests
/// while that table stays in force.
#[derive(Clone)]
struct Resolved {
    table: TableId,
    /// The routes of the service the client called (outbound).
    service: Option<Arc<ServiceRoutes>>,
    /// The flags of the namespace that defines the service's request flags, if it names any.
    flag_set: Option<Arc<NamespaceFlags>>,
    source: Arc<Workload>,
    /// The pod the connection is for (inbound).
    destination: Arc<Workload>,
    /// The client as the source of tunnels to other nodes: an enrolled pod of this node, with
    /// its identity (outbound, with a mesh).
    tunnel_from: Option<TunnelFrom>,
}

/// One client connection, to a service (outbound) or to a pod (inbound).
struct ClientConn {
    peer: SocketAddr,
    /// The address the client dialled: a service's, or the pod's.
    dst: SocketAddr,
    /// The client's address, as `x-forwarded-for` carries it.
    forwarded_for: HeaderValue,
    resolved: Resolved,
    /// Who the two ends proved to be, when the connection came over mutual TLS (inbound).
    principals: Option<Arc<Principals>>,
}

impl ClientConn {
    fn new(
        peer: SocketAddr,
        dst: SocketAddr,
        routes: &ArcSwap<RouteTable>,
        principals: Option<Arc<Principals>>,
    ) -> Self {
        let client = peer.ip().to_canonical().to_string();
        Self {
            peer,
            dst,
            forwarded_for: HeaderValue::try_from(client).expect("an IP address is a header value"),
            resolved: Self::resolve(peer, dst, &routes.load()),
            principals,
        }
    }

    fn resolve(peer: SocketAddr, dst: SocketAddr, table: &RouteTable) -> Resolved {
        let tunnel_from = TunnelFrom::of(table, peer);
        let service = table.service_for(&dst, peer.ip()).cloned();
        let flag_set = service
            .as_ref()
            .and_then(|s| s.flags.as_ref())
            .map(|flags| {
                table
                    .flags
                    .get(&*flags.namespace)
                    .cloned()
                    .unwrap_or_default()
            });
        Resolved {
            table: table.id,
            service,
            flag_set,
            source: table.pod(peer.ip()),
            destination: table.pod(dst.ip()),
            tunnel_from,
        }
    }

    /// What this connection's next request works with: resolved again only when the routing
    /// table changed since the connection began.
    fn facts(&self, routes: &ArcSwap<RouteTable>) -> Resolved {
        let table = routes.load();
        if table.id == self.resolved.table {
            self.resolved.clone()
        } else {
            Self::resolve(self.peer, self.dst, &table)
        }
    }
}

impl HttpProxy {
    pub fn new(
        cfg: HttpConfig,
        routes: Arc<ArcSwap<RouteTable>>,
        mark: u32,
        metrics: Arc<Metrics>,
    ) -> Self {
        let pool = Pool::new(PoolConfig {
            mark,
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.pool_idle_timeout,
            http2_keepalive_interval: cfg.http2_keepalive_interval,
            http2_keepalive_timeout: cfg.http2_keepalive_timeout,
            ..PoolConfig::default()
        });
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .max_headers(cfg.max_headers)
            .max_buf_size(cfg.max_header_bytes.max(8192));
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(cfg.http2_keepalive_interval)
            .keep_alive_timeout(cfg.http2_keepalive_timeout)
            .max_header_list_size(cfg.max_header_bytes as u32);
        let body_budget = Arc::new(BodyBudget::new(cfg.body_buffer_budget));
        Self {
            cfg,
            routes,
            pool,
            http1,
            http2,
            metrics,
            body_budget,
            // Never drains until told where to look.
            drain: DrainSignal::new().1,
            mesh: None,
        }
    }

    /// Tunnels to other nodes' pods with `mesh`'s identities.
    pub fn with_mesh(mut self, mesh: Option<Arc<Mesh>>) -> Self {
        self.mesh = mesh;
        self
    }

    pub fn mesh(&self) -> Option<&Arc<Mesh>> {
        self.mesh.as_ref()
    }

    /// Whether the pod at `endpoint`, when it is an enrolled pod of this node, admits `from`
    /// (None: a client without an identity). This agent is that pod's, and a connection
    /// between pods of one node never passes its inbound proxy, so it decides here; a refusal
    /// is counted as the inbound proxy counts its own.
    pub fn admitted_locally(
        &self,
        endpoint: &Endpoint,
        from: Option<&TunnelFrom>,
    ) -> Result<(), Denied> {
        let table = self.routes.load();
        let Some(pod) = table.local(endpoint.addr.ip()) else {
            return Ok(());
        };
        let peer = from.map(|from| &*from.identity);
        pod.inbound.admits(peer).inspect_err(|denied| {
            self.metrics
                .denied(DenialReason::of(denied), peer, &pod.workload)
        })
    }

    /// Whether `endpoint` is reached through a tunnel: a pod enrolled on another node, when this
    /// node has mesh identities.
    pub fn tunnels_to(&self, endpoint: &Endpoint) -> bool {
        self.mesh.is_some() && endpoint.pod.is_some() && endpoint.measured_at_destination
    }

    /// How a request from `from` reaches `endpoint`: through a tunnel to its node's agent when
    /// it is a pod enrolled on another node and this node has mesh identities, else directly.
    /// Never in plain text when it should be tunnelled: without an identity for the source,
    /// the reason.
    pub fn upstream(
        &self,
        endpoint: &Endpoint,
        from: Option<&TunnelFrom>,
    ) -> Result<Upstream, String> {
        let Some(mesh) = &self.mesh else {
            return Ok(Upstream::direct(endpoint.addr));
        };
        if !self.tunnels_to(endpoint) {
            return Ok(Upstream::direct(endpoint.addr));
        }
        let Some(from) = from else {
            return Err(format!(
                "{} is a pod enrolled on another node, reached over mutual TLS only, and the \
                 client has no mesh identity",
                endpoint.addr
            ));
        };
        let Some(server) = &endpoint.server else {
            return Err(format!(
                "{} is a pod enrolled on another node, reached over mutual TLS only, and its \
                 identity is not known (its node's agent has not published its service account)",
                endpoint.addr
            ));
        };
        Ok(Upstream {
            endpoint: endpoint.addr,
            tunnel: Some(Tunnelled {
                from: from.clone(),
                mesh: mesh.clone(),
                server: server.clone(),
            }),
        })
    }

    /// Drains its client connections when `drain` says so.
    pub fn draining_on(mut self, drain: Drain) -> Self {
        self.drain = drain;
        self
    }

    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// The limits and timeouts it runs with, which opaque TCP shares.
    pub fn config(&self) -> &HttpConfig {
        &self.cfg
    }

    /// The upstream connection pools (this worker's, when called on a worker).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Serves one client connection to the service at `dst` (HTTP/1.1 or HTTP/2, told apart
    /// by the HTTP/2 preface). A malformed request gets 400 and its connection closes; other
    /// connections carry on. The connection is any byte stream: a captured TCP connection, or
    /// the fuzz targets' in-memory one.
    pub async fn serve<S>(self: Arc<Self>, stream: S, dst: SocketAddr, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let state = Http1State {
            listener: Direction::outbound,
            peer,
            dst,
        };
        self.serve_client(stream, None, state, None).await
    }

    /// Serves one connection the inbound listener took for the enrolled pod at `pod`: each
    /// request goes to the pod as it came, and is measured from the destination's side.
    pub async fn serve_inbound<S>(self: Arc<Self>, stream: S, pod: SocketAddr, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_tunnel(stream, pod, peer, None).await
    }

    /// The same for a connection that may have come in a mutual-TLS tunnel between
    /// `principals`, which its requests' series name.
    pub async fn serve_tunnel<S>(
        self: Arc<Self>,
        stream: S,
        pod: SocketAddr,
        peer: SocketAddr,
        principals: Option<Arc<Principals>>,
    ) where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let state = Http1State {
            listener: Direction::inbound,
            peer,
            dst: pod,
        };
        self.serve_client(stream, None, state, principals).await
    }

    /// Answers each request of a connection that its pod's policy refuses with 403 and the
    /// `reason`, and closes it after the first on HTTP/1.1.
    pub async fn refuse<S>(&self, mut stream: S, peer: SocketAddr, pod: SocketAddr, reason: String)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Ok(Ok(read)) = tokio::time::timeout(
            self.cfg
                .header_read_timeout
                .unwrap_or(Duration::from_secs(10)),
            read_preface(&mut stream),
        )
        .await
        else {
            return;
        };
        let is_http2 = read.as_ref() == H2_PREFACE;
        let io = TokioIo::new(Rewind::new(read, stream));
        let metrics = self.metrics.clone();
        let service = hyper::service::service_fn(move |_: Request<Incoming>| {
            let response = error(ProxyError::forbidden, &reason);
            local_reply::report(&metrics, Direction::inbound, &response, peer, &pod);
            std::future::ready(Ok::<_, Infallible>(response))
        });
        let result = if is_http2 {
            self.http2.serve_connection(io, service).await
        } else {
            let mut http1 = self.http1.clone();
            http1.keep_alive(false).serve_connection(io, service).await
        };
        if let Err(e) = result {
            debug!(error = %e, "a refused HTTP connection ended with an error");
        }
    }

    /// Carries on an HTTP/1.1 connection a predecessor agent handed over between requests,
    /// with the bytes of the next request it had read already.
    pub async fn resume(self: Arc<Self>, client: TcpStream, buffered: Bytes, state: Http1State) {
        self.serve_client(client, Some(buffered), state, None).await
    }

    /// Serves a client connection until it ends, or the drain ends or moves it. `http1`: the
    /// connection is HTTP/1.1, with these bytes of it read already; else its version is read
    /// from its first bytes.
    async fn serve_client<S>(
        self: Arc<Self>,
        mut stream: S,
        http1: Option<Bytes>,
        state: Http1State,
        principals: Option<Arc<Principals>>,
    ) where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (is_http2, read) = match http1 {
            Some(buffered) => (false, buffered),
            None => {
                let preface = read_preface(&mut stream);
                let read = match self.cfg.header_read_timeout {
                    Some(limit) => tokio::time::timeout(limit, preface)
                        .await
                        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
                    None => preface.await,
                };
                match read {
                    Ok(read) => (read.as_ref() == H2_PREFACE, read),
                    Err(e) => {
                        debug!(peer = %state.peer, error = %e, "HTTP connection ended before its first request");
                        return;
                    }
                }
            }
        };
        let stream = Rewind::new(read, stream);
        let conn = Arc::new(ClientConn::new(
            state.peer,
            state.dst,
            &self.routes,
            principals,
        ));
        let result = match (state.listener, is_http2) {
            (Direction::outbound, true) => {
                self.serve_http2(stream, self.outbound_service(conn)).await
            }
            (Direction::inbound, true) => {
                self.serve_http2(stream, self.inbound_service(conn)).await
            }
            (Direction::outbound, false) => {
                self.serve_http1(stream, self.outbound_service(conn), state.clone())
                    .await
            }
            (Direction::inbound, false) => {
                self.serve_http1(stream, self.inbound_service(conn), state.clone())
                    .await
            }
        };
        if let Err(e) = result {
            debug!(peer = %state.peer, listener = ?state.listener, error = %e, "HTTP connection ended with an error");
        }
    }

    /// Serves HTTP/2 until the connection ends; a drain sends GOAWAY, and the requests in
    /// flight finish.
    async fn serve_http2<S>(
        &self,
        stream: Rewind<S>,
        service: impl ClientService,
    ) -> hyper::Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let io = TokioIo::new(IdleTimeout::new(stream, self.cfg.idle_timeout));
        let conn = self.http2.serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => result,
            _ = self.drain.started() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }

    /// Serves HTTP/1.1 (upgrades included) until the connection ends. A drain closes it at
    /// its next response boundary (`Connection: close`), or, when it is idle between requests
    /// and a successor takes connections, hands it over whole.
    async fn serve_http1<S>(
        &self,
        stream: Rewind<S>,
        service: impl ClientService,
        state: Http1State,
    ) -> hyper::Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let detach = Detach::default();
        let io: Http1Io<S> = TokioIo::new(Detachable::new(
            IdleTimeout::new(stream, self.cfg.idle_timeout),
            detach.clone(),
        ));
        let mut conn = self.http1.serve_connection(io, service).with_upgrades();
        let result = tokio::select! {
            result = &mut conn => result,
            handover = self.drain.started() => {
                if handover.is_some() {
                    detach.request();
                }
                std::pin::Pin::new(&mut conn).graceful_shutdown();
                (&mut conn).await
            }
        };
        if detach.detached() {
            if let (Some(parts), Some(handover)) = (conn.into_parts(), self.drain.handover()) {
                let (rest, stream) = parts.io.into_inner().into_inner().into_inner().into_parts();
                let buffered = if rest.is_empty() {
                    parts.read_buf
                } else {
                    [parts.read_buf, rest].concat().into()
                };
                // Only a TCP connection can move (the fuzz targets' in-memory ones cannot).
                let stream: Box<dyn std::any::Any> = Box::new(stream);
                if let Ok(client) = stream.downcast::<TcpStream>() {
                    if let Ok(client) = client.into_std() {
                        let moved = Moved::Http1 {
                            client,
                            buffered,
                            state,
                        };
                        if !handover.send(moved) {
                            debug!("the successor is gone: an idle HTTP/1.1 connection closes");
                        }
                    }
                }
            }
        }
        result
    }

    /// Answers the requests of a client connection to a service.
    fn outbound_service(self: &Arc<Self>, conn: Arc<ClientConn>) -> impl ClientService {
        let this = self.clone();
        hyper::service::service_fn(move |req| {
            let this = this.clone();
            let conn = conn.clone();
            async move {
                let facts = conn.facts(&this.routes);
                let response = match &facts.service {
                    Some(service) => {
                        let response = this.handle(req, service, &facts, &conn).await;
                        let target = format_args!("{}/{}", service.namespace, service.name);
                        local_reply::report(
                            &this.metrics,
                            Direction::outbound,
                            &response,
                            conn.peer,
                            &target,
                        );
                        response
                    }
                    // The service lost its routes: the request goes where it was sent, as a new
                    // connection's bytes would.
                    None => {
                        let response = this.pass_through(req, &conn).await;
                        let (peer, dst) = (conn.peer, conn.dst);
                        local_reply::report(
                            &this.metrics,
                            Direction::outbound,
                            &response,
                            peer,
                            &dst,
                        );
                        response
                    }
                };
                Ok::<_, Infallible>(response)
            }
        })
    }

    /// Answers one request and records it in the metrics.
    async fn handle(
        &self,
        req: Request<Incoming>,
        service: &Arc<ServiceRoutes>,
        facts: &Resolved,
        conn: &ClientConn,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = MethodClass::from(req.method());
        let source = &facts.source;
        let mut answered = Answered::default();
        let response = self
            .route_request(req, service, facts, conn, &mut answered)
            .await;
        let Answered { backend, endpoint } = answered;
        let principals = response.extensions().get::<Arc<Principals>>();
        let answer = OutboundAnswer {
            principals,
            source,
            service,
            backend: backend.as_deref(),
            pod: endpoint.as_ref().and_then(|e| e.pod.as_ref()),
            // A pod whose own agent measures its requests is left to that agent in Flagger's
            // family.
            flagger: endpoint
                .as_ref()
                .is_some_and(|e| !e.measured_at_destination),
            mirror: false,
        };
        let status = response.status().as_u16();
        answer.record(
            &self.metrics,
            facts.table,
            method,
            status,
            started.elapsed(),
        );
        response
    }

    /// Answers the requests of a client connection to an enrolled pod, measured from the
    /// destination's side.
    fn inbound_service(self: &Arc<Self>, conn: Arc<ClientConn>) -> impl ClientService {
        let this = self.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let conn = conn.clone();
            async move {
                let started = Instant::now();
                let method = MethodClass::from(req.method());
                // Another agent's mirror copy: measured as one, and in Flagger's family as any
                // request this pod served.
                let mirror = req.headers().contains_key(MIRROR_HEADER);
                let response = this.pass_through(req, &conn).await;
                let (peer, pod) = (conn.peer, conn.dst);
                local_reply::report(&this.metrics, Direction::inbound, &response, peer, &pod);
                let status = response.status().as_u16();
                let facts = conn.facts(&this.routes);
                let (source, destination) = (&facts.source, &facts.destination);
                let key = SeriesKey::new(
                    Direction::inbound,
                    source,
                    None::<&()>,
                    None::<&()>,
                    Some(&**destination),
                    true,
                    method,
                    status,
                    mirror,
                )
                .over_mtls(conn.principals.as_ref());
                let labels = || {
                    let mut edge = metrics::Edge::inbound(source, destination);
                    if let Some(principals) = &conn.principals {
                        edge = edge.over_mtls(principals);
                    }
                    let labels = RequestLabels {
                        edge,
                        method,
                        status_code: status,
                        mirror,
                    };
                    (labels, Some(destination.clone()))
                };
                series::record(&this.metrics, facts.table, key, labels, started.elapsed());
                Ok::<_, Infallible>(response)
            }
        })
    }

    /// Sends a request, as it came, to the address its client dialled.
    async fn pass_through(
        &self,
        mut req: Request<Incoming>,
        conn: &ClientConn,
    ) -> Response<ProxyBody> {
        let upgrade = Upgrade::take(&mut req);
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        add_forwarding_headers(&mut parts.headers, &conn.forwarded_for);
        if let Some(upgrade) = &upgrade {
            upgrade.ask(&mut parts.headers);
        }
        let request = upstream_request(parts, body.boxed());
        let dst = conn.dst;
        let upstream = Upstream::direct(dst);
        let mut response = match self.pool.send(&upstream, request, upgrade.is_some()).await {
            Ok(response) => response.map(|body| body.boxed()),
            Err(SendError::NotSent { error, reason, .. }) => {
                return connect_failed(reason, dst, &error, "")
            }
            Err(SendError::Failed(e)) => return exchange_failed(dst, &e),
            Err(SendError::Refused(reason)) => return error(ProxyError::forbidden, &reason),
        };
        if !upgrade.is_some_and(|u| u.join(&mut response, self, conn.peer)) {
            strip_hop_by_hop(response.headers_mut());
        }
        response
    }

    async fn route_request(
        &self,
        mut req: Request<Incoming>,
        service: &Arc<ServiceRoutes>,
        facts: &Resolved,
        conn: &ClientConn,
        answered: &mut Answered,
    ) -> Response<ProxyBody> {
        let upgrade = Upgrade::take(&mut req);
        let (mut parts, body) = req.into_parts();
        if let (Some(flags), Some(set)) = (&service.flags, &facts.flag_set) {
            let (source, table) = (&facts.source, facts.table);
            flags::set_flag_headers(flags, set, &mut parts, source, table, &self.metrics);
        }
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
                None => return error(ProxyError::no_route, "no route matches the request"),
            }
        };
        let (backend, weighted) = match rule.map(|rule| choose_backend(rule, &parts.headers)) {
            None => (service.default.clone(), None),
            Some(Ok((backend, weighted))) => (backend, Some(weighted)),
            Some(Err(why)) => return error(ProxyError::invalid_backend, &why),
        };
        answered.backend = Some(backend.clone());

        strip_hop_by_hop(&mut parts.headers);
        add_forwarding_headers(&mut parts.headers, &conn.forwarded_for);
        if let Some(rule) = rule {
            rule.request_headers.apply(&mut parts.headers);
        }
        // The copy is taken before the chosen backend's own filters, which are not the
        // mirror's.
        let mirror = rule.and_then(|r| r.mirror.as_ref());
        let body = match mirror.and_then(|m| self.mirror_wanted(m, &parts)) {
            Some(mirror) => match self.hold(body).await {
                Ok(Held::Whole(bytes)) => {
                    self.mirror(mirror, &parts, bytes.clone(), service, facts);
                    full(bytes)
                }
                Ok(Held::TooLarge(body)) => {
                    let outcome = MirrorOutcome::SkippedBodyTooLarge;
                    self.metrics
                        .mirror(outcome, &mirror.backend.namespace, &mirror.backend.name);
                    body.boxed()
                }
                Ok(Held::OverBudget(body)) => {
                    let outcome = MirrorOutcome::SkippedBufferBudget;
                    self.metrics
                        .mirror(outcome, &mirror.backend.namespace, &mirror.backend.name);
                    body.boxed()
                }
                // A truncated body must never reach the backend as if it were whole.
                Err(_) => return error(ProxyError::client_body, "the request body ended early"),
            },
            None => body.boxed(),
        };
        if let Some(weighted) = weighted {
            weighted.request_headers.apply(&mut parts.headers);
        }

        // Asked for after the mirror took its copy: a mirror never upgrades.
        if let Some(upgrade) = &upgrade {
            upgrade.ask(&mut parts.headers);
        }
        let request = upstream_request(parts, body);
        let attempt = self.forward(
            request,
            &backend,
            rule,
            upgrade.is_some(),
            facts.tunnel_from.as_ref(),
            &mut answered.endpoint,
        );
        let mut response = match rule.and_then(|r| r.timeout) {
            Some(limit) => match tokio::time::timeout(limit, attempt).await {
                Ok(response) => response,
                Err(_) => error(ProxyError::request_timeout, "the request timed out"),
            },
            None => attempt.await,
        };
        if !upgrade.is_some_and(|u| u.join(&mut response, self, conn.peer)) {
            strip_hop_by_hop(response.headers_mut());
        }
        if rule.is_some() || weighted.is_some() {
            let headers = response.headers_mut();
            if let Some(rule) = rule {
                rule.response_headers.apply(headers);
            }
            if let Some(weighted) = weighted {
                weighted.response_headers.apply(headers);
            }
        }
        response
    }

    /// Sends the request to an endpoint of `backend`. A request no endpoint received (the
    /// connect failed) goes once more, to another endpoint. `used` is the endpoint that
    /// answered, or was tried last.
    async fn forward(
        &self,
        mut request: Request<ProxyBody>,
        backend: &Backend,
        rule: Option<&Rule>,
        upgrades: bool,
        from: Option<&TunnelFrom>,
        used: &mut Option<Arc<Endpoint>>,
    ) -> Response<ProxyBody> {
        // The endpoint whose connect failed, and why.
        let mut failed: Option<(Arc<Endpoint>, std::io::Error, ProxyError)> = None;
        loop {
            let skip = failed.as_ref().map(|(endpoint, ..)| endpoint);
            let Some(endpoint) = with_rng(|rng| balance::pick(&backend.endpoints, skip, rng))
            else {
                return match failed {
                    Some((endpoint, e, reason)) => {
                        connect_failed(reason, endpoint.addr, &e, "; no other endpoint to retry on")
                    }
                    None => error(
                        ProxyError::no_endpoints,
                        &format!("{} has no endpoints", backend.name),
                    ),
                };
            };
            *used = Some(endpoint.clone());
            if let Err(denied) = self.admitted_locally(&endpoint, from) {
                return error(ProxyError::forbidden, &denied.to_string());
            }
            let upstream = match self.upstream(&endpoint, from) {
                Ok(upstream) => upstream,
                Err(why) => return error(ProxyError::no_identity, &why),
            };
            let in_flight = InFlight::start(endpoint.addr);
            let sent = self.pool.send(&upstream, request, upgrades);
            let result = match rule.and_then(|r| r.backend_timeout) {
                Some(limit) => match tokio::time::timeout(limit, sent).await {
                    Ok(result) => result,
                    Err(_) => {
                        self.endpoint_failed(in_flight, Failure::Server, backend);
                        return error(ProxyError::backend_timeout, "the backend request timed out");
                    }
                },
                None => sent.await,
            };
            match result {
                Ok(response) => {
                    let server_error = response.status().is_server_error();
                    let outlier = &self.cfg.outlier;
                    let ejected = in_flight.answered(server_error, &backend.endpoints, outlier);
                    if server_error {
                        self.metrics.endpoint_failure(
                            Failure::Server,
                            &backend.namespace,
                            &backend.name,
                            ejected,
                        );
                    }
                    return response.map(|body| body.boxed());
                }
                Err(SendError::NotSent {
                    error,
                    reason,
                    request: unsent,
                }) => {
                    self.endpoint_failed(in_flight, Failure::Connect, backend);
                    if failed.is_some() {
                        return connect_failed(reason, endpoint.addr, &error, "");
                    }
                    debug!(endpoint = %endpoint.addr, %error, reason = reason.as_str(), "connect failed; retrying on another endpoint");
                    failed = Some((endpoint, error, reason));
                    request = *unsent;
                }
                Err(SendError::Failed(e)) => {
                    self.endpoint_failed(in_flight, Failure::Server, backend);
                    return exchange_failed(endpoint.addr, &e);
                }
                Err(SendError::Refused(reason)) => return error(ProxyError::forbidden, &reason),
            }
        }
    }

    /// Counts an endpoint's failure towards its ejection, and in the metrics.
    fn endpoint_failed(&self, in_flight: InFlight, failure: Failure, backend: &Backend) {
        let ejected = in_flight.failed(failure, &backend.endpoints, &self.cfg.outlier);
        self.metrics
            .endpoint_failure(failure, &backend.namespace, &backend.name, ejected);
    }
}

/// Who answered an outbound request (or a mirror copy), for its metrics.
struct OutboundAnswer<'a> {
    source: &'a Workload,
    service: &'a Arc<ServiceRoutes>,
    /// The backend Service the split chose, when one was.
    backend: Option<&'a Backend>,
    /// The pod of the endpoint that answered, when one did and it is known.
    pod: Option<&'a Arc<Workload>>,
    /// Whether this agent reports the pod in Flagger's family.
    flagger: bool,
    mirror: bool,
    /// The identities the ends of the tunnel it came through proved.
    principals: Option<&'a Arc<Principals>>,
}

impl OutboundAnswer<'_> {
    fn record(
        &self,
        metrics: &Metrics,
        table: TableId,
        method: MethodClass,
        status: u16,
        took: Duration,
    ) {
        let key = SeriesKey::new(
            Direction::outbound,
            self.source,
            Some(&**self.service),
            self.backend,
            self.pod.map(|p| &**p),
            self.flagger,
            method,
            status,
            self.mirror,
        )
        .over_mtls(self.principals);
        let labels = || {
            let mut edge = metrics::Edge::outbound(
                self.source,
                self.service,
                self.backend.map(|b| &b.name),
                self.pod.map(|p| &**p),
            );
            if let Some(principals) = self.principals {
                edge = edge.over_mtls(principals);
            }
            let labels = RequestLabels {
                edge,
                method,
                status_code: status,
                mirror: self.mirror,
            };
            (labels, self.pod.filter(|_| self.flagger).cloned())
        };
        series::record(metrics, table, key, labels, took);
    }
}

/// An exchange that broke after the request started out: the client's own body ended early
/// (400; the endpoint saw an aborted request, never a whole one), or the endpoint failed (502).
fn exchange_failed(addr: SocketAddr, e: &hyper::Error) -> Response<ProxyBody> {
    if e.is_user() {
        return error(ProxyError::client_body, "the request body ended early");
    }
    error(ProxyError::upstream_failed, &format!("{addr} failed: {e}"))
}

fn connect_failed(
    reason: ProxyError,
    addr: SocketAddr,
    e: &std::io::Error,
    note: &str,
) -> Response<ProxyBody> {
    error(reason, &format!("connecting to {addr} failed: {e}{note}"))
}

/// Picks a rule's backend by weight: by the request's split key when the rule has one and the
/// request carries it, else at random. A share with no backend is an error (the client gets
/// 500, as the Gateway API requires), described here.
fn choose_backend<'r>(
    rule: &'r Rule,
    headers: &http::HeaderMap,
) -> Result<(Arc<Backend>, &'r WeightedBackend), String> {
    let chosen = rule
        .sticky_choice(headers)
        .or_else(|| with_rng(|rng| pick_weighted(rule.weights(), rng)));
    let Some(index) = chosen else {
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

/// Reads a connection's first bytes until they differ from the HTTP/2 preface or are all of
/// it: what was read, to be replayed.
async fn read_preface<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Bytes> {
    let mut read = bytes::BytesMut::with_capacity(H2_PREFACE.len());
    while read.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&read) {
        let mut limited = (&mut *stream).take((H2_PREFACE.len() - read.len()) as u64);
        if limited.read_buf(&mut read).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(read.freeze())
}

#[cfg(test)]
mod tests {
    use aviary_identity::spiffe::Identity;

    use http::HeaderMap;

    use super::*;

    #[test]
    fn hop_by_hop_headers_go_but_te_trailers_stays() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", "keep-alive, x-hop".parse().unwrap());
        headers.insert("x-hop", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("te", "trailers".parse().unwrap());
        headers.insert("proxy-authenticate", "Basic".parse().unwrap());
        headers.insert("x-end-to-end", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 2, "{headers:?}");
        assert_eq!(headers["te"], "trailers");
        assert_eq!(headers["x-end-to-end"], "1");

        let mut headers = HeaderMap::new();
        headers.insert("te", "gzip".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn forwarding_headers_append_the_client() {
        let client = HeaderValue::from_static("10.0.0.1");
        let mut headers = HeaderMap::new();
        add_forwarding_headers(&mut headers, &client);
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        add_forwarding_headers(&mut headers, &HeaderValue::from_static("10.0.0.2"));
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 10.0.0.2");
        assert_eq!(headers["x-forwarded-proto"], "https");
    }

    use crate::proxy::mesh::MeshTimeouts;

    #[test]
    fn a_tunnel_expects_the_pods_identity_and_is_never_made_without_it() {
        let timeouts = MeshTimeouts {
            connect: Duration::from_secs(1),
            handshake: Duration::from_secs(1),
            idle: Duration::from_secs(1),
        };
        let certificates = Arc::new(crate::identity::Certificates::default());
        let mesh = Mesh::new(certificates, 0, timeouts);
        let proxy = HttpProxy::new(
            HttpConfig::default(),
            Arc::new(ArcSwap::from_pointee(RouteTable::default())),
            0,
            Arc::new(Metrics::new(true, None)),
        )
        .with_mesh(Some(Arc::new(mesh)));
        let id = |text: &str| Arc::new(text.parse::<Identity>().unwrap());
        let from = TunnelFrom {
            source: "10.244.1.10:40000".parse().unwrap(),
            identity: id("spiffe://cluster.local/ns/shop/sa/web"),
        };
        let pod = Arc::new(Workload {
            namespace: "shop".into(),
            workload: "payments".into(),
            pod: "payments-0".into(),
        });
        let payments = id("spiffe://cluster.local/ns/shop/sa/payments");
        let addr = "10.244.2.11:8080".parse().unwrap();

        let known = Endpoint::new(addr, Some(pod.clone()), true, Some(payments.clone()));
        let tunnel = proxy.upstream(&known, Some(&from)).unwrap().tunnel.unwrap();
        assert_eq!(tunnel.server, payments);

        let unknown = Endpoint::new(addr, Some(pod.clone()), true, None);
        let refused = proxy.upstream(&unknown, Some(&from)).err().unwrap();
        assert!(refused.contains("its identity is not known"), "{refused}");
        let refused = proxy.upstream(&known, None).err().unwrap();
        assert!(
            refused.contains("the client has no mesh identity"),
            "{refused}"
        );

        // Not measured at its destination: directly, as always.
        let direct = Endpoint::new(addr, Some(pod), false, None);
        assert!(proxy
            .upstream(&direct, Some(&from))
            .unwrap()
            .tunnel
            .is_none());
    }
}
