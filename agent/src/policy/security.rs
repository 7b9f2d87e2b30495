//! Who may connect to an enrolled pod: `aviary.dev/mtls` (`strict` or `permissive`) and
//! `aviary.dev/allow-from` (identities, `ns/sa` or `ns/*`, comma-separated), on a Namespace or
//! a Pod; a pod's own annotation wins over its namespace's. The destination's agent decides.

use std::fmt;

use aviary_identity::spiffe::Identity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Serialize, Serializer};

pub const MTLS: &str = "aviary.dev/mtls";
pub const ALLOW_FROM: &str = "aviary.dev/allow-from";

/// Whether plain text from outside the mesh may reach the pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Accepted, and labelled as plain text (as Istio's PERMISSIVE).
    #[default]
    Permissive,
    /// Refused, and counted.
    Strict,
}

/// One entry of `aviary.dev/allow-from`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Peer {
    ServiceAccount {
        namespace: String,
        name: String,
    },
    /// `ns/*`: every service account of the namespace.
    Namespace(String),
}

impl Peer {
    fn matches(&self, identity: &Identity) -> bool {
        match self {
            Peer::ServiceAccount { namespace, name } => {
                identity.namespace == *namespace && identity.service_account == *name
            }
            Peer::Namespace(namespace) => identity.namespace == *namespace,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::ServiceAccount { namespace, name } => write!(f, "{namespace}/{name}"),
            Peer::Namespace(namespace) => write!(f, "{namespace}/*"),
        }
    }
}

impl Serialize for Peer {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What the destination's agent checks of a connection into the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct InboundPolicy {
    pub mtls: MtlsMode,
    /// None: anyone (that the mode lets in). Some: only these identities.
    pub allow_from: Option<Vec<Peer>>,
}

/// Why a connection is refused: the reason HTTP clients read in a 403's body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("plain text is refused: the destination's {MTLS} is strict")]
    PlainText,
    #[error("the caller has no mesh identity, and the destination's {ALLOW_FROM} admits only named identities")]
    NoIdentity,
    #[error(
        "{peer} is not among the identities the destination's {ALLOW_FROM} admits ({allowed})"
    )]
    NotAllowed { peer: String, allowed: String },
}

impl InboundPolicy {
    /// The pod's policy: each annotation from the pod, else from its namespace.
    pub fn of(pod: &ObjectMeta, namespace: Option<&ObjectMeta>) -> Self {
        let annotation = |key: &str| {
            let of = |meta: &ObjectMeta| meta.annotations.as_ref()?.get(key).cloned();
            of(pod).or_else(|| namespace.and_then(of))
        };
        InboundPolicy {
            mtls: annotation(MTLS)
                .and_then(|v| parse_mtls(&v).ok())
                .unwrap_or_default(),
            allow_from: annotation(ALLOW_FROM).and_then(|v| parse_allow_from(&v).ok()),
        }
    }

