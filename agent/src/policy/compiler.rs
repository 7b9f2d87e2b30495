//! The compiler: a store in, policy, the routing table and route statuses out, recompiling
//! after each batch of changes only what read the objects that changed.
//!
//! Each Service compiles on its own (`service_routes::compile_service`), and so does each HTTPRoute's
//! status (`status::compile_route`), through a reader that notes every input it looks up: the
//! Service, its EndpointSlices, the HTTPRoutes attached to it, the Services its routes send
//! to, the pods its endpoints name and their namespaces. A change touches inputs; the units
//! that read them compile again, and their part of the output is swapped for the new one. The
//! outputs are shared maps, so a snapshot shares everything that did not change with the one
//! before it, and the cost of a change follows what it touches, not the size of the cluster.
//! A full compile is the same with every unit touched.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;
use smallvec::SmallVec;

use super::annotations::ServiceAnnotations;
use super::enrolment::{enrolled, EnrolledPod};
use super::object::{Input, ObjectKey};
use super::pod::{is_host_network, is_local, pod_ips};
use super::service_routes::{
    compile_service, full_pod_addresses, Interner, MatchCache, Reader, RouteOptions, ServiceOutput,
};
use super::status::{compile_route, RouteOutput, RouteStatus};
use super::store::Store;
use crate::table::{
    flags::NamespaceFlags, shared_map::SharedMap, AppProtocol, RouteTable, ServiceRoutes, Workload,
};

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

/// A compile's result.
pub struct Compiled {
    pub policy: Policy,
    /// Without `local`, which the publisher adds from the policy.
    pub routes: RouteTable,
    /// Every HTTPRoute's status, by route.
    pub statuses: imbl::OrdMap<ObjectKey, RouteStatus>,
    /// Notes on how routes resolve that this compile made and the one before did not.
    pub notes: Vec<String>,
}

/// What compiles on its own: a Service (its routing and captured addresses), or an HTTPRoute
/// (its status and notes), by (namespace, name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum UnitKey {
    Service(String, String),
    Route(String, String),
}

impl UnitKey {
    /// A Service with neither routes nor routing annotations: it reads no other Service.
    fn is_leaf(&self, store: &Store) -> bool {
        let Self::Service(namespace, name) = self else {
            return false;
        };
        store.routes_on(namespace, name).next().is_none()
            && store
                .service(namespace, name)
                .is_none_or(|svc| !matches!(ServiceAnnotations::parse(svc), Ok(Some(_))))
    }

    /// Whether `input` is the unit's own object (or, for a Service, its EndpointSlices and
    /// attached routes).
    fn is_own(&self, input: &Input) -> bool {
        match (self, input) {
            (
                Self::Service(namespace, name),
                Input::Service(n, m) | Input::Slices(n, m) | Input::Routes(n, m),
            )
            | (Self::Route(namespace, name), Input::Route(n, m)) => namespace == n && name == m,
            _ => false,
        }
    }
}

/// A unit's place among the compiled units.
type UnitId = u32;

enum Output {
    Service(ServiceOutput),
    /// The route's status is in the output map alone.
    Route {
        key: ObjectKey,
        notes: Vec<String>,
    },
}

/// One compiled unit: what it read, and what it gave.
struct Unit {
    /// Shared with `unit_of`, which finds the unit by it.
    key: Arc<UnitKey>,
    /// Hashes of its inputs (a collision only recompiles a unit more often).
    reads: Vec<u64>,
    output: Output,
}

