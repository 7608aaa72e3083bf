//! Writing by key (`--upsert-key`): the SQL that merges a batch into the records table inside
//! the flush transaction, and the unique index it needs.
//!
//! A batch's rows are COPYed (binary) into a session's temporary staging table, then, in the
//! same transaction as the position's compare-and-set:
//! 1. with `--delete-when`, the rows of every key that some record of the batch deletes are
//!    deleted;
//! 2. for each key, the one record that decides its row is chosen among the records after the
//!    key's last delete (Kafka order): the last (`--on-conflict update`) or the first
//!    (`ignore`), and inserted with `ON CONFLICT (key) DO UPDATE` or `DO NOTHING`.
//!
//! That is what applying the batch's records one by one would leave, in one statement each.
//! A replayed batch never gets here: the compare-and-set finds the position moved and the
//! transaction rolls back.
//!
//! When Postgres compares the key's values as their encoded bytes (integers, text, dates,
//! timestamps, uuids, booleans: [`Mapping::key_compares_as_encoded`]), step 2's choice is made
//! before the COPY instead ([`spillway_core::CopyRows::finish_deciding`]): the stage gets only
//! each key's last delete and the record after it that decides the row, and the merge reads
//! it without a window or `DISTINCT ON` (no sort). On the typed-only upsert bench that took
//! the backend's CPU time for the batch (staging COPY, merge, commit) from about 80 ms to
//! 71 ms, a plain COPY of the same rows being 25 ms (`/proc/<pid>/schedstat` around each
//! statement, replayed in psql against the bench's tables, 3 runs each). Other key types
//! (`numeric`, `double precision`, `jsonb`, `text[]`: equal values with other bytes) stage
//! every row and choose in SQL as before.

use spillway_core::columns::DELETE_FLAG;
use spillway_core::{ErrorClass, Mapping, OnConflict, Upsert};
use tokio_postgres::Transaction;

use crate::pg::{classify, PgFailure, TableName};

/// The fillfactor of a table the consumer creates to write by key (and of its partitions):
/// each page keeps 30% free for the new versions of its rows, so most updates stay on their
/// page and add no index entry (HOT updates). On the upsert bench it took the merge from
/// 0.52 to 0.56 of a plain COPY with `data` kept (0.30 to 0.33 typed-only). A table that
/// already exists keeps its own setting
/// (`ALTER TABLE .. SET (fillfactor = 70)` applies to pages written after).
pub const FILLFACTOR: u8 = 70;

/// The storage clause of a table (or partition) written with `mapping`: `WITH (fillfactor ..)`
/// if it writes by key, else nothing.
pub fn storage_clause(mapping: &Mapping) -> String {
    match mapping.upsert() {
        Some(_) => format!(" WITH (fillfactor = {FILLFACTOR})"),
        None => String::new(),
    }
}

/// What one merge did, one count per record of the batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Records that inserted a row for a new key.
    pub inserted: u64,
    /// Records whose values replaced their key's row.
    pub updated: u64,
    /// Rows deleted.
    pub deleted: u64,
    /// Records that changed nothing: an earlier or later record of the same key decided the
    /// row, `--on-conflict ignore` kept the row there, or a delete found no row.
    pub unchanged: u64,
}

impl std::ops::Add for Merged {
    type Output = Merged;

    fn add(self, o: Merged) -> Merged {
        Merged {
            inserted: self.inserted + o.inserted,
            updated: self.updated + o.updated,
            deleted: self.deleted + o.deleted,
            unchanged: self.unchanged + o.unchanged,
        }
    }
}

/// The statements of a merge for one table and mapping, written once at start.
#[derive(Debug, Clone)]
pub struct MergeSql {
    stage: String,
    create_stage: String,
    delete: Option<String>,
    insert: String,
}

