//! Writes what the policy makes of the cluster's objects back to the cluster: HTTPRoute status
//! (`status.parents[]` under controllerName `aviary.dev/agent`) and a Warning Event for each
//! refused object. Only the Lease holder writes, so N nodes do not race to say the same thing.

use std::collections::BTreeMap;

use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::{
    api::core::v1::ObjectReference, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
    Api, Client,
};
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::lease::{LeaseConfig, LeaseHolder};
use crate::policy::{
    feature_flag,
    status::{Condition, RouteStatus, CONTROLLER_NAME},
    Kind, Object, ObjectKey, Store,
};

/// What the cluster should be told: each route's status, and each refused object with why.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Persistent: reports share what did not change, and compare by what did.
    pub routes: imbl::OrdMap<ObjectKey, RouteStatus>,
    pub refused: BTreeMap<ObjectKey, Refusal>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: String,
    pub reference: ObjectReference,
}

impl Report {
    /// The store's refusals, beside the route statuses the publisher compiled.
    pub fn of(store: &Store, routes: imbl::OrdMap<ObjectKey, RouteStatus>) -> Self {
        let refused = store
            .rejections()
            .filter(|(rejected, _)| !refused_in_full(store, &rejected.key))
            .map(|(rejected, object)| {
                let mut reason = rejected.reason.clone();
                if rejected.kept_previous {
                    reason.push_str("; its last good version stays in force");
                }
                let reference = reference(object);
                (rejected.key.clone(), Refusal { reason, reference })
            })
            .collect();
        Self { routes, refused }
    }
}

/// Whether `key` is a pod's metadata whose Pod, on this node, is refused too: the Pod's refusal
/// says it, and one Event for one pod is enough.
fn refused_in_full(store: &Store, key: &ObjectKey) -> bool {
    key.kind == Kind::PodMetadata
        && store.is_rejected(&ObjectKey {
            kind: Kind::Pod,
            ..key.clone()
        })
}

fn reference(object: &Object) -> ObjectReference {
    let (api_version, kind) = match object.kind() {
        Kind::Namespace => ("v1", "Namespace"),
        Kind::Pod | Kind::PodMetadata => ("v1", "Pod"),
        Kind::Service => ("v1", "Service"),
        Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSlice"),
        Kind::HttpRoute => ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        Kind::FeatureFlag => (feature_flag::API_VERSION, feature_flag::KIND),
    };
    let key = object.key();
    ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        name: Some(key.name),
        namespace: (!key.namespace.is_empty()).then_some(key.namespace),
        uid: object.uid().map(str::to_owned),
        ..ObjectReference::default()
    }
}

/// Writes each report while this agent holds the lease; a new holder writes everything once.
pub async fn write_reports(
    client: Client,
    lease: LeaseConfig,
    mut reports: watch::Receiver<Report>,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: Some(lease.identity.clone()),
        },
    );
    let mut tick = tokio::time::interval(lease.renew_every);
    let mut holder = LeaseHolder::new(client.clone(), lease);
    // What this agent wrote while holding the lease.
    let mut written: BTreeMap<ObjectKey, RouteStatus> = BTreeMap::new();
    let mut announced: BTreeMap<ObjectKey, String> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let was_held = holder.is_held();
                match holder.acquire_or_renew().await {
                    Ok(true) if !was_held => info!(lease = %holder.config().name, "holding the status lease: this agent writes route status and Events"),
                    Ok(false) if was_held => info!(lease = %holder.config().name, "lost the status lease"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "cannot reach the status lease; status writes wait"),
                }
            }
            changed = reports.changed() => if changed.is_err() { return },
        }
        if !holder.is_held() {
            written.clear();
            announced.clear();
            continue;
        }
        let report = reports.borrow_and_update().clone();
        written.retain(|key, _| report.routes.contains_key(key));
        for (key, status) in &report.routes {
            if written.get(key) == Some(status) {
                continue;
            }
            match write_route_status(&client, key, status).await {
                Ok(()) => {
                    written.insert(key.clone(), status.clone());
                }
                // Retried on the next tick; a conflict means someone wrote in between.
                Err(e) => debug!(route = %key, error = %e, "route status not written yet"),
            }
        }
        announced.retain(|key, _| report.refused.contains_key(key));
        for (key, refusal) in &report.refused {
            if announced.get(key) == Some(&refusal.reason) {
                continue;
            }
            let event = Event {
                type_: EventType::Warning,
                reason: "Rejected".into(),
                note: Some(refusal.reason.clone()),
                action: "Compile".into(),
                secondary: None,
            };
            match recorder.publish(&event, &refusal.reference).await {
                Ok(()) => {
                    announced.insert(key.clone(), refusal.reason.clone());
                }
                Err(e) => debug!(object = %key, error = %e, "event not recorded yet"),
            }
        }
    }
}

