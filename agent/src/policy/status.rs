//! The status each HTTPRoute should carry, as GAMMA implementations report it: one entry per
//! parent Service, with the conditions Accepted and ResolvedRefs. Pure: the writer in
//! `kubernetes::status` decides when and whether to write it.

use gateway_api::apis::standard::httproutes::HttpRoute;
use serde::Serialize;

use super::annotations::ServiceAnnotations;
use super::gamma;
use super::object::{Kind, ObjectKey};
use super::service_routes::Reader;

/// The controllerName Aviary writes its route status under.
pub const CONTROLLER_NAME: &str = "aviary.dev/agent";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl Condition {
    fn new(type_: &'static str, ok: Result<(), (&'static str, String)>) -> Self {
        match ok {
            Ok(()) => Self {
                type_,
                status: "True",
                reason: type_,
                message: String::new(),
            },
            Err((reason, message)) => Self {
                type_,
                status: "False",
                reason,
                message,
            },
        }
    }
}

/// A route's status for one parent Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParentStatus {
    pub namespace: String,
    pub name: String,
    pub port: Option<i32>,
    pub conditions: [Condition; 2],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteStatus {
    /// Which route this is: a route deleted and created again under its name between two
    /// reports is another one, and needs its status written again.
    pub uid: Option<String>,
    /// The metadata.generation the conditions describe.
    pub generation: Option<i64>,
    pub parents: Vec<ParentStatus>,
}

/// What one HTTPRoute compiles to besides rules: its status, and what an operator should know
/// about how it resolves (a note is logged when it first appears).
#[derive(Debug)]
pub(super) struct RouteOutput {
    pub key: ObjectKey,
    pub status: RouteStatus,
    pub notes: Vec<String>,
}

/// Compiles the HTTPRoute `namespace/name`: its newest version, refused or not, for the
/// status; the version in force for the notes. None when the store knows neither.
pub(super) fn compile_route(r: &Reader, namespace: &str, name: &str) -> Option<RouteOutput> {
    let (in_force, refused) = r.route(namespace, name);
    let (newest, refusal) = match (refused, in_force) {
        (Some((route, reason)), _) => (route, Some(reason)),
        (None, Some(route)) => (route, None),
        (None, None) => return None,
    };
    let notes = in_force.map(|route| notes(route, r)).unwrap_or_default();
    Some(RouteOutput {
        key: key(newest),
        status: status(newest, refusal, r),
        notes,
    })
}

/// An HTTPRoute that overrides a Service's annotations, or one whose parent Service does not
/// exist.
fn notes(route: &HttpRoute, r: &Reader) -> Vec<String> {
    let route_namespace = route.metadata.namespace.as_deref().unwrap_or("default");
    let route_name = route.metadata.name.as_deref().unwrap_or_default();
    let mut notes = Vec::new();
    for parent in gamma::service_parents(route) {
        let (namespace, name) = (&parent.namespace, &parent.name);
        match r.service(namespace, name) {
            None => notes.push(format!(
                "HTTPRoute {route_namespace}/{route_name}: parent Service {namespace}/{name} does not exist; the route applies once it does"
            )),
            Some(svc) if *namespace == route_namespace && annotated(svc) => notes.push(format!(
                "HTTPRoute {route_namespace}/{route_name} wins over the aviary.dev annotations on Service {namespace}/{name}"
            )),
            Some(_) => {}
        }
    }
    notes
}

/// Whether a Service has aviary.dev split or mirror annotations.
fn annotated(svc: &super::service::Service) -> bool {
    matches!(ServiceAnnotations::parse(svc), Ok(Some(_)))
}

fn key(route: &HttpRoute) -> ObjectKey {
    ObjectKey {
        kind: Kind::HttpRoute,
        namespace: route
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: route.metadata.name.clone().unwrap_or_default(),
    }
}

fn status(route: &HttpRoute, refusal: Option<&str>, r: &Reader) -> RouteStatus {
    let namespace = route.metadata.namespace.as_deref().unwrap_or("default");
    let resolved = Condition::new("ResolvedRefs", resolve_backends(route, namespace, r));
    let parents = gamma::service_parents(route)
        .into_iter()
        .map(|parent| {
            let service = r.service(&parent.namespace, &parent.name);
            let accepted = match refusal {
                Some(reason) => Err(("UnsupportedValue", format!("refused: {reason}"))),
                None if service.is_none() => Err((
                    "NoMatchingParent",
                    format!(
                        "Service {}/{} does not exist",
                        parent.namespace, parent.name
                    ),
                )),
                None => Ok(()),
            };
            let mut accepted = Condition::new("Accepted", accepted);
            if refusal.is_none() && service.is_some_and(annotated) {
                accepted.message = format!(
                    "this route wins over the aviary.dev annotations on Service {}/{}",
                    parent.namespace, parent.name
                );
            }
            ParentStatus {
                namespace: parent.namespace,
                name: parent.name,
                port: parent.port,
                conditions: [accepted, resolved.clone()],
            }
        })
        .collect();
    RouteStatus {
        uid: route.metadata.uid.clone(),
        generation: route.metadata.generation,
        parents,
    }
}

