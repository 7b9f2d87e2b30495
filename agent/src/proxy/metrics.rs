//! The proxy's metrics families, with the types they are labelled by, and the node's
//! exposition (OpenMetrics text on `:15020/metrics`, on a port of its own so a slow scrape never
//! competes with traffic).
//!
//! The request path takes no lock and hashes no labels: a caller resolves a series handle once
//! ([`Metrics::request_series`], [`Metrics::tcp_series`]: a map lookup each) and records through
//! it as often as it likes, with atomic increments only. Durations go to an
//! [`AtomicHistogram`], which renders exactly as prometheus-client's `Histogram` but observes
//! without its lock. Scrapes make no bpf() syscalls either: the eBPF counters and map
//! occupancy are read by [`Metrics::refresh_ebpf`], on the control plane's timer, and a scrape
//! encodes the last reading.
//!
//! Cardinality is bounded three times over:
//! - every label value comes from the policy snapshot (namespaces, Services, workloads, pods the
//!   node's clients reach) or from a fixed set (direction, method class, status code, mirror
//!   outcome); nothing a request carries becomes a label value;
//! - series expire one by one, as linkerd2-proxy's do: one that nothing recorded into for the
//!   idle expiry (`--metrics-idle-expiry`, 10 minutes by default) is removed by
//!   [`Metrics::sweep`], which the control plane runs every [`SWEEP_INTERVAL`](crate::metrics::SWEEP_INTERVAL). Prometheus
//!   reads a series that comes back later as a counter that restarted from 0. The series of a
//!   route, Service or pod gone from the snapshot are no exception: nothing hits them any more,
//!   so they go idle and expire. Removing them as soon as the snapshot drops them would lose
//!   what was recorded into them since the last scrape, and what requests and connections
//!   still under the old table go on recording;
//! - a family holds at most [`MAX_SERIES`](crate::metrics::MAX_SERIES) series, as a last resort. At its cap it refuses new
//!   series (what they would have counted is lost, and `aviary_metrics_series_refused_total`
//!   counts them) and never touches the series being recorded into; the next sweep makes room
//!   by evicting the series quiet the longest, for a sweep at least, down to [`EVICT_TO`](crate::metrics::EVICT_TO)
//!   (`aviary_metrics_series_removed_total{reason="evicted"}`).
//!
//! A handle outlives its series only briefly. A sweep moves [`Metrics::removals`] once it
//! removed series, and holders of long-lived handles (the data plane's per-worker cache)
//! compare it before each use and resolve their handles again when it moved. An opaque TCP
//! connection holds its handle for its whole life, so a series with a connection open is never
//! removed.

use std::{
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use aviary_flags::Resolution;
use aviary_identity::spiffe::Identity;
use http::Method;
use prometheus_client::{
    collector::Collector,
    encoding::{
        text::encode, DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
        LabelValueEncoder,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        MetricType,
    },
    registry::Registry,
};
use tracing::debug;

use super::balance::Failure;
use crate::{
    ebpf::maps::{Occupancy, Stats},
    metrics::{
        histogram::AtomicHistogram,
        store::{register, Store, StoreCounts, Values},
        Name,
    },
    table::{admission::Denied, unknown, ServiceRoutes, Workload},
};

/// What happened to each request that a mirror rule applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MirrorOutcome {
    Sent,
    SkippedNotIdempotent,
    SkippedBodyTooLarge,
    /// The body would have taken the bodies held at once past their budget.
    SkippedBufferBudget,
    DroppedOverload,
    Failed,
    TimedOut,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue, serde::Serialize, serde::Deserialize,
)]
#[allow(non_camel_case_types)]
pub enum Direction {
    outbound,
    inbound,
}

/// A method as a label: the standard ones by name, any other as OTHER (methods are a client's
/// choice, so they are never passed through).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum MethodClass {
    GET,
    HEAD,
    POST,
    PUT,
    DELETE,
    PATCH,
    OPTIONS,
    TRACE,
    CONNECT,
    OTHER,
}

impl From<&Method> for MethodClass {
    fn from(method: &Method) -> Self {
        match *method {
            Method::GET => Self::GET,
            Method::HEAD => Self::HEAD,
            Method::POST => Self::POST,
            Method::PUT => Self::PUT,
            Method::DELETE => Self::DELETE,
            Method::PATCH => Self::PATCH,
            Method::OPTIONS => Self::OPTIONS,
            Method::TRACE => Self::TRACE,
            Method::CONNECT => Self::CONNECT,
            _ => Self::OTHER,
        }
    }
}

/// Who sent a request or opened a connection, and where it went: one edge of the graph of
/// workloads, as the metrics label it.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet, serde::Serialize, serde::Deserialize,
)]
pub struct Edge {
    pub direction: Direction,
    pub source_namespace: Name,
    pub source_workload: Name,
    pub destination_namespace: Name,
    pub destination_service: Name,
    pub destination_workload: Name,
    /// The backend Service chosen (e.g. podinfo-primary or podinfo-canary).
    pub destination_version: Name,
    /// The identities the two ends proved, over mutual TLS (Istio's labels); else unknown.
    #[serde(default = "unknown")]
    pub source_principal: Name,
    #[serde(default = "unknown")]
    pub destination_principal: Name,
    #[serde(default)]
    pub connection_security_policy: Security,
}

/// Whether a connection between nodes was mutual TLS, as Istio's `connection_security_policy`
/// says it.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    EncodeLabelValue,
    serde::Serialize,
    serde::Deserialize,
)]
#[allow(non_camel_case_types)]
pub enum Security {
    #[default]
    none,
    mutual_tls,
}

