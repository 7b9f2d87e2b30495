//! Mutual TLS between nodes: the certificate each end of a tunnel presents, and whom it
//! accepts at the other end. A source agent presents its pod's identity and expects exactly
//! the destination pod's (its service account, as the pod's node's agent publishes it); a
//! destination agent presents its pod's identity and accepts any identity of the trust domain,
//! which the pod's `allow-from` then judges.

use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aviary_identity::{
    credentials::Credentials,
    spiffe::Identity,
    tls::{client_config, server_config, TrustBundle},
};
use rustls::ServerConfig;

use crate::table::RouteTable;

use super::{
    detect::Detected,
    hbone::{self, Tunnel},
};
use crate::{
    identity::Certificates,
    proxy::metrics::{Principals, ProxyError},
};

/// Why a tunnel cannot be made or accepted now.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("no certificate for {0} yet (the agent's /ready says why)")]
    NoCertificate(Identity),
    #[error("no trust bundle yet (the agent's /ready says why)")]
    NoBundle,
    #[error("TLS configuration: {0}")]
    Tls(#[from] aviary_identity::tls::Error),
}

/// Why a tunnel was not opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error("connecting to {agent}, the destination's agent, failed: {error}")]
    Connect { agent: SocketAddr, error: io::Error },
    #[error("no tunnel through {agent}, the destination's agent, within {within:?} of connecting")]
    TimedOut { agent: SocketAddr, within: Duration },
    #[error(transparent)]
    Hbone(#[from] hbone::Error),
}

impl TunnelError {
    /// Why the request that needed the tunnel is answered by the proxy.
    pub fn reason(&self) -> ProxyError {
        match self {
            Self::Unavailable(Unavailable::Tls(_)) => ProxyError::tunnel_failed,
            Self::Unavailable(_) => ProxyError::no_identity,
            Self::Connect { error, .. } if error.kind() == io::ErrorKind::TimedOut => {
                ProxyError::connect_timeout
            }
            Self::Connect { .. } => ProxyError::connect_failed,
            Self::TimedOut { .. } => ProxyError::tunnel_timeout,
            Self::Hbone(hbone::Error::Refused { .. }) => ProxyError::forbidden,
            Self::Hbone(_) => ProxyError::tunnel_failed,
        }
    }

    /// The destination's agent refused the tunnel: the reason it gave, which the client is
    /// told. Nothing reached the pod, and the endpoint is not at fault.
    pub fn refusal(&self) -> Option<String> {
        match self {
            Self::Hbone(hbone::Error::Refused { reason, status, .. }) => Some(
                reason
                    .clone()
                    .unwrap_or_else(|| format!("the destination's agent answered {status}")),
            ),
            _ => None,
        }
    }
}

/// A pod of this node as the source of tunnels: its address, which the destination's agent
/// is told, and the identity it proves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TunnelFrom {
    pub source: SocketAddr,
    pub identity: Arc<Identity>,
}

impl TunnelFrom {
    /// The client at `client` as a source of tunnels: an enrolled pod of this node with an
    /// identity in `table`.
    pub fn of(table: &RouteTable, client: SocketAddr) -> Option<Self> {
        let identity = table.local(client.ip())?.identity.clone()?;
        Some(Self {
            source: client,
            identity,
        })
    }
}

/// How long a [`Mesh`] waits for a tunnel's parts, and keeps an idle connection.
#[derive(Debug, Clone, Copy)]
pub struct MeshTimeouts {
    /// The TCP connect to the destination's agent.
    pub connect: Duration,
    /// The TLS and HTTP/2 handshakes and the CONNECT after it.
    pub handshake: Duration,
    /// A pooled connection no tunnel used for this long is let go.
    pub idle: Duration,
}

/// The node's mesh identities, as its agent's certificates give them, and the connections to
/// other nodes' agents made with them.
pub struct Mesh {
    certificates: Arc<Certificates>,
    /// The proxy's socket mark, which the capture programs skip.
    mark: u32,
    /// Connecting to the destination's agent takes at most this long, as any connect.
    connect_timeout: Duration,
    /// The TLS and HTTP/2 handshakes and the CONNECT then take at most this long: on a busy
    /// or slow node they take several times a connect's round trip.
    handshake_timeout: Duration,
    /// A pooled connection no tunnel used for this long is let go.
    idle_timeout: Duration,
    /// The accepting end of each identity, made again when its certificate is: kept so that
    /// a returning client resumes its TLS session.
    servers: Mutex<HashMap<Identity, Made<ServerConfig>>>,
}

