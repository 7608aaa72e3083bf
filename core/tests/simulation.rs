//! Deterministic simulation of the consumer's state machine (`ConsumerMachine`), the code the
//! `spillway-consumer` binary runs, against a simulated Kafka and a simulated Postgres, with
//! simulated time and faults drawn from a seed.
//!
//! - Kafka: partitions with logs that grow while the run goes on; a consumer group whose
//!   rebalances happen at random points and may leave partitions unowned; per-member fetchers
//!   whose pause flag outlives a revocation (as librdkafka's may); seeks that fail or land late;
//!   stale messages redelivered with old epochs; fetch errors; retention that deletes records
//!   nobody read yet (a real gap).
//! - Producers: one to three Kafka clients that number their messages (sequenced request ids,
//!   in each client's order within a partition), and sometimes an old producer whose ids are not
//!   sequenced (but may look like a live client's). *Copies*: a client stores one of a
//!   partition's last few sequenced messages a second time (librdkafka re-sends a message whose
//!   answer was lost), the same bytes later in the log, maybe after later messages of that
//!   client. A copy's records are its original's.
//! - Postgres: a positions table with the compare-and-set, storing with each position the
//!   batch's producers' sequences (the highest per producer, in the same transaction, so also
//!   when the answer is lost or a hung transaction commits late) and returning them with the
//!   positions read; rows and dead letters; outages;
//!   connections lost before or after the commit (the commit's fate unknown to the consumer);
//!   transactions that hang past the flush deadline and commit (or not) later; records the COPY
//!   rejects by content, with right, wrong or no hints; records with a value that does not
//!   convert to its typed column, which the shell names before it takes a connection; a
//!   dead-letter insert that fails.
//! - Consumers: crashes (all state lost, restart from the stored positions), and a member
//!   stalled (SIGSTOP) while the group gives its partitions to another: two consumers that both
//!   believe they own a partition.
//!
//! Each seed draws its own fault *mix* (swarm testing) and its own timing. After every step the
//! simulator checks: no record is written twice, a record being known by its original message
//! (so writing a copy is writing twice); no message skipped as a copy is an original; only bad
//! records are dead-lettered; no stored position passes a record that is neither written nor
//! dead-lettered (a copy's records by its original's); no consumer buffers past its bound.
//! After the faults stop it checks liveness: within a bounded simulated time every partition
//! is written to its end (or stopped exactly at a gap retention made), then a shutdown drains
//! and exits. Evidence counts say how many copies Kafka held, how many the consumers skipped,
//! and how many of those only the stored sequences could tell.
//!
//! `SPILLWAY_SIM_SEEDS=N` runs N seeds (default 1000); `SPILLWAY_SIM_SEED=S` replays one seed;
//! `SPILLWAY_SIM_MUTATE=<name>` runs the machine with a known bug (see `Mutation::ALL`). A
//! failure prints the seed, the fault mix and the last steps of the trace.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spillway_core::{
    AdaptiveConfig, Batch, BatcherConfig, Command, ConsumerConfig, ConsumerMachine, Envelope,
    EpochTags, Exit, FlushResult, Jitter, KafkaCommand, Message, Mutation, Notice, PartitionLag,
    Phase, Position, ProducerSequence, RequestId, RetryConfig, StoredPosition,
};

type Partition = i32;

/// SplitMix64: the simulator's only source of randomness.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// This seed's fault mix: each fault is on or off, with its own rate.
#[derive(Clone, Debug)]
struct Faults {
    pg_outages: bool,
    lost_before_commit: f64,
    lost_after_commit: f64,
    hang: f64,
    poison: f64,
    /// Records with a value that does not convert to its typed column: found by the shell's
    /// encoding, before a connection is taken.
    unconvertible: f64,
    wrong_hint: f64,
    dead_letter_insert_fails: f64,
    undecodable: f64,
    seek_fails: f64,
    seek_late: f64,
    stale_redelivery: f64,
    fetch_errors: f64,
    rebalances: f64,
    orphaning: f64,
    /// A rebalance gives one share to a member that is gone (Tansu keeps a SIGKILLed member's
    /// assignment): those partitions stay unowned while every live member owns others.
    ghosting: f64,
    crashes: f64,
    zombies: f64,
    retention: f64,
    /// A producer's client stores a message a second time (librdkafka re-sends it after its
    /// answer was lost): a copy of a recent sequenced message, later in the same partition.
    copies: f64,
}

impl Faults {
    fn draw(rng: &mut Rng) -> Self {
        let mut on = |p: f64| if rng.chance(0.5) { p } else { 0.0 };
        let mut f = Faults {
            pg_outages: false,
            lost_before_commit: on(0.05),
            lost_after_commit: on(0.05),
            hang: on(0.02),
            poison: on(0.03),
            unconvertible: on(0.03),
            wrong_hint: on(0.3),
            dead_letter_insert_fails: on(0.3),
            undecodable: on(0.03),
            seek_fails: on(0.2),
            seek_late: on(0.2),
            stale_redelivery: on(0.02),
            fetch_errors: on(0.1),
            rebalances: on(0.004),
            orphaning: on(0.5),
            ghosting: on(0.5),
            crashes: on(0.001),
            zombies: on(0.002),
            retention: on(0.0005),
            copies: on(0.01),
        };
        f.pg_outages = rng.chance(0.5);
        f
    }

    fn calm() -> Self {
        Faults {
            pg_outages: false,
            lost_before_commit: 0.0,
            lost_after_commit: 0.0,
            hang: 0.0,
            poison: 0.0,
            unconvertible: 0.0,
            wrong_hint: 0.0,
            dead_letter_insert_fails: 0.0,
            undecodable: 0.0,
            seek_fails: 0.0,
            seek_late: 0.0,
            stale_redelivery: 0.0,
            fetch_errors: 0.0,
            rebalances: 0.0,
            orphaning: 0.0,
            ghosting: 0.0,
            crashes: 0.0,
            zombies: 0.0,
            retention: 0.0,
            copies: 0.0,
        }
    }
}

/// What a record is, for the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Good,
    /// The COPY refuses it.
    Poison,
    /// A value of it does not convert to its column's type.
    Unconvertible,
    /// Not a record: an undecodable message, dead-lettered whole.
    Undecodable,
}

#[derive(Debug)]
struct LogMessage {
    payload: Vec<u8>,
    kinds: Vec<Kind>,
    /// The offset of the message this one is a copy of; its own offset for an original. A
    /// copy's records are the original's: written once, whichever offset they were read at.
    origin: i64,
    /// Its producer's client and sequence, if the envelope is sequenced.
    order: Option<ProducerSequence>,
}

#[derive(Debug, Default)]
struct Log {
    /// Offsets below this were deleted by retention.
    start: i64,
    messages: Vec<LogMessage>,
}

