//! HBONE, as Istio's ztunnel speaks it: a TCP stream carried to another node's agent as an
//! HTTP/2 CONNECT over mutual TLS on port 15008, the target pod's address as the authority.
//! The client's certificate names the source workload, the server's the destination's.

use std::{future::Future, net::SocketAddr, sync::Arc};

use aviary_identity::{spiffe::Identity, tls::peer_identity};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{
    body::Incoming, client::conn::http2::SendRequest, service::service_fn, upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::detect::Detected;

/// The port agents accept tunnels on (Istio's HBONE port).
pub const PORT: u16 = 15008;
/// The header in which a refusing agent says why (HTTP clients get it as a 403's body).
pub const DENY_REASON: &str = "aviary-deny-reason";
/// The header in which the source's agent says what the tunnel carries (`http` or `opaque`),
/// as it decided it for the client: the destination need not guess from the first bytes
/// within its detection timeout, which a tunnel's first bytes (sent only once the CONNECT's
/// answer is back at the source) can miss on a busy node.
pub const CARRIES: &str = "aviary-carries";
/// Connections between agents are pinged this often, idle or not, and closed when a ping goes
/// unanswered as long: a dead one leaves the pool before a tunnel finds it.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(20);

/// A tunnel's stream, as the proxy copies it.
pub type Tunnel = TokioIo<Upgraded>;

/// What a destination agent learns of an accepted tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The identity the source agent proved for its pod.
    pub peer: Identity,
    /// The source pod's address, as the source agent says it in `Forwarded` (the tunnel's
    /// TCP connection comes from its node); the node's address if it does not.
    pub source: SocketAddr,
    /// The pod (address and port) the tunnel is for.
    pub target: SocketAddr,
    /// What the source's agent says the tunnel carries, if it says.
    pub carries: Option<Detected>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mutual TLS with {peer}: {error}")]
    Tls {
        peer: SocketAddr,
        error: std::io::Error,
    },
    #[error("HTTP/2 with {peer}: {error}")]
    Http {
        peer: SocketAddr,
        error: hyper::Error,
    },
    #[error("{peer} refused the tunnel to {target} ({status}){}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Refused {
        peer: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
        reason: Option<String>,
    },
}

/// An HTTP/2 connection over mutual TLS to another node's agent, as one of this node's pods:
/// each tunnel is one CONNECT stream of it, so that a new connection of the pod costs a round
/// trip, not a handshake (ztunnel pools its connections alike). Clones share the connection.
#[derive(Clone)]
pub struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    peer: SocketAddr,
    /// The identity the destination's agent proved.
    proven: Identity,
}

impl Connection {
    /// The handshakes over `tcp` (connected to the destination's agent), with `tls`: the
    /// source pod's certificate, and whom it expects at the other end.
    pub async fn open(tcp: TcpStream, tls: Arc<rustls::ClientConfig>) -> Result<Self, Error> {
        let peer = tcp.peer_addr().map_err(|error| Error::Tls {
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
            error,
        })?;
        let stream = TlsConnector::from(tls)
            .connect(ServerName::IpAddress(peer.ip().into()), tcp)
            .await
            .map_err(|error| Error::Tls { peer, error })?;
        let proven = peer_identity(stream.get_ref().1).ok_or_else(|| Error::Tls {
            peer,
            error: std::io::Error::other("the peer proved no identity"),
        })?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| Error::Http { peer, error })?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            peer,
            proven,
        })
    }

    /// Whether it can carry no more tunnels.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    pub fn proven(&self) -> &Identity {
        &self.proven
    }

    /// A tunnel from the pod at `source` to `target`, carrying `carries`.
    pub async fn tunnel(
        &self,
        source: SocketAddr,
        target: SocketAddr,
        carries: Detected,
    ) -> Result<Tunnel, Error> {
        let peer = self.peer;
        let carried = match carries {
            Detected::Http => "http",
            Detected::Opaque => "opaque",
        };
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(http::header::FORWARDED, format!("for=\"{source}\""))
            .header(CARRIES, carried)
            .body(Empty::<Bytes>::new())
            .expect("a valid CONNECT");
        let response = self
            .sender
            .clone()
            .send_request(request)
            .await
            .map_err(|error| Error::Http { peer, error })?;
        if response.status() != StatusCode::OK {
            return Err(Error::Refused {
                peer,
                target,
                status: response.status(),
                reason: response
                    .headers()
                    .get(DENY_REASON)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|error| Error::Http { peer, error })?;
        Ok(TokioIo::new(upgraded))
    }
}

/// What a destination agent does with a tunnel: Ok to accept it (the stream then goes to
/// `deliver`), or the reason it is refused.
pub trait Admit: Send + Sync + 'static {
    fn admit(&self, peer: &Identity, target: SocketAddr) -> Result<(), String>;
}

