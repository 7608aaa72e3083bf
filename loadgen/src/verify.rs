//! The verdict, as Jepsen's set checker gives it: after the traffic, wait (bounded) until the
//! pipeline is quiet, then compare the ids the endpoint acknowledged with the ids in Postgres.
//!
//! Quiet means every partition's consumer lag is 0 (the positions stored in
//! `spillway_offsets` reach Kafka's high watermarks) and the row count (table and dead letters)
//! has not changed for a settle period. Comparing any earlier would miss a duplicate that lands
//! a moment later: a zombie's late write, a replay after a rebalance.
//!
//! Lost: acknowledged, missing. Duplicated: present more than once. Unexpected: present but
//! never acknowledged (a 503 whose write landed after all): allowed, shown; with idempotency
//! keys (`loadgen --idempotency-keys`) such a request was retried until it was acknowledged,
//! so an unexpected record fails the verdict, except the records of a request given up after
//! its last retry: they may land, and are counted apart ("given up, landed"). Dead-lettered:
//! acknowledged and in the table's dead-letter table (the consumer's `<table>_dead_letters`)
//! instead: not lost, shown, and listed so a caller can check they were meant to be there.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

use spillway_harness::postgres::connect;
use spillway_harness::HarnessError;

use crate::runner::AckSet;

/// The settle period unless told otherwise (`loadgen --settle`).
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(3);

/// What to check, where, and how long to wait.
#[derive(Clone, Debug)]
pub struct VerifyConfig {
    /// Postgres.
    pub database_url: String,
    /// The consumer's table (its `--table`).
    pub table: String,
    /// The JSON field carrying each record's id.
    pub id_field: String,
    /// A column holding the id (a typed column of the consumer's mapping) to read instead of
    /// `data->>id_field`, e.g. when the consumer runs with `--keep-data false`.
    pub id_column: Option<String>,
    /// The run's id: this run's records have ids `<run_id>-<sequence>`.
    pub run_id: String,
    /// Kafka's bootstrap servers, to read the topic's high watermarks.
    pub brokers: String,
    /// The topic the consumer reads.
    pub topic: String,
    /// How long the row count must stay the same, with no lag, before comparing.
    pub settle: Duration,
    /// The longest wait for quiet; past it the comparison is made anyway and the verdict says
    /// why the pipeline was not quiet.
    pub timeout: Duration,
    /// With idempotency keys (requests retried until acknowledged): the records of the
    /// requests given up after their last retry. `Some` makes an unexpected record fail the
    /// verdict; these records are counted apart instead, landed or not.
    pub given_up: Option<AckSet>,
}

impl VerifyConfig {
    /// The default settle period and a `timeout` bound.
    pub fn new(
        database_url: impl Into<String>,
        table: impl Into<String>,
        run_id: impl Into<String>,
        brokers: impl Into<String>,
        topic: impl Into<String>,
        timeout: Duration,
    ) -> Self {
        VerifyConfig {
            database_url: database_url.into(),
            table: table.into(),
            id_field: "id".into(),
            id_column: None,
            run_id: run_id.into(),
            brokers: brokers.into(),
            topic: topic.into(),
            settle: DEFAULT_SETTLE,
            timeout,
            given_up: None,
        }
    }
}

/// What the comparison found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    /// Records acknowledged with 2xx.
    pub acknowledged: u64,
    /// Distinct acknowledged records found in Postgres.
    pub found: u64,
    /// Acknowledged but missing.
    pub lost: u64,
    /// Ids present more than once (count of extra copies).
    pub duplicated: u64,
    /// Present but never acknowledged (and, with idempotency keys, not of a request given up).
    pub unexpected: u64,
    /// Up to 20 unexpected sequence numbers.
    pub unexpected_sample: Vec<u64>,
    /// Whether the requests carried idempotency keys: then an unexpected record fails.
    pub idempotency_keys: bool,
    /// With idempotency keys: records of requests given up after their last retry.
    pub given_up: u64,
    /// Of those, how many are in the table (each once, or it is a duplicate): a write that
    /// landed although its client gave up. Neither lost nor unexpected.
    pub given_up_landed: u64,
    /// Up to 20 lost sequence numbers.
    pub lost_sample: Vec<u64>,
    /// Up to 20 duplicated sequence numbers.
    pub duplicated_sample: Vec<u64>,
    /// Acknowledged records found in the dead-letter table instead of the table.
    pub dead_lettered: u64,
    /// Their sequence numbers, ascending.
    #[serde(skip)]
    pub dead_lettered_seqs: Vec<u64>,
    /// Whether the pipeline went quiet (no lag, rows settled) before the timeout. When it did
    /// not, the comparison is of a pipeline still moving (or stuck) and cannot pass.
    pub quiet: bool,
    /// Why it was not quiet at the timeout (the lagging partitions, or rows still changing).
    pub not_quiet: Option<String>,
    /// How long the wait for quiet took (settle period included).
    pub waited_seconds: f64,
}

