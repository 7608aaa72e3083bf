//! With `--idempotency-keys`: which outcomes of a request are retried, and how long the retry
//! waits. Pure: no IO, no clock; the runner feeds it each attempt's outcome and sleeps what it
//! says.
//!
//! A request is retried, with the same key and body, after an answer that says "not now"
//! (`503`: Kafka slow or down; `429`: too much in flight) and after a transport failure that
//! leaves the client not knowing whether the request landed (the connection refused or lost,
//! no answer within the answer timeout). It is not retried after any other answer (a `2xx`
//! is done, a `4xx` would fail again) nor after a failure no retry can mend (a bad target URL,
//! an answer that is not HTTP). The key is what makes the retry safe: the pipeline writes a
//! key's records once, so a retry of a request that did land adds nothing.
//!
//! The wait honours `Retry-After` (delta-seconds, at most [`RETRY_AFTER_CEILING`]) plus a
//! spread of up to the initial backoff, so the requests refused together do not all come back
//! in the same millisecond; without it, it grows exponentially from the initial backoff with
//! equal jitter (`[d/2, d]`), capped. After `max_retries` retries the request is given up.

use std::time::Duration;

use spillway_core::retry::{Jitter, RetryConfig, RetryPolicy as Backoff};

/// The longest `Retry-After` honoured: a larger one is taken as this.
pub const RETRY_AFTER_CEILING: Duration = Duration::from_secs(60);

/// How one attempt of a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// An HTTP answer, with its `Retry-After` if it had one in seconds.
    Answered {
        /// The status code.
        status: u16,
        /// `Retry-After`, when the answer had one (delta-seconds).
        retry_after: Option<Duration>,
    },
    /// No HTTP answer.
    Failed(Transport),
}

/// Why an attempt got no HTTP answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The connection could not be opened (refused, unreachable).
    Connect,
    /// The connection failed or closed after the request was (perhaps partly) written, before
    /// the whole answer arrived: the request may have landed.
    Lost,
    /// No answer within the answer timeout: the request may have landed.
    NoAnswer,
    /// The server answered something that is not HTTP/1.1.
    BadAnswer,
    /// The request could not be made at all (a bad target URL or header).
    Setup,
}

/// Whether an attempt that ended so is retried (when retries remain).
pub fn retried(attempt: &Attempt) -> bool {
    match attempt {
        Attempt::Answered { status, .. } => matches!(status, 429 | 503),
        Attempt::Failed(t) => matches!(
            t,
            Transport::Connect | Transport::Lost | Transport::NoAnswer
        ),
    }
}

/// What to do after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The attempt's outcome is the request's: an answer that is not retried.
    Done,
    /// Send the request again, with the same key and body, after this long.
    RetryIn(Duration),
    /// Retried `max_retries` times already: the last outcome stands, and the request is given
    /// up (its records may still land: the verdict counts them apart).
    GiveUp,
}

/// The retry settings (`--max-retries`, `--retry-initial`, `--retry-max`, `--answer-timeout`).
#[derive(Clone, Debug, PartialEq)]
pub struct RetrySettings {
    /// Retries per request before it is given up (0: none).
    pub max_retries: u32,
    /// The first retry's backoff without `Retry-After` (and the spread added to one).
    pub initial: Duration,
    /// No backoff without `Retry-After` is longer than this.
    pub max: Duration,
    /// An attempt without a whole answer after this long is abandoned (its connection closed)
    /// and counts as [`Transport::NoAnswer`].
    pub answer_timeout: Duration,
    /// Exact delays (`Jitter::None`, for tests) or equal jitter (`Jitter::Equal`).
    pub jitter: Jitter,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_retries: 10,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            answer_timeout: Duration::from_secs(30),
            jitter: Jitter::Equal,
        }
    }
}

impl RetrySettings {
    /// Checks that the settings can work; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.initial.is_zero() {
            return Err("--retry-initial must be greater than zero".into());
        }
        if self.max < self.initial {
            return Err(format!(
                "--retry-max ({:?}) must be at least --retry-initial ({:?})",
                self.max, self.initial
            ));
        }
        if self.answer_timeout.is_zero() {
            return Err("--answer-timeout must be greater than zero".into());
        }
        Ok(())
    }
}

/// One connection worker's retry decisions: the settings and its seeded random source.
#[derive(Clone, Debug)]
pub struct Retrier {
    settings: RetrySettings,
    /// Exponential from `initial` to `max`.
    backoff: Backoff,
    /// Uniform in `[0, initial]`: the spread added to a `Retry-After`.
    spread: Backoff,
}

