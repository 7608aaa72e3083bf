//! Kafka brokers behind one trait: a real Tansu process, librdkafka's mock cluster, or an
//! external cluster.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::RDKafkaErrorCode;
use tempfile::TempDir;

use crate::process::{
    accepts, continue_process, free_port, kill_and_reap, kill_for_fault, log_files, log_tail,
    stop_process, wait_until, ProcessState,
};
use crate::{io_err, HarnessError, Result};

/// The Tansu version the README's test command installs.
pub const TANSU_VERSION: &str = "0.6.0";

/// Its build with Spillway's patch (`ci/tansu/storage.patch`): where `ci/test.sh` caches it.
pub const TANSU_BUILD: &str = "0.6.0-spillway1";

/// The fast broker's build: Tansu 0.6.0 with its in-memory storage engine (feature
/// `dynostore`) and `ci/tansu/dynostore.patch`, which fixes that engine's two bugs (a fetch from
/// inside a stored batch skipped it; the latest offset fell short of the last batch), as
/// `ci/lib.sh`'s `ensure_fast_broker` builds it for benchmarks (`tests/fast_broker.rs`).
pub const FAST_BROKER_BUILD: &str = "0.6.0-fast1";

/// Where a Tansu-family broker keeps its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// SQLite in the broker's directory: survives SIGKILL. Every fault test uses it.
    Durable,
    /// Memory only (`memory://`, the fast broker): several times faster, and everything is
    /// gone when the process ends, so it refuses [`KafkaBroker::restart`]. For benchmarks.
    Memory,
}

/// A Kafka-compatible broker a test controls.
pub trait KafkaBroker {
    /// `bootstrap.servers` for clients.
    fn bootstrap(&self) -> String;
    /// Which backend this is ("tansu", "mock", "external").
    fn kind(&self) -> &'static str;
    /// Creates a topic (no error if it exists) and waits until its partitions have leaders.
    fn create_topic<'a>(&'a self, name: &'a str, partitions: i32) -> BoxFuture<'a, Result<()>>;
    /// Makes the broker unreachable at once (SIGKILL for a process; all brokers down for the
    /// mock cluster).
    fn kill(&mut self) -> Result<()>;
    /// Brings it back on the same address with the same data.
    fn restart(&mut self) -> Result<()>;
}

/// Starts the broker `SPILLWAY_TEST_KAFKA` names (`tansu`, `mock`, `external`). Unset, it is
/// Tansu when its binary is found, else the mock cluster. Prints one line saying which.
pub fn from_env() -> Result<Box<dyn KafkaBroker>> {
    let choice = std::env::var("SPILLWAY_TEST_KAFKA").unwrap_or_default();
    let broker: Box<dyn KafkaBroker> = match choice.as_str() {
        "tansu" => Box::new(Tansu::start()?),
        "fast" => Box::new(Tansu::start_in_memory()?),
        "mock" => Box::new(Mock::start(1)?),
        "external" => Box::new(External::from_env()?),
        "" => match tansu_bin() {
            Some(_) => Box::new(Tansu::start()?),
            None => Box::new(Mock::start(1)?),
        },
        other => {
            return Err(HarnessError::Unsupported(format!(
                "SPILLWAY_TEST_KAFKA={other}: expected tansu, fast, mock or external"
            )))
        }
    };
    eprintln!(
        "spillway-integration: Kafka backend {} at {}",
        broker.kind(),
        broker.bootstrap()
    );
    Ok(broker)
}

/// The Tansu binary: `SPILLWAY_TANSU_BIN`, else where `ci/test.sh` builds it with its patch
/// (`~/.cache/spillway/tansu-0.6.0-spillway1/bin/tansu`), else `tansu` on PATH.
pub fn tansu_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SPILLWAY_TANSU_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    // The patched build first: an unpatched `tansu` on PATH stops serving after an
    // idempotent producer's epoch bump (ci/tansu/storage.patch).
    let cached = std::env::var_os("HOME").and_then(|home| {
        let p = PathBuf::from(home)
            .join(".cache/spillway")
            .join(format!("tansu-{TANSU_BUILD}/bin/tansu"));
        p.is_file().then_some(p)
    });
    cached.or_else(|| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("tansu"))
                .find(|p| p.is_file())
        })
    })
}