impl Verdict {
    /// Quiet, no loss and no duplicate; with idempotency keys, nothing unexpected either.
    pub fn passed(&self) -> bool {
        self.quiet
            && self.lost == 0
            && self.duplicated == 0
            && (!self.idempotency_keys || self.unexpected == 0)
    }
}

/// One partition's position in Postgres beside its end in Kafka.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: i32,
    /// The next offset stored in `spillway_offsets` (`None`: nothing stored yet).
    pub stored: Option<i64>,
    /// Kafka's high watermark.
    pub high: i64,
}

impl PartitionLag {
    /// Messages in Kafka after the stored position.
    pub fn lag(&self) -> i64 {
        (self.high - self.stored.unwrap_or(0)).max(0)
    }
}

/// One look at the pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// Every partition of the topic.
    pub partitions: Vec<PartitionLag>,
    /// Rows in the table plus rows in its dead-letter table.
    pub rows: i64,
}

impl Observation {
    fn lagging(&self) -> Vec<&PartitionLag> {
        self.partitions.iter().filter(|p| p.lag() > 0).collect()
    }
}

/// Decides, from successive observations, when the pipeline is quiet: every partition's lag is
/// 0 and the row count has stayed the same for the settle period. Time is an argument.
#[derive(Clone, Debug)]
pub struct Settle {
    period: Duration,
    /// Since when, and at what row count, the pipeline has looked quiet.
    since: Option<(Instant, i64)>,
}

impl Settle {
    /// Quiet after `period` of no lag and no new row.
    pub fn new(period: Duration) -> Self {
        Settle {
            period,
            since: None,
        }
    }

    /// Takes one observation (`None`: the pipeline could not be observed); whether it is quiet.
    pub fn observe(&mut self, seen: Option<&Observation>, now: Instant) -> bool {
        let calm = seen.filter(|o| o.lagging().is_empty()).map(|o| o.rows);
        self.since = match (calm, self.since) {
            (Some(rows), Some((at, same))) if rows == same => Some((at, same)),
            (Some(rows), _) => Some((now, rows)),
            (None, _) => None,
        };
        self.since
            .is_some_and(|(at, _)| now.saturating_duration_since(at) >= self.period)
    }
}

/// Where a row's id is: the JSON field `data->>id_field`, or a column.
#[derive(Clone, Copy, Debug)]
pub enum IdSource<'a> {
    /// `data->>field`.
    Field(&'a str),
    /// A column of the table (a typed column).
    Column(&'a str),
}

impl IdSource<'_> {
    /// The id as text, for `SELECT`, and the query parameters it needs first.
    fn select(&self) -> (String, Vec<String>) {
        match self {
            IdSource::Field(f) => ("data->>$1".into(), vec![f.to_string()]),
            IdSource::Column(c) => (format!("\"{}\"::text", c.replace('"', "\"\"")), vec![]),
        }
    }

    /// Rows of this run: `(SELECT id, WHERE clause, parameters)`.
    fn of_run(&self, run_id: &str) -> (String, String, Vec<String>) {
        let (id, mut params) = self.select();
        params.push(format!("{run_id}-%"));
        let clause = format!("{id} LIKE ${}", params.len());
        (id, clause, params)
    }
}

impl VerifyConfig {
    /// Where the ids are.
    pub fn id_source(&self) -> IdSource<'_> {
        match &self.id_column {
            Some(c) => IdSource::Column(c),
            None => IdSource::Field(&self.id_field),
        }
    }
}

