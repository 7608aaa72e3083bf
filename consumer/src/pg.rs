//! Everything the consumer says to Postgres: connections, schema, positions and the flush
//! transaction. Errors are classified here into the core's [`ErrorClass`]; nothing above this
//! module looks at a `tokio_postgres::Error`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::SinkExt;
use postgres_native_tls::MakeTlsConnector;
use spillway_core::batcher::Record;
use spillway_core::partitions::Range;
use spillway_core::pgcopy::{CopyRows, ROW_OVERHEAD};
use spillway_core::{idempotency, routing, topics};
use spillway_core::{
    Batch, ErrorClass, FlushResult, Mapping, Partition, Partitioning, Position, ProducerSequence,
    Router, StoredPosition, Topics,
};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config};

use crate::upsert::{MergeSql, Merged};

/// Schema version this build writes.
pub const SCHEMA_VERSION: i32 = 1;

/// What the pipeline needs to know about a failure.
#[derive(Debug)]
pub struct PgFailure {
    /// Retriable, poison or fatal.
    pub class: ErrorClass,
    /// The server's (or the client's) message.
    pub message: String,
    /// For a rejected COPY: the 0-based row the server named.
    pub row: Option<usize>,
}

impl std::fmt::Display for PgFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Classifies a Postgres error.
///
/// - retriable: connection lost or refused, server shutting down or recovering, too many
///   connections or other resource shortage, serialization failure or deadlock, statement
///   timeout or cancel, lock timeout, and anything unknown (never drop data on a guess);
/// - poison: a data error caused by a record (class 22, or a constraint the user added,
///   class 23);
/// - fatal: authentication, permissions, missing objects, syntax (configuration).
pub fn classify(e: &tokio_postgres::Error) -> PgFailure {
    let message = match e.as_db_error() {
        Some(db) => match db.where_() {
            Some(w) => format!("{}: {} ({w})", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        None => e.to_string(),
    };
    let Some(code) = e.code() else {
        return PgFailure {
            class: ErrorClass::Retriable,
            message,
            row: None,
        };
    };
    let c = code.code();
    let class = if c.starts_with("22") || c.starts_with("23") {
        ErrorClass::Poison
    } else if c.starts_with("28")
        || c.starts_with("42")
        || c.starts_with("3D")
        || c.starts_with("3F")
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
    {
        ErrorClass::Fatal
    } else {
        ErrorClass::Retriable
    };
    let row = e
        .as_db_error()
        .and_then(|db| db.where_())
        .and_then(copy_line);
    PgFailure {
        class,
        message,
        row,
    }
}

/// "COPY records, line 3, column data: ..." -> Some(2). The context may first name a line
/// of the JSON value itself ("JSON data, line 1: ..."): only the COPY's line counts.
fn copy_line(context: &str) -> Option<usize> {
    let copy = &context[context.rfind("COPY ")?..];
    let rest = &copy[copy.find(", line ")? + 7..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse::<usize>().ok()?.checked_sub(1)
}

fn client_failure(message: impl Into<String>) -> PgFailure {
    PgFailure {
        class: ErrorClass::Retriable,
        message: message.into(),
        row: None,
    }
}

/// A validated, quoted table name (optionally schema-qualified).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    /// As the user wrote it (the key in the offsets table).
    pub plain: String,
    quoted: String,
    dead_quoted: String,
    keys_quoted: String,
    last: String,
    /// `"schema".` or nothing.
    schema_prefix: String,
}

impl TableName {
    /// Accepts `name` or `schema.name`, each `[A-Za-z_][A-Za-z0-9_]*`, at most 50 characters.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('.').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 50
                && p.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        if parts.len() > 2 || !parts.iter().all(|p| ok(p)) {
            return Err(format!(
                "{s:?} is not a plain table name: use letters, digits and _ (optionally schema.table)"
            ));
        }
        let quote = |ps: &[&str]| {
            ps.iter()
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join(".")
        };
        let last = format!("{}_dead_letters", parts[parts.len() - 1]);
        let mut dead = parts.clone();
        let n = dead.len();
        dead[n - 1] = &last;
        let keys_last = format!("{}_request_keys", parts[parts.len() - 1]);
        let mut keys = parts.clone();
        keys[n - 1] = &keys_last;
        Ok(TableName {
            plain: s.to_string(),
            quoted: quote(&parts),
            dead_quoted: quote(&dead),
            keys_quoted: quote(&keys),
            last: parts[parts.len() - 1].to_string(),
            schema_prefix: match parts.len() {
                2 => format!("{}.", quote(&parts[..1])),
                _ => String::new(),
            },
        })
    }

    /// The table's own name, without its schema, unquoted.
    pub fn last(&self) -> &str {
        &self.last
    }

    /// The records table, quoted.
    pub fn records(&self) -> &str {
        &self.quoted
    }

    /// The dead-letter table, quoted.
    pub fn dead_letters(&self) -> &str {
        &self.dead_quoted
    }

    /// The table of the idempotency keys written (`<table>_request_keys`), quoted.
    pub fn request_keys(&self) -> &str {
        &self.keys_quoted
    }

    /// Another table in this table's schema (a partition), quoted: `name` must be a plain
    /// name (letters, digits, `_`), as [`spillway_core::Partitioning`] makes them.
    pub fn sibling(&self, name: &str) -> String {
        format!("{}\"{name}\"", self.schema_prefix)
    }
}

/// A small connection pool: at most `size` connections; a connection that failed is dropped
/// and the next user opens a fresh one.
pub struct Pool {
    config: Config,
    tls: MakeTlsConnector,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("available", &self.permits.available_permits())
            .finish()
    }
}