pub struct Compiler {
    options: RouteOptions,
    units: Vec<Option<Unit>>,
    free: Vec<UnitId>,
    unit_of: HashMap<Arc<UnitKey>, UnitId>,
    /// The units that read each input, by the input's hash.
    readers: HashMap<u64, SmallVec<[UnitId; 2]>>,
    matches: MatchCache,
    interner: Interner,
    enrolled: BTreeMap<String, EnrolledPod>,
    /// The pods the store holds in full: they name their addresses over any EndpointSlice.
    full_pods: HashMap<IpAddr, Arc<Workload>>,
    captured: Tally<SocketAddr, ()>,
    services: Tally<SocketAddr, Arc<ServiceRoutes>>,
    consumers: Tally<(String, SocketAddr), Arc<ServiceRoutes>>,
    /// How Services declare their endpoints are read, by pod address: (port, protocol).
    protocols: Tally<IpAddr, (u16, AppProtocol)>,
    /// This node's pods' addresses: the inbound proxy reads the protocols of these only.
    local_ips: HashSet<IpAddr>,
    /// The ports of each local address that the protocol map holds.
    local_ports: HashMap<IpAddr, SmallVec<[u16; 2]>>,
    endpoint_pods: Tally<IpAddr, Arc<Workload>>,
    out: Snapshots,
    /// Notes made since the last compile returned them.
    notes: Vec<String>,
    /// Whether anything was compiled yet: the first update compiles everything.
    started: bool,
}

/// What snapshots share.
#[derive(Default)]
struct Snapshots {
    statuses: imbl::OrdMap<ObjectKey, RouteStatus>,
    flags: imbl::OrdMap<String, Arc<NamespaceFlags>>,
    captured: imbl::OrdSet<SocketAddr>,
    services: SharedMap<SocketAddr, Arc<ServiceRoutes>>,
    consumers: SharedMap<(String, SocketAddr), Arc<ServiceRoutes>>,
    pods: SharedMap<IpAddr, Arc<Workload>>,
    endpoint_protocols: SharedMap<SocketAddr, AppProtocol>,
}

/// What the data path enforces for the node `node` (every pod counts as local when None, as in
/// local mode without a node name).
pub fn policy(store: &Store, node: Option<&str>) -> Policy {
    let options = RouteOptions {
        node: node.map(str::to_owned),
        ..Default::default()
    };
    Compiler::full(store, &options).policy
}

/// The routing table of a whole store: plain policy data. What the proxy learns of endpoints
/// (load, connections) it keeps by address, so it survives a new table by itself.
pub fn routing_table(store: &Store, options: &RouteOptions) -> RouteTable {
    Compiler::full(store, options).routes
}

/// The status of every HTTPRoute the store knows, good or refused, by route.
pub fn route_statuses(store: &Store) -> imbl::OrdMap<ObjectKey, RouteStatus> {
    Compiler::full(store, &RouteOptions::default()).statuses
}

/// What an operator should know about how routes resolve: an HTTPRoute that overrides a
/// Service's annotations, or one whose parent Service does not exist.
pub fn routing_notes(store: &Store) -> Vec<String> {
    let mut notes = Compiler::full(store, &RouteOptions::default()).notes;
    notes.sort();
    notes.dedup();
    notes
}

impl Compiler {
    pub fn new(options: RouteOptions) -> Self {
        Self {
            options,
            units: Vec::new(),
            free: Vec::new(),
            unit_of: HashMap::new(),
            readers: HashMap::new(),
            matches: MatchCache::new(),
            interner: Interner::default(),
            enrolled: BTreeMap::new(),
            full_pods: HashMap::new(),
            captured: Tally::default(),
            services: Tally::default(),
            consumers: Tally::default(),
            protocols: Tally::default(),
            local_ips: HashSet::new(),
            local_ports: HashMap::new(),
            endpoint_pods: Tally::default(),
            out: Snapshots::default(),
            notes: Vec::new(),
            started: false,
        }
    }

    /// Compiles a whole store.
    pub fn full(store: &Store, options: &RouteOptions) -> Compiled {
        let mut compiler = Self::new(options.clone());
        compiler.compile_all(store)
    }

    /// Brings the output up to date with the changes the store noted since the last update.
    pub fn update(&mut self, store: &mut Store) -> Compiled {
        let touched = store.take_touched();
        if !self.started {
            return self.compile_all(store);
        }
        let mut dirty = BTreeSet::new();
        let mut pods_touched = false;
        let mut flags_touched = BTreeSet::new();
        for input in &touched {
            match input {
                // A Service's own inputs make it compile again without a reader.
                Input::Service(namespace, name)
                | Input::Slices(namespace, name)
                | Input::Routes(namespace, name) => {
                    dirty.insert(UnitKey::Service(namespace.clone(), name.clone()));
                }
                Input::Route(namespace, name) => {
                    self.matches.remove(&(namespace.clone(), name.clone()));
                    dirty.insert(UnitKey::Route(namespace.clone(), name.clone()));
                }
                Input::Pod(..) | Input::Namespace(_) => pods_touched = true,
                Input::FeatureFlags(namespace) => {
                    flags_touched.insert(namespace.clone());
                }
            }
            for id in self.readers.get(&input_hash(input)).into_iter().flatten() {
                if let Some(unit) = &self.units[*id as usize] {
                    dirty.insert(UnitKey::clone(&unit.key));
                }
            }
        }
        self.compile_flags(store, flags_touched);
        self.compile(store, dirty, pods_touched)
    }

