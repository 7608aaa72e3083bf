//! The batcher: a sans-IO state machine that turns a stream of records into flushable batches.
//!
//! The shell drives it like this (the consumer's loop does exactly this):
//!
//! 1. [`Batcher::assign`] each partition at the position read from the durable store.
//! 2. [`Batcher::push`] every record as it arrives. [`Push::Full`] hands the record back: the
//!    buffer is at its bound, so pause the source and push it again after a flush.
//! 3. Call [`Batcher::poll_batch`] until it returns `None`, and flush every batch it gives.
//! 4. Give every batch back with [`Batcher::on_flush_result`] and the outcome.
//! 5. Sleep until [`Batcher::poll_timeout`] (or the next record), then go to 3.
//!
//! Guarantees, each checked by the property tests at the bottom of this file:
//! - every record pushed comes out exactly once, written or dead-lettered, in order per
//!   partition (at most one batch per partition is in flight);
//! - a batch whose flush failed is retried after a backoff, never dropped;
//! - a batch rejected for a poison record is split in halves until the record is alone; only
//!   that record is dead-lettered and the rest is written;
//! - buffered records and bytes never exceed the configured capacity (a single record bigger
//!   than the byte capacity is still accepted into an empty buffer, or it could never pass);
//! - a record waits no longer than `max_age` before its batch is emitted, while the sink keeps
//!   up (nothing in flight on its partition).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::adaptive::{AdaptiveConfig, BatchSizer};
use crate::envelope::{ProducerSequence, RequestId};
use crate::error::ConfigError;
use crate::ledger::{OffsetLedger, Partition, Position};
use crate::retry::{RetryConfig, RetryPolicy};

/// Bytes counted per record on top of its payload (coordinates, bookkeeping).
pub const RECORD_OVERHEAD: usize = 48;

/// One record read from Kafka: its coordinates and its raw JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Kafka partition.
    pub partition: Partition,
    /// Kafka offset of the message that carried it.
    pub offset: i64,
    /// Index of the record inside that message.
    pub index: u32,
    /// Whether this is the message's last record (the position after it is the next message).
    pub last_in_message: bool,
    /// When the producer accepted the request, UTC microseconds.
    pub received_at_micros: i64,
    /// The request's id (zero for a message that is not an envelope).
    pub request_id: RequestId,
    /// Whether the id is [sequenced](RequestId::sequenced).
    pub sequenced: bool,
    /// The request's `Idempotency-Key`, shared by its records: the consumer writes the
    /// records of one key once.
    pub idempotency_key: Option<Arc<str>>,
    /// The Kafka message's key, timestamp and headers, shared by the message's records; only
    /// when a column maps them (`None` otherwise).
    pub kafka: Option<Arc<KafkaMeta>>,
    /// The record's bytes (JSON from a valid envelope, or a whole undecodable message).
    pub payload: Vec<u8>,
}

/// What a Kafka message carries besides its payload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaMeta {
    /// The message key.
    pub key: Option<Vec<u8>>,
    /// The message timestamp, milliseconds since the Unix epoch.
    pub timestamp_millis: Option<i64>,
    /// The headers, in order, each a name and an optional value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl KafkaMeta {
    /// Bytes it holds, roughly.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + 8
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 48)
                .sum::<usize>()
    }
}

impl Record {
    /// Where this record stands.
    pub fn position(&self) -> Position {
        Position::new(self.offset, self.index)
    }

    /// Its message's place in its producer's order, if the id is sequenced.
    pub fn producer_sequence(&self) -> Option<ProducerSequence> {
        self.sequenced.then(|| self.request_id.producer_sequence())
    }

    /// Where the record after it stands.
    pub fn next_position(&self) -> Position {
        if self.last_in_message {
            Position::new(self.offset + 1, 0)
        } else {
            Position::new(self.offset, self.index + 1)
        }
    }

