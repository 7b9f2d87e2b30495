//! What an agent tells the other nodes' agents of its node's pods, and reads of theirs.
//!
//! Two facts of a pod on another node shape this node's policy: the workload it belongs to
//! (metrics name an endpoint by it) and whether it is enrolled, with which inbound ports
//! excluded (then requests to it are tunnelled to its node's agent and measured there). Each
//! agent knows its own node's pods in full (it watches them by `spec.nodeName`), so it publishes
//! those facts in one ConfigMap in the agent's namespace, `aviary-pods-<node>`, and every agent
//! watches these ConfigMaps by their label instead of watching every pod of the cluster: an
//! entry changes when a pod comes or goes or its owner or Aviary annotations change, never with
//! its status, and holds a few dozen bytes per pod. Cilium's agents publish their endpoints the
//! same way (CiliumEndpoint). The ConfigMap is owned by its Node, so it goes with the node.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{ConfigMap, Node},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{api::PostParams, Api, Client};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Translate, Update};
use crate::policy::{enrolment_annotations, Kind, Meta, Object, ObjectKey, PodMeta, Store};

/// The label every node's ConfigMap carries, which the agents' watch selects.
pub const LABEL: &str = "aviary.dev/node-pods";

/// The ConfigMap that holds `node`'s pods.
pub fn config_map_name(node: &str) -> String {
    format!("aviary-pods-{node}")
}

/// A node's pods as its ConfigMap's data: one entry per namespace (a valid ConfigMap key, which
/// `<namespace>/<pod>` would not be), each a JSON object of pod name → [`PublishedPod`].
pub type NodePods = BTreeMap<String, String>;

/// What other nodes need of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PublishedPod {
    workload: String,
    /// Only those that decide its enrolment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
    #[serde(
        default,
        rename = "hostNetwork",
        skip_serializing_if = "std::ops::Not::not"
    )]
    host_network: bool,
}

/// The data of `node`'s ConfigMap, from the pods the store holds on it.
pub fn of_node(store: &Store, node: &str) -> NodePods {
    data_of(store.pods_on(node))
}

/// A ConfigMap's data listing `pods`.
pub fn data_of(pods: impl IntoIterator<Item = PodMeta>) -> NodePods {
    let mut by_namespace: BTreeMap<String, BTreeMap<String, PublishedPod>> = BTreeMap::new();
    for pod in pods {
        let (Some(namespace), Some(name)) = (pod.metadata.namespace, pod.metadata.name) else {
            continue;
        };
        let published = PublishedPod {
            workload: pod.workload,
            annotations: pod.metadata.annotations.unwrap_or_default(),
            host_network: pod.host_network,
        };
        by_namespace
            .entry(namespace)
            .or_default()
            .insert(name, published);
    }
    by_namespace
        .into_iter()
        .map(|(namespace, pods)| {
            let json = serde_json::to_string(&pods).expect("strings serialize");
            (namespace, json)
        })
        .collect()
}

/// The pods one ConfigMap lists, and the namespaces whose entry could not be read.
fn pods_in(config_map: &ConfigMap) -> (Vec<Object>, BTreeSet<String>) {
    let mut pods = Vec::new();
    let mut unreadable = BTreeSet::new();
    for (namespace, json) in config_map.data.iter().flatten() {
        let published: BTreeMap<String, PublishedPod> = match serde_json::from_str(json) {
            Ok(published) => published,
            Err(error) => {
                warn!(
                    config_map = config_map.metadata.name.as_deref().unwrap_or_default(),
                    namespace,
                    %error,
                    "an entry of another node's pods cannot be read; its pods keep what was \
                     known of them"
                );
                unreadable.insert(namespace.clone());
                continue;
            }
        };
        for (name, pod) in published {
            let annotations = enrolment_annotations(&pod.annotations);
            pods.push(Object::PodMetadata(Box::new(PodMeta {
                metadata: Meta {
                    name: Some(name),
                    namespace: Some(namespace.clone()),
                    uid: None,
                    annotations: (!annotations.is_empty()).then_some(annotations),
                },
                workload: pod.workload,
                host_network: pod.host_network,
            })));
        }
    }
    (pods, unreadable)
}