    fn compile_all(&mut self, store: &Store) -> Compiled {
        let mut dirty: BTreeSet<UnitKey> = self.unit_of.keys().map(|key| (**key).clone()).collect();
        dirty.extend(store.services().map(|svc| {
            let meta = &svc.metadata;
            let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
            UnitKey::Service(namespace, meta.name.clone().unwrap_or_default())
        }));
        dirty.extend(
            store
                .route_names()
                .map(|(namespace, name)| UnitKey::Route(namespace.into(), name.into())),
        );
        let mut namespaces = store.feature_flag_namespaces();
        namespaces.extend(self.out.flags.keys().cloned());
        self.compile_flags(store, namespaces);
        self.compile(store, dirty, true)
    }

    /// The flags of each namespace in `namespaces` again: few objects, each compiled when the
    /// store took it, so a namespace's are gathered whole.
    fn compile_flags(&mut self, store: &Store, namespaces: BTreeSet<String>) {
        for namespace in namespaces {
            let sets: Vec<(String, Arc<aviary_flags::FlagSet>)> = store
                .feature_flags(&namespace)
                .filter_map(|flag| {
                    let set = flag.flags.as_ref().ok()?;
                    Some((flag.metadata.name.clone().unwrap_or_default(), set.clone()))
                })
                .collect();
            if sets.is_empty() {
                self.out.flags.remove(&namespace);
            } else {
                self.out
                    .flags
                    .insert(namespace, Arc::new(NamespaceFlags { sets }));
            }
        }
    }

    fn compile(&mut self, store: &Store, dirty: BTreeSet<UnitKey>, pods_touched: bool) -> Compiled {
        self.started = true;
        // Services that send nowhere else first: those that do then share their backends.
        let (leaves, mut dirty): (BTreeSet<UnitKey>, BTreeSet<UnitKey>) =
            dirty.into_iter().partition(|key| key.is_leaf(store));
        let mut leaves = leaves;
        while let Some(key) = leaves.pop_first() {
            self.recompile(store, key, &dirty);
        }
        while let Some(key) = dirty.pop_first() {
            self.recompile(store, key, &dirty);
        }
        let mut pods_changed = self.endpoint_pods.take_changed();
        let mut protocols_changed = self.protocols.take_changed();
        if pods_touched {
            let node = self.options.node.as_deref();
            let local_ips: HashSet<IpAddr> = store
                .pods()
                .filter(|pod| is_local(pod, node) && !is_host_network(pod))
                .flat_map(pod_ips)
                .collect();
            protocols_changed.extend(self.local_ips.symmetric_difference(&local_ips));
            self.local_ips = local_ips;
            // A node's own pods: few, so they are read again whenever any pod changes.
            self.enrolled = enrolled(store, self.options.node.as_deref());
            let reader = Reader::new(
                store,
                &self.options,
                &mut self.matches,
                &mut self.interner,
                &|_, _, _| None,
            );
            let full_pods = full_pod_addresses(&reader);
            let before = std::mem::replace(&mut self.full_pods, full_pods);
            pods_changed.extend(before.into_keys());
            pods_changed.extend(self.full_pods.keys().copied());
        }
        for ip in pods_changed {
            let pod = self
                .full_pods
                .get(&ip)
                .cloned()
                .or_else(|| self.endpoint_pods.resolve(&ip, least_pod));
            set(&mut self.out.pods, ip, pod);
        }
        for addr in self.captured.take_changed() {
            if self.captured.votes.contains_key(&addr) {
                self.out.captured.insert(addr);
            } else {
                self.out.captured.remove(&addr);
            }
        }
        settle(&mut self.services, &mut self.out.services, first_service);
        settle(&mut self.consumers, &mut self.out.consumers, first_service);
        for ip in protocols_changed {
            self.settle_protocols(ip);
        }
        self.interner.sweep();
        Compiled {
            policy: Policy {
                enrolled: self.enrolled.clone(),
                captured: self.out.captured.clone(),
            },
            statuses: self.out.statuses.clone(),
            notes: std::mem::take(&mut self.notes),
            routes: RouteTable {
                services: self.out.services.clone(),
                consumers: self.out.consumers.clone(),
                pods: self.out.pods.clone(),
                endpoint_protocols: self.out.endpoint_protocols.clone(),
                flags: self.out.flags.clone(),
                ..RouteTable::default()
            },
        }
    }

