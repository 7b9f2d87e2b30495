//! The node proxy.

pub mod balance;
pub mod detect;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod route;
pub mod split;

use std::{future::Future, io, net::SocketAddr, time::Duration};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, warn};

use crate::metrics::{Metrics, Route};

/// Per direction: large enough that a bulk transfer moves in few reads and writes (tokio's
/// default of 8 KiB costs a wakeup every 8 KiB).
const SPLICE_BUFFER: usize = 64 * 1024;

const BACKLOG: u32 = 4096;

/// Binds and listens, as every proxy listener does.
fn listen(socket: TcpSocket, addr: SocketAddr) -> io::Result<TcpListener> {
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts connections for ever, handling each (without Nagle) in a task of its own.
pub async fn accept_each<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
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
    let copied = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        SPLICE_BUFFER,
        SPLICE_BUFFER,
    )
    .await;
    let (sent, received) = match copied {
        Ok((sent, received)) => {
            debug!(%peer, %dst, sent, received, "connection closed");
            (sent, received)
        }
        Err(e) => {
            // The byte counts of a failed copy are not known; the close still counts.
            debug!(%peer, %dst, error = %e, "connection ended with an error");
            (0, 0)
        }
    };
    if let Some(series) = &series {
        series.closed(sent, received);
    }
}
