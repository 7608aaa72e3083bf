//! Debian's `prometheus` (or `SPILLWAY_PROMETHEUS_BIN`) beside a scenario's services, for the
//! alert rules tested live (scenario 12).

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spillway_harness::http::HttpClient;
use spillway_harness::{free_port, ChildProcess};

use crate::cluster::{pause, Ctx, Service, Timeline};

/// Prometheus scraping the scenario's producer and consumers every second and evaluating
/// `deploy/prometheus/alerts.yml`, with every `for:` shortened to 5 s so that an alert fires
/// within seconds (promtool's unit tests check the real durations). Killed when dropped.
pub(crate) struct Prometheus {
    port: u16,
    process: ChildProcess,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub(crate) async fn start(
        ctx: &Ctx,
        producer: &Service,
        consumers: &[Service],
    ) -> Result<Self> {
        let bin = std::env::var("SPILLWAY_PROMETHEUS_BIN").unwrap_or("prometheus".into());
        let dir = tempfile::Builder::new()
            .prefix("spillway-prometheus-")
            .tempdir()?;
        let rules_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
        let rules: String = std::fs::read_to_string(&rules_path)
            .with_context(|| rules_path.display().to_string())?
            .lines()
            .map(|l| match l.trim_start().strip_prefix("for: ") {
                Some(_) => format!("{}for: 5s\n", &l[..l.len() - l.trim_start().len()]),
                None => format!("{l}\n"),
            })
            .collect();
        std::fs::write(dir.path().join("alerts.yml"), rules)?;
        let target = |s: &Service| format!("'127.0.0.1:{}'", s.port);
        let consumers: Vec<String> = consumers.iter().map(target).collect();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [alerts.yml]\n\
                 scrape_configs:\n\
                 - job_name: spillway-producer\n  static_configs: [{{targets: [{}]}}]\n\
                 - job_name: spillway-consumer\n  static_configs: [{{targets: [{}]}}]\n",
                target(producer),
                consumers.join(", ")
            ),
        )?;
        let port = free_port();
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let mut process = ChildProcess::spawn("prometheus", cmd, &ctx.logs.join("prometheus.log"))
            .with_context(|| {
                format!("starting {bin} (Debian's prometheus package; ci/test.sh installs it)")
            })?;
        let client = HttpClient::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = process.exited() {
                bail!("prometheus exited ({status}):\n{}", process.log_tail(20));
            }
            if let Ok(a) = client
                .get(&format!("http://127.0.0.1:{port}/-/ready"))
                .await
            {
                if a.status == 200 {
                    break;
                }
            }
            ensure!(
                Instant::now() < deadline,
                "prometheus was not ready within 60 s:\n{}",
                process.log_tail(20)
            );
            pause(Duration::from_millis(100)).await;
        }
        Ok(Prometheus {
            port,
            process,
            _dir: dir,
        })
    }

    /// The `data` of an API answer.
    pub(crate) async fn api(&self, path: &str) -> Result<serde_json::Value> {
        let a = HttpClient::new()
            .get(&format!("http://127.0.0.1:{}/api/v1/{path}", self.port))
            .await?;
        ensure!(
            a.status == 200,
            "prometheus {path}: {} {}",
            a.status,
            a.body
        );
        Ok(a.json()["data"].clone())
    }

    /// The first sample of an instant query, as Prometheus prints it ("none" without one).
    pub(crate) async fn value(&self, query: &str) -> Result<String> {
        let d = self.api(&format!("query?query={query}")).await?;
        Ok(d["result"][0]["value"][1]
            .as_str()
            .unwrap_or("none")
            .to_string())
    }

    /// The state of `alert` per the API (`pending`, `firing`), or None when it is inactive.
    pub(crate) async fn alert_state(&self, alert: &str) -> Result<Option<String>> {
        let data = self.api("alerts").await?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["labels"]["alertname"] == alert)
            .and_then(|a| a["state"].as_str().map(str::to_string)))
    }

    /// Polls until `check` holds (at most `within`), noting each change of what it saw.
    pub(crate) async fn await_until<F, Fut>(
        &self,
        tl: &Timeline,
        what: &str,
        within: Duration,
        check: F,
    ) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(bool, String)>>,
    {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        loop {
            let (done, seen) = check().await?;
            if seen != last {
                tl.note(format!("prometheus: {seen}"));
                last = seen;
            }
            if done {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{what} not seen within {within:?}; last: {last}\n{}",
                self.process.log_tail(10)
            );
            pause(Duration::from_millis(250)).await;
        }
    }
}
