//! Spillway's consumer: Kafka to Postgres in batches, exactly once, through any database failure.
//!
//! Each batch is one Postgres transaction holding its rows (COPY BINARY), its dead letters,
//! and the move of the partition's position from where the batch started to where it ends
//! (a compare-and-set: if another consumer moved it, the transaction rolls back). Postgres is
//! the source of truth for positions; the Kafka commit after each flush only feeds lag tools.
//! While Postgres is down the buffer fills to its bound, then Kafka is paused; nothing is
//! dropped and memory stays flat. Every decision (batching, retries, isolating bad records,
//! pausing and re-reading partitions, fencing, draining) is the core's
//! [`spillway_core::ConsumerMachine`]; this crate only does the IO.
#![warn(missing_docs)]

#[cfg(all(feature = "mutations", not(debug_assertions)))]
compile_error!(
    "the `mutations` feature switches on known bugs for the chaos suite's mutation runs: \
     never build it in release mode"
);

pub mod config;
pub mod keys;
pub mod partitions;
pub mod pg;
mod pipeline;
pub mod source;
pub mod upsert;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warp::http::{Response, StatusCode};
use warp::hyper::Body;
use warp::Filter;

pub use config::{Args, Settings};
pub use pipeline::{
    fresh_metrics_page, Health, Metrics, FAILPOINT_EXIT_AFTER_COMMITS, FAILPOINT_PANIC_FLUSHES,
};

/// Why the consumer stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// A setting is unusable.
    #[error("{0}")]
    Config(#[from] spillway_core::ConfigError),
    /// The Kafka client could not be created.
    #[error("the Kafka client could not start ({0}): check --brokers and the -X properties")]
    Kafka(rdkafka::error::KafkaError),
    /// Postgres refused in a way retrying cannot fix (authentication, permissions, schema).
    #[error("Postgres refused the consumer: {0}. Nothing more was written; fix the database settings or permissions and restart (positions are kept)")]
    Fatal(String),
    /// The HTTP listener could not bind.
    #[error("cannot listen on {addr} ({detail}): change --listen")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Error.
        detail: String,
    },
    /// The process could not install its SIGTERM/SIGINT handlers.
    #[error("cannot install the signal handlers ({0}); nothing was started")]
    Signals(std::io::Error),
    /// An internal part stopped.
    #[error("stopped: {0}")]
    Stopped(String),
}

/// A running consumer.
pub struct RunningConsumer {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ConsumerError>>,
    http_stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for RunningConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningConsumer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl RunningConsumer {
    /// Where /healthz, /readyz and /metrics listen.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Live counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops reading, flushes what is buffered (if Postgres is up, within the shutdown
    /// timeout), leaves the group. Returns the pipeline's result.
    pub async fn shutdown(mut self) -> Result<(), ConsumerError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let result = (&mut self.task)
            .await
            .unwrap_or_else(|e| Err(ConsumerError::Stopped(e.to_string())));
        if let Some(s) = self.http_stop.take() {
            let _ = s.send(());
        }
        result
    }

    /// Resolves only if the pipeline stops by itself (a fatal error). Cancel-safe: dropping
    /// this future leaves the consumer running.
    pub async fn finished(&mut self) -> Result<(), ConsumerError> {
        (&mut self.task)
            .await
            .unwrap_or_else(|e| Err(ConsumerError::Stopped(e.to_string())))
    }

    /// Stops at once with no flush and no goodbye to the group, as a crash would (tests).
    pub fn abort(self) {
        self.task.abort();
    }
}

impl Drop for RunningConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The level `SPILLWAY_LOG` sets (`info` by default).
pub fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("SPILLWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// Logs to stderr at the level `SPILLWAY_LOG` sets (`info` by default), as the services do.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .init();
}

/// Runs the consumer until SIGTERM or SIGINT (then flushes what is buffered and leaves the
/// group) or until it stops by itself. What `spillway-consumer` runs; the chaos suite's
/// consumer child processes run it too.
pub async fn serve(settings: Settings) -> Result<(), ConsumerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ConsumerError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ConsumerError::Signals)?;
    let mut consumer = start(settings).await?;
    println!(
        "spillway-consumer started; metrics on http://{}/metrics",
        consumer.addr()
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        stopped = consumer.finished() => return stopped,
    }
    tracing::info!("signal received: flushing what is buffered, then leaving the group");
    consumer.shutdown().await
}