impl Edge {
    /// Traffic from `source` to `service`, answered by the backend Service `version` at `pod`.
    pub fn outbound(
        source: &Workload,
        service: &ServiceRoutes,
        version: Option<&Name>,
        pod: Option<&Workload>,
    ) -> Self {
        Self {
            direction: Direction::outbound,
            source_namespace: source.namespace.clone(),
            source_workload: source.workload.clone(),
            destination_namespace: service.namespace.clone(),
            destination_service: service.name.clone(),
            destination_workload: pod.map_or_else(unknown, |p| p.workload.clone()),
            destination_version: version.cloned().unwrap_or_else(unknown),
            source_principal: unknown(),
            destination_principal: unknown(),
            connection_security_policy: Security::none,
        }
    }

    /// The same edge, carried over mutual TLS between the identities `principals` names.
    pub fn over_mtls(self, principals: &Principals) -> Self {
        Self {
            source_principal: principals.source.to_string().into(),
            destination_principal: principals.destination.to_string().into(),
            connection_security_policy: Security::mutual_tls,
            ..self
        }
    }

    /// Traffic the inbound proxy delivered from `source` to the enrolled pod `destination`.
    pub fn inbound(source: &Workload, destination: &Workload) -> Self {
        Self {
            direction: Direction::inbound,
            source_namespace: source.namespace.clone(),
            source_workload: source.workload.clone(),
            destination_namespace: destination.namespace.clone(),
            destination_service: unknown(),
            destination_workload: destination.workload.clone(),
            destination_version: unknown(),
            source_principal: unknown(),
            destination_principal: unknown(),
            connection_security_policy: Security::none,
        }
    }
}

/// The proxy listener a connection came to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabels {
    listener: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub edge: Edge,
    pub method: MethodClass,
    pub status_code: u16,
    /// "true" for mirror copies, whose responses no user sees.
    pub mirror: bool,
}

/// Flagger's built-in checks for the gatewayapi provider read this family.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FlaggerLabels {
    kubernetes_namespace: Name,
    kubernetes_pod_name: Name,
    status: u16,
}

impl EncodeLabelValue for MirrorOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        let outcome = match self {
            Self::Sent => "sent",
            Self::SkippedNotIdempotent => "skipped_not_idempotent",
            Self::SkippedBodyTooLarge => "skipped_body_too_large",
            Self::SkippedBufferBudget => "skipped_buffer_budget",
            Self::DroppedOverload => "dropped_overload",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
        };
        EncodeLabelValue::encode(&outcome, encoder)
    }
}

impl EncodeLabelValue for Failure {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        let reason = match self {
            Self::Connect => "connect_failure",
            Self::Server => "server_error",
        };
        EncodeLabelValue::encode(&reason, encoder)
    }
}

/// An endpoint failure, or an ejection, in one backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointFailureLabels {
    reason: Failure,
    destination_namespace: Name,
    destination_service: Name,
}

/// A connection the inbound proxy refused for its pod's `aviary.dev/mtls` or
/// `aviary.dev/allow-from`, by who asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DenialLabels {
    reason: DenialReason,
    source_principal: Name,
    destination_namespace: Name,
    destination_workload: Name,
}

/// Why the inbound proxy refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DenialReason {
    /// Plain text to a pod whose mode is strict.
    plaintext,
    /// Plain text to a pod that admits named identities only.
    no_identity,
    /// An identity the pod's allow-from does not name.
    not_allowed,
}

impl DenialReason {
    pub fn of(denied: &Denied) -> Self {
        match denied {
            Denied::PlainText => Self::plaintext,
            Denied::NoIdentity => Self::no_identity,
            Denied::NotAllowed { .. } => Self::not_allowed,
        }
    }
}

/// Who evaluated a feature flag: the proxy, for a request's headers, or the OFREP endpoint, for
/// an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FlagEvaluator {
    proxy,
    ofrep,
}

/// One evaluation of a feature flag, labelled with OpenFeature's `feature_flag` attribute
/// names (dots made underscores, as Prometheus needs) and OpenTelemetry's `error.type`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FlagEvaluationLabels {
    evaluator: FlagEvaluator,
    /// The namespace whose FeatureFlag objects answered.
    namespace: Name,
    feature_flag_key: Name,
    /// Empty when the answer named no variant (the caller's default).
    feature_flag_result_variant: Name,
    feature_flag_result_reason: &'static str,
    /// The OpenFeature error code, empty without an error.
    error_type: &'static str,
}

/// A request the proxy answered itself, by why and with what.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProxyErrorLabels {
    direction: Direction,
    reason: ProxyError,
    status_code: u16,
}

/// Why the proxy answered a request itself instead of passing an endpoint's answer on: the
/// `reason` of `aviary_proxy_errors_total`, of the proxy's log line, and of the
/// `x-aviary-error` header the client gets (as Envoy's response flags and Linkerd's
/// `l5d-proxy-error` say it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ProxyError {
    /// 404: no rule of the Service's routes matches the request.
    no_route,
    /// 500: the chosen backend is invalid, or every backend has weight 0.
    invalid_backend,
    /// 503: the backend has no endpoint.
    no_endpoints,
    /// 503: connecting to the endpoint was refused or failed (on the retry too).
    connect_failed,
    /// 503: the endpoint did not answer the connect in time.
    connect_timeout,
    /// 503: the mutual-TLS tunnel to the endpoint's node failed (TLS or HTTP/2).
    tunnel_failed,
    /// 503: the tunnel was not open in time.
    tunnel_timeout,
    /// 503: a tunnel was needed, and an identity for it is missing: the client's certificate
    /// (not yet issued), the trust bundle, or the destination pod's identity.
    no_identity,
    /// 403: the destination's policy refused the client.
    forbidden,
    /// 504: the route's request timeout passed.
    request_timeout,
    /// 504: the route's backend request timeout passed.
    backend_timeout,
    /// 502: the exchange with the endpoint broke after the request went out.
    upstream_failed,
    /// 400: the client's request body ended early.
    client_body,
}

