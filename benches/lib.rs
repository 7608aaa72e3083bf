//! Shared pieces of Spillway's benchmarks: test rows, and reading criterion's estimates back
//! to print ratios against a baseline measured in the same run.
#![warn(missing_docs)]

use std::path::PathBuf;

/// A JSON record of about 200 bytes, like the README's figures use.
pub fn record(i: u64) -> Vec<u8> {
    format!(
        r#"{{"id":"bench-{i}","user":{},"event":"page_view","path":"/products/{}","ua":"Mozilla/5.0 (X11; Linux x86_64)","pad":"{}"}}"#,
        i % 10_000,
        i % 977,
        "x".repeat(60)
    )
    .into_bytes()
}

/// Mean time per iteration (ns) that criterion recorded for `group/id`, if any.
pub fn criterion_mean_ns(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    // criterion turns '/' in names into '_' for its directories.
    let path = dir
        .join("criterion")
        .join(group.replace('/', "_"))
        .join(id.replace('/', "_"))
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

/// Prints each benchmark's throughput as a ratio to `baseline` (same group, same run).
/// Run alone (`cargo bench --bench NAME`) it also reprints the last run's table.
pub fn print_ratios(group: &str, ids: &[(String, u64)], baseline: &str) {
    let Some(base_ns) = ids
        .iter()
        .find(|(id, _)| id == baseline)
        .and_then(|(id, n)| criterion_mean_ns(group, id).map(|ns| ns / *n as f64))
    else {
        return;
    };
    println!("\n{group}: throughput relative to {baseline}");
    println!("{:<40}{:>16}{:>10}", "benchmark", "records/s", "ratio");
    for (id, n) in ids {
        if let Some(ns) = criterion_mean_ns(group, id) {
            let per = ns / *n as f64;
            println!("{:<40}{:>16.0}{:>10.3}", id, 1e9 / per, base_ns / per);
        }
    }
}