/// A connection borrowed from the [`Pool`]. It goes back to the pool only through
/// [`Conn::release`] after a successful use; dropped any other way (an error, a cancelled
/// future mid-transaction) it is closed, so no one inherits a half-finished session.
pub struct Conn<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: SemaphorePermit<'a>,
}

impl std::fmt::Debug for Conn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("open", &self.client.is_some())
            .finish()
    }
}

impl Conn<'_> {
    /// The client.
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("present until drop")
    }

    /// The client, mutably (for transactions).
    pub fn client_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until drop")
    }

    /// Returns the connection to the pool for the next user.
    pub fn release(mut self) {
        if let Some(c) = self.client.take().filter(|c| !c.is_closed()) {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(c);
        }
    }
}

impl Pool {
    /// A pool for `url`, with a statement timeout and TCP keepalives so a hung server is noticed.
    pub fn new(
        url: &str,
        size: usize,
        statement_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        let mut config: Config = url
            .parse()
            .map_err(|e| format!("not a Postgres URL: {e}"))?;
        let options = format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            statement_timeout.as_millis(),
            (statement_timeout * 2).as_millis()
        );
        let options = match config.get_options() {
            Some(user) => format!("{user} {options}"),
            None => options,
        };
        config
            .options(&options)
            .connect_timeout(connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .application_name("spillway-consumer");
        let tls = native_tls::TlsConnector::builder()
            .build()
            .map_err(|e| format!("TLS setup failed: {e}"))?;
        Ok(Pool {
            config,
            tls: MakeTlsConnector::new(tls),
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size.max(1)),
        })
    }

    /// Borrows a connection, opening one if none is idle.
    pub async fn get(&self) -> Result<Conn<'_>, PgFailure> {
        let turn = self.wait_turn().await?;
        self.open(turn).await
    }

    /// Waits until one of the pool's connections is free. Waiting here is not a sign of an
    /// outage (other partitions are flushing), so no deadline should count it.
    pub async fn wait_turn(&self) -> Result<SemaphorePermit<'_>, PgFailure> {
        self.permits
            .acquire()
            .await
            .map_err(|_| client_failure("pool closed"))
    }

    /// Takes an idle connection, or opens one, for the holder of `turn`.
    pub async fn open<'a>(&'a self, turn: SemaphorePermit<'a>) -> Result<Conn<'a>, PgFailure> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let client = match idle.filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => {
                let (client, connection) = self
                    .config
                    .connect(self.tls.clone())
                    .await
                    .map_err(|e| classify(&e))?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "Postgres connection ended");
                    }
                });
                client
            }
        };
        Ok(Conn {
            client: Some(client),
            pool: self,
            _permit: turn,
        })
    }
}

/// Creates the tables if missing, under an advisory lock so several consumers can start at once.
/// Versioned: each migration runs once per table and is recorded. Then each table follows its
/// mapping ([`follow_mapping`]) and, written by key, gets its unique index.
pub async fn migrate(client: &mut Client, targets: &Targets) -> Result<(), PgFailure> {
    let tx = client.transaction().await.map_err(|e| classify(&e))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('spillway-migrate'))",
        &[],
    )
    .await
    .map_err(|e| classify(&e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS spillway_schema_migrations (
             target text NOT NULL, version int NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (target, version));
         CREATE TABLE IF NOT EXISTS spillway_offsets (
             consumer text NOT NULL, topic text NOT NULL, kafka_partition int NOT NULL,
             next_offset bigint NOT NULL, next_index int NOT NULL,
             updated_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (consumer, topic, kafka_partition));
         CREATE TABLE IF NOT EXISTS spillway_producer_sequences (
             consumer text NOT NULL, topic text NOT NULL, kafka_partition int NOT NULL,
             producer bigint NOT NULL, sequence bigint NOT NULL,
             next_offset bigint NOT NULL, next_index int NOT NULL,
             updated_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (consumer, topic, kafka_partition, producer));",
    )
    .await
    .map_err(|e| classify(&e))?;
    // Before routing, positions were kept under the table's name; a consumer's --name
    // defaults to it, so renaming the column keeps every position.
    let keyed_by_table = tx
        .query_opt(
            "SELECT 1 FROM pg_attribute WHERE attrelid = 'spillway_offsets'::regclass
               AND attname = 'table_name' AND NOT attisdropped",
            &[],
        )
        .await
        .map_err(|e| classify(&e))?
        .is_some();
    if keyed_by_table {
        tx.batch_execute("ALTER TABLE spillway_offsets RENAME COLUMN table_name TO consumer")
            .await
            .map_err(|e| classify(&e))?;
        tracing::info!(
            "spillway_offsets: the positions kept under each table's name are now kept under \
             the consumer's --name (by default the table's name): none is lost"
        );
    }
    for t in &targets.tables {
        create_table(&tx, t).await?;
    }
    tx.commit().await.map_err(|e| classify(&e))
}

