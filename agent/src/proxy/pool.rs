//! Upstream HTTP connections, pooled per endpoint and per worker thread.
//!
//! Each data-plane worker owns its pools (a thread-local), as pingora's are per thread: a
//! request checks a connection out and back in without a lock, and never hands the request to
//! another thread. Pools are keyed by the endpoint's socket address (and, for a tunnel to
//! another node's agent, by the pod it comes from: a connection carries its source's identity
//! and address), not by anything in the policy snapshot, so they survive snapshot swaps.
//!
//! - HTTP/1.1: idle senders wait in a LIFO stack per endpoint (the most recently used
//!   connection is the warmest). A connection goes back when its response body has been read to
//!   the end; one whose body is dropped half-read is closed, since it cannot carry another
//!   request.
//! - HTTP/2: one connection per endpoint, multiplexed by every request to it.
//! - A request that a pooled connection could not carry because the connection was already
//!   closed is returned by hyper unsent, and goes out on another connection. A failed connect
//!   also sends nothing. Both are [`SendError::NotSent`], which the caller may retry on another
//!   endpoint whatever the method.
//! - Idle connections are reaped after `idle_timeout` ([`Pool::reap`], on a timer per worker),
//!   and at most `max_idle_per_endpoint` wait per endpoint.

use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use aviary_identity::spiffe::Identity;
use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::{
    detect::Detected,
    hbone::Tunnel,
    mesh::{Mesh, TunnelFrom},
};
use crate::proxy::metrics::{Principals, ProxyError};

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// A whole body of `bytes`, as the proxy sends its own answers and held requests.
pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The proxy's socket mark, which the capture programs skip.
    pub mark: u32,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    /// HTTP/2 connections are pinged this often, idle or not, so a dead one leaves the pool
    /// before a request finds it; one whose ping goes unanswered for the timeout is closed.
    pub http2_keepalive_interval: Option<Duration>,
    pub http2_keepalive_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            mark: 0,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_idle_per_endpoint: 256,
            http2_keepalive_interval: Some(Duration::from_secs(20)),
            http2_keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Where a request goes: to an endpoint directly, or through a mutual-TLS tunnel to the agent
/// of its node, from a pod of this node.
#[derive(Clone)]
pub struct Upstream {
    pub endpoint: SocketAddr,
    pub tunnel: Option<Tunnelled>,
}

/// How a tunnelled request leaves: from which pod, through which mesh, to a pod of which
/// identity (which the destination's agent must prove).
#[derive(Clone)]
pub struct Tunnelled {
    pub from: TunnelFrom,
    pub mesh: Arc<Mesh>,
    pub server: Arc<Identity>,
}

impl Upstream {
    pub fn direct(endpoint: SocketAddr) -> Self {
        Self {
            endpoint,
            tunnel: None,
        }
    }

    fn key(&self) -> PoolKey {
        PoolKey {
            endpoint: self.endpoint,
            source: self.tunnel.as_ref().map(|t| t.from.source.ip()),
        }
    }
}

/// A pool's key: the endpoint, and the source pod of a tunnel to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PoolKey {
    endpoint: SocketAddr,
    source: Option<IpAddr>,
}

/// Why a request did not get a response.
#[derive(Debug)]
pub enum SendError {
    /// Nothing reached the endpoint (the connect or the tunnel failed, for `reason`): the
    /// request comes back for another try.
    NotSent {
        error: io::Error,
        reason: ProxyError,
        request: Box<Request<ProxyBody>>,
    },
    /// The exchange failed after the request was (partly) written.
    Failed(hyper::Error),
    /// The destination's agent refused the tunnel, for this reason: its pod's policy does not
    /// admit the source. Nothing was sent, and the endpoint is not at fault.
    Refused(String),
}

/// A sender, and the identities its connection's ends proved when it is a tunnel.
struct Pooled<S> {
    sender: S,
    principals: Option<Arc<Principals>>,
}

struct IdleH1 {
    pooled: Pooled<http1::SendRequest<ProxyBody>>,
    since: Instant,
}

