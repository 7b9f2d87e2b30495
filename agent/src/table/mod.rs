//! The compiled table, as plain data that policy writes and the proxy reads: for each captured
//! service port, ordered rules that match requests and send them to weighted backends; the
//! endpoints and pods they name; this node's enrolled pods and who may reach them
//! ([`admission`]). Immutable; a new table replaces the old one whole. It imports nothing of
//! policy, the proxy or the metrics.
//!
//! Matching follows the Gateway API's HTTPRoute semantics, because that is what policy is made
//! of: a rule matches when any of its matches does; a match holds when all of its conditions do;
//! path prefixes match whole segments; header names are case-insensitive.

pub mod admission;
pub mod flags;
pub mod shared_map;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;

use aviary_identity::spiffe::Identity;

use self::{admission::InboundPolicy, shared_map::SharedMap};

/// Everything the proxy knows about captured services, by ClusterIP:port. Not Clone: each table
/// has an identity of its own.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Tells this table from every other, so a connection can keep what it resolved in it for
    /// as long as it stays in force.
    pub id: TableId,
    /// The producers' view: routes in each Service's own namespace. The maps that grow with
    /// the cluster are shared: a new table copies only what a change touched.
    pub services: SharedMap<SocketAddr, Arc<ServiceRoutes>>,
    /// Consumer routes: for clients in one namespace, (namespace, ClusterIP:port).
    pub consumers: SharedMap<(String, SocketAddr), Arc<ServiceRoutes>>,
    /// The pod at each address: which consumer routes apply to a client, and who it is in the
    /// metrics.
    pub pods: SharedMap<IpAddr, Arc<Workload>>,
    /// This node's endpoints (pod address and port) whose Services declare how they are read,
    /// for the inbound proxy; a pod port that Services declare differently is detected.
    pub endpoint_protocols: SharedMap<SocketAddr, AppProtocol>,
    /// This node's enrolled pods, by address: whom the inbound proxy lets in, and the identity
    /// each presents over mutual TLS.
    pub local: HashMap<IpAddr, Arc<LocalPod>>,
    /// The feature flags of each namespace that has any.
    pub flags: imbl::OrdMap<String, Arc<flags::NamespaceFlags>>,
}

/// An enrolled pod of this node, as the inbound proxy and mutual TLS see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub workload: Arc<Workload>,
    /// Its service account's, in the mesh's trust domain; None without a mesh.
    pub identity: Option<Arc<Identity>>,
    pub inbound: InboundPolicy,
}

/// A table's identity, unique per table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableId(u64);

impl Default for TableId {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl RouteTable {
    /// The routes for a client at `client` calling `addr`: its namespace's consumer routes
    /// when there are any, else the producer's.
    pub fn service_for(&self, addr: &SocketAddr, client: IpAddr) -> Option<&Arc<ServiceRoutes>> {
        let consumer = || {
            let pod = self.pods.get(&client.to_canonical())?;
            self.consumers.get(&(pod.namespace.to_string(), *addr))
        };
        // Most tables have no consumer routes: no key to build then.
        let consumer = if self.consumers.is_empty() {
            None
        } else {
            consumer()
        };
        consumer.or_else(|| self.services.get(addr))
    }

    /// How the inbound proxy reads connections to the pod port `endpoint`.
    pub fn endpoint_protocol(&self, endpoint: &SocketAddr) -> AppProtocol {
        self.endpoint_protocols
            .get(endpoint)
            .copied()
            .unwrap_or_default()
    }

    /// The pod at `ip`, or [`Workload::unknown`].
    /// The enrolled pod of this node at `ip`.
    pub fn local(&self, ip: IpAddr) -> Option<&Arc<LocalPod>> {
        self.local.get(&ip.to_canonical())
    }

    pub fn pod(&self, ip: IpAddr) -> Arc<Workload> {
        self.pods
            .get(&ip.to_canonical())
            .cloned()
            .unwrap_or_else(Workload::unknown)
    }
}

/// A pod as the metrics name it: its namespace, its workload (a Deployment, StatefulSet,
/// DaemonSet or Job, from its owner references) and its own name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    pub namespace: Arc<str>,
    pub workload: Arc<str>,
    pub pod: Arc<str>,
}

