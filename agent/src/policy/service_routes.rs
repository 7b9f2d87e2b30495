//! Services, their annotations and EndpointSlices, compiled into each Service's `ServiceRoutes`
//! in the routing table.
//!
//! Simple splits without the Gateway API, as annotations on a Service:
//! - `aviary.dev/split: "reviews-v1=90,reviews-v2=10"`: weighted backends, Services in the same
//!   namespace, reached on the same port number;
//! - `aviary.dev/mirror: reviews-v2`: a Service that gets a copy of idempotent requests;
//! - `aviary.dev/mirror-percent: "50"`: the share mirrored (default 100);
//! - `aviary.dev/mirror-methods: "GET,HEAD,PUT"`: methods declared safe to mirror, beyond the
//!   idempotent GET, HEAD, OPTIONS and TRACE that always are;
//! - `aviary.dev/mirror-idempotency-key: "true"`: any request carrying an `Idempotency-Key`
//!   header is safe to mirror too.
//!
//! The last two also apply to an HTTPRoute's mirrors when set on the HTTPRoute.
//!
//! A service port with neither annotations nor EndpointSlices gets no entry: its connections
//! pass through to the address the pod dialled.

use super::mirroring::declared_safe;
use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use aviary_identity::spiffe::Identity;
use gateway_api::apis::standard::httproutes::HttpRoute;

use super::annotations::{inbound_ports_excluded, split_key, ServiceAnnotations};
use super::enrolment::is_enrolled;
use super::gamma;
use super::object::Input;
use super::pod::{is_host_network, is_local, pod_ips};
use super::request_flags::request_flags;
use super::service::{service_addresses, Service};
use super::slice::{self, Slice};
use super::store::Store;
use crate::table::{
    unknown, AppProtocol, Backend, BackendRef, Endpoint, HeaderModifier, KeySource, Mirror, Rule,
    ServiceRoutes, SplitKey, WeightedBackend, Workload,
};

/// What the routing table depends on besides the store.
#[derive(Debug, Clone, Default)]
pub struct RouteOptions {
    /// This node (every pod is local when None, as in local mode without a node name).
    pub node: Option<String>,
    /// Whether the agents capture inbound traffic (a DaemonSet's agents share their flags).
    pub inbound_capture: bool,
    /// The mesh's trust domain, when the agent has identities.
    pub trust_domain: Option<String>,
}

/// The routes that attach to `port` (those naming no port attach to all).
fn on_port<'a>(attached: &[(&'a HttpRoute, Option<i32>)], port: i32) -> Vec<&'a HttpRoute> {
    attached
        .iter()
        .filter(|(_, p)| p.is_none_or(|p| p == port))
        .map(|(route, _)| *route)
        .collect()
}

/// What one Service compiles to: its part of the policy and of the routing table.
#[derive(Debug, Default)]
pub(super) struct ServiceOutput {
    /// Its addresses, whose connects are captured.
    pub captured: Vec<SocketAddr>,
    pub services: Vec<(SocketAddr, Arc<ServiceRoutes>)>,
    pub consumers: Vec<((String, SocketAddr), Arc<ServiceRoutes>)>,
    /// The pods its EndpointSlices name, on any node: the inbound proxy's clients are often
    /// pods elsewhere.
    pub pods: Vec<(IpAddr, Arc<Workload>)>,
}

impl ServiceOutput {
    /// A Service's output lives as long as the Service: no room for more.
    fn shrink_to_fit(&mut self) {
        self.services.shrink_to_fit();
        self.consumers.shrink_to_fit();
        self.pods.shrink_to_fit();
    }
}

/// Compiles the Service `namespace/name`; None when the store has no such Service.
pub(super) fn compile_service(r: &Reader, namespace: &str, name: &str) -> Option<ServiceOutput> {
    let svc = r.service(namespace, name)?;
    let mut out = ServiceOutput::default();
    // The store refuses a Service whose addresses are not addresses.
    let Ok(addresses) = service_addresses(svc) else {
        return Some(out);
    };
    out.captured.clone_from(&addresses);
    let slices = r.slices(namespace, name);
    for endpoint in slices.iter().flat_map(|slice| &slice.endpoints) {
        let Some(pod) = r.endpoint_pod(namespace, endpoint) else {
            continue;
        };
        for ip in &endpoint.addresses {
            out.pods.push((ip.to_canonical(), pod.clone()));
        }
    }
    let annotations = ServiceAnnotations::parse(svc).ok().flatten();
    // Producer routes live in the Service's namespace and apply to every client; consumer
    // routes live in a client's namespace and apply to its clients only, instead.
    let mut producers = Vec::new();
    let mut consumers: BTreeMap<&str, Vec<(&HttpRoute, Option<i32>)>> = BTreeMap::new();
    for route in r.routes_on(namespace, name) {
        let route_namespace = route.metadata.namespace.as_deref().unwrap_or("default");
        for parent in gamma::service_parents(route) {
            if parent.namespace != namespace || parent.name != name {
                continue;
            }
            if route_namespace == namespace {
                producers.push((route, parent.port));
            } else {
                consumers
                    .entry(route_namespace)
                    .or_default()
                    .push((route, parent.port));
            }
        }
    }
    if annotations.is_none() && producers.is_empty() && consumers.is_empty() && slices.is_empty() {
        return Some(out);
    }
    // The Service's split key, for its own split and the HTTPRoutes on it that name none (as
    // Flagger sets it, on the apex Service); the store refuses a bad one.
    let service_key = split_key(svc.metadata.annotations.as_ref()).ok().flatten();
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
    for port in ports
        .into_iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
    {
        let Some(default) = r.backend(namespace, name, port.port) else {
            continue;
        };
        // An HTTPRoute attached to this port wins over the Service's annotations.
        let http_routes = on_port(&producers, port.port);
        let rules = if !http_routes.is_empty() {
            r.gamma_rules(port.port, &http_routes, service_key.as_ref())
        } else {
            annotations
                .as_ref()
                .map(|a| vec![r.rule(namespace, port.port, &default, a, service_key.as_ref())])
                .unwrap_or_default()
        };
        let protocol = AppProtocol::from_app_protocol(port.app_protocol.as_deref());
        let annotated = http_routes
            .iter()
            .map(|route| route.metadata.annotations.as_ref());
        let flags = request_flags(
            namespace,
            annotated.chain([svc.metadata.annotations.as_ref()]),
        );
        let routes = Arc::new(ServiceRoutes {
            flags,
            namespace: default.namespace.clone(),
            name: default.name.clone(),
            port: port.port as u16,
            protocol,
            rules,
            default,
        });
        let addresses: Vec<SocketAddr> = addresses
            .iter()
            .filter(|a| i32::from(a.port()) == port.port)
            .copied()
            .collect();
        for (client_namespace, attached) in &consumers {
            let consumer_routes = on_port(attached, port.port);
            if consumer_routes.is_empty() {
                continue;
            }
            // A client namespace's routes that name flags name them in its own namespace.
            let annotated = consumer_routes
                .iter()
                .map(|r| r.metadata.annotations.as_ref());
            let consumer = Arc::new(ServiceRoutes {
                flags: request_flags(client_namespace, annotated).or_else(|| routes.flags.clone()),
                rules: r.gamma_rules(port.port, &consumer_routes, service_key.as_ref()),
                ..(*routes).clone()
            });
            for addr in &addresses {
                out.consumers
                    .push((((*client_namespace).to_owned(), *addr), consumer.clone()));
            }
        }
        out.services
            .extend(addresses.into_iter().map(|addr| (addr, routes.clone())));
    }
    out.shrink_to_fit();
    Some(out)
}