    /// Whether a connection from `peer` (None: plain text, no identity) may reach the pod.
    pub fn admits(&self, peer: Option<&Identity>) -> Result<(), Denied> {
        match (peer, &self.allow_from) {
            (None, _) if self.mtls == MtlsMode::Strict => Err(Denied::PlainText),
            (_, None) => Ok(()),
            (None, Some(_)) => Err(Denied::NoIdentity),
            (Some(peer), Some(allowed)) if allowed.iter().any(|a| a.matches(peer)) => Ok(()),
            (Some(peer), Some(allowed)) => Err(Denied::NotAllowed {
                peer: peer.to_string(),
                allowed: allowed
                    .iter()
                    .map(Peer::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

pub fn parse_mtls(value: &str) -> Result<MtlsMode, String> {
    match value {
        "strict" => Ok(MtlsMode::Strict),
        "permissive" => Ok(MtlsMode::Permissive),
        other => Err(format!(
            "annotation {MTLS} must be \"strict\" or \"permissive\", not {other:?}"
        )),
    }
}

/// `ns/sa, ns/*`: at least one entry, each a namespace and a service account name (or `*`).
pub fn parse_allow_from(value: &str) -> Result<Vec<Peer>, String> {
    let bad = |entry: &str| {
        format!(
            "annotation {ALLOW_FROM} lists identities as <namespace>/<service-account> or \
             <namespace>/*, comma-separated; {entry:?} is neither"
        )
    };
    let mut peers = Vec::new();
    for entry in value.split(',').map(str::trim) {
        let (namespace, name) = entry.split_once('/').ok_or_else(|| bad(entry))?;
        if !is_dns_name(namespace) {
            return Err(bad(entry));
        }
        peers.push(match name {
            "*" => Peer::Namespace(namespace.to_owned()),
            name if is_dns_name(name) => Peer::ServiceAccount {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
            _ => return Err(bad(entry)),
        });
    }
    peers.sort();
    peers.dedup();
    Ok(peers)
}

/// A Kubernetes object name (a DNS subdomain): what namespaces and service accounts are.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

/// Why the annotations of a Namespace or a Pod cannot be used, if they cannot.
pub fn validate(meta: &ObjectMeta) -> Result<(), String> {
    let annotations = meta.annotations.as_ref();
    if let Some(value) = annotations.and_then(|a| a.get(MTLS)) {
        parse_mtls(value)?;
    }
    if let Some(value) = annotations.and_then(|a| a.get(ALLOW_FROM)) {
        parse_allow_from(value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn id(namespace: &str, account: &str) -> Identity {
        Identity::new("cluster.local", namespace, account).unwrap()
    }

    #[test]
    fn allow_from_lists_service_accounts_and_whole_namespaces() {
        assert_eq!(
            parse_allow_from("shop/checkout, ops/* ,shop/checkout").unwrap(),
            [
                Peer::ServiceAccount {
                    namespace: "shop".into(),
                    name: "checkout".into()
                },
                Peer::Namespace("ops".into()),
            ]
        );
        for bad in [
            "",
            "shop",
            "shop/",
            "/sa",
            "*/*",
            "shop/Checkout",
            "shop/a/b",
            "shop/a,",
        ] {
            let err = parse_allow_from(bad).unwrap_err();
            assert!(
                err.contains("<namespace>/<service-account>"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn the_mode_is_strict_or_permissive() {
        assert_eq!(parse_mtls("strict"), Ok(MtlsMode::Strict));
        assert_eq!(parse_mtls("permissive"), Ok(MtlsMode::Permissive));
        let err = parse_mtls("STRICT").unwrap_err();
        assert_eq!(
            err,
            "annotation aviary.dev/mtls must be \"strict\" or \"permissive\", not \"STRICT\""
        );
        assert!(validate(&meta(&[(MTLS, "on")])).is_err());
        assert!(validate(&meta(&[(ALLOW_FROM, "everyone")])).is_err());
        assert!(validate(&meta(&[(MTLS, "strict"), (ALLOW_FROM, "shop/*")])).is_ok());
    }

    #[test]
    fn a_pods_annotation_wins_over_its_namespaces_each_on_its_own() {
        let namespace = meta(&[(MTLS, "strict"), (ALLOW_FROM, "ops/*")]);
        let policy = InboundPolicy::of(&meta(&[(ALLOW_FROM, "shop/web")]), Some(&namespace));
        assert_eq!(policy.mtls, MtlsMode::Strict);
        assert_eq!(
            policy.allow_from,
            Some(vec![Peer::ServiceAccount {
                namespace: "shop".into(),
                name: "web".into()
            }])
        );
        let default = InboundPolicy::of(&meta(&[]), None);
        assert_eq!(default, InboundPolicy::default());
        assert_eq!(default.mtls, MtlsMode::Permissive);
    }

    #[test]
    fn admission_by_mode_and_identity() {
        let open = InboundPolicy::default();
        assert_eq!(open.admits(None), Ok(()));
        assert_eq!(open.admits(Some(&id("any", "one"))), Ok(()));

        let strict = InboundPolicy {
            mtls: MtlsMode::Strict,
            allow_from: None,
        };
        assert_eq!(strict.admits(None), Err(Denied::PlainText));
        assert_eq!(strict.admits(Some(&id("any", "one"))), Ok(()));

        let named = InboundPolicy {
            mtls: MtlsMode::Permissive,
            allow_from: Some(parse_allow_from("shop/web, ops/*").unwrap()),
        };
        assert_eq!(named.admits(Some(&id("shop", "web"))), Ok(()));
        assert_eq!(named.admits(Some(&id("ops", "anything"))), Ok(()));
        assert_eq!(named.admits(None), Err(Denied::NoIdentity));
        let denied = named.admits(Some(&id("shop", "db"))).unwrap_err();
        assert_eq!(
            denied.to_string(),
            "spiffe://cluster.local/ns/shop/sa/db is not among the identities the destination's \
             aviary.dev/allow-from admits (shop/web, ops/*)"
        );
    }
}
