//! The node proxy.

pub mod balance;
pub mod detect;
pub mod http;
pub mod outbound;
pub mod route;
pub mod split;

use std::{io, net::SocketAddr};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};

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
