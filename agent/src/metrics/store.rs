//! Series stores: the series of one or more families that share their labels, looked up once
//! and recorded into through handles, swept when idle, and encoded family by family.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{counter::Counter, MetricType, TypedMetric},
    registry::Registry,
};

use super::{histogram::AtomicHistogram, EVICT_TO, MAX_SERIES};

/// The values of one series, recorded into through handles with atomic operations only.
pub trait Values: Default + Send + Sync + 'static {
    /// A number that moves with every recording: a sweep that finds it where the previous sweep
    /// left it knows that nothing was recorded in between.
    ///
    /// Idleness is read off the values themselves rather than off a last-recorded timestamp that
    /// each recording would store: recording then costs nothing beyond its increments (no clock
    /// read, no further store to a cache line all the workers share), and the work moves to the
    /// sweep, which reads each series once every [`SWEEP_INTERVAL`](super::SWEEP_INTERVAL).
    fn activity(&self) -> u64;

    /// Whether a holder of `values` is still going to record into them: such a series is kept
    /// however long it has been quiet.
    fn in_use(_values: &Arc<Self>) -> bool {
        false
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
pub struct StoreCounts {
    pub held: AtomicU64,
    pub expired: AtomicU64,
    pub evicted: AtomicU64,
    pub refused: AtomicU64,
}

/// The series of one or more families that share their labels and are recorded together (a
/// request's count and duration): the data plane looks series up in it when it has no handle
/// yet, the control plane's sweep removes idle ones, and the registry encodes it through a
/// [`FamilyView`] per family.
pub struct Store<L, V> {
    series: RwLock<HashMap<L, Entry<V>>>,
    pub counts: Arc<StoreCounts>,
}

/// Nothing panics while holding a store's lock (its map is only read, inserted into and removed
/// from), so a poisoned one still guards a whole map.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl<L, V> Default for Store<L, V> {
    fn default() -> Self {
        Self {
            series: RwLock::default(),
            counts: Arc::default(),
        }
    }
}

impl<L: Clone + Eq + Hash, V: Values> Store<L, V> {
    /// The series of `labels` (a handle: what is recorded through it is exported while the
    /// series lives), created if new. A store at [`MAX_SERIES`] creates none and hands out
    /// values of no series, never exported; its hot series are kept.
    pub fn series(&self, labels: &L) -> Arc<V> {
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
    /// The series of `labels`, if the store holds it (creating none).
    #[cfg(test)]
    pub fn held(&self, labels: &L) -> Option<Arc<V>> {
        read(&self.series)
            .get(labels)
            .map(|entry| entry.values.clone())
    }

    /// How many series it holds.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        read(&self.series).len()
    }

    pub fn sweep(&self, now: u64, expiry: u64) -> bool {
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

/// Registers the family `name`, made of `store`'s series: `metric` picks it out of their values.
pub fn register<L, V, M>(
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