/// One table and its dead letters, in the migration's transaction. A table partitioned by
/// time (`--partition-by`) is created `PARTITION BY RANGE` with its default partition; one
/// that exists must already be partitioned so ([`crate::partitions::check_partitioned`]).
async fn create_table(
    tx: &tokio_postgres::Transaction<'_>,
    target: &Target,
) -> Result<(), PgFailure> {
    let (table, mapping) = (&target.table, &target.mapping);
    if let Some(p) = &target.partitioning {
        crate::partitions::check_partitioned(tx, table, p).await?;
    }
    let applied: Option<i32> = tx
        .query_one(
            "SELECT max(version) FROM spillway_schema_migrations WHERE target = $1",
            &[&table.plain],
        )
        .await
        .map_err(|e| classify(&e))?
        .get(0);
    if applied.unwrap_or(0) < 1 {
        // A table created without `data` (--keep-data false) gets it back, nullable, if the
        // mapping keeps it later (follow_mapping).
        let data = if mapping.keep_data() {
            ", data jsonb NOT NULL"
        } else {
            ""
        };
        // A mapped partition column must be there from the start; follow_mapping adds the rest.
        let partitioned = match &target.partitioning {
            Some(p) => {
                let column = mapping
                    .columns()
                    .iter()
                    .find(|c| c.name == p.column())
                    .map(|c| format!(", {} {}", c.quoted_name(), c.ty.sql()))
                    .unwrap_or_default();
                format!("{column}) PARTITION BY RANGE (\"{}\"", p.column())
            }
            None => String::new(),
        };
        // A partitioned table has no storage of its own: its partitions get the clause.
        let storage = match &target.partitioning {
            Some(_) => String::new(),
            None => crate::upsert::storage_clause(mapping),
        };
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {r} (
                 kafka_partition int NOT NULL, kafka_offset bigint NOT NULL, record_index int NOT NULL,
                 received_at timestamptz NOT NULL{data}{partitioned}){storage};
             CREATE TABLE IF NOT EXISTS {d} (
                 kafka_partition int NOT NULL, kafka_offset bigint NOT NULL, record_index int NOT NULL,
                 received_at timestamptz, raw text NOT NULL, error text NOT NULL,
                 dead_at timestamptz NOT NULL DEFAULT now());",
            r = table.records(),
            d = table.dead_letters()
        ))
        .await
        .map_err(|e| classify(&e))?;
        tx.execute(
            "INSERT INTO spillway_schema_migrations (target, version) VALUES ($1, 1)",
            &[&table.plain],
        )
        .await
        .map_err(|e| classify(&e))?;
    }
    if applied.unwrap_or(0) < 2 {
        // Each Idempotency-Key written to the table, with the message that owns it (the first
        // written): `spillway_core::idempotency`.
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {k} (
                 key text PRIMARY KEY, topic text NOT NULL, kafka_partition int NOT NULL,
                 kafka_offset bigint NOT NULL, first_seen timestamptz NOT NULL DEFAULT now());
             CREATE INDEX ON {k} (first_seen);",
            k = table.request_keys(),
        ))
        .await
        .map_err(|e| classify(&e))?;
        tx.execute(
            "INSERT INTO spillway_schema_migrations (target, version) VALUES ($1, 2)",
            &[&table.plain],
        )
        .await
        .map_err(|e| classify(&e))?;
    }
    follow_mapping(tx, table, mapping).await?;
    if target.partitioning.is_some() {
        crate::partitions::ensure_default_partition(tx, table, mapping).await?;
    }
    if let Some(upsert) = mapping.upsert() {
        crate::upsert::ensure_key_index(tx, table, upsert).await?;
    }
    Ok(())
}

/// Makes the records table fit the mapping: a mapped column it lacks is added (nullable: rows
/// already there have no value; `!` is the consumer's check on new rows), and `data` if the
/// mapping keeps it and the table was created without. Nothing is ever dropped or retyped: a
/// column whose type differs from the mapping, or a `NOT NULL data` column the mapping does
/// not write, stops the start with what to do.
async fn follow_mapping(
    tx: &tokio_postgres::Transaction<'_>,
    table: &TableName,
    mapping: &Mapping,
) -> Result<(), PgFailure> {
    let existing: BTreeMap<String, (String, bool)> = tx
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL), a.attnotnull
             FROM pg_attribute a
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table.records()],
        )
        .await
        .map_err(|e| classify(&e))?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let fatal = |message: String| PgFailure {
        class: ErrorClass::Fatal,
        message,
        row: None,
    };
    let mut conflicts = Vec::new();
    for c in mapping.columns() {
        if let Some((ty, _)) = existing.get(&c.name) {
            if ty != c.ty.catalog_name() {
                conflicts.push(format!(
                    "column {name} of {t} is {ty}, but the mapping {c} makes it {want}",
                    name = c.quoted_name(),
                    t = table.records(),
                    want = c.ty.sql(),
                ));
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(fatal(format!(
            "the records table does not fit the column mapping: {}. Spillway never retypes a \
             column and has written nothing: change the mapping's type to the column's, map the \
             value to a new column name, or retype the column yourself (ALTER TABLE ... ALTER \
             COLUMN ... TYPE ... USING ...) and start again",
            conflicts.join("; ")
        )));
    }
    match existing.get("data") {
        Some((_, true)) if !mapping.keep_data() => {
            return Err(fatal(format!(
                "--keep-data false, but {t}.data is NOT NULL, so rows without it would be \
                 refused; nothing was written. Keep the data (--keep-data true), or allow rows \
                 without it: ALTER TABLE {t} ALTER COLUMN data DROP NOT NULL",
                t = table.records()
            )))
        }
        None if mapping.keep_data() => {
            tx.batch_execute(&format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS data jsonb",
                table.records()
            ))
            .await
            .map_err(|e| classify(&e))?;
            tracing::info!(table = %table.plain, "added column data jsonb (--keep-data true)");
        }
        _ => {}
    }
    for c in mapping.columns() {
        if !existing.contains_key(&c.name) {
            tx.batch_execute(&format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}",
                table.records(),
                c.quoted_name(),
                c.ty.sql()
            ))
            .await
            .map_err(|e| classify(&e))?;
            tracing::info!(table = %table.plain, column = %c, "added a mapped column");
        }
    }
    Ok(())
}

/// The stored position of a partition for the consumer `name`, creating it at the beginning
/// if it has none.
pub async fn position(
    client: &Client,
    name: &str,
    topic: &str,
    partition: Partition,
) -> Result<Position, PgFailure> {
    create_position(client, name, topic, partition).await?;
    let row = client
        .query_one(
            "SELECT next_offset, next_index FROM spillway_offsets
             WHERE consumer = $1 AND topic = $2 AND kafka_partition = $3",
            &[&name, &topic, &partition],
        )
        .await
        .map_err(|e| classify(&e))?;
    Ok(Position::new(row.get(0), row.get::<_, i32>(1) as u32))
}

