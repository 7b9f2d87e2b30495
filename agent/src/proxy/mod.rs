//! The node proxy.

pub mod balance;
pub mod copy;
pub mod detect;
pub mod drain;
pub mod hbone;
pub mod http;
pub mod idle;
pub mod inbound;
pub mod local_reply;
pub mod mesh;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod rewind;
pub mod series;
pub mod split;
pub mod workers;

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use futures::FutureExt as _;
use nix::sys::socket::{setsockopt, sockopt};
use prometheus_client::metrics::counter::Counter;
use socket2::{Domain, Socket, Type};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::{debug, warn};

use crate::proxy::metrics::{Direction, Edge, Metrics};

const BACKLOG: u32 = 4096;

/// How a listener's socket is set up beyond binding.
#[derive(Debug, Clone, Copy, Default)]
struct ListenOptions {
    /// IPv6 only: IPv4 (and v4-mapped) connections go to the IPv4 listener.
    v6_only: bool,
    /// IP_TRANSPARENT: accepted connections may have addresses that are not the node's.
    transparent: bool,
}

/// Binds and listens, as every proxy listener does. `SO_REUSEPORT` lets each data-plane worker
/// have a listener of its own on the same address, and the kernel spread connections over
/// them. Not yet registered with a runtime: the worker that serves it does that.
fn listen(addr: SocketAddr, options: ListenOptions) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if options.v6_only {
        socket.set_only_v6(true)?;
    }
    if options.transparent {
        setsockopt(&socket, sockopt::IpTransparent, &true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG as i32)?;
    Ok(socket.into())
}

/// The bound on the connections one kind of listener (outbound or inbound) holds at once,
/// shared by its listeners on every worker, as Envoy's overload manager bounds downstream
/// connections: past it, file descriptors and memory would run out for every connection at
/// once, where a bound refuses only the newest. A clone shares the same bound.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    listener: Direction,
    max: usize,
    /// One permit per connection that may be open; a connection's task holds one until it ends.
    open: Arc<Semaphore>,
    refused: Counter,
}

impl ConnectionLimit {
    /// At most `max` connections of `listener` at once (at least 1); those refused beyond it
    /// are counted in the metrics.
    pub fn new(listener: Direction, max: usize, metrics: &Metrics) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            listener,
            max,
            open: Arc::new(Semaphore::new(max)),
            refused: metrics.connections_refused(listener),
        }
    }

    /// A place for one more connection, or None at the limit.
    fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.open.clone().try_acquire_owned().ok()
    }

    /// Resets a connection accepted beyond the limit: the client learns at once, instead of
    /// waiting on a connection no one serves.
    fn refuse(&self, stream: TcpStream, peer: SocketAddr) {
        self.refused.inc();
        debug!(%peer, listener = ?self.listener, max = self.max, "refused a connection: the listener is at its connection limit");
        let _ = stream.set_zero_linger();
    }
}

/// Accepts connections until the drain begins, handling each (without Nagle) in a task of its
/// own on the calling worker; beyond `limit`, a connection is reset as soon as it is accepted.
/// At the drain the listener closes here (a successor holds it open, if one took it over).
pub async fn accept_each<F, Fut>(
    listener: std::net::TcpListener,
    limit: ConnectionLimit,
    drain: drain::Drain,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            warn!(error = %e, "a listener could not join its worker");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.started() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(admitted) = limit.admit() else {
                    limit.refuse(stream, peer);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // Not an async block awaiting the connection: that would hold the connection's
                // future twice (rust-lang/rust#108906), doubling each connection's task.
                let tracked = drain.track();
                tokio::spawn(handle(stream, peer).map(move |()| drop((admitted, tracked))));
            }
            // Out of file descriptors or a connection reset before accept: keep serving.
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Connects an upstream socket carrying the proxy's mark, which the capture programs skip: the
/// proxy's own traffic is never captured again.
pub async fn connect_marked(dst: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let socket = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // 0 is "no mark", for in-process tests without CAP_NET_ADMIN; the agent never uses it.
    if mark != 0 {
        setsockopt(&socket, sockopt::Mark, &mark)?;
    }
    let stream = socket.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// [`connect_marked`] within `limit`: one that gets no answer in time fails as
/// `ErrorKind::TimedOut`.
pub async fn connect_within(dst: SocketAddr, mark: u32, limit: Duration) -> io::Result<TcpStream> {
    tokio::time::timeout(limit, connect_marked(dst, mark))
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {limit:?}"),
            ))
        })
}

