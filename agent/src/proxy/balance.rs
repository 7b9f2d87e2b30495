//! Load balancing inside a backend: the power of two choices over peak-EWMA latency, as
//! linkerd2-proxy does. Each endpoint's cost is its smoothed latency times its outstanding
//! requests plus one; of two endpoints drawn at random, the cheaper gets the request.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use super::{route::Endpoint, split::Rng};

/// How fast old latency is forgotten.
const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint not yet measured, so a new endpoint is not flooded.
const DEFAULT_RTT: Duration = Duration::from_millis(30);

fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// An endpoint's load: peak-EWMA latency and requests in flight. Lock-free.
#[derive(Debug)]
pub struct Load {
    ewma_ns: AtomicU64,
    updated_ns: AtomicU64,
    pending: AtomicU32,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            ewma_ns: AtomicU64::new(DEFAULT_RTT.as_nanos() as u64),
            updated_ns: AtomicU64::new(now_ns()),
            pending: AtomicU32::new(0),
        }
    }
}

impl Load {
    fn cost(&self) -> f64 {
        let ewma = self.ewma_ns.load(Ordering::Relaxed) as f64;
        ewma * f64::from(self.pending.load(Ordering::Relaxed) + 1)
    }

    /// Records one response's latency: a higher one is taken at once (the "peak"), a lower one
    /// decays in over time.
    fn observe(&self, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let now = now_ns();
        let last = self.updated_ns.swap(now, Ordering::Relaxed);
        let ewma = self.ewma_ns.load(Ordering::Relaxed) as f64;
        let next = if rtt > ewma {
            rtt
        } else {
            let elapsed = now.saturating_sub(last) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            ewma * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next as u64, Ordering::Relaxed);
    }
}

/// A request in flight to an endpoint; dropping it without [`InFlight::done`] (an error, a
/// cancelled request) ends it without a latency sample.
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    start: Instant,
}

impl InFlight {
    pub fn start(endpoint: Arc<Endpoint>) -> Self {
        endpoint.load.pending.fetch_add(1, Ordering::Relaxed);
        Self {
            endpoint,
            start: Instant::now(),
        }
    }

    /// The response arrived: its latency counts.
    pub fn done(self) {
        self.endpoint.load.observe(self.start.elapsed());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
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
            Some(if a.load.cost() <= b.load.cost() { a } else { b }.clone())
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
        for _ in 0..5 {
            eps[0].load.observe(Duration::from_millis(1));
            eps[1].load.observe(Duration::from_millis(200));
        }
        let mut rng = Rng::seeded(1);
        let to_slow = (0..1000)
            .filter(|_| pick(&eps, None, &mut rng).unwrap().addr.port() == 8001)
            .count();
        assert_eq!(to_slow, 0, "two endpoints: the cheaper always wins");
    }

    #[test]
    fn outstanding_requests_raise_the_cost() {
        let eps = endpoints(2);
        let busy: Vec<InFlight> = (0..10).map(|_| InFlight::start(eps[0].clone())).collect();
        let mut rng = Rng::seeded(2);
        assert_eq!(pick(&eps, None, &mut rng).unwrap().addr.port(), 8001);
        drop(busy);
        assert_eq!(eps[0].load.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn peaks_count_at_once_and_decay_later() {
        let load = Load::default();
        load.observe(Duration::from_millis(500));
        assert_eq!(load.ewma_ns.load(Ordering::Relaxed), 500_000_000);
        // A fast sample right after barely moves it: the peak holds.
        load.observe(Duration::from_millis(1));
        assert!(load.ewma_ns.load(Ordering::Relaxed) > 490_000_000);
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
