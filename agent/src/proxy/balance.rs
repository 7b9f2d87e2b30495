//! Load balancing inside a backend: the power of two choices over peak-EWMA latency, as
//! linkerd2-proxy does. Each endpoint's cost is its smoothed latency times its outstanding
//! requests plus one; of two endpoints drawn at random, the cheaper gets the request.
//!
//! Failures are accrued here too (Envoy's outlier detection, Linkerd's failure accrual): an
//! endpoint whose connect fails, or that answers with server errors too many times in a row,
//! is ejected (left out of the choice) for a time that doubles with each ejection in a row, up
//! to a cap. At most a share of a backend's endpoints is ejected at once, and a backend whose
//! every endpoint is ejected is balanced over all of them (Envoy's panic mode), since refusing
//! every request would be worse than trying. A retry never goes to an ejected endpoint.
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

use crate::table::Endpoint;

use super::split::Rng;

/// How fast old latency is forgotten.
const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint not yet measured, so a new endpoint is not flooded.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Statistics of an endpoint nothing used for this long are dropped.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// When an endpoint is ejected, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Server errors (5xx, or an exchange that failed after the connect) in a row that eject
    /// an endpoint; 0 turns this off. A failed connect ejects at once: the endpoint cannot
    /// take a request at all, and every request sent its way would pay a connect first.
    pub consecutive_server_errors: u32,
    /// The first ejection's length; each ejection in a row doubles it.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// The share of a backend's endpoints that may be ejected at once, in percent. One
    /// endpoint of a backend of several always may; the last one never is.
    pub max_ejected_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_server_errors: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(120),
            max_ejected_percent: 50,
        }
    }
}

/// Why an endpoint was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The connect was refused, failed or timed out: nothing was sent.
    Connect,
    /// A 5xx answer, or an exchange that failed once the request was on its way.
    Server,
}

/// An endpoint's load and health as one worker sees it.
#[derive(Debug, Clone, Copy)]
struct Load {
    ewma_ns: f64,
    updated: Instant,
    pending: u32,
    consecutive_server_errors: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row (no success in between): the next one lasts longer.
    ejections: u32,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            ewma_ns: DEFAULT_RTT.as_nanos() as f64,
            updated: Instant::now(),
            pending: 0,
            consecutive_server_errors: 0,
            ejected_until: None,
            ejections: 0,
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

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// One worker's view of every endpoint it has used.
#[derive(Default)]
struct Loads {
    by_addr: HashMap<SocketAddr, Load>,
    /// Entries with `ejected_until` set, lapsed or not: while it is 0, choosing an endpoint
    /// needs no clock and no health check.
    marked_ejected: usize,
}

impl Loads {
    /// Lifts lapsed ejections; the endpoints come back with a clean count of errors.
    fn readmit_lapsed(&mut self, now: Instant) {
        if self.marked_ejected == 0 {
            return;
        }
        for load in self.by_addr.values_mut() {
            if load.ejected_until.is_some_and(|until| until <= now) {
                load.ejected_until = None;
                load.consecutive_server_errors = 0;
                self.marked_ejected -= 1;
            }
        }
    }

    fn is_ejected(&self, addr: &SocketAddr, now: Instant) -> bool {
        self.marked_ejected > 0 && self.by_addr.get(addr).is_some_and(|l| l.ejected(now))
    }