/// Connects to `dst` (with the proxy's `mark`) and relays bytes both ways ([`Relay`]); a
/// connect that fails resets the client.
pub async fn splice(client: TcpStream, dst: SocketAddr, mark: u32, relay: Relay<'_>) {
    match connect_marked(dst, mark).await {
        Ok(upstream) => relay.run(client, upstream).await,
        Err(e) => {
            debug!(peer = %relay.peer, %dst, error = %e, "upstream connect failed");
            let _ = client.set_zero_linger();
        }
    }
}

/// Carries on, on a worker, a connection a predecessor agent handed over.
pub fn carry_on(
    moved: drain::Moved,
    http: Arc<http::HttpProxy>,
    metrics: Arc<Metrics>,
) -> workers::WorkerTask {
    Box::new(move || {
        Box::pin(async move {
            let _tracked = http.drain().track();
            match moved {
                drain::Moved::Http1 {
                    client,
                    buffered,
                    state,
                } => {
                    let Ok(client) = TcpStream::from_std(client) else {
                        return;
                    };
                    http.clone().resume(client, buffered, state).await
                }
                drain::Moved::Relay {
                    client,
                    upstream,
                    state,
                } => {
                    let (Ok(client), Ok(upstream)) =
                        (TcpStream::from_std(client), TcpStream::from_std(upstream))
                    else {
                        return;
                    };
                    let relay = Relay {
                        peer: state.peer,
                        idle_timeout: http.config().idle_timeout,
                        metrics: &metrics,
                        edge: state.edge.as_ref(),
                        drain: http.drain(),
                    };
                    relay.run(client, upstream).await
                }
            }
        })
    })
}

/// What relaying one opaque connection needs.
pub struct Relay<'a> {
    pub peer: SocketAddr,
    /// Both sockets close once neither moved a byte for this long.
    pub idle_timeout: Option<Duration>,
    pub metrics: &'a Metrics,
    /// A routed connection is counted in the metrics along its edge.
    pub edge: Option<&'a Edge>,
    /// A drain that hands connections over moves this one, once every byte read is written.
    pub drain: &'a drain::Drain,
}