impl ProxyError {
    /// Every reason, in declaration order (each at its own index).
    pub const ALL: [Self; 13] = [
        Self::no_route,
        Self::invalid_backend,
        Self::no_endpoints,
        Self::connect_failed,
        Self::connect_timeout,
        Self::tunnel_failed,
        Self::tunnel_timeout,
        Self::no_identity,
        Self::forbidden,
        Self::request_timeout,
        Self::backend_timeout,
        Self::upstream_failed,
        Self::client_body,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::no_route => "no_route",
            Self::invalid_backend => "invalid_backend",
            Self::no_endpoints => "no_endpoints",
            Self::connect_failed => "connect_failed",
            Self::connect_timeout => "connect_timeout",
            Self::tunnel_failed => "tunnel_failed",
            Self::tunnel_timeout => "tunnel_timeout",
            Self::no_identity => "no_identity",
            Self::forbidden => "forbidden",
            Self::request_timeout => "request_timeout",
            Self::backend_timeout => "backend_timeout",
            Self::upstream_failed => "upstream_failed",
            Self::client_body => "client_body",
        }
    }
}

/// The identities the two ends of a mutual-TLS connection proved: part of a request's series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principals {
    pub source: Identity,
    pub destination: Identity,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MirrorLabels {
    outcome: MirrorOutcome,
    destination_namespace: Name,
    destination_service: Name,
}

/// The values of a request series: its count and its durations, two families with the same
/// labels, recorded together.
#[derive(Debug, Default)]
struct RequestValues {
    requests: Counter,
    duration: AtomicHistogram,
}

impl Values for RequestValues {
    fn activity(&self) -> u64 {
        self.requests.get()
    }
}

/// The values of an opaque TCP series, four families with the same labels.
#[derive(Debug, Default)]
struct TcpValues {
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl Values for TcpValues {
    /// The bytes are counted when a connection closes, so they move only with `closed`.
    fn activity(&self) -> u64 {
        self.opened.get().wrapping_add(self.closed.get())
    }

    /// A connection holds its handle from its open to its close, which may be hours apart with
    /// nothing recorded in between.
    fn in_use(values: &Arc<Self>) -> bool {
        Arc::strong_count(values) > 1
    }
}

/// The series one kind of request is counted in: resolved once by [`Metrics::request_series`],
/// then [`record`](Self::record)ed through as often as wanted, with atomic increments only. A
/// clone shares the same series.
///
/// A handle is meant to be kept while its labels hold (e.g. per connection, edge, method and
/// status); a holder that keeps it longer compares [`Metrics::removals`] before each use, as
/// the series may have expired, and resolves it again when that moved.
#[derive(Debug, Clone)]
pub struct RequestSeries {
    values: Arc<RequestValues>,
    /// `http_request_duration_seconds`, when this agent reports these requests to Flagger.
    flagger: Option<Arc<AtomicHistogram>>,
}

impl RequestSeries {
    /// One answered request that took `took`, from the request to its response headers.
    pub fn record(&self, took: Duration) {
        self.values.requests.inc();
        let seconds = took.as_secs_f64();
        self.values.duration.observe(seconds);
        if let Some(flagger) = &self.flagger {
            flagger.observe(seconds);
        }
    }
}

/// The series of opaque TCP connections along one [`Edge`]: resolved once per connection by
/// [`Metrics::tcp_series`], then updated with atomic increments only. A clone shares the same
/// series, which is never removed while a handle to it lives: a connection holds one from its
/// open to its close.
#[derive(Debug, Clone)]
pub struct TcpSeries {
    values: Arc<TcpValues>,
}

impl TcpSeries {
    /// A connection along the edge was opened (its upstream connect succeeded).
    pub fn opened(&self) {
        self.values.opened.inc();
    }