    /// Ejects `addr` unless that would take `endpoints` (its backend) past the ejected share.
    fn eject(
        &mut self,
        addr: SocketAddr,
        endpoints: &[Arc<Endpoint>],
        cfg: &OutlierConfig,
        now: Instant,
    ) -> bool {
        let n = endpoints.len();
        let allowed = (n * usize::from(cfg.max_ejected_percent) / 100)
            .max(1)
            .min(n.saturating_sub(1));
        let ejected = endpoints
            .iter()
            .filter(|e| self.is_ejected(&e.addr, now))
            .count();
        let load = self.by_addr.entry(addr).or_default();
        if load.ejected(now) || ejected >= allowed {
            return false;
        }
        let doublings = load.ejections.min(16);
        let length = cfg
            .base_ejection
            .saturating_mul(1 << doublings)
            .min(cfg.max_ejection);
        if load.ejected_until.replace(now + length).is_none() {
            self.marked_ejected += 1;
        }
        load.ejections = load.ejections.saturating_add(1);
        load.consecutive_server_errors = 0;
        true
    }
}

thread_local! {
    static LOADS: RefCell<Loads> = RefCell::default();
}

fn cost(loads: &Loads, endpoint: &Endpoint) -> f64 {
    loads
        .by_addr
        .get(&endpoint.addr)
        .map_or(DEFAULT_RTT.as_nanos() as f64, Load::cost)
}

/// A request in flight to an endpoint; dropping it without [`InFlight::answered`] or
/// [`InFlight::failed`] (a cancelled request) ends it with neither a latency sample nor a
/// failure.
pub struct InFlight {
    addr: SocketAddr,
    start: Instant,
}

impl InFlight {
    pub fn start(addr: SocketAddr) -> Self {
        LOADS.with_borrow_mut(|loads| loads.by_addr.entry(addr).or_default().pending += 1);
        Self {
            addr,
            start: Instant::now(),
        }
    }

    /// The endpoint answered: its latency counts, and a server error (`server_error`) counts
    /// towards its ejection. True when this ejected it.
    pub fn answered(
        self,
        server_error: bool,
        endpoints: &[Arc<Endpoint>],
        cfg: &OutlierConfig,
    ) -> bool {
        let rtt = self.start.elapsed();
        LOADS.with_borrow_mut(|loads| {
            let Some(load) = loads.by_addr.get_mut(&self.addr) else {
                return false;
            };
            load.observe(rtt);
            if !server_error {
                load.consecutive_server_errors = 0;
                if !load.ejected(Instant::now()) {
                    load.ejections = 0;
                }
                return false;
            }
            load.consecutive_server_errors += 1;
            let threshold = cfg.consecutive_server_errors;
            threshold > 0
                && load.consecutive_server_errors >= threshold
                && loads.eject(self.addr, endpoints, cfg, Instant::now())
        })
    }