impl Relay<'_> {
    /// Copies bytes both ways until both sides close, one fails, the connection idles past
    /// the timeout, or a drain hands it over to the successor agent.
    pub async fn run(self, client: TcpStream, upstream: TcpStream) {
        let (peer, dst) = (self.peer, upstream.peer_addr().ok());
        let series = self.opened();
        // Both ends are watched: a copy stuck writing to one still polls the other.
        let mut client = idle::IdleTimeout::new(client, self.idle_timeout);
        let mut upstream = idle::IdleTimeout::new(upstream, self.idle_timeout);
        let (mut sent, mut received) = (0, 0);
        let mut handing_over = true;
        let result = loop {
            let pause = async {
                if handing_over {
                    self.drain.handing_over().await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            let copied = copy::bidirectional(&mut client, &mut upstream, pause).await;
            (sent, received) = (sent + copied.sent, received + copied.received);
            if !copied.paused {
                break copied.result;
            }
            // A successor gone meanwhile: the relay goes on here.
            let Some(handover) = self.drain.handover().filter(drain::Handover::is_open) else {
                handing_over = false;
                continue;
            };
            let (Ok(client), Ok(upstream)) = (
                client.into_inner().into_std(),
                upstream.into_inner().into_std(),
            ) else {
                return;
            };
            let state = drain::RelayState {
                peer,
                edge: self.edge.cloned(),
            };
            if handover.send(drain::Moved::Relay {
                client,
                upstream,
                state,
            }) {
                debug!(%peer, ?dst, sent, received, "connection handed over to the successor");
            } else {
                debug!(%peer, ?dst, "the successor went away while a connection moved to it");
            }
            return;
        };
        Self::closed(series, peer, dst, result, sent, received);
    }

    /// Copies bytes both ways until both sides close, one fails, or the connection idles past
    /// the timeout: for a connection that cannot move to a successor agent (a tunnel, whose
    /// TLS state lives in this process), which a drain leaves to end by itself.
    pub async fn run_in_place<C, U>(self, client: C, upstream: U, dst: Option<SocketAddr>)
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let series = self.opened();
        let mut client = idle::IdleTimeout::new(client, self.idle_timeout);
        let mut upstream = idle::IdleTimeout::new(upstream, self.idle_timeout);
        let copied = copy::bidirectional(&mut client, &mut upstream, std::future::pending()).await;
        let (sent, received) = (copied.sent, copied.received);
        Self::closed(series, self.peer, dst, copied.result, sent, received);
    }

    fn opened(&self) -> Option<metrics::TcpSeries> {
        let series = self.edge.map(|edge| self.metrics.tcp_series(edge));
        if let Some(series) = &series {
            series.opened();
        }
        series
    }

    fn closed(
        series: Option<metrics::TcpSeries>,
        peer: SocketAddr,
        dst: Option<SocketAddr>,
        result: io::Result<()>,
        sent: u64,
        received: u64,
    ) {
        match result {
            Ok(()) => debug!(%peer, ?dst, sent, received, "connection closed"),
            Err(e) => {
                debug!(%peer, ?dst, sent, received, error = %e, "connection ended with an error")
            }
        }
        if let Some(series) = &series {
            series.closed(sent, received);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::metrics::sample;

    /// Echoes until the client closes.
    async fn echo(mut stream: TcpStream, _peer: SocketAddr) {
        let (mut read, mut write) = stream.split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
    }

    /// A connection that the listener serves: its echo comes back.
    async fn served(addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        stream.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"ping");
        stream
    }

    fn refused(metrics: &Metrics) -> f64 {
        let text = metrics.render();
        sample(
            &text,
            "aviary_connections_refused_total",
            &[("listener", "outbound")],
        )
    }

    #[tokio::test]
    async fn a_connection_beyond_the_limit_is_reset_and_counted_until_one_closes() {
        let metrics = Metrics::new(false, None);
        let limit = ConnectionLimit::new(Direction::outbound, 2, &metrics);
        assert!(
            metrics
                .render()
                .contains("aviary_connections_refused_total{listener=\"outbound\"} 0"),
            "exported from the start"
        );
        let listener = listen("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = drain::DrainSignal::new().1;
        tokio::spawn(accept_each(listener, limit.clone(), drain, echo));

        let first = served(addr).await;
        let _second = served(addr).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        let reset = third.read(&mut [0u8; 1]).await.unwrap_err();
        assert_eq!(reset.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(refused(&metrics), 1.0);

        // The first one's task ends once it closes, and its place is free again.
        drop(first);
        let freed = tokio::time::timeout(Duration::from_secs(5), async {
            while limit.open.available_permits() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        freed.await.expect("a closed connection kept its place");
        let _fourth = served(addr).await;
        assert_eq!(refused(&metrics), 1.0);
    }

    #[tokio::test]
    async fn a_relayed_connection_that_idles_past_the_timeout_is_closed_both_ways() {
        let upstream_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream_listener.local_addr().unwrap();
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let metrics = Metrics::new(false, None);
        let relayed = async {
            let (client, peer) = front.accept().await.unwrap();
            let drain = drain::DrainSignal::new().1;
            let relay = Relay {
                peer,
                idle_timeout: Some(Duration::from_millis(300)),
                metrics: &metrics,
                edge: None,
                drain: &drain,
            };
            splice(client, upstream_addr, 0, relay).await;
        };
        let client = async {
            let mut client = TcpStream::connect(front_addr).await.unwrap();
            let (mut upstream, _) = upstream_listener.accept().await.unwrap();
            // Bytes every 150 ms keep it open.
            let mut buf = [0u8; 4];
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                client.write_all(b"ping").await.unwrap();
                upstream.read_exact(&mut buf).await.unwrap();
            }
            let start = std::time::Instant::now();
            assert_eq!(client.read(&mut buf).await.unwrap_or(0), 0, "closed");
            assert_eq!(upstream.read(&mut buf).await.unwrap_or(0), 0, "closed");
            start.elapsed()
        };
        let ((), idled) = tokio::join!(relayed, client);
        assert!(idled >= Duration::from_millis(250), "{idled:?}");
    }
}
