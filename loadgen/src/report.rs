//! What a person sees at the end: a summary table on stdout, and files: `summary.json`,
//! `seconds.csv`, and `report.html` (inline SVG plots, no scripts, opens offline).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use crate::keyed::KeyedVerdict;
use crate::payload::PayloadGen;
use crate::runner::{RunResult, Second};
use crate::verify::Verdict;

/// Everything the report shows.
#[derive(Debug)]
pub struct Report<'a> {
    /// The run's id.
    pub run_id: &'a str,
    /// The command line, for reproducing.
    pub command: String,
    /// Profile description.
    pub profile: String,
    /// Target.
    pub target: String,
    /// Traffic results.
    pub run: &'a RunResult,
    /// The verdict, if checked.
    pub verdict: Option<&'a Verdict>,
    /// With keyed traffic: the table written by key, and its verdict if checked (it is not
    /// when the set verdict was not, or the pipeline never went quiet).
    pub keyed: Option<(&'a str, Option<&'a KeyedVerdict>)>,
}

const QUANTILES: [(&str, f64); 6] = [
    ("p50", 0.5),
    ("p90", 0.9),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("p99.99", 0.9999),
    ("max", 1.0),
];

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Report<'_> {
    /// The summary table.
    pub fn table(&self) -> String {
        let r = self.run;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nloadgen run {} — {} against {}",
            self.run_id, self.profile, self.target
        );
        let sent = r.planned - r.skipped_sends;
        let _ = writeln!(
            s,
            "requests: {} planned, {} sent ({} late, {} not sent: too many in flight) in {:.1} s = {:.0} req/s achieved",
            r.planned,
            sent,
            r.late_sends,
            r.skipped_sends,
            r.elapsed.as_secs_f64(),
            r.latency.len() as f64 / r.elapsed.as_secs_f64().max(1e-9)
        );
        let _ = writeln!(
            s,
            "records: {} sent, {} acknowledged",
            r.records_sent,
            r.acked.len()
        );
        let statuses: Vec<String> = r
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(
            s,
            "answers: {}; transport errors: {}",
            statuses.join(", "),
            r.transport_errors
        );
        if r.retries.enabled {
            let _ = writeln!(s, "{}", retries_line(&r.retries));
        }
        let _ = writeln!(
            s,
            "\n{:<22}{}",
            "latency (ms)",
            QUANTILES
                .iter()
                .map(|(n, _)| format!("{n:>10}"))
                .collect::<String>()
        );
        for (name, h) in [
            ("from planned send", &r.latency),
            ("service time", &r.service),
        ] {
            let row: String = QUANTILES
                .iter()
                .map(|(_, q)| format!("{:>10.2}", ms(h.value_at_quantile(*q))))
                .collect();
            let _ = writeln!(s, "{name:<22}{row}");
        }
        for (status, body) in r.error_samples.iter().take(3) {
            let _ = writeln!(
                s,
                "sample error {status}: {}",
                body.chars().take(200).collect::<String>()
            );
        }
        match self.verdict {
            Some(v) => {
                let unexpected = if v.idempotency_keys {
                    format!(
                        "unexpected {} (must be 0 with idempotency keys); given up {} records, of which {} landed (counted apart)",
                        v.unexpected, v.given_up, v.given_up_landed
                    )
                } else {
                    format!("unexpected {} (allowed)", v.unexpected)
                };
                let _ = writeln!(
                    s,
                    "\nverdict: {} — acknowledged {}, found {}, dead-lettered {}, lost {}, duplicated {}, {unexpected}, quiet {} after {:.1} s",
                    if v.passed() { "PASS" } else { "FAIL" },
                    v.acknowledged,
                    v.found,
                    v.dead_lettered,
                    v.lost,
                    v.duplicated,
                    if v.quiet { "yes" } else { "NO" },
                    v.waited_seconds
                );
                if let Some(why) = &v.not_quiet {
                    let _ = writeln!(s, "not quiet: {why}");
                }
                let unexpected_sample: &[u64] = if v.idempotency_keys {
                    &v.unexpected_sample
                } else {
                    &[]
                };
                for (what, sample) in [
                    ("lost", &v.lost_sample[..]),
                    ("duplicated", &v.duplicated_sample[..]),
                    ("unexpected", unexpected_sample),
                ] {
                    if !sample.is_empty() {
                        let ids: Vec<String> = sample
                            .iter()
                            .map(|q| PayloadGen::id(self.run_id, *q))
                            .collect();
                        let _ = writeln!(s, "{what} ids (sample): {ids:?}");
                    }
                }
            }
            None => {
                let _ = writeln!(s, "\nverdict: not checked (pass --verify DATABASE_URL)");
            }
        }
        match self.keyed {
            Some((table, Some(k))) => {
                let _ = writeln!(
                    s,
                    "keyed verdict on {table}: {} — {k}",
                    if k.passed() { "PASS" } else { "FAIL" },
                );
                if !k.wrong_sample.is_empty() {
                    let _ = writeln!(s, "wrong rows (sample): {:?}", k.wrong_sample);
                }
            }
            Some((table, None)) => {
                let _ = writeln!(
                    s,
                    "keyed verdict on {table}: not checked (it needs the verdict above, on a quiet pipeline)"
                );
            }
            None => {}
        }
        s
    }

    /// Writes summary.json, seconds.csv and report.html into `dir`.
    pub fn write_files(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let r = self.run;
        let lat: serde_json::Map<String, serde_json::Value> = QUANTILES
            .iter()
            .map(|(n, q)| (n.to_string(), json!(ms(r.latency.value_at_quantile(*q)))))
            .collect();
        let svc: serde_json::Map<String, serde_json::Value> = QUANTILES
            .iter()
            .map(|(n, q)| (n.to_string(), json!(ms(r.service.value_at_quantile(*q)))))
            .collect();
        let summary = json!({
            "run_id": self.run_id,
            "command": self.command,
            "profile": self.profile,
            "target": self.target,
            "planned_requests": r.planned,
            "late_sends": r.late_sends,
            "skipped_sends": r.skipped_sends,
            "elapsed_seconds": r.elapsed.as_secs_f64(),
            "achieved_rps": r.latency.len() as f64 / r.elapsed.as_secs_f64().max(1e-9),
            "records_sent": r.records_sent,
            "records_acknowledged": r.acked.len(),
            "statuses": r.statuses,
            "transport_errors": r.transport_errors,
            "retries": r.retries.enabled.then_some(&r.retries),
            "latency_ms_from_planned_send": lat,
            "service_time_ms": svc,
            "verdict": self.verdict,
            "keyed_verdict": self.keyed.map(|(table, k)| json!({"table": table, "verdict": k})),
        });
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(&summary).unwrap_or_default(),
        )?;
        let mut csv =
            String::from("second,offered,sent,completed,ok,errors,p50_ms,p99_ms,max_ms,rows,lag\n");
        for s in &r.seconds {
            let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{:.3},{:.3},{:.3},{},{}",
                s.second,
                s.offered,
                s.sent,
                s.completed,
                s.ok,
                s.errors,
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                opt(s.rows),
                opt(s.lag)
            );
        }
        std::fs::write(dir.join("seconds.csv"), csv)?;
        std::fs::write(dir.join("report.html"), self.html())
    }

    fn html(&self) -> String {
        let secs = &self.run.seconds;
        let series = |f: &dyn Fn(&Second) -> Option<f64>| {
            secs.iter()
                .filter_map(|s| f(s).map(|v| (s.second as f64, v)))
                .collect::<Vec<_>>()
        };
        let rate = svg_chart(
            "Requests per second: offered (plan) vs achieved (answers)",
            "req/s",
            &[
                ("offered", "#bbb", series(&|s| Some(s.offered as f64))),
                ("achieved", "#1f77b4", series(&|s| Some(s.completed as f64))),
                ("errors", "#d62728", series(&|s| Some(s.errors as f64))),
            ],
        );
        let latency = svg_chart(
            "Latency from the planned send time (ms)",
            "ms",
            &[
                (
                    "p50",
                    "#2ca02c",
                    series(&|s| (s.completed > 0).then_some(s.p50_ms)),
                ),
                (
                    "p99",
                    "#ff7f0e",
                    series(&|s| (s.completed > 0).then_some(s.p99_ms)),
                ),
                (
                    "max",
                    "#d62728",
                    series(&|s| (s.completed > 0).then_some(s.max_ms)),
                ),
            ],
        );
        let rows = svg_chart(
            "Rows of this run in Postgres, and consumer lag (messages)",
            "count",
            &[
                (
                    "rows landed",
                    "#1f77b4",
                    series(&|s| s.rows.map(|v| v as f64)),
                ),
                (
                    "consumer lag",
                    "#9467bd",
                    series(&|s| s.lag.map(|v| v as f64)),
                ),
            ],
        );
        let table = html_escape(&self.table());
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>loadgen {id}</title>\
             <style>body{{font-family:sans-serif;margin:24px;max-width:1000px}}pre{{background:#f6f6f6;padding:12px;overflow:auto}}\
             h1{{font-size:20px}}svg{{display:block;margin:16px 0}}</style></head><body>\
             <h1>Spillway loadgen — run {id}</h1><p><code>{cmd}</code></p><pre>{table}</pre>{rate}{latency}{rows}</body></html>",
            id = html_escape(self.run_id),
            cmd = html_escape(&self.command),
        )
    }
}

