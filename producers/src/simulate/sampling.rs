//! The distributions the simulator draws from, on a seeded generator.

use rand::Rng;

/// A Zipf distribution over ranks `0..n`: rank `k` is drawn with weight
/// `1 / (k + 1)^s`, so a few ranks (players, NPCs, prompts) dominate.
#[derive(Debug, Clone)]
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    /// Ranks `0..n` with exponent `s`; `n` is at least 1.
    pub fn new(n: u32, s: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (0..n.max(1))
            .map(|rank| {
                total += 1.0 / f64::from(rank + 1).powf(s);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    /// A rank.
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let target = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c <= target)
            .min(self.cumulative.len() - 1)
    }
}

/// The gap before the next arrival of a Poisson process with `rate` per unit.
pub fn exponential(rng: &mut impl Rng, rate: f64) -> f64 {
    // 1 - u is in (0, 1], so the logarithm is finite.
    -(1.0 - rng.random::<f64>()).ln() / rate
}

/// A standard normal value (Box–Muller).
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A log-normal value with the given median and shape: most values near the
/// median, a long tail above it (token counts, latencies).
pub fn log_normal(rng: &mut impl Rng, median: f64, sigma: f64) -> f64 {
    median * (sigma * standard_normal(rng)).exp()
}

/// One of `items`, drawn in proportion to its weight.
pub fn weighted<T: Copy>(rng: &mut impl Rng, items: &[(T, f64)]) -> T {
    let total: f64 = items.iter().map(|(_, w)| w).sum();
    let mut target = rng.random::<f64>() * total;
    for (item, weight) in items {
        if target < *weight {
            return *item;
        }
        target -= weight;
    }
    // Rounding left the target at the very end: the last item.
    items[items.len() - 1].0
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn given_a_zipf_over_fifty_ranks_when_sampled_then_the_top_rank_far_outnumbers_the_median() {
        let mut rng = StdRng::seed_from_u64(1);
        let zipf = Zipf::new(50, 1.1);
        let mut counts = [0u32; 50];
        for _ in 0..100_000 {
            counts[zipf.sample(&mut rng)] += 1;
        }
        assert!(counts[0] > 10 * counts[25], "{counts:?}");
        assert!(
            counts.iter().all(|c| *c > 0),
            "every rank is drawn sometimes"
        );
    }

    #[test]
    fn given_a_rate_when_gaps_are_drawn_then_their_mean_is_one_over_the_rate() {
        let mut rng = StdRng::seed_from_u64(2);
        let n = 100_000;
        let mean = (0..n).map(|_| exponential(&mut rng, 4.0)).sum::<f64>() / f64::from(n);
        assert!((mean - 0.25).abs() < 0.01, "mean gap {mean}");
    }

    #[test]
    fn given_a_median_when_log_normal_values_are_drawn_then_half_fall_below_it_and_the_tail_is_long()
     {
        let mut rng = StdRng::seed_from_u64(3);
        let values: Vec<f64> = (0..100_000)
            .map(|_| log_normal(&mut rng, 500.0, 0.5))
            .collect();
        let below = values.iter().filter(|v| **v < 500.0).count() as f64 / values.len() as f64;
        assert!((below - 0.5).abs() < 0.01);
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert!(mean > 500.0, "the tail lifts the mean above the median");
    }

    #[test]
    fn given_weights_when_items_are_drawn_then_shares_follow_them() {
        let mut rng = StdRng::seed_from_u64(4);
        let items = [('a', 6.0), ('b', 3.0), ('c', 1.0)];
        let n = 100_000;
        let a = (0..n).filter(|_| weighted(&mut rng, &items) == 'a').count() as f64 / n as f64;
        assert!((a - 0.6).abs() < 0.01, "share of a {a}");
    }
}
