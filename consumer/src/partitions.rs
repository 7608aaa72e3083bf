//! Time partitions (`--partition-by`): the shell of [`spillway_core::partitions`], which decides
//! everything; here are the catalog reads and the DDL.
//!
//! A [`Rotation`] keeps every partitioned table's native range partitions: at start and then
//! every minute it creates the wanted ones that are missing (the interval holding now and two
//! ahead) and drops those past the retention, each change in a transaction of its own that
//! waits at most [`LOCK_TIMEOUT`] for its locks (a change that times out is tried again next
//! round; drops, after one minute, then less often up to an hour, while something holds the
//! table). A flush whose rows need a partition that is not there (a table partitioned by
//! `received_at`) asks for it first ([`Rotation::before_flush`]).
//!
//! Locks: a partition is created standalone (`LIKE` the table) and then attached, which takes
//! only a `SHARE UPDATE EXCLUSIVE` lock on the table, so flushes (`ROW EXCLUSIVE`) go on
//! meanwhile; the default partition is locked while Postgres checks it holds no row of the new
//! range. Dropping a partition takes an `ACCESS EXCLUSIVE` lock on the table (`DETACH ..
//! CONCURRENTLY` is not allowed beside a default partition): flushes wait behind it, at most
//! [`LOCK_TIMEOUT`] plus the drop itself. Several consumers of one table take turns through
//! an advisory lock per table and each re-reads the catalog under it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use spillway_core::partitions::{ExistingPartition, NewPartition, Range};
use spillway_core::{ErrorClass, FlushResult, Mapping, Partitioning};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Transaction};

use crate::pg::{classify, EncodedRows, PgFailure, Pool, TableName, Targets};
use crate::pipeline::Metrics;

/// How long a partition's creation or drop waits for a lock before it gives up until the next
/// round. A flush that needs the table meanwhile waits behind it, so this also bounds how long
/// a drop can hold up a flush (plus the drop itself, a few milliseconds). Nothing is urgent:
/// partitions are made two intervals ahead and a drop can wait, so a short wait tried every
/// minute beats a long one.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long flushes stop asking for a partition Postgres refused for a reason that does not
/// pass by itself (µs): their rows go to the default partition meanwhile.
const REFUSED_FOR: i64 = 60_000_000;

/// How many rows of a default partition a round counts at most (the count is a scan).
const DEFAULT_ROWS_COUNTED: i64 = 10_000;

/// The clock's now in microseconds since the Unix epoch, as the core takes it.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A table's partitions as the catalog has them, read under `UTC` (bounds as instants).
const LIST_PARTITIONS: &str = r"
SELECT c.oid::regclass::text, e.expr = 'DEFAULT',
       CASE WHEN isfinite(b.lo) THEN (extract(epoch FROM b.lo) * 1000000)::bigint END,
       CASE WHEN isfinite(b.hi) THEN (extract(epoch FROM b.hi) * 1000000)::bigint END
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS expr) e
CROSS JOIN LATERAL (
    SELECT substring(e.expr FROM 'FROM [(]''([^'']*)''[)]')::timestamptz AS lo,
           substring(e.expr FROM 'TO [(]''([^'']*)''[)]')::timestamptz AS hi) b
WHERE i.inhparent = $1::text::regclass
ORDER BY 3 NULLS FIRST, 1";

/// What the catalog says about one table's partitions.
struct Catalog {
    /// The range partitions.
    ranges: Vec<ExistingPartition>,
    /// The default partition, as SQL names it.
    default: Option<String>,
}

/// Starts a partition change: short lock waits, bounds in UTC, and this table's turn among
/// the consumers that keep it.
async fn begin_change(
    tx: &Transaction<'_>,
    table: &TableName,
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'",
        LOCK_TIMEOUT.as_millis()
    ))
    .await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('spillway-partitions'), hashtext($1))",
        &[&table.plain],
    )
    .await?;
    Ok(())
}

async fn read_catalog(
    tx: &Transaction<'_>,
    table: &TableName,
) -> Result<Catalog, tokio_postgres::Error> {
    let mut catalog = Catalog {
        ranges: Vec::new(),
        default: None,
    };
    for row in tx.query(LIST_PARTITIONS, &[&table.records()]).await? {
        let name: String = row.get(0);
        if row.get::<_, Option<bool>>(1) == Some(true) {
            catalog.default = Some(name);
        } else {
            catalog.ranges.push(ExistingPartition {
                name,
                from: row.get(2),
                to: row.get(3),
            });
        }
    }
    Ok(catalog)
}

