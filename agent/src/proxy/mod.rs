//! The node proxy.

pub mod balance;
pub mod copy;
pub mod detect;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod pool;
pub mod route;
pub mod series;
pub mod split;
pub mod workers;

use std::{future::Future, io, net::SocketAddr, time::Duration};

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, warn};

use crate::metrics::{Metrics, Route};

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

/// Accepts connections for ever, handling each (without Nagle) in a task of its own on the
/// calling worker.
pub async fn accept_each<F, Fut>(listener: std::net::TcpListener, handle: F)
where
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
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle(stream, peer));
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

/// Connects to `dst` (marked) and copies bytes both ways until both sides close; a connection
/// with a `route` is counted in the metrics.
pub async fn splice(
    mut client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    mark: u32,
    metrics: &Metrics,
    route: Option<&Route>,
) {
    let mut upstream = match connect_marked(dst, mark).await {
        Ok(upstream) => upstream,
        Err(e) => {
            debug!(%peer, %dst, error = %e, "upstream connect failed");
            let _ = client.set_zero_linger();
            return;
        }
    };
    let series = route.map(|route| metrics.tcp_series(route));
    if let Some(series) = &series {
        series.opened();
    }
    let copied = copy::bidirectional(&mut client, &mut upstream).await;
    let (sent, received) = (copied.sent, copied.received);
    match copied.result {
        Ok(()) => debug!(%peer, %dst, sent, received, "connection closed"),
        Err(e) => debug!(%peer, %dst, sent, received, error = %e, "connection ended with an error"),
    }
    if let Some(series) = &series {
        series.closed(sent, received);
    }
}