/// The retries of a run with idempotency keys, in one line.
pub fn retries_line(r: &crate::runner::Retries) -> String {
    let after: Vec<String> = r.after.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "retries (idempotency keys): {} sent (after {}); {} requests acknowledged after retrying; {} given up after their last retry ({} records, which may still land)",
        r.sent,
        if after.is_empty() {
            "nothing".to_string()
        } else {
            after.join(", ")
        },
        r.succeeded_after_retrying,
        r.given_up_requests,
        r.given_up.len()
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart as inline SVG: x in seconds, one polyline per series, axes with 5 ticks.
/// One line of a chart: name, colour, (x, y) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

fn svg_chart(title: &str, unit: &str, series: &[Series]) -> String {
    let (w, h, left, right, top, bottom) = (960.0, 300.0, 70.0, 20.0, 40.0, 40.0);
    let xmax = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|(x, _)| *x))
        .fold(1.0, f64::max);
    let ymax = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max)
        * 1.05;
    let px = |x: f64| left + x / xmax * (w - left - right);
    let py = |y: f64| h - bottom - y / ymax * (h - top - bottom);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-size=\"12\">"
    );
    let _ = write!(
        s,
        "<text x=\"{left}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        html_escape(title)
    );
    let _ = write!(
        s,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#ccc\"/>",
        w - left - right,
        h - top - bottom
    );
    for i in 0..=4 {
        let yv = ymax * i as f64 / 4.0;
        let xv = xmax * i as f64 / 4.0;
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>",
            left - 6.0,
            py(yv) + 4.0,
            yv
        );
        let _ = write!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#eee\"/>",
            w - right,
            y = py(yv)
        );
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{:.0}s</text>",
            px(xv),
            h - bottom + 16.0,
            xv
        );
    }
    let _ = write!(
        s,
        "<text x=\"12\" y=\"{}\" transform=\"rotate(-90 12 {})\">{unit}</text>",
        h / 2.0,
        h / 2.0
    );
    for (i, (name, color, points)) in series.iter().enumerate() {
        if points.is_empty() {
            continue;
        }
        let pts: String = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1} ", px(*x), py(*y)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"{}\" points=\"{pts}\"/>",
            // The first series is drawn wide underneath, so lines that coincide with it stay visible.
            if i == 0 { 5.0 } else { 1.5 }
        );
        let lx = left + 10.0 + i as f64 * 140.0;
        let _ = write!(s, "<line x1=\"{lx}\" x2=\"{}\" y1=\"32\" y2=\"32\" stroke=\"{color}\" stroke-width=\"3\"/>", lx + 20.0);
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"36\">{}</text>",
            lx + 24.0,
            html_escape(name)
        );
    }
    s.push_str("</svg>");
    s
}