    /// Compiles one unit again, in place of what it gave before.
    /// `pending` are the units this batch has yet to compile: their output is out of date.
    fn recompile(&mut self, store: &Store, key: UnitKey, pending: &BTreeSet<UnitKey>) {
        let id = self.unit_of.get(&key).copied();
        let before = id.and_then(|id| self.units[id as usize].take());
        let mut notes_before = Vec::new();
        if let (Some(id), Some(unit)) = (id, before) {
            if let Output::Route { notes, .. } = &unit.output {
                notes_before.clone_from(notes);
            }
            self.withdraw(id, unit);
        }
        let (units, unit_of) = (&self.units, &self.unit_of);
        let compiled = |namespace: &str, name: &str, port: u16| {
            let key = UnitKey::Service(namespace.into(), name.into());
            if pending.contains(&key) {
                return None;
            }
            let unit = units[*unit_of.get(&key)? as usize].as_ref()?;
            let Output::Service(output) = &unit.output else {
                return None;
            };
            let (_, routes) = output.services.iter().find(|(_, r)| r.port == port)?;
            Some(routes.default.clone())
        };
        let reader = Reader::new(
            store,
            &self.options,
            &mut self.matches,
            &mut self.interner,
            &compiled,
        );
        let output = match &key {
            UnitKey::Service(namespace, name) => {
                compile_service(&reader, namespace, name).map(Output::Service)
            }
            UnitKey::Route(namespace, name) => {
                compile_route(&reader, namespace, name).map(|RouteOutput { key, status, notes }| {
                    let new = notes.iter().filter(|n| !notes_before.contains(n));
                    self.notes.extend(new.cloned());
                    self.out.statuses.insert(key.clone(), status);
                    Output::Route { key, notes }
                })
            }
        };
        // A unit's own inputs are not kept as reads: `update` finds the unit by them.
        let mut reads: Vec<u64> = reader
            .into_reads()
            .iter()
            .filter(|input| !key.is_own(input))
            .map(input_hash)
            .collect();
        let Some(output) = output else {
            if let Some(id) = id {
                self.unit_of.remove(&key);
                self.free.push(id);
            }
            return;
        };
        let (id, key) = match self.unit_of.get_key_value(&key) {
            Some((shared, id)) => (*id, shared.clone()),
            None => {
                let id = self.free.pop().unwrap_or_else(|| {
                    self.units.push(None);
                    (self.units.len() - 1) as UnitId
                });
                let shared = Arc::new(key);
                self.unit_of.insert(shared.clone(), id);
                (id, shared)
            }
        };
        reads.sort_unstable();
        reads.dedup();
        reads.shrink_to_fit();
        for read in &reads {
            self.readers.entry(*read).or_default().push(id);
        }
        if let Output::Service(output) = &output {
            self.give(id, output);
        }
        self.units[id as usize] = Some(Unit { key, reads, output });
    }

