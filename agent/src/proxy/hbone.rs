//! HBONE, as Istio's ztunnel speaks it: a TCP stream carried to another node's agent as an
//! HTTP/2 CONNECT over mutual TLS on port 15008, the target pod's address as the authority.
//! The client's certificate names the source workload, the server's the destination's.

use std::{future::Future, net::SocketAddr, sync::Arc};

use aviary_identity::{spiffe::Identity, tls::peer_identity};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{body::Incoming, service::service_fn, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The port agents accept tunnels on (Istio's HBONE port).
pub const PORT: u16 = 15008;
/// The header in which a refusing agent says why (HTTP clients get it as a 403's body).
pub const DENY_REASON: &str = "aviary-deny-reason";

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

/// Opens a tunnel over `tcp` (connected to the destination's agent) from the pod at `source`
/// to `target`, with `tls` (the source pod's certificate, and whom it expects at the other
/// end). Returns the tunnel with the identity the destination proved.
pub async fn connect(
    tcp: TcpStream,
    source: SocketAddr,
    target: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(Tunnel, Identity), Error> {
    let peer = tcp.peer_addr().map_err(|error| Error::Tls {
        peer: target,
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
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|error| Error::Http { peer, error })?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header(http::header::FORWARDED, format!("for=\"{source}\""))
        .body(Empty::<Bytes>::new())
        .expect("a valid CONNECT");
    let response = sender
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
    Ok((TokioIo::new(upgraded), proven))
}

/// What a destination agent does with a tunnel: Ok to accept it (the stream then goes to
/// `deliver`), or the reason it is refused.
pub trait Admit: Send + Sync + 'static {
    fn admit(&self, peer: &Identity, target: SocketAddr) -> Result<(), String>;
}

/// Serves the tunnels of one mutual-TLS connection accepted on [`PORT`].
pub async fn serve<D, F>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    admit: Arc<dyn Admit>,
    deliver: D,
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
            };
            tokio::spawn(async move {
                if let Ok(upgraded) = hyper::upgrade::on(request).await {
                    deliver(accepted, TokioIo::new(upgraded)).await;
                }
            });
            Ok(Response::new(Empty::<Bytes>::new()))
        }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await
        .map_err(|error| Error::Http {
            peer: peer_addr,
            error,
        })
}

/// The address in a `Forwarded: for="ip:port"` header, as [`connect`] writes it.
fn forwarded_for(headers: &http::HeaderMap) -> Option<SocketAddr> {
    let value = headers.get(http::header::FORWARDED)?.to_str().ok()?;
    let quoted = value.trim().strip_prefix("for=")?;
    quoted.trim_matches('"').parse().ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aviary_identity::{
        ca::Authority,
        credentials::{Credentials, KeyRequest},
        tls::{client_config, server_config, TrustBundle},
    };
    use time::OffsetDateTime;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
        sync::mpsc,
    };

    use super::*;

    fn issue(ca: &Authority, identity: &Identity) -> Credentials {
        let request = KeyRequest::new(identity).unwrap();
        let leaf = ca
            .sign_workload(
                request.csr_pem(),
                identity,
                OffsetDateTime::now_utc(),
                Duration::from_secs(3600),
            )
            .unwrap();
        request
            .complete(&format!("{leaf}{}", ca.certificate_pem()))
            .unwrap()
    }

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
        let server_tls = Arc::new(server_config(&issue(&ca, &payments), &bundle).unwrap());

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
                ));
            }
        });
        let target: SocketAddr = "10.244.2.7:8080".parse().unwrap();
        let source: SocketAddr = "10.244.1.3:40000".parse().unwrap();

        let tls =
            Arc::new(client_config(&issue(&ca, &checkout), &bundle, payments.clone()).unwrap());
        let (mut tunnel, proven) = connect(
            TcpStream::connect(agent).await.unwrap(),
            source,
            target,
            tls,
        )
        .await
        .unwrap();
        assert_eq!(proven, payments);
        tunnel.write_all(b"hello").await.unwrap();
        let mut echoed = [0u8; 5];
        tunnel.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"hello");
        let accepted = Accepted {
            peer: checkout,
            source,
            target,
        };
        assert_eq!(delivered.recv().await.unwrap(), accepted);

        // Another caller is refused, with the destination's reason.
        let tls = Arc::new(client_config(&issue(&ca, &audit), &bundle, payments).unwrap());
        let err = connect(
            TcpStream::connect(agent).await.unwrap(),
            source,
            target,
            tls,
        )
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