/// `a.k = b.k AND …` over the key columns: the same key in tables aliased `a` and `b`.
fn same_key(upsert: &Upsert, a: &str, b: &str) -> String {
    upsert
        .key
        .iter()
        .map(|k| format!("{a}.\"{k}\" = {b}.\"{k}\""))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The key columns, quoted and comma-separated.
fn key_list(upsert: &Upsert) -> String {
    upsert
        .key
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

impl MergeSql {
    /// The merge for `table` written with `mapping`, if the mapping writes by key.
    pub fn new(table: &TableName, mapping: &Mapping) -> Option<Self> {
        Self::build(table, mapping, false)
    }

    /// The same for a partitioned table (`--partition-by`), whose `RETURNING` cannot read
    /// `xmax`: the keys already in the table are counted in the same statement (before the
    /// insert, in its snapshot) instead.
    pub fn partitioned(table: &TableName, mapping: &Mapping) -> Option<Self> {
        Self::build(table, mapping, true)
    }

    fn build(table: &TableName, mapping: &Mapping, partitioned: bool) -> Option<Self> {
        let upsert = mapping.upsert()?;
        // One staging table per records table and session; the name only needs to differ
        // between the tables one consumer writes.
        let stage = format!(
            "pg_temp.spillway_stage_{:016x}",
            fnv1a(table.plain.as_bytes())
        );
        let mut columns = vec![
            "kafka_partition int".to_string(),
            "kafka_offset bigint".into(),
            "record_index int".into(),
            "received_at timestamptz".into(),
        ];
        if mapping.keep_data() {
            columns.push("data jsonb".into());
        }
        for c in mapping.columns() {
            columns.push(format!("{} {}", c.quoted_name(), c.ty.sql()));
        }
        if upsert.delete_when.is_some() {
            columns.push(format!("{DELETE_FLAG} boolean"));
        }
        // Checked before creating: `IF NOT EXISTS` would send a NOTICE on every flush. The
        // merge's sorts get room to stay in memory (4 MB by default spilled a 10,000-record
        // batch with `data` to disk), for this transaction only.
        let create_stage = format!(
            "SET LOCAL work_mem = '64MB'; \
             DO $$ BEGIN IF to_regclass('{stage}') IS NULL THEN \
             CREATE TEMP TABLE {stage} ({}) ON COMMIT DELETE ROWS; END IF; END $$",
            columns.join(", ")
        );
        let keys = key_list(upsert);
        // Rows chosen before the COPY: the stage holds at most one delete and one record per
        // key, the record after the delete (`CopyRows::finish_deciding`).
        let chosen_before = mapping.key_compares_as_encoded();
        let deleting = if chosen_before {
            format!("{stage} d WHERE d.{DELETE_FLAG} AND")
        } else {
            format!("(SELECT DISTINCT {keys} FROM {stage} WHERE {DELETE_FLAG}) d WHERE")
        };
        let delete = upsert.delete_when.as_ref().map(|_| {
            format!(
                "DELETE FROM {t} t USING {deleting} {same}",
                t = table.records(),
                same = same_key(upsert, "t", "d"),
            )
        });
        // Rows keep the mapping's columns only (the flag stays in the stage).
        let row_columns = mapping.row_columns();
        let written = row_columns.join(", ");
        let order = match upsert.on_conflict {
            OnConflict::Update => "DESC",
            OnConflict::Ignore => "ASC",
        };
        // Candidates: records with no delete of their key at or after them.
        let candidates = match upsert.delete_when {
            Some(_) => format!(
                "(SELECT *, bool_or({DELETE_FLAG}) OVER (PARTITION BY {keys} \
                 ORDER BY kafka_offset DESC, record_index DESC \
                 ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS deleted_later \
                 FROM {stage}) s WHERE NOT deleted_later"
            ),
            None => format!("{stage} s"),
        };
        let action = match upsert.on_conflict {
            OnConflict::Update => {
                let set = row_columns
                    .iter()
                    .filter(|c| !upsert.key.iter().any(|k| **c == format!("\"{k}\"")))
                    .map(|c| format!("{c} = EXCLUDED.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("DO UPDATE SET {set}")
            }
            OnConflict::Ignore => "DO NOTHING".to_string(),
        };
        let chosen = match (chosen_before, &upsert.delete_when) {
            (true, Some(_)) => {
                format!("chosen AS (SELECT {written} FROM {stage} WHERE NOT {DELETE_FLAG})")
            }
            (true, None) => format!("chosen AS (SELECT {written} FROM {stage})"),
            (false, _) => format!(
                "chosen AS (SELECT DISTINCT ON ({keys}) {written} FROM {candidates} \
                 ORDER BY {keys}, kafka_offset {order}, record_index {order})"
            ),
        };
        let t = table.records();
        let insert = if partitioned {
            // `DO UPDATE` updates every key already there; `DO NOTHING` returns only inserts.
            let updated = match upsert.on_conflict {
                OnConflict::Update => "(SELECT n FROM present)",
                OnConflict::Ignore => "0::bigint",
            };
            format!(
                "WITH {chosen}, \
                 present AS (SELECT count(*) AS n FROM chosen c \
                     WHERE EXISTS (SELECT 1 FROM {t} t WHERE {same})), \
                 written AS (INSERT INTO {t} ({written}) SELECT {written} FROM chosen \
                     ON CONFLICT ({keys}) {action} RETURNING 1) \
                 SELECT (SELECT count(*) FROM written) - {updated}, {updated}",
                same = same_key(upsert, "t", "c"),
            )
        } else {
            format!(
                "WITH {chosen}, \
                 written AS (INSERT INTO {t} ({written}) SELECT {written} FROM chosen \
                     ON CONFLICT ({keys}) {action} RETURNING (xmax = 0) AS inserted) \
                 SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) \
                 FROM written"
            )
        };
        Some(MergeSql {
            stage,
            create_stage,
            delete,
            insert,
        })
    }

    /// The COPY statement filling the staging table with `columns` ([`Mapping::copy_columns`]).
    pub fn copy_statement(&self, columns: &str) -> String {
        format!("COPY {} ({columns}) FROM STDIN (FORMAT binary)", self.stage)
    }

    /// Creates this session's staging table if it has none yet (it outlives the transaction
    /// only if the transaction commits; `ON COMMIT DELETE ROWS` empties it every time).
    pub async fn prepare(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        tx.batch_execute(&self.create_stage).await
    }

    /// Merges the staged rows (`rows` of them) into the table.
    pub async fn merge(
        &self,
        tx: &Transaction<'_>,
        rows: u64,
    ) -> Result<Merged, tokio_postgres::Error> {
        let deleted = match &self.delete {
            Some(sql) => tx.execute(sql.as_str(), &[]).await?,
            None => 0,
        };
        let counts = tx.query_one(self.insert.as_str(), &[]).await?;
        let (inserted, updated) = (
            counts.try_get::<_, i64>(0)? as u64,
            counts.try_get::<_, i64>(1)? as u64,
        );
        Ok(Merged {
            inserted,
            updated,
            deleted,
            unchanged: rows.saturating_sub(inserted + updated + deleted),
        })
    }
}

/// FNV-1a, 64 bits: a stable short name for a table.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Gives the records table the unique index `--upsert-key` needs, unless a unique index on
/// exactly those columns (in any order, without a predicate or expression) is already there.
/// Runs in the migration's transaction.
pub async fn ensure_key_index(
    tx: &Transaction<'_>,
    table: &TableName,
    upsert: &Upsert,
) -> Result<(), PgFailure> {
    let mut sorted = upsert.key.clone();
    sorted.sort();
    let found = tx
        .query_opt(
            "SELECT i.indexrelid::regclass::text FROM pg_index i
             WHERE i.indrelid = $1::text::regclass AND i.indisunique
               AND i.indpred IS NULL AND i.indexprs IS NULL
               AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text)
                    FROM pg_attribute a
                    WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) = $2::text[]
               AND i.indnkeyatts = cardinality($2::text[])
             LIMIT 1",
            &[&table.records(), &sorted],
        )
        .await
        .map_err(|e| classify(&e))?;
    if let Some(row) = found {
        let index: String = row.get(0);
        tracing::debug!(table = %table.plain, %index, "the upsert key's unique index is there");
        return Ok(());
    }
    let keys = key_list(upsert);
    let name = format!("{}_{}_key", table.last(), upsert.key.join("_"));
    let name: String = name.chars().take(63).collect();
    let sql = format!(
        "CREATE UNIQUE INDEX \"{name}\" ON {} ({keys})",
        table.records()
    );
    tx.batch_execute(&sql).await.map_err(|e| {
        let f = classify(&e);
        PgFailure {
            class: ErrorClass::Fatal,
            message: format!(
                "cannot create the unique index on ({keys}) that --upsert-key needs: {}. Nothing \
                 was written. If the table already holds several rows with one key, remove the \
                 duplicates (or write to a new --table) and start again",
                f.message
            ),
            row: None,
        }
    })?;
    tracing::info!(table = %table.plain, index = %name, "created the upsert key's unique index");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(on_conflict: &str, delete_when: Option<&str>) -> Mapping {
        let columns = ["id:bigint=/id", "name:text=/name"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        Mapping::new(columns, true)
            .unwrap()
            .with_upsert(Upsert {
                key: vec!["id".into()],
                on_conflict: on_conflict.parse().unwrap(),
                delete_when: delete_when.map(|d| d.parse().unwrap()),
            })
            .unwrap()
    }

    #[test]
    fn the_merge_updates_every_column_but_the_key_and_keeps_the_flag_in_the_stage() {
        let t = TableName::parse("events").unwrap();
        let sql = MergeSql::new(&t, &mapping("update", Some("/op=delete"))).unwrap();
        assert!(sql
            .insert
            .contains("DO UPDATE SET kafka_partition = EXCLUDED.kafka_partition"));
        assert!(sql.insert.contains("\"name\" = EXCLUDED.\"name\""));
        assert!(!sql.insert.contains("\"id\" = EXCLUDED"), "{}", sql.insert);
        assert!(
            !sql.insert.contains(", spillway_delete)")
                && !sql.insert.contains(", spillway_delete FROM"),
            "the flag is not a column of the table: {}",
            sql.insert
        );
        assert!(sql.delete.is_some());
        assert!(sql.create_stage.contains("spillway_delete boolean"));
        let ignore = MergeSql::new(&t, &mapping("ignore", None)).unwrap();
        assert!(ignore.insert.contains("DO NOTHING") && ignore.delete.is_none());
        assert!(MergeSql::new(&t, &Mapping::default()).is_none());
        let other = MergeSql::new(
            &TableName::parse("other").unwrap(),
            &mapping("update", None),
        );
        assert_ne!(other.unwrap().stage, sql.stage, "one stage per table");
        // A partitioned table's RETURNING cannot read xmax: the keys there are counted first.
        let partitioned = MergeSql::partitioned(&t, &mapping("update", None)).unwrap();
        assert!(
            !partitioned.insert.contains("xmax"),
            "{}",
            partitioned.insert
        );
        assert!(
            partitioned.insert.contains("present AS"),
            "{}",
            partitioned.insert
        );
        assert!(sql.insert.contains("xmax"), "{}", sql.insert);
    }
}