    /// Writes the protocols of a local address's ports, and forgets those of one that is not.
    fn settle_protocols(&mut self, ip: IpAddr) {
        for port in self.local_ports.remove(&ip).into_iter().flatten() {
            self.out
                .endpoint_protocols
                .remove(&SocketAddr::new(ip, port));
        }
        let Some(votes) = self.protocols.votes.get(&ip) else {
            return;
        };
        if !self.local_ips.contains(&ip) {
            return;
        }
        let mut ports: SmallVec<[u16; 2]> = votes.iter().map(|(_, (port, _))| *port).collect();
        ports.sort_unstable();
        ports.dedup();
        for port in &ports {
            let mut declared = votes.iter().filter(|(_, (p, _))| p == port);
            let first = declared.next().map(|(_, (_, protocol))| *protocol);
            // A pod port that Services declare differently is detected.
            let protocol = match first {
                Some(first) if declared.all(|(_, (_, protocol))| *protocol == first) => first,
                _ => AppProtocol::Detect,
            };
            self.out
                .endpoint_protocols
                .insert(SocketAddr::new(ip, *port), protocol);
        }
        self.local_ports.insert(ip, ports);
    }

    /// Adds what a Service gives to the tallies.
    fn give(&mut self, id: UnitId, output: &ServiceOutput) {
        for addr in &output.captured {
            self.captured.add(*addr, id, ());
        }
        for (addr, routes) in &output.services {
            self.services.add(*addr, id, routes.clone());
        }
        for (key, routes) in &output.consumers {
            self.consumers.add(key.clone(), id, routes.clone());
        }
        for (addr, protocol) in declared_protocols(output) {
            self.protocols.add(addr.ip(), id, (addr.port(), protocol));
        }
        for (ip, pod) in &output.pods {
            self.endpoint_pods.add(*ip, id, pod.clone());
        }
    }

    /// Takes back what a unit read and gave.
    fn withdraw(&mut self, id: UnitId, unit: Unit) {
        for read in &unit.reads {
            if let Some(readers) = self.readers.get_mut(read) {
                readers.retain(|reader| *reader != id);
                if readers.is_empty() {
                    self.readers.remove(read);
                }
            }
        }
        let output = match unit.output {
            Output::Service(output) => output,
            Output::Route { key, .. } => {
                self.out.statuses.remove(&key);
                return;
            }
        };
        for addr in &output.captured {
            self.captured.remove(addr, id);
        }
        for (addr, _) in &output.services {
            self.services.remove(addr, id);
        }
        for (key, _) in &output.consumers {
            self.consumers.remove(key, id);
        }
        for (addr, _) in declared_protocols(&output) {
            self.protocols.remove(&addr.ip(), id);
        }
        for (ip, _) in &output.pods {
            self.endpoint_pods.remove(ip, id);
        }
    }
}

/// How each port of a Service declares its endpoints are read (a port's routes are shared by
/// its addresses, so each is counted once).
fn declared_protocols(
    output: &ServiceOutput,
) -> impl Iterator<Item = (SocketAddr, AppProtocol)> + '_ {
    let mut ports: Vec<&Arc<ServiceRoutes>> =
        output.services.iter().map(|(_, routes)| routes).collect();
    ports.dedup_by(|a, b| Arc::ptr_eq(a, b));
    ports.into_iter().flat_map(|routes| {
        routes
            .default
            .endpoints
            .iter()
            .map(|endpoint| (endpoint.addr, routes.protocol))
    })
}

fn input_hash(input: &Input) -> u64 {
    // SipHash with fixed keys: the same input hashes alike for the life of the process.
    let mut hasher = DefaultHasher::new();
    input.hash(&mut hasher);
    hasher.finish()
}

/// What several Services give one key (two Services on one address, an endpoint in two
/// Services), so that one Service taking its part back leaves the others'.
struct Tally<K, V> {
    votes: HashMap<K, SmallVec<[(UnitId, V); 1]>>,
    /// Keys whose votes changed since the output last took them.
    changed: Vec<K>,
}

