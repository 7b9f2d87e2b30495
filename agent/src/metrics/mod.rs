//! Metrics plumbing: series stores whose recording takes no lock and hashes no labels, a
//! histogram that observes with atomic operations only, and the bounds on cardinality. It
//! knows nothing of what is measured: the proxy's families and the types they are labelled by
//! live beside the code that records them (`proxy::metrics`).
//!
//! Cardinality is bounded twice over by the stores themselves:
//! - series expire one by one, as linkerd2-proxy's do: one that nothing recorded into for the
//!   idle expiry is removed by a sweep, which the control plane runs every [`SWEEP_INTERVAL`].
//!   Prometheus reads a series that comes back later as a counter that restarted from 0;
//! - a store holds at most [`MAX_SERIES`] series, as a last resort. At its cap it refuses new
//!   series and never touches the series being recorded into; the next sweep makes room by
//!   evicting the series quiet the longest, for a sweep at least, down to [`EVICT_TO`].

pub mod histogram;
pub mod store;

use std::{sync::Arc, time::Duration};

/// Series a family holds at most: a family at its cap refuses new series.
pub const MAX_SERIES: usize = 20_000;

/// Series a sweep brings a family back to, by evicting its quietest, when it holds more: room
/// for new series to be created until the next sweep.
pub const EVICT_TO: usize = MAX_SERIES / 10 * 9;

/// How often the control plane sweeps the series; a series must have been quiet for a sweep at
/// least to be evicted.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// A label value, shared by the series that carry it.
pub type Name = Arc<str>;

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