fn params(p: &[String]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    p.iter()
        .map(|s| s as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

/// Rows of this run in the table (ids start with `run_id-`).
pub async fn count_rows(
    url: &str,
    table: &str,
    id: IdSource<'_>,
    run_id: &str,
) -> Result<i64, HarnessError> {
    let c = connect(url).await?;
    let (_, clause, p) = id.of_run(run_id);
    let q = format!("SELECT count(*) FROM {table} WHERE {clause}");
    let row = c.query_one(&q, &params(&p)).await?;
    Ok(row.get(0))
}

/// The consumer's dead-letter table for `table`.
pub fn dead_letter_table(table: &str) -> String {
    format!("{table}_dead_letters")
}

/// Sequence numbers of this run in the dead-letter table (empty when there is no such table).
/// Its `raw` column holds each record's JSON text as the endpoint received it.
pub async fn dead_lettered(
    url: &str,
    table: &str,
    id_field: &str,
    run_id: &str,
) -> Result<Vec<u64>, HarnessError> {
    let c = connect(url).await?;
    let dead = dead_letter_table(table);
    let exists: Option<String> = c
        .query_one("SELECT to_regclass($1)::text", &[&dead])
        .await?
        .get(0);
    if exists.is_none() {
        return Ok(vec![]);
    }
    let pattern = format!(
        "\"{}\"\\s*:\\s*\"{}-([0-9]+)\"",
        regex_escape(id_field),
        regex_escape(run_id)
    );
    let q = format!("SELECT substring(raw from $1) FROM {dead}");
    let mut seqs: Vec<u64> = c
        .query(&q, &[&pattern])
        .await?
        .iter()
        .filter_map(|r| r.get::<_, Option<String>>(0)?.parse().ok())
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escape = !c.is_ascii_alphanumeric() && c != '_' && c != '-';
            escape.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// Waits (at most `cfg.timeout`) until the pipeline is quiet, then compares. `on_poll` sees the
/// row count at each look.
pub async fn verify(
    cfg: &VerifyConfig,
    acked: &AckSet,
    mut on_poll: impl FnMut(i64),
) -> Result<Verdict, HarnessError> {
    let started = Instant::now();
    let mut looker = Looker::new(cfg)?;
    let mut settle = Settle::new(cfg.settle);
    let mut last: Result<Observation, String>;
    let quiet = loop {
        let seen = match tokio::time::timeout(Duration::from_secs(10), looker.look()).await {
            Ok(r) => r,
            Err(_) => Err(HarnessError::Unsupported(
                "no answer from Postgres or Kafka within 10 s".into(),
            )),
        };
        last = seen.map_err(|e| e.to_string());
        if let Ok(o) = &last {
            on_poll(o.rows);
        }
        if settle.observe(last.as_ref().ok(), Instant::now()) {
            break true;
        }
        if started.elapsed() >= cfg.timeout {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut v = compare(cfg, acked).await?;
    v.quiet = quiet;
    v.waited_seconds = started.elapsed().as_secs_f64();
    if !quiet {
        v.not_quiet = Some(not_quiet_reason(&last, cfg));
    }
    Ok(v)
}

fn not_quiet_reason(last: &Result<Observation, String>, cfg: &VerifyConfig) -> String {
    let bound = format!(
        "the pipeline was not quiet within {:?} (quiet: every partition's lag 0 and no new row for {:?})",
        cfg.timeout, cfg.settle
    );
    match last {
        Err(e) => format!("{bound}; the last look failed: {e}"),
        Ok(o) => {
            let lagging: Vec<String> = o
                .lagging()
                .iter()
                .map(|p| match p.stored {
                    Some(at) => format!(
                        "partition {}: position {at} in Postgres, high watermark {} (lag {})",
                        p.partition,
                        p.high,
                        p.lag()
                    ),
                    None => format!(
                        "partition {}: no position in Postgres, high watermark {}",
                        p.partition, p.high
                    ),
                })
                .collect();
            if lagging.is_empty() {
                format!(
                    "{bound}; no lag at the end, but rows were still being written ({} now)",
                    o.rows
                )
            } else {
                format!("{bound}; still behind: {}", lagging.join("; "))
            }
        }
    }
}

/// Looks at the pipeline: positions and row counts in Postgres, high watermarks in Kafka.
struct Looker<'a> {
    cfg: &'a VerifyConfig,
    kafka: std::sync::Arc<BaseConsumer>,
    partitions: Vec<i32>,
    db: Option<tokio_postgres::Client>,
}

impl<'a> Looker<'a> {
    fn new(cfg: &'a VerifyConfig) -> Result<Self, HarnessError> {
        let kafka: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", format!("spillway-verify-{}", cfg.run_id))
            .create()?;
        Ok(Looker {
            cfg,
            kafka: std::sync::Arc::new(kafka),
            partitions: vec![],
            db: None,
        })
    }

    async fn look(&mut self) -> Result<Observation, HarnessError> {
        let highs = self.high_watermarks().await?;
        if self.db.as_ref().is_none_or(|c| c.is_closed()) {
            self.db = Some(connect(&self.cfg.database_url).await?);
        }
        let db = self
            .db
            .as_ref()
            .ok_or_else(|| HarnessError::Unsupported("no connection to Postgres".into()))?;
        let stored: std::collections::HashMap<i32, i64> = db
            .query(
                "SELECT kafka_partition, next_offset FROM spillway_offsets \
                 WHERE consumer = $1 AND topic = $2",
                &[&self.cfg.table, &self.cfg.topic],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let dead = dead_letter_table(&self.cfg.table);
        let rows: i64 = db
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM {}) + \
                     CASE WHEN to_regclass($1) IS NULL THEN 0 ELSE (SELECT count(*) FROM {dead}) END",
                    self.cfg.table
                ),
                &[&dead],
            )
            .await?
            .get(0);
        Ok(Observation {
            partitions: highs
                .into_iter()
                .map(|(partition, high)| PartitionLag {
                    partition,
                    stored: stored.get(&partition).copied(),
                    high,
                })
                .collect(),
            rows,
        })
    }

    async fn high_watermarks(&mut self) -> Result<Vec<(i32, i64)>, HarnessError> {
        let kafka = self.kafka.clone();
        let topic = self.cfg.topic.clone();
        let known = self.partitions.clone();
        let (partitions, highs) = tokio::task::spawn_blocking(move || {
            let partitions = if known.is_empty() {
                let md = kafka.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
                md.topics()
                    .iter()
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect()
            } else {
                known
            };
            let highs = partitions
                .iter()
                .map(|p| {
                    let (_, high) = kafka.fetch_watermarks(&topic, *p, Duration::from_secs(5))?;
                    Ok((*p, high))
                })
                .collect::<Result<Vec<_>, rdkafka::error::KafkaError>>()?;
            Ok::<_, HarnessError>((partitions, highs))
        })
        .await
        .map_err(|e| HarnessError::Unsupported(format!("reading watermarks: {e}")))??;
        if partitions.is_empty() {
            return Err(HarnessError::Unsupported(format!(
                "topic {} has no partitions on {}",
                self.cfg.topic, self.cfg.brokers
            )));
        }
        self.partitions = partitions;
        Ok(highs)
    }
}

/// One comparison of the acknowledged ids with the tables, as they are now.
async fn compare(cfg: &VerifyConfig, acked: &AckSet) -> Result<Verdict, HarnessError> {
    let (url, table, run_id) = (&cfg.database_url, &cfg.table, &cfg.run_id);
    let c = connect(url).await?;
    let (id, clause, p) = cfg.id_source().of_run(run_id);
    let q = format!("SELECT {id} FROM {table} WHERE {clause}");
    let rows = c.query(&q, &params(&p)).await?;
    let prefix = format!("{run_id}-");
    let mut counts: std::collections::HashMap<u64, u32> =
        std::collections::HashMap::with_capacity(rows.len());
    for r in rows {
        let id: Option<String> = r.get(0);
        if let Some(seq) = id
            .as_deref()
            .and_then(|s| s.strip_prefix(&prefix))
            .and_then(|s| s.parse().ok())
        {
            *counts.entry(seq).or_insert(0) += 1;
        }
    }
    let dead = dead_lettered(url, table, &cfg.id_field, run_id).await?;
    Ok(tally(&counts, &dead, acked, cfg.given_up.as_ref()))
}

/// The verdict on what the tables hold: `counts` (rows per sequence number), `dead` (sequence
/// numbers dead-lettered), against what was acknowledged and, with idempotency keys, what was
/// given up.
fn tally(
    counts: &std::collections::HashMap<u64, u32>,
    dead: &[u64],
    acked: &AckSet,
    given_up: Option<&AckSet>,
) -> Verdict {
    let dead_set: std::collections::HashSet<u64> = dead.iter().copied().collect();
    let mut v = Verdict {
        acknowledged: acked.len(),
        idempotency_keys: given_up.is_some(),
        given_up: given_up.map_or(0, AckSet::len),
        ..Verdict::default()
    };
    for seq in acked.iter() {
        if counts.contains_key(&seq) {
            v.found += 1;
        } else if dead_set.contains(&seq) {
            v.dead_lettered += 1;
            v.dead_lettered_seqs.push(seq);
        } else {
            v.lost += 1;
            if v.lost_sample.len() < 20 {
                v.lost_sample.push(seq);
            }
        }
    }
    let mut dups: Vec<u64> = Vec::new();
    let mut unexpected: Vec<u64> = Vec::new();
    for (seq, n) in counts {
        if *n > 1 {
            v.duplicated += (*n - 1) as u64;
            dups.push(*seq);
        }
        if acked.contains(*seq) {
            continue;
        }
        if given_up.is_some_and(|g| g.contains(*seq)) {
            v.given_up_landed += 1;
        } else {
            v.unexpected += 1;
            unexpected.push(*seq);
        }
    }
    dups.sort_unstable();
    v.duplicated_sample = dups.into_iter().take(20).collect();
    unexpected.sort_unstable();
    v.unexpected_sample = unexpected.into_iter().take(20).collect();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_escape_keeps_ids_literal() {
        assert_eq!(regex_escape("r1a-b_c"), "r1a-b_c");
        assert_eq!(regex_escape("a.b*c"), "a\\.b\\*c");
    }

    fn seen(lags: &[(i64, i64)], rows: i64) -> Observation {
        Observation {
            partitions: lags
                .iter()
                .enumerate()
                .map(|(p, (stored, high))| PartitionLag {
                    partition: p as i32,
                    stored: Some(*stored),
                    high: *high,
                })
                .collect(),
            rows,
        }
    }

    #[test]
    fn quiet_needs_no_lag_and_the_same_row_count_for_the_whole_settle_period() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut settle = Settle::new(Duration::from_secs(3));
        // Lag on one partition: never quiet, however long.
        assert!(!settle.observe(Some(&seen(&[(5, 5), (3, 4)], 10)), s(0)));
        assert!(!settle.observe(Some(&seen(&[(5, 5), (3, 4)], 10)), s(5000)));
        // No lag from 5 s on; quiet 3 s later only if no row arrives meanwhile.
        assert!(!settle.observe(Some(&seen(&[(5, 5), (4, 4)], 10)), s(5000)));
        assert!(!settle.observe(Some(&seen(&[(5, 5), (4, 4)], 11)), s(7000)));
        assert!(!settle.observe(Some(&seen(&[(5, 5), (4, 4)], 11)), s(9999)));
        assert!(settle.observe(Some(&seen(&[(5, 5), (4, 4)], 11)), s(10_000)));
        // A look that failed starts the period again.
        assert!(!settle.observe(None, s(10_250)));
        assert!(!settle.observe(Some(&seen(&[(5, 5), (4, 4)], 11)), s(10_500)));
        assert!(settle.observe(Some(&seen(&[(5, 5), (4, 4)], 11)), s(13_500)));
    }

    fn acks(seqs: &[u64]) -> AckSet {
        let mut a = AckSet::default();
        for s in seqs {
            a.insert_range(*s, 1);
        }
        a
    }

    #[test]
    fn a_given_up_request_s_records_that_landed_are_counted_apart_not_as_unexpected() {
        // Rows: 0, 1 (twice), 2, 5 (given up, landed), 7 (never acknowledged, not given up).
        let counts = std::collections::HashMap::from([(0, 1), (1, 2), (2, 1), (5, 1), (7, 1)]);
        let acked = acks(&[0, 1, 2, 3, 4]);
        let given_up = acks(&[5, 6]);
        let v = tally(&counts, &[4], &acked, Some(&given_up));
        assert_eq!(
            (v.found, v.lost, v.dead_lettered, v.duplicated),
            (3, 1, 1, 1)
        );
        assert_eq!((v.given_up, v.given_up_landed), (2, 1));
        assert_eq!((v.unexpected, v.unexpected_sample.clone()), (1, vec![7]));
        assert!(v.idempotency_keys);
        // Without keys nothing was given up: both are unexpected, and allowed.
        let v = tally(&counts, &[4], &acked, None);
        assert_eq!((v.unexpected, v.given_up_landed), (2, 0));
        assert!(!v.idempotency_keys);
    }

    #[test]
    fn with_idempotency_keys_an_unexpected_record_fails_and_a_given_up_one_does_not() {
        let passing = Verdict {
            quiet: true,
            unexpected: 3,
            ..Verdict::default()
        };
        assert!(
            passing.passed(),
            "without keys an unexpected record is allowed"
        );
        let keyed = Verdict {
            idempotency_keys: true,
            ..passing.clone()
        };
        assert!(!keyed.passed(), "with keys it is not");
        let given_up = Verdict {
            unexpected: 0,
            given_up: 5,
            given_up_landed: 3,
            ..keyed
        };
        assert!(given_up.passed(), "a given-up request's records may land");
    }

    #[test]
    fn a_partition_with_no_stored_position_lags_by_its_whole_length() {
        let p = PartitionLag {
            partition: 0,
            stored: None,
            high: 7,
        };
        assert_eq!(p.lag(), 7);
        let empty = PartitionLag { high: 0, ..p };
        assert_eq!(empty.lag(), 0);
    }
}