impl Workload {
    /// A peer that is not a known pod (another node's host network, or outside the cluster).
    pub fn unknown() -> Arc<Self> {
        static UNKNOWN: std::sync::LazyLock<Arc<Workload>> = std::sync::LazyLock::new(|| {
            Arc::new(Workload {
                namespace: unknown(),
                workload: unknown(),
                pod: unknown(),
            })
        });
        UNKNOWN.clone()
    }
}

/// The name of what is not known (a pod's workload, the backend of a request no route took),
/// shared rather than allocated each time it is used.
pub fn unknown() -> Arc<str> {
    static UNKNOWN: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "unknown".into());
    UNKNOWN.clone()
}

/// How a service port's traffic is read, from its Service's `appProtocol` or detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppProtocol {
    #[default]
    Detect,
    Http1,
    Http2,
    Opaque,
}

impl AppProtocol {
    /// A Service port's `appProtocol`: `http`, `kubernetes.io/h2c` and `tcp` decide; anything
    /// else (or nothing) leaves the proxy to detect.
    pub fn from_app_protocol(value: Option<&str>) -> Self {
        match value {
            Some("http") => Self::Http1,
            Some("kubernetes.io/h2c") => Self::Http2,
            Some("tcp") => Self::Opaque,
            _ => Self::Detect,
        }
    }
}

/// One service port: its identity, how to read it, and its rules.
#[derive(Debug, Clone)]
pub struct ServiceRoutes {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port: u16,
    pub protocol: AppProtocol,
    /// The feature flags each request carries in its headers, set before the rules match.
    pub flags: Option<Arc<flags::RequestFlags>>,
    /// Ordered; the first rule with a matching request wins. A request no rule matches gets
    /// 404, as in the Gateway API; a service without rules passes through to `default`.
    pub rules: Vec<Rule>,
    /// The service's own endpoints, for traffic no route governs.
    pub default: Arc<Backend>,
}

impl ServiceRoutes {
    /// The first rule matching the request, or None when rules exist and none matches.
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.matches(req))
    }
}

/// The parts of a request that rules look at.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

#[derive(Debug, Clone, Default)]
pub struct Rule {
    /// Any of these; none means every request.
    pub matches: Vec<RequestMatch>,
    pub backends: Vec<WeightedBackend>,
    pub mirror: Option<Mirror>,
    /// The whole request, retries included (HTTPRoute `timeouts.request`).
    pub timeout: Option<Duration>,
    /// One attempt to a backend (HTTPRoute `timeouts.backendRequest`).
    pub backend_timeout: Option<Duration>,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    /// Where a request's user comes from, for a split that keeps each user on one backend
    /// (`aviary.dev/split-key`); requests without it are split at random.
    pub split_key: Option<Arc<SplitKey>>,
}

impl Rule {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(req))
    }

    /// The backend a request's key chooses, or None to choose at random: the key is bucketed
    /// by the weights as flagd's `fractional` buckets (the pair of the route and the key,
    /// hashed), so a user stays where they landed, on every node, and for two backends the
    /// users on the second are a subset of those at any greater weight of the second.
    pub fn sticky_choice(&self, headers: &HeaderMap) -> Option<usize> {
        let split = self.split_key.as_ref()?;
        let key = split.source.find(headers)?;
        let hash = aviary_flags::pair_hash(&split.salt, key);
        aviary_flags::bucket_of(hash, self.weights().map(u64::from))
    }

    /// The weights, in backend order, for a weighted pick.
    pub fn weights(&self) -> impl Iterator<Item = u32> + Clone + '_ {
        self.backends.iter().map(|b| b.weight)
    }
}

/// A sticky split's key: where it is read, and the route that salts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitKey {
    pub source: KeySource,
    /// The route's `namespace/name`: the same user lands independently on each route's split.
    pub salt: Arc<str>,
}

