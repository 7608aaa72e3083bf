//! Adaptive batch size: additive increase while flushes are fast, multiplicative decrease when
//! they are slow or fail (AIMD, as TCP congestion control does with its window).
//!
//! A full flush that took under a quarter of the latency target doubles the size instead of
//! adding a step, so a backlog reaches a good size in a few flushes rather than dozens (TCP's
//! slow start plays the same part). If a flush's latency grows about in proportion to its
//! records, the doubled batch still takes under half the target: doubling never by itself
//! causes the slow flush that would halve it again.

use std::time::Duration;

use crate::error::ConfigError;

/// Bounds and targets for the batch size.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveConfig {
    /// The size never drops below this many records.
    pub min_records: usize,
    /// The size never grows above this many records.
    pub max_records: usize,
    /// The size to start from.
    pub initial_records: usize,
    /// A flush slower than this shrinks the batch size.
    pub latency_target: Duration,
    /// Records added after each full flush within the latency target (one under a quarter
    /// of it doubles the size instead).
    pub increase_step: usize,
    /// Factor applied after a slow or failed flush (between 0 and 1).
    pub decrease_factor: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            min_records: 100,
            max_records: 20_000,
            initial_records: 2_000,
            latency_target: Duration::from_millis(250),
            increase_step: 500,
            decrease_factor: 0.5,
        }
    }
}

impl AdaptiveConfig {
    /// A fixed batch size (no adaptation).
    pub fn fixed(records: usize) -> Self {
        AdaptiveConfig {
            min_records: records,
            max_records: records,
            initial_records: records,
            ..Self::default()
        }
    }

    /// Checks that the settings can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.min_records == 0 {
            return Err(ConfigError::new("batch-min-records", "must be at least 1"));
        }
        if self.max_records < self.min_records {
            return Err(ConfigError::new(
                "batch-max-records",
                format!(
                    "must be at least batch-min-records ({}), got {}",
                    self.min_records, self.max_records
                ),
            ));
        }
        if !(self.min_records..=self.max_records).contains(&self.initial_records) {
            return Err(ConfigError::new(
                "batch-initial-records",
                format!(
                    "must be between {} and {}, got {}",
                    self.min_records, self.max_records, self.initial_records
                ),
            ));
        }
        if !(self.decrease_factor > 0.0 && self.decrease_factor < 1.0) {
            return Err(ConfigError::new(
                "batch-decrease-factor",
                format!("must be between 0 and 1, got {}", self.decrease_factor),
            ));
        }
        Ok(())
    }
}

/// The current target batch size.
#[derive(Clone, Debug)]
pub struct BatchSizer {
    config: AdaptiveConfig,
    target: usize,
}

impl BatchSizer {
    /// Starts at `config.initial_records`.
    pub fn new(config: AdaptiveConfig) -> Self {
        let target = config.initial_records;
        BatchSizer { config, target }
    }

    /// How many records the next batch should hold.
    pub fn target(&self) -> usize {
        self.target
    }

    /// A flush of `rows` records succeeded after `latency`. Only a batch that was full (limited
    /// by the target, not by a lack of records) is evidence that a bigger one would help: it
    /// doubles the size when the flush took under a quarter of the latency target, and adds
    /// a step otherwise.
    pub fn on_success(&mut self, latency: Duration, was_full: bool) {
        if latency > self.config.latency_target {
            self.decrease();
        } else if was_full {
            let grown = if latency < self.config.latency_target / 4 {
                self.target.saturating_mul(2)
            } else {
                self.target.saturating_add(self.config.increase_step)
            };
            self.target = grown.min(self.config.max_records);
        }
    }

    /// A flush failed (the database is struggling): back off.
    pub fn on_failure(&mut self) {
        self.decrease();
    }

    fn decrease(&mut self) {
        let shrunk = (self.target as f64 * self.config.decrease_factor) as usize;
        self.target = shrunk.max(self.config.min_records);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizer() -> BatchSizer {
        BatchSizer::new(AdaptiveConfig {
            min_records: 100,
            max_records: 1_000,
            initial_records: 400,
            latency_target: Duration::from_millis(100),
            increase_step: 200,
            decrease_factor: 0.5,
        })
    }

    #[test]
    fn grows_while_fast_and_full_up_to_the_max() {
        let mut s = sizer();
        for _ in 0..10 {
            s.on_success(Duration::from_millis(60), true);
        }
        assert_eq!(s.target(), 1_000);
    }

    #[test]
    fn a_flush_far_under_the_target_doubles_and_one_near_it_adds_a_step() {
        let mut s = sizer();
        s.on_success(Duration::from_millis(24), true);
        assert_eq!(
            s.target(),
            800,
            "24 ms is under a quarter of the 100 ms target"
        );
        s.on_success(Duration::from_millis(25), true);
        assert_eq!(s.target(), 1_000, "25 ms adds the 200-record step");
        let mut s = sizer();
        s.on_success(Duration::from_millis(25), true);
        assert_eq!(s.target(), 600);
    }

    #[test]
    fn doubling_stops_at_the_max() {
        let mut s = sizer();
        s.on_success(Duration::from_millis(1), true);
        s.on_success(Duration::from_millis(1), true);
        assert_eq!(s.target(), 1_000);
    }

    #[test]
    fn does_not_grow_on_batches_that_were_not_full() {
        let mut s = sizer();
        s.on_success(Duration::from_millis(10), false);
        assert_eq!(s.target(), 400);
    }

    #[test]
    fn halves_on_slow_flush_or_failure_down_to_the_min() {
        let mut s = sizer();
        s.on_success(Duration::from_millis(500), true);
        assert_eq!(s.target(), 200);
        s.on_failure();
        s.on_failure();
        assert_eq!(s.target(), 100);
    }

    #[test]
    fn validation_names_the_setting() {
        let c = AdaptiveConfig {
            initial_records: 1,
            ..AdaptiveConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().setting, "batch-initial-records");
    }
}
