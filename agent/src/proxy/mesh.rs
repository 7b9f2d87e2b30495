//! Mutual TLS between nodes: the certificate each end of a tunnel presents, and whom it
//! accepts at the other end. A source agent presents its pod's identity and expects one of the
//! destination pod's namespace (it knows another node's pods by their metadata, which does not
//! name their service accounts); a destination agent presents its pod's identity and accepts
//! any identity of the trust domain, which the pod's `allow-from` then judges.

use std::sync::Arc;

use aviary_identity::{
    credentials::Credentials,
    spiffe::Identity,
    tls::{client_config, server_config, ExpectedServer, TrustBundle},
};
use rustls::{ClientConfig, ServerConfig};

use super::route::LocalPod;
use crate::identity::Certificates;

/// Why a tunnel cannot be made or accepted now.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("no certificate for {0} yet (the agent's /ready says why)")]
    NoCertificate(Identity),
    #[error("no trust bundle yet (the agent's /ready says why)")]
    NoBundle,
    #[error("{namespace}/{service_account} names no identity: {error}")]
    NoIdentity {
        namespace: String,
        service_account: String,
        error: String,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] aviary_identity::tls::Error),
}

/// The node's mesh identities, as its agent's certificates give them.
pub struct Mesh {
    trust_domain: String,
    certificates: Arc<Certificates>,
}

impl Mesh {
    pub fn new(trust_domain: String, certificates: Arc<Certificates>) -> Self {
        Self {
            trust_domain,
            certificates,
        }
    }

    /// The identity an enrolled pod of this node runs as.
    pub fn identity(&self, pod: &LocalPod) -> Result<Identity, Unavailable> {
        let namespace = &pod.workload.namespace;
        Identity::new(&self.trust_domain, namespace, &pod.service_account).map_err(|e| {
            Unavailable::NoIdentity {
                namespace: namespace.to_string(),
                service_account: pod.service_account.to_string(),
                error: e.to_string(),
            }
        })
    }

    /// The connecting end, as `source`, to a pod of `destination_namespace`.
    pub fn client(
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