impl Retrier {
    /// Decisions under `settings`, with jitter drawn from `seed` (the same seed, the same
    /// delays).
    pub fn new(settings: RetrySettings, seed: u64) -> Self {
        let backoff = Backoff::new(RetryConfig {
            initial: settings.initial,
            max: settings.max,
            multiplier: 2.0,
            jitter: settings.jitter,
            seed,
        });
        let spread = Backoff::new(RetryConfig {
            initial: settings.initial,
            max: settings.initial,
            multiplier: 1.0,
            jitter: match settings.jitter {
                Jitter::None => Jitter::None,
                _ => Jitter::Full,
            },
            seed: seed ^ 0x5EED_5EED,
        });
        Retrier {
            settings,
            backoff,
            spread,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &RetrySettings {
        &self.settings
    }

    /// What to do after `attempt`, the outcome of a request already retried `retries` times.
    pub fn next(&mut self, attempt: &Attempt, retries: u32) -> Next {
        if !retried(attempt) {
            return Next::Done;
        }
        if retries >= self.settings.max_retries {
            return Next::GiveUp;
        }
        let retry_after = match attempt {
            Attempt::Answered { retry_after, .. } => *retry_after,
            Attempt::Failed(_) => None,
        };
        Next::RetryIn(self.wait(retries + 1, retry_after))
    }

    /// The wait before retry number `retry` (1 for the first).
    fn wait(&mut self, retry: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(asked) => asked.min(RETRY_AFTER_CEILING) + self.spread.delay(1),
            None => self.backoff.delay(retry),
        }
    }
}

/// `Retry-After` as delta-seconds (an HTTP-date, or anything else, is ignored: the backoff
/// applies).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, retry_after: Option<u64>) -> Attempt {
        Attempt::Answered {
            status,
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    fn exact() -> Retrier {
        Retrier::new(
            RetrySettings {
                jitter: Jitter::None,
                ..RetrySettings::default()
            },
            1,
        )
    }

    #[test]
    fn only_answers_that_say_not_now_and_failures_that_leave_it_unknown_are_retried() {
        let mut r = exact();
        for status in [503, 429] {
            assert!(
                matches!(r.next(&answer(status, None), 0), Next::RetryIn(_)),
                "{status}"
            );
        }
        for t in [Transport::Connect, Transport::Lost, Transport::NoAnswer] {
            assert!(
                matches!(r.next(&Attempt::Failed(t), 0), Next::RetryIn(_)),
                "{t:?}"
            );
        }
        // Done: a success, a refusal a retry would meet again, a server error that is not
        // "not now", and failures no retry mends.
        for status in [200, 204, 400, 401, 413, 415, 422, 500, 502] {
            assert_eq!(r.next(&answer(status, Some(1)), 0), Next::Done, "{status}");
        }
        for t in [Transport::BadAnswer, Transport::Setup] {
            assert_eq!(r.next(&Attempt::Failed(t), 0), Next::Done, "{t:?}");
        }
    }

    #[test]
    fn a_request_is_given_up_after_the_limit_and_not_before() {
        let mut r = exact();
        let limit = r.settings().max_retries;
        for retries in 0..limit {
            assert!(matches!(
                r.next(&answer(503, Some(1)), retries),
                Next::RetryIn(_)
            ));
        }
        assert_eq!(r.next(&answer(503, Some(1)), limit), Next::GiveUp);
        assert_eq!(
            r.next(&Attempt::Failed(Transport::NoAnswer), limit + 3),
            Next::GiveUp
        );
        // A limit of 0: nothing is retried, every "not now" is given up at once.
        let mut none = Retrier::new(
            RetrySettings {
                max_retries: 0,
                ..RetrySettings::default()
            },
            1,
        );
        assert_eq!(none.next(&answer(429, None), 0), Next::GiveUp);
        assert_eq!(none.next(&answer(200, None), 0), Next::Done);
    }

    #[test]
    fn without_retry_after_the_backoff_doubles_up_to_the_cap() {
        let mut r = exact();
        let waits: Vec<u128> = (0..8)
            .map(|n| match r.next(&Attempt::Failed(Transport::Connect), n) {
                Next::RetryIn(d) => d.as_millis(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn retry_after_is_honoured_never_sooner_and_spread_by_at_most_the_initial_backoff() {
        let settings = RetrySettings::default();
        let mut r = Retrier::new(settings.clone(), 7);
        let mut spreads = std::collections::BTreeSet::new();
        for retries in 0..settings.max_retries {
            let Next::RetryIn(d) = r.next(&answer(503, Some(2)), retries) else {
                panic!("not retried")
            };
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(2) + settings.initial,
                "{d:?}"
            );
            spreads.insert(d);
        }
        assert!(spreads.len() > 1, "the spread is random: {spreads:?}");
        // A Retry-After beyond the ceiling waits the ceiling.
        let Next::RetryIn(d) = r.next(&answer(429, Some(86_400)), 0) else {
            panic!("not retried")
        };
        assert!(d >= RETRY_AFTER_CEILING && d <= RETRY_AFTER_CEILING + settings.initial);
    }

    #[test]
    fn jittered_backoff_stays_within_half_and_whole_of_the_exponential_and_replays_from_its_seed() {
        let settings = RetrySettings::default();
        let (mut a, mut b) = (
            Retrier::new(settings.clone(), 42),
            Retrier::new(settings.clone(), 42),
        );
        let mut plain = exact();
        for retries in 0..settings.max_retries {
            let lost = Attempt::Failed(Transport::Lost);
            let (Next::RetryIn(d), Next::RetryIn(same), Next::RetryIn(top)) = (
                a.next(&lost, retries),
                b.next(&lost, retries),
                plain.next(&lost, retries),
            ) else {
                panic!("not retried")
            };
            assert_eq!(d, same, "the same seed gives the same waits");
            assert!(
                d >= top / 2 && d <= top && d <= settings.max,
                "retry {retries}: {d:?} of {top:?}"
            );
        }
    }

    #[test]
    fn retry_after_in_seconds_is_read_and_a_date_is_left_to_the_backoff() {
        assert_eq!(parse_retry_after(" 1 "), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn settings_that_cannot_work_name_their_flag() {
        let bad = |s: RetrySettings| s.validate().unwrap_err();
        assert!(bad(RetrySettings {
            initial: Duration::ZERO,
            ..RetrySettings::default()
        })
        .contains("--retry-initial"));
        assert!(bad(RetrySettings {
            max: Duration::from_millis(1),
            ..RetrySettings::default()
        })
        .contains("--retry-max"));
        assert!(bad(RetrySettings {
            answer_timeout: Duration::ZERO,
            ..RetrySettings::default()
        })
        .contains("--answer-timeout"));
    }
}
