//! Node-level Prometheus metrics (OpenMetrics text on `:15020/metrics`), on their own port so a
//! slow scrape never competes with traffic.
//!
//! The request path takes no lock and hashes no labels: a caller resolves a series handle once
//! ([`Metrics::request_series`], [`Metrics::tcp_series`]: one family lookup each) and records
//! through it as often as it likes, with atomic increments only. Durations go to an
//! [`AtomicHistogram`], which renders exactly as prometheus-client's `Histogram` but observes
//! without its lock. Scrapes make no bpf() syscalls either: the eBPF counters and map
//! occupancy are read by [`Metrics::refresh_ebpf`], on the control plane's timer, and a scrape
//! encodes the last reading.
//!
//! Cardinality is bounded twice over:
//! - every label value comes from the policy snapshot (namespaces, Services, workloads, pods the
//!   node's clients reach) or from a fixed set (direction, method class, status code, mirror
//!   outcome); nothing a request carries becomes a label value;
//! - each family holds at most [`MAX_SERIES`] series. A family that reaches it is cleared and
//!   starts again, which Prometheus reads as a counter reset, and
//!   `aviary_metrics_series_resets_total` counts it. A series handle obtained before a clear
//!   is no longer exported after it.

use std::{
    fmt::Write as _,
    hash::Hash,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use http::Method;
use prometheus_client::{
    collector::Collector,
    encoding::{
        text::encode, DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
        LabelValueEncoder, MetricEncoder, NoLabelSet,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::{Family, MetricConstructor},
        gauge::ConstGauge,
        MetricType, TypedMetric,
    },
    registry::Registry,
};
use tracing::debug;

use crate::{
    ebpf::maps::{Occupancy, Stats},
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

/// The proxy listener a connection came to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabels {
    listener: Direction,
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

/// Buckets of an [`AtomicHistogram`]: one per bound, and +Inf.
const BUCKETS: usize = DURATION_BUCKETS.len() + 1;

/// A histogram over [`DURATION_BUCKETS`] whose [`observe`](Self::observe) is atomic operations
/// only: no lock, so observers never wait for each other or for a scrape. A clone shares the
/// same histogram.
///
/// It renders exactly as prometheus-client's `Histogram` over the same buckets (`_sum`,
/// `_count`, cumulative `_bucket`s with the same `le` labels and `+Inf`). A scrape that races
/// an observation may see that observation's bucket without its share of `_sum` (or the
/// reverse); `_count` is the total of the buckets read, so it always equals the `+Inf` bucket.
#[derive(Debug, Clone, Default)]
pub struct AtomicHistogram {
    inner: Arc<HistogramCells>,
}

#[derive(Debug, Default)]
struct HistogramCells {
    /// Observations per bucket, not cumulative: bucket `i` counts the values up to
    /// `DURATION_BUCKETS[i]` not counted by an earlier bucket; the last one, those above every
    /// bound (+Inf). `_count` is their total, so there is no count to increment apart.
    buckets: [AtomicU64; BUCKETS],
    /// The sum of the observations, as the bits of an f64, added to by a compare-and-swap loop.
    /// Integer nanoseconds in an `AtomicU64` would take a single `fetch_add`, but each f64
    /// observation would be rounded to a nanosecond on the way in, so `_sum` would drift from
    /// what prometheus-client renders for the same observations; and the total wraps after
    /// 2^64 ns (584 years) of summed latency, e.g. within 3 weeks for a series at 10,000
    /// requests/s of 1 s each, which Prometheus would read as a reset. An f64 sum never wraps
    /// and adds up exactly as prometheus-client's `Histogram` does, so the rendered `_sum` is
    /// the same to the last digit. The loop only retries when another observation of the same
    /// series lands between its load and its swap.
    sum: AtomicU64,
}

impl AtomicHistogram {
    pub fn new() -> Self {
        Self::default()
    }

    /// One observation, in seconds. A value above the highest bound, or not a number, counts in
    /// the +Inf bucket.
    pub fn observe(&self, value: f64) {
        // The first bucket whose bound is at least `value`, as prometheus-client picks it.
        let bucket = if value.is_nan() {
            BUCKETS - 1
        } else {
            DURATION_BUCKETS.partition_point(|&bound| bound < value)
        };
        let cells = &*self.inner;
        cells.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let _ = cells
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// The sum, the count and the per-bucket counts (not cumulative), the last bucket's bound
    /// being `f64::MAX`, which the encoder renders as `+Inf`.
    fn snapshot(&self) -> (f64, u64, [(f64, u64); BUCKETS]) {
        let cells = &*self.inner;
        let mut buckets = [(f64::MAX, 0); BUCKETS];
        for (i, (bucket, cell)) in buckets.iter_mut().zip(&cells.buckets).enumerate() {
            *bucket = (
                DURATION_BUCKETS.get(i).copied().unwrap_or(f64::MAX),
                cell.load(Ordering::Relaxed),
            );
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = f64::from_bits(cells.sum.load(Ordering::Relaxed));
        (sum, count, buckets)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
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

impl<S: Clone + Eq + Hash, M: Clone, C: MetricConstructor<M>> Bounded<S, M, C> {
    /// The series of `labels` (a handle: a clone shares its value), created if new. Creating
    /// one in a full family clears the family first. A handle obtained before a clear stays
    /// usable but is no longer exported: what is recorded through it afterwards is lost, and
    /// the next lookup of its labels creates a new series. (Per-series expiry will replace the
    /// clearing.)
    fn series(&self, labels: &S) -> M {
        if let Some(metric) = self.family.get(labels) {
            return M::clone(&metric);
        }
        if self.series.fetch_add(1, Ordering::Relaxed) >= MAX_SERIES {
            self.family.clear();
            self.series.store(1, Ordering::Relaxed);
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        self.family.get_or_create_owned(labels)
    }
}

/// The series one kind of request is counted in: resolved once by [`Metrics::request_series`],
/// then [`record`](Self::record)ed through as often as wanted, with atomic increments only. A
/// clone shares the same series.
///
/// A handle is meant to be kept while its labels hold (e.g. per connection, route, method and
/// status); a handle kept across a family's clearing at its series bound records into series
/// that are no longer exported (see [`MAX_SERIES`]), so a long-lived cache of handles should
/// be rebuilt from time to time.
#[derive(Debug, Clone)]
pub struct RequestSeries {
    requests: Counter,
    duration: AtomicHistogram,
    /// `http_request_duration_seconds`, when this agent reports these requests to Flagger.
    flagger: Option<AtomicHistogram>,
}

impl RequestSeries {
    /// One answered request that took `took`, from the request to its response headers.
    pub fn record(&self, took: Duration) {
        self.requests.inc();
        let seconds = took.as_secs_f64();
        self.duration.observe(seconds);
        if let Some(flagger) = &self.flagger {
            flagger.observe(seconds);
        }
    }
}

/// The series of opaque TCP connections along one [`Route`]: resolved once per connection by
/// [`Metrics::tcp_series`], then updated with atomic increments only. A clone shares the same
/// series; the same caveat about the series bound as for [`RequestSeries`] applies.
#[derive(Debug, Clone)]
pub struct TcpSeries {
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl TcpSeries {
    /// A connection along the route was opened (its upstream connect succeeded).
    pub fn opened(&self) {
        self.opened.inc();
    }

    /// A connection along the route ended, having copied `sent` bytes from the client to the
    /// destination and `received` bytes back.
    pub fn closed(&self, sent: u64, received: u64) {
        self.closed.inc();
        self.sent.inc_by(sent);
        self.received.inc_by(received);
    }
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    requests: Bounded<RequestLabels, Counter>,
    durations: Bounded<RequestLabels, AtomicHistogram>,
    flagger: Option<Bounded<FlaggerLabels, AtomicHistogram>>,
    mirrors: Bounded<MirrorLabels, Counter>,
    tcp_opened: Bounded<Route, Counter>,
    tcp_closed: Bounded<Route, Counter>,
    tcp_sent: Bounded<Route, Counter>,
    tcp_received: Bounded<Route, Counter>,
    /// By listener kind: two series at most, so not bounded.
    connections_refused: Family<ListenerLabels, Counter>,
    /// The pinned counters and maps, read by [`Metrics::refresh_ebpf`] only.
    ebpf: Option<Stats>,
    /// The last reading of `ebpf`, which scrapes encode.
    ebpf_reading: Arc<ArcSwap<EbpfReading>>,
    /// Families cleared at their bound so far.
    resets: Arc<AtomicU64>,
}

impl Metrics {
    /// `flagger_family`: also export `http_request_duration_seconds` for Flagger's built-in
    /// checks. `ebpf`: the pinned counters and maps, read by each [`Metrics::refresh_ebpf`].
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
            Family<S, M, C>: EncodeMetric + TypedMetric,
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
            Family::default(),
        );
        let flagger = flagger_family.then(|| {
            bounded(
                &mut registry,
                &resets,
                "http_request_duration_seconds",
                "Requests by destination pod, in the family Flagger's built-in checks query",
                Family::default(),
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
        let connections_refused = Family::default();
        registry.register(
            "aviary_connections_refused",
            "Connections reset on accept because their listener held --max-connections already",
            connections_refused.clone(),
        );
        let ebpf_reading = Arc::new(ArcSwap::from_pointee(EbpfReading::default()));
        registry.register_collector(Box::new(Internal {
            resets: resets.clone(),
            ebpf: ebpf_reading.clone(),
        }));
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
            connections_refused,
            ebpf,
            ebpf_reading,
            resets,
        }
    }

    /// How many times a family was cleared at its bound: a handle resolved before the latest
    /// clear is no longer exported, so holders of handles resolve them again when this moves.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// The series answered requests with `labels` are counted in, created if new (one lookup
    /// per family). `flagger_pod` is the destination pod when an endpoint answered and this
    /// agent is the one that reports the request in Flagger's family; the series then includes
    /// that family, unless the request is a mirror copy (`labels.mirror`), which Flagger never
    /// sees.
    pub fn request_series(
        &self,
        labels: &RequestLabels,
        flagger_pod: Option<&Workload>,
    ) -> RequestSeries {
        let flagger = match (&self.flagger, flagger_pod, labels.mirror) {
            (Some(flagger), Some(pod), false) => Some(flagger.series(&FlaggerLabels {
                kubernetes_namespace: pod.namespace.clone(),
                kubernetes_pod_name: pod.pod.clone(),
                status: labels.status_code,
            })),
            _ => None,
        };
        RequestSeries {
            requests: self.requests.series(labels),
            duration: self.durations.series(labels),
            flagger,
        }
    }

    /// The series opaque TCP connections along `route` are counted in, created if new (one
    /// lookup per family).
    pub fn tcp_series(&self, route: &Route) -> TcpSeries {
        TcpSeries {
            opened: self.tcp_opened.series(route),
            closed: self.tcp_closed.series(route),
            sent: self.tcp_sent.series(route),
            received: self.tcp_received.series(route),
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

/// Metrics encoded at scrape time from values kept elsewhere: the series resets, and the last
/// eBPF reading (a scrape makes no bpf() syscall).
struct Internal {
    resets: Arc<AtomicU64>,
    ebpf: Arc<ArcSwap<EbpfReading>>,
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

    fn name(s: &str) -> Name {
        s.into()
    }

    fn route(service: &str) -> Route {
        Route {
            direction: Direction::outbound,
            source_namespace: name("web"),
            source_workload: name("frontend"),
            destination_namespace: name("shop"),
            destination_service: name(service),
            destination_workload: name("podinfo"),
            destination_version: name("podinfo-canary"),
        }
    }

    fn labels(service: &str, status_code: u16, mirror: bool) -> RequestLabels {
        RequestLabels {
            route: route(service),
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

    /// Durations in seconds covering every bucket: below the first bound, on bounds, between
    /// them, above the last, and sums that do not add up exactly in binary.
    const OBSERVATIONS: [f64; 24] = [
        0.0, 0.0001, 0.0005, 0.0007, 0.001, 0.0012, 0.0025, 0.003, 0.005, 0.0099, 0.01, 0.1, 0.2,
        0.3, 0.25, 0.33, 0.5, 0.75, 1.0, 2.5, 4.9, 5.0, 10.0, 42.0,
    ];

    #[test]
    fn an_atomic_histogram_renders_exactly_as_prometheus_clients_histogram() {
        use prometheus_client::metrics::histogram::Histogram;

        // Each family holds one series, so that the two renderings list them in the same order
        // (a family's series come in its hash map's order, which differs between maps).
        let reference_family = || {
            Family::<RequestLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS)
            })
        };
        let (reference_ok, reference_failed) = (reference_family(), reference_family());
        let atomic_ok = Family::<RequestLabels, AtomicHistogram>::default();
        let atomic_failed = Family::<RequestLabels, AtomicHistogram>::default();
        let (reference, atomic) = (Histogram::new(DURATION_BUCKETS), AtomicHistogram::new());
        let mut registries = [Registry::default(), Registry::default()];
        registries[0].register("lone", "A histogram", reference.clone());
        registries[0].register("ok", "Histograms", reference_ok.clone());
        registries[0].register("failed", "Histograms", reference_failed.clone());
        registries[1].register("lone", "A histogram", atomic.clone());
        registries[1].register("ok", "Histograms", atomic_ok.clone());
        registries[1].register("failed", "Histograms", atomic_failed.clone());
        let render = |registry: &Registry| {
            let mut text = String::new();
            encode(&mut text, registry).unwrap();
            text
        };
        // Nothing observed, and no series in the families.
        assert_eq!(render(&registries[0]), render(&registries[1]));
        let (ok, failed) = (labels("podinfo", 200, false), labels("podinfo", 503, false));
        // A series with nothing observed.
        reference_failed.get_or_create_owned(&failed);
        atomic_failed.get_or_create_owned(&failed);
        assert_eq!(render(&registries[0]), render(&registries[1]));
        for (i, value) in OBSERVATIONS.into_iter().enumerate() {
            reference.observe(value);
            atomic.observe(value);
            reference_ok.get_or_create(&ok).observe(value);
            atomic_ok.get_or_create(&ok).observe(value);
            if i % 3 == 0 {
                reference_failed.get_or_create(&failed).observe(value * 3.0);
                atomic_failed.get_or_create(&failed).observe(value * 3.0);
            }
        }
        let text = render(&registries[1]);
        assert_eq!(render(&registries[0]), text);
        // What the comparison covered: cumulative buckets up to +Inf, equal to the count.
        let n = OBSERVATIONS.len() as f64;
        assert_eq!(sample(&text, "lone_count", &[]), n);
        assert_eq!(sample(&text, "lone_bucket", &[("le", "+Inf")]), n);
        assert_eq!(sample(&text, "lone_bucket", &[("le", "0.0005")]), 3.0);
        assert_eq!(sample(&text, "lone_bucket", &[("le", "10.0")]), n - 1.0);
        assert_eq!(sample(&text, "ok_count", &[("status_code", "200")]), n);
        assert!(text.contains("# TYPE lone histogram"), "{text}");
    }

    #[test]
    fn an_atomic_histogram_counts_every_observation_of_concurrent_observers() {
        let histogram = AtomicHistogram::new();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let histogram = histogram.clone();
                scope.spawn(move || {
                    for i in 0..10_000 {
                        histogram.observe(if i % 2 == 0 { 0.0005 } else { 20.0 });
                    }
                });
            }
        });
        let (sum, count, buckets) = histogram.snapshot();
        assert_eq!(count, 40_000);
        assert_eq!(buckets[0], (0.0005, 20_000));
        assert_eq!(buckets[BUCKETS - 1], (f64::MAX, 20_000));
        assert!((sum - 20_000.0 * 20.0005).abs() < 1e-3, "{sum}");
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
        let db = route("db");
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
    fn flaggers_family_counts_only_requests_to_a_known_pod_that_are_not_mirror_copies() {
        let metrics = Metrics::new(true, None);
        let took = Duration::from_millis(3);
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
            1.0,
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
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "http_request_duration_seconds_bucket",
                &[("status", "200"), ("le", "0.005")]
            ),
            1.0
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
    fn request_families_at_their_series_bound_are_cleared_and_old_handles_no_longer_exported() {
        let metrics = Metrics::new(false, None);
        let first = metrics.request_series(&labels("svc-0", 200, false), None);
        for service in 1..MAX_SERIES {
            metrics.request_series(&labels(&format!("svc-{service}"), 200, false), None);
        }
        // An existing series never triggers the bound.
        let again = metrics.request_series(&labels("svc-0", 200, false), None);
        again.record(Duration::from_millis(1));
        // (Not rendered: 20,000 histograms make a large text.)
        assert_eq!(metrics.requests.resets.load(Ordering::Relaxed), 0);
        // A new one past it clears both request families, each counted.
        let new = metrics.request_series(&labels("svc-new", 200, false), None);
        new.record(Duration::from_millis(1));
        first.record(Duration::from_millis(1));
        let text = metrics.render();
        assert_eq!(
            sample(&text, "aviary_metrics_series_resets_total", &[]),
            2.0
        );
        assert_eq!(sample(&text, "aviary_requests_total", &[]), 1.0, "{text}");
        assert_eq!(
            sample(
                &text,
                "aviary_requests_total",
                &[("destination_service", "svc-new")]
            ),
            1.0
        );
        assert_eq!(
            sample(&text, "aviary_request_duration_seconds_count", &[]),
            1.0
        );
        // Looked up again, the old labels make a new series.
        metrics
            .request_series(&labels("svc-0", 200, false), None)
            .record(Duration::from_millis(1));
        assert_eq!(
            sample(
                &metrics.render(),
                "aviary_requests_total",
                &[("destination_service", "svc-0")]
            ),
            1.0
        );
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
