//! HTTP/1.1 upgrades (WebSocket and the like): asked of the backend, then both connections
//! joined byte for byte.

use std::net::SocketAddr;

use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;

use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use super::{Http1Io, HttpProxy};
use crate::proxy::{
    pool::{Connection, ProxyBody},
    Relay,
};

/// An HTTP/1.1 upgrade (WebSocket, say) a client asked for. It is passed on to the backend, and
/// once the backend agrees (101), the two connections are joined byte for byte.
pub(super) struct Upgrade {
    protocol: HeaderValue,
    client: OnUpgrade,
}

impl Upgrade {
    /// The upgrade `req` asks for (`Connection: upgrade` with `Upgrade`), if any.
    pub(super) fn take(req: &mut Request<Incoming>) -> Option<Self> {
        let headers = req.headers();
        let protocol = headers.get(header::UPGRADE)?;
        let asked = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
        let protocol = asked.then(|| protocol.clone())?;
        Some(Self {
            protocol,
            client: hyper::upgrade::on(req),
        })
    }

    /// Asks the backend for the upgrade (hop-by-hop removal took the client's own headers).
    pub(super) fn ask(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
    }

    /// Joins the connections when the backend agreed; returns whether it did. The 101 keeps its
    /// Connection and Upgrade headers, which the client needs. Once joined, the connection is
    /// an opaque relay, which a drain can hand over (unless it goes through a tunnel).
    pub(super) fn join(
        self,
        response: &mut Response<ProxyBody>,
        proxy: &HttpProxy,
        peer: SocketAddr,
    ) -> bool {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return false;
        }
        let backend = hyper::upgrade::on(response);
        let (metrics, drain, idle_timeout) = (
            proxy.metrics.clone(),
            proxy.drain.clone(),
            proxy.cfg.idle_timeout,
        );
        let tracked = drain.track();
        tokio::spawn(async move {
            let _tracked = tracked;
            let (Ok(client), Ok(backend)) = (self.client.await, backend.await) else {
                return;
            };
            let relay = Relay {
                peer,
                idle_timeout,
                metrics: &metrics,
                edge: None,
                drain: &drain,
            };
            // A client that is not a TCP connection of this agent's (a tunnel's stream, or the
            // fuzz targets' in-memory connection) cannot move: its bytes are copied here.
            let client = match client.downcast::<Http1Io<TcpStream>>() {
                Ok(client) => client,
                Err(client) => {
                    let (client, backend) = (TokioIo::new(client), TokioIo::new(backend));
                    return relay.run_in_place(client, backend, None).await;
                }
            };
            let Ok(backend) = backend.downcast::<TokioIo<Connection>>() else {
                return;
            };
            let (rest, mut client_stream) = client
                .io
                .into_inner()
                .into_inner()
                .into_inner()
                .into_parts();
            let mut backend_stream = backend.io.into_inner();
            // What either side sent past the upgrade, read already, goes first.
            let early = async {
                backend_stream.write_all(&client.read_buf).await?;
                backend_stream.write_all(&rest).await?;
                client_stream.write_all(&backend.read_buf).await
            };
            if early.await.is_err() {
                return;
            }
            match backend_stream {
                Connection::Direct(backend) => relay.run(client_stream, backend).await,
                // A tunnel's TLS state cannot move either.
                Connection::Tunnel(tunnel) => relay.run_in_place(client_stream, tunnel, None).await,
            }
        });
        true
    }
}