/// The pod at every address of the pods the store holds in full, this node's (hostNetwork pods
/// share the node's, so they have none of their own).
pub(super) fn full_pod_addresses(r: &Reader) -> HashMap<IpAddr, Arc<Workload>> {
    let mut pods = HashMap::new();
    for pod in r.store.pods().filter(|pod| !is_host_network(pod)) {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let workload = r.workload(namespace, name);
        for ip in pod_ips(pod) {
            pods.insert(ip, workload.clone());
        }
    }
    pods
}

/// Each HTTPRoute's matches (regexes included) by rule, compiled once per version of the route.
pub(super) type MatchCache = HashMap<(String, String), Arc<Vec<Vec<gamma::RankedMatch>>>>;

/// Strings many compiled objects share (namespaces, workloads), held once.
#[derive(Debug, Default)]
pub(super) struct Interner {
    strings: HashSet<Arc<str>>,
    /// How many strings the last sweep kept.
    kept: usize,
}

impl Interner {
    fn get(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(text) {
            return shared.clone();
        }
        let shared: Arc<str> = text.into();
        self.strings.insert(shared.clone());
        shared
    }

    /// Forgets the strings nothing compiled holds any more, once the set has doubled since the
    /// last sweep (so a sweep costs no more, over time, than the strings it follows).
    pub fn sweep(&mut self) {
        if self.strings.len() > 2 * self.kept.max(1024) {
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.kept = self.strings.len();
        }
    }
}

/// One Service's view of the store while it compiles: every lookup names the input it read,
/// so that the compiler knows what to recompile when that input changes.
pub(super) struct Reader<'a> {
    pub store: &'a Store,
    options: &'a RouteOptions,
    reads: RefCell<Vec<Input>>,
    matches: RefCell<&'a mut MatchCache>,
    interner: RefCell<&'a mut Interner>,
    compiled: &'a CompiledBackend<'a>,
}

/// A Service's own compiled backend for one of its ports, when it is up to date: another
/// Service's route that sends there shares it rather than holding its endpoints again.
pub(super) type CompiledBackend<'a> = dyn Fn(&str, &str, u16) -> Option<Arc<Backend>> + 'a;

impl<'a> Reader<'a> {
    pub fn new(
        store: &'a Store,
        options: &'a RouteOptions,
        matches: &'a mut MatchCache,
        interner: &'a mut Interner,
        compiled: &'a CompiledBackend<'a>,
    ) -> Self {
        Self {
            store,
            options,
            reads: RefCell::default(),
            matches: RefCell::new(matches),
            interner: RefCell::new(interner),
            compiled,
        }
    }

    /// The inputs read so far.
    pub fn into_reads(self) -> Vec<Input> {
        self.reads.into_inner()
    }

    fn read(&self, input: Input) {
        self.reads.borrow_mut().push(input);
    }

    fn intern(&self, text: &str) -> Arc<str> {
        self.interner.borrow_mut().get(text)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&'a Service> {
        self.read(Input::Service(namespace.into(), name.into()));
        self.store.service(namespace, name)
    }

    /// The HTTPRoute `namespace/name`: the version in force, and a newer one refused with why.
    #[allow(clippy::type_complexity)]
    pub fn route(
        &self,
        namespace: &str,
        name: &str,
    ) -> (Option<&'a HttpRoute>, Option<(&'a HttpRoute, &'a str)>) {
        self.read(Input::Route(namespace.into(), name.into()));
        (
            self.store.http_route(namespace, name),
            self.store.refused_route(namespace, name),
        )
    }

