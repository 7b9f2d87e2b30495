//! The store: the objects policy is compiled from, only valid ones and the last good version of
//! each, with what changed since the compiler last looked.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
};

use json_patch::PatchOperation;
use k8s_openapi::api::core::v1::{Namespace, Pod};

use super::feature_flag::FeatureFlag;
use super::object::{Input, Kind, Object, ObjectKey};
use super::pod::{is_host_network, is_local, service_account, PodFacts, PodMeta};
use super::service::Service;
use super::{slice, workload};

/// An object a source offered that the store refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub key: ObjectKey,
    pub reason: String,
    /// Whether an earlier good version stays in force.
    pub kept_previous: bool,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rejected: {}", self.key, self.reason)?;
        if self.kept_previous {
            write!(f, " (its last good version stays in force)")?;
        }
        Ok(())
    }
}

/// One object's change in the store, for the one log line each change gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(ObjectKey),
    /// With the fields that changed, as "path: old -> new".
    Updated(ObjectKey, Vec<String>),
    Removed(ObjectKey),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Added(key) => write!(f, "{key} added"),
            Self::Updated(key, fields) => write!(f, "{key} updated: {}", fields.join(", ")),
            Self::Removed(key) => write!(f, "{key} removed"),
        }
    }
}

/// How many changed fields a log line names before it says how many more there are.
const FIELDS_NAMED: usize = 4;

/// The fields that differ between two versions of an object, as "path: old -> new" (a JSON
/// patch between them, each operation with the value it replaces).
fn changed_fields(before: &Object, after: &Object) -> Vec<String> {
    let (Ok(before), Ok(after)) = (serde_json::to_value(before), serde_json::to_value(after))
    else {
        return vec!["(not comparable)".into()];
    };
    let null = serde_json::Value::Null;
    let mut fields: Vec<String> = json_patch::diff(&before, &after)
        .iter()
        .filter_map(|operation| {
            let (path, new) = match operation {
                PatchOperation::Add(add) => (&add.path, &add.value),
                PatchOperation::Replace(replace) => (&replace.path, &replace.value),
                PatchOperation::Remove(remove) => (&remove.path, &null),
                // A diff moves, copies and tests nothing.
                _ => return None,
            };
            let old = before.pointer(path.as_str()).unwrap_or(&null);
            Some(format!(
                "{}: {} -> {}",
                dotted(path, &before, &after),
                short(old),
                short(new)
            ))
        })
        .collect();
    if fields.len() > FIELDS_NAMED {
        let more = fields.len() - FIELDS_NAMED;
        fields.truncate(FIELDS_NAMED);
        fields.push(format!("and {more} more"));
    }
    fields
}

/// A JSON pointer as a log line names a field: `metadata.annotations.aviary.dev/split`,
/// `spec.ports[0].port` (a token is an index where the object's either version has an array).
fn dotted(
    path: &json_patch::jsonptr::Pointer,
    before: &serde_json::Value,
    after: &serde_json::Value,
) -> String {
    let mut out = String::new();
    let (mut a, mut b) = (Some(before), Some(after));
    for token in path.tokens() {
        let key = token.decoded();
        if a.is_some_and(serde_json::Value::is_array) || b.is_some_and(serde_json::Value::is_array)
        {
            out.push_str(&format!("[{key}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&key);
        }
        (a, b) = (child(a, &key), child(b, &key));
    }
    out
}

/// The member `key` of an object, or item `key` of an array.
fn child<'v>(value: Option<&'v serde_json::Value>, key: &str) -> Option<&'v serde_json::Value> {
    match value? {
        serde_json::Value::Array(items) => items.get(key.parse::<usize>().ok()?),
        serde_json::Value::Object(fields) => fields.get(key),
        _ => None,
    }
}

