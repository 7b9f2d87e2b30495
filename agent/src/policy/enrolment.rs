//! Enrolment: which of this node's pods have their connections captured, by their own
//! `aviary.dev/capture` annotation or their namespace's, and who may connect to each.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use aviary_identity::spiffe::Identity;

use serde::Serialize;

use super::annotations::{inbound_ports_excluded, Capture};
use super::pod::{is_host_network, is_local, is_running, pod_ips, service_account};
use super::security;
use super::store::Store;
use crate::table::admission::InboundPolicy;
use crate::table::{shared_map::SharedMap, unknown, LocalPod, Workload};

/// A pod whose outbound connections are captured.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct EnrolledPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The service account it runs as, which names its identity.
    pub service_account: String,
    /// Its addresses, whose inbound connections the TC programs steer to the proxy.
    pub ips: BTreeSet<IpAddr>,
    /// Its ports that inbound capture leaves alone.
    pub inbound_ports_excluded: BTreeSet<u16>,
    /// Who may connect to it (`aviary.dev/mtls`, `aviary.dev/allow-from`).
    pub inbound: InboundPolicy,
}

/// This node's enrolled pods, by UID.
pub(super) fn enrolled(store: &Store, node: Option<&str>) -> BTreeMap<String, EnrolledPod> {
    store
        .pods()
        .filter(|pod| is_local(pod, node) && is_running(pod) && !is_host_network(pod))
        .filter(|pod| {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            is_enrolled(namespace, pod.metadata.annotations.as_ref(), store)
        })
        .map(|pod| {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            let namespace_meta = store.namespace(namespace).map(|ns| &ns.metadata);
            EnrolledPod {
                namespace: namespace.to_owned(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                service_account: service_account(pod).to_owned(),
                ips: pod_ips(pod),
                inbound_ports_excluded: inbound_ports_excluded(pod.metadata.annotations.as_ref())
                    .unwrap_or_default(),
                inbound: security::inbound_policy(&pod.metadata, namespace_meta),
            }
        })
        .map(|pod| (pod.uid.clone(), pod))
        .collect()
}

/// Whether a pod's annotations enrol it: its own, else its namespace's. This is all enrollment
/// needs from a pod on another node, whose metadata is all the agent watches.
pub(super) fn is_enrolled(
    namespace: &str,
    annotations: Option<&BTreeMap<String, String>>,
    store: &Store,
) -> bool {
    let capture = Capture::of(annotations).or_else(|| {
        let namespace = store.namespace(namespace)?;
        Capture::of(namespace.metadata.annotations.as_ref())
    });
    capture == Some(Capture::Enabled)
}

/// This node's enrolled pods at each of their addresses, with the workloads `pods` names them
/// by: the inbound proxy's admission and each pod's identity in `trust_domain`.
pub fn local_pods<'a>(
    enrolled: impl IntoIterator<Item = &'a EnrolledPod>,
    pods: &SharedMap<IpAddr, Arc<Workload>>,
    trust_domain: Option<&str>,
) -> HashMap<IpAddr, Arc<LocalPod>> {
    let mut local = HashMap::new();
    for pod in enrolled {
        for ip in &pod.ips {
            let workload = pods.get(ip).cloned().unwrap_or_else(|| {
                Arc::new(Workload {
                    namespace: pod.namespace.as_str().into(),
                    workload: unknown(),
                    pod: pod.name.as_str().into(),
                })
            });
            let identity = trust_domain.and_then(|trust_domain| {
                Identity::new(trust_domain, &pod.namespace, &pod.service_account).ok()
            });
            let local_pod = LocalPod {
                workload,
                identity: identity.map(Arc::new),
                inbound: pod.inbound.clone(),
            };
            local.insert(ip.to_canonical(), Arc::new(local_pod));
        }
    }
    local
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compiler::policy;
    use crate::policy::fixtures::*;

    #[test]
    fn enrollment_follows_namespace_and_pod_annotations() {
        let policy = policy(&store(ENROLMENT), Some("node-a"));
        assert_eq!(enrolled_names(&policy), ["plain/opted-in", "shop/web"]);
        // Their service accounts name their identities; "default" where the pod names none.
        let accounts: Vec<&str> = policy
            .enrolled
            .values()
            .map(|p| p.service_account.as_str())
            .collect();
        assert_eq!(accounts, ["web", "default"]);
        assert_eq!(
            policy.enrolled["00000000-0000-4000-8000-000000000001"].uid,
            "00000000-0000-4000-8000-000000000001"
        );
    }

    #[test]
    fn without_a_node_name_every_pod_is_local() {
        let policy = policy(&store(ENROLMENT), None);
        assert_eq!(
            enrolled_names(&policy),
            ["plain/opted-in", "shop/elsewhere", "shop/web"]
        );
    }

    #[test]
    fn mtls_and_allow_from_reach_the_pods_and_a_bad_value_keeps_the_last_good_one() {
        let mut store = store(ENROLMENT);
        let shop = |allow_from: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, annotations: \
                 {{aviary.dev/capture: enabled, aviary.dev/mtls: strict, \
                 aviary.dev/allow-from: \"{allow_from}\"}}}}\n"
            );
            objects(&yaml).into_iter().next().unwrap()
        };
        let web = |store: &Store| {
            policy(store, Some("node-a")).enrolled["00000000-0000-4000-8000-000000000001"]
                .inbound
                .clone()
        };
        store.upsert(shop("shop/*")).unwrap();
        let strict = web(&store);
        assert_eq!(strict.mtls, crate::table::admission::MtlsMode::Strict);
        assert_eq!(
            strict.allow_from,
            Some(vec![crate::table::admission::Peer::Namespace(
                "shop".into()
            )])
        );

        let rejected = store.upsert(shop("everyone")).unwrap_err();
        assert!(rejected.kept_previous);
        assert!(
            rejected.reason.contains("aviary.dev/allow-from"),
            "{}",
            rejected.reason
        );
        assert_eq!(web(&store), strict);
    }

    #[test]
    fn inbound_port_exclusions_are_ports_or_refused() {
        let pod = |value: &str| {
            objects(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: shop, uid: u1, \
                 annotations: {{aviary.dev/inbound-ports-exclude: \"{value}\"}}}}\n\
                 status: {{podIP: 10.0.0.5}}\n"
            ))
            .remove(0)
        };
        let mut store = store(ENROLMENT);
        store.upsert(pod("8081, 9090")).unwrap();
        let policy = policy(&store, None);
        let enrolled = &policy.enrolled["u1"];
        assert_eq!(
            enrolled.inbound_ports_excluded,
            BTreeSet::from([8081, 9090])
        );
        assert_eq!(enrolled.ips, BTreeSet::from(["10.0.0.5".parse().unwrap()]));
        for bad in ["http", "0", "70000"] {
            let rejected = store.upsert(pod(bad)).unwrap_err();
            assert!(
                rejected.reason.contains("inbound-ports-exclude"),
                "{rejected}"
            );
        }
    }
}