/// Turns the other nodes' ConfigMaps into the store's pods of other nodes, one object per pod,
/// so that a change to one pod touches only what reads that pod.
pub struct Reader {
    /// This node's own ConfigMap, skipped: its pods are in the store in full.
    own: String,
    /// The pods each ConfigMap listed last.
    listed: HashMap<String, BTreeSet<ObjectKey>>,
    /// The ConfigMap whose entry for a pod the store holds: a pod that moved to another node
    /// (a StatefulSet's) is removed only when the node that has it last drops it.
    source: HashMap<ObjectKey, String>,
}

impl Reader {
    pub fn new(node: &str) -> Self {
        Self {
            own: config_map_name(node),
            listed: HashMap::new(),
            source: HashMap::new(),
        }
    }

    /// Records what `config_map` lists now; returns its pods and the pods it no longer lists.
    fn follow(&mut self, config_map: &ConfigMap, deleted: bool) -> (Vec<Object>, Vec<ObjectKey>) {
        let name = config_map.metadata.name.clone().unwrap_or_default();
        if name == self.own {
            return (Vec::new(), Vec::new());
        }
        let (pods, unreadable) = if deleted {
            Default::default()
        } else {
            pods_in(config_map)
        };
        let mut now: BTreeSet<ObjectKey> = pods.iter().map(Object::key).collect();
        let before = self.listed.remove(&name).unwrap_or_default();
        let mut gone = Vec::new();
        for key in before {
            if unreadable.contains(&key.namespace) {
                now.insert(key);
            } else if !now.contains(&key) && self.source.get(&key) == Some(&name) {
                self.source.remove(&key);
                gone.push(key);
            }
        }
        for key in pods.iter().map(Object::key) {
            self.source.insert(key, name.clone());
        }
        if !now.is_empty() {
            self.listed.insert(name, now);
        }
        (pods, gone)
    }
}

impl Translate<ConfigMap> for Reader {
    const KIND: Kind = Kind::PodMetadata;

    fn relist(&mut self) {
        self.listed.clear();
        self.source.clear();
    }

    fn listed(&mut self, config_map: ConfigMap) -> Vec<Object> {
        self.follow(&config_map, false).0
    }

    fn applied(&mut self, config_map: ConfigMap) -> Vec<Update> {
        let (pods, gone) = self.follow(&config_map, false);
        let gone = gone.into_iter().map(Update::Deleted);
        pods.into_iter().map(Update::Applied).chain(gone).collect()
    }

    fn deleted(&mut self, config_map: ConfigMap) -> Vec<Update> {
        let (_, gone) = self.follow(&config_map, true);
        gone.into_iter().map(Update::Deleted).collect()
    }
}

/// How long a failed write waits before the next, at first and at most.
const RETRY: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(30));