/// A value as a log line shows it: at most 40 characters of its JSON.
fn short(value: &serde_json::Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// the reflector cache of both sources, with validation in front of it.
#[derive(Debug, Default, Clone)]
pub struct Store {
    objects: BTreeMap<ObjectKey, Object>,
    /// Objects whose newest version was refused; cleared by a good version or the object going.
    rejected: BTreeMap<ObjectKey, (Rejected, Object)>,
    /// Counts changes, so a consumer can tell whether anything changed since it last looked.
    revision: u64,
    changes: Vec<Change>,
    index: Index,
}

/// What the store keeps beside its objects for the compiler: the objects by the Service they
/// belong to, and what changed since the compiler last looked.
#[derive(Debug, Default, Clone)]
struct Index {
    /// EndpointSlice names by the hash of the Service (namespace, name) they label: the
    /// commonest index, so its key is not two more strings per Service; a lookup checks each
    /// slice's Service, so a collision costs nothing but the check.
    slices_by_service: HashMap<u64, Members<String>>,
    /// HTTPRoutes (namespace, name) by the Service (namespace, name) they attach to.
    routes_by_parent: HashMap<(String, String), Members<(String, String)>>,
    touched: HashSet<Input>,
}

impl Index {
    /// A route's refusal is in its status.
    fn refusal_changed(&mut self, key: &ObjectKey) {
        if key.kind == Kind::HttpRoute {
            let input = Input::Route(key.namespace.clone(), key.name.clone());
            self.touched.insert(input);
        }
    }

    /// Indexes an object that came (`present`) or went, and notes what it touches. An update
    /// is the old version going, then the new one coming.
    fn update(&mut self, object: &Object, present: bool) {
        let key = object.key();
        for input in object.inputs() {
            match &input {
                Input::Slices(namespace, service) => update_set(
                    &mut self.slices_by_service,
                    service_hash(namespace, service),
                    key.name.clone(),
                    present,
                ),
                Input::Routes(namespace, service) => update_set(
                    &mut self.routes_by_parent,
                    (namespace.clone(), service.clone()),
                    (key.namespace.clone(), key.name.clone()),
                    present,
                ),
                _ => {}
            }
            self.touched.insert(input);
        }
    }
}

/// The index key of the Service `namespace/name`.
fn service_hash(namespace: &str, name: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one((namespace, name))
}

/// A sorted set that holds its usual one member inline: most Services have one EndpointSlice
/// and at most one route, and a tree set's smallest allocation is many times one member.
type Members<M> = smallvec::SmallVec<[M; 1]>;

/// Adds `member` to, or removes it from, the set at `key`, which exists only while not empty.
fn update_set<K: std::hash::Hash + Eq, M: Ord>(
    sets: &mut HashMap<K, Members<M>>,
    key: K,
    member: M,
    present: bool,
) {
    if present {
        let set = sets.entry(key).or_default();
        if let Err(at) = set.binary_search(&member) {
            set.insert(at, member);
        }
    } else if let Some(set) = sets.get_mut(&key) {
        if let Ok(at) = set.binary_search(&member) {
            set.remove(at);
        }
        if set.is_empty() {
            sets.remove(&key);
        }
    }
}

impl Store {
    /// Adds or replaces an object; an invalid one is refused and the previous version kept.
    pub fn upsert(&mut self, object: Object) -> Result<(), Rejected> {
        let key = object.key();
        if let Err(reason) = object.validate() {
            let rejected = Rejected {
                kept_previous: self.objects.contains_key(&key),
                key: key.clone(),
                reason,
            };
            self.index.refusal_changed(&key);
            self.rejected.insert(key, (rejected.clone(), object));
            return Err(rejected);
        }
        if self.rejected.remove(&key).is_some() {
            self.index.refusal_changed(&key);
        }
        let change = match self.objects.get(&key) {
            Some(current) if *current == object => return Ok(()),
            Some(current) => Change::Updated(key.clone(), changed_fields(current, &object)),
            None => Change::Added(key.clone()),
        };
        if let Some(previous) = self.objects.insert(key.clone(), object) {
            self.index.update(&previous, false);
        }
        self.index.update(&self.objects[&key], true);
        self.record(change);
        Ok(())
    }

    /// Forgets an object, good version and refusal alike.
    pub fn remove(&mut self, key: &ObjectKey) {
        if self.rejected.remove(key).is_some() {
            self.index.refusal_changed(key);
        }
        if let Some(previous) = self.objects.remove(key) {
            self.index.update(&previous, false);
            self.record(Change::Removed(key.clone()));
        }
    }

    /// Makes the store hold what a complete listing of one kind holds: objects of that kind not
    /// listed are removed, and each listed one is upserted. Returns the refusals.
    pub fn replace_kind(&mut self, kind: Kind, objects: Vec<Object>) -> Vec<Rejected> {
        let listed: BTreeSet<ObjectKey> = objects.iter().map(Object::key).collect();
        let gone: Vec<ObjectKey> = self
            .objects
            .keys()
            .chain(self.rejected.keys())
            .filter(|key| key.kind == kind && !listed.contains(key))
            .cloned()
            .collect();
        for key in &gone {
            self.remove(key);
        }
        objects
            .into_iter()
            .filter_map(|object| self.upsert(object).err())
            .collect()
    }

    /// [`Store::replace_kind`] for every kind at once, as a source that lists everything does.
    pub fn replace_all(&mut self, objects: Vec<Object>) -> Vec<Rejected> {
        let mut by_kind: BTreeMap<Kind, Vec<Object>> =
            Kind::ALL.iter().map(|kind| (*kind, Vec::new())).collect();
        for object in objects {
            by_kind.entry(object.kind()).or_default().push(object);
        }
        by_kind
            .into_iter()
            .flat_map(|(kind, objects)| self.replace_kind(kind, objects))
            .collect()
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The objects whose newest version is refused: why, and that version.
    pub fn rejections(&self) -> impl Iterator<Item = (&Rejected, &Object)> {
        self.rejected
            .values()
            .map(|(rejected, object)| (rejected, object))
    }

    pub fn is_rejected(&self, key: &ObjectKey) -> bool {
        self.rejected.contains_key(key)
    }

    /// The changes since the last call, oldest first.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    fn record(&mut self, change: Change) {
        self.revision += 1;
        self.changes.push(change);
    }

    /// What changed since the last call: the inputs of compiled policy that changes touched.
    pub fn take_touched(&mut self) -> HashSet<Input> {
        std::mem::take(&mut self.index.touched)
    }

    /// The objects of one kind, in key order.
    pub(super) fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        let first = ObjectKey {
            kind,
            namespace: String::new(),
            name: String::new(),
        };
        self.objects
            .range(first..)
            .take_while(move |(key, _)| key.kind == kind)
            .map(|(_, object)| object)
    }

    pub(super) fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Object> {
        self.objects.get(&ObjectKey {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    pub(super) fn namespace(&self, name: &str) -> Option<&Namespace> {
        match self.get(Kind::Namespace, "", name)? {
            Object::Namespace(ns) => Some(ns),
            _ => None,
        }
    }

    pub(super) fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.of_kind(Kind::Pod).filter_map(|o| match o {
            Object::Pod(pod) => Some(pod.as_ref()),
            _ => None,
        })
    }

    pub(super) fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        match self.get(Kind::Pod, namespace, name)? {
            Object::Pod(pod) => Some(pod),
            _ => None,
        }
    }

    /// What policy reads of a pod: from its Pod when it runs here, else as its node's agent
    /// published it.
    pub(super) fn pod_facts(&self, namespace: &str, name: &str) -> Option<PodFacts<'_>> {
        if let Some(pod) = self.pod(namespace, name) {
            return Some(PodFacts {
                annotations: pod.metadata.annotations.as_ref(),
                workload: workload::workload_name(&pod.metadata).into(),
                host_network: is_host_network(pod),
                service_account: Some(service_account(pod)),
            });
        }
        match self.get(Kind::PodMetadata, namespace, name)? {
            Object::PodMetadata(pod) => Some(PodFacts {
                annotations: pod.metadata.annotations.as_ref(),
                workload: pod.workload.as_str().into(),
                host_network: pod.host_network,
                service_account: pod.service_account.as_deref(),
            }),
            _ => None,
        }
    }

    /// What other nodes read of the pods on `node` ([`PodMeta::of`] each), of each pod's newest
    /// version, refused or not: the other nodes refuse it alike and keep its last good version
    /// as this node does, and the lease holder, on whichever node, records why.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = PodMeta> + 'a {
        let refused = self
            .rejected
            .iter()
            .filter(|(key, _)| key.kind == Kind::Pod)
            .map(|(_, (_, object))| object);
        self.of_kind(Kind::Pod)
            .filter(|object| !self.rejected.contains_key(&object.key()))
            .chain(refused)
            .filter_map(|object| match object {
                Object::Pod(pod) if is_local(pod, Some(node)) => Some(PodMeta {
                    host_network: is_host_network(pod),
                    service_account: Some(service_account(pod).to_owned()),
                    ..PodMeta::of(&pod.metadata)
                }),
                _ => None,
            })
    }

    /// The FeatureFlag objects of `namespace`, in name order.
    pub(super) fn feature_flags<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a FeatureFlag> + 'a {
        let first = ObjectKey {
            kind: Kind::FeatureFlag,
            namespace: namespace.to_owned(),
            name: String::new(),
        };
        self.objects
            .range(first..)
            .take_while(move |(key, _)| key.kind == Kind::FeatureFlag && key.namespace == namespace)
            .filter_map(|(_, object)| match object {
                Object::FeatureFlag(flag) => Some(flag.as_ref()),
                _ => None,
            })
    }

    /// The namespaces that have FeatureFlag objects.
    pub(super) fn feature_flag_namespaces(&self) -> BTreeSet<String> {
        self.of_kind(Kind::FeatureFlag)
            .map(|object| object.key().namespace)
            .collect()
    }

    pub(super) fn http_route(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<&gateway_api::apis::standard::httproutes::HttpRoute> {
        match self.get(Kind::HttpRoute, namespace, name)? {
            Object::HttpRoute(route) => Some(route),
            _ => None,
        }
    }

    /// A newer version of the HTTPRoute `namespace/name` that was refused, with why.
    pub(super) fn refused_route(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(&gateway_api::apis::standard::httproutes::HttpRoute, &str)> {
        let key = ObjectKey {
            kind: Kind::HttpRoute,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        match self.rejected.get(&key)? {
            (rejected, Object::HttpRoute(route)) => Some((route, rejected.reason.as_str())),
            _ => None,
        }
    }

    /// Every HTTPRoute the store knows, in force or refused.
    pub(super) fn route_names(&self) -> impl Iterator<Item = (&str, &str)> {
        let first = ObjectKey {
            kind: Kind::HttpRoute,
            namespace: String::new(),
            name: String::new(),
        };
        let is_route = |key: &&ObjectKey| key.kind == Kind::HttpRoute;
        let in_force = self.objects.range(first.clone()..).map(|(key, _)| key);
        let refused = self.rejected.range(first..).map(|(key, _)| key);
        in_force
            .take_while(is_route)
            .chain(refused.take_while(is_route))
            .map(|key| (key.namespace.as_str(), key.name.as_str()))
    }

    /// The HTTPRoutes attached to the Service `namespace/name`, in key order.
    pub(super) fn routes_on(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Iterator<Item = &gateway_api::apis::standard::httproutes::HttpRoute> {
        self.index
            .routes_by_parent
            .get(&(namespace.to_owned(), name.to_owned()))
            .into_iter()
            .flatten()
            .filter_map(|(namespace, name)| self.http_route(namespace, name))
    }

    /// The EndpointSlices of the Service `namespace/name`, in key order.
    pub(super) fn slices_of(&self, namespace: &str, name: &str) -> Vec<&slice::Slice> {
        let Some(names) = self
            .index
            .slices_by_service
            .get(&service_hash(namespace, name))
        else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(
                |slice| match self.get(Kind::EndpointSlice, namespace, slice)? {
                    Object::EndpointSlice(slice) => Some(slice.as_ref()),
                    _ => None,
                },
            )
            .filter(|slice| slice.service() == Some(name))
            .collect()
    }

    pub(super) fn services(&self) -> impl Iterator<Item = &Service> {
        self.of_kind(Kind::Service).filter_map(|o| match o {
            Object::Service(svc) => Some(svc.as_ref()),
            _ => None,
        })
    }

    pub(super) fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        match self.get(Kind::Service, namespace, name)? {
            Object::Service(svc) => Some(svc),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compiler::policy;
    use crate::policy::fixtures::*;
    use crate::policy::Policy;

    #[test]
    fn invalid_objects_are_refused_and_the_last_good_version_kept() {
        let mut store = store(ENROLMENT);
        let bad = objects(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {aviary.dev/capture: "yes please"}}
"#,
        );
        let rejected = store.upsert(bad.into_iter().next().unwrap()).unwrap_err();
        assert!(rejected.kept_previous);
        assert!(
            rejected.reason.contains("\"enabled\" or \"disabled\""),
            "{}",
            rejected.reason
        );
        assert_eq!(rejected.key.to_string(), "Namespace/shop");
        // The namespace's previous (enabled) version still enrols its pods.
        assert!(enrolled_names(&policy(&store, Some("node-a"))).contains(&"shop/web".into()));
    }

    #[test]
    fn pods_without_uid_and_services_with_bad_addresses_are_refused() {
        let mut store = Store::default();
        let rejected = store.replace_all(objects(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: nouid, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: shop}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: badport, namespace: shop}
spec: {clusterIP: 10.96.0.3, ports: [{port: 70000}]}
"#,
        ));
        let reasons: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].contains("metadata.uid"), "{reasons:?}");
        assert!(reasons[1].contains("not an IP address"), "{reasons:?}");
        assert!(reasons[2].contains("outside 1-65535"), "{reasons:?}");
        assert!(!rejected[0].kept_previous);
        assert_eq!(policy(&store, None), Policy::default());
    }

    #[test]
    fn replace_all_removes_objects_no_longer_listed() {
        let mut store = store(ENROLMENT);
        store.replace_all(objects(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: 00000000-0000-4000-8000-000000000001}
spec: {containers: []}
"#,
        ));
        // The namespace that enrolled web is gone, so web is no longer enrolled.
        assert_eq!(policy(&store, None), Policy::default());
    }

    #[test]
    fn a_relist_of_one_kind_leaves_the_others_and_each_change_is_recorded_once() {
        let mut store = store(ENROLMENT);
        store.take_changes();
        let namespaces: Vec<Object> = objects(ENROLMENT)
            .into_iter()
            .filter(|o| o.kind() == Kind::Namespace && o.key().name == "shop")
            .collect();
        store.replace_kind(Kind::Namespace, namespaces);
        let changes: Vec<String> = store.take_changes().iter().map(|c| c.to_string()).collect();
        assert_eq!(changes, ["Namespace/plain removed"]);
        assert!(
            !enrolled_names(&policy(&store, Some("node-a"))).is_empty(),
            "pods are untouched by a namespace relist"
        );

        let revision = store.revision();
        let key = ObjectKey {
            kind: Kind::Namespace,
            namespace: String::new(),
            name: "shop".into(),
        };
        store.remove(&key);
        store.remove(&key);
        assert_eq!(store.revision(), revision + 1);
        assert_eq!(
            store.take_changes(),
            [Change::Removed(key)],
            "removing what is gone changes nothing"
        );
    }

    #[test]
    fn an_update_is_logged_with_the_fields_that_changed() {
        let service = |split: &str| {
            objects(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: shop, annotations: {{aviary.dev/split: \"{split}\"}}}}\n\
                 spec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
            ))
            .remove(0)
        };
        let mut store = Store::default();
        store.upsert(service("a=90,b=10")).unwrap();
        store.upsert(service("a=50,b=50")).unwrap();
        // An item added to a list, and an annotation gone.
        let grown = objects(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.1, ports: [{port: 80}, {port: 81}]}\n",
        )
        .remove(0);
        store.upsert(grown).unwrap();
        let changes: Vec<String> = store.take_changes().iter().map(|c| c.to_string()).collect();
        assert_eq!(
            changes,
            [
                "Service/shop/s added",
                "Service/shop/s updated: metadata.annotations.aviary.dev/split: \"a=90,b=10\" -> \"a=50,b=50\"",
                "Service/shop/s updated: metadata.annotations: {\"aviary.dev/split\":\"a=50,b=50\"} -> null, \
                 spec.ports[1]: null -> {\"port\":81}"
            ]
        );
    }

    #[test]
    fn a_refusal_is_forgotten_when_the_object_is_fixed_or_removed() {
        let mut store = store(ENROLMENT);
        let bad = objects(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {aviary.dev/capture: maybe}}\n",
        );
        store.upsert(bad[0].clone()).unwrap_err();
        assert_eq!(store.rejections().count(), 1);
        let key = bad[0].key();
        assert!(store.is_rejected(&key));
        store.remove(&key);
        assert_eq!(store.rejections().count(), 0);
    }
}
