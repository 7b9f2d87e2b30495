//! A workload's certificate and private key, as its node's agent holds them: the key is made on
//! the node and never leaves it; the signer sees only a certificate signing request.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::FromDer as _;

use crate::spiffe::{self, Identity};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("making a key and a signing request: {0}")]
    Request(rcgen::Error),
    #[error("the signer's answer holds no PEM certificate chain: {0}")]
    Chain(String),
    #[error("the signed certificate: {0}")]
    Identity(#[from] spiffe::Error),
    #[error("the signer certified {got}, not the {asked} asked for")]
    WrongIdentity { asked: String, got: String },
    #[error("the signed certificate is not for this request's key")]
    WrongKey,
}

/// A key made for `identity`, and the request that asks the signer to certify it.
pub struct KeyRequest {
    identity: Identity,
    key: KeyPair,
    csr_pem: String,
}

impl KeyRequest {
    pub fn new(identity: &Identity) -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(Error::Request)?;
        let mut params = CertificateParams::default();
        let uri = identity.to_string().try_into().map_err(Error::Request)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr_pem = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(Error::Request)?;
        Ok(KeyRequest {
            identity: identity.clone(),
            key,
            csr_pem,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// The credentials, from the chain the signer returned (leaf first, in PEM): it must name
    /// the identity asked for, and certify this request's key.
    pub fn complete(self, chain_pem: &str) -> Result<Credentials, Error> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Chain(e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| Error::Chain("it is empty".into()))?;
        let got = Identity::of_certificate(leaf)?;
        if got != self.identity {
            return Err(Error::WrongIdentity {
                asked: self.identity.to_string(),
                got: got.to_string(),
            });
        }
        let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(leaf)
            .map_err(|_| spiffe::Error::BadCertificate)?;
        if certificate.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&self.key)
        {
            return Err(Error::WrongKey);
        }
        let validity = certificate.validity();
        let time = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        Ok(Credentials {
            identity: self.identity,
            received: SystemTime::now(),
            not_before: time(validity.not_before),
            not_after: time(validity.not_after),
            chain,
            key: PrivatePkcs8KeyDer::from(self.key.serialize_der()),
        })
    }
}

/// A certificate chain (leaf first) for one identity, and its private key.
pub struct Credentials {
    pub identity: Identity,
    /// When the signer's answer came (not_before is set back for clocks behind).
    pub received: SystemTime,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Credentials {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain.clone()
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// When to renew: half way through the life it had when it came, as Istio and Linkerd do,
    /// so that a signer outage of up to half a lifetime goes unnoticed by the data path.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.received)
            .unwrap_or_default();
        self.received + life / 2
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}
