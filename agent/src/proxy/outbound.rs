//! The outbound listener (port 15001): takes the connections the programs captured, recovers
//! each one's original destination, and applies the routing table to it.
//!
//! - A destination with no entry in the table passes through, byte for byte, to where the pod
//!   aimed it.
//! - HTTP (detected, or declared by the Service port's appProtocol) is proxied per request.
//! - Opaque TCP is split per connection by the weights of the service's catch-all rule.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tracing::debug;

use crate::table::{Backend, BackendRef, Endpoint, RouteTable, ServiceRoutes, Workload};

use super::{
    balance::{self, Failure, InFlight},
    connect_marked,
    detect::{read_as, Detected},
    http::HttpProxy,
    mesh::TunnelFrom,
    split::{pick_weighted, with_rng},
    ConnectionLimit, Relay,
};
use crate::{
    ebpf::maps::OrigDstTable,
    proxy::metrics::{Edge, Metrics},
};

/// Binds an IPv4 listener on every address: pods reach it at the node address the programs
/// redirect to.
pub fn bind_v4(port: u16) -> io::Result<std::net::TcpListener> {
    super::listen((Ipv4Addr::UNSPECIFIED, port).into(), Default::default())
}

/// Binds an IPv6 listener, IPv6 only: IPv4 (and v4-mapped) connects go to the IPv4 one.
pub fn bind_v6(port: u16) -> io::Result<std::net::TcpListener> {
    let options = super::ListenOptions {
        v6_only: true,
        ..Default::default()
    };
    super::listen((Ipv6Addr::UNSPECIFIED, port).into(), options)
}

/// What every proxied connection needs.
pub struct Outbound {
    pub orig_dst: OrigDstTable,
    /// Marks the proxy's upstream sockets so the programs never capture them.
    pub mark: u32,
    /// Replaced whole when policy changes; read without a lock (shared with `http`).
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub http: Arc<HttpProxy>,
    pub metrics: Arc<Metrics>,
    pub detect_timeout: Duration,
    /// Shared by this kind's listeners on every worker.
    pub limit: ConnectionLimit,
}

impl Outbound {
    pub async fn serve(self: Arc<Self>, listener: std::net::TcpListener) {
        let (limit, drain) = (self.limit.clone(), self.http.drain().clone());
        super::accept_each(listener, limit, drain, move |client, peer| {
            let this = self.clone();
            async move { this.handle(client, peer).await }
        })
        .await
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
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
        let table = self.routes.load();
        let Some(service) = table.service_for(&dst, peer.ip()).cloned() else {
            return super::splice(client, dst, self.mark, self.relay(peer, None)).await;
        };
        let source = table.pod(peer.ip());
        drop(table);
        match read_as(service.protocol, &client, self.detect_timeout).await {
            // Boxed: an opaque connection's task, idle for hours perhaps, need not be as large
            // as an HTTP connection's future.
            Detected::Http => Box::pin(self.http.clone().serve(client, dst, peer)).await,
            Detected::Opaque => {
                self.relay_opaque(client, peer, dst, &source, &service)
                    .await
            }
        }
    }