/// The fast broker's binary: `SPILLWAY_FAST_BROKER_BIN`, else where `ci/lib.sh`'s
/// `ensure_fast_broker` builds it (`~/.cache/spillway/tansu-0.6.0-fast1/bin/tansu`).
pub fn fast_broker_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SPILLWAY_FAST_BROKER_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home)
        .join(".cache/spillway")
        .join(format!("tansu-{FAST_BROKER_BUILD}/bin/tansu"));
    p.is_file().then_some(p)
}

/// The Tansu broker as a child process, storing in SQLite in a temporary directory, or in
/// memory ([`Storage`]).
#[derive(Debug)]
pub struct Tansu {
    bin: PathBuf,
    storage: Storage,
    dir: TempDir,
    port: u16,
    advertised_port: u16,
    child: Option<Child>,
}

impl Tansu {
    /// Starts a broker on a free port of 127.0.0.1.
    pub fn start() -> Result<Self> {
        Self::start_advertising(None)
    }

    /// Starts a broker that tells clients to connect to `advertised_port` (a [`FaultProxy`]
    /// in front of it) instead of its own port, so every connection crosses the proxy.
    ///
    /// [`FaultProxy`]: crate::FaultProxy
    pub fn start_advertising(advertised_port: Option<u16>) -> Result<Self> {
        let bin = tansu_bin().ok_or_else(|| HarnessError::NotInstalled {
            what: "the Tansu broker",
            hint: format!(
                "run ci/test.sh (it builds Tansu {TANSU_VERSION} with ci/tansu/storage.patch \
                 into ~/.cache/spillway/tansu-{TANSU_BUILD}), or set SPILLWAY_TANSU_BIN to a \
                 Tansu binary; or use SPILLWAY_TEST_KAFKA=mock"
            ),
        })?;
        Self::spawn_new(bin, Storage::Durable, advertised_port)
    }

    /// Starts the fast broker: patched Tansu with the in-memory storage engine, on a free
    /// port of 127.0.0.1. For benchmarks: it loses everything when it stops.
    pub fn start_in_memory() -> Result<Self> {
        let bin = fast_broker_bin().ok_or_else(|| HarnessError::NotInstalled {
            what: "the fast (in-memory) broker",
            hint: format!(
                "run ci/fast-broker.sh (it builds Tansu {TANSU_VERSION} with the in-memory \
                 engine and ci/tansu/dynostore.patch into ~/.cache/spillway/tansu-\
                 {FAST_BROKER_BUILD}), or set SPILLWAY_FAST_BROKER_BIN to such a build"
            ),
        })?;
        Self::spawn_new(bin, Storage::Memory, None)
    }