/// Where a request carries a value: a header, or a cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Header(HeaderName),
    Cookie(String),
}

impl KeySource {
    /// The value in `headers`, if it is there and not empty.
    pub fn find<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        let found = match self {
            KeySource::Header(name) => headers.get(name)?.to_str().ok(),
            KeySource::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(';'))
                .find_map(|pair| {
                    let (key, value) = pair.trim().split_once('=')?;
                    (key == name).then_some(value)
                }),
        };
        found.filter(|value| !value.is_empty())
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Header(name) => write!(f, "header:{name}"),
            KeySource::Cookie(name) => write!(f, "cookie:{name}"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    pub path: Option<PathMatch>,
    pub method: Option<Method>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
}

impl RequestMatch {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.path.as_ref().is_none_or(|p| p.matches(req.path))
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|h| h.matches(req.headers))
            && self.query.iter().all(|q| q.matches(req.query))
    }
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Whole path segments: `/api` matches `/api`, `/api/` and `/api/v1`, not `/apis`.
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(exact) => path == exact,
            Self::Prefix(prefix) => {
                let prefix = prefix.trim_end_matches('/');
                prefix.is_empty()
                    || path
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Self::Regex(re) => re.is_match(path),
        }
    }
}

#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    /// A full match, as Envoy's RE2 matching does for Gateway API routes: the policy compiles
    /// every pattern anchored at both ends.
    Regex(Regex),
}

impl StringMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => value == exact,
            Self::Regex(re) => re.is_match(value),
        }
    }
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: StringMatch,
}

impl HeaderMatch {
    /// Several values of one header are matched as one, joined the way HTTP joins them (`; `
    /// for Cookie, `,` otherwise), so a cookie match sees every cookie.
    fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers
            .get_all(&self.name)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let Some(first) = values.next() else {
            return false;
        };
        let rest: Vec<&str> = values.collect();
        if rest.is_empty() {
            return self.value.matches(first);
        }
        let separator = if self.name == http::header::COOKIE {
            "; "
        } else {
            ","
        };
        let joined = std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .join(separator);
        self.value.matches(&joined)
    }
}

#[derive(Debug, Clone)]
pub struct QueryMatch {
    pub name: String,
    pub value: StringMatch,
}

impl QueryMatch {
    /// The first occurrence of the parameter counts, as in the Gateway API.
    fn matches(&self, query: Option<&str>) -> bool {
        let Some(query) = query else { return false };
        query
            .split('&')
            .filter_map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (name == self.name).then_some(value)
            })
            .next()
            .is_some_and(|value| self.value.matches(value))
    }
}

/// Header changes applied to a request before it leaves, or to a response before it returns.
#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    /// In the Gateway API's order: set, add, remove.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

#[derive(Debug, Clone)]
pub struct WeightedBackend {
    pub backend: BackendRef,
    pub weight: u32,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
}

/// A backend a rule names. One that could not be resolved still takes its share of traffic,
/// which fails with 500, as the Gateway API requires.
#[derive(Debug, Clone)]
pub enum BackendRef {
    Service(Arc<Backend>),
    Invalid { name: String, reason: String },
}

impl BackendRef {
    pub fn name(&self) -> &str {
        match self {
            Self::Service(b) => &b.name,
            Self::Invalid { name, .. } => name,
        }
    }
}

/// A set of endpoints behind one name (a Service, e.g. `podinfo-canary`).
#[derive(Debug)]
pub struct Backend {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port: u16,
    pub endpoints: Vec<Arc<Endpoint>>,
}

/// One endpoint. What the proxy learns of it (load, connections) the proxy keeps by address.
#[derive(Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The pod behind the address, when its EndpointSlice names one.
    pub pod: Option<Arc<Workload>>,
    /// The pod is enrolled on another node, whose inbound proxy measures the requests it
    /// receives; Flagger's family is left to that agent, so no request counts twice there.
    pub measured_at_destination: bool,
    /// The identity the agent of such a pod's node must prove, as the pod, for a tunnel to it
    /// (in a trust domain, and with the pod's service account known).
    pub server: Option<Arc<Identity>>,
}

