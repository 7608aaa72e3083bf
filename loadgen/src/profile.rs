//! Rate profiles and the send schedule they imply. Pure: the schedule is a list of intended
//! send times computed up front from the profile and the seed, so a run can be replayed and
//! the plan compared with what was actually sent.

use std::time::Duration;

/// How the request rate changes over the run.
#[derive(Clone, Debug, PartialEq)]
pub enum RateProfile {
    /// A fixed rate.
    Constant {
        /// Requests per second.
        rate: f64,
    },
    /// A linear change from `from` to `to` over `over`, then `to`.
    Ramp {
        /// Starting rate.
        from: f64,
        /// Final rate.
        to: f64,
        /// Ramp length.
        over: Duration,
    },
    /// Stages like k6's: each (length, target rate) ramps linearly from the previous target.
    Step {
        /// (stage length, target rate at its end).
        stages: Vec<(Duration, f64)>,
    },
    /// A base rate with bursts of `multiplier` times it, `burst` long, starting at random
    /// (seeded) times spaced `gap` apart on average.
    Spiky {
        /// Base rate.
        base: f64,
        /// Burst rate = base * multiplier.
        multiplier: f64,
        /// Burst length.
        burst: Duration,
        /// Mean time between burst starts.
        gap: Duration,
        /// Seed for the burst times.
        seed: u64,
    },
    /// A daily-like wave: base * (1 + amplitude * sin(2 pi t / period)).
    Sine {
        /// Mean rate.
        base: f64,
        /// Relative amplitude (0..1).
        amplitude: f64,
        /// Wave period.
        period: Duration,
    },
    /// A trace: explicit send offsets in seconds (already divided by the speed factor).
    Replay {
        /// Send offsets from the start, seconds, ascending.
        offsets: Vec<f64>,
    },
}

impl RateProfile {
    /// Parses a replay trace: one number per line, either ascending timestamps (seconds; the
    /// first becomes 0) or, with `counts`, requests per second for consecutive seconds.
    pub fn replay_from_text(text: &str, counts: bool, speed: f64) -> Result<Self, String> {
        let mut nums = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split(',').next().unwrap_or("").trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            nums.push(
                line.parse::<f64>()
                    .map_err(|e| format!("trace line {}: {e}", n + 1))?,
            );
        }
        if speed <= 0.0 {
            return Err("replay speed must be positive".into());
        }
        let offsets = if counts {
            let mut out = Vec::new();
            for (second, count) in nums.iter().enumerate() {
                let k = count.max(0.0).round() as usize;
                out.extend((0..k).map(|i| (second as f64 + i as f64 / k as f64) / speed));
            }
            out
        } else {
            let first = nums.first().copied().unwrap_or(0.0);
            if nums.windows(2).any(|w| w[1] < w[0]) {
                return Err("trace timestamps must be ascending".into());
            }
            nums.iter().map(|t| (t - first) / speed).collect()
        };
        Ok(RateProfile::Replay { offsets })
    }

    /// The burst windows of a spiky profile within `duration` (start, end), in seconds.
    pub fn bursts(&self, duration: Duration) -> Vec<(f64, f64)> {
        let RateProfile::Spiky {
            burst, gap, seed, ..
        } = self
        else {
            return vec![];
        };
        let mut rng = fastrand::Rng::with_seed(*seed);
        let (len, gap) = (burst.as_secs_f64(), gap.as_secs_f64().max(0.001));
        let mut out = vec![];
        // First burst after a random part of one gap, then gaps uniform in [gap/2, 3 gap/2].
        let mut t = gap * (0.25 + 0.5 * rng.f64());
        while t < duration.as_secs_f64() {
            out.push((t, t + len));
            t += len + gap * (0.5 + rng.f64());
        }
        out
    }

    /// The intended rate at `t` seconds (replay: not defined, returns 0).
    pub fn rate_at(&self, t: f64, bursts: &[(f64, f64)]) -> f64 {
        match self {
            RateProfile::Constant { rate } => *rate,
            RateProfile::Ramp { from, to, over } => {
                let f = (t / over.as_secs_f64().max(1e-9)).min(1.0);
                from + (to - from) * f
            }
            RateProfile::Step { stages } => {
                let (mut start, mut prev) = (0.0, 0.0);
                for (len, target) in stages {
                    let end = start + len.as_secs_f64();
                    if t < end {
                        return prev + (target - prev) * (t - start) / len.as_secs_f64().max(1e-9);
                    }
                    start = end;
                    prev = *target;
                }
                prev
            }
            RateProfile::Spiky {
                base, multiplier, ..
            } => {
                if bursts.iter().any(|(s, e)| t >= *s && t < *e) {
                    base * multiplier
                } else {
                    *base
                }
            }
            RateProfile::Sine {
                base,
                amplitude,
                period,
            } => {
                let phase = std::f64::consts::TAU * t / period.as_secs_f64().max(1e-9);
                (base * (1.0 + amplitude * phase.sin())).max(0.0)
            }
            RateProfile::Replay { .. } => 0.0,
        }
    }

    /// Every intended send time within `duration`, in seconds from the start, ascending.
    /// Sends are placed where the integral of the rate crosses each whole number, so the plan
    /// follows the profile exactly, bursts included.
    pub fn schedule(&self, duration: Duration) -> Vec<f64> {
        let end = duration.as_secs_f64();
        if let RateProfile::Replay { offsets } = self {
            return offsets.iter().copied().filter(|t| *t < end).collect();
        }
        let bursts = self.bursts(duration);
        // A power-of-two step keeps the running integral exact for round rates.
        let dt = 1.0 / 2048.0;
        let steps = (end / dt).ceil() as u64;
        let mut acc: f64 = 0.0;
        let mut out = Vec::new();
        for i in 0..steps {
            let t = i as f64 * dt;
            let before = acc;
            acc += self.rate_at(t, &bursts) * dt;
            // The k-th send (k = 0, 1, ...) leaves where the integral reaches k.
            let mut k = before.ceil();
            while k < acc {
                out.push(t + dt * (k - before) / (acc - before));
                k += 1.0;
            }
        }
        out.retain(|x| *x < end);
        out
    }
}