    fn spawn_new(bin: PathBuf, storage: Storage, advertised_port: Option<u16>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("spillway-tansu-")
            .tempdir()
            .map_err(io_err("creating the broker directory"))?;
        let port = free_port();
        let mut t = Tansu {
            bin,
            storage,
            dir,
            port,
            advertised_port: advertised_port.unwrap_or(port),
            child: None,
        };
        t.spawn()?;
        Ok(t)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    fn spawn(&mut self) -> Result<()> {
        let (log, log2) = log_files(&self.log_path(), "broker")?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised_port);
        let mut child = Command::new(&self.bin)
            .arg("broker")
            .args([
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args([
                "--storage-engine",
                match self.storage {
                    Storage::Durable => "sqlite://tansu.db",
                    Storage::Memory => "memory://spillway/",
                },
            ])
            .current_dir(self.dir.path())
            .env(
                "RUST_LOG",
                std::env::var("SPILLWAY_TANSU_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io_err(format!("starting {}", self.bin.display())))?;
        let port = self.port;
        if !wait_until(&mut child, Duration::from_secs(30), || accepts(port)) {
            let _ = kill_and_reap(&mut child);
            return Err(HarnessError::NotReady {
                what: "tansu",
                secs: 30,
                log: log_tail(&self.log_path(), 20),
            });
        }
        self.child = Some(child);
        Ok(())
    }

    /// The last `lines` lines of the broker's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), lines)
    }

    /// The port the broker itself listens on (the advertised one may be a proxy's).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's pid, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn running_pid(&self) -> Result<i32> {
        self.pid()
            .map(|p| p as i32)
            .ok_or_else(|| HarnessError::Unsupported("tansu is not running".into()))
    }

    /// SIGSTOP: the broker freezes with its connections open (requests wait, unanswered, and
    /// nothing is reset). Returns once the kernel shows it stopped (state `T`).
    pub fn pause(&self) -> Result<ProcessState> {
        stop_process(self.running_pid()?)
    }

    /// SIGCONT after [`Tansu::pause`]; returns once it is no longer stopped.
    pub fn resume(&self) -> Result<ProcessState> {
        continue_process(self.running_pid()?)
    }
}

impl KafkaBroker for Tansu {
    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised_port)
    }

    fn kind(&self) -> &'static str {
        match self.storage {
            Storage::Durable => "tansu",
            Storage::Memory => "fast (in-memory)",
        }
    }

    fn create_topic<'a>(&'a self, name: &'a str, partitions: i32) -> BoxFuture<'a, Result<()>> {
        Box::pin(admin_create_topic(self.bootstrap(), name, partitions))
    }

    fn kill(&mut self) -> Result<()> {
        match self.child.take() {
            Some(mut child) => kill_for_fault(&mut child, "tansu").map(|_| ()),
            None => Err(HarnessError::Unsupported("tansu is not running".into())),
        }
    }

    fn restart(&mut self) -> Result<()> {
        if self.storage == Storage::Memory {
            return Err(HarnessError::Unsupported(
                "the in-memory broker would come back empty: fault tests use the durable one \
                 (SPILLWAY_TEST_KAFKA=tansu)"
                    .into(),
            ));
        }
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child)?;
        }
        self.spawn()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill_and_reap(&mut child);
        }
    }
}

/// librdkafka's in-process mock cluster, for injected broker errors. Its data lives in memory
/// for as long as this handle.
pub struct Mock {
    cluster: MockCluster<'static, DefaultProducerContext>,
    brokers: i32,
}

impl std::fmt::Debug for Mock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mock")
            .field("bootstrap", &self.cluster.bootstrap_servers())
            .finish()
    }
}

impl Mock {
    /// A mock cluster of `brokers` brokers (ids 1..=brokers).
    pub fn start(brokers: i32) -> Result<Self> {
        Ok(Mock {
            cluster: MockCluster::new(brokers)?,
            brokers,
        })
    }

    /// The cluster, for fault injection: `request_errors`, `broker_down`/`broker_up`,
    /// `broker_round_trip_time`, `topic_error`.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}

impl KafkaBroker for Mock {
    fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    fn kind(&self) -> &'static str {
        "mock"
    }

    fn create_topic<'a>(&'a self, name: &'a str, partitions: i32) -> BoxFuture<'a, Result<()>> {
        let result = self.cluster.create_topic(name, partitions, 1);
        Box::pin(async move { Ok(result?) })
    }

    fn kill(&mut self) -> Result<()> {
        for id in 1..=self.brokers {
            self.cluster.broker_down(id)?;
        }
        Ok(())
    }

    fn restart(&mut self) -> Result<()> {
        for id in 1..=self.brokers {
            self.cluster.broker_up(id)?;
        }
        Ok(())
    }
}

/// A cluster the user runs, named by `SPILLWAY_TEST_KAFKA_BROKERS`. It cannot be killed.
#[derive(Debug)]
pub struct External {
    bootstrap: String,
}

