//! SPIFFE identities of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! as Istio and Linkerd name them, and the one a certificate carries.

use std::{fmt, str::FromStr};

use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

/// A workload's identity: the service account its pod runs as, in a trust domain.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{0:?} is not a SPIFFE ID of a service account (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")]
    Malformed(String),
    #[error("the certificate cannot be parsed")]
    BadCertificate,
    #[error("the certificate carries {0} URI names; a workload certificate carries exactly one")]
    UriNames(usize),
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, Error> {
        let identity = Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        // One check of every part: the text form must read back as the same identity.
        match identity.to_string().parse::<Identity>() {
            Ok(parsed) if parsed == identity => Ok(identity),
            _ => Err(Error::Malformed(identity.to_string())),
        }
    }

    /// The identity a certificate (DER) names in its one URI subject alternative name. Only for
    /// a certificate whose chain was verified: this reads, it does not check signatures.
    pub fn of_certificate(der: &[u8]) -> Result<Self, Error> {
        let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|_| Error::BadCertificate)?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|_| Error::BadCertificate)?
            .map(|san| san.value.general_names.clone())
            .unwrap_or_default();
        let uris: Vec<&str> = names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris[..] {
            [uri] => uri.parse(),
            _ => Err(Error::UriNames(uris.len())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let malformed = || Error::Malformed(text.to_owned());
        let rest = text.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service_account] = parts[..] else {
            return Err(malformed());
        };
        // The SPIFFE spec's trust domain characters; Kubernetes names (DNS labels and
        // subdomains) for the rest.
        let trust_domain_ok = !trust_domain.is_empty()
            && trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        let name_ok = |name: &str| {
            !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
        };
        if !(trust_domain_ok && name_ok(namespace) && name_ok(service_account)) {
            return Err(malformed());
        }
        Ok(Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_ids_read_and_print_the_same() {
        let text = "spiffe://cluster.local/ns/shop/sa/checkout-v2";
        let id: Identity = text.parse().unwrap();
        assert_eq!(
            id,
            Identity::new("cluster.local", "shop", "checkout-v2").unwrap()
        );
        assert_eq!(id.to_string(), text);
    }

    #[test]
    fn anything_else_is_refused_with_the_form_it_should_have() {
        for bad in [
            "",
            "spiffe://",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/B",
            "spiffe://cluster.local/ns/a b/sa/b",
            "spiffe:///ns/a/sa/b",
        ] {
            let err = bad.parse::<Identity>().unwrap_err();
            assert_eq!(err, Error::Malformed(bad.to_owned()));
            assert!(
                err.to_string().contains("spiffe://<trust-domain>/ns/"),
                "{err}"
            );
        }
        assert!(Identity::new("cluster.local", "a/b", "c").is_err());
    }
}
