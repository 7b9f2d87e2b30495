//! Annotation values: every parser of what users write in annotations (enrolment, inbound port
//! exclusions, mTLS modes and allowed identities, splits, mirrors and what is safe to mirror)
//! takes any value without panicking, through the store's validation and both compilations, as
//! the agent runs them.
//!
//! The input is text, one annotation a line, `key=value`; the same annotations go on each object
//! of a small cluster (its Namespace, a Pod, another node's pod known by its metadata, the
//! Services and the HTTPRoute), so each object kind reads them its own way.
#![no_main]

use std::{collections::BTreeMap, sync::LazyLock};

use aviary_agent::policy::{
    self, compiler, local,
    service_routes::{self, RouteOptions},
    Object, PodMeta, Store,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use libfuzzer_sys::fuzz_target;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f8b6c4-x2x9z
  namespace: shop
  uid: 00000000-0000-4000-8000-000000000001
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f8b6c4, uid: rs, controller: true}]
spec: {nodeName: node-a, containers: []}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-canary, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-x, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.5], targetRef: {kind: Pod, namespace: shop, name: web-7d9f8b6c4-x2x9z}}
- {addresses: [10.0.1.7], targetRef: {kind: Pod, namespace: shop, name: web-7d9f8b6c4-r8k2p}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: core, kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web, port: 80}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: web-canary, port: 80}}}]
"#;

static OBJECTS: LazyLock<Vec<Object>> =
    LazyLock::new(|| local::parse_documents(CLUSTER).expect("the cluster parses"));

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let annotations: BTreeMap<String, String> = text
        .lines()
        .map(|line| {
            let (key, value) = line.split_once('=').unwrap_or((line, ""));
            (key.to_owned(), value.to_owned())
        })
        .collect();

    let mut store = Store::default();
    // A pod on another node, which the agent knows as that node's agent publishes it: its
    // annotations decide whether its own agent measures it.
    let remote = Object::PodMetadata(Box::new(PodMeta::of(&ObjectMeta {
        name: Some("web-7d9f8b6c4-r8k2p".into()),
        namespace: Some("shop".into()),
        uid: Some("00000000-0000-4000-8000-000000000002".into()),
        labels: Some(annotations.clone()),
        annotations: Some(annotations.clone()),
        ..ObjectMeta::default()
    })));
    let _ = store.upsert(remote);
    for object in OBJECTS.iter() {
        let mut object = object.clone();
        let meta = match &mut object {
            Object::Namespace(o) => &mut o.metadata,
            Object::Pod(o) => {
                // A ReplicaSet's pods name their workload by a label too.
                o.metadata.labels = Some(annotations.clone());
                &mut o.metadata
            }
            Object::HttpRoute(o) => &mut o.metadata,
            // The store keeps these as policy reads them, with annotations of their own kind.
            Object::PodMetadata(pod) => {
                pod.metadata.annotations = Some(annotations.clone());
                let _ = store.upsert(object);
                continue;
            }
            Object::Service(o) => {
                o.metadata.annotations = Some(annotations.clone());
                let _ = store.upsert(object);
                continue;
            }
            Object::EndpointSlice(_) => {
                let _ = store.upsert(object);
                continue;
            }
        };
        meta.annotations = Some(annotations.clone());
        // A refusal is an answer too; only a panic is a failure.
        let _ = store.upsert(object);
    }
    for node in [None, Some("node-a")] {
        let policy = policy::compile(&store, node);
        let options = RouteOptions {
            node: node.map(str::to_owned),
            inbound_capture: node.is_some(),
            trust_domain: Some("cluster.local".into()),
        };
        let table = compiler::routing_table(&store, &options);
        let _ = service_routes::local_pods(&policy, &table.pods, options.trust_domain.as_deref());
    }
    let _ = compiler::routing_notes(&store);
});