#[derive(Default)]
struct Pools {
    h1: HashMap<PoolKey, Vec<IdleH1>>,
    h2: HashMap<PoolKey, Pooled<http2::SendRequest<ProxyBody>>>,
}

thread_local! {
    static POOLS: RefCell<Pools> = RefCell::default();
}

/// The upstream side of the proxy. Cheap to share: its pools live in the worker threads.
#[derive(Debug, Clone)]
pub struct Pool {
    cfg: PoolConfig,
}

impl Pool {
    pub fn new(cfg: PoolConfig) -> Self {
        Self { cfg }
    }

    /// Sends `request` to `upstream` over HTTP/2 when `version` is HTTP/2, else HTTP/1.1. With
    /// `upgrades`, an HTTP/1.1 connection is opened just for this request and can be upgraded
    /// (a 101 takes the connection out of any pool). A response that came through a tunnel
    /// carries the [`Principals`] its ends proved in its extensions.
    pub async fn send(
        &self,
        upstream: &Upstream,
        request: Request<ProxyBody>,
        upgrades: bool,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let response = self.exchange(upstream, request, upgrades).await?;
        UpstreamBody::read_ahead(response)
            .await
            .map_err(SendError::Failed)
    }

    async fn exchange(
        &self,
        upstream: &Upstream,
        mut request: Request<ProxyBody>,
        upgrades: bool,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let (endpoint, key) = (upstream.endpoint, upstream.key());
        addressed(&mut request, endpoint);
        if request.version() == Version::HTTP_2 {
            return self.send_h2(upstream, request).await;
        }
        let request = if upgrades {
            request
        } else {
            match self.send_pooled_h1(key, request).await {
                Ok(sent) => return sent,
                Err(unsent) => unsent,
            }
        };
        let (io, principals) = match self.connect(upstream).await {
            Ok(connected) => connected,
            Err(error) => return Err(error.unsent(request)),
        };
        let (mut sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::Failed)?;
        if upgrades {
            tokio::spawn(async move {
                if let Err(e) = connection.with_upgrades().await {
                    debug!(%endpoint, error = %e, "upgradable upstream connection ended");
                }
            });
            // Never pooled: a 101 takes the connection over.
            return sender
                .send_request(request)
                .await
                .map(|response| with_principals(response.map(UpstreamBody::plain), &principals))
                .map_err(SendError::Failed);
        }
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%endpoint, error = %e, "upstream connection ended with an error");
            }
        });
        match sender.send_request(request).await {
            Ok(response) => {
                let pooled = Pooled { sender, principals };
                Ok(self.pooled(key, pooled, response))
            }
            Err(e) => Err(SendError::Failed(e)),
        }
    }

    /// Sends over an idle pooled connection; gives the request back when none could carry it.
    async fn send_pooled_h1(
        &self,
        key: PoolKey,
        mut request: Request<ProxyBody>,
    ) -> Result<Result<Response<UpstreamBody>, SendError>, Request<ProxyBody>> {
        while let Some(mut pooled) = self.checkout_h1(key) {
            // Ready at once unless the previous response's end is still being processed.
            if pooled.sender.ready().await.is_err() {
                continue;
            }
            match pooled.sender.try_send_request(request).await {
                Ok(response) => return Ok(Ok(self.pooled(key, pooled, response))),
                Err(mut e) => match e.take_message() {
                    // The connection had closed: nothing was sent.
                    Some(unsent) => request = unsent,
                    None => return Ok(Err(SendError::Failed(e.into_error()))),
                },
            }
        }
        Err(request)
    }

    /// The most recently returned live sender for `key`, if any.
    fn checkout_h1(&self, key: PoolKey) -> Option<Pooled<http1::SendRequest<ProxyBody>>> {
        POOLS.with_borrow_mut(|pools| {
            let idle = pools.h1.get_mut(&key)?;
            while let Some(entry) = idle.pop() {
                if !entry.pooled.sender.is_closed() && entry.since.elapsed() < self.cfg.idle_timeout
                {
                    return Some(entry.pooled);
                }
            }
            None
        })
    }

    fn pooled(
        &self,
        key: PoolKey,
        pooled: Pooled<http1::SendRequest<ProxyBody>>,
        response: Response<Incoming>,
    ) -> Response<UpstreamBody> {
        let max_idle = self.cfg.max_idle_per_endpoint;
        let principals = pooled.principals.clone();
        let response = response.map(|body| {
            let mut body = UpstreamBody {
                first: None,
                body,
                checkin: Some(Checkin {
                    key,
                    pooled,
                    max_idle,
                }),
            };
            if body.body.is_end_stream() {
                body.check_in();
            }
            body
        });
        with_principals(response, &principals)
    }

    async fn send_h2(
        &self,
        upstream: &Upstream,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let (endpoint, key) = (upstream.endpoint, upstream.key());
        let pooled = POOLS.with_borrow_mut(|pools| match pools.h2.get(&key) {
            Some(pooled) if !pooled.sender.is_closed() => {
                Some((pooled.sender.clone(), pooled.principals.clone()))
            }
            Some(_) => {
                pools.h2.remove(&key);
                None
            }
            None => None,
        });
        if let Some((mut sender, principals)) = pooled {
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let response = response.map(UpstreamBody::plain);
                    return Ok(with_principals(response, &principals));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Failed(e.into_error())),
                },
            }
        }
        let (io, principals) = match self.connect(upstream).await {
            Ok(connected) => connected,
            Err(error) => return Err(error.unsent(request)),
        };
        let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.cfg.http2_keepalive_interval)
            .keep_alive_timeout(self.cfg.http2_keepalive_timeout)
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .map_err(SendError::Failed)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        POOLS.with_borrow_mut(|pools| {
            let pooled = Pooled {
                sender: sender.clone(),
                principals: principals.clone(),
            };
            pools.h2.insert(key, pooled)
        });
        sender
            .send_request(request)
            .await
            .map(|response| with_principals(response.map(UpstreamBody::plain), &principals))
            .map_err(SendError::Failed)
    }

    /// A new connection to `upstream`: to the endpoint, or a tunnel with the identities its
    /// ends proved.
    async fn connect(
        &self,
        upstream: &Upstream,
    ) -> Result<(TokioIo<Connection>, Option<Arc<Principals>>), ConnectError> {
        if let Some(tunnelled) = &upstream.tunnel {
            let opened = tunnelled
                .mesh
                .tunnel(
                    &tunnelled.from,
                    upstream.endpoint,
                    &tunnelled.server,
                    Detected::Http,
                )
                .await;
            return match opened {
                Ok((tunnel, principals)) => {
                    Ok((TokioIo::new(Connection::Tunnel(tunnel)), Some(principals)))
                }
                Err(error) => Err(match error.refusal() {
                    Some(reason) => ConnectError::Refused(reason),
                    None => ConnectError::Failed {
                        reason: error.reason(),
                        error: io::Error::other(error.to_string()),
                    },
                }),
            };
        }
        let connected =
            super::connect_within(upstream.endpoint, self.cfg.mark, self.cfg.connect_timeout);
        let stream = connected.await.map_err(|error| ConnectError::Failed {
            reason: match error.kind() {
                io::ErrorKind::TimedOut => ProxyError::connect_timeout,
                _ => ProxyError::connect_failed,
            },
            error,
        })?;
        Ok((TokioIo::new(Connection::Direct(stream)), None))
    }

    /// Closes this worker's connections that idled past the timeout or whose peer closed them.
    pub fn reap(&self) {
        let timeout = self.cfg.idle_timeout;
        POOLS.with_borrow_mut(|pools| {
            pools.h1.retain(|_, idle| {
                idle.retain(|e| !e.pooled.sender.is_closed() && e.since.elapsed() < timeout);
                !idle.is_empty()
            });
            pools.h2.retain(|_, pooled| !pooled.sender.is_closed());
        });
    }

    /// This worker's pool: idle HTTP/1.1 connections waiting, and HTTP/2 connections held.
    #[cfg(test)]
    fn stats(&self) -> PoolStats {
        POOLS.with_borrow(|pools| PoolStats {
            idle_h1: pools.h1.values().map(Vec::len).sum(),
            h2: pools.h2.len(),
        })
    }
}