/// Stores a position at the beginning for a partition that has none.
async fn create_position(
    client: &Client,
    name: &str,
    topic: &str,
    partition: Partition,
) -> Result<(), PgFailure> {
    client
        .execute(
            "INSERT INTO spillway_offsets (consumer, topic, kafka_partition, next_offset, next_index)
             VALUES ($1, $2, $3, 0, 0) ON CONFLICT DO NOTHING",
            &[&name, &topic, &partition],
        )
        .await
        .map(|_| ())
        .map_err(|e| classify(&e))
}

/// How long a producer's highest sequence is kept after the last batch that moved it. A copy
/// follows its original within the producer's delivery timeout (seconds), so this only has
/// to outlast a consumer that stopped between the two.
pub const PRODUCER_SEQUENCES_KEPT_DAYS: i32 = 7;

/// [`position`], and the highest sequence of each producer whose messages were written before
/// it (those kept less than [`PRODUCER_SEQUENCES_KEPT_DAYS`]; older ones are deleted here).
/// A sequence stored at a position past the partition's (an operator moved the position back
/// to write the records again) is ignored: the messages after the position are then all
/// written, copies included, until the next batch stores the sequences afresh.
pub async fn stored_position(
    client: &Client,
    name: &str,
    topics: &Topics,
    p: Partition,
) -> Result<StoredPosition, PgFailure> {
    let (topic, partition) = topics.split(p).ok_or_else(|| PgFailure {
        class: ErrorClass::Fatal,
        message: format!("partition number {p} belongs to none of the topics {topics}: a bug"),
        row: None,
    })?;
    create_position(client, name, topic, partition).await?;
    client
        .execute(
            "DELETE FROM spillway_producer_sequences
             WHERE consumer = $1 AND topic = $2 AND kafka_partition = $3
               AND updated_at < now() - make_interval(days => $4)",
            &[&name, &topic, &partition, &PRODUCER_SEQUENCES_KEPT_DAYS],
        )
        .await
        .map_err(|e| classify(&e))?;
    // One statement, so the position and the sequences are of one moment.
    let rows = client
        .query(
            "SELECT o.next_offset, o.next_index, s.producer, s.sequence
             FROM spillway_offsets o
             LEFT JOIN spillway_producer_sequences s
               ON s.consumer = o.consumer AND s.topic = o.topic
              AND s.kafka_partition = o.kafka_partition
              AND (s.next_offset, s.next_index) <= (o.next_offset, o.next_index)
             WHERE o.consumer = $1 AND o.topic = $2 AND o.kafka_partition = $3",
            &[&name, &topic, &partition],
        )
        .await
        .map_err(|e| classify(&e))?;
    let first = rows.first().ok_or_else(|| PgFailure {
        class: ErrorClass::Retriable,
        message: format!("spillway_offsets has no position for partition {partition} of {topic}"),
        row: None,
    })?;
    Ok(StoredPosition {
        partition: p,
        position: Position::new(first.get(0), first.get::<_, i32>(1) as u32),
        // Stored as bigint: the bits of the u64s.
        producers: rows
            .iter()
            .filter_map(|r| {
                Some(ProducerSequence {
                    producer: r.get::<_, Option<i64>>(2)? as u64,
                    sequence: r.get::<_, Option<i64>>(3)? as u64,
                })
            })
            .collect(),
    })
}

/// Every stored position of `topic` for the consumer `name`.
pub async fn positions(
    client: &Client,
    name: &str,
    topic: &str,
) -> Result<BTreeMap<Partition, Position>, PgFailure> {
    let rows = client
        .query(
            "SELECT kafka_partition, next_offset, next_index FROM spillway_offsets
             WHERE consumer = $1 AND topic = $2",
            &[&name, &topic],
        )
        .await
        .map_err(|e| classify(&e))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), Position::new(r.get(1), r.get::<_, i32>(2) as u32)))
        .collect())
}

/// What a failure that names no record (connecting, a deadline, the bookkeeping statements)
/// means for a flush: fatal stays fatal, anything else is retried.
pub fn flush_result(f: PgFailure) -> FlushResult {
    match f.class {
        ErrorClass::Fatal => FlushResult::Fatal { reason: f.message },
        _ => FlushResult::Retriable { reason: f.message },
    }
}

/// Which statement of the flush failed: the same SQLSTATE means different things in each.
#[derive(Clone, Copy)]
enum Stage {
    /// BEGIN, the position's compare-and-set and the producers' sequences beside it, COMMIT: a
    /// data error here is not a record's.
    Bookkeeping,
    /// The COPY of the rows: a data error names a record.
    Rows,
    /// The dead-letter insert: a data error is the dead-letter table's (a constraint or a
    /// trigger someone added), never a row's.
    DeadLetters,
    /// The merge of staged rows (`--upsert-key`): a data error (a constraint on the table)
    /// names no row.
    Merge,
    /// The COMMIT: a deferred constraint on the rows may fire here, naming no row.
    Commit,
}

/// `rows[i]` is the batch entry of the i-th row the failed statement sent (only a COPY's
/// error names a row).
fn staged(stage: Stage, e: &tokio_postgres::Error, rows: &[usize]) -> FlushResult {
    let f = classify(e);
    if f.class != ErrorClass::Poison {
        return flush_result(f);
    }
    match stage {
        Stage::Bookkeeping => flush_result(f),
        Stage::Rows => FlushResult::Poison {
            culprit: f.row.and_then(|row| rows.get(row).copied()),
            reason: f.message,
        },
        Stage::Commit | Stage::Merge => FlushResult::Poison {
            culprit: None,
            reason: f.message,
        },
        Stage::DeadLetters => FlushResult::DeadLettersRejected { reason: f.message },
    }
}

