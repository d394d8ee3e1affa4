//! Seeded pseudo-random numbers and the few distributions the model draws from.
//!
//! Owns: xoshiro256** seeded through SplitMix64, one independent stream per subsystem (so a
//! change in how one subsystem draws does not shift every other draw), and inverse-CDF samplers.
//! Must not: read the clock, the environment or any other source of entropy — a run is a pure
//! function of its scenario and seed.

/// SplitMix64 step: used to expand one `u64` seed into xoshiro state and to derive stream seeds.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** (Blackman & Vigna): small, fast, good enough statistically for a simulator.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator for `stream` (a subsystem name) under the run's `seed`.
    pub fn stream(seed: u64, stream: &str) -> Rng {
        // FNV-1a of the stream name, mixed with the seed: independent, stable streams.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in stream.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Rng::from_seed(seed ^ h.rotate_left(17))
    }

    /// A generator from a single `u64`.
    pub fn from_seed(seed: u64) -> Rng {
        let mut sm = seed;
        let mut s = [0u64; 4];
        for x in &mut s {
            *x = splitmix64(&mut sm);
        }
        if s == [0; 4] {
            s[0] = 1;
        }
        Rng { s }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in (0, 1]: safe to take the logarithm of.
    pub fn f64_open0(&mut self) -> f64 {
        1.0 - self.f64()
    }

    /// Uniform integer in [0, n). `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift; the tiny bias is irrelevant here.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// Exponential with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * self.f64_open0().ln()
    }

    /// Weibull with `shape` k and `scale` λ (inverse CDF).
    pub fn weibull(&mut self, shape: f64, scale: f64) -> f64 {
        scale * (-self.f64_open0().ln()).powf(1.0 / shape)
    }

    /// Standard normal (Box–Muller, one of the pair).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.f64_open0();
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Log-normal with the given median and σ of the underlying normal.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    /// Poisson with mean `lambda` (Knuth's product method; for the small means used here).
    pub fn poisson(&mut self, lambda: f64) -> u32 {
        let l = (-lambda).exp();
        let mut k = 0u32;
        let mut p = 1.0;
        loop {
            p *= self.f64();
            if p <= l || k >= 1000 {
                return k;
            }
            k += 1;
        }
    }
}

/// A discrete distribution over indices `0..n`, sampled by binary search in its CDF.
#[derive(Clone, Debug)]
pub struct Discrete {
    cdf: Vec<f64>,
}

impl Discrete {
    /// From non-negative weights (at least one positive).
    pub fn new(weights: &[f64]) -> Discrete {
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Discrete { cdf }
    }

    /// Zipf weights 1/rank^s over `n` ranks.
    pub fn zipf(n: usize, s: f64) -> Discrete {
        let w: Vec<f64> = (1..=n).map(|r| 1.0 / (r as f64).powf(s)).collect();
        Discrete::new(&w)
    }

    /// One index.
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.f64();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }

    /// Probability of index `i`.
    pub fn prob(&self, i: usize) -> f64 {
        if i == 0 {
            self.cdf[0]
        } else {
            self.cdf[i] - self.cdf[i - 1]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(Rng::stream(7, "x"), |r, _: u64| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(Rng::stream(7, "x"), |r, _: u64| Some(r.next_u64()))
            .collect();
        let c: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(Rng::stream(7, "y"), |r, _: u64| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn weibull_fit_matches_ipfs_points() {
        // shape 0.61, scale 3.7 h: half the sessions ≤ 2 h, 80 % ≤ 8 h (notes/simulation.md).
        let mut r = Rng::from_seed(1);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.weibull(0.61, 3.7)).collect();
        let le2 = xs.iter().filter(|&&x| x <= 2.0).count() as f64 / n as f64;
        let le8 = xs.iter().filter(|&&x| x <= 8.0).count() as f64 / n as f64;
        assert!((le2 - 0.50).abs() < 0.01, "{le2}");
        assert!((le8 - 0.80).abs() < 0.01, "{le8}");
    }

    #[test]
    fn poisson_hops_match_rfm17() {
        // 1 + Poisson(3): median 4 hops, p90 6 (RFM17).
        let mut r = Rng::from_seed(2);
        let mut xs: Vec<u32> = (0..100_000).map(|_| 1 + r.poisson(3.0)).collect();
        xs.sort_unstable();
        assert_eq!(xs[50_000], 4);
        assert_eq!(xs[90_000], 6);
    }

    #[test]
    fn zipf_is_normalised_and_ordered() {
        let d = Discrete::zipf(100, 1.0);
        let total: f64 = (0..100).map(|i| d.prob(i)).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(d.prob(0) > d.prob(1) && d.prob(1) > d.prob(99));
        let mut r = Rng::from_seed(3);
        let hits = (0..10_000).filter(|_| d.sample(&mut r) == 0).count() as f64 / 10_000.0;
        assert!((hits - d.prob(0)).abs() < 0.02, "{hits}");
    }
}