/// Parses "500ms", "30s", "2m", "1h" (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 500ms, 30s, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("{s:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(p: &RateProfile, secs: u64) -> usize {
        p.schedule(Duration::from_secs(secs)).len()
    }

    #[test]
    fn the_plan_follows_each_profile() {
        assert_eq!(count(&RateProfile::Constant { rate: 100.0 }, 10), 1000);
        let ramp = RateProfile::Ramp {
            from: 0.0,
            to: 100.0,
            over: Duration::from_secs(10),
        };
        assert_eq!(count(&ramp, 10), 500);
        let step = RateProfile::Step {
            stages: vec![
                (Duration::from_secs(5), 100.0),
                (Duration::from_secs(5), 100.0),
            ],
        };
        assert_eq!(count(&step, 10), 750);
        let sine = RateProfile::Sine {
            base: 100.0,
            amplitude: 0.5,
            period: Duration::from_secs(10),
        };
        assert!(
            (count(&sine, 10) as i64 - 1000).abs() <= 2,
            "a whole period averages to base"
        );
    }

    #[test]
    fn spiky_bursts_are_20x_seeded_and_replayable() {
        let p = |seed| RateProfile::Spiky {
            base: 10.0,
            multiplier: 20.0,
            burst: Duration::from_secs(2),
            gap: Duration::from_secs(8),
            seed,
        };
        let d = Duration::from_secs(60);
        let bursts = p(1).bursts(d);
        assert!(bursts.len() >= 4, "{bursts:?}");
        assert_eq!(p(1).schedule(d), p(1).schedule(d));
        assert_ne!(p(1).bursts(d), p(2).bursts(d));
        let sched = p(1).schedule(d);
        let (s, e) = bursts[0];
        let in_burst = sched.iter().filter(|t| **t >= s && **t < e).count();
        assert!(
            (in_burst as f64 - 400.0).abs() <= 2.0,
            "2 s at 200/s: {in_burst}"
        );
        let quiet = sched.iter().filter(|t| **t < s).count();
        assert!((quiet as f64 - 10.0 * s).abs() <= 2.0);
    }

    #[test]
    fn replay_reads_timestamps_or_counts_with_a_speed_factor() {
        let t =
            RateProfile::replay_from_text("100.0\n100.5\n# comment\n102\n", false, 2.0).unwrap();
        assert_eq!(
            t,
            RateProfile::Replay {
                offsets: vec![0.0, 0.25, 1.0]
            }
        );
        let c = RateProfile::replay_from_text("2\n0\n1\n", true, 1.0).unwrap();
        assert_eq!(
            c,
            RateProfile::Replay {
                offsets: vec![0.0, 0.5, 2.0]
            }
        );
        assert!(RateProfile::replay_from_text("2\n1\n", false, 1.0).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3 parsecs").is_err());
    }
}
