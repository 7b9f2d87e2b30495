//! Node-level Prometheus metrics (OpenMetrics text on `:15020/metrics`), on their own port so a
//! slow scrape never competes with traffic.
//!
//! Cardinality is bounded twice over:
//! - every label value comes from the policy snapshot (namespaces, Services, workloads, pods the
//!   node's clients reach) or from a fixed set (direction, method class, status code, mirror
//!   outcome); nothing a request carries becomes a label value;
//! - each family holds at most [`MAX_SERIES`] series. A family that reaches it is cleared and
//!   starts again, which Prometheus reads as a counter reset, and
//!   `aviary_metrics_series_resets_total` counts it.

use std::{
    fmt::Write as _,
    hash::Hash,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use http::Method;
use prometheus_client::{
    collector::Collector,
    encoding::{
        text::encode, DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
        LabelValueEncoder,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::{Family, MetricConstructor},
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::{
    ebpf::maps::Stats,
    proxy::{
        http::MirrorOutcome,
        route::{unknown, ServiceRoutes, Workload},
    },
};

/// Series per family before it is cleared.
pub const MAX_SERIES: usize = 20_000;

/// Request duration buckets, in seconds: 0.5 ms to 10 s (Flagger checks p99 in milliseconds).
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub type Name = Arc<str>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
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

/// Who sent a request or opened a connection, and where it went.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Route {
    pub direction: Direction,
    pub source_namespace: Name,
    pub source_workload: Name,
    pub destination_namespace: Name,
    pub destination_service: Name,
    pub destination_workload: Name,
    /// The backend Service chosen (e.g. podinfo-primary or podinfo-canary).
    pub destination_version: Name,
}

impl Route {
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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub route: Route,
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
            Self::DroppedOverload => "dropped_overload",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
        };
        EncodeLabelValue::encode(&outcome, encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MirrorLabels {
    outcome: MirrorOutcome,
    destination_namespace: Name,
    destination_service: Name,
}

#[derive(Debug, Clone)]
struct Buckets;

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(DURATION_BUCKETS)
    }
}

/// A family that never holds more than [`MAX_SERIES`] series.
struct Bounded<S, M, C = fn() -> M> {
    family: Family<S, M, C>,
    /// Series created since the family was last cleared (racing creators may count one twice,
    /// which errs on the safe side).
    series: AtomicUsize,
    resets: Arc<AtomicU64>,
}

impl<S: Clone + Eq + Hash, M, C: MetricConstructor<M>> Bounded<S, M, C> {
    fn with(&self, labels: &S, f: impl FnOnce(&M)) {
        if let Some(metric) = self.family.get(labels) {
            return f(&metric);
        }
        if self.series.fetch_add(1, Ordering::Relaxed) >= MAX_SERIES {
            self.family.clear();
            self.series.store(1, Ordering::Relaxed);
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        f(&self.family.get_or_create(labels));
    }
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    requests: Bounded<RequestLabels, Counter>,
    durations: Bounded<RequestLabels, Histogram, Buckets>,
    flagger: Option<Bounded<FlaggerLabels, Histogram, Buckets>>,
    mirrors: Bounded<MirrorLabels, Counter>,
    tcp_opened: Bounded<Route, Counter>,
    tcp_closed: Bounded<Route, Counter>,
    tcp_sent: Bounded<Route, Counter>,
    tcp_received: Bounded<Route, Counter>,
}

impl Metrics {
    /// `flagger_family`: also export `http_request_duration_seconds` for Flagger's built-in
    /// checks. `ebpf`: the pinned counters and maps, read at each scrape.
    pub fn new(flagger_family: bool, ebpf: Option<Stats>) -> Self {
        let mut registry = Registry::default();
        let resets = Arc::new(AtomicU64::new(0));
        fn bounded<S, M, C>(
            registry: &mut Registry,
            resets: &Arc<AtomicU64>,
            name: &str,
            help: &str,
            family: Family<S, M, C>,
        ) -> Bounded<S, M, C>
        where
            Family<S, M, C>: EncodeMetric + prometheus_client::metrics::TypedMetric,
            S: Send + Sync + std::fmt::Debug + 'static,
            M: Send + Sync + std::fmt::Debug + 'static,
            C: Clone + Send + Sync + std::fmt::Debug + 'static,
        {
            registry.register(name, help, family.clone());
            Bounded {
                family,
                series: AtomicUsize::new(0),
                resets: resets.clone(),
            }
        }
        let requests = bounded(
            &mut registry,
            &resets,
            "aviary_requests",
            "HTTP requests the proxy answered, mirror copies included (mirror=\"true\")",
            Family::default(),
        );
        let durations = bounded(
            &mut registry,
            &resets,
            "aviary_request_duration_seconds",
            "Time from a request to its response headers",
            Family::new_with_constructor(Buckets),
        );
        let flagger = flagger_family.then(|| {
            bounded(
                &mut registry,
                &resets,
                "http_request_duration_seconds",
                "Requests by destination pod, in the family Flagger's built-in checks query",
                Family::new_with_constructor(Buckets),
            )
        });
        let mirrors = bounded(
            &mut registry,
            &resets,
            "aviary_mirror_requests",
            "Requests a mirror rule applied to, by what happened to the copy",
            Family::default(),
        );
        let tcp_opened = bounded(
            &mut registry,
            &resets,
            "aviary_tcp_connections_opened",
            "Opaque TCP connections the proxy opened",
            Family::default(),
        );
        let tcp_closed = bounded(
            &mut registry,
            &resets,
            "aviary_tcp_connections_closed",
            "Opaque TCP connections that ended",
            Family::default(),
        );
        let tcp_sent = bounded(
            &mut registry,
            &resets,
            "aviary_tcp_sent_bytes",
            "Bytes of opaque TCP connections, client to destination",
            Family::default(),
        );
        let tcp_received = bounded(
            &mut registry,
            &resets,
            "aviary_tcp_received_bytes",
            "Bytes of opaque TCP connections, destination to client",
            Family::default(),
        );
        registry.register_collector(Box::new(Internal { resets, ebpf }));
        Self {
            registry,
            requests,
            durations,
            flagger,
            mirrors,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
        }
    }

    /// One answered request. `flagger_pod` is the destination pod when an endpoint answered
    /// and this agent is the one that reports the request in Flagger's family.
    pub fn request(&self, labels: &RequestLabels, flagger_pod: Option<&Workload>, took: Duration) {
        self.requests.with(labels, |c| {
            c.inc();
        });
        let seconds = took.as_secs_f64();
        self.durations.with(labels, |h| h.observe(seconds));
        if let (Some(flagger), Some(pod), false) = (&self.flagger, flagger_pod, labels.mirror) {
            let labels = FlaggerLabels {
                kubernetes_namespace: pod.namespace.clone(),
                kubernetes_pod_name: pod.pod.clone(),
                status: labels.status_code,
            };
            flagger.with(&labels, |h| h.observe(seconds));
        }
    }

    pub fn mirror(&self, outcome: MirrorOutcome, namespace: &Name, service: &Name) {
        let labels = MirrorLabels {
            outcome,
            destination_namespace: namespace.clone(),
            destination_service: service.clone(),
        };
        self.mirrors.with(&labels, |c| {
            c.inc();
        });
    }

    pub fn tcp_opened(&self, route: &Route) {
        self.tcp_opened.with(route, |c| {
            c.inc();
        });
    }

    pub fn tcp_closed(&self, route: &Route, sent: u64, received: u64) {
        self.tcp_closed.with(route, |c| {
            c.inc();
        });
        self.tcp_sent.with(route, |c| {
            c.inc_by(sent);
        });
        self.tcp_received.with(route, |c| {
            c.inc_by(received);
        });
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

/// Metrics read at scrape time: the eBPF counters and maps, and the series resets.
struct Internal {
    resets: Arc<AtomicU64>,
    ebpf: Option<Stats>,
}

impl std::fmt::Debug for Internal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Internal")
    }
}

impl Collector for Internal {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let resets = ConstCounter::new(self.resets.load(Ordering::Relaxed));
        resets.encode(encoder.encode_descriptor(
            "aviary_metrics_series_resets",
            "Families cleared because they reached their series bound",
            None,
            resets.metric_type(),
        )?)?;
        let Some(stats) = &self.ebpf else {
            return Ok(());
        };
        // A map that cannot be read leaves its metric out of this scrape; nothing else.
        if let Ok(counters) = stats.counters() {
            for (name, value) in counters {
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
        if let Ok(occupancy) = stats.occupancy() {
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
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, entries) in maps {
                let labels = [("map", map)];
                ConstGauge::new(entries as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The sum of the samples of `series` in exposition text whose labels include all of `labels`:
/// how the tests and the demo read what the agent exported.
pub fn sample(text: &str, series: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(metrics: &Metrics, service: usize) {
        let name: Name = format!("svc-{service}").into();
        metrics.mirror(MirrorOutcome::Sent, &name, &name);
    }

    #[test]
    fn a_family_at_its_series_bound_is_cleared_and_the_reset_counted() {
        let metrics = Metrics::new(false, None);
        for service in 0..MAX_SERIES {
            mirror(&metrics, service);
        }
        let text = metrics.render();
        assert_eq!(
            sample(&text, "aviary_metrics_series_resets_total", &[]),
            0.0
        );
        assert_eq!(
            sample(&text, "aviary_mirror_requests_total", &[]),
            MAX_SERIES as f64
        );
        // An existing series never triggers the bound; a new one past it does.
        mirror(&metrics, 0);
        mirror(&metrics, MAX_SERIES);
        let text = metrics.render();
        assert_eq!(
            sample(&text, "aviary_metrics_series_resets_total", &[]),
            1.0
        );
        assert_eq!(sample(&text, "aviary_mirror_requests_total", &[]), 1.0);
    }

    #[test]
    fn methods_outside_the_standard_ones_are_one_label_value() {
        assert_eq!(MethodClass::from(&Method::GET), MethodClass::GET);
        let custom = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(MethodClass::from(&custom), MethodClass::OTHER);
    }
}