/// Every backendRef must be a Service that exists; a missing one takes its share as 500s.
fn resolve_backends(
    route: &HttpRoute,
    namespace: &str,
    r: &Reader,
) -> Result<(), (&'static str, String)> {
    for rule in route.spec.rules.iter().flatten() {
        for backend in rule.backend_refs.iter().flatten() {
            let kind = backend.kind.as_deref().unwrap_or("Service");
            let group = backend.group.as_deref().unwrap_or("");
            if kind != "Service" || !group.is_empty() {
                return Err((
                    "InvalidKind",
                    format!(
                        "backendRef {} is a {group}/{kind}, not a Service",
                        backend.name
                    ),
                ));
            }
            let backend_namespace = backend.namespace.as_deref().unwrap_or(namespace);
            if r.service(backend_namespace, &backend.name).is_none() {
                return Err((
                    "BackendNotFound",
                    format!(
                        "Service {backend_namespace}/{} does not exist; its share fails with 500",
                        backend.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::local::parse_documents;
    use crate::policy::{compiler::route_statuses, Store};

    const CLUSTER: &str = include_str!("../../../tests/fixtures/podinfo.yaml");
    /// podinfo with a split annotation, which an HTTPRoute on it wins over.
    const ANNOTATED: &str = "apiVersion: v1\nkind: Service\n\
        metadata: {name: podinfo, namespace: test, annotations: {aviary.dev/split: podinfo-primary=100}}\n\
        spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n";

    fn route(name: &str, backends: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: {name}, namespace: test, generation: 3}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: podinfo, port: 80}}, \
             {{group: \"\", kind: Service, name: gone}}]\n  rules: [{{backendRefs: [{backends}]}}]\n"
        )
    }

    fn statuses(yaml: &str) -> BTreeMap<String, RouteStatus> {
        let mut store = Store::default();
        store.replace_all(parse_documents(yaml).unwrap());
        route_statuses(&store)
            .into_iter()
            .map(|(key, status)| (key.name, status))
            .collect()
    }

    fn summary(condition: &Condition) -> String {
        format!(
            "{}={}/{}",
            condition.type_, condition.status, condition.reason
        )
    }

    #[test]
    fn accepted_per_parent_and_resolved_refs_per_route() {
        let yaml = [
            CLUSTER,
            ANNOTATED,
            &route(
                "good",
                "{name: podinfo-primary, port: 80, weight: 90}, {name: podinfo-gone, port: 80, weight: 10}",
            ),
        ]
        .join("---\n");
        let status = &statuses(&yaml)["good"];
        assert_eq!(status.generation, Some(3));
        let parents: Vec<(String, Vec<String>)> = status
            .parents
            .iter()
            .map(|p| (p.name.clone(), p.conditions.iter().map(summary).collect()))
            .collect();
        assert_eq!(
            parents,
            [
                (
                    "podinfo".into(),
                    vec![
                        "Accepted=True/Accepted".into(),
                        "ResolvedRefs=False/BackendNotFound".into()
                    ]
                ),
                (
                    "gone".into(),
                    vec![
                        "Accepted=False/NoMatchingParent".into(),
                        "ResolvedRefs=False/BackendNotFound".into()
                    ]
                ),
            ]
        );
        assert!(status.parents[0].conditions[1]
            .message
            .contains("test/podinfo-gone"));
        assert!(status.parents[0].conditions[0]
            .message
            .contains("wins over the aviary.dev annotations on Service test/podinfo"));
    }

    #[test]
    fn a_refused_route_reports_why_and_a_fixed_one_recovers() {
        let bad = route("r", "{name: podinfo-primary, port: 80, weight: 0}");
        let yaml = [CLUSTER, &bad].join("---\n");
        let status = &statuses(&yaml)["r"];
        let accepted = &status.parents[0].conditions[0];
        assert_eq!(summary(accepted), "Accepted=False/UnsupportedValue");
        assert!(
            accepted.message.contains("weight 0"),
            "{}",
            accepted.message
        );

        let good = route("r", "{name: podinfo-primary, port: 80}");
        let mut store = Store::default();
        store.replace_all(parse_documents(&[CLUSTER, &good].join("---\n")).unwrap());
        store
            .upsert(parse_documents(&bad).unwrap().remove(0))
            .unwrap_err();
        let status = &route_statuses(&store)[&key_of(&store)];
        assert_eq!(
            summary(&status.parents[0].conditions[0]),
            "Accepted=False/UnsupportedValue",
            "the refused newest version is what the status describes"
        );
        store
            .upsert(parse_documents(&good).unwrap().remove(0))
            .unwrap();
        let status = &route_statuses(&store)[&key_of(&store)];
        assert_eq!(
            summary(&status.parents[0].conditions[0]),
            "Accepted=True/Accepted"
        );
    }

    fn key_of(store: &Store) -> ObjectKey {
        let (namespace, name) = store.route_names().next().unwrap();
        ObjectKey {
            kind: Kind::HttpRoute,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}