    /// The bytes this record counts against the buffer's capacity. The Kafka metadata and
    /// idempotency key it shares with the other records of its message count in full for
    /// each: an upper bound.
    pub fn size(&self) -> usize {
        self.payload.len()
            + RECORD_OVERHEAD
            + self.kafka.as_ref().map_or(0, |k| k.size())
            + self.idempotency_key.as_ref().map_or(0, |k| k.len())
    }
}

/// A record in a batch: to be written as a row, dead-lettered with a reason, or skipped as a
/// copy of a message already written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The record.
    pub record: Record,
    /// `Some(reason)` when the record goes to the dead-letter table instead of the records table.
    pub dead_reason: Option<String>,
    /// A second copy of a message in Kafka (the producer's client stored it again after an
    /// answer was lost): it stands for the whole message, is written nowhere, and only moves
    /// the partition's position past it.
    pub copy: bool,
}

impl Entry {
    /// Whether the record is written as a row.
    pub fn is_row(&self) -> bool {
        self.dead_reason.is_none() && !self.copy
    }
}

/// Identifies a batch while it is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub u64);

/// A contiguous run of one partition's records to write in one transaction.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Hand this back with the batch.
    pub id: BatchId,
    /// The partition all entries belong to.
    pub partition: Partition,
    /// The partition's durable position before this batch: the store must still hold it
    /// (compare-and-set), or another consumer has moved on and this batch must not be written.
    pub start: Position,
    /// The position after this batch, to store in the same transaction.
    pub end: Position,
    /// The records, in partition order.
    pub entries: Vec<Entry>,
    /// 1 for the first try, 2 for the first retry, ...
    pub attempt: u32,
    /// When the oldest entry was pushed.
    pub oldest_pushed_at: Instant,
    /// Write only if the store still holds `start` (always, unless a test runs the
    /// `no-compare-and-set` mutation).
    pub check_start: bool,
    /// Move the position in the same transaction as the rows (always, unless a test runs the
    /// `position-before-rows` mutation).
    pub position_with_rows: bool,
}

impl Batch {
    /// Records to write as rows.
    pub fn rows(&self) -> impl Iterator<Item = &Record> {
        self.entries
            .iter()
            .filter(|e| e.is_row())
            .map(|e| &e.record)
    }

    /// Records to dead-letter, with their reasons.
    pub fn dead_letters(&self) -> impl Iterator<Item = (&Record, &str)> {
        self.entries
            .iter()
            .filter_map(|e| e.dead_reason.as_deref().map(|r| (&e.record, r)))
    }

    /// Number of rows to write.
    pub fn row_count(&self) -> usize {
        self.rows().count()
    }

    /// Copies skipped.
    pub fn copy_count(&self) -> usize {
        self.entries.iter().filter(|e| e.copy).count()
    }

    /// For each producer whose messages this batch ends (written or dead-lettered; not copies),
    /// the highest sequence among them: stored with the batch's position, so that a consumer
    /// reading the partition again from that position knows which later messages are copies.
    /// A message the batch holds only the first records of is not ended here. Within a
    /// partition a producer's messages that are not copies rise in sequence, so each batch's
    /// figure is at least the one stored before it.
    pub fn producer_sequences(&self) -> Vec<ProducerSequence> {
        let mut highest: BTreeMap<u64, u64> = BTreeMap::new();
        for e in &self.entries {
            if let Some(at) = e
                .record
                .producer_sequence()
                .filter(|_| e.record.last_in_message && !e.copy)
            {
                at.raise(&mut highest);
            }
        }
        highest
            .into_iter()
            .map(|(producer, sequence)| ProducerSequence { producer, sequence })
            .collect()
    }

    fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.record.size()).sum()
    }
}

