//! What an agent tells the other nodes' agents of its node's pods, and reads of theirs.
//!
//! Two facts of a pod on another node shape this node's policy: the workload it belongs to
//! (metrics name an endpoint by it) and whether it is enrolled, with which inbound ports
//! excluded and which identity (then requests to it are tunnelled to its node's agent, which
//! proves that identity, and measured there). Each agent knows its own node's pods in full (it
//! watches them by `spec.nodeName`), so it publishes those facts in one [`NodePods`] object
//! named after its node, and every agent watches these objects instead of every pod of the
//! cluster: an entry changes when a pod comes or goes or its owner, service account or Aviary
//! annotations change, never with its status, and holds a few dozen bytes per pod. Cilium's
//! agents publish their endpoints the same way (CiliumEndpoint). The object is owned by its
//! Node, so it goes with the node. It is a kind of Aviary's own (`deploy/base/crd.yaml`), not
//! a ConfigMap: writing ConfigMaps in the agents' namespace would let an agent's token replace
//! the trust bundle there.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::Node,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    ClusterResourceScope,
};
use kube::{api::PostParams, Api, Client, Resource};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Translate, Update};
use crate::policy::annotations::enrolment_annotations;
use crate::policy::{Kind, Meta, Object, ObjectKey, PodMeta, Store};

/// One node's pods, as its agent publishes them: `aviary.dev/v1alpha1` `NodePods`, cluster
/// scoped, named after the node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePods {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NodePodsSpec,
}

/// The pods by namespace, then by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePodsSpec {
    #[serde(default)]
    pub pods: BTreeMap<String, BTreeMap<String, PublishedPod>>,
}

impl Resource for NodePods {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "NodePods".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "aviary.dev".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "nodepods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What other nodes need of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedPod {
    workload: String,
    /// Only those that decide its enrolment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    host_network: bool,
    /// Its identity's service account, which a tunnel to it requires its agent to prove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_account: Option<String>,
}

/// What `node`'s agent publishes, from the pods the store holds on it.
pub fn of_node(store: &Store, node: &str) -> NodePodsSpec {
    spec_of(store.pods_on(node))
}

/// What a node publishes of `pods`.
pub fn spec_of(pods: impl IntoIterator<Item = PodMeta>) -> NodePodsSpec {
    let mut spec = NodePodsSpec::default();
    for pod in pods {
        let (Some(namespace), Some(name)) = (pod.metadata.namespace, pod.metadata.name) else {
            continue;
        };
        let published = PublishedPod {
            workload: pod.workload,
            annotations: pod.metadata.annotations.unwrap_or_default(),
            host_network: pod.host_network,
            service_account: pod.service_account,
        };
        spec.pods
            .entry(namespace)
            .or_default()
            .insert(name, published);
    }
    spec
}

/// The pods one node's object lists, as the store keeps them.
fn pods_in(node_pods: &NodePods) -> Vec<Object> {
    let mut objects = Vec::new();
    for (namespace, pods) in &node_pods.spec.pods {
        for (name, pod) in pods {
            let annotations = enrolment_annotations(&pod.annotations);
            objects.push(Object::PodMetadata(Box::new(PodMeta {
                metadata: Meta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.clone()),
                    uid: None,
                    annotations: (!annotations.is_empty()).then_some(annotations),
                },
                workload: pod.workload.clone(),
                host_network: pod.host_network,
                service_account: pod.service_account.clone(),
            })));
        }
    }
    objects
}

/// Turns the other nodes' [`NodePods`] into the store's pods of other nodes, one object per
/// pod, so that a change to one pod touches only what reads that pod.
pub struct Reader {
    /// This node, whose own pods are in the store in full.
    node: String,
    /// The pods each node listed last.
    listed: HashMap<String, BTreeSet<ObjectKey>>,
    /// The node whose entry for a pod the store holds: a pod that moved to another node (a
    /// StatefulSet's) is removed only when the node that has it last drops it.
    source: HashMap<ObjectKey, String>,
}

impl Reader {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            listed: HashMap::new(),
            source: HashMap::new(),
        }
    }

    /// Records what `node_pods` lists now (nothing once deleted); returns its pods and the
    /// pods it no longer lists.
    fn follow(&mut self, node_pods: &NodePods, deleted: bool) -> (Vec<Object>, Vec<ObjectKey>) {
        let node = node_pods.metadata.name.clone().unwrap_or_default();
        if node == self.node {
            return (Vec::new(), Vec::new());
        }
        let pods = if deleted {
            Vec::new()
        } else {
            pods_in(node_pods)
        };
        let now: BTreeSet<ObjectKey> = pods.iter().map(Object::key).collect();
        let before = self.listed.remove(&node).unwrap_or_default();
        let mut gone = Vec::new();
        for key in before {
            if !now.contains(&key) && self.source.get(&key) == Some(&node) {
                self.source.remove(&key);
                gone.push(key);
            }
        }
        for key in &now {
            self.source.insert(key.clone(), node.clone());
        }
        if !now.is_empty() {
            self.listed.insert(node, now);
        }
        (pods, gone)
    }
}