impl Log {
    fn end(&self) -> i64 {
        self.messages.len() as i64
    }
}

/// A record's identity: its partition, the offset of its *original* message, its index. A copy
/// of a message has the same keys as the original.
type Key = (Partition, i64, u32);

#[derive(Debug)]
enum Fate {
    /// Answers at `at` with the result of applying the transaction then.
    Apply,
    /// Answers at `at`: connection lost, nothing applied.
    LostBefore,
    /// Applies at `at` but answers as if the connection was lost.
    LostAfter,
    /// Never answers; the shell's deadline fires at `at`. Applies at `apply_at`, if ever.
    Hang { apply_at: Option<Instant> },
}

#[derive(Debug)]
struct Transaction {
    member: usize,
    incarnation: u64,
    batch: Arc<Batch>,
    at: Instant,
    fate: Fate,
}

#[derive(Debug, Default)]
struct Postgres {
    positions: BTreeMap<Partition, Position>,
    /// Per partition and producer, the highest sequence stored with a position (GREATEST, in
    /// the position's transaction).
    producers: BTreeMap<Partition, BTreeMap<u64, u64>>,
    rows: BTreeMap<Key, u32>,
    dead: BTreeMap<Key, u32>,
    down_until: Option<Instant>,
    transactions: Vec<Transaction>,
    /// Per partition: every record below this position was checked present.
    checked_to: BTreeMap<Partition, Position>,
}

#[derive(Debug)]
enum Event {
    Assigned(Vec<Partition>),
    Revoked(Vec<Partition>),
    SeekDone(Partition, u64),
    SeekFailed(Partition, u64),
    Message(Message),
    Positions(Vec<StoredPosition>),
    PositionsFailed,
    Flushed(spillway_core::BatchId, FlushResult),
    GroupView(Vec<PartitionLag>),
}

/// One consumer process: its machine, its Kafka thread's state, its inbox.
#[derive(Debug)]
struct Member {
    incarnation: u64,
    machine: ConsumerMachine,
    tags: EpochTags,
    assigned: BTreeSet<Partition>,
    /// Kafka's pause flags: they outlive revocations.
    paused: BTreeSet<Partition>,
    fetch: BTreeMap<Partition, i64>,
    to_kafka: VecDeque<(Instant, KafkaCommand)>,
    inbox: VecDeque<(Instant, Event)>,
    stalled_until: Option<Instant>,
    exited: Option<Exit>,
    /// Per partition, the stored position the machine last started reading from (evidence
    /// that a copy was recognised by the stored sequences, not by what the member read).
    read_from: BTreeMap<Partition, Position>,
}

#[derive(Debug)]
struct Failure {
    what: String,
}

struct Sim {
    rng: Rng,
    now: Instant,
    start: Instant,
    faults: Faults,
    active: Faults,
    config: ConsumerConfig,
    logs: BTreeMap<Partition, Log>,
    pg: Postgres,
    members: Vec<Option<Member>>,
    committed: BTreeMap<Partition, i64>,
    rebalance_at: Option<Instant>,
    restart_at: Vec<Instant>,
    next_incarnation: u64,
    produced: usize,
    to_produce: usize,
    /// The producers' Kafka clients: each one's id and next sequence.
    producers: Vec<ProducerSequence>,
    /// The share of messages from an old producer, whose request ids are not sequenced.
    unsequenced: f64,
    trace: VecDeque<String>,
    counts: BTreeMap<&'static str, u64>,
    /// A broken invariant found while performing a command.
    violation: Option<String>,
}

const TRACE_LINES: usize = 150;
const FLUSH_DEADLINE: Duration = Duration::from_secs(5);
const FAULT_PHASE: Duration = Duration::from_secs(40);
const LIVENESS_BOUND: Duration = Duration::from_secs(120);

impl Sim {
    fn new(seed: u64, mutation: Option<Mutation>) -> Self {
        let mut rng = Rng(seed);
        let faults = Faults::draw(&mut rng);
        let partitions = 1 + rng.below(3) as i32;
        let max_batch = 2 + rng.below(8) as usize;
        let capacity = max_batch * (2 + rng.below(4) as usize);
        // Half the seeds bound the buffer by bytes (records are about 60-80 bytes with their
        // overhead), the other half by records.
        let (max_batch_bytes, capacity_bytes) = if rng.chance(0.5) {
            let batch = 200 + rng.below(400) as usize;
            (batch, batch * (2 + rng.below(3) as usize))
        } else {
            (16 << 10, 64 << 10)
        };
        let config = ConsumerConfig {
            batcher: BatcherConfig {
                max_batch_bytes,
                max_age: Duration::from_millis(50 + rng.below(200)),
                capacity_records: capacity,
                capacity_bytes,
                size: AdaptiveConfig {
                    min_records: 1,
                    max_records: max_batch,
                    initial_records: max_batch,
                    latency_target: Duration::from_millis(250),
                    increase_step: 1,
                    decrease_factor: 0.5,
                },
                retry: RetryConfig {
                    initial: Duration::from_millis(20),
                    max: Duration::from_secs(2),
                    multiplier: 2.0,
                    jitter: Jitter::Equal,
                    seed,
                },
                // A third of the seeds wait for full or old batches; the rest flush early
                // while one or two writers would otherwise be idle (no draw: the faults and
                // the rest of a seed's run stay as they were).
                writers: (seed % 3) as usize,
            },
            shutdown_timeout: Duration::from_secs(30),
            orphan_timeout: Duration::from_secs(5),
            view_interval: Duration::from_secs(2),
            mutation,
        };
        // Never 0, as the producer's; drawn from the whole range, so one may have the high bit
        // set (stored as a bigint by the real consumer).
        let producers = (0..1 + rng.below(3))
            .map(|_| ProducerSequence {
                producer: rng.next().max(1),
                sequence: 0,
            })
            .collect();
        let unsequenced = if rng.chance(0.5) { 0.2 } else { 0.0 };
        let start = Instant::now();
        let mut sim = Sim {
            to_produce: 40 + rng.below(160) as usize,
            rng,
            now: start,
            start,
            active: faults.clone(),
            faults,
            config,
            logs: (0..partitions).map(|p| (p, Log::default())).collect(),
            pg: Postgres::default(),
            members: Vec::new(),
            committed: BTreeMap::new(),
            rebalance_at: None,
            restart_at: Vec::new(),
            next_incarnation: 0,
            produced: 0,
            producers,
            unsequenced,
            trace: VecDeque::new(),
            counts: BTreeMap::new(),
            violation: None,
        };
        let members = 1 + sim.rng.below(2);
        for _ in 0..members {
            sim.join();
        }
        sim
    }

    fn t(&self) -> f64 {
        self.now.duration_since(self.start).as_secs_f64()
    }

