//! The services' Prometheus metrics, on the `prometheus-client` crate.
//!
//! Pure like the rest of the crate: values are observed by the caller (durations measured by
//! the shell), and [`Registry::render`] only formats them, in the Prometheus text format
//! (version 0.0.4, [`CONTENT_TYPE`]). The crate writes `# HELP` and `# TYPE` for every family,
//! escapes label values and help text, and keeps one series per label value
//! ([`Labelled`]). Names are given as users query them: a counter's ends in `_total`.

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Metric;

/// A monotonically increasing count (`inc`, `inc_by`, `get`); clones share the value.
pub type Counter = prometheus_client::metrics::counter::Counter;
/// A value that goes up and down (`set`, `inc`, `dec`, `get`); clones share the value.
pub type Gauge = prometheus_client::metrics::gauge::Gauge;
/// A histogram with fixed upper bounds (Prometheus `le` buckets); clones share the buckets.
pub type Histogram = prometheus_client::metrics::histogram::Histogram;

/// Latency buckets from 0.5 ms to 30 s, in seconds.
pub const LATENCY_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Size buckets from 1 to 100,000 (records per batch, records per request).
pub const SIZES: &[f64] = &[
    1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0, 50000.0, 100000.0,
];

type LabelSet = Vec<(&'static str, String)>;

/// One family of series that differ by their labels (`status`; `topic` and `partition`).
#[derive(Debug, Clone)]
pub struct Labelled<M> {
    labels: Vec<&'static str>,
    family: Family<LabelSet, M>,
}

impl<M: Metric + Default + Clone> Labelled<M> {
    /// The series for `value` of a family of one label, created on first use; the same
    /// series every time after.
    pub fn get(&self, value: &str) -> M {
        self.get_all(&[value])
    }

    /// The series for these values, one per label in the order they were registered.
    pub fn get_all(&self, values: &[&str]) -> M {
        let set: LabelSet = self
            .labels
            .iter()
            .zip(values)
            .map(|(l, v)| (*l, v.to_string()))
            .collect();
        self.family.get_or_create(&set).clone()
    }
}

/// A set of metric families rendered together. Register everything, then share it read-only.
#[derive(Debug, Default)]
pub struct Registry(prometheus_client::registry::Registry);

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn register(&mut self, name: &str, help: &str, metric: impl Metric) {
        let name = match metric.metric_type() {
            // The crate adds `_total` to a counter's name itself.
            MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        // ... and a full stop to its help.
        self.0
            .register(name, help.strip_suffix('.').unwrap_or(help), metric);
    }

    /// Registers a counter; `name` ends in `_total`.
    pub fn counter(&mut self, name: &str, help: &str) -> Counter {
        let c = Counter::default();
        self.register(name, help, c.clone());
        c
    }

    /// Registers a family of counters that differ by `label`.
    pub fn counters(&mut self, name: &str, help: &str, label: &'static str) -> Labelled<Counter> {
        self.family(name, help, &[label])
    }

    fn family<M>(&mut self, name: &str, help: &str, labels: &[&'static str]) -> Labelled<M>
    where
        M: Default,
        Family<LabelSet, M>: Metric,
    {
        let family = Family::default();
        self.register(name, help, family.clone());
        Labelled {
            labels: labels.to_vec(),
            family,
        }
    }

    /// Registers a gauge.
    pub fn gauge(&mut self, name: &str, help: &str) -> Gauge {
        let g = Gauge::default();
        self.register(name, help, g.clone());
        g
    }

    /// Registers a family of gauges that differ by `label`.
    pub fn gauges(&mut self, name: &str, help: &str, label: &'static str) -> Labelled<Gauge> {
        self.family(name, help, &[label])
    }

    /// Registers a family of gauges that differ by several labels (given to
    /// [`Labelled::get_all`] in this order).
    pub fn gauges_by(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&'static str],
    ) -> Labelled<Gauge> {
        self.family(name, help, labels)
    }

    /// Registers a histogram with these bucket upper bounds (`+Inf` is implied).
    pub fn histogram(&mut self, name: &str, help: &str, bounds: &[f64]) -> Histogram {
        let h = Histogram::new(bounds.iter().copied());
        self.register(name, help, h.clone());
        h
    }

    /// The Prometheus text exposition (version 0.0.4), served as [`CONTENT_TYPE`].
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.0)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_help_type_and_cumulative_buckets() {
        let mut r = Registry::new();
        let requests = r.counters("requests_total", "Requests by status.", "status");
        requests.get("200").inc_by(3);
        requests.get("503").inc();
        requests.get("200").inc();
        let h = r.histogram("latency_seconds", "Latency.", &[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        r.gauge("in_flight", "In flight.").set(2);
        let text = r.render().unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for expected in [
            "# HELP requests_total Requests by status.",
            "# TYPE requests_total counter",
            "requests_total{status=\"200\"} 4",
            "requests_total{status=\"503\"} 1",
            "# HELP latency_seconds Latency.",
            "# TYPE latency_seconds histogram",
            "latency_seconds_bucket{le=\"0.1\"} 1",
            "latency_seconds_bucket{le=\"1\"} 2",
            "latency_seconds_bucket{le=\"+Inf\"} 3",
            "latency_seconds_sum 5.55",
            "latency_seconds_count 3",
            "# HELP in_flight In flight.",
            "# TYPE in_flight gauge",
            "in_flight 2",
        ] {
            assert!(
                lines.contains(&expected),
                "no line {expected:?} in:\n{text}"
            );
        }
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("requests_total{"))
                .count(),
            2,
            "one series per label value:\n{text}"
        );
    }

    #[test]
    fn escapes_label_values() {
        let mut r = Registry::new();
        let lag = r.gauges("lag_records", "Lag per partition.", "partition");
        lag.get("a\"b\\c\nd").set(7);
        let text = r.render().unwrap();
        assert!(
            text.contains("lag_records{partition=\"a\\\"b\\\\c\\nd\"} 7\n"),
            "{text}"
        );
        let by = r.gauges_by("behind", "Behind.", &["topic", "partition"]);
        by.get_all(&["t", "0"]).set(1);
        by.get_all(&["u", "0"]).set(2);
        by.get_all(&["t", "0"]).inc();
        let text = r.render().unwrap();
        assert!(
            text.contains("behind{topic=\"t\",partition=\"0\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("behind{topic=\"u\",partition=\"0\"} 2\n"),
            "{text}"
        );
    }
}