impl Translate<NodePods> for Reader {
    const KIND: Kind = Kind::PodMetadata;

    fn relist(&mut self) {
        self.listed.clear();
        self.source.clear();
    }

    fn listed(&mut self, node_pods: NodePods, listing: &mut Vec<Object>) {
        listing.extend(self.follow(&node_pods, false).0);
    }

    fn applied(&mut self, node_pods: NodePods) -> Vec<Update> {
        let (pods, gone) = self.follow(&node_pods, false);
        let gone = gone.into_iter().map(Update::Deleted);
        pods.into_iter().map(Update::Applied).chain(gone).collect()
    }

    fn deleted(&mut self, node_pods: NodePods) -> Vec<Update> {
        let (_, gone) = self.follow(&node_pods, true);
        gone.into_iter().map(Update::Deleted).collect()
    }
}

/// How long a failed write waits before the next, at first and at most.
const RETRY: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(30));

/// Keeps `node`'s [`NodePods`] as `pods` says, from its first value on (sent once the store
/// has listed every kind, so a restarting agent never publishes an empty node).
pub async fn publish(
    client: Client,
    node: String,
    mut pods: watch::Receiver<Option<NodePodsSpec>>,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let api: Api<NodePods> = Api::all(client);
    let mut retry = RETRY.0;
    let owner = loop {
        match nodes.get(&node).await {
            Ok(found) => break owner_reference(&found),
            Err(error) => {
                warn!(%node, %error, ?retry, "cannot read this node's Node, which will own the object of its pods; other nodes learn of its pods once it can be read");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY.1);
            }
        }
    };
    let mut retry = RETRY.0;
    loop {
        let Some(spec) = pods.borrow_and_update().clone() else {
            if pods.changed().await.is_err() {
                return;
            }
            continue;
        };
        let published = NodePods {
            api_version: NodePods::api_version(&()).into_owned(),
            kind: NodePods::kind(&()).into_owned(),
            metadata: ObjectMeta {
                name: Some(node.clone()),
                owner_references: Some(vec![owner.clone()]),
                ..ObjectMeta::default()
            },
            spec,
        };
        match write(&api, published).await {
            Ok(written) => {
                if written {
                    info!(%node, "published this node's pods");
                }
                retry = RETRY.0;
                if pods.changed().await.is_err() {
                    return;
                }
            }
            // Retried with the newest pods: a conflict means the object changed in between.
            Err(error) => {
                warn!(%node, %error, ?retry, "cannot publish this node's pods yet; other nodes keep the last published");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY.1);
            }
        }
    }
}

fn owner_reference(node: &Node) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.metadata.name.clone().unwrap_or_default(),
        uid: node.metadata.uid.clone().unwrap_or_default(),
        ..OwnerReference::default()
    }
}

/// Creates or replaces the object, unless it already says the same; returns whether it wrote.
async fn write(api: &Api<NodePods>, mut published: NodePods) -> Result<bool, kube::Error> {
    let name = published.metadata.name.clone().unwrap_or_default();
    let Some(current) = api.get_opt(&name).await? else {
        api.create(&PostParams::default(), &published).await?;
        return Ok(true);
    };
    if current.spec == published.spec
        && current.metadata.owner_references == published.metadata.owner_references
    {
        return Ok(false);
    }
    published.metadata.resource_version = current.metadata.resource_version;
    api.replace(&name, &PostParams::default(), &published)
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::local::parse_documents;

    const NODE_B: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {aviary.dev/capture: enabled}}
---
apiVersion: v1
kind: Pod
metadata:
  name: payments-7d9f8b-x2x9z
  namespace: shop
  uid: u1
  labels: {pod-template-hash: 7d9f8b}
  annotations: {aviary.dev/inbound-ports-exclude: "9090", kubectl.kubernetes.io/restartedAt: now}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: payments-7d9f8b, uid: rs, controller: true}]
