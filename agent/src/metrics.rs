//! Node-level Prometheus metrics (OpenMetrics text on `:15020/metrics`), on their own port so a
//! slow scrape never competes with traffic.
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
//!   [`Metrics::sweep`], which the control plane runs every [`SWEEP_INTERVAL`]. Prometheus
//!   reads a series that comes back later as a counter that restarted from 0. The series of a
//!   route, Service or pod gone from the snapshot are no exception: nothing hits them any more,
//!   so they go idle and expire. Removing them as soon as the snapshot drops them would lose
//!   what was recorded into them since the last scrape, and what requests and connections
//!   still under the old table go on recording;
//! - a family holds at most [`MAX_SERIES`] series, as a last resort. At its cap it refuses new
//!   series (what they would have counted is lost, and `aviary_metrics_series_refused_total`
//!   counts them) and never touches the series being recorded into; the next sweep makes room
//!   by evicting the series quiet the longest, for a sweep at least, down to [`EVICT_TO`]
//!   (`aviary_metrics_series_removed_total{reason="evicted"}`).
//!
//! A handle outlives its series only briefly. A sweep moves [`Metrics::removals`] once it
//! removed series, and holders of long-lived handles (the data plane's per-worker cache)
//! compare it before each use and resolve their handles again when it moved. An opaque TCP
//! connection holds its handle for its whole life, so a series with a connection open is never
//! removed.

