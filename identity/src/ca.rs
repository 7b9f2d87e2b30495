//! The signer's certificate authority: a self-signed root made once and kept in the signer's own
//! Secret, and the short-lived certificates it signs.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use time::OffsetDateTime;

use crate::spiffe::Identity;

/// How long a root lives. Rotating it means a bundle with both roots for a while (see the
/// README's trust model).
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far back a certificate's validity starts, for nodes whose clocks run a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the certificate signing request is malformed or its signature does not verify: {0}")]
    BadRequest(rcgen::Error),
    #[error("the CA's certificate or key cannot be read: {0}")]
    BadAuthority(rcgen::Error),
    #[error("signing: {0}")]
    Signing(rcgen::Error),
}

/// A certificate authority: its key, and its self-signed certificate (the trust bundle).
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    certificate_pem: String,
}

impl Authority {
    /// A new root for `trust_domain`, valid from `now` for [`ROOT_LIFETIME`].
    pub fn generate(trust_domain: &str, now: OffsetDateTime) -> Result<Self, Error> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "aviary");
        params.distinguished_name.push(
            DnType::CommonName,
            format!("aviary-identity root for {trust_domain}"),
        );
        // It signs workload certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ROOT_LIFETIME;
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate().map_err(Error::Signing)?;
        let certificate = params.self_signed(&key).map_err(Error::Signing)?;
        Ok(Authority {
            issuer: Issuer::new(params, key),
            certificate_pem: certificate.pem(),
        })
    }

    /// The authority kept in a Secret: its certificate and its PKCS#8 key, in PEM.
    pub fn from_pem(certificate_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(Error::BadAuthority)?;
        let issuer = Issuer::from_ca_cert_pem(certificate_pem, key).map_err(Error::BadAuthority)?;
        Ok(Authority {
            issuer,
            certificate_pem: certificate_pem.to_owned(),
        })
    }

    /// The root certificate, which the trust bundle carries.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The private key, for the Secret only.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `identity` on the key of `csr_pem`, valid from `now` for `lifetime`,
    /// for both ends of mutual TLS. The request's signature proves its key; the names it asks
    /// for are not used: the caller has decided the identity.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        identity: &Identity,
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<String, Error> {
        let request =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(Error::BadRequest)?;
        let uri = identity.to_string().try_into().map_err(Error::Signing)?;
        self.sign(&request.public_key, vec![SanType::URI(uri)], now, lifetime)
    }

    /// A server certificate for the signer's own DNS names, on `key`.
    pub fn sign_server(
        &self,
        key: &KeyPair,
        dns_names: &[String],
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<String, Error> {
        let names = dns_names
            .iter()
            .map(|name| Ok(SanType::DnsName(name.as_str().try_into()?)))
            .collect::<Result<_, rcgen::Error>>()
            .map_err(Error::Signing)?;
        self.sign(key, names, now, lifetime)
    }

    fn sign(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        names: Vec<SanType>,
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<String, Error> {
        let mut params = CertificateParams::default();
        // SPIFFE: the subject is empty, the URI name is the identity.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = names;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // One certificate for both ends: rustls checks serverAuth on the server's and
        // clientAuth on the client's.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + lifetime;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let certificate = params
            .signed_by(public_key, &self.issuer)
            .map_err(Error::Signing)?;
        Ok(certificate.pem())
    }
}

/// 16 random bytes, positive as DER integers must be.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random number generator failed");
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject as _;

    use super::*;
    use crate::credentials::KeyRequest;

    #[test]
    fn the_identity_certified_is_the_signers_choice_not_the_requests() {
        let now = OffsetDateTime::now_utc();
        let ca = Authority::generate("cluster.local", now).unwrap();
        let asked: Identity = "spiffe://cluster.local/ns/shop/sa/admin".parse().unwrap();
        let granted: Identity = "spiffe://cluster.local/ns/shop/sa/checkout"
            .parse()
            .unwrap();
        let request = KeyRequest::new(&asked).unwrap();
        let leaf = ca
            .sign_workload(request.csr_pem(), &granted, now, Duration::from_secs(3600))
            .unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(leaf.as_bytes()).unwrap();
        assert_eq!(Identity::of_certificate(&der).unwrap(), granted);
    }

    #[test]
    fn a_request_whose_signature_does_not_verify_is_refused() {
        let now = OffsetDateTime::now_utc();
        let ca = Authority::generate("cluster.local", now).unwrap();
        let identity: Identity = "spiffe://cluster.local/ns/shop/sa/checkout"
            .parse()
            .unwrap();
        let request = KeyRequest::new(&identity).unwrap();
        // Flip one bit of the signature, at the end of the DER.
        let pem = pem::parse(request.csr_pem()).unwrap();
        let mut der = pem.contents().to_vec();
        *der.last_mut().unwrap() ^= 1;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let err = ca
            .sign_workload(&tampered, &identity, now, Duration::from_secs(3600))
            .unwrap_err();
        assert!(matches!(err, Error::BadRequest(_)), "{err}");
        assert!(ca
            .sign_workload("not a request", &identity, now, Duration::from_secs(3600))
            .is_err());
    }

    #[test]
    fn an_authority_reads_back_from_its_secret() {
        let now = OffsetDateTime::now_utc();
        let ca = Authority::generate("cluster.local", now).unwrap();
        let again = Authority::from_pem(ca.certificate_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.certificate_pem(), ca.certificate_pem());
        let Err(err) = Authority::from_pem(ca.certificate_pem(), "garbage") else {
            panic!("a key of garbage was read");
        };
        assert!(err
            .to_string()
            .starts_with("the CA's certificate or key cannot be read"));
    }
}