    /// A connection along the edge ended, having copied `sent` bytes from the client to the
    /// destination and `received` bytes back.
    pub fn closed(&self, sent: u64, received: u64) {
        self.values.closed.inc();
        self.values.sent.inc_by(sent);
        self.values.received.inc_by(received);
    }
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// `aviary_requests_total` and `aviary_request_duration_seconds`.
    requests: Arc<Store<RequestLabels, RequestValues>>,
    /// `http_request_duration_seconds`, when exported.
    flagger: Option<Arc<Store<FlaggerLabels, AtomicHistogram>>>,
    mirrors: Arc<Store<MirrorLabels, Counter>>,
    endpoint_failures: Arc<Store<EndpointFailureLabels, Counter>>,
    denials: Arc<Store<DenialLabels, Counter>>,
    ejections: Arc<Store<EndpointFailureLabels, Counter>>,
    proxy_errors: Arc<Store<ProxyErrorLabels, Counter>>,
    flag_evaluations: Arc<Store<FlagEvaluationLabels, Counter>>,
    /// The four `aviary_tcp_` families.
    tcp: Arc<Store<Edge, TcpValues>>,
    /// By listener kind: two series at most, whose handles the listeners hold for good, so
    /// never swept.
    connections_refused: Family<ListenerLabels, Counter>,
    /// The pinned counters and maps, read by [`Metrics::refresh_ebpf`] only.
    ebpf: Option<Stats>,
    /// The last reading of `ebpf`, which scrapes encode.
    ebpf_reading: Arc<ArcSwap<EbpfReading>>,
    /// Sweeps that removed series so far.
    removals: AtomicU64,
    /// Where the sweeps' clock starts.
    epoch: Instant,
}

impl Metrics {
    /// `flagger_family`: also export `http_request_duration_seconds` for Flagger's built-in
    /// checks. `ebpf`: the pinned counters and maps, read by each [`Metrics::refresh_ebpf`].
    pub fn new(flagger_family: bool, ebpf: Option<Stats>) -> Self {
        let mut registry = Registry::default();
        let requests = Arc::new(Store::default());
        register(
            &mut registry,
            "aviary_requests",
            "HTTP requests the proxy answered, mirror copies included (mirror=\"true\")",
            &requests,
            |values: &RequestValues| &values.requests,
        );
        register(
            &mut registry,
            "aviary_request_duration_seconds",
            "Time from a request to its response headers",
            &requests,
            |values: &RequestValues| &values.duration,
        );
        let flagger = flagger_family.then(|| {
            let flagger = Arc::new(Store::default());
            register(
                &mut registry,
                "http_request_duration_seconds",
                "Requests by destination pod, in the family Flagger's built-in checks query",
                &flagger,
                |histogram: &AtomicHistogram| histogram,
            );
            flagger
        });
        let mirrors = Arc::new(Store::default());
        register(
            &mut registry,
            "aviary_mirror_requests",
            "Requests a mirror rule applied to, by what happened to the copy",
            &mirrors,
            |counter: &Counter| counter,
        );
        let endpoint_failures = Arc::new(Store::default());
        register(
            &mut registry,
            "aviary_endpoint_failures",
            "Requests an endpoint failed: a connect that failed, or a 5xx or broken exchange",
            &endpoint_failures,
            |counter: &Counter| counter,
        );
        let denials = Arc::new(Store::default());
        register(
            &mut registry,
            "aviary_inbound_denied",
            "Connections the inbound proxy refused for the pod's aviary.dev/mtls or aviary.dev/allow-from",
            &denials,
            |counter: &Counter| counter,
        );
        let ejections = Arc::new(Store::default());
        register(
            &mut registry,
            "aviary_endpoint_ejections",
            "Endpoints outlier detection left out of load balancing, by the failure that did it",
            &ejections,
            |counter: &Counter| counter,
        );
        let proxy_errors = Arc::new(Store::default());
        register(
            &mut registry,
            "aviary_proxy_errors",
            "Requests the proxy answered itself, by why (no endpoint, connect or tunnel failed, \
             timeouts, authorization...): also counted in aviary_requests",
            &proxy_errors,
            |counter: &Counter| counter,
        );
        let flag_evaluations = Arc::new(Store::default());
        register(
            &mut registry,
            "aviary_flag_evaluations",
            "Feature flag evaluations, by flag, variant and reason: the proxy's for request \
             headers, the OFREP endpoint's for applications",
            &flag_evaluations,
            |counter: &Counter| counter,
        );
        let tcp = Arc::new(Store::default());
        register(
            &mut registry,
            "aviary_tcp_connections_opened",
            "Opaque TCP connections the proxy opened",
            &tcp,
            |values: &TcpValues| &values.opened,
        );
        register(
            &mut registry,
            "aviary_tcp_connections_closed",
            "Opaque TCP connections that ended",
            &tcp,
            |values: &TcpValues| &values.closed,
        );
        register(
            &mut registry,
            "aviary_tcp_sent_bytes",
            "Bytes of opaque TCP connections, client to destination",
            &tcp,
            |values: &TcpValues| &values.sent,
        );
        register(
            &mut registry,
            "aviary_tcp_received_bytes",
            "Bytes of opaque TCP connections, destination to client",
            &tcp,
            |values: &TcpValues| &values.received,
        );
        let connections_refused = Family::default();
        registry.register(
            "aviary_connections_refused",
            "Connections reset on accept because their listener held --max-connections already",
            connections_refused.clone(),
        );
        let ebpf_reading = Arc::new(ArcSwap::from_pointee(EbpfReading::default()));
        let mut stores = vec![("requests", requests.counts.clone())];
        stores.extend(flagger.as_ref().map(|f| ("flagger", f.counts.clone())));
        stores.push(("mirrors", mirrors.counts.clone()));
        stores.push(("endpoint_failures", endpoint_failures.counts.clone()));
        stores.push(("ejections", ejections.counts.clone()));
        stores.push(("denials", denials.counts.clone()));
        stores.push(("proxy_errors", proxy_errors.counts.clone()));
        stores.push(("flag_evaluations", flag_evaluations.counts.clone()));
        stores.push(("tcp", tcp.counts.clone()));
        registry.register_collector(Box::new(Internal {
            stores,
            ebpf: ebpf_reading.clone(),
        }));
        Self {
            registry,
            requests,
            flagger,
            mirrors,
            endpoint_failures,
            denials,
            ejections,
            proxy_errors,
            flag_evaluations,
            tcp,
            connections_refused,
            ebpf,
            ebpf_reading,
            removals: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// How many sweeps removed series so far. A handle resolved before the latest of them may
    /// be to a removed series, whose counts are no longer exported: holders of long-lived
    /// handles compare this before each use, and resolve their handles again when it moved.
    pub fn removals(&self) -> u64 {
        // Moved after the removals, so a holder that sees it move and then resolves its handles
        // again finds the removed series gone.
        self.removals.load(Ordering::Acquire)
    }

    /// Removes, as of `now`, the series nothing recorded into for `idle_expiry` (and from a
    /// family above [`EVICT_TO`](crate::metrics::EVICT_TO), its quietest ones), then moves [`Metrics::removals`] if it
    /// removed any. The control plane calls it every [`SWEEP_INTERVAL`](crate::metrics::SWEEP_INTERVAL).
    ///
    /// A series is kept while anything may still record into it for long: an opaque TCP
    /// connection's series while it is open, and a series a worker has cached until its next
    /// request, which sees [`Metrics::removals`] move. Only a request that a worker records in
    /// the instant between that check and its increment, into a series idle for the whole
    /// expiry until then, can be lost.
    pub fn sweep(&self, idle_expiry: Duration, now: Instant) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (now, expiry) = (
            ms(now.saturating_duration_since(self.epoch)),
            ms(idle_expiry),
        );
        // Every store is swept, whether or not one before removed anything.
        let removed = [
            self.requests.sweep(now, expiry),
            self.flagger.as_ref().is_some_and(|f| f.sweep(now, expiry)),
            self.mirrors.sweep(now, expiry),
            self.endpoint_failures.sweep(now, expiry),
            self.ejections.sweep(now, expiry),
            self.denials.sweep(now, expiry),
            self.proxy_errors.sweep(now, expiry),
            self.tcp.sweep(now, expiry),
        ];
        if removed.contains(&true) {
            self.removals.fetch_add(1, Ordering::Release);
        }
    }

    /// The series answered requests with `labels` are counted in, created if new (one lookup,
    /// and one more for Flagger's family). `flagger_pod` is the destination pod when an
    /// endpoint answered and this agent is the one that reports the request in Flagger's
    /// family; the series then includes that family. Mirror copies are in it too, by the pod
    /// that served them: Flagger's blue/green mirroring analysis judges the canary by them with
    /// the built-in checks, as it does on Istio, whose sidecars count mirrored requests as any
    /// other.
    pub fn request_series(
        &self,
        labels: &RequestLabels,
        flagger_pod: Option<&Workload>,
    ) -> RequestSeries {
        let flagger = match (&self.flagger, flagger_pod) {
            (Some(flagger), Some(pod)) => Some(flagger.series(&FlaggerLabels {
                kubernetes_namespace: pod.namespace.clone(),
                kubernetes_pod_name: pod.pod.clone(),
                status: labels.status_code,
            })),
            _ => None,
        };
        RequestSeries {
            values: self.requests.series(labels),
            flagger,
        }
    }

    /// The series opaque TCP connections along `edge` are counted in, created if new (one
    /// lookup for the four families).
    pub fn tcp_series(&self, edge: &Edge) -> TcpSeries {
        TcpSeries {
            values: self.tcp.series(edge),
        }
    }

    /// The counter of connections `listener` refused at its connection limit, created (at 0)
    /// if new: the family is never cleared, so the handle stays exported.
    pub fn connections_refused(&self, listener: Direction) -> Counter {
        self.connections_refused
            .get_or_create_owned(&ListenerLabels { listener })
    }

    /// What happened to the copy of one request a mirror rule applied to. A lookup each time,
    /// unlike requests: it is one counter (already atomic, no histogram lock) for the sampled
    /// requests of mirror rules only, and its outcome is known only at the end.
    pub fn mirror(&self, outcome: MirrorOutcome, namespace: &Name, service: &Name) {
        let labels = MirrorLabels {
            outcome,
            destination_namespace: namespace.clone(),
            destination_service: service.clone(),
        };
        self.mirrors.series(&labels).inc();
    }

    /// An endpoint of the backend `namespace/service` failed a request (`reason`), and whether
    /// that ejected it. A lookup each time: failures are the exception.
    pub fn endpoint_failure(
        &self,
        reason: Failure,
        namespace: &Name,
        service: &Name,
        ejected: bool,
    ) {
        let labels = EndpointFailureLabels {
            reason,
            destination_namespace: namespace.clone(),
            destination_service: service.clone(),
        };
        self.endpoint_failures.series(&labels).inc();
        if ejected {
            self.ejections.series(&labels).inc();
        }
    }

    /// The proxy answered a request itself with `status_code`, for `reason`. A lookup each
    /// time: these are the exception.
    pub fn proxy_error(&self, direction: Direction, reason: ProxyError, status_code: u16) {
        let labels = ProxyErrorLabels {
            direction,
            reason,
            status_code,
        };
        self.proxy_errors.series(&labels).inc();
    }

    /// One evaluation of the flag `key` of `namespace`'s flags. A lookup each time: the
    /// variant is known only once the flag is evaluated.
    pub fn flag_evaluation(
        &self,
        evaluator: FlagEvaluator,
        namespace: &Name,
        key: &Name,
        resolution: &Resolution<'_>,
    ) {
        self.flag_evaluations(evaluator, namespace, key, resolution)
            .inc();
    }

    /// The counter of the evaluations of the flag `key` of `namespace`'s flags that answered
    /// as `resolution` did, for a caller that keeps it (see [`Metrics::removals`]).
    pub fn flag_evaluations(
        &self,
        evaluator: FlagEvaluator,
        namespace: &Name,
        key: &Name,
        resolution: &Resolution<'_>,
    ) -> Arc<Counter> {
        let labels = FlagEvaluationLabels {
            evaluator,
            namespace: namespace.clone(),
            feature_flag_key: key.clone(),
            feature_flag_result_variant: resolution.variant.map_or_else(|| "".into(), Name::from),
            feature_flag_result_reason: resolution.reason.as_str(),
            error_type: resolution
                .error
                .as_ref()
                .map_or("", |(code, _)| code.as_str()),
        };
        self.flag_evaluations.series(&labels)
    }

    /// The inbound proxy refused a connection from `source` (None: plain text) to the pod
    /// `destination`. A lookup each time: denials are the exception.
    pub fn denied(&self, reason: DenialReason, source: Option<&Identity>, destination: &Workload) {
        let labels = DenialLabels {
            reason,
            source_principal: source.map_or_else(unknown, |s| s.to_string().into()),
            destination_namespace: destination.namespace.clone(),
            destination_workload: destination.workload.clone(),
        };
        self.denials.series(&labels).inc();
    }

    /// Reads the eBPF counters and map occupancy once (bpf() syscalls: one per counter, one
    /// per map entry) and keeps the reading for the scrapes that follow, which never touch the
    /// maps. The control plane calls it on a timer; until its first call the eBPF metrics are
    /// left out, and a map that cannot be read is left out until a call reads it again. It
    /// takes no lock the request path or a scrape waits on. Without `ebpf` it does nothing.
    pub fn refresh_ebpf(&self) {
        let Some(stats) = &self.ebpf else {
            return;
        };
        let counters = stats
            .counters()
            .inspect_err(|e| debug!(error = %e, "reading the eBPF counters failed"))
            .ok();
        let occupancy = stats
            .occupancy()
            .inspect_err(|e| debug!(error = %e, "reading the eBPF map occupancy failed"))
            .ok();
        self.ebpf_reading.store(Arc::new(EbpfReading {
            counters,
            occupancy,
        }));
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
            let _ = writeln!(text, "# encoding the metrics failed");
        }
        text
    }
}

/// The eBPF counters and map occupancy as [`Metrics::refresh_ebpf`] last read them; `None`:
/// not read yet, or the read failed.
#[derive(Debug, Default)]
struct EbpfReading {
    counters: Option<Vec<(&'static str, u64)>>,
    occupancy: Option<Occupancy>,
}

/// Metrics encoded at scrape time from values kept elsewhere: the series stores' counts, and the
/// last eBPF reading (a scrape makes no bpf() syscall).
struct Internal {
    /// Each store's counts, by the `family` label that names it.
    stores: Vec<(&'static str, Arc<StoreCounts>)>,
    ebpf: Arc<ArcSwap<EbpfReading>>,
}

impl std::fmt::Debug for Internal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Internal")
    }
}

impl Collector for Internal {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let load = |count: &AtomicU64| count.load(Ordering::Relaxed);
        let mut held = encoder.encode_descriptor(
            "aviary_metrics_series",
            "Series held, by family (requests counts both request families, tcp the four TCP \
             ones, which share their series)",
            None,
            MetricType::Gauge,
        )?;
        for (family, counts) in &self.stores {
            let labels = [("family", *family)];
            ConstGauge::new(load(&counts.held) as i64).encode(held.encode_family(&labels)?)?;
        }
        let mut removed = encoder.encode_descriptor(
            "aviary_metrics_series_removed",
            "Series removed: idle for the expiry (reason=\"expired\"), or quiet in a family near \
             its cap (reason=\"evicted\")",
            None,
            MetricType::Counter,
        )?;
        for (family, counts) in &self.stores {
            for (reason, count) in [("expired", &counts.expired), ("evicted", &counts.evicted)] {
                let labels = [("family", *family), ("reason", reason)];
                ConstCounter::new(load(count)).encode(removed.encode_family(&labels)?)?;
            }
        }
        let mut refused = encoder.encode_descriptor(
            "aviary_metrics_series_refused",
            "New series not created because their family held its cap: what they would have \
             counted is lost",
            None,
            MetricType::Counter,
        )?;
        for (family, counts) in &self.stores {
            let labels = [("family", *family)];
            ConstCounter::new(load(&counts.refused)).encode(refused.encode_family(&labels)?)?;
        }
        let reading = self.ebpf.load();
        if let Some(counters) = &reading.counters {
            for &(name, value) in counters {
                let counter = ConstCounter::new(value);
                let help = match name {
                    "connect_captured" => "Connects from enrolled pods sent to the proxy",
                    "connect_failed_open" => {
                        "Connects that would have been captured but went direct: no proxy listening"
                    }
                    _ => "An eBPF program counter",
                };
                counter.encode(encoder.encode_descriptor(
                    &format!("aviary_ebpf_{name}"),
                    help,
                    None,
                    counter.metric_type(),
                )?)?;
            }
        }
        if let Some(occupancy) = &reading.occupancy {
            let maps = [
                ("orig_by_cookie", occupancy.orig_by_cookie),
                ("orig_dst", occupancy.orig_dst),
                ("sockets", occupancy.sockets),
                ("msg_bypass", occupancy.msg_bypass),
            ];
            let mut family = encoder.encode_descriptor(
                "aviary_ebpf_map_entries",
                "Entries in the connection-tracking eBPF maps",
                None,
                MetricType::Gauge,
            )?;
            for (map, entries) in maps {
                let labels = [("map", map)];
                ConstGauge::new(entries as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{sample, EVICT_TO, MAX_SERIES, SWEEP_INTERVAL};

    fn mirror(metrics: &Metrics, service: usize) {
        let name: Name = format!("svc-{service}").into();
        metrics.mirror(MirrorOutcome::Sent, &name, &name);
    }

    /// The value of the mirror series of `service`, if the family holds it.
    fn mirrored(metrics: &Metrics, service: usize) -> Option<u64> {
        let name: Name = format!("svc-{service}").into();
        let labels = MirrorLabels {
            outcome: MirrorOutcome::Sent,
            destination_namespace: name.clone(),
            destination_service: name,
        };
        metrics.mirrors.held(&labels).map(|counter| counter.get())
    }

    const EXPIRY: Duration = Duration::from_secs(600);

    #[test]
    fn a_family_at_its_cap_refuses_new_series_keeps_its_hot_ones_and_evicts_the_quietest() {
        let metrics = Metrics::new(false, None);
        let start = Instant::now();
        for service in 0..MAX_SERIES {
            mirror(&metrics, service);
        }
        // At the cap, an existing series counts on and a new one is refused, counted apart.
        mirror(&metrics, 0);
        mirror(&metrics, MAX_SERIES);
        let text = metrics.render();
        assert_eq!(
            sample(&text, "aviary_mirror_requests_total", &[]),
            MAX_SERIES as f64 + 1.0
        );
        assert_eq!(mirrored(&metrics, 0), Some(2));
        assert_eq!(mirrored(&metrics, MAX_SERIES), None);
        let family = [("family", "mirrors")];
        assert_eq!(
            sample(&text, "aviary_metrics_series_refused_total", &family),
            1.0
        );
        assert_eq!(
            sample(&text, "aviary_metrics_series", &family),
            MAX_SERIES as f64
        );

        // The first sweep sees every series move. Then one in ten is hot, and one in ten was
        // hot until the second sweep only.
        metrics.sweep(EXPIRY, start);
        let hot = |service: &usize| service.is_multiple_of(10);
        let lately = |service: &usize| service % 10 == 1;
        for service in (0..MAX_SERIES).filter(|s| hot(s) || lately(s)) {
            mirror(&metrics, service);
        }
        // The family is above EVICT_TO: the sweep evicts, from the series quiet since the
        // first sweep, as many as it takes to come down to EVICT_TO.
        metrics.sweep(EXPIRY, start + SWEEP_INTERVAL);
        assert_eq!(metrics.removals(), 1);
        let held = |metrics: &Metrics| metrics.mirrors.count();
        assert_eq!(held(&metrics), EVICT_TO);
        for service in (0..MAX_SERIES).filter(|s| hot(s) || lately(s)) {
            let value = if service == 0 { 3 } else { 2 };
            assert_eq!(mirrored(&metrics, service), Some(value), "svc-{service}");
        }
        // Room for new series again, up to the cap.
        for service in MAX_SERIES..MAX_SERIES + (MAX_SERIES - EVICT_TO) {
            mirror(&metrics, service);
        }
        assert_eq!(held(&metrics), MAX_SERIES);
        assert_eq!(mirrored(&metrics, MAX_SERIES), Some(1));

        // Next time the hot ones move again, the new ones are seen for the first time, and the
        // quietest, the ones quiet since the first sweep, go before the ones hot until the
        // second.
        for service in (0..MAX_SERIES).filter(hot) {
            mirror(&metrics, service);
        }
        metrics.sweep(EXPIRY, start + 2 * SWEEP_INTERVAL);
        assert_eq!(metrics.removals(), 2);
        assert_eq!(held(&metrics), EVICT_TO);
        for service in (0..MAX_SERIES).filter(|s| hot(s) || lately(s)) {
            assert!(mirrored(&metrics, service).is_some(), "svc-{service}");
        }
        let text = metrics.render();
        assert_eq!(
            sample(
                &text,
                "aviary_metrics_series_removed_total",
                &[("family", "mirrors"), ("reason", "evicted")]
            ),
            2.0 * (MAX_SERIES - EVICT_TO) as f64
        );
        assert_eq!(
            sample(
                &text,
                "aviary_metrics_series_removed_total",
                &[("reason", "expired")]
            ),
            0.0
        );
    }

    #[test]
    fn an_idle_series_expires_while_a_hot_one_in_its_family_keeps_its_value() {
        let metrics = Metrics::new(true, None);
        let start = Instant::now();
        let took = Duration::from_millis(3);
        let hot = metrics.request_series(&labels("hot", 200, false), Some(&pod()));
        let idle = metrics.request_series(&labels("idle", 200, false), None);
        hot.record(took);
        idle.record(took);
        metrics.sweep(EXPIRY, start);
        // The hot series is recorded into between every two sweeps, the idle one never again.
        for minute in 1..=10 {
            assert_eq!(metrics.removals(), 0, "minute {minute}");
            hot.record(took);
            metrics.sweep(EXPIRY, start + Duration::from_secs(60 * minute));
        }
        assert_eq!(metrics.removals(), 1);
        let text = metrics.render();
        assert!(!text.contains("destination_service=\"idle\""), "{text}");
        let hot = [("destination_service", "hot")];
        assert_eq!(sample(&text, "aviary_requests_total", &hot), 11.0);
        assert_eq!(
            sample(&text, "aviary_request_duration_seconds_count", &hot),
            11.0
        );
        assert_eq!(
            sample(&text, "http_request_duration_seconds_count", &[]),
            11.0
        );
        let requests = [("family", "requests")];
        assert_eq!(sample(&text, "aviary_metrics_series", &requests), 1.0);
        assert_eq!(
            sample(&text, "aviary_metrics_series", &[("family", "flagger")]),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "aviary_metrics_series_removed_total",
                &[("family", "requests"), ("reason", "expired")]
            ),
            1.0
        );
        // A series that comes back starts again from 0.
        metrics
            .request_series(&labels("idle", 200, false), None)
            .record(took);
        let text = metrics.render();
        let idle = [("destination_service", "idle")];
        assert_eq!(sample(&text, "aviary_requests_total", &idle), 1.0);
    }

    #[test]
    fn a_tcp_series_with_a_connection_open_outlives_the_expiry() {
        let metrics = Metrics::new(false, None);
        let start = Instant::now();
        let connection = metrics.tcp_series(&edge("db"));
        connection.opened();
        for expiries in 0..3 {
            metrics.sweep(EXPIRY, start + expiries * EXPIRY);
        }
        assert_eq!(metrics.removals(), 0);
        connection.closed(10, 20);
        drop(connection);
        let text = metrics.render();
        assert_eq!(
            sample(&text, "aviary_tcp_connections_closed_total", &[]),
            1.0
        );
        assert_eq!(sample(&text, "aviary_tcp_received_bytes_total", &[]), 20.0);
        // Closed, it is idle from its close on.
        metrics.sweep(EXPIRY, start + 3 * EXPIRY);
        assert_eq!(metrics.removals(), 0);
        metrics.sweep(EXPIRY, start + 4 * EXPIRY);
        assert_eq!(metrics.removals(), 1);
        let text = metrics.render();
        assert!(
            !text.contains("aviary_tcp_connections_opened_total"),
            "{text}"
        );
    }

    fn name(s: &str) -> Name {
        s.into()
    }

    fn edge(service: &str) -> Edge {
        Edge {
            direction: Direction::outbound,
            source_namespace: name("web"),
            source_workload: name("frontend"),
            destination_namespace: name("shop"),
            destination_service: name(service),
            destination_workload: name("podinfo"),
            destination_version: name("podinfo-canary"),
            source_principal: name("unknown"),
            destination_principal: name("unknown"),
            connection_security_policy: Security::none,
        }
    }

    fn labels(service: &str, status_code: u16, mirror: bool) -> RequestLabels {
        RequestLabels {
            edge: edge(service),
            method: MethodClass::GET,
            status_code,
            mirror,
        }
    }

    fn pod() -> Workload {
        Workload {
            namespace: name("shop"),
            workload: name("podinfo"),
            pod: name("podinfo-7d9f8b-aaaaa"),
        }
    }

    /// The lines of a rendering, sorted: two families with the same series list them in
    /// different orders.
    fn lines(text: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        lines
    }

    #[test]
    fn a_request_series_handle_counts_as_a_lookup_per_request_does() {
        let durations = |i: u64| Duration::from_micros(i * 137 % 3_000_000);
        let (looked_up, handled) = (Metrics::new(true, None), Metrics::new(true, None));
        let kinds = [
            (labels("podinfo", 200, false), Some(pod())),
            (labels("podinfo", 503, false), Some(pod())),
            (labels("podinfo", 200, true), Some(pod())),
            (labels("checkout", 200, false), None),
        ];
        for i in 0..1_000 {
            let (labels, pod) = &kinds[i as usize % kinds.len()];
            looked_up
                .request_series(labels, pod.as_ref())
                .record(durations(i));
        }
        let handles: Vec<RequestSeries> = kinds
            .iter()
            .map(|(labels, pod)| handled.request_series(labels, pod.as_ref()))
            .collect();
        for i in 0..1_000 {
            handles[i as usize % kinds.len()].record(durations(i));
        }
        let text = handled.render();
        assert_eq!(lines(&looked_up.render()), lines(&text));
        assert_eq!(sample(&text, "aviary_requests_total", &[]), 1_000.0);
        assert_eq!(
            sample(&text, "aviary_request_duration_seconds_count", &[]),
            1_000.0
        );

        // The same for opaque TCP, from several threads sharing one handle.
        let (looked_up, handled) = (Metrics::new(false, None), Metrics::new(false, None));
        let db = edge("db");
        let tcp = handled.tcp_series(&db);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let (looked_up, tcp, db) = (&looked_up, tcp.clone(), &db);
                scope.spawn(move || {
                    for i in 0..250 {
                        let series = looked_up.tcp_series(db);
                        series.opened();
                        series.closed(i, 2 * i);
                        tcp.opened();
                        tcp.closed(i, 2 * i);
                    }
                });
            }
        });
        let text = handled.render();
        assert_eq!(lines(&looked_up.render()), lines(&text));
        assert_eq!(
            sample(&text, "aviary_tcp_connections_closed_total", &[]),
            1_000.0
        );
        assert_eq!(
            sample(&text, "aviary_tcp_received_bytes_total", &[]),
            4.0 * 2.0 * (0..250).sum::<u64>() as f64
        );
    }