/// Where a partition's position is kept: the consumer's name, the topic, Kafka's number.
type Place<'a> = (&'a str, &'a str, i32);

/// Moves the partition's position from the batch's start to its end, only if it still holds
/// the start (unless a test runs the `no-compare-and-set` mutation). Returns whether it moved.
async fn move_position(
    tx: &tokio_postgres::Transaction<'_>,
    (name, topic, partition): Place<'_>,
    batch: &Batch,
) -> Result<bool, tokio_postgres::Error> {
    let sql = if batch.check_start {
        "UPDATE spillway_offsets SET next_offset = $4, next_index = $5, updated_at = now()
         WHERE consumer = $1 AND topic = $2 AND kafka_partition = $3
           AND next_offset = $6 AND next_index = $7"
    } else {
        "INSERT INTO spillway_offsets (consumer, topic, kafka_partition, next_offset, next_index)
         SELECT $1, $2, $3, $4, $5 WHERE $6::bigint IS NOT NULL AND $7::int IS NOT NULL
         ON CONFLICT (consumer, topic, kafka_partition)
         DO UPDATE SET next_offset = $4, next_index = $5, updated_at = now()"
    };
    let moved = tx
        .execute(
            sql,
            &[
                &name,
                &topic,
                &partition,
                &batch.end.offset,
                &(batch.end.index as i32),
                &batch.start.offset,
                &(batch.start.index as i32),
            ],
        )
        .await?;
    Ok(moved == 1)
}

/// Stores, beside the position the batch moves, the highest sequence of each producer whose
/// messages the batch ends ([`Batch::producer_sequences`]), and that position. Batches of a
/// partition commit in order (the compare-and-set), so each replaces what the one before
/// stored.
async fn store_producer_sequences(
    tx: &tokio_postgres::Transaction<'_>,
    (name, topic, partition): Place<'_>,
    batch: &Batch,
    ended: &[ProducerSequence],
) -> Result<(), tokio_postgres::Error> {
    if ended.is_empty() {
        return Ok(());
    }
    let producers: Vec<i64> = ended.iter().map(|at| at.producer as i64).collect();
    let sequences: Vec<i64> = ended.iter().map(|at| at.sequence as i64).collect();
    tx.execute(
        "INSERT INTO spillway_producer_sequences
             (consumer, topic, kafka_partition, producer, sequence, next_offset, next_index)
         SELECT $1, $2, $3, p, q, $6, $7 FROM unnest($4::bigint[], $5::bigint[]) AS u(p, q)
         ON CONFLICT (consumer, topic, kafka_partition, producer)
         DO UPDATE SET sequence = EXCLUDED.sequence, next_offset = EXCLUDED.next_offset,
                       next_index = EXCLUDED.next_index, updated_at = now()",
        &[
            &name,
            &topic,
            &partition,
            &producers,
            &sequences,
            &batch.end.offset,
            &(batch.end.index as i32),
        ],
    )
    .await
    .map(|_| ())
}

/// One table's share of a batch in COPY BINARY, ready before a connection is taken.
#[derive(Debug)]
pub struct EncodedRows {
    data: bytes::Bytes,
    /// The batch entry of each record converted into a row for this table, in batch order
    /// (whether or not it decides its key's row: each claims its request's idempotency key).
    converted: Vec<usize>,
    /// The batch entry of each row sent, in COPY order: all the rows, or, written by a key
    /// that compares as encoded, only those that decide their key's row
    /// ([`spillway_core::CopyRows::finish_deciding`]).
    entries: Vec<usize>,
    /// The batch entries dead-lettered into this table's dead letters.
    dead: Vec<usize>,
    /// For a table partitioned by `received_at`: the intervals its rows fall in.
    ranges: BTreeSet<Range>,
}

impl EncodedRows {
    /// Records this table gets: rows and dead letters.
    pub fn records(&self) -> usize {
        self.converted.len() + self.dead.len()
    }

    /// For a table partitioned by `received_at`, the intervals its rows fall in (the
    /// partitions the flush needs); empty otherwise.
    pub fn ranges(&self) -> &BTreeSet<Range> {
        &self.ranges
    }
}

/// A batch routed and encoded: one [`EncodedRows`] per table of [`Targets`], in its order.
pub type Encoded = Vec<EncodedRows>;

/// Routes each record of the batch to its table and converts the rows for that table's
/// mapping. A record whose value does not convert makes the flush
/// [`FlushResult::Unconvertible`] with every such record and its reason: the core
/// dead-letters them and the rest is flushed again. Nothing has been sent at that point.
pub fn encode_rows(batch: &Batch, targets: &Targets) -> Result<Encoded, FlushResult> {
    encode_rows_without(batch, targets, &BTreeSet::new())
}

