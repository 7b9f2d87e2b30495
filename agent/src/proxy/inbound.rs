//! The inbound listener (port 15006): takes the connections the TC programs steered to it from
//! the node's uplink. Each one arrives with the pod's address as its local address (the SYN was
//! steered to this listener, TPROXY-style), and is forwarded to that pod: HTTP per request,
//! measured from the destination's side; anything else byte for byte. How a pod port is read
//! comes from its Services' `appProtocol`, else from the first bytes.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use super::{
    detect::{read_as, Detected},
    http::HttpProxy,
    route::RouteTable,
    ConnectionLimit,
};
use crate::metrics::{Metrics, Route};

/// Binds an inbound listener, for IPv4 or (IPv6 only) for IPv6. IP_TRANSPARENT lets its
/// connections answer from the pods' addresses, which are not the node's.
pub fn bind(port: u16, v6: bool) -> io::Result<std::net::TcpListener> {
    let addr = if v6 {
        IpAddr::from(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::from(Ipv4Addr::UNSPECIFIED)
    };
    let options = super::ListenOptions {
        v6_only: v6,
        transparent: true,
    };
    super::listen((addr, port).into(), options)
}

pub struct Inbound {
    /// The proxy's mark, on its connections to the pods.
    pub mark: u32,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub http: Arc<HttpProxy>,
    pub metrics: Arc<Metrics>,
    pub detect_timeout: Duration,
    /// Shared by this kind's listeners on every worker.
    pub limit: ConnectionLimit,
}

impl Inbound {
    pub async fn serve(self: Arc<Self>, listener: std::net::TcpListener) {
        let (limit, drain) = (self.limit.clone(), self.http.drain().clone());
        super::accept_each(listener, limit, drain, move |client, peer| {
            let this = self.clone();
            async move { this.handle(client, peer).await }
        })
        .await
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let Ok(pod) = client.local_addr() else {
            return;
        };
        let (route, protocol) = {
            let table = self.routes.load();
            let route = Route::inbound(&table.pod(peer.ip()), &table.pod(pod.ip()));
            (route, table.endpoint_protocol(&pod))
        };
        match read_as(protocol, &client, self.detect_timeout).await {
            // Boxed, as outbound: opaque connections' tasks stay small.
            Detected::Http => Box::pin(self.http.clone().serve_inbound(client, pod, peer)).await,
            Detected::Opaque => {
                let relay = super::Relay {
                    peer,
                    idle_timeout: self.http.config().idle_timeout,
                    metrics: &self.metrics,
                    route: Some(&route),
                    drain: self.http.drain(),
                };
                super::splice(client, pod, self.mark, relay).await
            }
        }
    }
}
