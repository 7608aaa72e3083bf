//! The producer's memory of recent `Idempotency-Key`s: which body each key was sent with, so
//! that a key reused for a *different* body is refused (`422`) instead of being written under
//! a key the consumer has already written once (it would keep the first body and skip the
//! second, only counting it in `spillway_consumer_repeated_records_skipped_total`).
//!
//! Pure and synchronous: time comes in as `now`, and nothing here reads a clock or does IO.
//! Bounded twice: at most `capacity` keys (the oldest is forgotten first) and each for at most
//! `window` (the consumer's key retention, so the producer does not refuse a key the consumer
//! would write again). Within one process only: another producer, or this one after a restart,
//! does not know the key, and then only the consumer's once-per-key guard holds.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ingest::BodyKind;

/// What a request's key and body are to the keys remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUse {
    /// The key is not remembered: it is now, with this body.
    New(Ticket),
    /// The key was remembered with this same body: a retry, produced again as usual (the
    /// consumer writes one key's records once).
    Repeat,
    /// The key was remembered with another body, first handed to Kafka `since` ago. Refused.
    Conflict {
        /// How long ago the key was first handed to Kafka.
        since: Duration,
    },
}

impl KeyUse {
    /// The `outcome` label of `spillway_producer_idempotency_keys_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            KeyUse::New(_) => "new",
            KeyUse::Repeat => "repeat",
            KeyUse::Conflict { .. } => "conflict",
        }
    }
}

/// Names the entry a [`KeyUse::New`] made, so that only that entry can be taken back
/// ([`RecentKeys::forget`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket(u64);

#[derive(Debug)]
struct Entry {
    digest: u64,
    at: Instant,
    serial: u64,
    /// Whether a repeat was handed to Kafka since: then the key may be written even if the
    /// first attempt certainly was not, and it is never forgotten early.
    repeated: bool,
}

/// The keys handed to Kafka recently, each with its body's digest.
#[derive(Debug)]
pub struct RecentKeys {
    capacity: usize,
    window: Duration,
    by_key: HashMap<Arc<str>, Entry>,
    /// Insertion order (by serial), which is also time order (`now` never goes back here).
    order: BTreeMap<u64, Arc<str>>,
    next_serial: u64,
    latest: Option<Instant>,
}