/// [`encode_rows`] leaving out the entries `skip` (indexes into the batch's entries): neither
/// rows nor dead letters.
fn encode_rows_without(
    batch: &Batch,
    targets: &Targets,
    skip: &BTreeSet<usize>,
) -> Result<Encoded, FlushResult> {
    let mut found = Vec::new();
    let router = targets.router(batch.partition);
    let routes: Vec<usize> = batch
        .entries
        .iter()
        .map(|e| router.route(&e.record.payload, &mut found))
        .collect();
    // Each table's buffer, sized for its rows in one pass over the batch.
    let mut sizes = vec![0; targets.tables.len()];
    for (e, t) in batch.entries.iter().zip(&routes) {
        if e.is_row() {
            let columns = targets.tables[*t].mapping.columns().len();
            sizes[*t] += e.record.payload.len() + ROW_OVERHEAD + 16 * columns;
        }
    }
    let mut buffers: Vec<_> = targets
        .tables
        .iter()
        .zip(sizes)
        .map(|(target, size)| (CopyRows::new(&target.mapping, size), Vec::new(), Vec::new()))
        .collect();
    let mut refused = Vec::new();
    for (i, (e, t)) in batch.entries.iter().zip(&routes).enumerate() {
        let (copy, entries, dead) = &mut buffers[*t];
        if e.copy || skip.contains(&i) {
            continue;
        } else if e.dead_reason.is_some() {
            dead.push(i);
        } else if let Err(err) = copy.push(&e.record) {
            refused.push((i, err.to_string()));
        } else {
            entries.push(i);
        }
    }
    if !refused.is_empty() {
        return Err(FlushResult::Unconvertible { records: refused });
    }
    Ok(buffers
        .into_iter()
        .zip(&targets.tables)
        .map(|((copy, entries, dead), target)| {
            let ranges = match &target.partitioning {
                Some(p) if p.by_received_at() => p.ranges_of(
                    entries
                        .iter()
                        .filter_map(|i| batch.entries.get(*i))
                        .map(|e| e.record.received_at_micros),
                ),
                _ => BTreeSet::new(),
            };
            let (data, kept) = copy.finish_deciding();
            EncodedRows {
                ranges,
                data: bytes::Bytes::from(data),
                entries: kept
                    .iter()
                    .filter_map(|k| entries.get(*k).copied())
                    .collect(),
                converted: entries,
                dead,
            }
        })
        .collect())
}

/// Where a table's rows go: appended, or merged by key.
#[derive(Debug, Clone)]
pub struct Target {
    /// The table.
    pub table: TableName,
    /// Its columns.
    pub mapping: Mapping,
    /// The COPY column list ([`Mapping::copy_columns`]).
    columns: String,
    /// With `--upsert-key`: the staging table and merge.
    merge: Option<MergeSql>,
    /// With `--partition-by`: the table's time partitions.
    pub partitioning: Option<Partitioning>,
}

impl Target {
    /// Where `mapping`'s rows go in `table`.
    pub fn new(table: TableName, mapping: &Mapping) -> Self {
        Target {
            merge: MergeSql::new(&table, mapping),
            columns: mapping.copy_columns(),
            mapping: mapping.clone(),
            table,
            partitioning: None,
        }
    }

    /// The same table, partitioned by time (`None`: not).
    pub fn partitioned(mut self, partitioning: Option<Partitioning>) -> Self {
        if partitioning.is_some() {
            self.merge = MergeSql::partitioned(&self.table, &self.mapping);
        }
        self.partitioning = partitioning;
        self
    }
}

/// Every table a consumer writes (the records table first), the topics it reads and the
/// routing between them.
#[derive(Debug, Clone)]
pub struct Targets {
    /// The tables; the routers' indexes point here.
    pub tables: Vec<Target>,
    /// The topics the batches come from.
    pub topics: Topics,
    /// Per topic (in the order of `topics`), which table each record goes to.
    routers: Vec<Router>,
}

impl Targets {
    /// One table of one topic, no routing.
    pub fn single(target: Target, topic: &str) -> Self {
        Targets {
            tables: vec![target],
            topics: Topics::one(topic),
            routers: vec![Router::default()],
        }
    }

    /// The routing of the records of partition `p` (of one of `topics`).
    pub fn router(&self, p: Partition) -> &Router {
        self.routers
            .get(topics::topic_index(p))
            .unwrap_or(&self.routers[0])
    }

    /// The topic and Kafka's number of partition `p`, where its position is kept.
    pub fn place(&self, p: Partition) -> Result<(&str, i32), PgFailure> {
        self.topics.split(p).ok_or_else(|| PgFailure {
            class: ErrorClass::Fatal,
            message: format!(
                "partition number {p} belongs to none of the topics {}: a bug; nothing was written",
                self.topics
            ),
            row: None,
        })
    }

    /// The records table, the routed tables and the rules of `settings`.
    pub fn new(settings: &crate::Settings) -> Self {
        let mut tables = vec![Target::new(settings.table.clone(), &settings.mapping)
            .partitioned(settings.partitioning.clone())];
        tables.extend(
            settings.routed.iter().map(|r| {
                Target::new(r.table.clone(), &r.mapping).partitioned(r.partitioning.clone())
            }),
        );
        let rules = settings
            .routes
            .iter()
            .map(|(when, table)| {
                let at = tables
                    .iter()
                    .position(|t| &t.table.plain == table)
                    .unwrap_or(routing::DEFAULT_TABLE);
                (when.clone(), at)
            })
            .collect();
        let routers = if settings.topics.several() {
            // Each topic's records go to its table (routes are refused with several topics).
            let at = |name: &String| {
                tables
                    .iter()
                    .position(|t| &t.table.plain == name)
                    .unwrap_or(routing::DEFAULT_TABLE)
            };
            let mut routers = vec![Router::default()];
            routers.extend(settings.topic_tables[1..].iter().map(|t| Router::to(at(t))));
            routers
        } else {
            vec![Router::new(rules)]
        };
        Targets {
            tables,
            topics: settings.topics.clone(),
            routers,
        }
    }
}