    #[test]
    fn flaggers_family_counts_requests_to_a_known_pod_mirror_copies_included() {
        let metrics = Metrics::new(true, None);
        let took = Duration::from_millis(3);
        // A request and its mirror copy, each answered by a pod this agent reports; then two
        // that no known pod answered (or that another agent reports).
        metrics
            .request_series(&labels("podinfo", 200, false), Some(&pod()))
            .record(took);
        metrics
            .request_series(&labels("podinfo", 200, true), Some(&pod()))
            .record(took);
        metrics
            .request_series(&labels("podinfo", 503, false), None)
            .record(took);
        metrics
            .request_series(&labels("podinfo", 503, true), None)
            .record(took);
        let text = metrics.render();
        assert_eq!(sample(&text, "aviary_requests_total", &[]), 4.0);
        assert_eq!(
            sample(&text, "aviary_request_duration_seconds_count", &[]),
            4.0
        );
        // Aviary's own family tells the copies apart; Flagger's counts what each pod served.
        assert_eq!(
            sample(
                &text,
                "aviary_requests_total",
                &[("mirror", "true"), ("status_code", "200")]
            ),
            1.0
        );
        assert_eq!(
            sample(&text, "http_request_duration_seconds_count", &[]),
            2.0,
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "http_request_duration_seconds_count",
                &[
                    ("kubernetes_namespace", "shop"),
                    ("kubernetes_pod_name", "podinfo-7d9f8b-aaaaa"),
                    ("status", "200")
                ]
            ),
            2.0
        );
        assert_eq!(
            sample(
                &text,
                "http_request_duration_seconds_bucket",
                &[("status", "200"), ("le", "0.005")]
            ),
            2.0
        );