spec: {nodeName: node-b, serviceAccountName: payments, containers: [{name: c, image: test}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: data, uid: u2, annotations: {aviary.dev/capture: disabled}, ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: ss, controller: true}]}
spec: {nodeName: node-b, containers: [{name: c, image: test}]}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere, namespace: shop, uid: u3}
spec: {nodeName: node-c, containers: [{name: c, image: test}]}
---
apiVersion: v1
kind: Pod
metadata: {name: exporter, namespace: shop, uid: u4}
spec: {nodeName: node-b, hostNetwork: true, containers: [{name: c, image: test}]}
"#;

    fn store(yaml: &str) -> Store {
        let mut store = Store::default();
        assert!(store.replace_all(parse_documents(yaml).unwrap()).is_empty());
        store
    }

    /// `node`'s object, listing `namespaces` of `spec` (all of them when empty).
    fn published(node: &str, spec: &NodePodsSpec, namespaces: &[&str]) -> NodePods {
        let mut spec = spec.clone();
        if !namespaces.is_empty() {
            spec.pods.retain(|ns, _| namespaces.contains(&ns.as_str()));
        }
        NodePods {
            metadata: ObjectMeta {
                name: Some(node.into()),
                ..ObjectMeta::default()
            },
            spec,
            ..NodePods::default()
        }
    }

    /// What `reader` makes of `node_pods` in a listing.
    fn listing(reader: &mut Reader, node_pods: NodePods) -> Vec<Object> {
        let mut listing = Vec::new();
        reader.listed(node_pods, &mut listing);
        listing
    }

    fn keys(pods: &[Object]) -> Vec<String> {
        pods.iter().map(|p| p.key().to_string()).collect()
    }

    fn deleted(updates: &[Update]) -> Vec<String> {
        updates
            .iter()
            .filter_map(|u| match u {
                Update::Deleted(key) => Some(key.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_node_publishes_what_other_nodes_read_of_its_pods_and_nothing_else() {
        let store = store(NODE_B);
        let spec = of_node(&store, "node-b");
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            serde_json::json!({"pods": {
                "data": {"db-0": {"workload": "db", "annotations": {"aviary.dev/capture": "disabled"},
                    "serviceAccount": "default"}},
                "shop": {
                    "exporter": {"workload": "exporter", "hostNetwork": true, "serviceAccount": "default"},
                    "payments-7d9f8b-x2x9z": {"workload": "payments",
                        "annotations": {"aviary.dev/inbound-ports-exclude": "9090"},
                        "serviceAccount": "payments"},
                },
            }})
        );
        // Another node reads each pod as its own node's agent would have it, but the UID.
        let mut reader = Reader::new("node-a");
        let read = listing(&mut reader, published("node-b", &spec, &[]));
        let expected: Vec<Object> = store
            .pods_on("node-b")
            .map(|mut pod| {
                pod.metadata.uid = None;
                Object::PodMetadata(Box::new(pod))
            })
            .collect();
        assert_eq!(read, expected);
    }

    #[test]
    fn a_refused_pod_is_published_as_it_is_and_refused_alike_elsewhere() {
        let mut here = store(NODE_B);
        let mut elsewhere = Store::default();
        let mut reader = Reader::new("node-a");
        for pod in listing(
            &mut reader,
            published("node-b", &of_node(&here, "node-b"), &[]),
        ) {
            elsewhere.upsert(pod).unwrap();
        }
        let bad = NODE_B
            .split("---")
            .find(|doc| doc.contains("db-0"))
            .unwrap()
            .replace("aviary.dev/capture: disabled", "aviary.dev/capture: maybe");
        let [pod] = parse_documents(&bad).unwrap().try_into().unwrap();
        let refused = here.upsert(pod).unwrap_err();
        assert!(refused.kept_previous);

        // Node-a refuses it for the same reason, and keeps its last good version too.
        let updates = reader.applied(published("node-b", &of_node(&here, "node-b"), &[]));
        let db: Vec<Object> = updates
            .into_iter()
            .filter_map(|u| match u {
                Update::Applied(pod) if pod.key().name == "db-0" => Some(pod),
                _ => None,
            })
            .collect();
        let [db] = db.try_into().unwrap();
        let refused_elsewhere = elsewhere.upsert(db).unwrap_err();
        assert_eq!(refused_elsewhere.reason, refused.reason);
        assert!(refused_elsewhere.kept_previous);
    }

    #[test]
    fn a_node_skips_its_own_pods_and_drops_pods_another_node_no_longer_runs() {
        let spec = of_node(&store(NODE_B), "node-b");
        let mut on_b = Reader::new("node-b");
        assert!(listing(&mut on_b, published("node-b", &spec, &[])).is_empty());

        let mut reader = Reader::new("node-a");
        assert_eq!(
            keys(&listing(&mut reader, published("node-b", &spec, &[]))),
            [
                "PodMetadata/data/db-0",
                "PodMetadata/shop/exporter",
                "PodMetadata/shop/payments-7d9f8b-x2x9z"
            ]
        );
        // db-0 moves from node-b to node-c; node-c says so first.
        let updates = reader.applied(published("node-c", &spec, &["data"]));
        assert!(matches!(updates.as_slice(), [Update::Applied(_)]));
        let updates = reader.applied(published("node-b", &spec, &["shop"]));
        assert_eq!(
            deleted(&updates),
            Vec::<String>::new(),
            "node-b dropping db-0 leaves node-c's"
        );
        // Node-b goes: its pods go with it, node-c's stay.
        let updates = reader.deleted(published("node-b", &spec, &["shop"]));
        assert_eq!(
            deleted(&updates),
            [
                "PodMetadata/shop/exporter",
                "PodMetadata/shop/payments-7d9f8b-x2x9z"
            ]
        );
        let updates = reader.deleted(published("node-c", &spec, &["data"]));
        assert_eq!(deleted(&updates), ["PodMetadata/data/db-0"]);
    }
}
