//! The idempotency keys past their retention (`--idempotency-key-retention`): deleted from
//! each table's `<table>_request_keys` every minute, in batches of [`EXPIRE_BATCH`], each its
//! own short transaction. A flush waits on a deleting batch only for a key of its own that is
//! being deleted (a request sent again past the retention), never for the table.

use std::sync::Arc;
use std::time::Duration;

use crate::pg::{Pool, Targets};
use crate::pipeline::Metrics;

/// Keys deleted per statement.
pub const EXPIRE_BATCH: i64 = 1000;

/// Most batches one round deletes per table; the rest waits for the next round.
const BATCHES_PER_ROUND: usize = 100;

/// Runs [`expire`] every `every` until the task is aborted.
pub fn spawn(
    targets: Arc<Targets>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    retention: Duration,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let every = every.max(Duration::from_millis(100));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if let Err(why) = expire(&targets, &pool, &metrics, retention).await {
                tracing::warn!(error = %why, "idempotency keys past their retention could not be deleted; trying again next round (nothing is lost: old keys only take room)");
            }
        }
    })
}

/// Deletes the keys first seen longer than `retention` ago, of every table; returns how many.
pub async fn expire(
    targets: &Targets,
    pool: &Pool,
    metrics: &Metrics,
    retention: Duration,
) -> Result<u64, String> {
    let turn = pool.wait_turn().await.map_err(|f| f.message)?;
    let mut conn = pool.open(turn).await.map_err(|f| f.message)?;
    let mut total = 0;
    for target in &targets.tables {
        // SKIP LOCKED: a key a flush is claiming (its row locked until that flush commits,
        // `pg::claim_keys`) is left for a later round, so the delete never waits on a flush
        // and the two cannot deadlock over two keys.
        let sql = format!(
            "DELETE FROM {k} WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM {k} WHERE first_seen < now() - make_interval(secs => $1)
                 LIMIT {EXPIRE_BATCH} FOR UPDATE SKIP LOCKED))",
            k = target.table.request_keys()
        );
        for _ in 0..BATCHES_PER_ROUND {
            let deleted = async {
                let tx = conn.client_mut().transaction().await?;
                tx.batch_execute("SET LOCAL lock_timeout = 1000").await?;
                let n = tx.execute(&sql, &[&retention.as_secs_f64()]).await?;
                tx.commit().await?;
                Ok::<_, tokio_postgres::Error>(n)
            }
            .await
            .map_err(|e| crate::pg::classify(&e).message)?;
            total += deleted;
            metrics.keys_expired.inc_by(deleted);
            if deleted < EXPIRE_BATCH as u64 {
                break;
            }
        }
    }
    conn.release();
    if total > 0 {
        tracing::info!(
            deleted = total,
            "deleted idempotency keys past their retention: a request sent again with one of them would be written again"
        );
    }
    Ok(total)
}
