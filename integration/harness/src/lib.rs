//! Spillway's test harness: real servers that tests can start, kill, pause and restart.
//!
//! - [`postgres::PostgresServer`]: what a test can do to a Postgres server (kill, crash a
//!   backend, pause, restart), with client helpers that work on any backend. Two backends:
//!   - [`native::LocalPostgres`]: a private PostgreSQL cluster from the machine's server
//!     binaries, with fsync and synchronous commit on, so a kill tests real durability;
//!   - [`docker::ContainerPostgres`]: the same in a Docker container, through testcontainers.
//!
//!   [`postgres_from_env`] picks one by `SPILLWAY_TEST_BACKEND` (`native`, the default, or
//!   `docker`).
//! - [`kafka`]: a Kafka broker behind one trait: [`kafka::Tansu`] (a real broker process),
//!   [`kafka::Mock`] (librdkafka's in-process mock cluster with fault injection) or
//!   [`kafka::External`] (a cluster you already run), picked by `SPILLWAY_TEST_KAFKA`.
//! - [`proxy::FaultProxy`]: a TCP proxy whose faults (latency, bandwidth, blackhole, reset,
//!   refuse, cut after N bytes, drop the answers) switch at run time.
//!
//! Every server listens on 127.0.0.1 on a free port and is torn down when its handle drops,
//! also when a test panics. Tests, benches and loadgen's local mode all use these pieces.
#![warn(missing_docs)]

pub mod docker;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod native;
pub mod postgres;
mod process;
pub mod proxy;

pub use docker::ContainerPostgres;
pub use kafka::{KafkaBroker, Mock, Storage, Tansu};
pub use native::LocalPostgres;
pub use postgres::PostgresServer;
pub use process::{free_port, ChildProcess, ProcessState};
pub use proxy::{FaultProxy, Faults};

/// Starts the Postgres backend `SPILLWAY_TEST_BACKEND` names: `native` (default: a
/// [`LocalPostgres`] from the machine's server binaries) or `docker` (a [`ContainerPostgres`]
/// through testcontainers).
pub fn postgres_from_env() -> Result<Box<dyn PostgresServer>> {
    match std::env::var("SPILLWAY_TEST_BACKEND").as_deref() {
        Ok("native") | Ok("") | Err(_) => Ok(Box::new(LocalPostgres::start()?)),
        Ok("docker") => Ok(Box::new(ContainerPostgres::start()?)),
        Ok(other) => Err(HarnessError::Unsupported(format!(
            "SPILLWAY_TEST_BACKEND={other}: use `native` or `docker`"
        ))),
    }
}

/// Why a harness operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A server binary is not installed.
    #[error("{what} not found: {hint}")]
    NotInstalled {
        /// What was looked for.
        what: &'static str,
        /// How to install it.
        hint: String,
    },
    /// A server did not become ready in time.
    #[error("{what} did not become ready within {secs} s; last log lines:\n{log}")]
    NotReady {
        /// Which server.
        what: &'static str,
        /// How long we waited.
        secs: u64,
        /// The tail of its log.
        log: String,
    },
    /// A command the harness runs failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status and output.
        detail: String,
    },
    /// An OS call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// A Kafka client call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A Postgres client call failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A signal could not be delivered (the process is gone, or may not be signalled).
    #[error("sending {signal} to pid {pid}: {errno}")]
    Signal {
        /// The process.
        pid: i32,
        /// The signal.
        signal: nix::sys::signal::Signal,
        /// Why it failed.
        errno: nix::errno::Errno,
    },
    /// The operation does not apply to this backend or state.
    #[error("{0}")]
    Unsupported(String),
}

/// Harness result.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}
