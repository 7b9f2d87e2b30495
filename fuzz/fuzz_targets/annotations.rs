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
    compiler, enrolment, local, service_routes::RouteOptions, Object, PodMeta, Store,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use libfuzzer_sys::fuzz_target;

/// The shop, whose objects carry the annotations; nothing is dialled.
const CLUSTER: &str = include_str!("../../tests/fixtures/shop.yaml");

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
        name: Some("web-canary-5c8d9f-r8k2p".into()),
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
            // The store keeps no annotations of these.
            Object::EndpointSlice(_) | Object::FeatureFlag(_) => {
                let _ = store.upsert(object);
                continue;
            }
        };
        meta.annotations = Some(annotations.clone());
        // A refusal is an answer too; only a panic is a failure.
        let _ = store.upsert(object);
    }
    for node in [None, Some("node-a")] {
        let policy = compiler::policy(&store, node);
        let options = RouteOptions {
            node: node.map(str::to_owned),
            inbound_capture: node.is_some(),
            trust_domain: Some("cluster.local".into()),
        };
        let table = compiler::routing_table(&store, &options);
        let _ = enrolment::local_pods(
            policy.enrolled.values(),
            &table.pods,
            options.trust_domain.as_deref(),
        );
    }
    let _ = compiler::routing_notes(&store);
});
