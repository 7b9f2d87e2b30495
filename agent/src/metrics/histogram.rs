//! A histogram over fixed duration buckets that observes with atomic operations only.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

/// Request duration buckets, in seconds: 0.5 ms to 10 s (Flagger checks p99 in milliseconds).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

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
    pub fn count(&self) -> u64 {
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

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, metrics::family::Family, registry::Registry};

    use super::*;
    use crate::metrics::sample;

    type Labels = Vec<(String, String)>;

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
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(DURATION_BUCKETS))
        };
        let (reference_ok, reference_failed) = (reference_family(), reference_family());
        let atomic_ok = Family::<Labels, AtomicHistogram>::default();
        let atomic_failed = Family::<Labels, AtomicHistogram>::default();
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
        let status = |code: &str| vec![("status_code".to_owned(), code.to_owned())];
        let (ok, failed) = (status("200"), status("503"));
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
}
