//! Policy: Kubernetes objects in, a compiled [`Policy`] out.
//!
//! Sources (files now, the API server later) feed a [`Store`], which refuses invalid objects and
//! keeps the last good version of each. [`compile`] is the one pure function from the store to
//! what the datapath enforces.

pub mod compiler;
pub mod gamma;
pub mod local;
pub mod mirroring;
pub mod security;
pub mod service;
pub mod service_routes;
pub mod slice;
pub mod status;
pub mod workload;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use json_patch::PatchOperation;
use k8s_openapi::api::core::v1::{Namespace, Pod};

use self::service::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::table::admission::InboundPolicy;

/// On a Namespace, enrols its pods; on a Pod, overrides its namespace.
pub const CAPTURE_ANNOTATION: &str = "aviary.dev/capture";
/// On a Pod: ports inbound capture leaves alone, comma-separated (as Istio's
/// `traffic.sidecar.istio.io/excludeInboundPorts`).
pub const INBOUND_PORTS_EXCLUDE: &str = "aviary.dev/inbound-ports-exclude";
/// The annotations of a Pod that decide its enrolment and inbound capture: all that is kept of
/// the annotations of other nodes' pods.
const POD_ANNOTATIONS: [&str; 2] = [CAPTURE_ANNOTATION, INBOUND_PORTS_EXCLUDE];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    HttpRoute,
    /// Another node's pod as its agent publishes it (the workload and the enrolment
    /// annotations, `kubernetes::node_pods`), for the workload names of endpoints and whether
    /// their own agent measures them.
    PodMetadata,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::HttpRoute,
        Kind::PodMetadata,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Namespace => write!(f, "Namespace/{}", self.name),
            kind => write!(f, "{kind:?}/{}/{}", self.namespace, self.name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    /// Only what policy reads of it.
    Service(Box<Service>),
    /// Only what routing reads of it.
    EndpointSlice(Box<slice::Slice>),
    HttpRoute(Box<gateway_api::apis::standard::httproutes::HttpRoute>),
    PodMetadata(Box<PodMeta>),
}

impl Object {
    fn meta(&self) -> MetaRef<'_> {
        match self {
            Self::Namespace(o) => MetaRef::of(&o.metadata),
            Self::Pod(o) => MetaRef::of(&o.metadata),
            Self::Service(o) => o.metadata.as_ref(),
            Self::EndpointSlice(o) => o.metadata.as_ref(),
            Self::HttpRoute(o) => MetaRef::of(&o.metadata),
            Self::PodMetadata(pod) => pod.metadata.as_ref(),
        }
    }

    pub fn uid(&self) -> Option<&str> {
        self.meta().uid
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Namespace(_) => Kind::Namespace,
            Self::Pod(_) => Kind::Pod,
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::HttpRoute(_) => Kind::HttpRoute,
            Self::PodMetadata(_) => Kind::PodMetadata,
        }
    }

    /// Namespaced objects without a namespace are in "default", as kubectl would put them.
    pub fn key(&self) -> ObjectKey {
        let meta = self.meta();
        let namespace = match self.kind() {
            Kind::Namespace => "",
            _ => meta.namespace.unwrap_or("default"),
        };
        ObjectKey {
            kind: self.kind(),
            namespace: namespace.to_owned(),
            name: meta.name.unwrap_or_default().to_owned(),
        }
    }

    /// What compiled policy reads this object as: a change to the object touches these.
    fn inputs(&self) -> Vec<Input> {
        let ObjectKey {
            namespace, name, ..
        } = self.key();
        match self {
            Self::Namespace(_) => vec![Input::Namespace(name)],
            Self::Pod(_) | Self::PodMetadata(_) => vec![Input::Pod(namespace, name)],
            Self::Service(_) => vec![Input::Service(namespace, name)],
            Self::EndpointSlice(slice) => slice
                .service()
                .map(|service| Input::Slices(namespace, service.to_owned()))
                .into_iter()
                .collect(),
            Self::HttpRoute(route) => gamma::service_parents(route)
                .into_iter()
                .map(|parent| Input::Routes(parent.namespace, parent.name))
                .chain([Input::Route(namespace, name)])
                .collect(),
        }
    }

    /// Why the object cannot be used, if it cannot.
    fn validate(&self) -> Result<(), String> {
        let meta = self.meta();
        if meta.name.unwrap_or_default().is_empty() {
            return Err("metadata.name is missing".into());
        }
        if let Some(value) = meta.annotations.and_then(|a| a.get(CAPTURE_ANNOTATION)) {
            Capture::parse(value)?;
        }
        match self {
            Self::Namespace(ns) => security::validate(&ns.metadata),
            Self::Pod(pod) => {
                inbound_ports_excluded(pod.metadata.annotations.as_ref())?;
                security::validate(&pod.metadata)?;
                match pod.metadata.uid.as_deref() {
                    Some(uid) if !uid.is_empty() => Ok(()),
                    _ => Err("metadata.uid is missing: it names the pod's cgroup".into()),
                }
            }
            Self::Service(svc) => {
                service_addresses(svc)?;
                service_routes::ServiceAnnotations::parse(svc).map(drop)
            }
            Self::EndpointSlice(_) => Ok(()),
            Self::HttpRoute(route) => gamma::validate(route),
            // Refused as its own agent refuses the Pod, so that every agent takes the pod for
            // enrolled or not alike.
            Self::PodMetadata(pod) => {
                inbound_ports_excluded(pod.metadata.annotations.as_ref()).map(drop)
            }
        }
    }
}