    fn slices(&self, namespace: &str, name: &str) -> Vec<&'a Slice> {
        self.read(Input::Slices(namespace.into(), name.into()));
        self.store.slices_of(namespace, name)
    }

    fn routes_on(&self, namespace: &str, name: &str) -> Vec<&'a HttpRoute> {
        self.read(Input::Routes(namespace.into(), name.into()));
        self.store.routes_on(namespace, name).collect()
    }

    fn route_matches(&self, route: &HttpRoute) -> Arc<Vec<Vec<gamma::RankedMatch>>> {
        let key = (
            route
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            route.metadata.name.clone().unwrap_or_default(),
        );
        let mut matches = self.matches.borrow_mut();
        matches
            .entry(key)
            .or_insert_with(|| {
                Arc::new(
                    route
                        .spec
                        .rules
                        .iter()
                        .flatten()
                        .map(gamma::matches)
                        .collect(),
                )
            })
            .clone()
    }

    /// The pod `namespace/name` as the metrics name it: its workload from its metadata.
    fn workload(&self, namespace: &str, name: &str) -> Arc<Workload> {
        self.read(Input::Pod(namespace.into(), name.into()));
        let workload = match self.store.pod_facts(namespace, name) {
            Some(pod) => self.intern(&pod.workload),
            None => unknown(),
        };
        Arc::new(Workload {
            namespace: self.intern(namespace),
            workload,
            pod: name.into(),
        })
    }

    /// Whether the pod `namespace/name` is enrolled on another node, whose inbound proxy
    /// measures the requests it receives on `port` (never one on its node's network).
    fn measured_at_destination(&self, namespace: &str, name: &str, port: u16) -> bool {
        if !self.options.inbound_capture {
            return false;
        }
        self.read(Input::Pod(namespace.into(), name.into()));
        self.read(Input::Namespace(namespace.into()));
        let Some(pod) = self.store.pod_facts(namespace, name) else {
            return false;
        };
        let local = self
            .store
            .pod(namespace, name)
            .is_some_and(|pod| is_local(pod, self.options.node.as_deref()));
        !local
            && !pod.host_network
            && is_enrolled(namespace, pod.annotations, self.store)
            && inbound_ports_excluded(pod.annotations)
                .is_ok_and(|excluded| !excluded.contains(&port))
    }

    /// The identity of the pod `namespace/name` in the trust domain, by the service account its
    /// node's agent published (or its Pod names).
    fn identity(&self, namespace: &str, name: &str) -> Option<Arc<Identity>> {
        let trust_domain = self.options.trust_domain.as_deref()?;
        self.read(Input::Pod(namespace.into(), name.into()));
        let pod = self.store.pod_facts(namespace, name)?;
        Identity::new(trust_domain, namespace, pod.service_account?)
            .ok()
            .map(Arc::new)
    }

    /// The rules of the HTTPRoutes attached to one service port, one per match, in Gateway API
    /// precedence order (ties: the oldest route, then by name, then rule and match order).
    fn gamma_rules(
        &self,
        port: i32,
        routes: &[&HttpRoute],
        service_key: Option<&KeySource>,
    ) -> Vec<Rule> {
        let mut ranked = Vec::new();
        for route in routes {
            let order = gamma::route_order(route);
            let namespace = route.metadata.namespace.as_deref().unwrap_or("default");
            // Salted with the route, so that a user lands on each route's split on its own.
            let route_name = route.metadata.name.as_deref().unwrap_or_default();
            let split_key = split_key(route.metadata.annotations.as_ref())
                .ok()
                .flatten()
                .or_else(|| service_key.cloned())
                .map(|source| {
                    Arc::new(SplitKey {
                        source,
                        salt: format!("{namespace}/{route_name}").into(),
                    })
                });
            let matches = self.route_matches(route);
            for (rule_index, (rule, matches)) in route
                .spec
                .rules
                .iter()
                .flatten()
                .zip(matches.iter())
                .enumerate()
            {
                let Ok(filters) = gamma::filters(rule) else {
                    continue;
                };
                let backends: Vec<WeightedBackend> = rule
                    .backend_refs
                    .iter()
                    .flatten()
                    .map(|b| {
                        let backend_namespace = b.namespace.as_deref().unwrap_or(namespace);
                        let backend = match b.kind.as_deref() {
                            None | Some("Service") => match self.backend(
                                backend_namespace,
                                &b.name,
                                b.port.unwrap_or(port),
                            ) {
                                Some(backend) => BackendRef::Service(backend),
                                None => BackendRef::Invalid {
                                    name: b.name.clone(),
                                    reason: format!(
                                        "Service {backend_namespace}/{} not found",
                                        b.name
                                    ),
                                },
                            },
                            Some(kind) => BackendRef::Invalid {
                                name: b.name.clone(),
                                reason: format!("backendRef kind {kind} is not supported"),
                            },
                        };
                        let (request_headers, response_headers) =
                            gamma::backend_filters(b).unwrap_or_default();
                        WeightedBackend {
                            backend,
                            weight: b.weight.unwrap_or(1).max(0) as u32,
                            request_headers,
                            response_headers,
                        }
                    })
                    .collect();
                let mirror = filters.mirror.as_ref().and_then(|m| {
                    let mirror_namespace = m.namespace.as_deref().unwrap_or(namespace);
                    Some(Mirror::new(
                        self.backend(mirror_namespace, &m.name, m.port.unwrap_or(port))?,
                        m.numerator,
                        m.denominator,
                        declared_safe(route.metadata.annotations.as_ref()).unwrap_or_default(),
                    ))
                });
                let timeout = |d: &Option<String>| {
                    d.as_deref()
                        .and_then(|d| gamma::parse_duration(d).ok().flatten())
                };
                let timeouts = rule.timeouts.as_ref();
                for (match_index, m) in matches.iter().enumerate() {
                    let compiled = Rule {
                        matches: vec![m.request.clone()],
                        backends: backends.clone(),
                        mirror: mirror.clone(),
                        timeout: timeouts.and_then(|t| timeout(&t.request)),
                        backend_timeout: timeouts.and_then(|t| timeout(&t.backend_request)),
                        request_headers: filters.request_headers.clone(),
                        response_headers: filters.response_headers.clone(),
                        split_key: split_key.clone(),
                    };
                    ranked.push((
                        m.rank.clone(),
                        order.clone(),
                        rule_index,
                        match_index,
                        compiled,
                    ));
                }
            }
        }
        ranked.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| (&a.1, a.2, a.3).cmp(&(&b.1, b.2, b.3)))
        });
        // Not collected in place, which would keep room for the ranking beside each rule.
        ranked.iter().map(|(.., rule)| rule.clone()).collect()
    }

    /// The Service `namespace/name` as a backend on `port` (its port with that number, or its
    /// only port), with the ready endpoints its EndpointSlices list for that port.
    fn backend(&self, namespace: &str, name: &str, port: i32) -> Option<Arc<Backend>> {
        let svc = self.service(namespace, name)?;
        let ports = svc.spec.as_ref()?.ports.as_ref()?;
        let service_port = ports
            .iter()
            .find(|p| p.port == port)
            .or_else(|| (ports.len() == 1).then(|| &ports[0]))?;
        if let Some(backend) = (self.compiled)(namespace, name, service_port.port as u16) {
            // What computing it would have read.
            self.read(Input::Slices(namespace.into(), name.into()));
            for pod in backend.endpoints.iter().filter_map(|e| e.pod.as_ref()) {
                self.read(Input::Pod(pod.namespace.to_string(), pod.pod.to_string()));
                if self.options.inbound_capture {
                    self.read(Input::Namespace(pod.namespace.to_string()));
                }
            }
            return Some(backend);
        }
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::new();
        let mut seen = HashSet::new();
        for slice in self.slices(namespace, name) {
            let slice_port = slice.ports.iter().find(|p| p.name == service_port.name);
            let Some(target) = slice_port.and_then(|p| p.port) else {
                continue;
            };
            for endpoint in &slice.endpoints {
                if endpoint.ready == Some(false) {
                    continue;
                }
                for ip in &endpoint.addresses {
                    let addr = SocketAddr::new(*ip, target as u16);
                    if seen.insert(addr) {
                        let pod = self.endpoint_pod(namespace, endpoint);
                        let measured_at_destination = pod.as_ref().is_some_and(|p| {
                            self.measured_at_destination(&p.namespace, &p.pod, addr.port())
                        });
                        let server = pod
                            .as_ref()
                            .filter(|_| measured_at_destination)
                            .and_then(|p| self.identity(&p.namespace, &p.pod));
                        endpoints.push(Endpoint::new(addr, pod, measured_at_destination, server));
                    }
                }
            }
        }
        endpoints.shrink_to_fit();
        Some(Arc::new(Backend {
            namespace: self.intern(namespace),
            name: name.into(),
            port: service_port.port as u16,
            endpoints,
        }))
    }

    /// The pod an EndpointSlice endpoint names, with its workload when its metadata is known.
    fn endpoint_pod(&self, namespace: &str, endpoint: &slice::Endpoint) -> Option<Arc<Workload>> {
        let pod = endpoint.pod.as_ref()?;
        let namespace = pod.namespace.as_deref().unwrap_or(namespace);
        Some(self.workload(namespace, &pod.name))
    }

    fn rule(
        &self,
        namespace: &str,
        port: i32,
        default: &Arc<Backend>,
        a: &ServiceAnnotations,
        split_key: Option<&KeySource>,
    ) -> Rule {
        let weighted = |backend: BackendRef, weight: u32| WeightedBackend {
            backend,
            weight,
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
        };
        let backends = if a.split.is_empty() {
            vec![weighted(BackendRef::Service(default.clone()), 1)]
        } else {
            a.split
                .iter()
                .map(|(name, weight)| {
                    let backend = match self.backend(namespace, name, port) {
                        Some(backend) => BackendRef::Service(backend),
                        // Its share fails with 500, as a Gateway API route's unresolved backend.
                        None => BackendRef::Invalid {
                            name: name.clone(),
                            reason: format!("Service {namespace}/{name} not found"),
                        },
                    };
                    weighted(backend, *weight)
                })
                .collect()
        };
        let mirror = a.mirror.as_ref().and_then(|name| {
            Some(Mirror::new(
                self.backend(namespace, name, port)?,
                a.mirror_percent,
                100,
                a.mirror_safe.clone(),
            ))
        });
        Rule {
            backends,
            mirror,
            split_key: split_key.map(|source| {
                Arc::new(SplitKey {
                    source: source.clone(),
                    salt: format!("{namespace}/{}", default.name).into(),
                })
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Method;

    use super::*;
    use crate::{
        policy::compiler::{routing_notes, routing_table},
        table::RouteTable,
    };
    use crate::{
        policy::{local::parse_documents, Object, PodMeta},
        table::{PathMatch, SafeMethods},
    };

    /// The options of local mode.
    fn local() -> RouteOptions {
        RouteOptions::default()
    }

    use crate::policy::fixtures::store;

    fn slice(service: &str, ips: &[&str], ready: bool) -> String {
        let endpoints: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{addresses: [\"{ip}\"], conditions: {{ready: {ready}}}}}"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-x, namespace: shop, \
             labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\n\
             ports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        )
    }

    fn svc(name: &str, ip: &str, annotations: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop, annotations: {{{annotations}}}}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, appProtocol: http}}]}}\n"
        )
    }

    const CLUSTER: &str = "---\n";

    fn cluster(annotations: &str) -> String {
        [
            svc("reviews", "10.96.0.10", annotations),
            svc("reviews-v1", "10.96.0.11", ""),
            svc("reviews-v2", "10.96.0.12", ""),
            slice("reviews-v1", &["10.244.1.11", "10.244.1.12"], true),
            slice("reviews-v2", &["10.244.1.21", "10.244.1.22"], true),
            slice("reviews", &["10.244.1.11", "10.244.1.30"], false),
        ]
        .join(CLUSTER)
    }

    fn addrs(backend: &Backend) -> Vec<String> {
        backend
            .endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect()
    }

    #[test]
    fn split_annotations_become_a_weighted_rule_over_the_backends_endpoints() {
        let annotations =
            "aviary.dev/split: \"reviews-v1=90,reviews-v2=10\", aviary.dev/mirror: reviews-v2, \
                           aviary.dev/mirror-percent: \"50\", aviary.dev/mirror-methods: \"PUT\"";
        let table = routing_table(&store(&cluster(annotations)), &local());
        let routes = &table.services[&"10.96.0.10:80".parse::<SocketAddr>().unwrap()];
        assert_eq!(
            (&*routes.name, routes.port, routes.protocol),
            ("reviews", 80, AppProtocol::Http1)
        );
        // Not-ready endpoints are left out.
        assert!(routes.default.endpoints.is_empty());
        let rule = &routes.rules[0];
        let weights: Vec<(String, u32)> = rule
            .backends
            .iter()
            .map(|b| (b.backend.name().to_owned(), b.weight))
            .collect();
        assert_eq!(
            weights,
            [("reviews-v1".into(), 90), ("reviews-v2".into(), 10)]
        );
        let BackendRef::Service(v1) = &rule.backends[0].backend else {
            panic!()
        };
        assert_eq!(addrs(v1), ["10.244.1.11:8080", "10.244.1.12:8080"]);
        let mirror = rule.mirror.as_ref().unwrap();
        assert_eq!(
            (&*mirror.backend.name, mirror.numerator, mirror.denominator),
            ("reviews-v2", 50, 100)
        );
        assert_eq!(mirror.safe_methods.extra, [Method::PUT]);
        // The backends' own services are routed too (they have endpoints), without rules.
        assert!(
            table.services[&"10.96.0.11:80".parse::<SocketAddr>().unwrap()]
                .rules
                .is_empty()
        );
    }

    #[test]
    fn an_unknown_split_backend_takes_its_share_as_an_error() {
        let table = routing_table(
            &store(&cluster("aviary.dev/split: \"reviews-v1=50,ghost=50\"")),
            &local(),
        );
        let rule = &table.services[&"10.96.0.10:80".parse::<SocketAddr>().unwrap()].rules[0];
        assert!(
            matches!(&rule.backends[1].backend, BackendRef::Invalid { reason, .. } if reason.contains("shop/ghost not found"))
        );
    }

    #[test]
    fn services_without_slices_or_annotations_pass_through() {
        let table = routing_table(&store(&svc("plain", "10.96.0.40", "")), &local());
        assert!(table.services.is_empty());
    }

    #[test]
    fn bad_annotations_are_refused_with_the_reason() {
        let cases = [
            ("aviary.dev/split: \"a=90,b\"", "not service=weight"),
            ("aviary.dev/split: \"a=-1\"", "not a whole number"),
            ("aviary.dev/split: \"a=0,b=0\"", "every weight is 0"),
            ("aviary.dev/split: \"a=1,a=2\"", "appears twice"),
            ("aviary.dev/split: \"Bad_Name=1\"", "not a Service name"),
            (
                "aviary.dev/mirror: m, aviary.dev/mirror-percent: \"150\"",
                "from 0 to 100",
            ),
            (
                "aviary.dev/mirror: m, aviary.dev/mirror-methods: \"GET,get\"",
                "not an HTTP method",
            ),
            ("aviary.dev/mirror-percent: \"5\"", "need aviary.dev/mirror"),
            (
                "aviary.dev/mirror: m, aviary.dev/mirror-idempotency-key: \"yes\"",
                "must be \"true\" or \"false\"",
            ),
        ];
        for (annotations, reason) in cases {
            let objects = parse_documents(&svc("reviews", "10.96.0.10", annotations)).unwrap();
            let rejected = Store::default().replace_all(objects);
            assert_eq!(rejected.len(), 1, "{annotations}");
            assert!(
                rejected[0].reason.contains(reason),
                "{annotations}: {}",
                rejected[0].reason
            );
        }
    }

    /// An HTTPRoute on `podinfo`, written the way Flagger's gatewayapi provider writes them.
    fn route(name: &str, rules: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  parentRefs: [{{group: core, kind: Service, name: reviews, port: 80}}]\n  rules:\n{rules}"
        )
    }

    fn with_route(route: &str) -> RouteTable {
        let yaml = [
            cluster("aviary.dev/split: \"reviews-v1=50,reviews-v2=50\""),
            route.to_owned(),
        ]
        .join(CLUSTER);
        routing_table(&store(&yaml), &local())
    }

    fn rules(table: &RouteTable) -> &[Rule] {
        &table.services[&"10.96.0.10:80".parse::<SocketAddr>().unwrap()].rules
    }

    fn weights(rule: &Rule) -> Vec<(String, u32)> {
        rule.backends
            .iter()
            .map(|b| (b.backend.name().to_owned(), b.weight))
            .collect()
    }

    #[test]
    fn flaggers_canary_route_sets_weights_and_wins_over_annotations() {
        let table = with_route(&route(
            "reviews",
            "  - matches: [{path: {type: PathPrefix, value: /}}]\n    \
             backendRefs: [{group: \"\", kind: Service, name: reviews-v1, port: 80, weight: 90}, \
             {group: \"\", kind: Service, name: reviews-v2, port: 80, weight: 10}]\n    \
             timeouts: {request: 15s, backendRequest: 500ms}\n",
        ));
        let rules = rules(&table);
        assert_eq!(rules.len(), 1);
        assert_eq!(
            weights(&rules[0]),
            [("reviews-v1".into(), 90), ("reviews-v2".into(), 10)]
        );
        assert_eq!(rules[0].timeout, Some(Duration::from_secs(15)));
        assert_eq!(rules[0].backend_timeout, Some(Duration::from_millis(500)));
    }

    #[test]
    fn flaggers_ab_route_orders_header_matches_before_the_catch_all() {
        let table = with_route(&route(
            "reviews",
            "  - matches:\n    - headers: [{name: cookie, type: RegularExpression, value: \"^(.*?;)?(canary=always)(;.*)?$\"}]\n    \
             - headers: [{name: x-canary, type: Exact, value: insider}]\n    \
             backendRefs:\n    - name: reviews-v2\n      port: 80\n      filters:\n      \
             - type: ResponseHeaderModifier\n        responseHeaderModifier: {add: [{name: Set-Cookie, value: \"canary=always; Max-Age=3600\"}]}\n  \
             - backendRefs: [{name: reviews-v1, port: 80}]\n",
        ));
        let rules = rules(&table);
        let summary: Vec<(usize, String)> = rules
            .iter()
            .map(|r| {
                (
                    r.matches[0].headers.len(),
                    r.backends[0].backend.name().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (1, "reviews-v2".into()),
                (1, "reviews-v2".into()),
                (0, "reviews-v1".into())
            ]
        );
        let set_cookie = &rules[0].backends[0].response_headers.add[0];
        assert_eq!(
            (set_cookie.0.as_str(), set_cookie.1.to_str().unwrap()),
            ("set-cookie", "canary=always; Max-Age=3600")
        );
    }

    #[test]
    fn a_split_key_on_the_service_or_the_route_keeps_users_where_they_landed() {
        let key = |rule: &Rule| {
            rule.split_key
                .as_ref()
                .map(|k| (k.source.to_string(), k.salt.to_string()))
        };
        // On the Service: its own split, salted with it.
        let annotated = "aviary.dev/split: \"reviews-v1=90,reviews-v2=10\", \
                         aviary.dev/split-key: \"header:X-User-Id\"";
        let table = routing_table(&store(&cluster(annotated)), &local());
        assert_eq!(
            key(&rules(&table)[0]),
            Some(("header:x-user-id".into(), "shop/reviews".into()))
        );
        // Flagger sets it on the apex Service; its HTTPRoute's rules follow it, salted with the
        // route. A key on the route wins.
        let canary = "  - backendRefs: [{name: reviews-v1, port: 80, weight: 95}, {name: reviews-v2, port: 80, weight: 5}]\n";
        let apex = [
            cluster("aviary.dev/split-key: \"cookie:uid\""),
            route("reviews-route", canary),
        ]
        .join(CLUSTER);
        let table = routing_table(&store(&apex), &local());
        assert_eq!(
            key(&rules(&table)[0]),
            Some(("cookie:uid".into(), "shop/reviews-route".into()))
        );
        let own = route("reviews-route", canary).replace(
            "namespace: shop}",
            "namespace: shop, annotations: {aviary.dev/split-key: \"header:x-user\"}}",
        );
        let table = routing_table(
            &store(&[cluster("aviary.dev/split-key: \"cookie:uid\""), own].join(CLUSTER)),
            &local(),
        );
        assert_eq!(key(&rules(&table)[0]).unwrap().0, "header:x-user");
        // Without one, splits are random.
        assert_eq!(key(&rules(&with_route(&route("r", canary)))[0]), None);
    }

    #[test]
    fn flags_named_on_the_service_and_its_route_apply_to_every_request_to_it() {
        let service = "reviews";
        let flags = |table: &RouteTable| {
            let routes = &table.services[&"10.96.0.10:80".parse::<SocketAddr>().unwrap()];
            assert_eq!(&*routes.name, service);
            routes.flags.clone().map(|f| {
                let keys: Vec<String> = f.flags.iter().map(|f| f.key.to_string()).collect();
                (keys, f.targeting_key.as_ref().map(ToString::to_string))
            })
        };
        let annotated = "aviary.dev/flags: \"new-checkout\", aviary.dev/flag-key: \"cookie:uid\"";
        let table = routing_table(&store(&cluster(annotated)), &local());
        assert_eq!(
            flags(&table),
            Some((vec!["new-checkout".into()], Some("cookie:uid".into())))
        );
        let canary = "  - backendRefs: [{name: reviews-v1, port: 80}]\n";
        let own = route("reviews-route", canary).replace(
            "namespace: shop}",
            "namespace: shop, annotations: {aviary.dev/flags: dark-mode, aviary.dev/flag-key: \"header:x-user-id\"}}",
        );
        let table = routing_table(&store(&[cluster(annotated), own].join(CLUSTER)), &local());
        assert_eq!(
            flags(&table),
            Some((
                vec!["dark-mode".into(), "new-checkout".into()],
                Some("header:x-user-id".into())
            ))
        );
        assert_eq!(flags(&with_route(&route("r", canary))), None);
    }

    #[test]
    fn a_bad_split_key_is_refused_with_why() {
        for (value, kind) in [
            ("user-id", "Service"),
            ("header:bad header", "Service"),
            ("cookie:", "Service"),
            ("query:user", "HTTPRoute"),
        ] {
            let mut store = Store::default();
            let yaml = match kind {
                "Service" => svc(
                    "reviews",
                    "10.96.0.10",
                    &format!("aviary.dev/split-key: \"{value}\""),
                ),
                _ => route("r", "  - backendRefs: [{name: reviews-v1, port: 80}]\n").replace(
                    "namespace: shop}",
                    &format!(
                        "namespace: shop, annotations: {{aviary.dev/split-key: \"{value}\"}}}}"
                    ),
                ),
            };
            let rejected = store.replace_all(parse_documents(&yaml).unwrap());
            assert_eq!(rejected.len(), 1, "{value}");
            assert!(
                rejected[0]
                    .reason
                    .contains("must be header:<name> or cookie:<name>"),
                "{}",
                rejected[0].reason
            );
        }
    }

    #[test]
    fn flaggers_blue_green_mirror_and_fractions() {
        let mirror = |share: &str| {
            with_route(&route(
                "reviews",
                &format!(
                    "  - backendRefs: [{{name: reviews-v1, port: 80}}]\n    filters:\n    - type: RequestMirror\n      \
                     requestMirror: {{backendRef: {{name: reviews-v2, port: 80}}{share}}}\n"
                ),
            ))
        };
        for (share, expected) in [
            ("", (100, 100)),
            (", percent: 50", (50, 100)),
            (", fraction: {numerator: 1, denominator: 3}", (1, 3)),
        ] {
            let table = mirror(share);
            let m = rules(&table)[0].mirror.as_ref().unwrap();
            assert_eq!(
                (&*m.backend.name, m.numerator, m.denominator),
                ("reviews-v2", expected.0, expected.1)
            );
            assert_eq!(m.safe_methods, SafeMethods::default());
        }
    }

    #[test]
    fn rules_follow_gateway_api_precedence_across_routes() {
        let first = route(
            "a-route",
            "  - matches: [{path: {type: PathPrefix, value: /api}}]\n    backendRefs: [{name: reviews-v1, port: 80}]\n  \
             - matches: [{path: {type: Exact, value: /api/v1}}]\n    backendRefs: [{name: reviews-v2, port: 80}]\n",
        );
        let second = route(
            "b-route",
            "  - matches: [{path: {type: PathPrefix, value: /api/long}}, {path: {type: PathPrefix, value: /api}, method: GET}]\n    \
             backendRefs: [{name: reviews-v2, port: 80}]\n",
        );
        let yaml = [cluster(""), first, second].join(CLUSTER);
        let table = routing_table(&store(&yaml), &local());
        let order: Vec<String> = rules(&table)
            .iter()
            .map(|r| {
                let m = &r.matches[0];
                let path = match &m.path {
                    Some(PathMatch::Exact(p)) => format!("={p}"),
                    Some(PathMatch::Prefix(p)) => p.clone(),
                    _ => "?".into(),
                };
                format!(
                    "{path}{}",
                    m.method
                        .as_ref()
                        .map(|m| format!(" {m}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(order, ["=/api/v1", "/api/long", "/api GET", "/api"]);
    }

    #[test]
    fn invalid_routes_are_refused_with_the_reason() {
        let cases = [
            (
                "  - matches: [{path: {type: RegularExpression, value: \"(\"}}]\n",
                "bad regular expression",
            ),
            (
                "  - backendRefs: [{name: a, weight: 0}, {name: b, weight: 0}]\n",
                "every backendRef has weight 0",
            ),
            (
                "  - filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]\n",
                "not supported",
            ),
            (
                "  - timeouts: {request: 10 seconds}\n",
                "not a Gateway API duration",
            ),
        ];
        for (rules, reason) in cases {
            let rejected =
                Store::default().replace_all(parse_documents(&route("bad", rules)).unwrap());
            assert_eq!(rejected.len(), 1, "{rules}");
            assert!(
                rejected[0].reason.contains(reason),
                "{rules}: {}",
                rejected[0].reason
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            gamma::parse_duration("1h2m3s4ms").unwrap(),
            Some(Duration::from_millis(3_723_004))
        );
        assert_eq!(gamma::parse_duration("0s").unwrap(), None);
        for bad in ["", "10", "1d", "s", "1.5s", "123456s", "1s1s1s1s1s"] {
            assert!(gamma::parse_duration(bad).is_err(), "{bad}");
        }
        // Once a panic that stopped all policy (Duration overflow); now refused like any other.
        let overflow = "18446744073709551615s18446744073709551615s";
        assert!(gamma::parse_duration(overflow).is_err());
        assert_eq!(
            gamma::parse_duration("99999h99999h99999h99999h").unwrap(),
            Some(Duration::from_secs(4 * 99_999 * 3600))
        );
    }

    #[test]
    fn consumer_routes_apply_to_their_namespaces_clients_only_and_win_there() {
        let producer = route(
            "reviews",
            "  - backendRefs: [{name: reviews-v1, port: 80}]\n",
        );
        let consumer = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: mine, namespace: web}\n\
                        spec:\n  parentRefs: [{kind: Service, group: \"\", name: reviews, namespace: shop}]\n  \
                        rules:\n  - backendRefs: [{name: reviews-v2, namespace: shop, port: 80}]\n";
        let pod = |name: &str, namespace: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, uid: u-{name}}}\n\
                 spec: {{containers: []}}\nstatus: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
            )
        };
        let yaml = [
            cluster(""),
            producer,
            consumer.to_owned(),
            pod("frontend", "web", "10.244.1.50"),
            pod("other", "shop", "10.244.1.51"),
        ]
        .join(CLUSTER);
        let table = routing_table(&store(&yaml), &local());
        let vip = "10.96.0.10:80".parse().unwrap();
        let backend_for = |client: &str| {
            let routes = table.service_for(&vip, client.parse().unwrap()).unwrap();
            routes.rules[0].backends[0].backend.name().to_owned()
        };
        assert_eq!(backend_for("10.244.1.50"), "reviews-v2", "web's own route");
        assert_eq!(
            backend_for("10.244.1.51"),
            "reviews-v1",
            "the producer's route"
        );
        assert_eq!(
            backend_for("10.244.9.9"),
            "reviews-v1",
            "unknown clients get the producer's"
        );
        assert_eq!(table.pods.len(), 2);
    }

    #[test]
    fn pod_ports_are_read_as_their_services_declare_unless_they_disagree() {
        let raw = svc("raw", "10.96.0.13", "").replace("appProtocol: http", "appProtocol: tcp");
        // The pods are this node's: the inbound proxy reads the protocols of no others.
        let pod = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: u-{name}}}\n\
                 spec: {{containers: []}}\nstatus: {{podIP: {ip}}}\n"
            )
        };
        let yaml = [
            cluster(""),
            raw,
            slice("raw", &["10.244.1.12"], true).replace("raw-x", "raw-y"),
            pod("a", "10.244.1.11"),
            pod("b", "10.244.1.12"),
        ]
        .join(CLUSTER);
        let table = routing_table(&store(&yaml), &local());
        let protocol = |addr: &str| table.endpoint_protocol(&addr.parse().unwrap());
        assert_eq!(protocol("10.244.1.11:8080"), AppProtocol::Http1);
        assert_eq!(
            protocol("10.244.1.12:8080"),
            AppProtocol::Detect,
            "http and tcp"
        );
        assert_eq!(protocol("10.244.9.9:8080"), AppProtocol::Detect, "unknown");
        assert_eq!(
            protocol("10.244.1.21:8080"),
            AppProtocol::Detect,
            "another node's pod"
        );
    }

    #[test]
    fn pods_on_other_nodes_are_measured_at_their_destination_as_their_annotations_say() {
        // Node-a's view, as its watches give it: its own pods in full, the others' as their
        // agents publish them. shop is enrolled and plain is not; a pod's own annotations win
        // over its namespace's, its excluded ports are never captured inbound, and neither is
        // a pod on its node's network.
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {aviary.dev/capture: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: plain}
spec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-x, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.2.11], targetRef: {kind: Pod, name: enrolled}}
- {addresses: [10.244.2.12], targetRef: {kind: Pod, name: opted-out}}
- {addresses: [10.244.2.13], targetRef: {kind: Pod, name: port-excluded}}
- {addresses: [10.244.1.14], targetRef: {kind: Pod, name: local}}
- {addresses: [10.0.0.2], targetRef: {kind: Pod, name: host-network}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ratings-x, namespace: plain, labels: {kubernetes.io/service-name: ratings}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.2.21], targetRef: {kind: Pod, name: opted-in}}
- {addresses: [10.244.2.22], targetRef: {kind: Pod, name: bystander}}
---
apiVersion: v1
kind: Pod
metadata: {name: local, namespace: shop, uid: u-local}
spec: {nodeName: node-a, containers: []}
status: {podIP: 10.244.1.14}
"#;
        let metadata = [
            ("shop", "enrolled", ""),
            ("shop", "opted-out", "aviary.dev/capture: disabled"),
            (
                "shop",
                "port-excluded",
                "aviary.dev/inbound-ports-exclude: \"8080\"",
            ),
            ("shop", "local", ""),
            ("shop", "host-network", ""),
            ("plain", "opted-in", "aviary.dev/capture: enabled"),
            ("plain", "bystander", ""),
        ]
        .map(|(namespace, name, annotation)| {
            // Annotations Aviary does not read come too, as they would from the API server.
            let annotations: Vec<&str> = ["kubectl.kubernetes.io/restartedAt: now", annotation]
                .into_iter()
                .filter(|a| !a.is_empty())
                .collect();
            let meta = format!(
                "{{name: {name}, namespace: {namespace}, uid: u-{name}, annotations: {{{}}}}}",
                annotations.join(", ")
            );
            Object::PodMetadata(Box::new(PodMeta {
                host_network: name == "host-network",
                // As their agents publish them: with the service accounts they run as, but one.
                service_account: (name != "opted-in").then(|| format!("sa-{name}")),
                ..PodMeta::of(&serde_saphyr::from_str(&meta).unwrap())
            }))
        });
        let mut store = store(yaml);
        for object in metadata {
            store.upsert(object).unwrap();
        }
        let measured = |inbound_capture| {
            let options = RouteOptions {
                node: Some("node-a".into()),
                inbound_capture,
                trust_domain: None,
            };
            let table = routing_table(&store, &options);
            ["10.96.0.11:80", "10.96.0.12:80"]
                .iter()
                .flat_map(|vip| {
                    &table.services[&vip.parse::<SocketAddr>().unwrap()]
                        .default
                        .endpoints
                })
                .map(|e| {
                    let pod = e.pod.as_ref().unwrap();
                    (pod.pod.to_string(), e.measured_at_destination)
                })
                .collect::<Vec<_>>()
        };
        let expected = [
            ("enrolled", true),
            ("opted-out", false),
            ("port-excluded", false),
            ("local", false),
            ("host-network", false),
            ("opted-in", true),
            ("bystander", false),
        ]
        .map(|(pod, at_destination)| (pod.to_owned(), at_destination));
        assert_eq!(measured(true), expected);
        assert!(measured(false)
            .iter()
            .all(|(_, at_destination)| !at_destination));

        // In a trust domain, a tunnel to a pod measured at its destination expects exactly the
        // pod's identity; a pod whose service account is not known has none, and gets no
        // tunnel (the proxy says why).
        let options = RouteOptions {
            node: Some("node-a".into()),
            inbound_capture: true,
            trust_domain: Some("cluster.local".into()),
        };
        let table = routing_table(&store, &options);
        let servers: Vec<(String, Option<String>)> = ["10.96.0.11:80", "10.96.0.12:80"]
            .iter()
            .flat_map(|vip| {
                &table.services[&vip.parse::<SocketAddr>().unwrap()]
                    .default
                    .endpoints
            })
            .filter(|e| e.measured_at_destination)
            .map(|e| {
                let pod = e.pod.as_ref().unwrap().pod.to_string();
                (pod, e.server.as_ref().map(|s| s.to_string()))
            })
            .collect();
        assert_eq!(
            servers,
            [
                (
                    "enrolled".into(),
                    Some("spiffe://cluster.local/ns/shop/sa/sa-enrolled".into())
                ),
                ("opted-in".into(), None),
            ]
        );

        // The endpoints also name the pods on other nodes, for the inbound proxy's clients.
        let table = routing_table(&store, &local());
        assert_eq!(&*table.pod("10.244.2.12".parse().unwrap()).pod, "opted-out");
        assert_eq!(table.pods.len(), 7);
    }

    #[test]
    fn notes_say_when_a_route_wins_over_annotations_or_has_no_parent() {
        let orphan = route(
            "orphan",
            "  - backendRefs: [{name: reviews-v1, port: 80}]\n",
        )
        .replace("name: reviews, port", "name: nothing, port");
        let yaml = [
            cluster("aviary.dev/split: \"reviews-v1=50,reviews-v2=50\""),
            route(
                "reviews",
                "  - backendRefs: [{name: reviews-v1, port: 80}]\n",
            ),
            orphan,
        ]
        .join(CLUSTER);
        assert_eq!(
            routing_notes(&store(&yaml)),
            [
                "HTTPRoute shop/orphan: parent Service shop/nothing does not exist; the route applies once it does",
                "HTTPRoute shop/reviews wins over the aviary.dev annotations on Service shop/reviews",
            ]
        );
    }

    #[test]
    fn policy_declares_what_is_safe_to_mirror_on_services_and_routes() {
        let annotations =
            "aviary.dev/mirror: reviews-v2, aviary.dev/mirror-methods: \"PUT,DELETE\", \
                           aviary.dev/mirror-idempotency-key: \"true\"";
        let table = routing_table(&store(&cluster(annotations)), &local());
        let safe = &rules(&table)[0].mirror.as_ref().unwrap().safe_methods;
        assert_eq!(
            safe,
            &SafeMethods {
                extra: vec![Method::PUT, Method::DELETE],
                idempotency_key: true
            }
        );

        let mirrored_route = route(
            "reviews",
            "  - backendRefs: [{name: reviews-v1, port: 80}]\n    filters:\n    - type: RequestMirror\n      \
             requestMirror: {backendRef: {name: reviews-v2, port: 80}}\n",
        )
        .replace("namespace: shop}", "namespace: shop, annotations: {aviary.dev/mirror-idempotency-key: \"true\"}}");
        let table = with_route(&mirrored_route);
        let safe = &rules(&table)[0].mirror.as_ref().unwrap().safe_methods;
        assert_eq!(
            safe,
            &SafeMethods {
                extra: vec![],
                idempotency_key: true
            }
        );
    }
}
