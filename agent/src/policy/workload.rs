//! The workload a pod belongs to, from its owner references, for metrics labels.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The label a Deployment's ReplicaSet puts on its pods, and at the end of its own name.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// A pod's workload: its Deployment (through its ReplicaSet), StatefulSet, DaemonSet or Job, or
/// the pod itself when nothing controls it.
pub fn workload_name(pod: &ObjectMeta) -> String {
    let owners = pod.owner_references.as_deref().unwrap_or_default();
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or(owners.first());
    let Some(owner) = owner else {
        return pod.name.clone().unwrap_or_default();
    };
    let hash = pod
        .labels
        .as_ref()
        .and_then(|labels| labels.get(POD_TEMPLATE_HASH));
    match (owner.kind.as_str(), hash) {
        // "<deployment>-<pod-template-hash>"; a bare ReplicaSet has no such suffix.
        ("ReplicaSet", Some(hash)) => owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|rest| rest.strip_suffix('-'))
            .unwrap_or(&owner.name)
            .to_owned(),
        _ => owner.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn pod(owner: Option<(&str, &str)>, hash: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some("podinfo-7d9f8b6c4-x2x9z".into()),
            labels: hash.map(|h| [(POD_TEMPLATE_HASH.to_owned(), h.to_owned())].into()),
            owner_references: owner.map(|(kind, name)| {
                vec![OwnerReference {
                    kind: kind.into(),
                    name: name.into(),
                    controller: Some(true),
                    ..OwnerReference::default()
                }]
            }),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn owners_name_the_workload() {
        let cases = [
            (
                pod(Some(("ReplicaSet", "podinfo-7d9f8b6c4")), Some("7d9f8b6c4")),
                "podinfo",
            ),
            (
                pod(Some(("ReplicaSet", "podinfo-primary-5b6c")), Some("5b6c")),
                "podinfo-primary",
            ),
            (pod(Some(("ReplicaSet", "standalone")), None), "standalone"),
            (pod(Some(("StatefulSet", "db")), None), "db"),
            (pod(Some(("DaemonSet", "agent")), None), "agent"),
            (pod(Some(("Job", "migrate-28311")), None), "migrate-28311"),
            (pod(None, None), "podinfo-7d9f8b6c4-x2x9z"),
        ];
        for (meta, workload) in cases {
            assert_eq!(workload_name(&meta), workload, "{meta:?}");
        }
    }
}