/// The metadata the store keeps of the kinds it holds by the thousand (Services and
/// EndpointSlices): a Kubernetes `ObjectMeta` is 360 bytes before its first string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Meta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Meta {
    fn as_ref(&self) -> MetaRef<'_> {
        MetaRef {
            name: self.name.as_deref(),
            namespace: self.namespace.as_deref(),
            uid: self.uid.as_deref(),
            annotations: self.annotations.as_ref(),
        }
    }
}

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

/// Of a pod's annotations, those that decide its enrolment.
pub fn enrolment_annotations<'a>(
    annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> BTreeMap<String, String> {
    annotations
        .into_iter()
        .filter(|(key, _)| POD_ANNOTATIONS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// What policy reads of a pod, whichever way the store knows it.
pub(crate) struct PodFacts<'a> {
    pub annotations: Option<&'a BTreeMap<String, String>>,
    pub workload: std::borrow::Cow<'a, str>,
    pub host_network: bool,
    pub service_account: Option<&'a str>,
}

/// The metadata every object has, whichever way it is kept.
struct MetaRef<'a> {
    name: Option<&'a str>,
    namespace: Option<&'a str>,
    uid: Option<&'a str>,
    annotations: Option<&'a BTreeMap<String, String>>,
}

impl<'a> MetaRef<'a> {
    fn of(meta: &'a ObjectMeta) -> Self {
        Self {
            name: meta.name.as_deref(),
            namespace: meta.namespace.as_deref(),
            uid: meta.uid.as_deref(),
            annotations: meta.annotations.as_ref(),
        }
    }
}

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

/// What compiled policy reads from the store, named so that a change finds what read it. Each
/// names (namespace, name), of the object or of the Service it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    Service(String, String),
    /// Which EndpointSlices label a Service, and what they hold.
    Slices(String, String),
    /// Which HTTPRoutes attach to a Service, and what they hold.
    Routes(String, String),
    /// One HTTPRoute.
    Route(String, String),
    /// A pod, as its Pod or its metadata.
    Pod(String, String),
    Namespace(String),
}