/// Refuses to partition a table that exists and is not partitioned by range on the column
/// (in the migration's transaction). Spillway never converts a table.
pub(crate) async fn check_partitioned(
    tx: &Transaction<'_>,
    table: &TableName,
    partitioning: &Partitioning,
) -> Result<(), PgFailure> {
    let found = tx
        .query_opt(
            "SELECT c.relkind::text, p.partstrat::text,
                    (SELECT array_agg(coalesce(a.attname::text, '(an expression)') ORDER BY k.n)
                     FROM unnest(p.partattrs::int2[]) WITH ORDINALITY k(attnum, n)
                     LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum)
             FROM pg_class c LEFT JOIN pg_partitioned_table p ON p.partrelid = c.oid
             WHERE c.oid = to_regclass($1)",
            &[&table.records()],
        )
        .await
        .map_err(|e| classify(&e))?;
    let Some(row) = found else {
        return Ok(());
    };
    let (kind, strategy, columns): (String, Option<String>, Option<Vec<String>>) =
        (row.get(0), row.get(1), row.get(2));
    let column = partitioning.column();
    let what_to_do = format!(
        "Spillway never converts a table and has written nothing: write to a new --table (it is \
         created partitioned), or convert this one yourself (a new table PARTITION BY RANGE \
         (\"{column}\") with a DEFAULT partition, the rows moved into it, the names swapped) and \
         start again, or start without --partition-by"
    );
    let refuse = |what: String| PgFailure {
        class: ErrorClass::Fatal,
        message: format!("{what}. {what_to_do}"),
        row: None,
    };
    match (kind.as_str(), strategy.as_deref(), columns) {
        ("p", Some("r"), Some(c)) if c == [column] => Ok(()),
        ("p", strategy, columns) => Err(refuse(format!(
            "the records table {t} is partitioned by {how} on ({on}), but --partition-by {column} \
             asks for range partitions on \"{column}\"",
            t = table.records(),
            how = match strategy {
                Some("r") => "range",
                Some("l") => "list",
                Some("h") => "hash",
                _ => "another strategy",
            },
            on = columns.unwrap_or_default().join(", "),
        ))),
        _ => Err(refuse(format!(
            "the records table {t} exists and is not partitioned, but --partition-by {column} \
             asks for time partitions",
            t = table.records()
        ))),
    }
}

/// Gives a partitioned table its default partition, `<table>_default`, unless it has one
/// (in the migration's transaction): rows outside every partition's range go there. It is
/// written with `mapping` ([`crate::upsert::storage_clause`]).
pub(crate) async fn ensure_default_partition(
    tx: &Transaction<'_>,
    table: &TableName,
    mapping: &Mapping,
) -> Result<(), PgFailure> {
    let has_one = tx
        .query_opt(
            "SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = $1::text::regclass
               AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'",
            &[&table.records()],
        )
        .await
        .map_err(|e| classify(&e))?
        .is_some();
    if !has_one {
        let name = table.sibling(&Partitioning::default_name(table.last()));
        tx.batch_execute(&format!(
            "CREATE TABLE {name} PARTITION OF {} DEFAULT{}",
            table.records(),
            crate::upsert::storage_clause(mapping)
        ))
        .await
        .map_err(|e| classify(&e))?;
        tracing::info!(table = %table.plain, partition = %name, "created the default partition (rows outside every partition's range)");
    }
    Ok(())
}

/// What a change did.
enum Done {
    /// The partition was created.
    Created,
    /// The partition (with this range, `None` for MINVALUE or MAXVALUE) was dropped.
    Dropped(Option<i64>, Option<i64>),
    /// Nothing needed doing any more (another consumer did it, or it changed meanwhile).
    NotNeeded,
    /// The default partition holds rows of the range, so it cannot be created.
    DefaultHoldsRows(String),
}

/// Why a change failed.
enum Failed {
    /// Postgres refused it; the connection is still good.
    Refused(tokio_postgres::Error),
    /// The connection broke or the change ran past its deadline: the connection is closed.
    Broken(String),
}