#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PoolStats {
    idle_h1: usize,
    h2: usize,
}

/// Gives a request what its version needs to leave: HTTP/2 a scheme and an authority (the
/// client's Host, else the endpoint), HTTP/1.1 a Host (the endpoint, for an HTTP/1.0 client
/// that sent none). A request that has them is left as it came.
fn addressed(request: &mut Request<ProxyBody>, endpoint: SocketAddr) {
    let host = request.headers().get(http::header::HOST).cloned();
    if request.version() != Version::HTTP_2 {
        if host.is_none() {
            if let Ok(value) = http::HeaderValue::try_from(endpoint.to_string()) {
                request.headers_mut().insert(http::header::HOST, value);
            }
        }
        return;
    }
    if request.uri().scheme().is_some() && request.uri().authority().is_some() {
        return;
    }
    let authority = host
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        .or_else(|| http::uri::Authority::try_from(endpoint.to_string()).ok());
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *request.uri_mut() = http::Uri::from_parts(parts).unwrap_or_default();
}

/// Why no connection was made; either way, nothing was sent.
enum ConnectError {
    Failed {
        error: io::Error,
        reason: ProxyError,
    },
    /// The destination's agent refused the tunnel, with this reason.
    Refused(String),
}

impl ConnectError {
    fn unsent(self, request: Request<ProxyBody>) -> SendError {
        match self {
            Self::Failed { error, reason } => SendError::NotSent {
                error,
                reason,
                request: Box::new(request),
            },
            Self::Refused(reason) => SendError::Refused(reason),
        }
    }
}