/// A TLS configuration, and the certificate and trust bundle it was made with.
struct Made<T> {
    credentials: Arc<Credentials>,
    bundle: Arc<TrustBundle>,
    config: Arc<T>,
}

impl<T> Made<T> {
    fn current(&self, credentials: &Arc<Credentials>, bundle: &Arc<TrustBundle>) -> bool {
        Arc::ptr_eq(&self.credentials, credentials) && Arc::ptr_eq(&self.bundle, bundle)
    }
}

/// A pooled connection's key: the source's identity, the destination pod's address and the
/// identity its agent proved as the pod.
type PoolKey = (Arc<Identity>, IpAddr, Arc<Identity>);

/// A connection to another node's agent, with the certificate it presented.
struct Pooled {
    credentials: Arc<Credentials>,
    connection: hbone::Connection,
    used: Instant,
}

thread_local! {
    /// Each worker's connections to other nodes' agents, as its HTTP pools are its own.
    static POOL: RefCell<HashMap<PoolKey, Pooled>> = RefCell::default();
}

impl Mesh {
    pub fn new(certificates: Arc<Certificates>, mark: u32, timeouts: MeshTimeouts) -> Self {
        Self {
            certificates,
            mark,
            connect_timeout: timeouts.connect,
            handshake_timeout: timeouts.handshake,
            idle_timeout: timeouts.idle,
            servers: Mutex::default(),
        }
    }

    /// Opens a tunnel from `from` to the pod at `target`, as `server`, through the agent of
    /// its node (at the pod's address, on [`hbone::PORT`]): on this worker's connection there
    /// as `from`'s identity, or on a new one. A connection made with a certificate since
    /// renewed carries no new tunnel. `carries` tells the destination what the tunnel carries.
    /// Returns the tunnel with the identities both ends proved.
    pub async fn tunnel(
        &self,
        from: &TunnelFrom,
        target: SocketAddr,
        server: &Arc<Identity>,
        carries: Detected,
    ) -> Result<(Tunnel, Arc<Principals>), TunnelError> {
        let (credentials, bundle) = self.held(&from.identity)?;
        let key = (from.identity.clone(), target.ip(), server.clone());
        let agent = SocketAddr::new(target.ip(), hbone::PORT);
        let pooled = POOL.with_borrow_mut(|pool| {
            let pooled = pool.get_mut(&key).filter(|p| {
                Arc::ptr_eq(&p.credentials, &credentials) && !p.connection.is_closed()
            })?;
            pooled.used = Instant::now();
            Some(pooled.connection.clone())
        });
        // A pooled connection that closed just now gives way to a new one.
        if let Some(connection) = pooled {
            match self
                .within(agent, connection.tunnel(from.source, target, carries))
                .await
            {
                Ok(tunnel) => return Ok(Self::opened(from, tunnel, &connection)),
                Err(TunnelError::Hbone(hbone::Error::Http { .. })) => {}
                Err(failed) => return Err(failed),
            }
        }
        let tls = Arc::new(
            client_config(&credentials, &bundle, Identity::clone(server))
                .map_err(Unavailable::from)?,
        );
        // The connect has the budget of any connect; the handshakes and the CONNECT, several
        // round trips and the signatures of both ends, have their own.
        let tcp = super::connect_within(agent, self.mark, self.connect_timeout)
            .await
            .map_err(|error| TunnelError::Connect { agent, error })?;
        let (connection, tunnel) = self
            .within(agent, async {
                let connection = hbone::Connection::open(tcp, tls).await?;
                let pooled = Pooled {
                    credentials: credentials.clone(),
                    connection: connection.clone(),
                    used: Instant::now(),
                };
                POOL.with_borrow_mut(|pool| pool.insert(key.clone(), pooled));
                let tunnel = connection.tunnel(from.source, target, carries).await?;
                Ok::<_, TunnelError>((connection, tunnel))
            })
            .await?;
        Ok(Self::opened(from, tunnel, &connection))
    }