use std::{
    collections::HashMap,
    fmt::Write as _,
    hash::Hash,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use aviary_identity::spiffe::Identity;
use http::Method;
use prometheus_client::{
    collector::Collector,
    encoding::{
        text::encode, DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
        LabelValueEncoder, MetricEncoder, NoLabelSet,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        MetricType, TypedMetric,
    },
    registry::Registry,
};
use tracing::debug;

use crate::{
    ebpf::maps::{Occupancy, Stats},
    proxy::{balance::Failure, http::MirrorOutcome},
    table::{admission::Denied, unknown, ServiceRoutes, Workload},
};

/// Series a family holds at most: a family at its cap refuses new series.
pub const MAX_SERIES: usize = 20_000;

/// Series a sweep brings a family back to, by evicting its quietest, when it holds more: room
/// for new series to be created until the next sweep.
pub const EVICT_TO: usize = MAX_SERIES / 10 * 9;

/// How often the control plane sweeps the series; a series must have been quiet for a sweep at
/// least to be evicted.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Request duration buckets, in seconds: 0.5 ms to 10 s (Flagger checks p99 in milliseconds).
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub type Name = Arc<str>;

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

/// Who sent a request or opened a connection, and where it went.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet, serde::Serialize, serde::Deserialize,
)]
pub struct Route {
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
            source_principal: unknown(),
            destination_principal: unknown(),
            connection_security_policy: Security::none,
        }
    }

    /// The same route, carried over mutual TLS between the identities `principals` names.
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

    /// Observations so far.
    fn count(&self) -> u64 {
        let buckets = &self.inner.buckets;
        buckets.iter().map(|n| n.load(Ordering::Relaxed)).sum()
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

/// The values of one series, recorded into through handles with atomic operations only.
trait Values: Default + Send + Sync + 'static {
    /// A number that moves with every recording: a sweep that finds it where the previous sweep
    /// left it knows that nothing was recorded in between.
    ///
    /// Idleness is read off the values themselves rather than off a last-recorded timestamp that
    /// each recording would store: recording then costs nothing beyond its increments (no clock
    /// read, no further store to a cache line all the workers share), and the work moves to the
    /// sweep, which reads each series once every [`SWEEP_INTERVAL`].
    fn activity(&self) -> u64;

    /// Whether a holder of `values` is still going to record into them: such a series is kept
    /// however long it has been quiet.
    fn in_use(_values: &Arc<Self>) -> bool {
        false
    }
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

/// Flagger's series.
impl Values for AtomicHistogram {
    fn activity(&self) -> u64 {
        self.count()
    }
}

/// Mirror outcomes.
impl Values for Counter {
    fn activity(&self) -> u64 {
        self.get()
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

/// [`Entry::swept`] of a series no sweep has seen yet.
const UNSWEPT: u64 = u64::MAX;

/// A series and what the sweeps saw of it.
struct Entry<V> {
    values: Arc<V>,
    /// Its activity at the last sweep, or [`UNSWEPT`].
    swept: AtomicU64,
    /// The last sweep that saw its activity move, in ms since [`Metrics::epoch`].
    quiet_since: AtomicU64,
}

/// What a store holds and what it removed or refused, for the agent's own metrics.
#[derive(Debug, Default)]
struct StoreCounts {
    held: AtomicU64,
    expired: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
}

/// The series of one or more families that share their labels and are recorded together (a
/// request's count and duration): the data plane looks series up in it when it has no handle
/// yet, the control plane's sweep removes idle ones, and the registry encodes it through a
/// [`FamilyView`] per family.
struct Store<L, V> {
    series: RwLock<HashMap<L, Entry<V>>>,
    counts: Arc<StoreCounts>,
}

/// Nothing panics while holding a store's lock (its map is only read, inserted into and removed
/// from), so a poisoned one still guards a whole map.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl<L: Clone + Eq + Hash, V: Values> Store<L, V> {
    fn new() -> Self {
        Self {
            series: RwLock::default(),
            counts: Arc::default(),
        }
    }

    /// The series of `labels` (a handle: what is recorded through it is exported while the
    /// series lives), created if new. A store at [`MAX_SERIES`] creates none and hands out
    /// values of no series, never exported; its hot series are kept.
    fn series(&self, labels: &L) -> Arc<V> {
        // The handle is cloned under the lock, so a sweep, which checks `V::in_use` under the
        // write lock, sees it.
        if let Some(entry) = read(&self.series).get(labels) {
            return entry.values.clone();
        }
        let mut series = write(&self.series);
        // Another worker may have created it since.
        if let Some(entry) = series.get(labels) {
            return entry.values.clone();
        }
        if series.len() >= MAX_SERIES {
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            return Arc::default();
        }
        let values = Arc::<V>::default();
        series.insert(
            labels.clone(),
            Entry {
                values: values.clone(),
                swept: AtomicU64::new(UNSWEPT),
                quiet_since: AtomicU64::new(0),
            },
        );
        self.counts
            .held
            .store(series.len() as u64, Ordering::Relaxed);
        values
    }

    /// Removes the series whose activity has not moved for `expiry` and that nothing holds for
    /// further use; then, if the store is still above [`EVICT_TO`], evicts series that have
    /// not moved since the previous sweep, the longest quiet first, down to it. `now` and
    /// `expiry` are in ms since [`Metrics::epoch`]. Returns whether it removed any.
    ///
    /// It reads under the read lock, so lookups go on meanwhile, and takes the write lock only
    /// to remove, checking again that each series is still idle.
    fn sweep(&self, now: u64, expiry: u64) -> bool {
        let (expired, evicted) = {
            let series = read(&self.series);
            let crowded = series.len() > EVICT_TO;
            let (mut expired, mut quiet) = (Vec::new(), Vec::new());
            for (labels, entry) in series.iter() {
                let activity = entry.values.activity();
                if entry.swept.swap(activity, Ordering::Relaxed) != activity {
                    entry.quiet_since.store(now, Ordering::Relaxed);
                } else if !V::in_use(&entry.values) {
                    let quiet_since = entry.quiet_since.load(Ordering::Relaxed);
                    if now.saturating_sub(quiet_since) >= expiry {
                        expired.push(labels.clone());
                    } else if crowded {
                        quiet.push((quiet_since, labels.clone()));
                    }
                }
            }
            let excess = (series.len() - expired.len()).saturating_sub(EVICT_TO);
            quiet.sort_unstable_by_key(|&(quiet_since, _)| quiet_since);
            quiet.truncate(excess);
            (expired, quiet)
        };
        if expired.is_empty() && evicted.is_empty() {
            return false;
        }
        let mut series = write(&self.series);
        let mut remove = |labels: &L| {
            let idle = series.get(labels).is_some_and(|entry| {
                entry.values.activity() == entry.swept.load(Ordering::Relaxed)
                    && !V::in_use(&entry.values)
            });
            idle && series.remove(labels).is_some()
        };
        let expired = expired.iter().filter(|labels| remove(labels)).count() as u64;
        let evicted = evicted.iter().filter(|(_, labels)| remove(labels)).count() as u64;
        let counts = &self.counts;
        counts.expired.fetch_add(expired, Ordering::Relaxed);
        counts.evicted.fetch_add(evicted, Ordering::Relaxed);
        counts.held.store(series.len() as u64, Ordering::Relaxed);
        expired + evicted > 0
    }
}

/// One family of a store's series, as the registry encodes it: `metric` picks the family's
/// metric out of a series' values.
struct FamilyView<L, V, M> {
    store: Arc<Store<L, V>>,
    metric: fn(&V) -> &M,
}

impl<L, V, M> std::fmt::Debug for FamilyView<L, V, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FamilyView").finish_non_exhaustive()
    }
}