    /// The endpoint failed the request before answering. True when this ejected it.
    pub fn failed(
        self,
        failure: Failure,
        endpoints: &[Arc<Endpoint>],
        cfg: &OutlierConfig,
    ) -> bool {
        LOADS.with_borrow_mut(|loads| {
            let now = Instant::now();
            match failure {
                Failure::Connect => loads.eject(self.addr, endpoints, cfg, now),
                Failure::Server => {
                    let Some(load) = loads.by_addr.get_mut(&self.addr) else {
                        return false;
                    };
                    load.consecutive_server_errors += 1;
                    let threshold = cfg.consecutive_server_errors;
                    threshold > 0
                        && load.consecutive_server_errors >= threshold
                        && loads.eject(self.addr, endpoints, cfg, now)
                }
            }
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        LOADS.with_borrow_mut(|loads| {
            if let Some(load) = loads.by_addr.get_mut(&self.addr) {
                load.pending = load.pending.saturating_sub(1);
            }
        });
    }
}

/// Drops this worker's statistics of endpoints nothing has used for a long while, and lifts
/// lapsed ejections.
pub fn forget_idle() {
    LOADS.with_borrow_mut(|loads| {
        loads.readmit_lapsed(Instant::now());
        loads.by_addr.retain(|_, load| {
            load.pending > 0
                || load.ejected_until.is_some()
                || load.updated.elapsed() < FORGET_AFTER
        })
    });
}

/// Power of two choices among the endpoints that are not ejected; `skip` excludes one endpoint
/// (the one a retry moves away from), and a retry (`skip` set) never goes to an ejected one.
/// When every endpoint is ejected, a first attempt is balanced over all of them.
pub fn pick(
    endpoints: &[Arc<Endpoint>],
    skip: Option<&Arc<Endpoint>>,
    rng: &mut Rng,
) -> Option<Arc<Endpoint>> {
    let skipped = skip.and_then(|s| endpoints.iter().position(|e| Arc::ptr_eq(e, s)));
    LOADS.with_borrow_mut(|loads| {
        if loads.marked_ejected > 0 {
            let now = Instant::now();
            loads.readmit_lapsed(now);
            if loads.marked_ejected > 0 {
                let healthy: Vec<usize> = (0..endpoints.len())
                    .filter(|&i| Some(i) != skipped && !loads.is_ejected(&endpoints[i].addr, now))
                    .collect();
                if !healthy.is_empty() || skip.is_some() {
                    return two_choices(loads, healthy.len(), |i| &endpoints[healthy[i]], rng);
                }
            }
        }
        // Candidates are the endpoints minus the skipped one, indexed around it: no allocation
        // on the request path.
        let candidate = |i: usize| match skipped {
            Some(k) if i >= k => &endpoints[i + 1],
            _ => &endpoints[i],
        };
        two_choices(
            loads,
            endpoints.len() - usize::from(skipped.is_some()),
            candidate,
            rng,
        )
    })
}

/// The cheaper of two of the `n` candidates drawn at random.
fn two_choices<'e>(
    loads: &Loads,
    n: usize,
    candidate: impl Fn(usize) -> &'e Arc<Endpoint>,
    rng: &mut Rng,
) -> Option<Arc<Endpoint>> {
    match n {
        0 => None,
        1 => Some(candidate(0).clone()),
        n => {
            let a = rng.below(n as u64) as usize;
            let b = (a + 1 + rng.below(n as u64 - 1) as usize) % n;
            let (a, b) = (candidate(a), candidate(b));
            Some(
                if cost(loads, a) <= cost(loads, b) {
                    a
                } else {
                    b
                }
                .clone(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| Endpoint::new(([10, 0, 0, 1], 8000 + i).into(), None, false, None))
            .collect()
    }

    #[test]
    fn a_slow_endpoint_gets_less_traffic() {
        let eps = endpoints(2);
        LOADS.with_borrow_mut(|loads| {
            for _ in 0..5 {
                loads
                    .by_addr
                    .entry(eps[0].addr)
                    .or_default()
                    .observe(Duration::from_millis(1));
                loads
                    .by_addr
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
        assert_eq!(
            LOADS.with_borrow(|loads| loads.by_addr[&eps[0].addr].pending),
            0
        );
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
                .by_addr
                .entry(before[1].addr)
                .or_default()
                .observe(Duration::from_millis(500))
        });
        // The same addresses in a newly compiled table: the slow one is still known as slow.
        let after = endpoints(2);
        let mut rng = Rng::seeded(4);
        assert!((0..100).all(|_| pick(&after, None, &mut rng).unwrap().addr.port() == 8000));
        forget_idle();
        assert!(LOADS.with_borrow(|loads| loads.by_addr.contains_key(&after[1].addr)));
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

    fn quick() -> OutlierConfig {
        OutlierConfig {
            consecutive_server_errors: 3,
            base_ejection: Duration::from_millis(40),
            max_ejection: Duration::from_millis(100),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn a_failed_connect_ejects_at_once_and_a_retry_never_goes_there() {
        let eps = endpoints(2);
        let cfg = quick();
        assert!(InFlight::start(eps[0].addr).failed(Failure::Connect, &eps, &cfg));
        let mut rng = Rng::seeded(5);
        // An endpoint never measured is cheap (the default latency): it would win every draw
        // against one measured slow, were it not ejected.
        InFlight::start(eps[1].addr).answered(false, &eps, &cfg);
        assert!((0..100).all(|_| pick(&eps, None, &mut rng).unwrap().addr == eps[1].addr));
        assert!(
            pick(&eps, Some(&eps[1]), &mut rng).is_none(),
            "a retry skips the ejected"
        );
        // Readmitted once the ejection lapses.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            pick(&eps, Some(&eps[1]), &mut rng).unwrap().addr,
            eps[0].addr
        );
    }

    #[test]
    fn server_errors_in_a_row_eject_and_a_success_between_resets_the_count() {
        let eps = endpoints(3);
        let cfg = quick();
        let answer = |addr, error| InFlight::start(addr).answered(error, &eps, &cfg);
        assert!(!answer(eps[0].addr, true));
        assert!(!answer(eps[0].addr, true));
        assert!(!answer(eps[0].addr, false));
        assert!(!answer(eps[0].addr, true));
        assert!(!InFlight::start(eps[0].addr).failed(Failure::Server, &eps, &cfg));
        assert!(answer(eps[0].addr, true), "the third in a row ejects");
        let mut rng = Rng::seeded(6);
        assert!((0..100).all(|_| pick(&eps, None, &mut rng).unwrap().addr != eps[0].addr));
    }

    #[test]
    fn ejections_in_a_row_last_longer_up_to_the_cap() {
        let eps = endpoints(2);
        let cfg = quick();
        let length = |eps: &[Arc<Endpoint>]| {
            let before = Instant::now();
            assert!(InFlight::start(eps[0].addr).failed(Failure::Connect, eps, &cfg));
            let until = LOADS.with_borrow(|l| l.by_addr[&eps[0].addr].ejected_until.unwrap());
            let length = until - before;
            // Lift it now, as if it had lapsed.
            LOADS.with_borrow_mut(|l| {
                l.by_addr.get_mut(&eps[0].addr).unwrap().ejected_until = Some(Instant::now());
                l.readmit_lapsed(Instant::now());
            });
            length
        };
        let lengths: Vec<Duration> = (0..4).map(|_| length(&eps)).collect();
        let ms = |d: Duration| d.as_millis();
        assert_eq!(
            lengths.iter().map(|&d| ms(d)).collect::<Vec<_>>(),
            [40, 80, 100, 100]
        );
        // A success after readmission starts the backoff again.
        InFlight::start(eps[0].addr).answered(false, &eps, &cfg);
        assert_eq!(ms(length(&eps)), 40);
    }

    #[test]
    fn at_most_the_allowed_share_is_ejected_and_never_the_last_endpoint() {
        let cfg = quick();
        let one = endpoints(1);
        assert!(!InFlight::start(one[0].addr).failed(Failure::Connect, &one, &cfg));
        let four = endpoints(4);
        let ejected = four
            .iter()
            .filter(|e| InFlight::start(e.addr).failed(Failure::Connect, &four, &cfg))
            .count();
        assert_eq!(ejected, 2, "50% of four");
        let mut rng = Rng::seeded(7);
        let picked: std::collections::HashSet<_> = (0..200)
            .map(|_| pick(&four, None, &mut rng).unwrap().addr)
            .collect();
        assert_eq!(picked.len(), 2);
    }

    #[test]
    fn a_backend_with_every_endpoint_ejected_is_balanced_over_all() {
        let cfg = OutlierConfig {
            max_ejected_percent: 100,
            ..quick()
        };
        let eps = endpoints(3);
        for e in &eps[..2] {
            assert!(InFlight::start(e.addr).failed(Failure::Connect, &eps, &cfg));
        }
        // Two of three ejected; the third is ejected from another backend sharing it.
        let other = vec![eps[2].clone(), endpoints(5)[4].clone()];
        assert!(InFlight::start(eps[2].addr).failed(Failure::Connect, &other, &cfg));
        let mut rng = Rng::seeded(8);
        assert!(pick(&eps, None, &mut rng).is_some());
        assert!(pick(&eps, Some(&eps[0]), &mut rng).is_none());
    }
}