impl RecentKeys {
    /// Remembers at most `capacity` keys (at least 1), each for `window`.
    pub fn new(capacity: usize, window: Duration) -> Self {
        RecentKeys {
            capacity: capacity.max(1),
            window,
            by_key: HashMap::new(),
            order: BTreeMap::new(),
            next_serial: 0,
            latest: None,
        }
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Called as a request with `key` and a body of `digest` is about to be handed to Kafka:
    /// a key not remembered (or remembered longer than the window) is remembered with this
    /// digest; one remembered with the same digest is a repeat; with another, a conflict
    /// (nothing changes). A repeat does not extend the key's time: the window counts from the
    /// first time the key was handed to Kafka, as the consumer's retention does.
    pub fn remember(&mut self, key: &str, digest: u64, now: Instant) -> KeyUse {
        let now = self.expire(now);
        if let Some(entry) = self.by_key.get_mut(key) {
            if entry.digest == digest {
                entry.repeated = true;
                return KeyUse::Repeat;
            }
            return KeyUse::Conflict {
                since: now.saturating_duration_since(entry.at),
            };
        }
        while self.by_key.len() >= self.capacity {
            if !self.forget_oldest() {
                break;
            }
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let key: Arc<str> = Arc::from(key);
        self.order.insert(serial, Arc::clone(&key));
        self.by_key.insert(
            key,
            Entry {
                digest,
                at: now,
                serial,
                repeated: false,
            },
        );
        KeyUse::New(Ticket(serial))
    }

    /// Takes back the entry `ticket` made, when its request certainly wrote nothing (the Kafka
    /// client never took the message, or the broker refused it as too large), so the client
    /// may use the key for another body. Kept if a repeat was handed to Kafka since (that one
    /// may be written), or if the entry is gone already.
    pub fn forget(&mut self, key: &str, ticket: Ticket) {
        let ours = self
            .by_key
            .get(key)
            .is_some_and(|e| e.serial == ticket.0 && !e.repeated);
        if ours {
            self.by_key.remove(key);
            self.order.remove(&ticket.0);
        }
    }

    /// Forgets the keys remembered for the whole window by `now`, and returns the time to use
    /// (`now`, or the latest time seen if `now` is earlier: callers read the clock before they
    /// take their turn, so their times may arrive slightly out of order).
    pub fn expire(&mut self, now: Instant) -> Instant {
        let now = self.latest.map_or(now, |latest| latest.max(now));
        self.latest = Some(now);
        while let Some((_, key)) = self.order.first_key_value() {
            let expired = self
                .by_key
                .get(key)
                .is_none_or(|e| now.saturating_duration_since(e.at) >= self.window);
            if !expired || !self.forget_oldest() {
                break;
            }
        }
        now
    }

    fn forget_oldest(&mut self) -> bool {
        match self.order.pop_first() {
            Some((_, key)) => {
                self.by_key.remove(&key);
                true
            }
            None => false,
        }
    }
}

/// A 64-bit digest of a request's decoded body and how it holds its records (the same bytes
/// read as JSON or as NDJSON are different records), keyed by the process's `hasher` so that
/// no client can craft two bodies with one digest.
pub fn body_digest(hasher: &RandomState, kind: BodyKind, body: &[u8]) -> u64 {
    let mut h = hasher.build_hasher();
    h.write_u8(match kind {
        BodyKind::Json => 0,
        BodyKind::NdJson => 1,
    });
    h.write(body);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    fn is_new(u: KeyUse) -> bool {
        matches!(u, KeyUse::New(_))
    }

    #[test]
    fn a_key_is_new_then_a_repeat_with_its_body_and_a_conflict_with_another() {
        let t = Instant::now();
        let mut keys = RecentKeys::new(10, HOUR);
        assert!(is_new(keys.remember("order-1", 7, t)));
        assert_eq!(keys.remember("order-1", 7, at(t, 1)), KeyUse::Repeat);
        assert_eq!(
            keys.remember("order-1", 8, at(t, 5)),
            KeyUse::Conflict {
                since: Duration::from_secs(5)
            }
        );
        // A conflict changes nothing: the first body still is the key's.
        assert_eq!(keys.remember("order-1", 7, at(t, 6)), KeyUse::Repeat);
        assert!(is_new(keys.remember("order-2", 8, at(t, 6))));
        assert_eq!(keys.len(), 2);
    }

    #[test]
    fn a_key_is_forgotten_once_the_window_has_passed_since_it_was_first_sent() {
        let t = Instant::now();
        let mut keys = RecentKeys::new(10, HOUR);
        assert!(is_new(keys.remember("a", 1, t)));
        // A repeat does not extend the window.
        assert_eq!(keys.remember("a", 1, at(t, 3000)), KeyUse::Repeat);
        assert!(matches!(
            keys.remember("a", 2, at(t, 3599)),
            KeyUse::Conflict { .. }
        ));
        assert!(is_new(keys.remember("a", 2, at(t, 3600))), "window over");
        assert_eq!(keys.remember("a", 2, at(t, 3601)), KeyUse::Repeat);
        assert!(is_new(keys.remember("b", 1, at(t, 3700))));
        keys.expire(at(t, 3600 + 3600));
        assert_eq!(keys.len(), 1, "`a` (again at 3600 s) is gone, `b` is not");
        keys.expire(at(t, 3700 + 3600));
        assert!(keys.is_empty());
    }

    #[test]
    fn past_the_bound_the_oldest_key_is_forgotten_first() {
        let t = Instant::now();
        let mut keys = RecentKeys::new(3, HOUR);
        for (n, key) in ["a", "b", "c", "d"].iter().enumerate() {
            assert!(is_new(keys.remember(key, 1, at(t, n as u64))));
            assert!(keys.len() <= 3);
        }
        // `a` was forgotten for `d`: another body is accepted for it (and `b` goes).
        assert!(is_new(keys.remember("a", 2, at(t, 10))));
        assert!(is_new(keys.remember("b", 2, at(t, 11))));
        assert!(matches!(
            keys.remember("d", 2, at(t, 12)),
            KeyUse::Conflict { .. }
        ));
        assert_eq!(keys.len(), 3);
    }

    #[test]
    fn a_clock_reading_that_arrives_late_counts_as_the_latest() {
        let t = Instant::now();
        let mut keys = RecentKeys::new(10, HOUR);
        assert!(is_new(keys.remember("a", 1, at(t, 100))));
        assert!(is_new(keys.remember("b", 1, at(t, 50))));
        keys.expire(at(t, 100 + 3600));
        assert!(keys.is_empty(), "`b` counts from 100 s, as `a`");
    }

    #[test]
    fn only_an_attempt_that_certainly_wrote_nothing_is_taken_back() {
        let t = Instant::now();
        let mut keys = RecentKeys::new(10, HOUR);
        let KeyUse::New(first) = keys.remember("a", 1, t) else {
            panic!("new")
        };
        keys.forget("a", first);
        assert!(keys.is_empty());
        assert!(
            is_new(keys.remember("a", 2, at(t, 1))),
            "another body is accepted"
        );

        // After a repeat went to Kafka, the key may be written: it stays.
        let KeyUse::New(second) = keys.remember("b", 1, at(t, 2)) else {
            panic!("new")
        };
        assert_eq!(keys.remember("b", 1, at(t, 3)), KeyUse::Repeat);
        keys.forget("b", second);
        assert!(matches!(
            keys.remember("b", 2, at(t, 4)),
            KeyUse::Conflict { .. }
        ));

        // A ticket only takes back its own entry, not a later one of the same key.
        let t2 = at(t, 10_000);
        let KeyUse::New(old) = keys.remember("c", 1, t2) else {
            panic!("new")
        };
        assert!(is_new(keys.remember("c", 2, t2 + HOUR)));
        keys.forget("c", old);
        assert_eq!(keys.remember("c", 2, t2 + HOUR), KeyUse::Repeat);
    }

    #[test]
    fn digests_tell_bodies_and_their_kinds_apart() {
        let h = RandomState::new();
        let d = |kind, body: &[u8]| body_digest(&h, kind, body);
        assert_eq!(d(BodyKind::Json, b"[1,2]"), d(BodyKind::Json, b"[1,2]"));
        assert_ne!(d(BodyKind::Json, b"[1,2]"), d(BodyKind::Json, b"[1,3]"));
        assert_ne!(d(BodyKind::Json, b"[1,2]"), d(BodyKind::NdJson, b"[1,2]"));
    }
}