/// Validates the database URL, creates the schema (retrying while Postgres is unavailable),
/// joins the group and starts the pipeline and the HTTP endpoints.
pub async fn start(settings: Settings) -> Result<RunningConsumer, ConsumerError> {
    let pool = pg::Pool::new(
        &settings.database_url,
        settings.pool_size,
        settings.statement_timeout,
        settings.connect_timeout,
    )
    .map_err(|e| ConsumerError::Config(spillway_core::ConfigError::new("database-url", e)))?;
    let pool = Arc::new(pool);
    migrate_with_retry(&pool, &settings).await?;
    let metrics = pipeline::new_metrics(&settings.batcher);
    let health = Arc::new(Health::default());
    let rotation = partitions::Rotation::new(
        &pg::Targets::new(&settings),
        pool.clone(),
        metrics.clone(),
        settings.statement_timeout + settings.connect_timeout,
    );
    if let Some(r) = &rotation {
        // The wanted partitions exist before the first flush (failures are logged, and the
        // flushes and the next rounds try again).
        r.round(partitions::now_micros()).await;
    }
    let pipeline = pipeline::Pipeline::new(
        settings.clone(),
        pool.clone(),
        metrics.clone(),
        health.clone(),
        rotation,
    )?;
    let (http_stop, http_stop_rx) = oneshot::channel::<()>();
    let kafka = pipeline.kafka_client();
    let (addr, server) = warp::serve(routes(
        pool,
        kafka,
        metrics.clone(),
        health,
        settings.clone(),
    ))
    .try_bind_with_graceful_shutdown(settings.listen, async {
        let _ = http_stop_rx.await;
    })
    .map_err(|e| ConsumerError::Bind {
        addr: settings.listen,
        detail: e.to_string(),
    })?;
    tokio::spawn(server);
    let (stop, stop_rx) = oneshot::channel();
    let task = tokio::spawn(pipeline.run(stop_rx));
    tracing::info!(%addr, table = %settings.table.plain, topics = %settings.topics, group = %settings.group, "consumer started");
    Ok(RunningConsumer {
        addr,
        metrics,
        stop: Some(stop),
        task,
        http_stop: Some(http_stop),
    })
}

async fn migrate_with_retry(pool: &pg::Pool, settings: &Settings) -> Result<(), ConsumerError> {
    let mut retry = spillway_core::RetryPolicy::new(settings.batcher.retry.clone());
    let mut attempt = 0;
    loop {
        let result = async {
            let mut conn = pool.get().await?;
            pg::migrate(conn.client_mut(), &pg::Targets::new(settings)).await?;
            conn.release();
            Ok::<_, pg::PgFailure>(())
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(f) if f.class == spillway_core::ErrorClass::Fatal => {
                return Err(ConsumerError::Fatal(f.message))
            }
            Err(f) => {
                attempt += 1;
                if attempt == 1 {
                    tracing::warn!(error = %f, "Postgres is not reachable yet; retrying with backoff");
                }
                tokio::time::sleep(retry.delay(attempt)).await;
            }
        }
    }
}

fn routes(
    pool: Arc<pg::Pool>,
    kafka: Arc<KafkaClient>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    settings: Settings,
) -> impl Filter<Extract = (Response<Body>,), Error = Infallible> + Clone {
    let alive = health.clone();
    let healthz = warp::path("healthz").and(warp::get()).map(move || {
        match alive
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
        {
            None => text(StatusCode::OK, "alive\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the pipeline stopped: {why}\n"),
            ),
        }
    });
    let m = metrics.clone();
    let metrics_route =
        warp::path("metrics")
            .and(warp::get())
            .map(move || match m.registry.render() {
                Ok(page) => text(StatusCode::OK, page),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the metrics could not be encoded\n".into(),
                ),
            });
    let readyz = warp::path("readyz").and(warp::get()).then(move || {
        let (pool, kafka, topics) = (pool.clone(), kafka.clone(), settings.topics.clone());
        let health = health.clone();
        async move {
            if !health.ready.load(std::sync::atomic::Ordering::Relaxed) {
                let stopped = health
                    .stopped
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let why = match stopped {
                    Some(why) => format!("the pipeline stopped: {why}"),
                    None => health
                        .not_ready_because
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                };
                let why = if why.is_empty() {
                    "stopping".to_string()
                } else {
                    why
                };
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                );
            }
            match ready(&pool, kafka, topics).await {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
            }
        }
    });
    healthz
        .or(metrics_route)
        .unify()
        .or(readyz)
        .unify()
        .recover(|_| async {
            Ok::<_, Infallible>(text(
                StatusCode::NOT_FOUND,
                "use /healthz, /readyz or /metrics\n".into(),
            ))
        })
        .unify()
}

/// The running group consumer's client: readiness asks Kafka through it, so the check uses the
/// same brokers, TLS and SASL settings as the pipeline and opens no new connection.
type KafkaClient = rdkafka::consumer::BaseConsumer<source::Context>;

async fn ready(
    pool: &pg::Pool,
    kafka: Arc<KafkaClient>,
    topics: spillway_core::Topics,
) -> Result<(), String> {
    let pg = async {
        let conn = pool.get().await.map_err(|e| format!("Postgres: {e}"))?;
        conn.client()
            .simple_query("SELECT 1")
            .await
            .map_err(|e| format!("Postgres: {e}"))?;
        conn.release();
        Ok::<_, String>(())
    };
    tokio::time::timeout(Duration::from_secs(2), pg)
        .await
        .map_err(|_| "Postgres: no answer within 2 s".to_string())??;
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        for topic in topics.names() {
            kafka
                .fetch_metadata(Some(topic), Duration::from_secs(2))
                .map_err(|e| format!("Kafka ({topic}): {e}"))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", spillway_core::metrics::CONTENT_TYPE)
        .body(Body::from(body))
        .unwrap_or_default()
}