/// Writes a batch in one transaction: the partition's position (kept under the consumer's
/// `name`) moves from `start` to `end` (only if it still holds `start`) with the producers'
/// highest sequences ([`stored_position`]), each table's rows
/// (encoded by [`encode_rows`]) go in by COPY BINARY (appended, or into a staging table and
/// merged by key: [`crate::upsert`]), the dead letters beside them. Each error is classified
/// by the statement that raised it. Merges also say what they did. Before the rows, the
/// batch claims its messages' idempotency keys ([`claim_keys`]): the records of a message
/// that does not own its key are left out.
pub async fn flush(
    client: &mut Client,
    targets: &Targets,
    name: &str,
    batch: &Batch,
    encoded: Encoded,
) -> Flushed {
    let mut flushed = Flushed {
        result: FlushResult::Written,
        merged: None,
        repeated: Repeated::default(),
        per_table: encoded.iter().map(EncodedRows::records).collect(),
    };
    (flushed.result, flushed.merged) =
        flush_in(client, targets, name, batch, encoded, &mut flushed).await;
    flushed
}

/// What a flush did.
#[derive(Debug)]
pub struct Flushed {
    /// The outcome for the core.
    pub result: FlushResult,
    /// With tables written by key: what the merges did.
    pub merged: Option<Merged>,
    /// Records left out as repeats of a request already written (by its idempotency key).
    pub repeated: Repeated,
    /// Records (rows and dead letters) each table got, in the order of [`Targets::tables`].
    pub per_table: Vec<usize>,
}

/// Records a flush left out because their request's idempotency key belongs to another
/// message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repeated {
    /// Rows not written.
    pub rows: usize,
    /// Dead letters not written.
    pub dead_letters: usize,
}

async fn flush_in(
    client: &mut Client,
    targets: &Targets,
    name: &str,
    batch: &Batch,
    encoded: Encoded,
    flushed: &mut Flushed,
) -> (FlushResult, Option<Merged>) {
    use Stage::*;
    let place = match targets.place(batch.partition) {
        Ok((topic, partition)) => (name, topic, partition),
        Err(f) => return (flush_result(f), None),
    };
    if !batch.position_with_rows {
        // The `position-before-rows` mutation: the position commits on its own, first.
        let moved = async {
            let tx = client.transaction().await?;
            let moved = move_position(&tx, place, batch).await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(moved)
        }
        .await;
        match moved {
            Ok(true) => {}
            Ok(false) => return (FlushResult::Fenced, None),
            Err(e) => return (staged(Bookkeeping, &e, &[]), None),
        }
    }
    let tx = match client.transaction().await {
        Ok(tx) => tx,
        Err(e) => return (staged(Bookkeeping, &e, &[]), None),
    };
    let ended = batch.producer_sequences();
    if batch.position_with_rows {
        // The row lock taken here serialises competing writers of one partition: a zombie
        // waits, then finds the position moved and rolls back. The producers' sequences go
        // in the same round trip (the server runs the two in order).
        let moved = futures::future::try_join(
            move_position(&tx, place, batch),
            store_producer_sequences(&tx, place, batch, &ended),
        )
        .await
        .map(|(moved, ())| moved);
        match moved {
            Ok(true) => {}
            Ok(false) => {
                let result = match tx.rollback().await {
                    Ok(()) => FlushResult::Fenced,
                    Err(e) => staged(Bookkeeping, &e, &[]),
                };
                return (result, None);
            }
            Err(e) => return (staged(Bookkeeping, &e, &[]), None),
        }
    }
    if !batch.position_with_rows {
        if let Err(e) = store_producer_sequences(&tx, place, batch, &ended).await {
            return (staged(Bookkeeping, &e, &[]), None);
        }
    }
    let encoded = match claim_keys(&tx, targets, place, batch, encoded).await {
        Ok((encoded, repeated)) => {
            if repeated != Repeated::default() {
                flushed.per_table = encoded.iter().map(EncodedRows::records).collect();
            }
            flushed.repeated = repeated;
            encoded
        }
        Err(result) => return (result, None),
    };
    let mut merged: Option<Merged> = None;
    for (target, rows) in targets.tables.iter().zip(&encoded) {
        if rows.entries.is_empty() {
            continue;
        }
        let statement = match &target.merge {
            Some(m) => {
                if let Err(e) = m.prepare(&tx).await {
                    return (staged(Bookkeeping, &e, &[]), None);
                }
                m.copy_statement(&target.columns)
            }
            None => format!(
                "COPY {} ({}) FROM STDIN (FORMAT binary)",
                target.table.records(),
                target.columns
            ),
        };
        let copied = async {
            let sink = tx.copy_in::<_, bytes::Bytes>(&statement).await?;
            futures::pin_mut!(sink);
            sink.send(rows.data.clone()).await?;
            sink.as_mut().finish().await
        };
        if let Err(e) = copied.await {
            return (staged(Rows, &e, &rows.entries), None);
        }
        if let Some(m) = &target.merge {
            match m.merge(&tx, rows.converted.len() as u64).await {
                Ok(counts) => merged = Some(merged.unwrap_or_default() + counts),
                Err(e) => return (staged(Merge, &e, &[]), None),
            }
        }
    }
    for (target, rows) in targets.tables.iter().zip(&encoded) {
        if rows.dead.is_empty() {
            continue;
        }
        let dead: Vec<(&Record, &str)> = rows
            .dead
            .iter()
            .filter_map(|i| batch.entries.get(*i))
            .filter_map(|e| e.dead_reason.as_deref().map(|why| (&e.record, why)))
            .collect();
        if let Err(e) = insert_dead_letters(&tx, &target.table, &dead).await {
            return (staged(DeadLetters, &e, &[]), None);
        }
    }
    match tx.commit().await {
        Ok(()) => (FlushResult::Written, merged),
        Err(e) => (staged(Commit, &e, &[]), None),
    }
}