impl Failed {
    fn is_lock_timeout(&self) -> bool {
        matches!(self, Failed::Refused(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE))
    }

    /// Whether a flush that needs the partition should wait and be retried (rather than write
    /// its rows into the default partition).
    fn is_transient(&self) -> bool {
        match self {
            Failed::Broken(_) => true,
            Failed::Refused(e) => classify(e).class == ErrorClass::Retriable,
        }
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Refused(e) => f.write_str(&classify(e).message),
            Failed::Broken(why) => f.write_str(why),
        }
    }
}

/// One partitioned table and what this process knows of its partitions.
#[derive(Debug)]
struct Kept {
    /// Its index in [`Targets::tables`] (and in a flush's [`EncodedRows`]).
    target: usize,
    table: TableName,
    partitioning: Partitioning,
    /// Each new partition's storage clause ([`crate::upsert::storage_clause`]).
    storage: String,
    /// The range partitions as last read or changed: a flush checks its rows against it.
    known: Mutex<Vec<ExistingPartition>>,
    /// Ranges whose partition the default partition's rows block (logged once each).
    blocked: Mutex<BTreeSet<Range>>,
    /// Wanted ranges other partitions cover in part (logged once each).
    overlapped: Mutex<BTreeSet<Range>>,
    /// Whether the default partition held rows at the last count.
    default_had_rows: Mutex<bool>,
    /// Changes that gave up waiting for a lock in a row, and when rounds try again (µs).
    held_off: Mutex<(u32, i64)>,
    /// Ranges a flush asked for and Postgres refused (not for a while: a permission, a
    /// name taken), and until when flushes write their rows to the default partition (µs).
    refused: Mutex<BTreeMap<Range, i64>>,
}

impl Kept {
    /// Of a flush's `ranges`, the partitions to make first: not there as far as this process
    /// knows, not expired, and not refused (blocked by the default partition's rows, or
    /// refused by Postgres within the last minute).
    fn missing_for(&self, ranges: &BTreeSet<Range>, now: i64) -> Vec<NewPartition> {
        let known = lock(&self.known);
        let blocked = lock(&self.blocked);
        let mut refused = lock(&self.refused);
        refused.retain(|_, until| now < *until);
        self.partitioning
            .missing(self.table.last(), ranges, &known, now)
            .into_iter()
            .filter(|m| !blocked.contains(&m.range) && !refused.contains_key(&m.range))
            .collect()
    }
}

/// Keeps the time partitions of every partitioned table a consumer writes.
pub struct Rotation {
    pool: Arc<Pool>,
    tables: Vec<Kept>,
    /// One change at a time in this process (rounds and flushes' requests).
    changing: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    /// Longest a change (or a catalog read) may take, connection included.
    deadline: Duration,
}

impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation")
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Rotation {
    /// The rotation of `targets`' partitioned tables; `None` when none is.
    pub fn new(
        targets: &Targets,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        deadline: Duration,
    ) -> Option<Arc<Self>> {
        let tables: Vec<Kept> = targets
            .tables
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                Some(Kept {
                    target: i,
                    table: t.table.clone(),
                    partitioning: t.partitioning.clone()?,
                    storage: crate::upsert::storage_clause(&t.mapping),
                    known: Mutex::new(Vec::new()),
                    blocked: Mutex::new(BTreeSet::new()),
                    overlapped: Mutex::new(BTreeSet::new()),
                    default_had_rows: Mutex::new(false),
                    held_off: Mutex::new((0, i64::MIN)),
                    refused: Mutex::new(BTreeMap::new()),
                })
            })
            .collect();
        // Each table's series exist from the start, so a rate or an alert sees them at 0.
        for t in &tables {
            let table = &t.table.plain;
            metrics.partitions_created.get(table);
            metrics.partitions_dropped.get(table);
            metrics.partition_failures.get(table);
            metrics.default_rows.get(table);
        }
        (!tables.is_empty()).then(|| {
            Arc::new(Rotation {
                pool,
                tables,
                changing: tokio::sync::Mutex::new(()),
                metrics,
                deadline,
            })
        })
    }

    /// Runs [`Rotation::round`] every `every` until the task is aborted.
    pub fn spawn(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let rotation = self.clone();
        let every = every.max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                rotation.round(now_micros()).await;
            }
        })
    }

    /// For each table: reads its partitions and counts the default partition's rows, creates
    /// the wanted partitions that are missing and drops the expired ones. Failures are logged
    /// and counted; the next round tries again.
    pub async fn round(&self, now: i64) {
        let _turn = self.changing.lock().await;
        let mut conn = match self.connection().await {
            Ok(c) => c,
            Err(why) => {
                tracing::warn!(error = %why, "time partitions: no Postgres connection; trying again next round");
                return;
            }
        };
        let mut clean = true;
        for t in &self.tables {
            match self.upkeep(conn.client_mut(), t, now).await {
                Ok(ok) => clean &= ok,
                Err(why) => {
                    tracing::warn!(table = %t.table.plain, error = %why, "time partitions: the connection broke; trying again next round");
                    return;
                }
            }
        }
        // A connection that saw a statement fail is closed, not pooled.
        if clean {
            conn.release();
        }
    }

    /// Before a flush writes `encoded`: creates the partitions its rows need (tables
    /// partitioned by `received_at`) and does not have. A failure that may pass (a lock
    /// timeout, a lost connection) makes the flush retriable, so no row lands in the default
    /// partition for want of a partition that will exist; rows of a range the default
    /// partition already holds (or that Postgres refuses for another reason) go there.
    pub async fn before_flush(&self, encoded: &[EncodedRows]) -> Result<(), FlushResult> {
        let now = now_micros();
        for t in &self.tables {
            let Some(rows) = encoded.get(t.target) else {
                continue;
            };
            if rows.ranges().is_empty() {
                continue;
            }
            if t.missing_for(rows.ranges(), now).is_empty() {
                continue;
            }
            self.ensure(t, rows.ranges(), now)
                .await
                .map_err(|reason| FlushResult::Retriable { reason })?;
        }
        Ok(())
    }

    async fn ensure(&self, t: &Kept, ranges: &BTreeSet<Range>, now: i64) -> Result<(), String> {
        let _turn = self.changing.lock().await;
        // Another flush may have made them while this one waited.
        let missing = t.missing_for(ranges, now);
        if missing.is_empty() {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        let mut clean = true;
        for new in &missing {
            match self
                .change(conn.client_mut(), t, Change::Create(new), now)
                .await
            {
                Ok(()) => {}
                Err(f) if f.is_transient() => {
                    return Err(format!(
                        "the partition {} a batch needs was not created ({f}); the batch is \
                         retried",
                        new.range
                    ));
                }
                // Logged and counted: its rows go to the default partition, and flushes do
                // not ask again for a round's time.
                Err(Failed::Refused(_)) | Err(Failed::Broken(_)) => {
                    clean = false;
                    lock(&t.refused).insert(new.range, now.saturating_add(REFUSED_FOR));
                }
            }
        }
        if clean {
            conn.release();
        }
        Ok(())
    }

    async fn connection(&self) -> Result<crate::pg::Conn<'_>, String> {
        let turn = self.pool.wait_turn().await.map_err(|f| f.message)?;
        tokio::time::timeout(self.deadline, self.pool.open(turn))
            .await
            .map_err(|_| format!("no Postgres connection within {:?}", self.deadline))?
            .map_err(|f| f.message)
    }

    /// One table's round: whether every statement succeeded; an error when the connection is
    /// no longer usable.
    async fn upkeep(&self, client: &mut Client, t: &Kept, now: i64) -> Result<bool, String> {
        let looked = tokio::time::timeout(self.deadline, look(client, t)).await;
        let catalog = match looked {
            Err(_) => {
                return Err(format!(
                    "reading the partitions took over {:?}",
                    self.deadline
                ))
            }
            Ok(Err(e)) if e.as_db_error().is_none() => return Err(e.to_string()),
            Ok(Err(e)) => {
                self.metrics.partition_failures.get(&t.table.plain).inc();
                tracing::warn!(table = %t.table.plain, error = %classify(&e).message, "time partitions: could not read the table's partitions; trying again next round");
                return Ok(false);
            }
            Ok(Ok((catalog, default_rows))) => {
                self.count_default_rows(t, &catalog, default_rows);
                catalog
            }
        };
        *lock(&t.known) = catalog.ranges.clone();
        let plan = t.partitioning.plan(t.table.last(), &catalog.ranges, now);
        for (range, by) in &plan.overlapped {
            if lock(&t.overlapped).insert(*range) {
                tracing::warn!(table = %t.table.plain, range = %range, partitions = ?by, "time partitions: partitions with other bounds cover part of this range, so its partition cannot be created; rows of the rest go to the default partition. Drop or re-bound those partitions to let Spillway keep this range");
            }
        }
        let (timeouts, retry_at) = *lock(&t.held_off);
        if now < retry_at && !(plan.create.is_empty() && plan.drop.is_empty()) {
            tracing::debug!(table = %t.table.plain, "time partitions: changes wait after lock timeouts");
            return Ok(true);
        }
        let mut clean = true;
        let changes = plan
            .create
            .iter()
            .map(Change::Create)
            .chain(plan.drop.iter().map(Change::Drop));
        for change in changes {
            if let Change::Create(new) = &change {
                if lock(&t.blocked).contains(&new.range) {
                    // Counted each round, logged once: rows of its range stay in the default
                    // partition until someone moves them.
                    match self.default_still_blocks(client, t, new).await? {
                        Some(false) => {
                            lock(&t.blocked).remove(&new.range);
                        }
                        blocks => {
                            clean &= blocks.is_some();
                            self.metrics.partition_failures.get(&t.table.plain).inc();
                            continue;
                        }
                    }
                }
            }
            match self.change(client, t, change, now).await {
                Ok(()) => *lock(&t.held_off) = (0, i64::MIN),
                Err(Failed::Broken(why)) => return Err(why),
                Err(failed) => {
                    clean = false;
                    if failed.is_lock_timeout() {
                        // Something holds the table (a long query, a dump): each try of a drop
                        // makes flushes wait up to the lock timeout, so try less often.
                        let after = Partitioning::retry_after_lock_timeouts(timeouts + 1);
                        *lock(&t.held_off) = (timeouts + 1, now.saturating_add(after));
                        tracing::warn!(table = %t.table.plain, retry_in_s = after / 1_000_000, "time partitions: the next changes wait; something holds the table");
                        break;
                    }
                }
            }
        }
        Ok(clean)
    }

    /// Whether the default partition still holds rows of `new`'s range (a plain read: it
    /// blocks no flush); `None` when Postgres refused the read.
    async fn default_still_blocks(
        &self,
        client: &mut Client,
        t: &Kept,
        new: &NewPartition,
    ) -> Result<Option<bool>, String> {
        let check = async {
            let tx = client.transaction().await?;
            begin_change(&tx, &t.table).await?;
            let catalog = read_catalog(&tx, &t.table).await?;
            let holds = default_holds(&tx, t, &catalog, new.range).await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(holds)
        };
        match tokio::time::timeout(self.deadline, check).await {
            Ok(Ok(holds)) => Ok(Some(holds.is_some())),
            Ok(Err(e)) if e.as_db_error().is_some() => Ok(None),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "checking the default partition took over {:?}",
                self.deadline
            )),
        }
    }

    fn count_default_rows(&self, t: &Kept, catalog: &Catalog, rows: i64) {
        self.metrics.default_rows.get(&t.table.plain).set(rows);
        let mut had = lock(&t.default_had_rows);
        if rows > 0 && !*had {
            tracing::warn!(
                table = %t.table.plain,
                partition = catalog.default.as_deref().unwrap_or("(none)"),
                rows = %if rows >= DEFAULT_ROWS_COUNTED { format!("at least {rows}") } else { rows.to_string() },
                "time partitions: the default partition holds rows outside every partition's range (a partition column value far from now, NULL, or older than the retention when written); nothing is lost, and Spillway never drops them"
            );
        }
        *had = rows > 0;
    }

    /// Creates or drops one partition in a transaction of its own, under the table's
    /// advisory lock and after reading the catalog again; logs and counts what happened.
    async fn change(
        &self,
        client: &mut Client,
        t: &Kept,
        change: Change<'_>,
        now: i64,
    ) -> Result<(), Failed> {
        let started = Instant::now();
        let done = match tokio::time::timeout(self.deadline, apply(client, t, &change, now)).await {
            Ok(Ok((done, seen))) => {
                // What the catalog held under the lock, before this change.
                *lock(&t.known) = seen;
                Ok(done)
            }
            Ok(Err(e)) if e.as_db_error().is_some() => Err(Failed::Refused(e)),
            Ok(Err(e)) => Err(Failed::Broken(e.to_string())),
            Err(_) => Err(Failed::Broken(format!(
                "the change took over {:?}",
                self.deadline
            ))),
        };
        let took = started.elapsed();
        let table = &t.table.plain;
        match (&change, done) {
            (_, Ok(Done::NotNeeded)) => {
                tracing::debug!(%table, change = %change.describe(t), "time partitions: nothing to do any more");
                Ok(())
            }
            (Change::Create(new), Ok(Done::Created)) => {
                self.metrics.partition_change.observe(took.as_secs_f64());
                self.metrics.partitions_created.get(table).inc();
                lock(&t.known).push(ExistingPartition {
                    name: t.table.sibling(&new.name),
                    from: Some(new.range.from),
                    to: Some(new.range.to),
                });
                tracing::info!(%table, partition = %new.name, range = %new.range, took_ms = took.as_millis() as u64, "time partitions: created a partition");
                Ok(())
            }
            (Change::Drop(name), Ok(Done::Dropped(from, to))) => {
                self.metrics.partition_change.observe(took.as_secs_f64());
                self.metrics.partitions_dropped.get(table).inc();
                lock(&t.known).retain(|p| p.name != **name);
                let range = match (from, to) {
                    (Some(from), Some(to)) => Range { from, to }.to_string(),
                    (from, to) => format!("{from:?}..{to:?} (µs)"),
                };
                let retention = t
                    .partitioning
                    .retention()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                tracing::info!(%table, partition = %name, %range, %retention, took_ms = took.as_millis() as u64, "time partitions: dropped a partition past the retention");
                Ok(())
            }
            (Change::Create(new), Ok(Done::DefaultHoldsRows(default))) => {
                self.metrics.partition_failures.get(table).inc();
                if lock(&t.blocked).insert(new.range) {
                    let p = &t.partitioning;
                    let (col, lo, hi) = (
                        p.column(),
                        p.bound_literal(new.range.from),
                        p.bound_literal(new.range.to),
                    );
                    let part = t.table.sibling(&new.name);
                    tracing::error!(
                        %table, partition = %new.name, range = %new.range, default = %default,
                        "time partitions: the default partition holds rows of this range, so its partition cannot be created: those rows stay in the default partition (nothing is lost) and so will the range's next rows. To give the range its partition, move the rows in one transaction: BEGIN; CREATE TABLE {part} (LIKE {t} INCLUDING DEFAULTS INCLUDING CONSTRAINTS); WITH moved AS (DELETE FROM {default} WHERE \"{col}\" >= {lo} AND \"{col}\" < {hi} RETURNING *) INSERT INTO {part} SELECT * FROM moved; ALTER TABLE {t} ATTACH PARTITION {part} FOR VALUES FROM ({lo}) TO ({hi}); COMMIT;",
                        t = t.table.records(),
                    );
                }
                Ok(())
            }
            (_, Ok(_)) => Ok(()),
            (_, Err(failed)) => {
                self.metrics.partition_failures.get(table).inc();
                if failed.is_lock_timeout() {
                    tracing::warn!(%table, change = %change.describe(t), took_ms = took.as_millis() as u64, "time partitions: the table stayed locked past the {LOCK_TIMEOUT:?} lock timeout (a long transaction or query holds it); trying again next round");
                } else {
                    tracing::error!(%table, change = %change.describe(t), error = %failed, "time partitions: Postgres refused the change; trying again next round");
                }
                Err(failed)
            }
        }
    }
}

