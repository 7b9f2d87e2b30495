//! TLS for the mesh (rustls with ring, no OpenSSL): mutual TLS 1.3 where each end presents a
//! workload's certificate, checks the other's chain up to the trust bundle, and checks the
//! identity it names; and plain server TLS for the signer's own endpoint.

use std::sync::Arc;

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate, WebPkiClientVerifier,
    },
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::{credentials::Credentials, spiffe::Identity};

/// HBONE is HTTP/2.
const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the trust bundle: {0}")]
    Bundle(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The roots a mesh trusts (the signer's CA certificates: two while it rotates), and its trust
/// domain.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    roots: Arc<RootCertStore>,
    trust_domain: String,
}

impl TrustBundle {
    pub fn from_pem(pem: &str, trust_domain: &str) -> Result<Self, Error> {
        let mut roots = RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let certificate = certificate.map_err(|e| Error::Bundle(e.to_string()))?;
            roots
                .add(certificate)
                .map_err(|e| Error::Bundle(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(Error::Bundle("it holds no certificate".into()));
        }
        Ok(TrustBundle {
            roots: Arc::new(roots),
            trust_domain: trust_domain.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The accepting end of mutual TLS: presents `credentials`, and requires a client certificate
/// that chains to `bundle` and names an identity of its trust domain.
pub fn server_config(
    credentials: &Credentials,
    bundle: &TrustBundle,
) -> Result<ServerConfig, Error> {
    let provider = provider();
    let chain = WebPkiClientVerifier::builder_with_provider(bundle.roots.clone(), provider.clone())
        .build()?;
    let verifier = Arc::new(ClientIdentityVerifier {
        chain,
        trust_domain: bundle.trust_domain.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(credentials.chain(), credentials.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The connecting end of mutual TLS: presents `credentials`, and accepts only a server whose
/// certificate chains to `bundle` and names exactly the identity `expected`.
pub fn client_config(
    credentials: &Credentials,
    bundle: &TrustBundle,
    expected: Identity,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier = Arc::new(ServerIdentityVerifier {
        roots: bundle.roots.clone(),
        algorithms: provider.signature_verification_algorithms,
        expected,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(credentials.chain(), credentials.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Peers are addressed by pod IP, and named by their certificates' URIs, not by SNI.
    config.enable_sni = false;
    Ok(config)
}

/// The identity the peer of a finished handshake proved (its chain was verified).
pub fn peer_identity(connection: &rustls::CommonState) -> Option<Identity> {
    let leaf = connection.peer_certificates()?.first()?;
    Identity::of_certificate(leaf).ok()
}

/// The signer's endpoint: server TLS with its DNS certificate; agents authenticate with
/// bearer tokens, not certificates (they have none before they ask).
pub fn signer_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, Error> {
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?)
}

/// An agent's end of the signer's TLS: the signer's DNS name, chained to the trust bundle.
pub fn signer_client_config(bundle: &TrustBundle) -> Result<ClientConfig, Error> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(bundle.roots.clone())
        .with_no_client_auth())
}

/// Why a peer's verified certificate is still refused. (Its Debug is its message: rustls
/// shows the error it carries with Debug.)
#[derive(thiserror::Error)]
enum PeerRefused {
    #[error("the peer proved {got}, not {expected}")]
    OtherIdentity { expected: Identity, got: Identity },
    #[error("the peer proved {got}, outside the trust domain {trust_domain}")]
    ForeignTrustDomain { trust_domain: String, got: Identity },
}

impl std::fmt::Debug for PeerRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn identity_refused(error: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// rustls' client certificate verification (chain, validity, clientAuth usage), and then the
/// trust domain of the identity the certificate names.
#[derive(Debug)]
struct ClientIdentityVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        match Identity::of_certificate(end_entity) {
            Ok(identity) if identity.trust_domain == self.trust_domain => Ok(verified),
            Ok(got) => Err(identity_refused(PeerRefused::ForeignTrustDomain {
                trust_domain: self.trust_domain.clone(),
                got,
            })),
            Err(error) => Err(identity_refused(error)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The chain to the trust bundle (validity, serverAuth usage), and then the identity
/// expected. The server name is not used: mesh certificates name identities, not hosts.
#[derive(Debug)]
struct ServerIdentityVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: Identity,
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match Identity::of_certificate(end_entity) {
            Ok(identity) if identity == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(got) => Err(identity_refused(PeerRefused::OtherIdentity {
                expected: self.expected.clone(),
                got,
            })),
            Err(error) => Err(identity_refused(error)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, SystemTime};

    use time::OffsetDateTime;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::{ca::Authority, credentials::KeyRequest};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn id(text: &str) -> Identity {
        text.parse().unwrap()
    }

    /// Credentials for `identity` from `ca`, valid from `now`.
    pub(crate) fn issue(ca: &Authority, identity: &Identity, now: OffsetDateTime) -> Credentials {
        let request = KeyRequest::new(identity).unwrap();
        let leaf = ca
            .sign_workload(request.csr_pem(), identity, now, DAY)
            .unwrap();
        request
            .complete(&format!("{leaf}{}", ca.certificate_pem()))
            .unwrap()
    }

    fn bundle(ca: &Authority) -> TrustBundle {
        TrustBundle::from_pem(ca.certificate_pem(), "cluster.local").unwrap()
    }

    /// A handshake over an in-memory pipe, both ends at once; what each end saw of the other,
    /// or the error of the end that failed first.
    async fn handshake(
        server: ServerConfig,
        client: ClientConfig,
    ) -> Result<(Option<Identity>, Option<Identity>), String> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let accept = async {
            let mut tls = TlsAcceptor::from(Arc::new(server))
                .accept(server_io)
                .await
                .map_err(|e| format!("server: {e}"))?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte)
                .await
                .map_err(|e| format!("server: {e}"))?;
            tls.write_all(&byte)
                .await
                .map_err(|e| format!("server: {e}"))?;
            tls.flush().await.map_err(|e| format!("server: {e}"))?;
            Ok::<_, String>(peer_identity(tls.get_ref().1))
        };
        let connect = async {
            let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 244, 1, 5).into());
            let mut tls = TlsConnector::from(Arc::new(client))
                .connect(name, client_io)
                .await
                .map_err(|e| format!("client: {e}"))?;
            tls.write_all(b"x")
                .await
                .map_err(|e| format!("client: {e}"))?;
            tls.flush().await.map_err(|e| format!("client: {e}"))?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte)
                .await
                .map_err(|e| format!("client: {e}"))?;
            Ok::<_, String>(peer_identity(tls.get_ref().1))
        };
        match tokio::join!(accept, connect) {
            (Ok(accepted), Ok(connected)) => Ok((accepted, connected)),
            (accepted, connected) => Err(format!("{:?} / {:?}", accepted.err(), connected.err())),
        }
    }

    /// A CA and two workloads, as of `now`: the tests' cast.
    struct Cast {
        now: OffsetDateTime,
        ca: Authority,
        checkout: Identity,
        payments: Identity,
    }

    impl Cast {
        fn new() -> Cast {
            let now = OffsetDateTime::now_utc();
            Cast {
                now,
                ca: Authority::generate("cluster.local", now - 3 * DAY).unwrap(),
                checkout: id("spiffe://cluster.local/ns/shop/sa/checkout"),
                payments: id("spiffe://cluster.local/ns/shop/sa/payments"),
            }
        }

        /// The accepting end, as `who`, with credentials from `ca`.
        fn server(&self, who: &Identity, ca: &Authority) -> ServerConfig {
            server_config(&issue(ca, who, self.now), &bundle(ca)).unwrap()
        }

        /// The connecting end, as `who` with `credentials`, expecting `expected`.
        fn client(&self, credentials: &Credentials, expected: Identity) -> ClientConfig {
            client_config(credentials, &bundle(&self.ca), expected).unwrap()
        }
    }

    #[tokio::test]
    async fn mutual_tls_between_two_workloads_proves_both_identities() {
        let cast = Cast::new();
        let server = cast.server(&cast.payments, &cast.ca);
        let client = cast.client(
            &issue(&cast.ca, &cast.checkout, cast.now),
            cast.payments.clone(),
        );
        let (client_seen, server_seen) = handshake(server, client).await.unwrap();
        assert_eq!(client_seen, Some(cast.checkout));
        assert_eq!(server_seen, Some(cast.payments));
    }

    #[tokio::test]
    async fn a_server_proving_another_identity_is_refused() {
        let cast = Cast::new();
        let server = cast.server(&cast.checkout, &cast.ca);
        let client = cast.client(
            &issue(&cast.ca, &cast.checkout, cast.now),
            cast.payments.clone(),
        );
        let err = handshake(server, client).await.unwrap_err();
        assert!(
            err.contains("the peer proved spiffe://cluster.local/ns/shop/sa/checkout, not spiffe://cluster.local/ns/shop/sa/payments"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_forged_certificate_is_refused_by_either_end() {
        let cast = Cast::new();
        // The forger names its root as the real one is named: the signature gives it away.
        let forger = Authority::generate("cluster.local", cast.now).unwrap();

        let server = cast.server(&cast.payments, &cast.ca);
        let client = cast.client(
            &issue(&forger, &cast.checkout, cast.now),
            cast.payments.clone(),
        );
        let err = handshake(server, client).await.unwrap_err();
        assert!(
            err.contains("server: invalid peer certificate: BadSignature"),
            "{err}"
        );

        let server = cast.server(&cast.payments, &forger);
        let client = cast.client(
            &issue(&cast.ca, &cast.checkout, cast.now),
            cast.payments.clone(),
        );
        let err = handshake(server, client).await.unwrap_err();
        assert!(
            err.contains("client: invalid peer certificate: BadSignature"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_expired_certificate_is_refused() {
        let cast = Cast::new();
        let expired = issue(&cast.ca, &cast.checkout, cast.now - 2 * DAY);
        assert!(expired.is_expired(SystemTime::now()));
        let server = cast.server(&cast.payments, &cast.ca);
        let err = handshake(server, cast.client(&expired, cast.payments.clone()))
            .await
            .unwrap_err();
        assert!(
            err.contains("server: invalid peer certificate: certificate expired"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_client_of_another_trust_domain_is_refused() {
        let cast = Cast::new();
        let foreign = id("spiffe://other.example/ns/shop/sa/checkout");
        let server = cast.server(&cast.payments, &cast.ca);
        let client = cast.client(&issue(&cast.ca, &foreign, cast.now), cast.payments.clone());
        let err = handshake(server, client).await.unwrap_err();
        assert!(
            err.contains("outside the trust domain cluster.local"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let cast = Cast::new();
        let server = cast.server(&cast.payments, &cast.ca);
        let verifier = Arc::new(ServerIdentityVerifier {
            roots: bundle(&cast.ca).roots.clone(),
            algorithms: provider().signature_verification_algorithms,
            expected: cast.payments,
        });
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let err = handshake(server, client).await.unwrap_err();
        assert!(err.contains("server: peer sent no certificates"), "{err}");
    }

    #[test]
    fn a_bundle_without_certificates_is_refused() {
        let err = TrustBundle::from_pem("", "cluster.local").unwrap_err();
        assert_eq!(err.to_string(), "the trust bundle: it holds no certificate");
    }
}
