//! Exponential backoff with jitter and a seedable random source, so a test replays exactly.

use std::time::Duration;

use crate::error::ConfigError;

/// How random each delay is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the exponential delay: for tests that assert on delays.
    None,
    /// Uniform in `[0, delay]` ("full jitter"): spreads reconnect storms the most.
    Full,
    /// Uniform in `[delay/2, delay]`: never retries much sooner than planned.
    Equal,
}

/// Backoff settings.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    /// Delay before the first retry.
    pub initial: Duration,
    /// No delay is longer than this.
    pub max: Duration,
    /// Growth factor per attempt (at least 1).
    pub multiplier: f64,
    /// Randomisation of each delay.
    pub jitter: Jitter,
    /// Seed of the random source; the same seed gives the same delays.
    pub seed: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: Jitter::Equal,
            seed: 0x5EED,
        }
    }
}

impl RetryConfig {
    /// Checks that the settings can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.initial.is_zero() {
            return Err(ConfigError::new(
                "retry-initial-ms",
                "must be greater than zero",
            ));
        }
        if self.max < self.initial {
            return Err(ConfigError::new(
                "retry-max-ms",
                format!(
                    "must be at least retry-initial ({:?}), got {:?}",
                    self.initial, self.max
                ),
            ));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(ConfigError::new(
                "retry-multiplier",
                format!("must be a finite number >= 1, got {}", self.multiplier),
            ));
        }
        Ok(())
    }
}

/// Computes the delay before retry number `attempt` (1-based).
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    config: RetryConfig,
    rng: SplitMix64,
}

impl RetryPolicy {
    /// A policy whose random source starts from `config.seed`.
    pub fn new(config: RetryConfig) -> Self {
        let rng = SplitMix64(config.seed);
        RetryPolicy { config, rng }
    }

    /// The settings this policy was built from.
    pub fn config(&self) -> &RetryConfig {
        &self.config
    }

    /// The delay before retry `attempt` (1 for the first retry). Grows by `multiplier` per
    /// attempt up to `max`, then jitter is applied.
    pub fn delay(&mut self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let base = self.config.initial.as_secs_f64() * self.config.multiplier.powi(exp);
        let capped = base.min(self.config.max.as_secs_f64());
        let secs = match self.config.jitter {
            Jitter::None => capped,
            Jitter::Full => capped * self.rng.next_unit(),
            Jitter::Equal => capped / 2.0 + capped / 2.0 * self.rng.next_unit(),
        };
        Duration::from_secs_f64(secs)
    }
}

/// A tiny, fast, seedable generator (Steele, Lea, Flood 2014). Not for cryptography.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1].
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / ((1u64 << 53) - 1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: Jitter, seed: u64) -> RetryPolicy {
        RetryPolicy::new(RetryConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
            jitter,
            seed,
        })
    }

    #[test]
    fn without_jitter_delays_double_up_to_the_cap() {
        let mut p = policy(Jitter::None, 1);
        let got: Vec<u128> = (1..=7).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn jittered_delays_stay_in_their_band_and_replay_from_the_seed() {
        for jitter in [Jitter::Full, Jitter::Equal] {
            let mut a = policy(jitter, 42);
            let mut b = policy(jitter, 42);
            let mut c = policy(jitter, 43);
            let da: Vec<Duration> = (1..50).map(|n| a.delay(n)).collect();
            let db: Vec<Duration> = (1..50).map(|n| b.delay(n)).collect();
            let dc: Vec<Duration> = (1..50).map(|n| c.delay(n)).collect();
            assert_eq!(da, db, "same seed must give the same delays");
            assert_ne!(da, dc, "another seed must give other delays");
            for (n, d) in da.iter().enumerate() {
                let plain = policy(Jitter::None, 0).delay(n as u32 + 1);
                let low = if jitter == Jitter::Equal {
                    plain / 2
                } else {
                    Duration::ZERO
                };
                assert!(
                    *d >= low && *d <= plain,
                    "attempt {}: {d:?} outside [{low:?}, {plain:?}]",
                    n + 1
                );
            }
        }
    }

    #[test]
    fn validation_names_the_setting() {
        let mut c = RetryConfig {
            max: Duration::from_millis(1),
            ..RetryConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().setting, "retry-max-ms");
        c = RetryConfig {
            multiplier: 0.5,
            ..RetryConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().setting, "retry-multiplier");
    }
}