/// A partition change.
enum Change<'a> {
    Create(&'a NewPartition),
    /// The partition as the catalog names it.
    Drop(&'a String),
}

impl Change<'_> {
    fn describe(&self, t: &Kept) -> String {
        match self {
            Change::Create(new) => {
                format!("create {} for {}", t.table.sibling(&new.name), new.range)
            }
            Change::Drop(name) => format!("drop {name}"),
        }
    }
}

/// The catalog and the default partition's rows (counted up to [`DEFAULT_ROWS_COUNTED`]), in
/// one short read-only transaction.
async fn look(client: &mut Client, t: &Kept) -> Result<(Catalog, i64), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'",
        LOCK_TIMEOUT.as_millis()
    ))
    .await?;
    let catalog = read_catalog(&tx, &t.table).await?;
    let rows = match &catalog.default {
        Some(d) => tx
            .query_one(
                &format!(
                    "SELECT count(*) FROM (SELECT 1 FROM ONLY {d} LIMIT {DEFAULT_ROWS_COUNTED}) r"
                ),
                &[],
            )
            .await?
            .get(0),
        None => 0,
    };
    tx.commit().await?;
    Ok((catalog, rows))
}

/// Whether the default partition holds a row of `range`: `Some(its name)` if so.
async fn default_holds(
    tx: &Transaction<'_>,
    t: &Kept,
    catalog: &Catalog,
    range: Range,
) -> Result<Option<String>, tokio_postgres::Error> {
    let Some(default) = &catalog.default else {
        return Ok(None);
    };
    let p = &t.partitioning;
    let holds: bool = tx
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM ONLY {default} WHERE \"{c}\" >= {lo} AND \"{c}\" < {hi})",
                c = p.column(),
                lo = p.bound_literal(range.from),
                hi = p.bound_literal(range.to),
            ),
            &[],
        )
        .await?
        .get(0);
    Ok(holds.then(|| default.clone()))
}