impl<L, V, M> EncodeMetric for FamilyView<L, V, M>
where
    L: EncodeLabelSet + Send + Sync,
    V: Send + Sync,
    M: EncodeMetric + TypedMetric,
{
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, entry) in read(&self.store.series).iter() {
            (self.metric)(&entry.values).encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }

    /// A family without series is left out of a scrape, as prometheus-client's `Family` is.
    fn is_empty(&self) -> bool {
        read(&self.store.series).is_empty()
    }
}

/// The series one kind of request is counted in: resolved once by [`Metrics::request_series`],
/// then [`record`](Self::record)ed through as often as wanted, with atomic increments only. A
/// clone shares the same series.
///
/// A handle is meant to be kept while its labels hold (e.g. per connection, route, method and
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

/// The series of opaque TCP connections along one [`Route`]: resolved once per connection by
/// [`Metrics::tcp_series`], then updated with atomic increments only. A clone shares the same
/// series, which is never removed while a handle to it lives: a connection holds one from its
/// open to its close.
#[derive(Debug, Clone)]
pub struct TcpSeries {
    values: Arc<TcpValues>,
}

impl TcpSeries {
    /// A connection along the route was opened (its upstream connect succeeded).
    pub fn opened(&self) {
        self.values.opened.inc();
    }

    /// A connection along the route ended, having copied `sent` bytes from the client to the
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
    /// The four `aviary_tcp_` families.
    tcp: Arc<Store<Route, TcpValues>>,
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

/// Registers the family `name`, made of `store`'s series: `metric` picks it out of their values.
fn register<L, V, M>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    store: &Arc<Store<L, V>>,
    metric: fn(&V) -> &M,
) where
    L: EncodeLabelSet + Send + Sync + 'static,
    V: Send + Sync + 'static,
    M: EncodeMetric + TypedMetric + 'static,
{
    let view = FamilyView {
        store: store.clone(),
        metric,
    };
    registry.register(name, help, view);
}

impl Metrics {
    /// `flagger_family`: also export `http_request_duration_seconds` for Flagger's built-in
    /// checks. `ebpf`: the pinned counters and maps, read by each [`Metrics::refresh_ebpf`].
    pub fn new(flagger_family: bool, ebpf: Option<Stats>) -> Self {
        let mut registry = Registry::default();
        let requests = Arc::new(Store::new());
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
            let flagger = Arc::new(Store::new());
            register(
                &mut registry,
                "http_request_duration_seconds",
                "Requests by destination pod, in the family Flagger's built-in checks query",
                &flagger,
                |histogram: &AtomicHistogram| histogram,
            );
            flagger
        });
        let mirrors = Arc::new(Store::new());
        register(
            &mut registry,
            "aviary_mirror_requests",
            "Requests a mirror rule applied to, by what happened to the copy",
            &mirrors,
            |counter: &Counter| counter,
        );
        let endpoint_failures = Arc::new(Store::new());
        register(
            &mut registry,
            "aviary_endpoint_failures",
            "Requests an endpoint failed: a connect that failed, or a 5xx or broken exchange",
            &endpoint_failures,
            |counter: &Counter| counter,
        );
        let denials = Arc::new(Store::new());
        register(
            &mut registry,
            "aviary_inbound_denied",
            "Connections the inbound proxy refused for the pod's aviary.dev/mtls or aviary.dev/allow-from",
            &denials,
            |counter: &Counter| counter,
        );
        let ejections = Arc::new(Store::new());
        register(
            &mut registry,
            "aviary_endpoint_ejections",
            "Endpoints outlier detection left out of load balancing, by the failure that did it",
            &ejections,
            |counter: &Counter| counter,
        );
        let proxy_errors = Arc::new(Store::new());
        register(
            &mut registry,
            "aviary_proxy_errors",
            "Requests the proxy answered itself, by why (no endpoint, connect or tunnel failed, \
             timeouts, authorization...): also counted in aviary_requests",
            &proxy_errors,
            |counter: &Counter| counter,
        );
        let tcp = Arc::new(Store::new());
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
    /// family above [`EVICT_TO`], its quietest ones), then moves [`Metrics::removals`] if it
    /// removed any. The control plane calls it every [`SWEEP_INTERVAL`].
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

    /// The series opaque TCP connections along `route` are counted in, created if new (one
    /// lookup for the four families).
    pub fn tcp_series(&self, route: &Route) -> TcpSeries {
        TcpSeries {
            values: self.tcp.series(route),
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
    use prometheus_client::metrics::family::Family;

    use super::*;

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
        let series = read(&metrics.mirrors.series);
        series.get(&labels).map(|entry| entry.values.get())
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
        let held = |metrics: &Metrics| read(&metrics.mirrors.series).len();
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
        let connection = metrics.tcp_series(&route("db"));
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

    fn route(service: &str) -> Route {
        Route {
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
