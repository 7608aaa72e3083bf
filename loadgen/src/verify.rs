//! The verdict, as Jepsen's set checker gives it: after the traffic, wait (bounded) for the
//! pipeline to drain, then compare the ids the endpoint acknowledged with the ids in Postgres.
//! Lost: acknowledged, missing. Duplicated: present more than once. Unexpected: present but
//! never acknowledged (a 503 whose write landed after all): allowed, shown. Dead-lettered:
//! acknowledged and in the table's dead-letter table (the consumer's `<table>_dead_letters`)
//! instead: not lost, shown, and listed so a caller can check they were meant to be there.

use std::time::{Duration, Instant};

use serde::Serialize;

use spillway_harness::postgres::connect;
use spillway_harness::HarnessError;

use crate::runner::AckSet;

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
    /// Present but never acknowledged.
    pub unexpected: u64,
    /// Up to 20 lost sequence numbers.
    pub lost_sample: Vec<u64>,
    /// Up to 20 duplicated sequence numbers.
    pub duplicated_sample: Vec<u64>,
    /// Acknowledged records found in the dead-letter table instead of the table.
    pub dead_lettered: u64,
    /// Their sequence numbers, ascending.
    #[serde(skip)]
    pub dead_lettered_seqs: Vec<u64>,
    /// Whether every acknowledged record arrived before the drain timeout.
    pub drained: bool,
    /// How long the drain took.
    pub drain_seconds: f64,
}

impl Verdict {
    /// No loss and no duplicate.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.duplicated == 0
    }
}

/// Rows of this run in the table (ids start with `run_id-`).
pub async fn count_rows(
    url: &str,
    table: &str,
    id_field: &str,
    run_id: &str,
) -> Result<i64, HarnessError> {
    let c = connect(url).await?;
    let q = format!("SELECT count(*) FROM {table} WHERE data->>$1 LIKE $2");
    let row = c
        .query_one(&q, &[&id_field, &format!("{run_id}-%")])
        .await?;
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

/// Waits until the acknowledged records are all in (or `timeout`), then compares.
pub async fn verify(
    url: &str,
    table: &str,
    id_field: &str,
    run_id: &str,
    acked: &AckSet,
    timeout: Duration,
    mut on_poll: impl FnMut(i64),
) -> Result<Verdict, HarnessError> {
    let started = Instant::now();
    let want = acked.len() as i64;
    loop {
        let landed = async {
            let rows = count_rows(url, table, id_field, run_id).await?;
            let dead = dead_lettered(url, table, id_field, run_id).await?.len() as i64;
            Ok::<_, HarnessError>((rows, dead))
        };
        match landed.await {
            // Enough rows: compare in full, since some may be unexpected ones (a 503 whose
            // write landed) standing in for acknowledged records still on their way.
            Ok((n, dead)) => {
                on_poll(n);
                if n + dead >= want {
                    match compare(url, table, id_field, run_id, acked).await {
                        Ok(v) if v.lost == 0 => return Ok(finish(v, true, started)),
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "comparing"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "counting rows"),
        }
        if started.elapsed() >= timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let v = compare(url, table, id_field, run_id, acked).await?;
    let drained = v.lost == 0;
    Ok(finish(v, drained, started))
}

fn finish(mut v: Verdict, drained: bool, started: Instant) -> Verdict {
    v.drained = drained;
    v.drain_seconds = started.elapsed().as_secs_f64();
    v
}

/// One comparison of the acknowledged ids with the tables, as they are now.
async fn compare(
    url: &str,
    table: &str,
    id_field: &str,
    run_id: &str,
    acked: &AckSet,
) -> Result<Verdict, HarnessError> {
    let c = connect(url).await?;
    let q = format!("SELECT data->>$1 FROM {table} WHERE data->>$1 LIKE $2");
    let rows = c.query(&q, &[&id_field, &format!("{run_id}-%")]).await?;
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
    let dead = dead_lettered(url, table, id_field, run_id).await?;
    let dead_set: std::collections::HashSet<u64> = dead.iter().copied().collect();
    let mut v = Verdict {
        acknowledged: acked.len(),
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
    for (seq, n) in &counts {
        if *n > 1 {
            v.duplicated += (*n - 1) as u64;
            dups.push(*seq);
        }
        if !acked.contains(*seq) {
            v.unexpected += 1;
        }
    }
    dups.sort_unstable();
    v.duplicated_sample = dups.into_iter().take(20).collect();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_escape_keeps_ids_literal() {
        assert_eq!(regex_escape("r1a-b_c"), "r1a-b_c");
        assert_eq!(regex_escape("a.b*c"), "a\\.b\\*c");
    }
}
