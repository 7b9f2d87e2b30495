//! What policy reads of a pod: of this node's pods, their Pod objects; of other nodes' pods,
//! what their agents publish ([`PodMeta`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use super::annotations::enrolment_annotations;
use super::meta::Meta;
use super::workload;

/// A pod of another node, as its agent publishes it and policy reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodMeta {
    /// Name, namespace, UID, and the annotations that decide its enrolment.
    pub metadata: Meta,
    /// What its owner references name (a Deployment, StatefulSet, ...).
    pub workload: String,
    /// It shares its node's address: never captured inbound, whatever its annotations say.
    pub host_network: bool,
    /// Its identity's service account, which a tunnel to it requires its agent to prove.
    pub service_account: Option<String>,
}

impl PodMeta {
    /// What other nodes read of a pod: the workload its owner references name, and the
    /// annotations that decide whether it is enrolled, exactly as they do on its own node. Of
    /// 100,000 pods, their other labels, annotations and owner references would be most of the
    /// memory.
    pub fn of(meta: &ObjectMeta) -> Self {
        let annotations = meta.annotations.as_ref().and_then(|annotations| {
            let kept = enrolment_annotations(annotations.iter());
            (!kept.is_empty()).then_some(kept)
        });
        Self {
            metadata: Meta {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                uid: meta.uid.clone(),
                annotations,
            },
            workload: workload::workload_name(meta),
            host_network: false,
            service_account: None,
        }
    }
}

/// What policy reads of a pod, whichever way the store knows it.
pub(crate) struct PodFacts<'a> {
    pub annotations: Option<&'a BTreeMap<String, String>>,
    pub workload: std::borrow::Cow<'a, str>,
    pub host_network: bool,
    pub service_account: Option<&'a str>,
}

/// The service account a pod runs as: "default" when its spec names none, as admission sets it.
pub(super) fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default")
}

/// hostNetwork pods share the node's network: they are never enrolled and have no address of
/// their own.
pub(super) fn is_host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

/// A pod's addresses, from `status.podIPs` (and `status.podIP`, which older objects carry alone).
pub(super) fn pod_ips(pod: &Pod) -> BTreeSet<IpAddr> {
    let status = pod.status.as_ref();
    status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .chain(status.and_then(|s| s.pod_ip.as_deref()))
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

pub(super) fn is_local(pod: &Pod, node: Option<&str>) -> bool {
    match node {
        None => true,
        Some(node) => pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node),
    }
}

/// Pods that have finished hold no connections worth capturing.
pub(super) fn is_running(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded") | Some("Failed"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::annotations::{CAPTURE_ANNOTATION, INBOUND_PORTS_EXCLUDE};
    use crate::policy::{Object, Store};

    #[test]
    fn pod_metadata_keeps_what_names_the_workload_and_decides_enrolment_only() {
        let meta: ObjectMeta = serde_saphyr::from_str(
            r#"
name: podinfo-7d9f8b-x2x9z
namespace: shop
uid: u1
labels: {pod-template-hash: 7d9f8b, app: podinfo}
annotations:
  aviary.dev/capture: disabled
  aviary.dev/inbound-ports-exclude: "9090"
  kubectl.kubernetes.io/last-applied-configuration: "{}"
ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: podinfo-7d9f8b, uid: rs}]
"#,
        )
        .unwrap();
        let kept = PodMeta::of(&meta);
        let expected = PodMeta {
            metadata: Meta {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                uid: meta.uid.clone(),
                annotations: Some(
                    [
                        (CAPTURE_ANNOTATION.into(), "disabled".into()),
                        (INBOUND_PORTS_EXCLUDE.into(), "9090".into()),
                    ]
                    .into(),
                ),
            },
            workload: "podinfo".into(),
            host_network: false,
            service_account: None,
        };
        assert_eq!(kept, expected);
        let bare = ObjectMeta {
            annotations: Some([("app".into(), "podinfo".into())].into()),
            ..meta.clone()
        };
        assert_eq!(PodMeta::of(&bare).metadata.annotations, None);

        // Refused for what its own agent refuses the Pod for, so that every agent agrees.
        let bad = ObjectMeta {
            annotations: Some([(INBOUND_PORTS_EXCLUDE.into(), "http".into())].into()),
            ..meta
        };
        let rejected = Store::default()
            .upsert(Object::PodMetadata(Box::new(PodMeta::of(&bad))))
            .unwrap_err();
        assert!(
            rejected.reason.contains("inbound-ports-exclude"),
            "{rejected}"
        );
    }
}