impl External {
    /// Reads `SPILLWAY_TEST_KAFKA_BROKERS`.
    pub fn from_env() -> Result<Self> {
        let bootstrap = std::env::var("SPILLWAY_TEST_KAFKA_BROKERS").map_err(|_| {
            HarnessError::Unsupported(
                "SPILLWAY_TEST_KAFKA=external needs SPILLWAY_TEST_KAFKA_BROKERS=host:port,..."
                    .into(),
            )
        })?;
        Ok(External { bootstrap })
    }
}

impl KafkaBroker for External {
    fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    fn kind(&self) -> &'static str {
        "external"
    }

    fn create_topic<'a>(&'a self, name: &'a str, partitions: i32) -> BoxFuture<'a, Result<()>> {
        Box::pin(admin_create_topic(self.bootstrap(), name, partitions))
    }

    fn kill(&mut self) -> Result<()> {
        Err(HarnessError::Unsupported(
            "an external Kafka cluster cannot be killed by tests".into(),
        ))
    }

    fn restart(&mut self) -> Result<()> {
        Err(HarnessError::Unsupported(
            "an external Kafka cluster cannot be restarted by tests".into(),
        ))
    }
}

/// Creates a topic through the Kafka admin API (an existing one is fine) and waits until the
/// metadata shows every partition with a leader.
pub async fn admin_create_topic(bootstrap: String, name: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics([&topic], &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(HarnessError::Unsupported(format!(
                    "creating topic {topic} on {bootstrap}: {code}"
                )))
            }
        }
    }
    let name = name.to_string();
    tokio::task::spawn_blocking(move || wait_for_leaders(&bootstrap, &name, partitions))
        .await
        .map_err(|e| HarnessError::Unsupported(format!("metadata wait panicked: {e}")))?
}

fn wait_for_leaders(bootstrap: &str, topic: &str, partitions: i32) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let mut last = String::new();
    for _ in 0..100 {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(md) => {
                let ready = md.topics().iter().any(|t| {
                    t.name() == topic
                        && t.error().is_none()
                        && t.partitions().len() == partitions as usize
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                });
                if ready {
                    return Ok(());
                }
                last = "partitions without leader".into();
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(HarnessError::Unsupported(format!(
        "topic {topic} on {bootstrap} has no leaders after 10 s: {last}"
    )))
}

/// Every message of `topic`, keyed by (partition, offset): each partition is read from its low
/// to its high watermark as they stand when called, with no consumer group, and never waits
/// at the log end.
pub fn read_all(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
) -> Result<BTreeMap<(i32, i64), Vec<u8>>> {
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "spillway-harness-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
            if high > low {
                ends.insert(p.id(), high);
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
            }
        }
    }
    let mut out = BTreeMap::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut last_error = None;
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(HarnessError::Unsupported(format!(
                "reading {topic}: partitions {:?} not read to their end within {timeout:?} (last error: {last_error:?})",
                ends.keys().collect::<Vec<_>>()
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                out.insert(
                    (m.partition(), m.offset()),
                    m.payload().unwrap_or_default().to_vec(),
                );
                if ends
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() + 1 >= *end)
                {
                    ends.remove(&m.partition());
                }
            }
            // Connection errors are events, not the end: librdkafka keeps reconnecting.
            Some(Err(e)) => last_error = Some(e),
            None => {}
        }
    }
    Ok(out)
}

/// Each partition of `topic` with its low and high watermarks.
pub fn watermarks(bootstrap: &str, topic: &str) -> Result<BTreeMap<i32, (i64, i64)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut out = BTreeMap::new();
    for t in md.topics() {
        for p in t.partitions() {
            let marks = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            out.insert(p.id(), marks);
        }
    }
    Ok(out)
}

/// The sum of the high watermarks of a topic's partitions: how many messages it ever held.
pub fn message_count(bootstrap: &str, topic: &str) -> Result<i64> {
    Ok(watermarks(bootstrap, topic)?
        .values()
        .map(|(low, high)| high - low)
        .sum())
}