/// Serves the tunnels of one mutual-TLS connection accepted on [`PORT`]. Once `shutdown`
/// resolves (the agent drains), it takes no new tunnel (GOAWAY: the source opens its next
/// ones on a new connection, to the successor), and ends when the open ones have.
pub async fn serve<D, F>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    admit: Arc<dyn Admit>,
    deliver: D,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error>
where
    D: Fn(Accepted, Tunnel) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let peer_addr = tcp.peer_addr().map_err(|error| Error::Tls {
        peer: SocketAddr::from(([0, 0, 0, 0], 0)),
        error,
    })?;
    let stream = TlsAcceptor::from(tls)
        .accept(tcp)
        .await
        .map_err(|error| Error::Tls {
            peer: peer_addr,
            error,
        })?;
    // The handshake verified the chain; the identity it names is the caller's.
    let Some(peer) = peer_identity(stream.get_ref().1) else {
        return Ok(());
    };
    let service = service_fn(move |request: Request<Incoming>| {
        let (peer, admit, deliver) = (peer.clone(), admit.clone(), deliver.clone());
        async move {
            let refuse = |status: StatusCode, reason: String| {
                Response::builder()
                    .status(status)
                    .header(DENY_REASON, reason)
                    .body(Empty::<Bytes>::new())
                    .expect("a valid response")
            };
            if request.method() != Method::CONNECT {
                return Ok::<_, std::convert::Infallible>(refuse(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "HBONE carries CONNECT only".into(),
                ));
            }
            let Some(target) = request
                .uri()
                .authority()
                .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
            else {
                return Ok(refuse(
                    StatusCode::BAD_REQUEST,
                    "the authority is not a pod's ip:port".into(),
                ));
            };
            if let Err(reason) = admit.admit(&peer, target) {
                return Ok(refuse(StatusCode::FORBIDDEN, reason));
            }
            let accepted = Accepted {
                peer,
                source: forwarded_for(request.headers()).unwrap_or(peer_addr),
                target,
                carries: carried(request.headers()),
            };
            tokio::spawn(async move {
                if let Ok(upgraded) = hyper::upgrade::on(request).await {
                    deliver(accepted, TokioIo::new(upgraded)).await;
                }
            });
            Ok(Response::new(Empty::<Bytes>::new()))
        }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = shutdown => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    served.map_err(|error| Error::Http {
        peer: peer_addr,
        error,
    })
}

/// What the source's agent says the tunnel carries; anything else says nothing.
fn carried(headers: &http::HeaderMap) -> Option<Detected> {
    match headers.get(CARRIES)?.as_bytes() {
        b"http" => Some(Detected::Http),
        b"opaque" => Some(Detected::Opaque),
        _ => None,
    }
}

/// The address in a `Forwarded: for="ip:port"` header, as [`connect`] writes it.
fn forwarded_for(headers: &http::HeaderMap) -> Option<SocketAddr> {
    let value = headers.get(http::header::FORWARDED)?.to_str().ok()?;
    let quoted = value.trim().strip_prefix("for=")?;
    quoted.trim_matches('"').parse().ok()
}

#[cfg(test)]
mod tests {
    use aviary_identity::{
        ca::Authority,
        tls::{client_config, server_config, TrustBundle},
    };
    use time::OffsetDateTime;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
        sync::mpsc,
    };

    use super::*;
    use crate::identity::Certificates;

    /// Admits only `shop/checkout`.
    struct OnlyCheckout;

    impl Admit for OnlyCheckout {
        fn admit(&self, peer: &Identity, _target: SocketAddr) -> Result<(), String> {
            if peer.service_account == "checkout" {
                Ok(())
            } else {
                Err(format!("{peer} may not connect"))
            }
        }
    }

    #[tokio::test]
    async fn a_tunnel_carries_bytes_to_the_target_and_names_both_ends() {
        let ca = Authority::generate("cluster.local", OffsetDateTime::now_utc()).unwrap();
        let bundle = TrustBundle::from_pem(ca.certificate_pem(), "cluster.local").unwrap();
        let checkout: Identity = "spiffe://cluster.local/ns/shop/sa/checkout"
            .parse()
            .unwrap();
        let audit: Identity = "spiffe://cluster.local/ns/shop/sa/audit".parse().unwrap();
        let payments: Identity = "spiffe://cluster.local/ns/shop/sa/payments"
            .parse()
            .unwrap();
        let server_tls =
            Arc::new(server_config(&Certificates::issue(&ca, &payments), &bundle).unwrap());

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = listener.local_addr().unwrap();
        let (delivered_tx, mut delivered) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let delivered_tx = delivered_tx.clone();
                // The destination echoes what the tunnel carries.
                let deliver = move |accepted: Accepted, mut tunnel: Tunnel| {
                    let delivered_tx = delivered_tx.clone();
                    async move {
                        delivered_tx.send(accepted).unwrap();
                        let mut buf = [0u8; 5];
                        tunnel.read_exact(&mut buf).await.unwrap();
                        tunnel.write_all(&buf).await.unwrap();
                        tunnel.flush().await.unwrap();
                    }
                };
                tokio::spawn(serve(
                    tcp,
                    server_tls.clone(),
                    Arc::new(OnlyCheckout),
                    deliver,
                    std::future::pending(),
                ));
            }
        });
        let target: SocketAddr = "10.244.2.7:8080".parse().unwrap();
        let source: SocketAddr = "10.244.1.3:40000".parse().unwrap();

        let tls = Arc::new(
            client_config(
                &Certificates::issue(&ca, &checkout),
                &bundle,
                payments.clone(),
            )
            .unwrap(),
        );
        let connection = Connection::open(TcpStream::connect(agent).await.unwrap(), tls)
            .await
            .unwrap();
        assert_eq!(connection.proven(), &payments);
        let mut tunnel = connection
            .tunnel(source, target, Detected::Http)
            .await
            .unwrap();
        tunnel.write_all(b"hello").await.unwrap();
        let mut echoed = [0u8; 5];
        tunnel.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"hello");
        let accepted = Accepted {
            peer: checkout,
            source,
            target,
            carries: Some(Detected::Http),
        };
        assert_eq!(delivered.recv().await.unwrap(), accepted);
        // The connection carries further tunnels.
        let mut second = connection
            .tunnel(source, target, Detected::Opaque)
            .await
            .unwrap();
        second.write_all(b"again").await.unwrap();
        second.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"again");
        let carries = delivered.recv().await.unwrap().carries;
        assert_eq!(carries, Some(Detected::Opaque));

        // Another caller is refused, with the destination's reason.
        let tls =
            Arc::new(client_config(&Certificates::issue(&ca, &audit), &bundle, payments).unwrap());
        let connection = Connection::open(TcpStream::connect(agent).await.unwrap(), tls)
            .await
            .unwrap();
        let err = connection
            .tunnel(source, target, Detected::Http)
            .await
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "{agent} refused the tunnel to {target} (403 Forbidden): \
                 spiffe://cluster.local/ns/shop/sa/audit may not connect"
            )
        );
    }
}
