//! Reading a value off a Prometheus text page, for tests that check a service's counters.

/// The sum of `name`'s samples on a Prometheus text page (every label set), or `None` when the
/// page has no sample of that name: a renamed or missing metric is never read as 0.
pub fn sample_sum(page: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = page
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::sample_sum;

    #[test]
    fn sums_every_label_set_and_tells_a_missing_metric_from_zero() {
        let page = "# HELP a_total A.\n# TYPE a_total counter\na_total 0\n\
                    lag{partition=\"0\"} 3\nlag{partition=\"1\"} 4\nlag_other 9\n";
        assert_eq!(sample_sum(page, "a_total"), Some(0.0));
        assert_eq!(sample_sum(page, "lag"), Some(7.0));
        assert_eq!(sample_sum(page, "a"), None);
        assert_eq!(sample_sum(page, "renamed_total"), None);
    }
}