impl Endpoint {
    pub fn new(
        addr: SocketAddr,
        pod: Option<Arc<Workload>>,
        measured_at_destination: bool,
        server: Option<Arc<Identity>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            addr,
            pod,
            measured_at_destination,
            server,
        })
    }
}

/// A copy of matching requests sent to another backend, whose response is discarded.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub backend: Arc<Backend>,
    /// The share of requests mirrored: numerator / denominator (percent is n/100).
    pub numerator: u32,
    pub denominator: u32,
    pub safe_methods: SafeMethods,
    /// The host copies name, in Host (HTTP/1.1) and `:authority` (HTTP/2): the mirror
    /// Service's cluster DNS name, made once here rather than per copy.
    pub host: HeaderValue,
    pub authority: http::uri::Authority,
}

impl Mirror {
    pub fn new(
        backend: Arc<Backend>,
        numerator: u32,
        denominator: u32,
        safe_methods: SafeMethods,
    ) -> Self {
        let host = match backend.port {
            80 => format!("{}.{}.svc.cluster.local", backend.name, backend.namespace),
            port => format!(
                "{}.{}.svc.cluster.local:{port}",
                backend.name, backend.namespace
            ),
        };
        // Kubernetes names are DNS labels, so this always parses; "mirror" is a safe fallback.
        let host = bytes::Bytes::from(host);
        let authority = http::uri::Authority::from_maybe_shared(host.clone())
            .unwrap_or_else(|_| http::uri::Authority::from_static("mirror"));
        let host = HeaderValue::from_maybe_shared(host)
            .unwrap_or_else(|_| HeaderValue::from_static("mirror"));
        Self {
            backend,
            numerator,
            denominator,
            safe_methods,
            host,
            authority,
        }
    }
}

/// Which requests may be mirrored. Mirroring a request that changes state would do the change
/// twice, so only idempotent methods are, unless the policy declares more.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SafeMethods {
    /// Beyond GET, HEAD, OPTIONS and TRACE (e.g. PUT, DELETE).
    pub extra: Vec<Method>,
    /// Any method whose request carries an `Idempotency-Key` header.
    pub idempotency_key: bool,
}