    /// Relays an opaque connection to an endpoint of the backend its service's weights pick:
    /// directly, or in a tunnel to a pod enrolled on another node. A connect that fails
    /// counts against its endpoint (outlier detection), and the connection goes once more, to
    /// another endpoint: nothing of it was sent. A tunnel the destination refuses resets the
    /// client.
    async fn relay_opaque(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        source: &Workload,
        service: &ServiceRoutes,
    ) {
        let Some(backend) = tcp_backend(service) else {
            debug!(%peer, %dst, "no backend for an opaque connection");
            let _ = client.set_zero_linger();
            return;
        };
        let outlier = &self.http.config().outlier;
        let mut failed: Option<Arc<Endpoint>> = None;
        loop {
            let picked = with_rng(|rng| balance::pick(&backend.endpoints, failed.as_ref(), rng));
            let Some(endpoint) = picked else {
                debug!(%peer, %dst, "no endpoint for an opaque connection");
                let _ = client.set_zero_linger();
                return;
            };
            let admitted = {
                let from = TunnelFrom::of(&self.routes.load(), peer);
                self.http.admitted_locally(&endpoint, from.as_ref())
            };
            if let Err(denied) = admitted {
                debug!(%peer, endpoint = %endpoint.addr, %denied, "the destination pod's policy refused the connection");
                let _ = client.set_zero_linger();
                return;
            }
            // Held while the connection lasts: the balancer sees open connections as load.
            let in_flight = InFlight::start(endpoint.addr);
            let edge = Edge::outbound(
                source,
                service,
                Some(&backend.name),
                endpoint.pod.as_deref(),
            );
            let error = if self.http.tunnels_to(&endpoint) {
                // Boxed: the tunnel's handshakes would otherwise size every opaque connection's
                // task, tunnelled or not.
                match Box::pin(self.relay_tunnelled(client, peer, &endpoint, edge)).await {
                    Some((returned, error)) => {
                        client = returned;
                        error
                    }
                    None => {
                        drop(in_flight);
                        return;
                    }
                }
            } else {
                match connect_marked(endpoint.addr, self.mark).await {
                    Ok(upstream) => {
                        self.relay(peer, Some(&edge)).run(client, upstream).await;
                        drop(in_flight);
                        return;
                    }
                    Err(e) => e.to_string(),
                }
            };
            debug!(%peer, endpoint = %endpoint.addr, %error, "upstream connect failed");
            let ejected = in_flight.failed(Failure::Connect, &backend.endpoints, outlier);
            let (namespace, name) = (&backend.namespace, &backend.name);
            self.metrics
                .endpoint_failure(Failure::Connect, namespace, name, ejected);
            if failed.is_some() {
                let _ = client.set_zero_linger();
                return;
            }
            failed = Some(endpoint);
        }
    }

    /// Relays `client` through a tunnel to `endpoint`, or resets it when the destination
    /// refuses it or the client has no identity; gives it back with the error when no tunnel
    /// could be opened.
    async fn relay_tunnelled(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        endpoint: &Endpoint,
        edge: Edge,
    ) -> Option<(TcpStream, String)> {
        let from = TunnelFrom::of(&self.routes.load(), peer);
        let tunnelled = match self.http.upstream(endpoint, from.as_ref()) {
            Ok(upstream) => upstream.tunnel?,
            Err(why) => {
                debug!(%peer, endpoint = %endpoint.addr, %why, "no way to the endpoint");
                let _ = client.set_zero_linger();
                return None;
            }
        };
        let (from, server) = (&tunnelled.from, &tunnelled.server);
        let opened = tunnelled
            .mesh
            .tunnel(from, endpoint.addr, server, Detected::Opaque);
        match opened.await {
            Ok((tunnel, principals)) => {
                let edge = edge.over_mtls(&principals);
                let relay = self.relay(peer, Some(&edge));
                relay
                    .run_in_place(client, tunnel, Some(endpoint.addr))
                    .await;
                None
            }
            Err(e) if e.refusal().is_some() => {
                debug!(%peer, endpoint = %endpoint.addr, error = %e, "the destination refused the tunnel");
                let _ = client.set_zero_linger();
                None
            }
            Err(e) => Some((client, e.to_string())),
        }
    }

    fn relay<'a>(&'a self, peer: SocketAddr, edge: Option<&'a Edge>) -> Relay<'a> {
        Relay {
            peer,
            idle_timeout: self.http.config().idle_timeout,
            metrics: &self.metrics,
            edge,
            drain: self.http.drain(),
        }
    }
}

/// An opaque connection's backend: split by the weights of the first rule that matches every
/// request (matches on HTTP attributes mean nothing to raw bytes), else the service's own.
fn tcp_backend(service: &ServiceRoutes) -> Option<Arc<Backend>> {
    let backend: Arc<Backend> = match service.rules.iter().find(|rule| rule.matches.is_empty()) {
        Some(rule) => {
            let index = with_rng(|rng| pick_weighted(rule.weights(), rng))?;
            match &rule.backends[index].backend {
                BackendRef::Service(backend) => backend.clone(),
                BackendRef::Invalid { .. } => return None,
            }
        }
        None => service.default.clone(),
    };
    Some(backend)
}
