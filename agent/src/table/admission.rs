//! Who may connect to an enrolled pod, as plain data the destination's proxy reads: the mode
//! (`aviary.dev/mtls`) and the identities admitted (`aviary.dev/allow-from`), and the decision.
//! Policy writes it from the annotations (`policy::security`).

use std::fmt;

use aviary_identity::spiffe::Identity;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(namespace: &str, account: &str) -> Identity {
        Identity::new("cluster.local", namespace, account).unwrap()
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
            allow_from: Some(vec![
                Peer::ServiceAccount {
                    namespace: "shop".into(),
                    name: "web".into(),
                },
                Peer::Namespace("ops".into()),
            ]),
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