/// Keeps `node`'s ConfigMap in `namespace` as `pods` says, from its first value on (sent once
/// the store has listed every kind, so a restarting agent never publishes an empty node).
pub async fn publish(
    client: Client,
    namespace: String,
    node: String,
    mut pods: watch::Receiver<Option<NodePods>>,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let mut retry = RETRY.0;
    let owner = loop {
        match nodes.get(&node).await {
            Ok(found) => break owner_reference(&found),
            Err(error) => {
                warn!(%node, %error, "cannot read this node's Node, which will own the ConfigMap of its pods; other nodes learn of its pods once it can be read");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY.1);
            }
        }
    };
    let name = config_map_name(&node);
    let mut retry = RETRY.0;
    loop {
        let Some(data) = pods.borrow_and_update().clone() else {
            if pods.changed().await.is_err() {
                return;
            }
            continue;
        };
        let config_map = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                labels: Some([(LABEL.to_owned(), String::new())].into()),
                owner_references: Some(vec![owner.clone()]),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        };
        match write(&api, config_map).await {
            Ok(written) => {
                if written {
                    info!(config_map = %name, "published this node's pods");
                }
                retry = RETRY.0;
                if pods.changed().await.is_err() {
                    return;
                }
            }
            // Retried with the newest pods: a conflict means the object changed in between.
            Err(error) => {
                warn!(config_map = %name, %error, ?retry, "cannot publish this node's pods yet; other nodes keep the last published");
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

/// Creates or replaces the ConfigMap, unless it already says the same; returns whether it
/// wrote.
async fn write(api: &Api<ConfigMap>, mut config_map: ConfigMap) -> Result<bool, kube::Error> {
    let name = config_map.metadata.name.clone().unwrap_or_default();
    let Some(current) = api.get_opt(&name).await? else {
        api.create(&PostParams::default(), &config_map).await?;
        return Ok(true);
    };
    let same = current.data.unwrap_or_default() == config_map.data.clone().unwrap_or_default()
        && current.metadata.labels == config_map.metadata.labels
        && current.metadata.owner_references == config_map.metadata.owner_references;
    if same {
        return Ok(false);
    }
    config_map.metadata.resource_version = current.metadata.resource_version;
    api.replace(&name, &PostParams::default(), &config_map)
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
spec: {nodeName: node-b, containers: [{name: c, image: test}]}
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

    fn config_map(node: &str, data: NodePods) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(config_map_name(node)),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        }
    }

    fn keys(pods: &[Object]) -> Vec<String> {
        pods.iter().map(|p| p.key().to_string()).collect()
    }

    #[test]
    fn a_node_publishes_what_other_nodes_read_of_its_pods_and_nothing_else() {
        let store = store(NODE_B);
        let data = of_node(&store, "node-b");
        assert_eq!(
            data,
            NodePods::from([
                ("data".into(), r#"{"db-0":{"workload":"db","annotations":{"aviary.dev/capture":"disabled"}}}"#.into()),
                ("shop".into(), r#"{"exporter":{"workload":"exporter","hostNetwork":true},"payments-7d9f8b-x2x9z":{"workload":"payments","annotations":{"aviary.dev/inbound-ports-exclude":"9090"}}}"#.into()),
            ])
        );
        // Another node reads each pod as its own node's agent would have it, but the UID.
        let mut reader = Reader::new("node-a");
        let read = reader.listed(config_map("node-b", data));
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
        for pod in reader.listed(config_map("node-b", of_node(&here, "node-b"))) {
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
        let updates = reader.applied(config_map("node-b", of_node(&here, "node-b")));
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
        let data = of_node(&store(NODE_B), "node-b");
        let mut on_b = Reader::new("node-b");
        assert!(on_b.listed(config_map("node-b", data.clone())).is_empty());

        let mut reader = Reader::new("node-a");
        assert_eq!(
            keys(&reader.listed(config_map("node-b", data.clone()))),
            [
                "PodMetadata/data/db-0",
                "PodMetadata/shop/exporter",
                "PodMetadata/shop/payments-7d9f8b-x2x9z"
            ]
        );
        // db-0 moves from node-b to node-c; node-c says so first.
        let moved = NodePods::from([("data".into(), data["data"].clone())]);
        let updates = reader.applied(config_map("node-c", moved));
        assert!(matches!(updates.as_slice(), [Update::Applied(_)]));
        let without_db = NodePods::from([("shop".into(), data["shop"].clone())]);
        let updates = reader.applied(config_map("node-b", without_db));
        assert!(
            updates.iter().all(|u| matches!(u, Update::Applied(_))),
            "node-b dropping db-0 leaves node-c's: {updates:?}"
        );
        // Node-b goes: its pods go with it, node-c's stay.
        let updates = reader.deleted(config_map("node-b", NodePods::new()));
        let gone: Vec<String> = updates
            .iter()
            .map(|u| match u {
                Update::Deleted(key) => key.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            gone,
            [
                "PodMetadata/shop/exporter",
                "PodMetadata/shop/payments-7d9f8b-x2x9z"
            ]
        );
        let updates = reader.deleted(config_map("node-c", NodePods::new()));
        assert_eq!(updates.len(), 1);
    }

    #[test]
    fn an_unreadable_entry_keeps_what_was_known_of_its_pods() {
        let data = of_node(&store(NODE_B), "node-b");
        let mut reader = Reader::new("node-a");
        reader.listed(config_map("node-b", data.clone()));
        let mut broken = data.clone();
        broken.insert("shop".into(), "{not json".into());
        let updates = reader.applied(config_map("node-b", broken));
        assert!(
            updates.iter().all(|u| matches!(u, Update::Applied(_))),
            "nothing is removed: {updates:?}"
        );
        // Once readable again, a pod it no longer lists goes.
        let updates = reader.applied(config_map(
            "node-b",
            NodePods::from([("data".into(), data["data"].clone())]),
        ));
        assert!(updates.iter().any(|u| matches!(
            u,
            Update::Deleted(key) if key.name == "payments-7d9f8b-x2x9z"
        )));
    }
}
