//! Load balancing inside a backend: the power of two choices over peak-EWMA latency, as
//! linkerd2-proxy does. Each endpoint's cost is its smoothed latency times its outstanding
//! requests plus one; of two endpoints drawn at random, the cheaper gets the request.
//!
//! The statistics belong to the proxy, not to the policy: each worker keeps its own, by endpoint
//! address, so they outlive routing-table swaps and need neither atomics nor locks. A worker
//! balances on what it has seen, as each of linkerd2-proxy's balancers does.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{route::Endpoint, split::Rng};

/// How fast old latency is forgotten.
const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint not yet measured, so a new endpoint is not flooded.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Statistics of an endpoint nothing used for this long are dropped.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// An endpoint's load as one worker sees it: peak-EWMA latency and requests in flight.
#[derive(Debug, Clone, Copy)]
struct Load {
    ewma_ns: f64,
    updated: Instant,
    pending: u32,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            ewma_ns: DEFAULT_RTT.as_nanos() as f64,
            updated: Instant::now(),
            pending: 0,
        }
    }
}

impl Load {
    fn cost(&self) -> f64 {
        self.ewma_ns * f64::from(self.pending + 1)
    }

    /// Records one response's latency: a higher one is taken at once (the "peak"), a lower one
    /// decays in over time.
    fn observe(&mut self, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.updated);
        self.updated = now;
        self.ewma_ns = if rtt > self.ewma_ns {
            rtt
        } else {
            let w = (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp();
            self.ewma_ns * w + rtt * (1.0 - w)
        };
    }
}

thread_local! {
    static LOADS: RefCell<HashMap<SocketAddr, Load>> = RefCell::default();
}

fn cost(loads: &HashMap<SocketAddr, Load>, endpoint: &Endpoint) -> f64 {
    loads
        .get(&endpoint.addr)
        .map_or(DEFAULT_RTT.as_nanos() as f64, Load::cost)
}

/// A request in flight to an endpoint; dropping it without [`InFlight::done`] (an error, a
/// cancelled request) ends it without a latency sample.
pub struct InFlight {
    addr: SocketAddr,
    start: Instant,
}

impl InFlight {
    pub fn start(addr: SocketAddr) -> Self {
        LOADS.with_borrow_mut(|loads| loads.entry(addr).or_default().pending += 1);
        Self {
            addr,
            start: Instant::now(),
        }
    }

    /// The response arrived: its latency counts.
    pub fn done(self) {
        let rtt = self.start.elapsed();
        LOADS.with_borrow_mut(|loads| {
            if let Some(load) = loads.get_mut(&self.addr) {
                load.observe(rtt);
            }
        });
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        LOADS.with_borrow_mut(|loads| {
            if let Some(load) = loads.get_mut(&self.addr) {
                load.pending = load.pending.saturating_sub(1);
            }
        });
    }
}

/// Drops this worker's statistics of endpoints nothing has used for a long while.
pub fn forget_idle() {
    LOADS.with_borrow_mut(|loads| {
        loads.retain(|_, load| load.pending > 0 || load.updated.elapsed() < FORGET_AFTER)
    });
}

/// Power of two choices; `skip` excludes one endpoint (the one a retry moves away from).
pub fn pick(
    endpoints: &[Arc<Endpoint>],
    skip: Option<&Arc<Endpoint>>,
    rng: &mut Rng,
) -> Option<Arc<Endpoint>> {
    // Candidates are the endpoints minus the skipped one, indexed around it: no allocation on
    // the request path.
    let skipped = skip.and_then(|s| endpoints.iter().position(|e| Arc::ptr_eq(e, s)));
    let candidate = |i: usize| match skipped {
        Some(k) if i >= k => &endpoints[i + 1],
        _ => &endpoints[i],
    };
    match endpoints.len() - usize::from(skipped.is_some()) {
        0 => None,
        1 => Some(candidate(0).clone()),
        n => {
            let a = rng.below(n as u64) as usize;
            let b = (a + 1 + rng.below(n as u64 - 1) as usize) % n;
            let (a, b) = (candidate(a), candidate(b));
            let cheaper = LOADS.with_borrow(|loads| cost(loads, a) <= cost(loads, b));
            Some(if cheaper { a } else { b }.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| Endpoint::new(([10, 0, 0, 1], 8000 + i).into(), None, false))
            .collect()
    }

    #[test]
    fn a_slow_endpoint_gets_less_traffic() {
        let eps = endpoints(2);
        LOADS.with_borrow_mut(|loads| {
            for _ in 0..5 {
                loads
                    .entry(eps[0].addr)
                    .or_default()
                    .observe(Duration::from_millis(1));
                loads
                    .entry(eps[1].addr)
                    .or_default()
                    .observe(Duration::from_millis(200));
            }
        });
        let mut rng = Rng::seeded(1);
        let to_slow = (0..1000)
            .filter(|_| pick(&eps, None, &mut rng).unwrap().addr.port() == 8001)
            .count();
        assert_eq!(to_slow, 0, "two endpoints: the cheaper always wins");
    }

    #[test]
    fn outstanding_requests_raise_the_cost() {
        let eps = endpoints(2);
        let busy: Vec<InFlight> = (0..10).map(|_| InFlight::start(eps[0].addr)).collect();
        let mut rng = Rng::seeded(2);
        assert_eq!(pick(&eps, None, &mut rng).unwrap().addr.port(), 8001);
        drop(busy);
        assert_eq!(LOADS.with_borrow(|loads| loads[&eps[0].addr].pending), 0);
    }

    #[test]
    fn peaks_count_at_once_and_decay_later() {
        let mut load = Load::default();
        load.observe(Duration::from_millis(500));
        assert_eq!(load.ewma_ns, 500_000_000.0);
        // A fast sample right after barely moves it: the peak holds.
        load.observe(Duration::from_millis(1));
        assert!(load.ewma_ns > 490_000_000.0);
    }

    #[test]
    fn statistics_are_kept_by_address_so_a_new_table_keeps_them() {
        let before = endpoints(2);
        LOADS.with_borrow_mut(|loads| {
            loads
                .entry(before[1].addr)
                .or_default()
                .observe(Duration::from_millis(500))
        });
        // The same addresses in a newly compiled table: the slow one is still known as slow.
        let after = endpoints(2);
        let mut rng = Rng::seeded(4);
        assert!((0..100).all(|_| pick(&after, None, &mut rng).unwrap().addr.port() == 8000));
        forget_idle();
        assert!(LOADS.with_borrow(|loads| loads.contains_key(&after[1].addr)));
    }

    #[test]
    fn retries_skip_the_failed_endpoint() {
        let eps = endpoints(3);
        let mut rng = Rng::seeded(3);
        for _ in 0..100 {
            let picked = pick(&eps, Some(&eps[1]), &mut rng).unwrap();
            assert!(!Arc::ptr_eq(&picked, &eps[1]));
        }
        assert!(pick(&eps[..1], Some(&eps[0]), &mut rng).is_none());
        assert!(pick(&[], None, &mut rng).is_none());
    }
}