    /// What `opening` gives, if it gives it within the handshake timeout.
    async fn within<T, E: Into<TunnelError>>(
        &self,
        agent: SocketAddr,
        opening: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, TunnelError> {
        match tokio::time::timeout(self.handshake_timeout, opening).await {
            Ok(opened) => opened.map_err(Into::into),
            Err(_) => Err(TunnelError::TimedOut {
                agent,
                within: self.handshake_timeout,
            }),
        }
    }

    /// A tunnel opened on `connection`, with the identities its ends proved.
    fn opened(
        from: &TunnelFrom,
        tunnel: Tunnel,
        connection: &hbone::Connection,
    ) -> (Tunnel, Arc<Principals>) {
        let principals = Principals {
            source: (*from.identity).clone(),
            destination: connection.proven().clone(),
        };
        (tunnel, Arc::new(principals))
    }

    /// Lets go of this worker's connections that closed or idled past the timeout (one whose
    /// tunnels are still open closes once they do).
    pub fn reap(&self) {
        let timeout = self.idle_timeout;
        POOL.with_borrow_mut(|pool| {
            pool.retain(|_, p| !p.connection.is_closed() && p.used.elapsed() < timeout)
        });
    }

    /// The accepting end, as the pod `destination`.
    pub fn server(&self, destination: &Identity) -> Result<Arc<ServerConfig>, Unavailable> {
        let (credentials, bundle) = self.held(destination)?;
        let mut servers = self.servers.lock().expect("not poisoned");
        if let Some(made) = servers.get(destination) {
            if made.current(&credentials, &bundle) {
                return Ok(made.config.clone());
            }
        }
        let config = Arc::new(server_config(&credentials, &bundle)?);
        // Those of identities no longer held go with the next change.
        servers.retain(|identity, _| self.certificates.get(identity).is_some());
        let made = Made {
            credentials,
            bundle,
            config: config.clone(),
        };
        servers.insert(destination.clone(), made);
        Ok(config)
    }

    fn held(
        &self,
        identity: &Identity,
    ) -> Result<(Arc<Credentials>, Arc<TrustBundle>), Unavailable> {
        let credentials = self
            .certificates
            .get(identity)
            .ok_or_else(|| Unavailable::NoCertificate(identity.clone()))?;
        let bundle = self.certificates.bundle().ok_or(Unavailable::NoBundle)?;
        Ok((credentials, bundle))
    }
}

#[cfg(test)]
mod tests {
    use aviary_identity::{ca::Authority, tls::TrustBundle};
    use time::OffsetDateTime;
    use tokio::net::TcpListener;

    use super::*;

    fn id(text: &str) -> Arc<Identity> {
        Arc::new(text.parse().unwrap())
    }

    /// A tunnel's connect and its handshakes fail each in its own time, and say which: a slow
    /// handshake is not taken for a connect that got no answer.
    #[tokio::test]
    async fn the_connect_and_the_handshakes_have_budgets_and_reasons_of_their_own() {
        let ca = Authority::generate("cluster.local", OffsetDateTime::now_utc()).unwrap();
        let bundle = TrustBundle::from_pem(ca.certificate_pem(), "cluster.local").unwrap();
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let payments = id("spiffe://cluster.local/ns/shop/sa/payments");
        let certificates = Certificates::holding(vec![Certificates::issue(&ca, &web)], bundle);
        let timeouts = MeshTimeouts {
            connect: Duration::from_millis(100),
            handshake: Duration::from_millis(400),
            idle: Duration::from_secs(60),
        };
        let mesh = Mesh::new(Arc::new(certificates), 0, timeouts);
        let from = TunnelFrom {
            source: "127.13.0.1:40000".parse().unwrap(),
            identity: web.clone(),
        };

        // An agent that accepts and never says a word: the connect is made at once, and the
        // handshake runs out of its own time.
        let silent = TcpListener::bind(("127.13.0.8", hbone::PORT))
            .await
            .unwrap();
        let held = tokio::spawn(async move {
            let mut accepted = Vec::new();
            while let Ok((tcp, _)) = silent.accept().await {
                accepted.push(tcp);
            }
        });
        let start = Instant::now();
        let target = "127.13.0.8:8080".parse().unwrap();
        let failed = mesh
            .tunnel(&from, target, &payments, Detected::Http)
            .await
            .err()
            .unwrap();
        let waited = start.elapsed();
        assert_eq!(failed.reason(), ProxyError::tunnel_timeout, "{failed}");
        assert!(
            waited >= timeouts.handshake && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        held.abort();

        // Nobody at the agent's port.
        let target = "127.13.0.9:8080".parse().unwrap();
        let failed = mesh
            .tunnel(&from, target, &payments, Detected::Http)
            .await
            .err()
            .unwrap();
        assert_eq!(failed.reason(), ProxyError::connect_failed, "{failed}");

        // A source whose certificate is not there yet.
        let audit = TunnelFrom {
            identity: id("spiffe://cluster.local/ns/shop/sa/audit"),
            ..from
        };
        let failed = mesh
            .tunnel(&audit, target, &payments, Detected::Http)
            .await
            .err()
            .unwrap();
        assert_eq!(failed.reason(), ProxyError::no_identity, "{failed}");
    }
}