    fn log(&mut self, line: String) {
        let line = format!("{:9.3}s {line}", self.t());
        if self.trace.len() == TRACE_LINES {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    fn join(&mut self) {
        let machine = ConsumerMachine::new(self.config.clone()).expect("valid simulation config");
        let tags = EpochTags::new(&self.config);
        self.next_incarnation += 1;
        self.members.push(Some(Member {
            incarnation: self.next_incarnation,
            machine,
            tags,
            assigned: BTreeSet::new(),
            paused: BTreeSet::new(),
            fetch: BTreeMap::new(),
            to_kafka: VecDeque::new(),
            inbox: VecDeque::new(),
            stalled_until: None,
            exited: None,
            read_from: BTreeMap::new(),
        }));
        let m = self.members.len() - 1;
        self.log(format!("m{m} joins the group"));
        self.rebalance_at = Some(self.now + self.rng.millis(100, 1_500));
    }

    fn live(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&m| self.members[m].as_ref().is_some_and(|x| x.exited.is_none()))
            .collect()
    }

    /// Eager rebalance: everything revoked, then assigned round-robin among the members that
    /// are not stalled. With the orphaning fault, one member gets nothing and its share stays
    /// unowned until somebody rejoins.
    fn rebalance(&mut self) {
        self.rebalance_at = None;
        let live = self.live();
        for &m in &live {
            let member = self.members[m].as_mut().expect("live");
            let revoked: Vec<Partition> =
                std::mem::take(&mut member.assigned).into_iter().collect();
            for p in &revoked {
                member.tags.forget(*p);
                member.fetch.remove(p);
            }
            if !revoked.is_empty() {
                member.inbox.push_back((self.now, Event::Revoked(revoked)));
            }
        }
        let eligible: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&m| {
                self.members[m]
                    .as_ref()
                    .is_some_and(|x| x.stalled_until.is_none())
            })
            .collect();
        if eligible.is_empty() {
            return;
        }
        let orphan = if self.rng.chance(self.active.orphaning) {
            Some(eligible[self.rng.below(eligible.len() as u64) as usize])
        } else {
            None
        };
        let ghost = self.rng.chance(self.active.ghosting);
        let slots = eligible.len() + usize::from(ghost);
        let mut shares: BTreeMap<usize, Vec<Partition>> = BTreeMap::new();
        let partitions: Vec<Partition> = self.logs.keys().copied().collect();
        let offset = self.rng.below(slots as u64) as usize;
        for (i, p) in partitions.into_iter().enumerate() {
            // The last slot, with the ghosting fault, is the gone member's.
            let Some(&m) = eligible.get((i + offset) % slots) else {
                continue;
            };
            if Some(m) != orphan {
                shares.entry(m).or_default().push(p);
            }
        }
        self.log(format!(
            "rebalance: {shares:?} (orphaned member: {orphan:?}, a gone member's share: {ghost})"
        ));
        if orphan.is_some() {
            self.count("orphaning assignments");
        }
        if ghost {
            self.count("shares given to a gone member");
        }
        for m in eligible {
            let share = shares.remove(&m).unwrap_or_default();
            let member = self.members[m].as_mut().expect("live");
            for &p in &share {
                member.assigned.insert(p);
            }
            member.inbox.push_back((self.now, Event::Assigned(share)));
        }
    }

    fn produce(&mut self) {
        if self.produced >= self.to_produce || !self.rng.chance(0.3) {
            return;
        }
        let p = self.rng.below(self.logs.len() as u64) as i32;
        let origin = self.logs[&p].end();
        let message = if self.rng.chance(self.active.undecodable) {
            LogMessage {
                payload: b"not an envelope".to_vec(),
                kinds: vec![Kind::Undecodable],
                origin,
                order: None,
            }
        } else {
            let n = 1 + self.rng.below(4) as usize;
            let kinds: Vec<Kind> = (0..n)
                .map(|_| {
                    if self.rng.chance(self.active.poison) {
                        Kind::Poison
                    } else if self.rng.chance(self.active.unconvertible) {
                        Kind::Unconvertible
                    } else {
                        Kind::Good
                    }
                })
                .collect();
            let bodies: Vec<Vec<u8>> = kinds
                .iter()
                .enumerate()
                .map(|(i, k)| match k {
                    Kind::Poison => b"poison".to_vec(),
                    Kind::Unconvertible => b"unconvertible".to_vec(),
                    _ => format!("{{\"n\":{}}}", self.produced * 10 + i).into_bytes(),
                })
                .collect();
            let client = self.rng.below(self.producers.len() as u64) as usize;
            let (request_id, order) = if self.rng.chance(self.unsequenced) {
                // An old producer's id is 128 random bits, which may read as a live client's id
                // with a high sequence: only the flag says whether it is sequenced.
                let lookalike = ProducerSequence {
                    producer: self.producers[client].producer,
                    sequence: u64::MAX - self.produced as u64,
                };
                (RequestId::sequenced(lookalike), None)
            } else {
                // One client's messages reach every partition in its order (it numbers them
                // under the lock it hands them to Kafka with).
                let at = self.producers[client];
                self.producers[client].sequence += 1;
                (RequestId::sequenced(at), Some(at))
            };
            let envelope = Envelope {
                received_at_micros: 1,
                request_id,
                sequenced: order.is_some(),
                idempotency_key: None,
                source: None,
                records: bodies.iter().map(Vec::as_slice).collect(),
            };
            LogMessage {
                payload: envelope.encode(),
                kinds,
                origin,
                order,
            }
        };
        *self.counts.entry("records produced").or_default() += message.kinds.len() as u64;
        self.logs
            .get_mut(&p)
            .expect("partition")
            .messages
            .push(message);
        self.produced += 1;
    }

    /// A producer's client stores one of a partition's last few sequenced messages again
    /// (librdkafka re-sends a message whose answer was lost, at a new epoch): the same bytes,
    /// after the original and maybe after later messages of the same client. Never
    /// acknowledged on its own: its records are the original's.
    fn store_copy(&mut self) {
        if !self.rng.chance(self.active.copies) {
            return;
        }
        let p = self.rng.below(self.logs.len() as u64) as i32;
        let log = self.logs.get_mut(&p).expect("partition");
        let recent = log
            .messages
            .len()
            .saturating_sub(1 + self.rng.below(5) as usize);
        let sequenced: Vec<usize> = (recent..log.messages.len())
            .filter(|&o| log.messages[o].order.is_some())
            .collect();
        if sequenced.is_empty() {
            return;
        }
        let of = sequenced[self.rng.below(sequenced.len() as u64) as usize];
        let original = &log.messages[of];
        let copy = LogMessage {
            payload: original.payload.clone(),
            kinds: original.kinds.clone(),
            origin: original.origin,
            order: original.order,
        };
        let (origin, at) = (copy.origin, log.end());
        log.messages.push(copy);
        self.log(format!(
            "partition {p}: offset {at} is a copy of offset {origin}"
        ));
        self.count("copies in kafka");
    }

