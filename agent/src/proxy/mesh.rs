//! Mutual TLS between nodes: the certificate each end of a tunnel presents, and whom it
//! accepts at the other end. A source agent presents its pod's identity and expects one of the
//! destination pod's namespace (it knows another node's pods by their metadata, which does not
//! name their service accounts); a destination agent presents its pod's identity and accepts
//! any identity of the trust domain, which the pod's `allow-from` then judges.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use aviary_identity::{
    credentials::Credentials,
    spiffe::Identity,
    tls::{client_config, server_config, ExpectedServer, TrustBundle},
};
use rustls::{ClientConfig, ServerConfig};

use super::hbone::{self, Tunnel};
use crate::{identity::Certificates, metrics::Principals};

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
    #[error(transparent)]
    Hbone(#[from] hbone::Error),
}

impl TunnelError {
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

/// The node's mesh identities, as its agent's certificates give them.
pub struct Mesh {
    certificates: Arc<Certificates>,
    /// The proxy's socket mark, which the capture programs skip.
    mark: u32,
    /// Connecting, the handshake and the CONNECT together take at most this long.
    connect_timeout: Duration,
}

impl Mesh {
    pub fn new(certificates: Arc<Certificates>, mark: u32, connect_timeout: Duration) -> Self {
        Self {
            certificates,
            mark,
            connect_timeout,
        }
    }

    /// Opens a tunnel from `from` to the pod at `target`, of `namespace`, through the agent of
    /// its node (at the pod's address, on [`hbone::PORT`]). Returns it with the identities
    /// both ends proved.
    pub async fn tunnel(
        &self,
        from: &TunnelFrom,
        target: SocketAddr,
        namespace: &str,
    ) -> Result<(Tunnel, Arc<Principals>), TunnelError> {
        let tls = self.client(&from.identity, namespace)?;
        let agent = SocketAddr::new(target.ip(), hbone::PORT);
        let open = async {
            let tcp = super::connect_marked(agent, self.mark)
                .await
                .map_err(|error| TunnelError::Connect { agent, error })?;
            Ok::<_, TunnelError>(hbone::connect(tcp, from.source, target, tls).await?)
        };
        let (tunnel, destination) = tokio::time::timeout(self.connect_timeout, open)
            .await
            .map_err(|_| TunnelError::Connect {
                agent,
                error: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no tunnel within {:?}", self.connect_timeout),
                ),
            })??;
        let principals = Principals {
            source: (*from.identity).clone(),
            destination,
        };
        Ok((tunnel, Arc::new(principals)))
    }

    /// The connecting end, as `source`, to a pod of `destination_namespace`.
    fn client(
        &self,
        source: &Identity,
        destination_namespace: &str,
    ) -> Result<Arc<ClientConfig>, Unavailable> {
        let (credentials, bundle) = self.held(source)?;
        let expected = ExpectedServer::Namespace(destination_namespace.to_owned());
        Ok(Arc::new(client_config(&credentials, &bundle, expected)?))
    }

    /// The accepting end, as the pod `destination`.
    pub fn server(&self, destination: &Identity) -> Result<Arc<ServerConfig>, Unavailable> {
        let (credentials, bundle) = self.held(destination)?;
        Ok(Arc::new(server_config(&credentials, &bundle)?))
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
