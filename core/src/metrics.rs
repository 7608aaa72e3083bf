//! Prometheus text-format metrics: counters, gauges and histograms on atomics.
//!
//! Pure like the rest of the crate: values are observed by the caller (durations measured by
//! the shell), and [`Registry::render`] only formats them. The services share this module so
//! both `/metrics` endpoints follow one format.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Adds `d` (may be negative).
    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds (Prometheus `le` buckets).
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths of the unit, to stay on atomics.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Buckets with these upper bounds (sorted ascending); `+Inf` is implied.
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Latency buckets from 0.5 ms to 30 s, in seconds.
    pub fn latency_seconds() -> Self {
        Self::new(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ])
    }

    /// Size buckets from 1 to 100,000 (records per batch, records per request).
    pub fn sizes() -> Self {
        Self::new(&[
            1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0, 50000.0, 100000.0,
        ])
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
enum Metric {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: &'static str,
    series: Vec<(String, Metric)>,
}

/// A set of metric families rendered together.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<Vec<Family>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn register(&self, name: &str, help: &str, labels: &[(&str, &str)], metric: Metric) {
        let kind = match metric {
            Metric::Counter(_) => "counter",
            Metric::Gauge(_) => "gauge",
            Metric::Histogram(_) => "histogram",
        };
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect::<Vec<_>>()
            .join(",");
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        match families.iter_mut().find(|f| f.name == name) {
            Some(f) => f.series.push((labels, metric)),
            None => families.push(Family {
                name: name.to_string(),
                help: help.to_string(),
                kind,
                series: vec![(labels, metric)],
            }),
        }
    }

    /// Registers a counter series.
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Counter> {
        let c = Arc::new(Counter::default());
        self.register(name, help, labels, Metric::Counter(c.clone()));
        c
    }

    /// Registers a gauge series.
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Gauge> {
        let g = Arc::new(Gauge::default());
        self.register(name, help, labels, Metric::Gauge(g.clone()));
        g
    }

    /// Registers a histogram series.
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        h: Histogram,
    ) -> Arc<Histogram> {
        let h = Arc::new(h);
        self.register(name, help, labels, Metric::Histogram(h.clone()));
        h
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for f in families.iter() {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for (labels, metric) in &f.series {
                let braces = |extra: &str| {
                    let all: Vec<&str> = [labels.as_str(), extra]
                        .into_iter()
                        .filter(|s| !s.is_empty())
                        .collect();
                    if all.is_empty() {
                        String::new()
                    } else {
                        format!("{{{}}}", all.join(","))
                    }
                };
                match metric {
                    Metric::Counter(c) => {
                        let _ = writeln!(out, "{}{} {}", f.name, braces(""), c.get());
                    }
                    Metric::Gauge(g) => {
                        let _ = writeln!(out, "{}{} {}", f.name, braces(""), g.get());
                    }
                    Metric::Histogram(h) => {
                        let mut cumulative = 0;
                        for (b, n) in h.bounds.iter().zip(&h.buckets) {
                            cumulative += n.load(Ordering::Relaxed);
                            let le = format!("le=\"{b}\"");
                            let _ = writeln!(out, "{}_bucket{} {cumulative}", f.name, braces(&le));
                        }
                        let count = h.count();
                        let _ = writeln!(out, "{}_bucket{} {count}", f.name, braces("le=\"+Inf\""));
                        let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
                        let _ = writeln!(out, "{}_sum{} {sum}", f.name, braces(""));
                        let _ = writeln!(out, "{}_count{} {count}", f.name, braces(""));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_cumulative_buckets() {
        let r = Registry::new();
        r.counter(
            "requests_total",
            "Requests by status.",
            &[("status", "200")],
        )
        .add(3);
        r.counter(
            "requests_total",
            "Requests by status.",
            &[("status", "503")],
        )
        .inc();
        let h = r.histogram(
            "latency_seconds",
            "Latency.",
            &[],
            Histogram::new(&[0.1, 1.0]),
        );
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let text = r.render();
        let expected = "\
# HELP requests_total Requests by status.
# TYPE requests_total counter
requests_total{status=\"200\"} 3
requests_total{status=\"503\"} 1
# HELP latency_seconds Latency.
# TYPE latency_seconds histogram
latency_seconds_bucket{le=\"0.1\"} 1
latency_seconds_bucket{le=\"1\"} 2
latency_seconds_bucket{le=\"+Inf\"} 3
latency_seconds_sum 5.55
latency_seconds_count 3
";
        assert_eq!(text, expected);
    }
}
