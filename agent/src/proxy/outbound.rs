//! The outbound listener (port 15001): takes the connections the programs captured, recovers
//! each one's original destination and moves bytes to it.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, warn};

use crate::ebpf::maps::OrigDstTable;

const BACKLOG: u32 = 4096;

/// Binds the IPv4 listener on every address: pods reach it at the node address the programs
/// redirect to.
pub fn bind_v4(port: u16) -> io::Result<TcpListener> {
    listen(TcpSocket::new_v4()?, (Ipv4Addr::UNSPECIFIED, port).into())
}

/// Binds the IPv6 listener, IPv6 only: IPv4 (and v4-mapped) connects go to the IPv4 one.
pub fn bind_v6(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v6()?;
    setsockopt(&socket, sockopt::Ipv6V6Only, &true)?;
    listen(socket, (Ipv6Addr::UNSPECIFIED, port).into())
}

fn listen(socket: TcpSocket, addr: SocketAddr) -> io::Result<TcpListener> {
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// What every proxied connection needs.
pub struct Outbound {
    pub orig_dst: OrigDstTable,
    /// Marks the proxy's upstream sockets so the programs never capture them.
    pub mark: u32,
}

impl Outbound {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((client, peer)) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.handle(client, peer).await });
                }
                // Out of file descriptors or a connection reset before accept: keep serving.
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
        let Some(dst) = client
            .local_addr()
            .ok()
            .and_then(|local| self.orig_dst.lookup(peer, local))
        else {
            // Not a captured connection: the proxy is not an open relay. Reset, don't just close.
            debug!(%peer, "refused a connection with no recorded original destination");
            let _ = client.set_zero_linger();
            return;
        };
        let mut upstream = match self.connect(dst).await {
            Ok(upstream) => upstream,
            Err(e) => {
                debug!(%peer, %dst, error = %e, "upstream connect failed");
                let _ = client.set_zero_linger();
                return;
            }
        };
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((sent, received)) => debug!(%peer, %dst, sent, received, "connection closed"),
            Err(e) => debug!(%peer, %dst, error = %e, "connection ended with an error"),
        }
    }

    async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        setsockopt(&socket, sockopt::Mark, &self.mark)?;
        let stream = socket.connect(dst).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}