    /// Retention deletes records after the stored position that may not be read yet.
    fn retention(&mut self) {
        if !self.rng.chance(self.active.retention) {
            return;
        }
        let p = self.rng.below(self.logs.len() as u64) as i32;
        let stored = self.stored(p);
        let log = self.logs.get_mut(&p).expect("partition");
        let lag = log.end() - stored.offset.max(log.start);
        if lag <= 1 {
            return;
        }
        let new_start = stored.offset.max(log.start) + 1 + (self.rng.below(lag as u64) as i64);
        let new_start = new_start.min(log.end());
        log.start = new_start;
        self.log(format!(
            "retention deletes partition {p} below offset {new_start}"
        ));
        self.count("retention gaps");
    }

    fn faults_in_the_group(&mut self) {
        let live = self.live();
        if self.rng.chance(self.active.rebalances) && self.rebalance_at.is_none() {
            self.rebalance_at = Some(self.now + self.rng.millis(0, 500));
            self.count("rebalances");
        }
        if self.rng.chance(self.active.crashes) && !live.is_empty() {
            let m = live[self.rng.below(live.len() as u64) as usize];
            self.members[m] = None;
            self.log(format!("m{m} crashes (all its state is lost)"));
            self.count("crashes");
            self.rebalance_at = Some(self.now + self.rng.millis(500, 3_000));
            let restart = self.now + self.rng.millis(100, 4_000);
            self.restart_at.push(restart);
        }
        if self.rng.chance(self.active.zombies) && live.len() > 1 {
            let m = live[self.rng.below(live.len() as u64) as usize];
            if let Some(member) = self.members[m].as_mut() {
                if member.stalled_until.is_none() {
                    let until = self.now + self.rng.millis(1_000, 8_000);
                    member.stalled_until = Some(until);
                    self.log(format!(
                        "m{m} stalls (SIGSTOP); the group moves on without it"
                    ));
                    self.count("zombies");
                    self.rebalance_at = Some(self.now + self.rng.millis(100, 1_000));
                }
            }
        }
        if self.active.pg_outages && self.pg.down_until.is_none() && self.rng.chance(0.002) {
            let until = self.now + self.rng.millis(500, 10_000);
            self.pg.down_until = Some(until);
            self.log("postgres goes down".into());
            self.count("postgres outages");
        }
    }

    fn pg_down(&self) -> bool {
        self.pg.down_until.is_some_and(|t| t > self.now)
    }

    /// What the transaction does to the tables, as the real flush's SQL would. `member` flushed
    /// it (`usize::MAX` when it is gone), for the evidence counts.
    fn apply(&mut self, batch: &Batch, member: usize) -> Result<FlushResult, Failure> {
        let p = batch.partition;
        let stored = self.stored(p);
        let cas_ok = !batch.check_start || stored == batch.start;
        // The shell stores these with the position, in its transaction.
        let ended = batch.producer_sequences();
        if !batch.position_with_rows {
            // The position commits on its own first.
            if !cas_ok {
                return Ok(FlushResult::Fenced);
            }
            self.set_position(p, batch.end, &ended)?;
        } else if !cas_ok {
            return Ok(FlushResult::Fenced);
        }
        let rows: Vec<usize> = (0..batch.entries.len())
            .filter(|&i| batch.entries[i].is_row())
            .collect();
        if let Some(&bad) = rows
            .iter()
            .find(|&&i| batch.entries[i].record.payload == b"poison")
        {
            let culprit = if self.rng.chance(self.active.wrong_hint) {
                Some(rows[self.rng.below(rows.len() as u64) as usize])
            } else if self.rng.chance(0.5) {
                Some(bad)
            } else {
                None
            };
            return Ok(FlushResult::Poison {
                reason: "22P02: invalid input".into(),
                culprit,
            });
        }
        let has_dead = batch.entries.iter().any(|e| e.dead_reason.is_some());
        if has_dead && self.rng.chance(self.active.dead_letter_insert_fails) {
            return Ok(FlushResult::DeadLettersRejected {
                reason: "23514: dead-letter check constraint".into(),
            });
        }
        for e in &batch.entries {
            let r = &e.record;
            let Some(key) = self.identity(r.partition, r.offset, r.index) else {
                return Err(Failure {
                    what: format!(
                        "a batch holds record {}@{}#{}, which Kafka never had",
                        r.partition, r.offset, r.index
                    ),
                });
            };
            if e.copy {
                // Written nowhere: it must stand for a message that is a copy.
                if key.1 == r.offset {
                    return Err(Failure {
                        what: format!(
                            "message {}@{} was skipped as a copy, but it is an original",
                            r.partition, r.offset
                        ),
                    });
                }
                continue;
            }
            let kind = self.kind(key);
            let dead = e.dead_reason.is_some();
            if dead && kind == Some(Kind::Good) {
                return Err(Failure {
                    what: format!(
                        "a good record {key:?} was dead-lettered: {:?}",
                        e.dead_reason
                    ),
                });
            }
            let table = if dead {
                &mut self.pg.dead
            } else {
                &mut self.pg.rows
            };
            let n = table.entry(key).or_default();
            *n += 1;
            let total = self.pg.rows.get(&key).copied().unwrap_or(0)
                + self.pg.dead.get(&key).copied().unwrap_or(0);
            if total > 1 {
                let copy = if key.1 == r.offset {
                    String::new()
                } else {
                    format!(" (this time from its copy at offset {})", r.offset)
                };
                return Err(Failure {
                    what: format!("record {key:?} written twice{copy}"),
                });
            }
        }
        if batch.position_with_rows {
            self.set_position(p, batch.end, &ended)?;
        }
        // Evidence: copies skipped, and those only the stored sequences could tell (their
        // original is before the position the member started reading from).
        let read_from = self
            .members
            .get(member)
            .and_then(Option::as_ref)
            .and_then(|m| m.read_from.get(&p).copied());
        for e in batch.entries.iter().filter(|e| e.copy) {
            self.count("copies skipped");
            let origin = self.identity(p, e.record.offset, 0).map(|k| k.1);
            if origin
                .zip(read_from)
                .is_some_and(|(o, from)| o < from.offset)
            {
                self.count("copies known by the stored sequences");
            }
        }
        Ok(FlushResult::Written)
    }

    fn stored(&self, p: Partition) -> Position {
        self.pg
            .positions
            .get(&p)
            .copied()
            .unwrap_or(Position::BEGINNING)
    }

    /// What the store returns for a partition: its position and the sequences stored with it.
    fn stored_position(&self, p: Partition) -> StoredPosition {
        StoredPosition {
            partition: p,
            position: self.stored(p),
            producers: self.pg.producers.get(&p).map_or_else(Vec::new, |high| {
                high.iter()
                    .map(|(&producer, &sequence)| ProducerSequence { producer, sequence })
                    .collect()
            }),
        }
    }

