//! Who may connect to an enrolled pod: `aviary.dev/mtls` (`strict` or `permissive`) and
//! `aviary.dev/allow-from` (identities, `ns/sa` or `ns/*`, comma-separated), on a Namespace or
//! a Pod; a pod's own annotation wins over its namespace's. Read here into the table's
//! [`InboundPolicy`], which the destination's agent decides by.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::table::admission::{InboundPolicy, MtlsMode, Peer, ALLOW_FROM, MTLS};

/// The pod's inbound policy: each annotation from the pod, else from its namespace.
pub fn inbound_policy(pod: &ObjectMeta, namespace: Option<&ObjectMeta>) -> InboundPolicy {
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
        let policy = inbound_policy(&meta(&[(ALLOW_FROM, "shop/web")]), Some(&namespace));
        assert_eq!(policy.mtls, MtlsMode::Strict);
        assert_eq!(
            policy.allow_from,
            Some(vec![Peer::ServiceAccount {
                namespace: "shop".into(),
                name: "web".into()
            }])
        );
        let default = inbound_policy(&meta(&[]), None);
        assert_eq!(default, InboundPolicy::default());
        assert_eq!(default.mtls, MtlsMode::Permissive);
    }
}