/// How a flush went, as classified by the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Rows, dead letters and the new position are committed.
    Written,
    /// Nothing was committed, and the same batch may succeed later.
    Retriable {
        /// For logs and metrics.
        reason: String,
    },
    /// Nothing was committed because a record was rejected.
    Poison {
        /// The database's message, stored with the dead letter.
        reason: String,
        /// Index into `entries` of the rejected record when the database said which one
        /// (saves the bisection).
        culprit: Option<usize>,
    },
    /// Nothing was committed because these entries' values do not convert to their columns'
    /// types: dead-letter each with its reason, and flush the batch again at once.
    Unconvertible {
        /// Indexes into `entries`, each with its reason.
        records: Vec<(usize, String)>,
    },
    /// Nothing was committed because the stored position was no longer `start`: another
    /// consumer owns the partition now. Everything buffered for it is dropped.
    Fenced,
}

/// What [`Batcher::on_flush_result`] did with a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterFlush {
    /// Durable; the partition now stands at `position` (commit it to Kafka).
    Committed {
        /// The partition.
        partition: Partition,
        /// Its new durable position.
        position: Position,
        /// Rows written.
        rows: usize,
        /// Records dead-lettered.
        dead_letters: usize,
        /// Copies of messages already written, skipped.
        copies: usize,
    },
    /// Will be tried again, not before `at`.
    RetryAt {
        /// When.
        at: Instant,
        /// Which try failed.
        attempt: u32,
    },
    /// Split (or a record marked dead); the pieces are ready to flush now.
    Isolating,
    /// The partition was dropped; re-read its position and [`Batcher::assign`] it again.
    Fenced {
        /// The partition.
        partition: Partition,
    },
    /// The batch was not in flight (its partition was revoked or reassigned meanwhile):
    /// ignored.
    Stale,
}

/// Result of [`Batcher::push`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Push {
    /// Buffered.
    Accepted,
    /// Before the partition's position: already written, skipped.
    Skipped,
    /// The buffer is at capacity: pause the source; push this record again later.
    Full(Record),
    /// The partition is not assigned.
    Unassigned(Record),
}

/// Batcher settings.
#[derive(Clone, Debug, PartialEq)]
pub struct BatcherConfig {
    /// A batch never holds more bytes than this (unless one record alone is bigger).
    pub max_batch_bytes: usize,
    /// A record is emitted in a batch at most this long after it was pushed.
    pub max_age: Duration,
    /// Most records buffered, in all partitions, including batches in flight.
    pub capacity_records: usize,
    /// Most bytes buffered ([`Record::size`]), in all partitions, including batches in flight.
    pub capacity_bytes: usize,
    /// Batch size in records, adapted to flush latency.
    pub size: AdaptiveConfig,
    /// Backoff between retries of a failed batch.
    pub retry: RetryConfig,
    /// How many batches can be written at once (the consumer's Postgres connections). While
    /// fewer are in flight, a lane holding `size.min_records` is flushed without waiting for a
    /// full batch or `max_age`. Zero turns that off: batches then wait to be full or old.
    pub writers: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_batch_bytes: 8 << 20,
            max_age: Duration::from_millis(500),
            capacity_records: 200_000,
            capacity_bytes: 64 << 20,
            size: AdaptiveConfig::default(),
            retry: RetryConfig::default(),
            writers: 4,
        }
    }
}