impl SafeMethods {
    pub fn allows(&self, method: &Method, headers: &HeaderMap) -> bool {
        matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        ) || self.extra.contains(method)
            || (self.idempotency_key && headers.contains_key("idempotency-key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(
        method: &'a Method,
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method,
            path,
            query,
            headers,
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let prefix = PathMatch::Prefix("/api".into());
        for path in ["/api", "/api/", "/api/v1"] {
            assert!(prefix.matches(path), "{path}");
        }
        assert!(!prefix.matches("/apis"));
        assert!(PathMatch::Prefix("/api/".into()).matches("/api/v1"));
        assert!(PathMatch::Prefix("/".into()).matches("/anything"));
        assert!(PathMatch::Exact("/a".into()).matches("/a"));
        assert!(!PathMatch::Exact("/a".into()).matches("/a/"));
    }

    #[test]
    fn flaggers_cookie_regex_matches_among_other_cookies() {
        let m = HeaderMatch {
            name: http::header::COOKIE,
            value: StringMatch::Regex(Regex::new("^(.*?;)?(canary=always)(;.*)?$").unwrap()),
        };
        // Flagger's pattern wants the cookie first, or right after a bare ';' (as Envoy does,
        // a space after the ';' does not match it).
        for cookies in [
            "canary=always",
            "canary=always; session=1",
            "session=1;canary=always;theme=dark",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("cookie", cookies.parse().unwrap());
            assert!(m.matches(&headers), "{cookies}");
        }
        // Split over two Cookie headers (HTTP/2 sends one per cookie), joined with "; ".
        let mut split = HeaderMap::new();
        split.append("cookie", "canary=always".parse().unwrap());
        split.append("cookie", "session=1".parse().unwrap());
        assert!(m.matches(&split));
        let mut other = HeaderMap::new();
        other.insert("cookie", "canary=never".parse().unwrap());
        assert!(!m.matches(&other));
        assert!(!m.matches(&HeaderMap::new()));
    }

    #[test]
    fn a_match_needs_all_its_conditions_a_rule_any_of_its_matches() {
        let mut headers = HeaderMap::new();
        headers.insert("x-user", "beta".parse().unwrap());
        let m = RequestMatch {
            path: Some(PathMatch::Prefix("/api".into())),
            method: Some(Method::GET),
            headers: vec![HeaderMatch {
                name: HeaderName::from_static("x-user"),
                value: StringMatch::Exact("beta".into()),
            }],
            query: vec![QueryMatch {
                name: "v".into(),
                value: StringMatch::Exact("2".into()),
            }],
        };
        assert!(m.matches(&view(&Method::GET, "/api/x", Some("a=1&v=2"), &headers)));
        assert!(!m.matches(&view(&Method::POST, "/api/x", Some("v=2"), &headers)));
        assert!(!m.matches(&view(&Method::GET, "/web", Some("v=2"), &headers)));
        assert!(!m.matches(&view(&Method::GET, "/api", Some("v=3"), &headers)));
        assert!(!m.matches(&view(&Method::GET, "/api", None, &headers)));
        assert!(!m.matches(&view(&Method::GET, "/api", Some("v=2"), &HeaderMap::new())));

        let rule = Rule {
            matches: vec![
                m,
                RequestMatch {
                    method: Some(Method::DELETE),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert!(rule.matches(&view(&Method::DELETE, "/other", None, &HeaderMap::new())));
        assert!(Rule::default().matches(&view(&Method::PUT, "/", None, &HeaderMap::new())));
    }

    #[test]
    fn the_first_query_parameter_counts() {
        let q = QueryMatch {
            name: "v".into(),
            value: StringMatch::Exact("1".into()),
        };
        assert!(q.matches(Some("v=1&v=2")));
        assert!(!q.matches(Some("v=2&v=1")));
        assert!(!q.matches(Some("vv=1")));
    }

    #[test]
    fn header_modifiers_set_add_then_remove() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", "old".parse().unwrap());
        headers.insert("x-gone", "1".parse().unwrap());
        let modifier = HeaderModifier {
            set: vec![(
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("new"),
            )],
            add: vec![(
                HeaderName::from_static("x-b"),
                HeaderValue::from_static("1"),
            )],
            remove: vec![HeaderName::from_static("x-gone")],
        };
        modifier.apply(&mut headers);
        assert_eq!(headers["x-a"], "new");
        assert_eq!(headers["x-b"], "1");
        assert!(!headers.contains_key("x-gone"));
    }

    #[test]
    fn only_idempotent_methods_are_safe_to_mirror_unless_declared() {
        let none = HeaderMap::new();
        let default = SafeMethods::default();
        for m in [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE] {
            assert!(default.allows(&m, &none), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::PUT, Method::DELETE] {
            assert!(!default.allows(&m, &none), "{m}");
        }
        let opted = SafeMethods {
            extra: vec![Method::PUT],
            idempotency_key: true,
        };
        assert!(opted.allows(&Method::PUT, &none));
        assert!(!opted.allows(&Method::DELETE, &none));
        let mut keyed = HeaderMap::new();
        keyed.insert("idempotency-key", "abc".parse().unwrap());
        assert!(opted.allows(&Method::POST, &keyed));
        assert!(!default.allows(&Method::POST, &keyed));
    }

    #[test]
    fn a_mirror_names_its_service_by_cluster_dns_name() {
        let backend = |port| {
            Arc::new(Backend {
                namespace: "shop".into(),
                name: "podinfo-shadow".into(),
                port,
                endpoints: vec![],
            })
        };
        let mirror = Mirror::new(backend(80), 1, 1, SafeMethods::default());
        assert_eq!(mirror.host, "podinfo-shadow.shop.svc.cluster.local");
        assert_eq!(mirror.authority, "podinfo-shadow.shop.svc.cluster.local");
        let mirror = Mirror::new(backend(8080), 1, 1, SafeMethods::default());
        assert_eq!(mirror.host, "podinfo-shadow.shop.svc.cluster.local:8080");
    }

    #[test]
    fn app_protocols() {
        assert_eq!(
            AppProtocol::from_app_protocol(Some("http")),
            AppProtocol::Http1
        );
        assert_eq!(
            AppProtocol::from_app_protocol(Some("kubernetes.io/h2c")),
            AppProtocol::Http2
        );
        assert_eq!(
            AppProtocol::from_app_protocol(Some("tcp")),
            AppProtocol::Opaque
        );
        assert_eq!(
            AppProtocol::from_app_protocol(Some("grpc")),
            AppProtocol::Detect
        );
        assert_eq!(AppProtocol::from_app_protocol(None), AppProtocol::Detect);
    }

    /// A rule of two backends at `weights`, split by the header x-user-id, salted `salt`.
    fn two_way(weights: [u32; 2], salt: &str) -> Rule {
        let backend = |name: &str, weight| WeightedBackend {
            backend: BackendRef::Invalid {
                name: name.into(),
                reason: String::new(),
            },
            weight,
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
        };
        Rule {
            backends: vec![
                backend("primary", weights[0]),
                backend("canary", weights[1]),
            ],
            split_key: Some(Arc::new(SplitKey {
                source: KeySource::Header(HeaderName::from_static("x-user-id")),
                salt: salt.into(),
            })),
            ..Rule::default()
        }
    }

    fn user(id: u32) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-user-id", HeaderValue::from(id));
        headers
    }

    #[test]
    fn a_user_on_the_canary_stays_there_as_its_weight_grows() {
        let users: Vec<HeaderMap> = (0..2_000).map(user).collect();
        let mut before: Vec<usize> = vec![0; users.len()];
        for canary in 0..=100 {
            let rule = two_way([100 - canary, canary], "shop/web");
            for (user, landed) in users.iter().zip(before.iter_mut()) {
                let now = rule.sticky_choice(user).unwrap();
                assert!(now >= *landed, "a user left the canary at weight {canary}");
                *landed = now;
            }
        }
        assert!(
            before.iter().all(|&b| b == 1),
            "at 100% every user is on the canary"
        );
    }

    #[test]
    fn keys_split_within_a_point_of_the_weights_and_alike_on_every_agent() {
        for canary in [1, 5, 10, 20, 50, 80] {
            let rule = two_way([100 - canary, canary], "shop/web");
            // Another agent compiles its own table from the same objects.
            let elsewhere = two_way([100 - canary, canary], "shop/web");
            let on_canary = (0..100_000)
                .filter(|&id| {
                    let headers = user(id);
                    let chosen = rule.sticky_choice(&headers).unwrap();
                    assert_eq!(Some(chosen), elsewhere.sticky_choice(&headers));
                    chosen == 1
                })
                .count();
            let share = on_canary as f64 / 1_000.0;
            assert!(
                (share - f64::from(canary)).abs() <= 1.0,
                "{share}% at {canary}%"
            );
        }
    }

    #[test]
    fn a_request_without_the_key_is_split_at_random() {
        let rule = two_way([50, 50], "shop/web");
        assert_eq!(rule.sticky_choice(&HeaderMap::new()), None);
        let mut empty = HeaderMap::new();
        empty.insert("x-user-id", HeaderValue::from_static(""));
        assert_eq!(rule.sticky_choice(&empty), None);
        assert_eq!(Rule::default().sticky_choice(&user(1)), None);
    }

    #[test]
    fn a_cookie_key_is_read_from_any_cookie_header() {
        let source = KeySource::Cookie("uid".into());
        let mut headers = HeaderMap::new();
        headers.append(
            http::header::COOKIE,
            HeaderValue::from_static("a=1; uidx=2"),
        );
        headers.append(
            http::header::COOKIE,
            HeaderValue::from_static("b=2;uid=u-7 ; c=3"),
        );
        assert_eq!(source.find(&headers), Some("u-7"));
        assert_eq!(KeySource::Cookie("zz".into()).find(&headers), None);
    }
}