/// The change's transaction: its turn, the catalog read again, then the DDL if it is still
/// needed.
async fn apply(
    client: &mut Client,
    t: &Kept,
    change: &Change<'_>,
    now: i64,
) -> Result<(Done, Vec<ExistingPartition>), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    begin_change(&tx, &t.table).await?;
    let catalog = read_catalog(&tx, &t.table).await?;
    let p = &t.partitioning;
    let done = match change {
        Change::Create(new) => {
            let still_missing = !p
                .missing(
                    t.table.last(),
                    &BTreeSet::from([new.range]),
                    &catalog.ranges,
                    now,
                )
                .is_empty();
            if !still_missing {
                Done::NotNeeded
            } else if let Some(default) = default_holds(&tx, t, &catalog, new.range).await? {
                Done::DefaultHoldsRows(default)
            } else {
                // Standalone, then attached: attaching locks the table only SHARE UPDATE
                // EXCLUSIVE, so flushes go on meanwhile (CREATE .. PARTITION OF would lock it
                // ACCESS EXCLUSIVE). The default partition is checked (and locked) while
                // attaching; a row of the range that reached it since the check above makes
                // the ATTACH fail with 23514.
                let part = t.table.sibling(&new.name);
                let created = tx
                    .batch_execute(&format!(
                        "CREATE TABLE {part} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS){storage};
                         ALTER TABLE {table} ATTACH PARTITION {part} FOR VALUES FROM ({lo}) TO ({hi})",
                        table = t.table.records(),
                        storage = t.storage,
                        lo = p.bound_literal(new.range.from),
                        hi = p.bound_literal(new.range.to),
                    ))
                    .await;
                match created {
                    Ok(()) => Done::Created,
                    Err(e) if e.code() == Some(&SqlState::CHECK_VIOLATION) => {
                        Done::DefaultHoldsRows(catalog.default.clone().unwrap_or_default())
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Change::Drop(name) => {
            match p
                .expired_partitions(&catalog.ranges, now)
                .into_iter()
                .find(|e| e.name == **name)
            {
                None => Done::NotNeeded,
                Some(expired) => {
                    let (from, to) = (expired.from, expired.to);
                    tx.batch_execute(&format!("DROP TABLE {name}")).await?;
                    Done::Dropped(from, to)
                }
            }
        }
    };
    match done {
        Done::Created | Done::Dropped(..) => tx.commit().await?,
        _ => tx.rollback().await?,
    }
    Ok((done, catalog.ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_reads_microseconds_since_the_epoch() {
        // 2020-01-01 .. 2200-01-01: a sane clock, in µs rather than ms or ns.
        let now = now_micros();
        assert!(
            (1_577_836_800_000_000..7_258_118_400_000_000).contains(&now),
            "{now}"
        );
    }
}