impl BatcherConfig {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.size.validate()?;
        self.retry.validate()?;
        if self.max_batch_bytes == 0 {
            return Err(ConfigError::new(
                "batch-max-bytes",
                "must be greater than zero",
            ));
        }
        if self.max_age.is_zero() {
            return Err(ConfigError::new(
                "batch-max-age-ms",
                "must be greater than zero",
            ));
        }
        if self.capacity_records < self.size.max_records {
            return Err(ConfigError::new(
                "buffer-max-records",
                format!(
                    "must hold at least one full batch (batch-max-records = {}), got {}",
                    self.size.max_records, self.capacity_records
                ),
            ));
        }
        if self.capacity_bytes < self.max_batch_bytes {
            return Err(ConfigError::new(
                "buffer-max-bytes",
                format!(
                    "must hold at least one full batch (batch-max-bytes = {}), got {}",
                    self.max_batch_bytes, self.capacity_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// Counters and gauges for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatcherStats {
    /// Records buffered (pending, queued and in flight).
    pub buffered_records: usize,
    /// Bytes buffered.
    pub buffered_bytes: usize,
    /// Batches in flight.
    pub in_flight: usize,
    /// Current target batch size.
    pub target_batch_records: usize,
    /// Batches retried since start.
    pub retries: u64,
    /// Records marked dead since start.
    pub dead_lettered: u64,
    /// Records skipped as already written.
    pub skipped: u64,
}

#[derive(Debug)]
struct Pending {
    pushed_at: Instant,
    entry: Entry,
}

/// A batch waiting to be flushed again (a retry, or a piece of a split).
#[derive(Debug)]
struct Queued {
    entries: Vec<Entry>,
    attempt: u32,
    oldest_pushed_at: Instant,
}

#[derive(Debug)]
struct InFlight {
    id: BatchId,
    emitted_at: Instant,
    was_full: bool,
}

#[derive(Debug)]
struct Lane {
    /// The next position the source should deliver.
    next_push: Position,
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    queued: VecDeque<Queued>,
    in_flight: Option<InFlight>,
    not_before: Option<Instant>,
    /// Records and bytes held by this lane (pending, queued, in flight).
    records: usize,
    bytes: usize,
}

impl Lane {
    fn new(at: Position) -> Self {
        Lane {
            next_push: at,
            pending: VecDeque::new(),
            pending_bytes: 0,
            queued: VecDeque::new(),
            in_flight: None,
            not_before: None,
            records: 0,
            bytes: 0,
        }
    }

    fn age_deadline(&self, max_age: Duration) -> Option<Instant> {
        self.pending.front().map(|p| p.pushed_at + max_age)
    }
}

/// The batching state machine. See the module documentation for the driving loop.
#[derive(Debug)]
pub struct Batcher {
    config: BatcherConfig,
    lanes: BTreeMap<Partition, Lane>,
    ledger: OffsetLedger,
    sizer: BatchSizer,
    retry: RetryPolicy,
    next_id: u64,
    draining: bool,
    stats: BatcherStats,
}

impl Batcher {
    /// A batcher with no partitions assigned. Validate `config` first.
    pub fn new(config: BatcherConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let sizer = BatchSizer::new(config.size.clone());
        let retry = RetryPolicy::new(config.retry.clone());
        Ok(Batcher {
            config,
            lanes: BTreeMap::new(),
            ledger: OffsetLedger::new(),
            sizer,
            retry,
            next_id: 0,
            draining: false,
            stats: BatcherStats::default(),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &BatcherConfig {
        &self.config
    }

    /// Takes ownership of `partition`, which is durable up to `at`. Anything buffered for it
    /// before is dropped (it will be delivered again from `at`).
    pub fn assign(&mut self, partition: Partition, at: Position) {
        self.revoke(partition);
        self.lanes.insert(partition, Lane::new(at));
        self.ledger.set(partition, at);
    }

    /// Gives up `partition`: its buffered records are dropped (not durable, so whoever owns
    /// the partition next reads them again) and a batch in flight will come back as
    /// [`AfterFlush::Stale`]. Returns how many records were dropped.
    pub fn revoke(&mut self, partition: Partition) -> usize {
        self.ledger.remove(partition);
        match self.lanes.remove(&partition) {
            Some(lane) => {
                self.stats.buffered_records -= lane.records;
                self.stats.buffered_bytes -= lane.bytes;
                if lane.in_flight.is_some() {
                    self.stats.in_flight -= 1;
                }
                lane.records
            }
            None => 0,
        }
    }

    /// The position of the next record `partition` expects from the source (where to seek
    /// after dropping records the buffer had no room for).
    pub fn next_position(&self, partition: Partition) -> Option<Position> {
        self.lanes.get(&partition).map(|l| l.next_push)
    }

    /// The durable positions, per assigned partition.
    pub fn ledger(&self) -> &OffsetLedger {
        &self.ledger
    }

    /// Whether a record of `size` bytes ([`Record::size`]) would be accepted now.
    pub fn has_room_for(&self, size: usize) -> bool {
        let empty = self.stats.buffered_records == 0;
        empty
            || (self.stats.buffered_records < self.config.capacity_records
                && self.stats.buffered_bytes + size <= self.config.capacity_bytes)
    }

    /// Buffers a record to be written as a row.
    pub fn push(&mut self, record: Record, now: Instant) -> Push {
        self.push_entry(record, None, false, now)
    }

    /// Buffers a copy of a message already written ([`Entry::copy`]): `record` stands for the
    /// whole message (its index 0, marked last).
    pub fn push_copy(&mut self, record: Record, now: Instant) -> Push {
        self.push_entry(record, None, true, now)
    }

    /// Buffers a record that must go to the dead-letter table (for example a message that is
    /// not a valid envelope), keeping its place in the partition's order.
    pub fn push_dead_letter(&mut self, record: Record, reason: String, now: Instant) -> Push {
        self.push_entry(record, Some(reason), false, now)
    }

    fn push_entry(
        &mut self,
        record: Record,
        dead_reason: Option<String>,
        copy: bool,
        now: Instant,
    ) -> Push {
        let size = record.size();
        let Some(lane) = self.lanes.get(&record.partition) else {
            return Push::Unassigned(record);
        };
        if record.position() < lane.next_push {
            self.stats.skipped += 1;
            return Push::Skipped;
        }
        if !self.has_room_for(size) {
            return Push::Full(record);
        }
        if dead_reason.is_some() {
            self.stats.dead_lettered += 1;
        }
        let lane = self
            .lanes
            .get_mut(&record.partition)
            .expect("lane checked above");
        lane.next_push = record.next_position();
        lane.pending_bytes += size;
        lane.records += 1;
        lane.bytes += size;
        lane.pending.push_back(Pending {
            pushed_at: now,
            entry: Entry {
                record,
                dead_reason,
                copy,
            },
        });
        self.stats.buffered_records += 1;
        self.stats.buffered_bytes += size;
        Push::Accepted
    }

    /// Makes every buffered record due now (shutdown, or a revocation with a last flush), or
    /// returns to normal batching.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Whether nothing is buffered or in flight.
    pub fn is_empty(&self) -> bool {
        self.stats.buffered_records == 0
    }

    /// The next batch to flush, if one is due at `now`. Call until it returns `None`.
    ///
    /// A lane is due when a retry's backoff has passed, when it holds a full batch (the target
    /// size, or `max_batch_bytes`), when its oldest record has waited `max_age`, or while
    /// draining. Besides, while fewer than [`BatcherConfig::writers`] batches are in flight, the
    /// lane whose oldest record has waited longest is due as soon as it holds
    /// `size.min_records`: Postgres is not left idle while records wait, and batches still grow
    /// to the target whenever every writer is busy.
    pub fn poll_batch(&mut self, now: Instant) -> Option<Batch> {
        let target = self.sizer.target();
        let ready =
            |lane: &Lane| lane.in_flight.is_none() && lane.not_before.is_none_or(|t| t <= now);
        let full = |lane: &Lane| {
            lane.pending.len() >= target || lane.pending_bytes >= self.config.max_batch_bytes
        };
        let due = self
            .lanes
            .iter()
            .find(|(_, lane)| {
                ready(lane)
                    && (!lane.queued.is_empty()
                        || (!lane.pending.is_empty()
                            && (full(lane)
                                || lane
                                    .age_deadline(self.config.max_age)
                                    .is_some_and(|d| d <= now)
                                || self.draining)))
            })
            .map(|(p, lane)| (*p, lane.queued.is_empty() && full(lane)));
        let early = || {
            if self.stats.in_flight >= self.config.writers {
                return None;
            }
            self.lanes
                .iter()
                .filter(|(_, lane)| {
                    ready(lane)
                        && lane.queued.is_empty()
                        && lane.pending.len() >= self.config.size.min_records
                })
                .min_by_key(|(_, lane)| lane.pending.front().map(|p| p.pushed_at))
                .map(|(p, _)| (*p, false))
        };
        let (partition, was_full) = due.or_else(early)?;
        let lane = self.lanes.get_mut(&partition).expect("found above");
        let (entries, attempt, oldest_pushed_at) = if let Some(q) = lane.queued.pop_front() {
            (q.entries, q.attempt, q.oldest_pushed_at)
        } else {
            // Both choices above hold records here.
            let oldest = lane.pending.front().map(|p| p.pushed_at)?;
            let mut entries = Vec::with_capacity(target.min(lane.pending.len()));
            let mut bytes = 0;
            while let Some(p) = lane.pending.front() {
                let size = p.entry.record.size();
                let over = bytes + size > self.config.max_batch_bytes;
                if entries.len() >= target || (over && !entries.is_empty()) {
                    break;
                }
                bytes += size;
                let p = lane.pending.pop_front().expect("front checked");
                entries.push(p.entry);
            }
            lane.pending_bytes -= bytes;
            (entries, 1, oldest)
        };
        let start = self
            .ledger
            .position(partition)
            .expect("assigned lanes are in the ledger");
        let end = entries.last().map_or(start, |e| e.record.next_position());
        let id = BatchId(self.next_id);
        self.next_id += 1;
        lane.not_before = None;
        lane.in_flight = Some(InFlight {
            id,
            emitted_at: now,
            was_full,
        });
        self.stats.in_flight += 1;
        Some(Batch {
            id,
            partition,
            start,
            end,
            entries,
            attempt,
            oldest_pushed_at,
            check_start: true,
            position_with_rows: true,
        })
    }

    /// When [`Batcher::poll_batch`] may next have something without a new push or flush
    /// result: the earliest age deadline or retry time.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.lanes
            .values()
            .filter(|lane| lane.in_flight.is_none())
            .filter_map(|lane| {
                if !lane.queued.is_empty() {
                    lane.not_before
                } else {
                    let age = lane.age_deadline(self.config.max_age);
                    match (age, lane.not_before) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, None) => a,
                        (None, Some(_)) => None,
                    }
                }
            })
            .min()
    }

    /// Takes a flushed batch back with its outcome.
    pub fn on_flush_result(
        &mut self,
        batch: Batch,
        outcome: FlushOutcome,
        now: Instant,
    ) -> AfterFlush {
        let Some(lane) = self.lanes.get_mut(&batch.partition) else {
            return AfterFlush::Stale;
        };
        let Some(flight) = lane.in_flight.take_if(|f| f.id == batch.id) else {
            return AfterFlush::Stale;
        };
        self.stats.in_flight -= 1;
        match outcome {
            FlushOutcome::Written => {
                if self
                    .ledger
                    .advance(batch.partition, batch.start, batch.end)
                    .is_err()
                {
                    // Cannot happen with one batch in flight per lane; refuse to guess.
                    return self.fence(batch.partition);
                }
                let bytes = batch.bytes();
                lane.records -= batch.entries.len();
                lane.bytes -= bytes;
                self.stats.buffered_records -= batch.entries.len();
                self.stats.buffered_bytes -= bytes;
                self.sizer.on_success(
                    now.saturating_duration_since(flight.emitted_at),
                    flight.was_full,
                );
                AfterFlush::Committed {
                    partition: batch.partition,
                    position: batch.end,
                    rows: batch.row_count(),
                    dead_letters: batch.dead_letters().count(),
                    copies: batch.copy_count(),
                }
            }
            FlushOutcome::Retriable { .. } => self.requeue_after_failure(batch, now),
            FlushOutcome::Poison { reason, culprit } => {
                let mut entries = batch.entries;
                let live: Vec<usize> = (0..entries.len())
                    .filter(|&i| entries[i].is_row())
                    .collect();
                if live.len() == 1 {
                    // Rejected alone: this record is the bad one.
                    entries[live[0]].dead_reason = Some(reason);
                    self.stats.dead_lettered += 1;
                    lane.queued.push_front(Queued {
                        entries,
                        attempt: batch.attempt,
                        oldest_pushed_at: batch.oldest_pushed_at,
                    });
                    return AfterFlush::Isolating;
                }
                if live.is_empty() {
                    // Only dead letters (and copies) and still rejected: the shell's dead-letter write is
                    // broken, which no split can fix. Retry with backoff; never drop.
                    let batch = Batch { entries, ..batch };
                    return self.requeue_after_failure(batch, now);
                }
                // A culprit named by the database is only a hint: cut around it, so it is
                // tried alone, and a record is dead-lettered only when it fails by itself.
                // Without a hint, bisect.
                let cuts = match culprit.filter(|&c| c < entries.len() && entries[c].is_row()) {
                    Some(c) => vec![c, c + 1],
                    None => vec![live[live.len() / 2]],
                };
                let mut pieces = Vec::with_capacity(3);
                for cut in cuts.into_iter().rev() {
                    if cut > 0 && cut < entries.len() {
                        pieces.push(entries.split_off(cut));
                    }
                }
                pieces.push(entries);
                // `pieces` runs from the last piece to the first: push_front keeps order.
                for piece in pieces {
                    lane.queued.push_front(Queued {
                        entries: piece,
                        attempt: 1,
                        oldest_pushed_at: batch.oldest_pushed_at,
                    });
                }
                AfterFlush::Isolating
            }
            FlushOutcome::Unconvertible { records } => {
                let mut entries = batch.entries;
                let mut marked = 0u64;
                for (i, reason) in records {
                    if let Some(e) = entries.get_mut(i).filter(|e| e.is_row()) {
                        e.dead_reason = Some(reason);
                        marked += 1;
                    }
                }
                if marked == 0 {
                    // Names nothing it could dead-letter: retrying with a backoff is all that
                    // is safe (never spin, never drop).
                    let batch = Batch { entries, ..batch };
                    return self.requeue_after_failure(batch, now);
                }
                self.stats.dead_lettered += marked;
                lane.queued.push_front(Queued {
                    entries,
                    attempt: batch.attempt,
                    oldest_pushed_at: batch.oldest_pushed_at,
                });
                AfterFlush::Isolating
            }
            FlushOutcome::Fenced => self.fence(batch.partition),
        }
    }

    fn requeue_after_failure(&mut self, batch: Batch, now: Instant) -> AfterFlush {
        let delay = self.retry.delay(batch.attempt);
        self.sizer.on_failure();
        self.stats.retries += 1;
        let at = now + delay;
        let lane = self
            .lanes
            .get_mut(&batch.partition)
            .expect("caller checked the lane");
        lane.not_before = Some(at);
        lane.queued.push_front(Queued {
            entries: batch.entries,
            attempt: batch.attempt + 1,
            oldest_pushed_at: batch.oldest_pushed_at,
        });
        AfterFlush::RetryAt {
            at,
            attempt: batch.attempt,
        }
    }

    fn fence(&mut self, partition: Partition) -> AfterFlush {
        self.revoke(partition);
        AfterFlush::Fenced { partition }
    }

    /// Counters and gauges.
    pub fn stats(&self) -> BatcherStats {
        BatcherStats {
            target_batch_records: self.sizer.target(),
            ..self.stats.clone()
        }
    }
}

#[cfg(test)]
mod tests;