/// Claims, for each table, the idempotency keys of the batch's messages that go to it (each
/// key for its first message, unless another message owns it already: an upsert that keeps
/// and locks the existing owner, waiting for a concurrent claim to commit or roll back), with
/// the owners returned by the same statement, and encodes the batch again without the records
/// of messages that do not own their key ([`spillway_core::idempotency`]).
async fn claim_keys(
    tx: &tokio_postgres::Transaction<'_>,
    targets: &Targets,
    (_, topic, partition): Place<'_>,
    batch: &Batch,
    encoded: Encoded,
) -> Result<(Encoded, Repeated), FlushResult> {
    let mut skip = BTreeSet::new();
    for (target, rows) in targets.tables.iter().zip(&encoded) {
        let entries = || rows.converted.iter().chain(&rows.dead).copied();
        let claims = idempotency::claims(batch, entries());
        if claims.is_empty() {
            continue;
        }
        let keys: Vec<&str> = claims.iter().map(|(k, _)| &**k).collect();
        let offsets: Vec<i64> = claims.iter().map(|(_, o)| *o).collect();
        let table = target.table.request_keys();
        // One statement claims every key and returns each one's owner: this batch's message
        // where the key was free, else the row already there, which DO UPDATE (a no-op write)
        // locks until this transaction ends, so the key expiry cannot delete it in between
        // (`keys.rs`; with DO NOTHING and a separate SELECT it could, and the repeat would
        // have been written). `claims` holds each key once, as DO UPDATE requires.
        let claim = format!(
            "INSERT INTO {table} AS t (key, topic, kafka_partition, kafka_offset)
             SELECT k, $2, $3, o FROM unnest($1::text[], $4::bigint[]) AS u(k, o)
             ON CONFLICT (key) DO UPDATE SET key = t.key
             RETURNING t.key, t.topic, t.kafka_partition, t.kafka_offset"
        );
        let owners = tx
            .query(&claim, &[&keys, &topic, &partition, &offsets])
            .await
            .map_err(|e| staged(Stage::Bookkeeping, &e, &[]))?;
        let owners: BTreeMap<String, idempotency::Owner> = owners
            .iter()
            .map(|r| {
                let (key, topic, kafka): (String, String, i32) = (r.get(0), r.get(1), r.get(2));
                // Owned by a topic this consumer does not read: never this message.
                let p = targets
                    .topics
                    .number(&topic, kafka)
                    .unwrap_or(Partition::MIN);
                (key, (p, r.get::<_, i64>(3)))
            })
            .collect();
        skip.extend(idempotency::repeated(batch, entries(), |k| {
            owners.get(k).copied()
        }));
    }
    if skip.is_empty() {
        return Ok((encoded, Repeated::default()));
    }
    let repeated = Repeated {
        rows: skip
            .iter()
            .filter(|i| batch.entries.get(**i).is_some_and(|e| e.is_row()))
            .count(),
        dead_letters: skip
            .iter()
            .filter(|i| {
                batch
                    .entries
                    .get(**i)
                    .is_some_and(|e| e.dead_reason.is_some())
            })
            .count(),
    };
    Ok((encode_rows_without(batch, targets, &skip)?, repeated))
}

/// Inserts dead letters with their reasons into `table`'s dead-letter table.
async fn insert_dead_letters(
    tx: &tokio_postgres::Transaction<'_>,
    table: &TableName,
    dead: &[(&Record, &str)],
) -> Result<u64, tokio_postgres::Error> {
    let partitions: Vec<i32> = dead
        .iter()
        .map(|(r, _)| topics::kafka_partition(r.partition))
        .collect();
    let offsets: Vec<i64> = dead.iter().map(|(r, _)| r.offset).collect();
    let indexes: Vec<i32> = dead.iter().map(|(r, _)| r.index as i32).collect();
    let received: Vec<Option<SystemTime>> = dead
        .iter()
        .map(|(r, _)| {
            (r.received_at_micros > 0)
                .then(|| UNIX_EPOCH + Duration::from_micros(r.received_at_micros as u64))
        })
        .collect();
    let raw: Vec<String> = dead.iter().map(|(r, _)| printable(&r.payload)).collect();
    let errors: Vec<String> = dead
        .iter()
        .map(|(_, why)| printable(why.as_bytes()))
        .collect();
    tx.execute(
        &format!(
            "INSERT INTO {} (kafka_partition, kafka_offset, record_index, received_at, raw, error)
             SELECT * FROM unnest($1::int[], $2::bigint[], $3::int[], $4::timestamptz[], $5::text[], $6::text[])",
            table.dead_letters()
        ),
        &[&partitions, &offsets, &indexes, &received, &raw, &errors],
    )
    .await
}

/// Text Postgres can store: invalid UTF-8 replaced, NUL escaped.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "\\u0000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_context_names_the_row() {
        assert_eq!(
            copy_line("COPY records, line 3, column data: \"x\""),
            Some(2)
        );
        assert_eq!(copy_line("COPY records, line 1"), Some(0));
        assert_eq!(copy_line("SQL function"), None);
        let jsonb = "JSON data, line 1: {\"id\": 17, \"bad\": \"\\u0000...\nCOPY records, line 2, column data: \"...\"";
        assert_eq!(copy_line(jsonb), Some(1));
    }

    #[test]
    fn table_names_are_validated_and_quoted() {
        let t = TableName::parse("public.events").unwrap();
        assert_eq!(t.records(), "\"public\".\"events\"");
        assert_eq!(t.dead_letters(), "\"public\".\"events_dead_letters\"");
        assert_eq!(t.sibling("events_p2026"), "\"public\".\"events_p2026\"");
        assert_eq!(
            TableName::parse("events")
                .unwrap()
                .sibling("events_default"),
            "\"events_default\""
        );
        assert!(TableName::parse("x; drop table y").is_err());
        assert!(TableName::parse("a.b.c").is_err());
    }

    #[test]
    fn dead_letter_text_is_storable() {
        assert_eq!(printable(b"a\0b\xff"), "a\\u0000b\u{fffd}");
    }
}