impl<K, V> Default for Tally<K, V> {
    fn default() -> Self {
        Self {
            votes: HashMap::new(),
            changed: Vec::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Tally<K, V> {
    fn add(&mut self, key: K, unit: UnitId, value: V) {
        self.votes
            .entry(key.clone())
            .or_default()
            .push((unit, value));
        self.changed.push(key);
    }

    /// Takes back every vote of `unit` for `key`.
    fn remove(&mut self, key: &K, unit: UnitId) {
        if let Some(votes) = self.votes.get_mut(key) {
            votes.retain(|(voter, _)| *voter != unit);
            if votes.is_empty() {
                self.votes.remove(key);
            }
            self.changed.push(key.clone());
        }
    }

    fn take_changed(&mut self) -> Vec<K> {
        std::mem::take(&mut self.changed)
    }

    /// The value in force for `key`: `choose` decides between the votes, by their values alone,
    /// so the result never depends on the order Services compiled in.
    fn resolve(&self, key: &K, choose: impl Fn(&[(UnitId, V)]) -> V) -> Option<V> {
        self.votes.get(key).map(|votes| choose(votes))
    }
}

/// Writes the values in force for the keys a tally changed into the output map.
fn settle<K: Hash + Eq + Clone, V: Clone>(
    tally: &mut Tally<K, V>,
    map: &mut SharedMap<K, V>,
    choose: impl Fn(&[(UnitId, V)]) -> V,
) {
    for key in tally.take_changed() {
        let value = tally.resolve(&key, &choose);
        set(map, key, value);
    }
}

fn set<K: Hash + Eq + Clone, V: Clone>(map: &mut SharedMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(value) => {
            map.insert(key, value);
        }
        None => {
            map.remove(&key);
        }
    }
}

/// Of Services that claim one address (which Kubernetes never allows, but files can), the
/// first by namespace and name.
fn first_service(votes: &[(UnitId, Arc<ServiceRoutes>)]) -> Arc<ServiceRoutes> {
    votes
        .iter()
        .map(|(_, routes)| routes)
        .min_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
        .expect("a tally keeps no key without votes")
        .clone()
}

/// Of the pods EndpointSlices name at one address (one that moved, briefly), the first by
/// namespace and name.
fn least_pod(votes: &[(UnitId, Arc<Workload>)]) -> Arc<Workload> {
    votes
        .iter()
        .map(|(_, pod)| pod)
        .min_by(|a, b| {
            (&a.namespace, &a.pod, &a.workload).cmp(&(&b.namespace, &b.pod, &b.workload))
        })
        .expect("a tally keeps no key without votes")
        .clone()
}

#[cfg(test)]
mod tests {
    use crate::policy::fixtures::*;
    use std::fmt::Write as _;

    use proptest::prelude::*;

    use super::*;
    use crate::policy::{local::parse_documents, Kind, Object, ObjectKey, PodMeta};

    const NAMESPACES: [&str; 2] = ["shop", "web"];

    /// One change a source can make: an object applied (as YAML), or one removed.
    #[derive(Debug, Clone)]
    enum Event {
        Apply(String),
        /// A Pod of another node, as its agent publishes it.
        ApplyMetadata(String),
        Delete(Kind, usize, usize),
    }

    fn ip(i: usize) -> String {
        format!("10.244.0.{}", i + 1)
    }

    fn capture(choice: usize) -> &'static str {
        [
            "",
            "aviary.dev/capture: enabled",
            "aviary.dev/capture: disabled",
        ][choice]
    }

    fn namespace() -> impl Strategy<Value = Event> {
        (0..2usize, 0..3usize).prop_map(|(ns, c)| {
            Event::Apply(format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, annotations: {{{}}}}}\n",
                NAMESPACES[ns],
                capture(c)
            ))
        })
    }

    fn service() -> impl Strategy<Value = Event> {
        (
            0..2usize,
            0..4usize,
            0..3usize,
            0..3usize,
            proptest::option::of((0..4usize, 0..4usize, 0..3u32)),
        )
            .prop_map(|(ns, name, vip, app, split)| {
                let split = split
                    .map(|(a, b, w)| format!("aviary.dev/split: \"s{a}={w},s{b}=1\""))
                    .filter(|_| true)
                    .unwrap_or_default();
                let app = ["", ", appProtocol: http", ", appProtocol: kubernetes.io/h2c"][app];
                Event::Apply(format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{name}, namespace: {}, annotations: {{{split}}}}}\n\
                     spec: {{clusterIP: 10.96.0.{}, ports: [{{name: http, port: 80{app}}}]}}\n",
                    NAMESPACES[ns],
                    vip + 1
                ))
            })
    }

    fn slice() -> impl Strategy<Value = Event> {
        (
            0..2usize,
            0..4usize,
            0..2usize,
            proptest::collection::vec((0..6usize, any::<bool>(), proptest::option::of(0..4usize)), 0..3),
        )
            .prop_map(|(ns, service, name, endpoints)| {
                let endpoints: Vec<String> = endpoints
                    .iter()
                    .map(|(i, ready, pod)| {
                        let target = pod
                            .map(|p| format!(", targetRef: {{kind: Pod, name: p{p}}}"))
                            .unwrap_or_default();
                        format!("{{addresses: [\"{}\"], conditions: {{ready: {ready}}}{target}}}", ip(*i))
                    })
                    .collect();
                Event::Apply(format!(
                    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata: {{name: x{name}, namespace: {}, labels: {{kubernetes.io/service-name: s{service}}}}}\n\
                     addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{}]\n",
                    NAMESPACES[ns],
                    endpoints.join(", ")
                ))
            })
    }

    fn route() -> impl Strategy<Value = Event> {
        (
            0..2usize,
            0..3usize,
            0..2usize,
            0..4usize,
            proptest::collection::vec((0..4usize, 0..3u32), 1..3),
            proptest::option::of(0..4usize),
            0..3usize,
        )
            .prop_map(|(ns, name, parent_ns, parent, backends, mirror, header)| {
                let backends: Vec<String> = backends
                    .iter()
                    .map(|(b, w)| format!("{{name: s{b}, port: 80, weight: {w}}}"))
                    .collect();
                // The third is refused: its regular expression does not compile.
                let matches = [
                    "",
                    "matches: [{headers: [{type: RegularExpression, name: x-canary, value: \"a.*\"}]}], ",
                    "matches: [{headers: [{type: RegularExpression, name: x-canary, value: \"(\"}]}], ",
                ][header];
                let filters = mirror
                    .map(|m| format!(", filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: s{m}, port: 80}}}}}}]"))
                    .unwrap_or_default();
                Event::Apply(format!(
                    "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                     metadata: {{name: r{name}, namespace: {}}}\n\
                     spec:\n  parentRefs: [{{group: \"\", kind: Service, name: s{parent}, namespace: {}}}]\n  \
                     rules: [{{{matches}backendRefs: [{}]{filters}}}]\n",
                    NAMESPACES[ns],
                    NAMESPACES[parent_ns],
                    backends.join(", ")
                ))
            })
    }

    fn pod() -> impl Strategy<Value = Event> {
        (0..2usize, 0..4usize, 0..2usize, 0..6usize, 0..3usize, any::<bool>()).prop_map(
            |(ns, name, node, i, c, metadata_only)| {
                let meta = format!(
                    "metadata: {{name: p{name}, namespace: {}, uid: u-{ns}-{name}, annotations: {{{}}}, \
                     labels: {{pod-template-hash: h{node}}}, ownerReferences: [{{apiVersion: apps/v1, \
                     kind: ReplicaSet, name: w{name}-h{node}, uid: r{name}, controller: true}}]}}",
                    NAMESPACES[ns],
                    capture(c)
                );
                let pod = format!(
                    "apiVersion: v1\nkind: Pod\n{meta}\nspec: {{nodeName: node-{node}, containers: []}}\n\
                     status: {{podIP: {}}}\n",
                    ip(i)
                );
                if metadata_only {
                    Event::ApplyMetadata(pod)
                } else {
                    Event::Apply(pod)
                }
            },
        )
    }

    /// A FeatureFlag of two flags from a few keys, sometimes with one flagd refuses.
    fn feature_flag() -> impl Strategy<Value = Event> {
        (0..2usize, 0..3usize, 0..4usize, 0..4usize, any::<bool>()).prop_map(
            |(ns, name, a, b, bad)| {
                let default = if bad { "missing" } else { "on" };
                Event::Apply(format!(
                    "apiVersion: core.openfeature.dev/v1beta1\nkind: FeatureFlag\n\
                     metadata: {{name: f{name}, namespace: {}}}\nspec:\n  flagSpec:\n    flags:\n\
                     {}\n{}\n",
                    NAMESPACES[ns],
                    format_args!("      k{a}: {{state: ENABLED, variants: {{on: true, off: false}}, defaultVariant: on}}"),
                    format_args!("      k{b}x: {{state: ENABLED, variants: {{on: 1}}, defaultVariant: {default}}}"),
                ))
            },
        )
    }

    fn delete() -> impl Strategy<Value = Event> {
        (0..Kind::ALL.len(), 0..2usize, 0..4usize)
            .prop_map(|(kind, ns, name)| Event::Delete(Kind::ALL[kind], ns, name))
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            namespace(),
            service(),
            slice(),
            route(),
            pod(),
            feature_flag(),
            delete()
        ]
    }

    fn apply(store: &mut Store, event: &Event) {
        match event {
            Event::Apply(yaml) => {
                for object in parse_documents(yaml).expect("generated YAML parses") {
                    let _ = store.upsert(object);
                }
            }
            Event::ApplyMetadata(yaml) => {
                for object in parse_documents(yaml).expect("generated YAML parses") {
                    let Object::Pod(pod) = object else {
                        unreachable!("generated as a Pod")
                    };
                    let _ = store.upsert(Object::PodMetadata(Box::new(PodMeta::of(&pod.metadata))));
                }
            }
            Event::Delete(kind, ns, name) => {
                let (namespace, name) = match kind {
                    Kind::Namespace => (String::new(), NAMESPACES[*ns].to_owned()),
                    Kind::Service => (NAMESPACES[*ns].into(), format!("s{name}")),
                    Kind::EndpointSlice => (NAMESPACES[*ns].into(), format!("x{}", name % 2)),
                    Kind::HttpRoute => (NAMESPACES[*ns].into(), format!("r{name}")),
                    Kind::Pod | Kind::PodMetadata => (NAMESPACES[*ns].into(), format!("p{name}")),
                    Kind::FeatureFlag => (NAMESPACES[*ns].into(), format!("f{}", name % 3)),
                };
                store.remove(&ObjectKey {
                    kind: *kind,
                    namespace,
                    name,
                });
            }
        }
    }

    /// Everything compiled, in one text with every map in key order.
    fn render(compiled: &Compiled) -> String {
        let mut out = format!("{:?}\n{:?}\n", compiled.policy, compiled.statuses);
        let routes = &compiled.routes;
        let sorted = |entries: Vec<String>| {
            let mut entries = entries;
            entries.sort();
            entries.join("\n")
        };
        for (name, entries) in [
            (
                "services",
                routes
                    .services
                    .iter()
                    .map(|(k, v)| format!("{k} {v:?}"))
                    .collect(),
            ),
            (
                "consumers",
                routes
                    .consumers
                    .iter()
                    .map(|(k, v)| format!("{k:?} {v:?}"))
                    .collect(),
            ),
            (
                "pods",
                routes
                    .pods
                    .iter()
                    .map(|(k, v)| format!("{k} {v:?}"))
                    .collect(),
            ),
            (
                "protocols",
                routes
                    .endpoint_protocols
                    .iter()
                    .map(|(k, v)| format!("{k} {v:?}"))
                    .collect(),
            ),
            (
                "flags",
                routes
                    .flags
                    .iter()
                    .map(|(k, v)| format!("{k} {v:?}"))
                    .collect(),
            ),
        ] {
            let _ = writeln!(out, "{name}:\n{}", sorted(entries));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// After every batch of changes, what the compiler holds equals a full compile of the
        /// store: recompiling only what read a change misses nothing.
        #[test]
        fn incremental_equals_full(
            batches in proptest::collection::vec(proptest::collection::vec(event(), 1..4), 1..25),
            inbound_capture in any::<bool>(),
        ) {
            let options = RouteOptions {
                node: Some("node-0".into()),
                inbound_capture,
                trust_domain: None,
            };
            let mut store = Store::default();
            let mut compiler = Compiler::new(options.clone());
            for batch in &batches {
                for event in batch {
                    apply(&mut store, event);
                }
                let incremental = compiler.update(&mut store);
                let full = Compiler::full(&store, &options);
                prop_assert_eq!(render(&incremental), render(&full));
            }
        }
    }

    #[test]
    fn changes_are_described_in_one_line() {
        let before = policy(&store(ENROLMENT), Some("node-a"));
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