    /// The identity of the record at `offset`, `index`: a copy's records are its original's.
    fn identity(&self, p: Partition, offset: i64, index: u32) -> Option<Key> {
        let m = self
            .logs
            .get(&p)?
            .messages
            .get(usize::try_from(offset).ok()?)?;
        Some((p, m.origin, index))
    }

    fn kind(&self, (p, offset, index): Key) -> Option<Kind> {
        let m = self
            .logs
            .get(&p)?
            .messages
            .get(usize::try_from(offset).ok()?)?;
        m.kinds.get(index as usize).copied()
    }

    /// Stores a position and the producers' sequences that go with it (the highest per
    /// producer, as the real upsert's GREATEST), checking that every record before it is
    /// written or dead-lettered (a copy's records by its original's).
    fn set_position(
        &mut self,
        p: Partition,
        to: Position,
        ended: &[ProducerSequence],
    ) -> Result<(), Failure> {
        self.pg.positions.insert(p, to);
        let high = self.pg.producers.entry(p).or_default();
        for at in ended {
            at.raise(high);
        }
        let from = self
            .pg
            .checked_to
            .get(&p)
            .copied()
            .unwrap_or(Position::BEGINNING);
        if to <= from {
            return Ok(());
        }
        let log = &self.logs[&p];
        let mut at = from;
        while at < to {
            let Some(m) = usize::try_from(at.offset)
                .ok()
                .and_then(|o| log.messages.get(o))
            else {
                return Err(Failure {
                    what: format!("partition {p}'s position {to} passes the end of the log"),
                });
            };
            let key = (p, m.origin, at.index);
            if !self.pg.rows.contains_key(&key) && !self.pg.dead.contains_key(&key) {
                let copy = if m.origin == at.offset {
                    String::new()
                } else {
                    format!(" (read from its copy at offset {})", at.offset)
                };
                return Err(Failure {
                    what: format!(
                        "partition {p}'s stored position moved to {to}, past record {key:?}{copy}, which is neither written nor dead-lettered"
                    ),
                });
            }
            at = if at.index as usize + 1 >= m.kinds.len() {
                Position::new(at.offset + 1, 0)
            } else {
                Position::new(at.offset, at.index + 1)
            };
        }
        self.pg.checked_to.insert(p, to);
        Ok(())
    }

