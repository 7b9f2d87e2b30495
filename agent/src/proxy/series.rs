//! Request metrics as the data plane records them: each worker keeps the series it resolved, so
//! a request costs a lookup in a thread-local map keyed by the identities of the policy objects
//! that name it, then atomic increments. No label set is built or hashed, and no lock taken,
//! once a series is known.
//!
//! Keys are the addresses of objects that the routing table in force owns (the source and
//! destination workloads, the service, the backend). The cache holds entries for one table at a
//! time and is emptied when a request comes with another, so an address always means the object
//! it meant when the entry was made: while a table is in force, nothing it owns is freed. It is
//! emptied too when a sweep removed idle series ([`Metrics::removals`] moved), so that no entry
//! goes on recording into a series that is no longer exported: the next request of a removed
//! series creates it again.

use std::{cell::RefCell, collections::HashMap, sync::Arc, time::Duration};

use crate::proxy::metrics::{
    Direction, MethodClass, Metrics, Principals, RequestLabels, RequestSeries,
};

use crate::table::{TableId, Workload};

/// Entries a worker keeps before it starts again: far more than one table's live series.
const MAX_ENTRIES: usize = 16_384;

/// Who and what a request's series names, by identity (and, over mutual TLS, by the
/// principals' values: they belong to a connection, not to the table).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    direction: Direction,
    source: usize,
    service: usize,
    backend: usize,
    pod: usize,
    flagger: bool,
    method: MethodClass,
    status: u16,
    mirror: bool,
    principals: Option<Arc<Principals>>,
}

fn id<T: ?Sized>(object: Option<&T>) -> usize {
    object.map_or(0, |o| o as *const T as *const () as usize)
}

impl SeriesKey {
    /// `service` and `backend` are absent inbound; `pod` is the endpoint's (outbound) or the
    /// destination (inbound).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        direction: Direction,
        source: &Workload,
        service: Option<&impl Sized>,
        backend: Option<&impl Sized>,
        pod: Option<&Workload>,
        flagger: bool,
        method: MethodClass,
        status: u16,
        mirror: bool,
    ) -> Self {
        Self {
            direction,
            source: id(Some(source)),
            service: id(service),
            backend: id(backend),
            pod: id(pod),
            flagger,
            method,
            status,
            mirror,
            principals: None,
        }
    }

    /// The same series, over mutual TLS between `principals`.
    pub fn over_mtls(self, principals: Option<&Arc<Principals>>) -> Self {
        Self {
            principals: principals.cloned(),
            ..self
        }
    }
}

#[derive(Default)]
struct Cache {
    table: Option<TableId>,
    /// [`Metrics::removals`] when the entries were made.
    removals: u64,
    series: HashMap<SeriesKey, RequestSeries>,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::default();
}

/// Records one request that took `took`, in the series `key` names under `table`. `labels`
/// builds the label set (and `flagger_pod` the Flagger series) the first time only.
pub fn record(
    metrics: &Metrics,
    table: TableId,
    key: SeriesKey,
    labels: impl FnOnce() -> (RequestLabels, Option<Arc<Workload>>),
    took: Duration,
) {
    let removals = metrics.removals();
    CACHE.with_borrow_mut(|cache| {
        if cache.table != Some(table)
            || cache.removals != removals
            || cache.series.len() >= MAX_ENTRIES
        {
            cache.series.clear();
            cache.table = Some(table);
            cache.removals = removals;
        }
        cache
            .series
            .entry(key)
            .or_insert_with(|| {
                let (labels, flagger_pod) = labels();
                metrics.request_series(&labels, flagger_pod.as_deref())
            })
            .record(took);
    });
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crate::{metrics::sample, proxy::metrics::Edge};

    use super::*;

    fn labels(service: &str) -> RequestLabels {
        let name = |s: &str| -> Arc<str> { s.into() };
        RequestLabels {
            edge: Edge {
                direction: Direction::outbound,
                source_namespace: name("web"),
                source_workload: name("frontend"),
                destination_namespace: name("shop"),
                destination_service: name(service),
                destination_workload: name("podinfo"),
                destination_version: name("podinfo"),
                source_principal: name("unknown"),
                destination_principal: name("unknown"),
                connection_security_policy: crate::proxy::metrics::Security::none,
            },
            method: MethodClass::GET,
            status_code: 200,
            mirror: false,
        }
    }

    #[test]
    fn a_cached_series_that_expired_is_resolved_again_and_counts_where_it_is_exported() {
        let metrics = Metrics::new(false, None);
        let table = crate::table::RouteTable::default();
        let source = Workload::unknown();
        let key = SeriesKey::new(
            Direction::outbound,
            &source,
            None::<&()>,
            None::<&()>,
            None,
            false,
            MethodClass::GET,
            200,
            false,
        );
        let count = |metrics: &Metrics| {
            sample(
                &metrics.render(),
                "aviary_requests_total",
                &[("destination_service", "cached")],
            )
        };
        let record_cached = || {
            record(
                &metrics,
                table.id,
                key.clone(),
                || (labels("cached"), None),
                Duration::from_millis(1),
            )
        };
        record_cached();
        record_cached();
        assert_eq!(count(&metrics), 2.0);
        // Nothing recorded for the expiry: the series is removed.
        let (start, expiry) = (Instant::now(), Duration::from_secs(600));
        metrics.sweep(expiry, start);
        metrics.sweep(expiry, start + expiry);
        assert_eq!(metrics.removals(), 1);
        assert!(!metrics.render().contains("cached"));
        // The cached handle is not used again: the series is created anew, exported, and
        // counts from 0.
        record_cached();
        assert_eq!(count(&metrics), 1.0, "the cached series is exported again");
        record_cached();
        assert_eq!(count(&metrics), 2.0);
    }
}