/// The objects policy is compiled from: only valid ones, the last good version of each. It is
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
    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> {
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

    fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Object> {
        self.objects.get(&ObjectKey {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    fn namespace(&self, name: &str) -> Option<&Namespace> {
        match self.get(Kind::Namespace, "", name)? {
            Object::Namespace(ns) => Some(ns),
            _ => None,
        }
    }

    fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.of_kind(Kind::Pod).filter_map(|o| match o {
            Object::Pod(pod) => Some(pod.as_ref()),
            _ => None,
        })
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        match self.get(Kind::Pod, namespace, name)? {
            Object::Pod(pod) => Some(pod),
            _ => None,
        }
    }

    /// What policy reads of a pod: from its Pod when it runs here, else as its node's agent
    /// published it.
    fn pod_facts(&self, namespace: &str, name: &str) -> Option<PodFacts<'_>> {
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

    fn http_route(
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
    fn refused_route(
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
    fn route_names(&self) -> impl Iterator<Item = (&str, &str)> {
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
    fn routes_on(
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
    fn slices_of(&self, namespace: &str, name: &str) -> Vec<&slice::Slice> {
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

    fn services(&self) -> impl Iterator<Item = &Service> {
        self.of_kind(Kind::Service).filter_map(|o| match o {
            Object::Service(svc) => Some(svc.as_ref()),
            _ => None,
        })
    }

    fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        match self.get(Kind::Service, namespace, name)? {
            Object::Service(svc) => Some(svc),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    Enabled,
    Disabled,
}

impl Capture {
    fn parse(value: &str) -> Result<Self, String> {
        match value {
            "enabled" => Ok(Self::Enabled),
            "disabled" => Ok(Self::Disabled),
            other => Err(format!(
                "annotation {CAPTURE_ANNOTATION} must be \"enabled\" or \"disabled\", not {other:?}"
            )),
        }
    }

    fn of(annotations: Option<&BTreeMap<String, String>>) -> Option<Self> {
        let value = annotations?.get(CAPTURE_ANNOTATION)?;
        Self::parse(value).ok()
    }
}

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

/// The ports of `aviary.dev/inbound-ports-exclude`, or why they are not ports.
fn inbound_ports_excluded(
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<BTreeSet<u16>, String> {
    let Some(value) = annotations.and_then(|a| a.get(INBOUND_PORTS_EXCLUDE)) else {
        return Ok(BTreeSet::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(format!(
                "annotation {INBOUND_PORTS_EXCLUDE} must list ports (1-65535), not {p:?}"
            )),
        })
        .collect()
}

/// What the datapath enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Enrolled pods on this node, by UID.
    pub enrolled: BTreeMap<String, EnrolledPod>,
    /// Service addresses (ClusterIP:port, TCP) whose connects are captured. Persistent: each
    /// snapshot shares what did not change with the one before.
    pub captured: imbl::OrdSet<SocketAddr>,
}

impl Policy {
    /// One line describing what changed from `before`, or None if nothing did.
    pub fn describe_change(&self, before: &Policy) -> Option<String> {
        let mut parts = Vec::new();
        for (uid, pod) in &self.enrolled {
            if !before.enrolled.contains_key(uid) {
                parts.push(format!("enrolled Pod/{}/{}", pod.namespace, pod.name));
            }
        }
        for (uid, pod) in &before.enrolled {
            if !self.enrolled.contains_key(uid) {
                parts.push(format!("unenrolled Pod/{}/{}", pod.namespace, pod.name));
            }
        }
        // The sets share what did not change, which the diff skips.
        let (mut added, mut removed) = (0, 0);
        for item in before.captured.diff(&self.captured) {
            match item {
                imbl::ordset::DiffItem::Add(_) => added += 1,
                imbl::ordset::DiffItem::Remove(_) => removed += 1,
            }
        }
        if added > 0 {
            parts.push(format!("+{added} captured service addresses"));
        }
        if removed > 0 {
            parts.push(format!("-{removed} captured service addresses"));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// Compiles the store into the policy for the node `node` (every pod counts as local when None,
/// as in local mode without a node name).
pub fn compile(store: &Store, node: Option<&str>) -> Policy {
    let options = service_routes::RouteOptions {
        node: node.map(str::to_owned),
        ..Default::default()
    };
    compiler::Compiler::full(store, &options).policy
}

/// This node's enrolled pods, by UID.
fn enrolled(store: &Store, node: Option<&str>) -> BTreeMap<String, EnrolledPod> {
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
fn is_enrolled(
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

/// hostNetwork pods share the node's network: they are never enrolled and have no address of
/// their own.
/// The service account a pod runs as: "default" when its spec names none, as admission sets it.
fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default")
}

fn is_host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

/// A pod's addresses, from `status.podIPs` (and `status.podIP`, which older objects carry alone).
fn pod_ips(pod: &Pod) -> BTreeSet<IpAddr> {
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

fn is_local(pod: &Pod, node: Option<&str>) -> bool {
    match node {
        None => true,
        Some(node) => pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node),
    }
}

/// Pods that have finished hold no connections worth capturing.
fn is_running(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded") | Some("Failed"))
}

/// The TCP addresses a Service's ClusterIPs answer on. Headless and ExternalName services have
/// none; a malformed address or port makes the whole Service invalid.
fn service_addresses(svc: &Service) -> Result<Vec<SocketAddr>, String> {
    let Some(spec) = &svc.spec else {
        return Ok(Vec::new());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_deref());
    }
    let mut addresses = Vec::new();
    for ip in ips {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("spec.clusterIPs holds {ip:?}, which is not an IP address"))?;
        for port in spec.ports.iter().flatten() {
            if !(1..=65535).contains(&port.port) {
                return Err(format!(
                    "spec.ports has port {}, outside 1-65535",
                    port.port
                ));
            }
            if port.protocol.as_deref().unwrap_or("TCP") == "TCP" {
                addresses.push(SocketAddr::new(ip, port.port as u16));
            }
        }
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(yaml: &str) -> Vec<Object> {
        local::parse_documents(yaml).expect("test YAML parses")
    }

    fn store(yaml: &str) -> Store {
        let mut store = Store::default();
        let rejected = store.replace_all(objects(yaml));
        assert!(rejected.is_empty(), "{rejected:?}");
        store
    }

    fn enrolled_names(policy: &Policy) -> Vec<String> {
        let mut names: Vec<String> = policy
            .enrolled
            .values()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        names.sort();
        names
    }

    const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {aviary.dev/capture: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: 00000000-0000-4000-8000-000000000001}
spec: {nodeName: node-a, serviceAccountName: web, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, uid: 00000000-0000-4000-8000-000000000002,
           annotations: {aviary.dev/capture: disabled}}
spec: {nodeName: node-a, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-in, namespace: plain, uid: 00000000-0000-4000-8000-000000000003,
           annotations: {aviary.dev/capture: enabled}}
spec: {nodeName: node-a, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: bystander, namespace: plain, uid: 00000000-0000-4000-8000-000000000004}
spec: {nodeName: node-a, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere, namespace: shop, uid: 00000000-0000-4000-8000-000000000005}
spec: {nodeName: node-b, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: shop, uid: 00000000-0000-4000-8000-000000000006}
spec: {nodeName: node-a, hostNetwork: true, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: shop, uid: 00000000-0000-4000-8000-000000000007}
spec: {nodeName: node-a, containers: []}
status: {phase: Succeeded}
"#;

    #[test]
    fn enrollment_follows_namespace_and_pod_annotations() {
        let policy = compile(&store(BASE), Some("node-a"));
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
        let policy = compile(&store(BASE), None);
        assert_eq!(
            enrolled_names(&policy),
            ["plain/opted-in", "shop/elsewhere", "shop/web"]
        );
    }

    #[test]
    fn services_are_captured_on_every_cluster_ip_and_tcp_port() {
        let policy = compile(
            &store(
                r#"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00::a"]
  ports: [{port: 80}, {port: 53, protocol: UDP}, {port: 443, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: shop}
spec: {type: ExternalName, externalName: example.invalid, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{port: 8080}]}
"#,
            ),
            None,
        );
        let captured: Vec<String> = policy.captured.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            captured,
            [
                "10.96.0.10:80",
                "10.96.0.10:443",
                "10.96.0.11:8080",
                "[fd00::a]:80",
                "[fd00::a]:443"
            ]
        );
    }

    #[test]
    fn invalid_objects_are_refused_and_the_last_good_version_kept() {
        let mut store = store(BASE);
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
        assert!(enrolled_names(&compile(&store, Some("node-a"))).contains(&"shop/web".into()));
    }

    #[test]
    fn mtls_and_allow_from_reach_the_pods_and_a_bad_value_keeps_the_last_good_one() {
        let mut store = store(BASE);
        let shop = |allow_from: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, annotations: \
                 {{aviary.dev/capture: enabled, aviary.dev/mtls: strict, \
                 aviary.dev/allow-from: \"{allow_from}\"}}}}\n"
            );
            objects(&yaml).into_iter().next().unwrap()
        };
        let web = |store: &Store| {
            compile(store, Some("node-a")).enrolled["00000000-0000-4000-8000-000000000001"]
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
        assert_eq!(compile(&store, None), Policy::default());
    }

    #[test]
    fn replace_all_removes_objects_no_longer_listed() {
        let mut store = store(BASE);
        store.replace_all(objects(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: 00000000-0000-4000-8000-000000000001}
spec: {containers: []}
"#,
        ));
        // The namespace that enrolled web is gone, so web is no longer enrolled.
        assert_eq!(compile(&store, None), Policy::default());
    }

    #[test]
    fn a_relist_of_one_kind_leaves_the_others_and_each_change_is_recorded_once() {
        let mut store = store(BASE);
        store.take_changes();
        let namespaces: Vec<Object> = objects(BASE)
            .into_iter()
            .filter(|o| o.kind() == Kind::Namespace && o.key().name == "shop")
            .collect();
        store.replace_kind(Kind::Namespace, namespaces);
        let changes: Vec<String> = store.take_changes().iter().map(|c| c.to_string()).collect();
        assert_eq!(changes, ["Namespace/plain removed"]);
        assert!(
            !enrolled_names(&compile(&store, Some("node-a"))).is_empty(),
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
        let mut store = store(BASE);
        store.upsert(pod("8081, 9090")).unwrap();
        let policy = compile(&store, None);
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
        let mut store = store(BASE);
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

    #[test]
    fn changes_are_described_in_one_line() {
        let before = compile(&store(BASE), Some("node-a"));
        let mut after = before.clone();
        after
            .enrolled
            .remove("00000000-0000-4000-8000-000000000003");
        after.captured.insert("10.96.0.1:443".parse().unwrap());
        assert_eq!(
            after.describe_change(&before).unwrap(),
            "unenrolled Pod/plain/opted-in, +1 captured service addresses"
        );
        assert_eq!(before.describe_change(&before), None);
    }
}