/// A response that came through a tunnel carries the identities its ends proved.
fn with_principals<B>(
    mut response: Response<B>,
    principals: &Option<Arc<Principals>>,
) -> Response<B> {
    if let Some(principals) = principals {
        response.extensions_mut().insert(principals.clone());
    }
    response
}

/// An upstream connection: to the endpoint, or a tunnel to its node's agent.
pub enum Connection {
    Direct(tokio::net::TcpStream),
    Tunnel(Tunnel),
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Direct(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tunnel(tunnel) => Pin::new(tunnel).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Direct(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tunnel(tunnel) => Pin::new(tunnel).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Direct(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Self::Tunnel(tunnel) => Pin::new(tunnel).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Direct(stream) => stream.is_write_vectored(),
            Self::Tunnel(tunnel) => tunnel.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Direct(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tunnel(tunnel) => Pin::new(tunnel).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Direct(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tunnel(tunnel) => Pin::new(tunnel).poll_shutdown(cx),
        }
    }
}

/// How long a connection whose response ended may take to finish sending its request (a body
/// still uploading when the endpoint answered early) before it goes back to the pool.
const CHECKIN_READY_WAIT: Duration = Duration::from_secs(1);

/// What goes back into the pool once a response has been read to its end.
struct Checkin {
    key: PoolKey,
    pooled: Pooled<http1::SendRequest<ProxyBody>>,
    max_idle: usize,
}

/// Small bodies up to this size are read ahead (see [`UpstreamBody::read_ahead`]).
const READ_AHEAD_LIMIT: u64 = 64 * 1024;

/// A response body from upstream. An HTTP/1.1 connection goes back to this worker's pool when
/// the body ends; dropped before its end, the connection closes with it.
pub struct UpstreamBody {
    /// A frame read ahead, given out first.
    first: Option<Frame<Bytes>>,
    body: Incoming,
    checkin: Option<Checkin>,
}

impl UpstreamBody {
    fn plain(body: Incoming) -> Self {
        Self {
            first: None,
            body,
            checkin: None,
        }
    }

    /// Reads the first frame of a small body of known length before the response goes on, so
    /// the proxy writes the head and the body to its client at once: one segment, and one
    /// wakeup of the client, instead of two. The frame is almost always there already, read in
    /// the same packet as the head.
    async fn read_ahead(response: Response<Self>) -> Result<Response<Self>, hyper::Error> {
        let small = response
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n > 0 && n <= READ_AHEAD_LIMIT);
        if !small || response.body().is_end_stream() {
            return Ok(response);
        }
        let (parts, mut body) = response.into_parts();
        if let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            body.first = Some(frame?);
        }
        Ok(Response::from_parts(parts, body))
    }

    fn check_in(&mut self) {
        let Some(Checkin {
            key,
            mut pooled,
            max_idle,
        }) = self.checkin.take()
        else {
            return;
        };
        if pooled.sender.is_closed() {
            return;
        }
        if pooled.sender.is_ready() {
            return idle_h1(key, pooled, max_idle);
        }
        // The response ended before the request did (an early answer to an upload): the
        // connection goes back only once it can carry another request, so that no request
        // ever waits on it.
        tokio::spawn(async move {
            let ready = pooled.sender.ready();
            if let Ok(Ok(())) = tokio::time::timeout(CHECKIN_READY_WAIT, ready).await {
                idle_h1(key, pooled, max_idle);
            }
        });
    }
}

/// Puts a ready HTTP/1.1 connection in this worker's pool, unless the pool is full.
fn idle_h1(key: PoolKey, pooled: Pooled<http1::SendRequest<ProxyBody>>, max_idle: usize) {
    POOLS.with_borrow_mut(|pools| {
        let idle = pools.h1.entry(key).or_default();
        if idle.len() < max_idle {
            idle.push(IdleH1 {
                pooled,
                since: Instant::now(),
            });
        }
    });
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.check_in(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.check_in(),
            // A broken body leaves a connection no one can use again.
            Poll::Ready(Some(Err(_))) => self.checkin = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead = self
            .first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |data| data.len() as u64);
        let rest = self.body.size_hint();
        match rest.exact() {
            Some(n) => SizeHint::with_exact(n + ahead),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + ahead);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + ahead);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
    };

    use http_body_util::{BodyExt as _, Empty, Full};
    use hyper::service::service_fn;
    use hyper_util::server::conn::auto;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// A listener on loopback whose connections `serve` handles; counts the connections.
    async fn counting_listener<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        (addr, accepted)
    }

    /// An HTTP/1.1 and HTTP/2 backend that answers 64 bytes (`/big`: 1 MiB); counts the
    /// connections it accepted.
    async fn backend() -> (SocketAddr, Arc<AtomicUsize>) {
        counting_listener(|stream| async move {
            let answer = service_fn(|req: Request<Incoming>| async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let size = if req.uri().path() == "/big" {
                    1 << 20
                } else {
                    64
                };
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'x'; size]))))
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), answer)
                .await;
        })
        .await
    }

    fn get(version: Version) -> Request<ProxyBody> {
        get_path(version, "/")
    }

    fn get_path(version: Version, path: &str) -> Request<ProxyBody> {
        let uri = if version == Version::HTTP_2 {
            format!("http://backend{path}")
        } else {
            path.to_owned()
        };
        let mut request = Request::get(uri)
            .header("host", "backend")
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap();
        *request.version_mut() = version;
        request
    }

    async fn exchange(pool: &Pool, addr: SocketAddr, version: Version) -> usize {
        let response = pool
            .send(&Upstream::direct(addr), get(version), false)
            .await
            .unwrap();
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .len()
    }

    fn pool() -> Pool {
        Pool::new(PoolConfig::default())
    }

    #[tokio::test]
    async fn http1_connections_are_reused_once_a_response_is_read() {
        let (addr, accepted) = backend().await;
        let pool = pool();
        for _ in 0..20 {
            assert_eq!(exchange(&pool, addr, Version::HTTP_11).await, 64);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.stats().idle_h1, 1);
    }

    #[tokio::test]
    async fn a_response_dropped_half_read_takes_its_connection_with_it() {
        let (addr, accepted) = backend().await;
        let pool = pool();
        let response = pool
            .send(
                &Upstream::direct(addr),
                get_path(Version::HTTP_11, "/big"),
                false,
            )
            .await
            .unwrap();
        drop(response);
        assert_eq!(exchange(&pool, addr, Version::HTTP_11).await, 64);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_small_body_is_read_ahead_with_its_head() {
        let (addr, accepted) = backend().await;
        let pool = pool();
        let response = pool
            .send(&Upstream::direct(addr), get(Version::HTTP_11), false)
            .await
            .unwrap();
        let body = response.into_body();
        assert!(body.first.is_some(), "the body came with the head");
        assert_eq!(body.size_hint().exact(), Some(64));
        // Read whole already: its connection is back in the pool even before the body is.
        drop(body);
        assert_eq!(pool.stats().idle_h1, 1);
        assert_eq!(exchange(&pool, addr, Version::HTTP_11).await, 64);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_endpoint_closed_is_replaced() {
        // Answers one request per connection, then closes it while it idles in the pool.
        let (addr, accepted) = counting_listener(|mut stream| async move {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        })
        .await;
        let pool = pool();
        let response = pool
            .send(&Upstream::direct(addr), get(Version::HTTP_11), false)
            .await
            .unwrap();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let response = pool
            .send(&Upstream::direct(addr), get(Version::HTTP_11), false)
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        pool.reap();
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let (addr, accepted) = backend().await;
        let pool = pool();
        // The first request opens the connection; the rest run on it at the same time.
        assert_eq!(exchange(&pool, addr, Version::HTTP_2).await, 64);
        let concurrent = (0..20).map(|_| exchange(&pool, addr, Version::HTTP_2));
        let sizes = futures::future::join_all(concurrent).await;
        assert!(sizes.iter().all(|&n| n == 64));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.stats().h2, 1);
    }

    #[tokio::test]
    async fn a_refused_connect_gives_the_request_back() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        match pool()
            .send(&Upstream::direct(addr), get(Version::HTTP_11), false)
            .await
        {
            Err(SendError::NotSent {
                error,
                reason,
                request,
            }) => {
                assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
                assert_eq!(reason, ProxyError::connect_failed);
                assert_eq!(request.uri(), "/");
            }
            Err(SendError::Failed(e)) => panic!("expected NotSent, got {e}"),
            Err(SendError::Refused(reason)) => panic!("expected NotSent, got {reason}"),
            Ok(response) => panic!("expected NotSent, got {}", response.status()),
        }
    }

    #[tokio::test]
    async fn a_connect_nobody_answers_times_out_and_gives_the_request_back() {
        // A listener whose accept queue is full drops further SYNs: a black hole.
        let full =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        full.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        full.listen(0).unwrap();
        let addr = full.local_addr().unwrap().as_socket().unwrap();
        let mut queued = Vec::new();
        // Connects to a full queue hang; those that got in stay queued, never accepted.
        while let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            queued.push(stream);
        }
        let pool = Pool::new(PoolConfig {
            connect_timeout: Duration::from_millis(300),
            ..PoolConfig::default()
        });
        let start = std::time::Instant::now();
        match pool
            .send(&Upstream::direct(addr), get(Version::HTTP_11), false)
            .await
        {
            Err(SendError::NotSent {
                error,
                reason,
                request,
            }) => {
                assert_eq!(error.kind(), io::ErrorKind::TimedOut);
                assert_eq!(reason, ProxyError::connect_timeout);
                assert_eq!(request.uri(), "/");
            }
            Err(SendError::Failed(e)) => panic!("expected NotSent, got {e}"),
            Err(SendError::Refused(reason)) => panic!("expected NotSent, got {reason}"),
            Ok(response) => panic!("expected NotSent, got {}", response.status()),
        }
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn an_http2_endpoint_that_stops_answering_pings_fails_its_requests() {
        // Reads and discards everything, answers nothing: not even SETTINGS or PING.
        let (addr, _) = counting_listener(|mut stream| async move {
            let mut buf = [0u8; 4096];
            while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        let pool = Pool::new(PoolConfig {
            http2_keepalive_interval: Some(Duration::from_millis(100)),
            http2_keepalive_timeout: Duration::from_millis(100),
            ..PoolConfig::default()
        });
        let upstream = Upstream::direct(addr);
        let sent = pool.send(&upstream, get(Version::HTTP_2), false);
        match tokio::time::timeout(Duration::from_secs(2), sent).await {
            Ok(Err(SendError::Failed(_))) => {}
            Ok(Err(SendError::NotSent { error, .. })) => panic!("expected Failed, got {error}"),
            Ok(Err(SendError::Refused(reason))) => panic!("expected Failed, got {reason}"),
            Ok(Ok(response)) => panic!("expected Failed, got {}", response.status()),
            Err(_) => panic!("the request waited on a dead connection"),
        }
        pool.reap();
        assert_eq!(pool.stats().h2, 0, "the dead connection left the pool");
    }

    #[tokio::test]
    async fn a_connection_still_uploading_is_not_handed_to_the_next_request() {
        // Answers 413 at once, without reading the body, and then drains whatever comes.
        let (addr, accepted) = counting_listener(|mut stream| async move {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
                .await;
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await;
        let pool = pool();
        // An upload that never ends: its connection stays busy writing it.
        let (_uploading, chunks) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
        let body = http_body_util::StreamBody::new(tokio_stream_from(chunks)).boxed();
        let upload = Request::post("/")
            .header("host", "backend")
            .header("content-length", "1000000")
            .body(body)
            .unwrap();
        let response = pool
            .send(&Upstream::direct(addr), upload, false)
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        drop(response);
        // The next request must not wait on that connection.
        let next = tokio::time::timeout(Duration::from_secs(2), exchange_status(&pool, addr));
        assert_eq!(next.await.expect("the next request was not held up"), 413);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A stream of the frames sent on `rx`.
    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, hyper::Error>>,
    ) -> impl futures::Stream<Item = Result<Frame<Bytes>, hyper::Error>> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    async fn exchange_status(pool: &Pool, addr: SocketAddr) -> u16 {
        let response = pool
            .send(&Upstream::direct(addr), get(Version::HTTP_11), false)
            .await
            .unwrap();
        response.status().as_u16()
    }

    #[test]
    fn requests_get_what_their_version_needs_to_leave() {
        let endpoint: SocketAddr = "10.244.1.5:8080".parse().unwrap();
        let empty = || Empty::new().map_err(|never| match never {}).boxed();
        // HTTP/2 with only a Host: the authority comes from it.
        let mut h2 = Request::get("/x?y=1")
            .header("host", "podinfo.shop")
            .body(empty())
            .unwrap();
        *h2.version_mut() = Version::HTTP_2;
        addressed(&mut h2, endpoint);
        assert_eq!(h2.uri(), "http://podinfo.shop/x?y=1");
        // HTTP/2 with neither: the endpoint.
        let mut bare = Request::get("/").body(empty()).unwrap();
        *bare.version_mut() = Version::HTTP_2;
        addressed(&mut bare, endpoint);
        assert_eq!(bare.uri(), "http://10.244.1.5:8080/");
        // HTTP/2 that has its own authority keeps it.
        let mut full = Request::get("http://a.b/c").body(empty()).unwrap();
        *full.version_mut() = Version::HTTP_2;
        addressed(&mut full, endpoint);
        assert_eq!(full.uri(), "http://a.b/c");
        // HTTP/1.x without a Host gets the endpoint's; with one keeps it.
        let mut old = Request::get("/").body(empty()).unwrap();
        addressed(&mut old, endpoint);
        assert_eq!(old.headers()["host"], "10.244.1.5:8080");
        let mut kept = Request::get("/")
            .header("host", "podinfo.shop")
            .body(empty())
            .unwrap();
        addressed(&mut kept, endpoint);
        assert_eq!(kept.headers()["host"], "podinfo.shop");
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_are_reaped() {
        let (addr, _) = backend().await;
        let pool = Pool::new(PoolConfig {
            idle_timeout: Duration::from_millis(50),
            ..PoolConfig::default()
        });
        exchange(&pool, addr, Version::HTTP_11).await;
        assert_eq!(pool.stats().idle_h1, 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool.reap();
        assert_eq!(pool.stats().idle_h1, 0);
    }
}
