//! Random choices on the request path: weighted backends and sampled mirrors. Lock-free: each
//! thread has its own generator.

use std::cell::Cell;

/// wyrand: a small, fast, statistically sound generator. Not for secrets; for traffic splits.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }

    /// Uniform in 0..n (n > 0), without modulo bias worth speaking of for n << 2^64.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

thread_local! {
    static THREAD_RNG: Cell<Rng> = Cell::new(Rng::seeded(seed()));
}

fn seed() -> u64 {
    use std::hash::{BuildHasher as _, RandomState};
    RandomState::new().hash_one(std::thread::current().id())
}

/// Runs `f` with this thread's generator.
pub fn with_rng<T>(f: impl FnOnce(&mut Rng) -> T) -> T {
    THREAD_RNG.with(|cell| {
        let mut rng = cell.replace(Rng::seeded(0));
        let out = f(&mut rng);
        cell.set(rng);
        out
    })
}

/// The index of a weighted choice, or None when every weight is 0.
pub fn pick_weighted(weights: impl Iterator<Item = u32> + Clone, rng: &mut Rng) -> Option<usize> {
    let total: u64 = weights.clone().map(u64::from).sum();
    if total == 0 {
        return None;
    }
    let mut point = rng.below(total);
    for (index, weight) in weights.enumerate() {
        let weight = u64::from(weight);
        if point < weight {
            return Some(index);
        }
        point -= weight;
    }
    unreachable!("the point lies below the total")
}

/// Whether a request falls in a sample of numerator/denominator.
pub fn sampled(numerator: u32, denominator: u32, rng: &mut Rng) -> bool {
    denominator > 0 && rng.below(u64::from(denominator)) < u64::from(numerator)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_90_10_split_over_10000_requests_is_within_one_point() {
        for seed in 0..20 {
            let mut rng = Rng::seeded(seed);
            let mut counts = [0u32; 2];
            for _ in 0..10_000 {
                counts[pick_weighted([90, 10].into_iter(), &mut rng).unwrap()] += 1;
            }
            let canary = f64::from(counts[1]) / 100.0;
            assert!(
                (canary - 10.0).abs() <= 1.0,
                "seed {seed}: canary got {canary}%"
            );
        }
    }

    #[test]
    fn zero_weights_get_nothing() {
        let mut rng = Rng::seeded(7);
        for _ in 0..1000 {
            assert_eq!(pick_weighted([0, 5, 0].into_iter(), &mut rng), Some(1));
        }
        assert_eq!(pick_weighted([0, 0].into_iter(), &mut rng), None);
        assert_eq!(pick_weighted(std::iter::empty(), &mut rng), None);
    }

    #[test]
    fn samples_hold_their_share() {
        let mut rng = Rng::seeded(3);
        let hits = (0..100_000).filter(|_| sampled(1, 4, &mut rng)).count();
        assert!((24_000..26_000).contains(&hits), "{hits}");
        assert!(!sampled(5, 0, &mut rng));
        assert!((0..1000).all(|_| sampled(100, 100, &mut rng)));
    }

    #[test]
    fn threads_get_different_streams() {
        let here = with_rng(|rng| rng.next_u64());
        let there = std::thread::spawn(|| with_rng(|rng| rng.next_u64()))
            .join()
            .unwrap();
        assert_ne!(here, there);
    }
}
