//! The inbound listener (port 15006): takes the connections the TC programs steered to it from
//! the node's uplink. Each one arrives with the pod's address as its local address (the SYN was
//! steered to this listener, TPROXY-style), and is forwarded to that pod: HTTP per request,
//! measured from the destination's side; anything else byte for byte. How a pod port is read
//! comes from its Services' `appProtocol`, else from the first bytes.
//!
//! Connections to a pod's port [`hbone::PORT`] carry mutual-TLS tunnels from other nodes'
//! agents (when the node has mesh identities): each tunnel is admitted by the pod's
//! `aviary.dev/allow-from` and delivered to the pod as a plain connection would be, its
//! metrics naming both identities. A plain connection is admitted by the pod's
//! `aviary.dev/mtls` (and refused by an `allow-from`, which it cannot satisfy): HTTP gets 403
//! with the reason, anything else a reset.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use aviary_identity::spiffe::Identity;
use bytes::Bytes;
use tokio::net::TcpStream;
use tracing::debug;

use crate::table::{AppProtocol, RouteTable};

use super::{
    connect_marked,
    detect::{read_as, read_to_detect, Detected},
    hbone::{self, Accepted, Tunnel},
    http::HttpProxy,
    mesh::Mesh,
    rewind::Rewind,
    ConnectionLimit,
};
use crate::{
    proxy::metrics::{DenialReason, Edge, Metrics, Principals},
    state::SnapshotRx,
};

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
    /// Each new policy, against which the connections it admitted are checked again.
    pub snapshots: SnapshotRx,
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

    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let Ok(pod) = client.local_addr() else {
            return;
        };
        if pod.port() == hbone::PORT {
            // With mesh identities, tunnels from other nodes are served.
            if let Some(mesh) = self.http.mesh().cloned() {
                // Boxed, as HTTP is: the TLS and HTTP/2 state stays out of plain connections'
                // tasks.
                return Box::pin(self.serve_tunnels(client, pod, peer, &mesh)).await;
            }
        }
        let (edge, protocol, identity, admitted) = {
            let table = self.routes.load();
            let destination = table.pod(pod.ip());
            let edge = Edge::inbound(&table.pod(peer.ip()), &destination);
            // A client that is an enrolled pod of this node (over the bridge, in plain text)
            // is known by its identity, as it is when it calls through a Service.
            let identity = table.local(peer.ip()).and_then(|p| p.identity.clone());
            let admitted = match table.local(pod.ip()) {
                Some(local) => local
                    .inbound
                    .admits(identity.as_deref())
                    .inspect_err(|denied| {
                        let reason = DenialReason::of(denied);
                        self.metrics
                            .denied(reason, identity.as_deref(), &local.workload);
                    }),
                None => Ok(()),
            };
            (edge, table.endpoint_protocol(&pod), identity, admitted)
        };
        let detected = read_as(protocol, &client, self.detect_timeout).await;
        if let Err(denied) = admitted {
            debug!(%peer, %pod, %denied, "refused a plain-text connection");
            return match detected {
                Detected::Http => {
                    Box::pin(self.http.refuse(client, peer, pod, denied.to_string())).await
                }
                Detected::Opaque => drop(client.set_zero_linger()),
            };
        }
        let served = async {
            match detected {
                // Boxed, as outbound: opaque connections' tasks stay small.
                Detected::Http => {
                    Box::pin(self.http.clone().serve_inbound(client, pod, peer)).await
                }
                Detected::Opaque => {
                    super::splice(client, pod, self.mark, self.relay(peer, &edge)).await
                }
            }
        };
        tokio::select! {
            () = served => {}
            () = self.revoked(pod.ip(), identity.as_deref()) => {
                debug!(%peer, %pod, "a plain-text connection closed: the pod's policy no longer admits it");
            }
        }
    }

    /// Resolves once a new policy no longer admits `peer` (None: plain text) to the pod at
    /// `pod`: a connection admitted under an earlier policy ends then, as ztunnel closes the
    /// connections a new authorization policy denies. The denial is counted.
    async fn revoked(&self, pod: IpAddr, peer: Option<&Identity>) {
        let mut snapshots = self.snapshots.clone();
        snapshots.borrow_and_update();
        while snapshots.changed().await.is_ok() {
            let routes = snapshots.borrow_and_update().routes.clone();
            let Some(local) = routes.local(pod) else {
                continue;
            };
            if let Err(denied) = local.inbound.admits(peer) {
                self.metrics
                    .denied(DenialReason::of(&denied), peer, &local.workload);
                return;
            }
        }
        std::future::pending().await
    }

    /// Serves the tunnels of one mutual-TLS connection to the pod at `local`, presenting the
    /// pod's identity.
    async fn serve_tunnels(
        self: Arc<Self>,
        client: TcpStream,
        local: SocketAddr,
        peer: SocketAddr,
        mesh: &Mesh,
    ) {
        let pod = self.routes.load().local(local.ip()).cloned();
        let tls = match pod.as_deref().and_then(|pod| pod.identity.clone()) {
            Some(identity) => mesh.server(&identity).map(|tls| (identity, tls)),
            None => {
                debug!(%peer, %local, "refused a tunnel connection: no enrolled pod with an identity there");
                let _ = client.set_zero_linger();
                return;
            }
        };
        let (destination, tls) = match tls {
            Ok(tls) => tls,
            Err(error) => {
                debug!(%peer, %local, %error, "refused a tunnel connection");
                let _ = client.set_zero_linger();
                return;
            }
        };
        let admission = Arc::new(Admission {
            pod: local.ip(),
            routes: self.routes.clone(),
            metrics: self.metrics.clone(),
        });
        let drain = self.http.drain().clone();
        let shutdown = async move {
            drain.started().await;
        };
        let deliver = move |accepted: Accepted, tunnel: Tunnel| {
            let (this, destination) = (self.clone(), destination.clone());
            async move { this.deliver(accepted, &destination, tunnel).await }
        };
        if let Err(error) = hbone::serve(client, tls, admission, deliver, shutdown).await {
            debug!(%peer, %local, %error, "a tunnel connection ended with an error");
        }
    }

    /// Delivers an admitted tunnel to its pod, as a plain connection would be.
    async fn deliver(&self, accepted: Accepted, destination: &Identity, mut tunnel: Tunnel) {
        let Accepted {
            peer,
            source,
            target,
            carries,
        } = accepted;
        let principals = Arc::new(Principals {
            source: peer,
            destination: destination.clone(),
        });
        let (edge, protocol) = {
            let table = self.routes.load();
            let edge = Edge::inbound(&table.pod(source.ip()), &table.pod(target.ip()));
            (
                edge.over_mtls(&principals),
                table.endpoint_protocol(&target),
            )
        };
        let peer = principals.source.clone();
        let served = async {
            // What the source's agent decided stands where this pod's port declares nothing.
            let (detected, read) = match (protocol, carries) {
                (AppProtocol::Detect, Some(carried)) => (carried, Bytes::new()),
                _ => read_to_detect(protocol, &mut tunnel, self.detect_timeout).await,
            };
            let tunnel = Rewind::new(read, tunnel);
            match detected {
                Detected::Http => {
                    let http = self.http.clone();
                    Box::pin(http.serve_tunnel(tunnel, target, source, Some(principals))).await
                }
                Detected::Opaque => match connect_marked(target, self.mark).await {
                    Ok(upstream) => {
                        let relay = self.relay(source, &edge);
                        relay.run_in_place(tunnel, upstream, Some(target)).await
                    }
                    Err(error) => debug!(%source, %target, %error, "delivering a tunnel failed"),
                },
            }
        };
        tokio::select! {
            () = served => {}
            () = self.revoked(target.ip(), Some(&peer)) => {
                debug!(%source, %target, %peer, "a tunnel closed: the pod's policy no longer admits its source");
            }
        }
    }

    fn relay<'a>(&'a self, peer: SocketAddr, edge: &'a Edge) -> super::Relay<'a> {
        super::Relay {
            peer,
            idle_timeout: self.http.config().idle_timeout,
            metrics: &self.metrics,
            edge: Some(edge),
            drain: self.http.drain(),
        }
    }
}

/// Whom a tunnel to the pod at `pod` may come from: its `allow-from`, as the table in force
/// has it when the tunnel is asked for.
struct Admission {
    pod: IpAddr,
    routes: Arc<ArcSwap<RouteTable>>,
    metrics: Arc<Metrics>,
}

impl hbone::Admit for Admission {
    fn admit(&self, peer: &Identity, target: SocketAddr) -> Result<(), String> {
        // The certificate presented was this pod's: a tunnel goes to this pod only.
        if target.ip().to_canonical() != self.pod.to_canonical() || target.port() == hbone::PORT {
            return Err(format!("this connection serves {}, not {target}", self.pod));
        }
        let table = self.routes.load();
        let Some(pod) = table.local(self.pod) else {
            return Err(format!("{} is no enrolled pod of this node", self.pod));
        };
        pod.inbound.admits(Some(peer)).map_err(|denied| {
            self.metrics
                .denied(DenialReason::of(&denied), Some(peer), &pod.workload);
            denied.to_string()
        })
    }
}
