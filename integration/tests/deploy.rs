//! The deployment files against the services: every query of the Grafana dashboard
//! (`deploy/grafana/spillway.json`) and every alert rule (`deploy/prometheus/alerts.yml`) names
//! metrics the services export, and each service's `/metrics` page is well formed (HELP and
//! TYPE for every family, no series twice). No server is started: the pages are those of a
//! freshly started producer and consumer. The rules' behaviour is tested by
//! `promtool test rules deploy/prometheus/alerts.test.yml` (ci/test.sh) and, live, by the chaos
//! suite's `postgres_unreachable_alert_fires_and_resolves`.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

fn repo_file(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The metric names a page lets a query use, after checking the page: every sample belongs to
/// a family announced by `# HELP` and `# TYPE`, and no series (name and labels) appears twice.
fn exported_names(service: &str, page: &str) -> BTreeSet<String> {
    let mut kinds = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut series = BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(
                !help.trim().is_empty(),
                "{service}: {name} has an empty HELP"
            );
            helped.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                helped.contains(name),
                "{service}: TYPE before HELP for {name}"
            );
            kinds.insert(name.to_string(), kind.to_string());
        } else if !line.is_empty() {
            let key = line.rsplit_once(' ').unwrap().0;
            let name = key.split('{').next().unwrap();
            let family = kinds
                .keys()
                .find(|f| {
                    name == f.as_str()
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(f.as_str()))
                })
                .unwrap_or_else(|| panic!("{service}: {name} has no HELP/TYPE:\n{page}"));
            assert!(
                name == family || kinds[family] == "histogram",
                "{service}: {name} is not a sample of {family}"
            );
            assert!(series.insert(key.to_string()), "{service}: {key} twice");
        }
    }
    let mut names = BTreeSet::new();
    for (family, kind) in kinds {
        if kind == "histogram" {
            for s in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{family}{s}"));
            }
        } else {
            names.insert(family);
        }
    }
    names
}

fn exported() -> BTreeSet<String> {
    let producer = spillway_producer::fresh_metrics_page().unwrap();
    let consumer = spillway_consumer::fresh_metrics_page().unwrap();
    let mut names = exported_names("producer", &producer);
    names.extend(exported_names("consumer", &consumer));
    names
}

/// The identifiers in a PromQL expression that name one of Spillway's metrics.
fn spillway_metrics(expr: &str) -> Vec<&str> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    expr.split(|c: char| !is_ident(c))
        .filter(|t| t.starts_with("spillway_"))
        .collect()
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::String(e)) = m.get("expr") {
                out.push(e.clone());
            }
            m.values().for_each(|v| exprs(v, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn every_dashboard_query_names_a_metric_the_services_export() {
    let names = exported();
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/spillway.json")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            let targets = panel["targets"].as_array().map_or(0, Vec::len);
            assert!(targets > 0, "panel {} has no query", panel["title"]);
        }
    }
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 20, "only {} queries found", queries.len());
    let mut used = BTreeSet::new();
    for q in &queries {
        let metrics = spillway_metrics(q);
        assert!(
            !metrics.is_empty() || q.starts_with("up{"),
            "query names no Spillway metric: {q}"
        );
        for m in metrics {
            assert!(
                names.contains(m),
                "the dashboard queries {m}, which no service exports (query: {q})"
            );
            used.insert(m);
        }
    }
    // What the dashboard is for: each of these has a panel.
    for needed in [
        "spillway_producer_requests_total",
        "spillway_producer_produce_latency_seconds_bucket",
        "spillway_consumer_rows_written_total",
        "spillway_consumer_flush_latency_seconds_bucket",
        "spillway_consumer_batch_records_sum",
        "spillway_consumer_lag_records",
        "spillway_consumer_buffered_bytes",
        "spillway_consumer_buffer_capacity_bytes",
        "spillway_consumer_kafka_paused",
        "spillway_consumer_database_up",
        "spillway_consumer_dead_letters_total",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

#[test]
fn every_alert_names_a_metric_the_services_export() {
    let names = exported();
    let rules = repo_file("deploy/prometheus/alerts.yml");
    let mut alerts = BTreeSet::new();
    for line in rules.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            alerts.insert(name.to_string());
        }
        for m in spillway_metrics(line) {
            assert!(
                names.contains(m),
                "an alert uses {m}, which no service exports: {line}"
            );
        }
    }
    for needed in [
        "SpillwayServiceDown",
        "SpillwayPostgresUnreachable",
        "SpillwayConsumerLagGrowing",
        "SpillwayKafkaPausedLong",
        "SpillwayDeadLetters",
        "SpillwayProducerKafkaUnavailable",
        "SpillwayProducerShedding",
        "SpillwayProducerClientResets",
    ] {
        assert!(alerts.contains(needed), "no alert {needed}");
    }
}

#[test]
fn the_metrics_pages_keep_the_names_users_scrape() {
    let names = exported();
    // Every name Spillway exported before its metrics moved to prometheus-client.
    for kept in [
        "spillway_producer_requests_total",
        "spillway_producer_kafka_client_resets_total",
        "spillway_producer_records_accepted_total",
        "spillway_producer_bytes_accepted_total",
        "spillway_producer_produce_latency_seconds_bucket",
        "spillway_producer_records_per_request_count",
        "spillway_producer_in_flight_requests",
        "spillway_producer_kafka_queue_depth",
        "spillway_consumer_rows_written_total",
        "spillway_consumer_batches_total",
        "spillway_consumer_dead_letters_total",
        "spillway_consumer_flush_retries_total",
        "spillway_consumer_fenced_total",
        "spillway_consumer_rewound_messages_total",
        "spillway_consumer_offset_gaps_total",
        "spillway_consumer_rejoins_total",
        "spillway_consumer_batch_records_bucket",
        "spillway_consumer_flush_latency_seconds_sum",
        "spillway_consumer_database_up",
        "spillway_consumer_buffered_records",
        "spillway_consumer_buffered_bytes",
        "spillway_consumer_target_batch_records",
        "spillway_consumer_kafka_paused",
        "spillway_consumer_assigned_partitions",
        "spillway_consumer_stopped_partitions",
        "spillway_consumer_lag_records",
    ] {
        assert!(names.contains(kept), "{kept} is no longer exported");
    }
}