        // Without the family, no request is in it.
        let metrics = Metrics::new(false, None);
        metrics
            .request_series(&labels("podinfo", 200, false), Some(&pod()))
            .record(took);
        let text = metrics.render();
        assert!(!text.contains("http_request_duration_seconds"), "{text}");
        assert_eq!(sample(&text, "aviary_requests_total", &[]), 1.0);
    }

    #[test]
    fn a_scrape_encodes_the_last_ebpf_reading_and_nothing_before_the_first() {
        let metrics = Metrics::new(false, None);
        // Without pinned maps a refresh reads nothing.
        metrics.refresh_ebpf();
        let text = metrics.render();
        assert!(!text.contains("aviary_ebpf_"), "{text}");
        metrics.ebpf_reading.store(Arc::new(EbpfReading {
            counters: Some(vec![("connect_captured", 7), ("connect_failed_open", 0)]),
            occupancy: Some(Occupancy {
                orig_by_cookie: 1,
                orig_dst: 2,
                sockets: 3,
                msg_bypass: 0,
            }),
        }));
        let text = metrics.render();
        assert_eq!(
            sample(&text, "aviary_ebpf_connect_captured_total", &[]),
            7.0
        );
        assert!(
            text.contains("aviary_ebpf_connect_failed_open_total 0\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP aviary_ebpf_connect_captured Connects from enrolled pods"),
            "{text}"
        );
        assert_eq!(
            sample(&text, "aviary_ebpf_map_entries", &[("map", "sockets")]),
            3.0
        );
        assert!(
            text.contains("# TYPE aviary_ebpf_map_entries gauge"),
            "{text}"
        );
        // A map that could not be read is left out.
        metrics.ebpf_reading.store(Arc::new(EbpfReading {
            counters: Some(vec![("connect_captured", 8)]),
            occupancy: None,
        }));
        let text = metrics.render();
        assert_eq!(
            sample(&text, "aviary_ebpf_connect_captured_total", &[]),
            8.0
        );
        assert!(!text.contains("aviary_ebpf_map_entries"), "{text}");
    }

    #[test]
    fn methods_outside_the_standard_ones_are_one_label_value() {
        assert_eq!(MethodClass::from(&Method::GET), MethodClass::GET);
        let custom = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(MethodClass::from(&custom), MethodClass::OTHER);
    }
}