    fn start_transaction(&mut self, member: usize, batch: Arc<Batch>) {
        let incarnation = self.members[member].as_ref().map_or(0, |m| m.incarnation);
        // The shell converts the rows before it takes a connection (whether Postgres is up or
        // not): every record that does not convert is named, and nothing is sent. So such a
        // record never reaches `apply`; mishandling the answer (dead-lettering the wrong entry,
        // dropping one) shows as a good record dead-lettered, a position past a record neither
        // written nor dead-lettered, or a partition that never drains.
        let records: Vec<(usize, String)> = batch
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_row() && e.record.payload == b"unconvertible")
            .map(|(i, _)| (i, "column n (bigint from /n): a string".to_string()))
            .collect();
        if !records.is_empty() {
            self.count("unconvertible batches");
            let result = FlushResult::Unconvertible { records };
            self.deliver(member, incarnation, Event::Flushed(batch.id, result));
            return;
        }
        let latency = self.rng.millis(1, 80);
        let fate = if self.pg_down() {
            Fate::LostBefore
        } else if self.rng.chance(self.active.hang) {
            self.count("hung transactions");
            let apply_at = self
                .rng
                .chance(0.5)
                .then(|| self.now + FLUSH_DEADLINE + self.rng.millis(0, 3_000));
            Fate::Hang { apply_at }
        } else if self.rng.chance(self.active.lost_before_commit) {
            self.count("connections lost before commit");
            Fate::LostBefore
        } else if self.rng.chance(self.active.lost_after_commit) {
            self.count("connections lost after commit");
            Fate::LostAfter
        } else {
            Fate::Apply
        };
        let at = match fate {
            Fate::Hang { .. } => self.now + FLUSH_DEADLINE,
            _ => self.now + latency,
        };
        self.pg.transactions.push(Transaction {
            member,
            incarnation,
            batch,
            at,
            fate,
        });
    }

    fn deliver(&mut self, member: usize, incarnation: u64, event: Event) {
        if let Some(m) = self.members.get_mut(member).and_then(Option::as_mut) {
            if m.incarnation == incarnation {
                m.inbox.push_back((self.now, event));
            }
        }
    }

    /// The flush's answer: a retriable failure.
    fn retriable(&mut self, member: usize, inc: u64, id: spillway_core::BatchId, reason: &str) {
        let reason = reason.to_string();
        self.deliver(
            member,
            inc,
            Event::Flushed(id, FlushResult::Retriable { reason }),
        );
    }

    fn step_postgres(&mut self) -> Result<(), Failure> {
        if self.pg.down_until.is_some_and(|t| t <= self.now) {
            self.pg.down_until = None;
            self.log("postgres is back".into());
        }
        let mut i = 0;
        while i < self.pg.transactions.len() {
            let t = &self.pg.transactions[i];
            let due = match t.fate {
                Fate::Hang { apply_at: Some(at) } => at <= self.now || t.at <= self.now,
                _ => t.at <= self.now,
            };
            if !due {
                i += 1;
                continue;
            }
            let t = self.pg.transactions.swap_remove(i);
            let (member, inc, id) = (t.member, t.incarnation, t.batch.id);
            match t.fate {
                Fate::Apply => {
                    let result = if self.pg_down() {
                        FlushResult::Retriable {
                            reason: "connection refused".into(),
                        }
                    } else {
                        self.apply(&t.batch, member)?
                    };
                    self.deliver(member, inc, Event::Flushed(id, result));
                }
                Fate::LostBefore => {
                    self.retriable(member, inc, id, "connection lost before commit")
                }
                Fate::LostAfter => {
                    let applied = self.apply(&t.batch, member)?;
                    self.log(format!(
                        "m{member}'s batch {id:?} commits ({applied:?}) but the answer is lost"
                    ));
                    self.retriable(member, inc, id, "connection lost after commit");
                }
                Fate::Hang { apply_at } => {
                    let deadline_passed = t.at <= self.now;
                    if apply_at.is_some_and(|a| a <= self.now) {
                        let applied = self.apply(&t.batch, member)?;
                        self.log(format!(
                            "m{member}'s hung batch {id:?} finally commits ({applied:?})"
                        ));
                    }
                    if deadline_passed {
                        self.retriable(member, inc, id, "no answer within the flush deadline");
                        if let Some(a) = apply_at.filter(|a| *a > self.now) {
                            // Still running on the server: it may commit after the deadline.
                            self.pg.transactions.push(Transaction {
                                member: usize::MAX,
                                incarnation: 0,
                                batch: t.batch,
                                at: a,
                                fate: Fate::Hang { apply_at: Some(a) },
                            });
                        }
                    } else {
                        // Applied before its deadline: the answer still never comes.
                        self.pg.transactions.push(Transaction {
                            member,
                            incarnation: inc,
                            batch: t.batch,
                            at: t.at,
                            fate: Fate::Hang { apply_at: None },
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Each member's Kafka thread: commands in order, then fetches.
    fn step_kafka(&mut self, m: usize) {
        let now = self.now;
        let active = self.active.clone();
        let Some(member) = self.members[m].as_mut() else {
            return;
        };
        if member.stalled_until.is_some() {
            return;
        }
        let mut events = Vec::new();
        while member.to_kafka.front().is_some_and(|(at, _)| *at <= now) {
            let (_, command) = member.to_kafka.pop_front().expect("front checked");
            match command {
                KafkaCommand::Seek {
                    partition,
                    offset,
                    epoch,
                } => {
                    if self.rng.chance(active.seek_late) {
                        // The seek lands later; fetching goes on meanwhile.
                        let at = now + Duration::from_millis(1 + self.rng.below(300));
                        member.to_kafka.push_front((
                            at,
                            KafkaCommand::Seek {
                                partition,
                                offset,
                                epoch,
                            },
                        ));
                        break;
                    }
                    if !member.assigned.contains(&partition) || self.rng.chance(active.seek_fails) {
                        events.push(Event::SeekFailed(partition, epoch));
                    } else {
                        member.fetch.insert(partition, offset);
                        member.tags.sought(partition, epoch);
                        events.push(Event::SeekDone(partition, epoch));
                    }
                }
                KafkaCommand::Pause(p) => {
                    member.paused.insert(p);
                }
                KafkaCommand::Resume(p) => {
                    member.paused.remove(&p);
                }
                KafkaCommand::Commit { .. } | KafkaCommand::Rejoin => {}
            }
        }
        for &p in &member.assigned {
            if member.paused.contains(&p) || self.rng.chance(active.fetch_errors) {
                continue;
            }
            let log = &self.logs[&p];
            let committed = self.committed.get(&p).copied().unwrap_or(0);
            let mut at = member.fetch.get(&p).copied().unwrap_or(committed);
            for _ in 0..self.rng.below(4) {
                // An offset out of range resets to the earliest (auto.offset.reset=earliest).
                at = at.max(log.start);
                let Some(msg) = log.messages.get(at as usize) else {
                    break;
                };
                events.push(Event::Message(Message {
                    partition: p,
                    offset: at,
                    epoch: member.tags.tag(p),
                    kafka: None,
                    payload: Some(msg.payload.clone()),
                }));
                at += 1;
            }
            member.fetch.insert(p, at);
            if at > 0 && self.rng.chance(active.stale_redelivery) {
                let offset = self.rng.below(at as u64) as i64;
                if let Some(msg) = log.messages.get(offset as usize) {
                    let tag = member.tags.tag(p);
                    events.push(Event::Message(Message {
                        partition: p,
                        offset,
                        epoch: tag.saturating_sub(1 + self.rng.below(3)),
                        kafka: None,
                        payload: Some(msg.payload.clone()),
                    }));
                }
            }
        }
        for e in events {
            member.inbox.push_back((now, e));
        }
    }

    /// Once the Kafka side applied every command, each owned partition is paused in Kafka
    /// exactly when its phase does not read (per-partition flow control, bug 3).
    fn check_pause_states(&self, m: usize) -> Result<(), Failure> {
        let Some(member) = self.members[m].as_ref() else {
            return Ok(());
        };
        if member.stalled_until.is_some() || member.exited.is_some() || !member.to_kafka.is_empty()
        {
            return Ok(());
        }
        for p in member.machine.assigned() {
            if !member.assigned.contains(&p) {
                continue; // revoked by the group; the machine has not heard yet
            }
            let phase = member.machine.phase(p);
            let reads = matches!(phase, Some(Phase::Seeking(_) | Phase::Reading(_)));
            if reads == member.paused.contains(&p) {
                return Err(Failure {
                    what: format!(
                        "m{m}'s partition {p} is {phase:?} but Kafka has it {}",
                        if reads { "paused" } else { "fetching" }
                    ),
                });
            }
        }
        Ok(())
    }

    /// Each member's pipeline: events into the machine, commands out.
    fn step_member(&mut self, m: usize) -> Result<(), Failure> {
        let now = self.now;
        let Some(member) = self.members[m].as_mut() else {
            return Ok(());
        };
        if let Some(until) = member.stalled_until {
            if until > now {
                return Ok(());
            }
            member.stalled_until = None;
            self.log(format!("m{m} resumes (SIGCONT)"));
            return Ok(());
        }
        let member = self.members[m].as_mut().expect("checked");
        let budget = 1 + self.rng.below(8);
        let mut handled = Vec::new();
        for _ in 0..budget {
            if member.inbox.front().is_none_or(|(at, _)| *at > now) {
                break;
            }
            let Some((_, event)) = member.inbox.pop_front() else {
                break;
            };
            let line = describe(&event);
            match event {
                Event::Assigned(ps) => member.machine.on_assigned(&ps, now),
                Event::Revoked(ps) => member.machine.on_revoked(&ps, now),
                Event::SeekDone(p, e) => member.machine.on_seek_done(p, e, now),
                Event::SeekFailed(p, e) => {
                    member
                        .machine
                        .on_seek_failed(p, e, "seek failed".into(), now)
                }
                Event::Message(msg) => member.machine.on_message(msg, now),
                Event::Positions(ps) => {
                    for stored in &ps {
                        if member.machine.phase(stored.partition) == Some(Phase::Positioning) {
                            member.read_from.insert(stored.partition, stored.position);
                        }
                    }
                    member.machine.on_positions(&ps, now)
                }
                Event::PositionsFailed => {
                    member
                        .machine
                        .on_positions_failed("connection refused".into(), false, now)
                }
                Event::Flushed(id, r) => member.machine.on_flush_result(id, r, now),
                Event::GroupView(v) => member.machine.on_group_view(&v, now),
            }
            if let Some(line) = line {
                handled.push(line);
            }
        }
        if member.machine.poll_timeout().is_some_and(|t| t <= now) {
            member.machine.handle_timeout(now);
        }
        let mut commands = Vec::new();
        while let Some(c) = member.machine.poll_command() {
            commands.push(c);
        }
        let stats = member.machine.stats();
        for line in handled {
            self.log(format!("m{m} <- {line}"));
        }
        let cap = &self.config.batcher;
        if stats.buffered_records > cap.capacity_records
            || stats.buffered_bytes > cap.capacity_bytes
        {
            return Err(Failure {
                what: format!(
                    "m{m} buffers {} records / {} bytes, over its bound of {} / {}",
                    stats.buffered_records,
                    stats.buffered_bytes,
                    cap.capacity_records,
                    cap.capacity_bytes
                ),
            });
        }
        for c in commands {
            self.perform(m, c);
        }
        match self.violation.take() {
            Some(what) => Err(Failure { what }),
            None => Ok(()),
        }
    }

    fn perform(&mut self, m: usize, command: Command) {
        let now = self.now;
        match command {
            Command::ReadPositions(ps) => {
                let fails = self.pg_down() || self.rng.chance(self.active.lost_before_commit);
                let positions: Vec<StoredPosition> =
                    ps.iter().map(|p| self.stored_position(*p)).collect();
                let at = now + self.rng.millis(1, 50);
                self.log(format!("m{m} -> read positions {ps:?}"));
                let member = self.members[m].as_mut().expect("performing");
                let event = if fails {
                    Event::PositionsFailed
                } else {
                    Event::Positions(positions)
                };
                member.inbox.push_back((at, event));
            }
            Command::Kafka(k) => {
                self.log(format!("m{m} -> {k:?}"));
                match k {
                    KafkaCommand::Commit { partition, offset } => {
                        self.committed.insert(partition, offset);
                    }
                    KafkaCommand::Rejoin => {
                        self.count("rejoins");
                        if self.rebalance_at.is_none() {
                            self.rebalance_at = Some(now + self.rng.millis(10, 500));
                        }
                    }
                    k => {
                        let member = self.members[m].as_mut().expect("performing");
                        if let KafkaCommand::Seek {
                            partition, epoch, ..
                        } = k
                        {
                            member.tags.seeking(partition, epoch);
                        }
                        member.to_kafka.push_back((now, k));
                    }
                }
            }
            Command::Flush(batch) => {
                // Counted here as the batcher documents it, not with its own arithmetic.
                let bytes: usize = batch
                    .entries
                    .iter()
                    .map(|e| e.record.payload.len() + spillway_core::batcher::RECORD_OVERHEAD)
                    .sum();
                let limits = &self.config.batcher;
                if batch.entries.len() > 1
                    && (bytes > limits.max_batch_bytes
                        || batch.entries.len() > limits.size.max_records)
                {
                    self.violation.get_or_insert(format!(
                        "m{m} emitted a batch of {} records / {bytes} bytes, over the batch limits of {} / {}",
                        batch.entries.len(),
                        limits.size.max_records,
                        limits.max_batch_bytes
                    ));
                }
                self.log(format!(
                    "m{m} -> flush {:?}: partition {} {}..{} ({} entries, try {})",
                    batch.id,
                    batch.partition,
                    batch.start,
                    batch.end,
                    batch.entries.len(),
                    batch.attempt
                ));
                self.start_transaction(m, batch);
            }
            Command::Notice(n) => {
                if let Notice::Gap { .. } = n {
                    self.count("gaps reported");
                }
                self.log(format!("m{m} notice: {n:?}"));
            }
            Command::Exit(e) => {
                self.log(format!("m{m} exits: {e:?}"));
                if let Some(member) = self.members[m].as_mut() {
                    member.exited = Some(e);
                }
            }
        }
    }

    fn group_view(&mut self) {
        let view: Vec<PartitionLag> = self
            .logs
            .iter()
            .map(|(p, log)| PartitionLag {
                partition: *p,
                stored: self.stored(*p),
                high_watermark: log.end(),
            })
            .collect();
        for m in self.live() {
            let member = self.members[m].as_mut().expect("live");
            member
                .inbox
                .push_back((self.now, Event::GroupView(view.clone())));
        }
    }

    fn step(&mut self, faults: bool) -> Result<(), Failure> {
        self.now += Duration::from_millis(1 + self.rng.below(40));
        if faults {
            self.produce();
            self.store_copy();
            self.retention();
            self.faults_in_the_group();
        }
        if self.rebalance_at.is_some_and(|t| t <= self.now) {
            self.rebalance();
        }
        let due: Vec<Instant> = self
            .restart_at
            .iter()
            .copied()
            .filter(|t| *t <= self.now)
            .collect();
        if !due.is_empty() {
            self.restart_at.retain(|t| *t > self.now);
            for _ in due {
                self.join();
            }
        }
        let before = self.now.duration_since(self.start).as_millis() / 2_000;
        self.step_postgres()?;
        let members = self.members.len();
        for m in 0..members {
            self.step_kafka(m);
            self.check_pause_states(m)?;
            // Events reach the pipeline in the order they were sent; a few at a time.
            if let Some(member) = self.members[m].as_mut() {
                member.inbox.make_contiguous().sort_by_key(|(at, _)| *at);
            }
            self.step_member(m)?;
        }
        let after = (self.now + Duration::from_millis(40))
            .duration_since(self.start)
            .as_millis()
            / 2_000;
        // The shell reads the stored positions from Postgres: no view while it is down.
        if after != before && !self.pg_down() {
            self.group_view();
        }
        Ok(())
    }

    /// Every partition written to its end, or stopped exactly at a gap retention made.
    fn drained(&self) -> bool {
        self.logs.iter().all(|(p, log)| {
            let stored = self.stored(*p);
            stored.offset == log.end() || stored.offset < log.start
        })
    }

    fn run(&mut self) -> Result<(), Failure> {
        while self.now.duration_since(self.start) < FAULT_PHASE {
            self.step(true)?;
        }
        // Calm: faults stop, stalled members wake, crashed ones restart, everything is produced.
        self.active = Faults::calm();
        self.pg.down_until = None;
        while self.produced < self.to_produce {
            self.produce();
        }
        self.log("faults stop".into());
        let calm = self.now;
        loop {
            self.step(false)?;
            if self.drained() && self.pg.transactions.iter().all(|t| t.member == usize::MAX) {
                break;
            }
            if self.now.duration_since(calm) > LIVENESS_BOUND {
                let stuck: Vec<String> = self
                    .logs
                    .iter()
                    .map(|(p, log)| {
                        let stored = self.stored(*p);
                        let phases: Vec<String> = self
                            .live()
                            .into_iter()
                            .filter_map(|m| {
                                let member = self.members[m].as_ref()?;
                                Some(format!(
                                    "m{m}: {:?} paused in kafka: {}",
                                    member.machine.phase(*p),
                                    member.paused.contains(p)
                                ))
                            })
                            .collect();
                        format!(
                            "partition {p}: stored {stored}, log {}..{}; {}",
                            log.start,
                            log.end(),
                            phases.join(", ")
                        )
                    })
                    .collect();
                return Err(Failure {
                    what: format!(
                        "not drained {}s after the faults stopped (liveness):\n  {}",
                        LIVENESS_BOUND.as_secs(),
                        stuck.join("\n  ")
                    ),
                });
            }
        }
        // Then a shutdown: every member must drain and exit.
        let live = self.live();
        for &m in &live {
            let member = self.members[m].as_mut().expect("live");
            member.machine.on_shutdown(self.now);
            let mut commands = Vec::new();
            while let Some(c) = member.machine.poll_command() {
                commands.push(c);
            }
            for c in commands {
                self.perform(m, c);
            }
        }
        let shutdown = self.now;
        while !self.live().is_empty() && self.now.duration_since(shutdown) < Duration::from_secs(60)
        {
            self.step(false)?;
        }
        for m in live {
            let member = self.members[m].as_mut().expect("live");
            while let Some(c) = member.machine.poll_command() {
                if let Command::Exit(e) = c {
                    member.exited = Some(e);
                }
            }
            let stats = member.machine.stats();
            if stats.buffered_records != 0 || stats.buffered_bytes != 0 {
                return Err(Failure {
                    what: format!(
                        "m{m} drained but still counts {} records / {} bytes buffered",
                        stats.buffered_records, stats.buffered_bytes
                    ),
                });
            }
            match &member.exited {
                Some(Exit::Drained) => {}
                other => {
                    return Err(Failure {
                        what: format!("m{m} did not drain and exit on shutdown: {other:?}"),
                    })
                }
            }
        }
        Ok(())
    }
}

fn describe(e: &Event) -> Option<String> {
    Some(match e {
        Event::Assigned(ps) => format!("assigned {ps:?}"),
        Event::Revoked(ps) => format!("revoked {ps:?}"),
        Event::SeekDone(p, e) => format!("seek done {p} (epoch {e})"),
        Event::SeekFailed(p, e) => format!("seek failed {p} (epoch {e})"),
        Event::Message(m) => {
            let order = m
                .payload
                .as_deref()
                .and_then(|b| Envelope::decode(b).ok()?.producer_sequence())
                .map_or(String::new(), |at| {
                    format!(" ({:x}:{})", at.producer, at.sequence)
                });
            format!(
                "message {}@{} epoch {}{order}",
                m.partition, m.offset, m.epoch
            )
        }
        Event::Positions(ps) => {
            let ps: Vec<String> = ps
                .iter()
                .map(|s| {
                    let producers: Vec<String> = s
                        .producers
                        .iter()
                        .map(|at| format!("{:x}:{}", at.producer, at.sequence))
                        .collect();
                    format!(
                        "{} at {} [{}]",
                        s.partition,
                        s.position,
                        producers.join(" ")
                    )
                })
                .collect();
            format!("positions {}", ps.join(", "))
        }
        Event::PositionsFailed => "positions unavailable".into(),
        Event::Flushed(id, r) => format!("flushed {id:?}: {r:?}"),
        Event::GroupView(_) => return None,
    })
}

struct Outcome {
    seeds: u64,
    counts: BTreeMap<&'static str, u64>,
    failure: Option<(u64, String)>,
}

fn run_seeds(
    seeds: impl Iterator<Item = u64>,
    mutation: Option<Mutation>,
    stop_at_first: bool,
) -> Outcome {
    let mut outcome = Outcome {
        seeds: 0,
        counts: BTreeMap::new(),
        failure: None,
    };
    for seed in seeds {
        outcome.seeds += 1;
        let mut sim = Sim::new(seed, mutation);
        let result = sim.run();
        *outcome.counts.entry("simulated seconds").or_default() +=
            sim.now.duration_since(sim.start).as_secs();
        for (k, v) in &sim.counts {
            *outcome.counts.entry(k).or_default() += v;
        }
        if let Err(f) = result {
            let report = format!(
                "seed {seed} failed: {}\nfault mix: {:?}\nlast {} steps:\n{}\nreplay: SPILLWAY_SIM_SEED={seed}{} cargo test -p spillway-core --test simulation",
                f.what,
                sim.faults,
                sim.trace.len(),
                sim.trace.iter().cloned().collect::<Vec<_>>().join("\n"),
                mutation.map_or(String::new(), |m| format!(
                    " SPILLWAY_SIM_MUTATE={}",
                    Mutation::ALL.iter().find(|(_, x)| *x == m).map_or("?", |(n, _)| n)
                )),
            );
            if outcome.failure.is_none() {
                outcome.failure = Some((seed, report));
            }
            if stop_at_first {
                break;
            }
        }
    }
    outcome
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

const DEFAULT_SEEDS: u64 = 1000;

/// The seeds a run covers: `SPILLWAY_SIM_SEED` alone, or `SPILLWAY_SIM_SEEDS` of them.
fn seeds() -> Box<dyn Iterator<Item = u64>> {
    match env_u64("SPILLWAY_SIM_SEED") {
        Some(s) => Box::new(std::iter::once(s)),
        None => Box::new(1..=env_u64("SPILLWAY_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)),
    }
}

#[test]
fn simulation_keeps_every_record_exactly_once() {
    let mutation = std::env::var("SPILLWAY_SIM_MUTATE").ok().map(|n| {
        Mutation::parse(&n).unwrap_or_else(|| {
            panic!(
                "SPILLWAY_SIM_MUTATE={n} is not a known mutation: {:?}",
                Mutation::ALL.map(|(n, _)| n)
            )
        })
    });
    let started = std::time::Instant::now();
    let outcome = run_seeds(seeds(), mutation, false);
    println!(
        "{} seeds in {:.1}s; faults injected: {:?}",
        outcome.seeds,
        started.elapsed().as_secs_f64(),
        outcome.counts
    );
    if let Some((_, report)) = outcome.failure {
        panic!("{report}");
    }
}

/// Each known bug is caught within the default seeds: the simulator can fail.
#[test]
fn every_mutation_is_caught() {
    if std::env::var("SPILLWAY_SIM_SEED").is_ok() || std::env::var("SPILLWAY_SIM_MUTATE").is_ok() {
        return;
    }
    let must_catch = [
        "epoch-before-seek",
        "accept-gaps",
        "global-pause",
        "no-compare-and-set",
        "position-before-rows",
        "write-copies",
    ];
    let mut missed = Vec::new();
    for name in must_catch {
        let m = Mutation::parse(name).expect("known mutation");
        let outcome = run_seeds(
            1..=env_u64("SPILLWAY_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS),
            Some(m),
            true,
        );
        match outcome.failure {
            Some((seed, report)) => {
                let first = report.lines().next().unwrap_or_default().to_string();
                println!("{name}: caught by {first} (after {} seeds)", outcome.seeds);
                let _ = seed;
            }
            None => missed.push(name),
        }
    }
    assert!(
        missed.is_empty(),
        "mutations the simulator did not catch: {missed:?}"
    );
}