/// Replaces Aviary's entries in the route's `status.parents`, keeping other controllers'
/// entries, under the route's resourceVersion so a concurrent writer is never overwritten.
async fn write_route_status(
    client: &Client,
    key: &ObjectKey,
    status: &RouteStatus,
) -> Result<(), kube::Error> {
    let api: Api<HttpRoute> = Api::namespaced(client.clone(), &key.namespace);
    let current = api.get_status(&key.name).await?;
    let current_parents: Vec<Value> = current
        .status
        .as_ref()
        .map(|s| serde_json::to_value(&s.parents).unwrap_or_default())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let (ours, others): (Vec<Value>, Vec<Value>) = current_parents
        .into_iter()
        .partition(|p| p["controllerName"] == CONTROLLER_NAME);
    let mut parents = others;
    parents.extend(parent_entries(status, &ours));
    let patch = json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "status": {"parents": parents},
    });
    api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Aviary's `status.parents` entries; a condition that did not change keeps its transition time.
fn parent_entries(status: &RouteStatus, previous: &[Value]) -> Vec<Value> {
    let now = serde_json::to_value(Time(Timestamp::now())).unwrap_or_default();
    status
        .parents
        .iter()
        .map(|parent| {
            let parent_ref = json!({
                "group": "",
                "kind": "Service",
                "namespace": parent.namespace,
                "name": parent.name,
                "port": parent.port,
            });
            let before = previous.iter().find(|p| p["parentRef"] == parent_ref);
            let conditions: Vec<Value> = parent
                .conditions
                .iter()
                .map(|condition| condition_entry(condition, status.generation, before, &now))
                .collect();
            json!({
                "parentRef": parent_ref,
                "controllerName": CONTROLLER_NAME,
                "conditions": conditions,
            })
        })
        .collect()
}

fn condition_entry(
    condition: &Condition,
    generation: Option<i64>,
    before: Option<&Value>,
    now: &Value,
) -> Value {
    let unchanged = before
        .and_then(|p| p["conditions"].as_array())
        .and_then(|cs| cs.iter().find(|c| c["type"] == condition.type_))
        .filter(|c| c["status"] == condition.status);
    let since = unchanged.map_or(now, |c| &c["lastTransitionTime"]);
    json!({
        "type": condition.type_,
        "status": condition.status,
        "reason": condition.reason,
        "message": condition.message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{annotations::INBOUND_PORTS_EXCLUDE, status::ParentStatus, PodMeta};
    use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    fn status(accepted: bool) -> RouteStatus {
        let condition = |type_, ok: bool| Condition {
            type_,
            status: if ok { "True" } else { "False" },
            reason: type_,
            message: String::new(),
        };
        RouteStatus {
            uid: None,
            generation: Some(2),
            parents: vec![ParentStatus {
                namespace: "test".into(),
                name: "podinfo".into(),
                port: None,
                conditions: [
                    condition("Accepted", accepted),
                    condition("ResolvedRefs", true),
                ],
            }],
        }
    }

    #[test]
    fn a_pod_refused_in_full_and_by_its_metadata_is_reported_once() {
        let pod = |name: &str| ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            uid: Some(format!("u-{name}")),
            annotations: Some([(INBOUND_PORTS_EXCLUDE.into(), "http".into())].into()),
            ..ObjectMeta::default()
        };
        let mut store = Store::default();
        // One pod on this node, seen by both watches; one on another node, by its metadata.
        let here = Pod {
            metadata: pod("here"),
            ..Pod::default()
        };
        store.upsert(Object::Pod(Box::new(here))).unwrap_err();
        store
            .upsert(Object::PodMetadata(Box::new(PodMeta::of(&pod("here")))))
            .unwrap_err();
        store
            .upsert(Object::PodMetadata(Box::new(PodMeta::of(&pod("there")))))
            .unwrap_err();
        let refused: Vec<String> = Report::of(&store, imbl::OrdMap::new())
            .refused
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(refused, ["Pod/shop/here", "PodMetadata/shop/there"]);
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let first = parent_entries(&status(true), &[]);
        let mut earlier = first[0].clone();
        earlier["conditions"][0]["lastTransitionTime"] = json!("2020-01-01T00:00:00Z");
        earlier["conditions"][1]["lastTransitionTime"] = json!("2020-01-01T00:00:00Z");

        let same = parent_entries(&status(true), std::slice::from_ref(&earlier));
        assert_eq!(
            same[0]["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );

        let flipped = parent_entries(&status(false), &[earlier]);
        assert_ne!(
            flipped[0]["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
        assert_eq!(
            flipped[0]["conditions"][1]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
        assert_eq!(flipped[0]["conditions"][0]["observedGeneration"], 2);
        assert_eq!(flipped[0]["controllerName"], CONTROLLER_NAME);
    }
}
