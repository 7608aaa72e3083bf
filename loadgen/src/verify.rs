//! The verdict, as Jepsen's set checker gives it: after the traffic, wait (bounded) for the
//! pipeline to drain, then compare the ids the endpoint acknowledged with the ids in Postgres.
//! Lost: acknowledged, missing. Duplicated: present more than once. Unexpected: present but
//! never acknowledged (a 503 whose write landed after all): allowed, shown.

use std::time::{Duration, Instant};

use serde::Serialize;

use spillway_integration::postgres::connect;
use spillway_integration::HarnessError;

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
    let mut drained = false;
    while started.elapsed() < timeout {
        match count_rows(url, table, id_field, run_id).await {
            Ok(n) => {
                on_poll(n);
                if n >= want {
                    drained = true;
                    break;
                }
            }
            Err(e) => tracing::debug!(error = %e, "counting rows"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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
    let mut v = Verdict {
        acknowledged: acked.len(),
        drained,
        drain_seconds: started.elapsed().as_secs_f64(),
        ..Verdict::default()
    };
    for seq in acked.iter() {
        if counts.contains_key(&seq) {
            v.found += 1;
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
