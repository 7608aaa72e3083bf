//! Settings in two stages: raw [`Args`] (flags, environment, TOML file), then validated
//! [`Settings`] holding the core's batcher config. Precedence: flag, environment, file, default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use spillway_core::props::{parse_properties, redact_properties};
use spillway_core::{
    AdaptiveConfig, BatcherConfig, ColumnSpec, ConfigError, ConsumerConfig, Interval, Jitter,
    Mapping, Matcher, OnConflict, Partitioning, Retention, RetryConfig, Topics, Upsert,
};

use crate::pg::TableName;

/// Raw settings as the user gave them.
#[derive(Parser, Deserialize, Default, Debug)]
#[command(
    name = "spillway-consumer",
    version,
    about = "Reads Spillway envelopes from Kafka and writes their records into Postgres in \
             batches, exactly once: each batch and the partition's position commit in one \
             transaction."
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Args {
    /// TOML file with any of these settings (long flag names as keys; librdkafka properties
    /// in a [librdkafka] table). Flags and environment variables override it.
    #[arg(long, env = "SPILLWAY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers (required).
    #[arg(long, env = "KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// Topic to read (required), or several, comma-separated, each writing its own table:
    /// TOPIC:TABLE, or just TOPIC for a table of the topic's name, e.g.
    /// --topic clicks,orders:order_rows (then --name is required and --table and --route are
    /// refused). With one topic, TOPIC:TABLE is --topic TOPIC --table TABLE.
    #[arg(long, env = "SPILLWAY_TOPIC", value_name = "TOPIC[:TABLE][,...]")]
    pub topic: Option<String>,
    /// Consumer group; consumers in one group split the partitions [default: spillway].
    #[arg(long, env = "SPILLWAY_GROUP")]
    pub group: Option<String>,
    /// Postgres URL, e.g. postgres://user:pass@host/db?sslmode=require (required).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Records table (dead letters go to <table>_dead_letters) [default: records].
    #[arg(long, env = "SPILLWAY_TABLE")]
    pub table: Option<String>,
    /// Address for /healthz, /readyz and /metrics [default: 127.0.0.1:9090].
    #[arg(long, env = "SPILLWAY_METRICS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Largest batch in records; the size adapts between min and this [default: 20000].
    #[arg(long, env = "SPILLWAY_BATCH_MAX_RECORDS")]
    pub batch_max_records: Option<usize>,
    /// Smallest target batch size in records; also how many records a partition needs to be
    /// flushed early while a pooled connection is idle [default: 100].
    #[arg(long, env = "SPILLWAY_BATCH_MIN_RECORDS")]
    pub batch_min_records: Option<usize>,
    /// Largest batch in bytes [default: 8388608].
    #[arg(long, env = "SPILLWAY_BATCH_MAX_BYTES")]
    pub batch_max_bytes: Option<usize>,
    /// A record waits at most this long before its batch is flushed [default: 500]. While a
    /// pooled connection is idle, a partition holding --batch-min-records is flushed sooner.
    #[arg(long, env = "SPILLWAY_BATCH_MAX_AGE_MS")]
    pub batch_max_age_ms: Option<u64>,
    /// Flushes slower than this shrink the batch size [default: 250].
    #[arg(long, env = "SPILLWAY_FLUSH_LATENCY_TARGET_MS")]
    pub flush_latency_target_ms: Option<u64>,
    /// Records held in memory at most, in flight included; then Kafka is paused [default: 200000].
    #[arg(long, env = "SPILLWAY_BUFFER_MAX_RECORDS")]
    pub buffer_max_records: Option<usize>,
    /// Bytes held in memory at most [default: 67108864].
    #[arg(long, env = "SPILLWAY_BUFFER_MAX_BYTES")]
    pub buffer_max_bytes: Option<usize>,
    /// First retry delay after a failed flush [default: 100].
    #[arg(long, env = "SPILLWAY_RETRY_INITIAL_MS")]
    pub retry_initial_ms: Option<u64>,
    /// Longest retry delay [default: 5000].
    #[arg(long, env = "SPILLWAY_RETRY_MAX_MS")]
    pub retry_max_ms: Option<u64>,
    /// Seed of the retry jitter, to replay a run [default: random].
    #[arg(long, env = "SPILLWAY_RETRY_SEED")]
    pub retry_seed: Option<u64>,
    /// Postgres connections (partitions flush in parallel over them) [default: 4].
    #[arg(long, env = "SPILLWAY_POOL_SIZE")]
    pub pool_size: Option<usize>,
    /// Postgres statement timeout [default: 30000].
    #[arg(long, env = "SPILLWAY_STATEMENT_TIMEOUT_MS")]
    pub statement_timeout_ms: Option<u64>,
    /// Postgres connect timeout [default: 5000].
    #[arg(long, env = "SPILLWAY_CONNECT_TIMEOUT_MS")]
    pub connect_timeout_ms: Option<u64>,
    /// On SIGTERM, how long to try flushing what is buffered [default: 30000].
    #[arg(long, env = "SPILLWAY_SHUTDOWN_TIMEOUT_MS")]
    pub shutdown_timeout_ms: Option<u64>,
    /// Rejoin the group when this consumer owns no partition while a partition has lag and a
    /// stored position that has not moved for this long (default 20000).
    #[arg(long, env = "SPILLWAY_ORPHAN_REJOIN_MS")]
    pub orphan_rejoin_ms: Option<u64>,
    /// A typed column: NAME:TYPE=POINTER (repeatable), e.g. --column user_id:bigint=/user/id.
    /// POINTER is a JSON Pointer into the record, or @request_id, @received_at, @kafka_key,
    /// @kafka_timestamp, @kafka_partition, @kafka_offset, @record_index, @headers. A `!` after
    /// the type (bigint!) dead-letters a record whose value is missing or null. In the
    /// environment, separate mappings with `;`. Replaces the config file's [[columns]].
    #[arg(
        long = "column",
        env = "SPILLWAY_COLUMNS",
        value_delimiter = ';',
        value_name = "NAME:TYPE=POINTER"
    )]
    #[serde(skip)]
    pub column: Vec<String>,
    /// Typed columns from the config file: [[columns]] tables with name, type, pointer and
    /// optionally not-null = true.
    #[arg(skip)]
    pub columns: Vec<ColumnEntry>,
    /// Keep the whole record in the `data jsonb` column [default: true].
    #[arg(long, env = "SPILLWAY_KEEP_DATA", value_name = "true|false", action = clap::ArgAction::Set)]
    pub keep_data: Option<bool>,
    /// Write by key: the mapped columns (comma-separated) that identify a row, e.g.
    /// --upsert-key user_id. The table gets a unique index on them; each batch is merged in
    /// with INSERT ... ON CONFLICT, the last record per key (Kafka order) winning within a
    /// batch. A record without its key is dead-lettered.
    #[arg(long, env = "SPILLWAY_UPSERT_KEY", value_name = "COLUMN[,COLUMN...]")]
    pub upsert_key: Option<String>,
    /// With --upsert-key: what a record whose key is already in the table does: update (the
    /// row takes its values) or ignore (the row stays) [default: update].
    #[arg(long, env = "SPILLWAY_ON_CONFLICT", value_name = "update|ignore")]
    pub on_conflict: Option<String>,
    /// With --upsert-key: a record whose value at POINTER is VALUE deletes its key's row
    /// instead, e.g. --delete-when /op=delete (a JSON string's content, or another value's
    /// JSON text: /deleted=true).
    #[arg(long, env = "SPILLWAY_DELETE_WHEN", value_name = "POINTER=VALUE")]
    pub delete_when: Option<String>,
    /// Route records to other tables: POINTER=VALUE:TABLE (repeatable; the first rule that
    /// holds wins, the rest go to --table), e.g. --route /type=click:clicks. A routed table
    /// takes its columns from its [[tables]] section of the config file, or else the same
    /// mapping as --table. In the environment, separate rules with `;`.
    #[arg(
        long = "route",
        env = "SPILLWAY_ROUTES",
        value_delimiter = ';',
        value_name = "POINTER=VALUE:TABLE"
    )]
    pub route: Vec<String>,
    /// Routed tables' (or several topics' tables') own settings, from the config file:
    /// [[tables]] with name, and any of
    /// keep-data, upsert-key, on-conflict, delete-when, partition-by, partition-interval,
    /// retention and [[tables.columns]].
    #[arg(skip)]
    pub tables: Vec<TableEntry>,
    /// Partition the table by time on this column: received_at (when the producer received
    /// the request) or a mapped timestamptz, timestamptz(ms), timestamptz(s) or date column.
    /// A new table is created PARTITION BY RANGE with a default partition; partitions are
    /// created ahead (the interval holding now, two more and at least a day) and dropped past
    /// --retention. An existing table that is not partitioned so refuses to start.
    #[arg(long, env = "SPILLWAY_PARTITION_BY", value_name = "COLUMN")]
    pub partition_by: Option<String>,
    /// With --partition-by: each partition's range, aligned in UTC: hour, day, week (ISO,
    /// from Monday) or month [default: day].
    #[arg(
        long,
        env = "SPILLWAY_PARTITION_INTERVAL",
        value_name = "hour|day|week|month"
    )]
    pub partition_interval: Option<String>,
    /// With --partition-by: drop a partition once its whole range is older than this: a whole
    /// number and h, d or w, e.g. 30d [default: keep every partition].
    #[arg(long, env = "SPILLWAY_RETENTION", value_name = "DURATION")]
    pub retention: Option<String>,
    /// How long the Idempotency-Keys written are kept (per table, in <table>_request_keys): a
    /// request sent again with its key within this time is written once. A whole number and
    /// h, d or w [default: 24h]. Older keys are deleted in small batches every minute.
    #[arg(
        long,
        env = "SPILLWAY_IDEMPOTENCY_KEY_RETENTION",
        value_name = "DURATION"
    )]
    pub idempotency_key_retention: Option<String>,
    /// This consumer's name: its stored positions are kept under it, whatever tables it
    /// writes [default: the --table name, where positions were kept before routing].
    #[arg(long, env = "SPILLWAY_NAME")]
    pub name: Option<String>,
    /// A librdkafka property: -X key=value (repeatable), e.g. -X session.timeout.ms=10000.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    #[serde(skip)]
    pub rdkafka: Vec<String>,
    /// librdkafka properties from the config file's [librdkafka] table.
    #[arg(skip)]
    pub librdkafka: BTreeMap<String, String>,
}

/// One `[[tables]]` section of the config file: a routed table's (or a topic's table's) own
/// columns.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct TableEntry {
    /// The table, as in a --route rule.
    pub name: String,
    /// Keep the whole record in `data` [default: true].
    pub keep_data: Option<bool>,
    /// Its typed columns.
    pub columns: Vec<ColumnEntry>,
    /// Write by key (as --upsert-key).
    pub upsert_key: Option<String>,
    /// As --on-conflict.
    pub on_conflict: Option<String>,
    /// As --delete-when.
    pub delete_when: Option<String>,
    /// As --partition-by.
    pub partition_by: Option<String>,
    /// As --partition-interval.
    pub partition_interval: Option<String>,
    /// As --retention.
    pub retention: Option<String>,
}

/// A table the consumer writes and its columns.
#[derive(Clone, Debug)]
pub struct TableSpec {
    /// The table.
    pub table: TableName,
    /// Its columns.
    pub mapping: Mapping,
    /// Its time partitions, if it has any.
    pub partitioning: Option<Partitioning>,
}

/// One `[[columns]]` table of the config file.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ColumnEntry {
    /// The column's name.
    pub name: String,
    /// Its type (`bigint`, `timestamptz(ms)`, ...).
    #[serde(rename = "type")]
    pub ty: String,
    /// A JSON Pointer or `@metadata`.
    pub pointer: String,
    /// Missing or null dead-letters the record.
    #[serde(default)]
    pub not_null: bool,
}

impl ColumnEntry {
    fn spec(&self) -> String {
        let bang = if self.not_null { "!" } else { "" };
        format!("{}:{}{bang}={}", self.name, self.ty, self.pointer)
    }
}

/// Validated settings.
#[derive(Clone)]
pub struct Settings {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The topics, in the order given (one, usually).
    pub topics: Topics,
    /// Each topic's table, in the order of `topics`: the records table first, the others
    /// among `routed`.
    pub topic_tables: Vec<String>,
    /// Consumer group.
    pub group: String,
    /// Postgres URL.
    pub database_url: String,
    /// Records table.
    pub table: TableName,
    /// Health and metrics address (port 0: any).
    pub listen: SocketAddr,
    /// Batching, capacity, retries.
    pub batcher: BatcherConfig,
    /// Postgres connections.
    pub pool_size: usize,
    /// Statement timeout.
    pub statement_timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Shutdown grace.
    pub shutdown_timeout: Duration,
    /// Rejoin the group after owning nothing this long while partitions have lag nobody writes.
    pub orphan_timeout: Duration,
    /// Extra librdkafka properties, applied last.
    pub rdkafka: Vec<(String, String)>,
    /// The records table's columns: `data` or not, and the typed ones.
    pub mapping: Mapping,
    /// The name the stored positions are kept under (`--name`; `None`: the records table's,
    /// see [`Settings::name`]).
    pub name: Option<String>,
    /// `--route` rules in order, each naming a table of `routed` (or the records table).
    pub routes: Vec<(Matcher, String)>,
    /// The tables besides the records table, each once, with their columns: those routes
    /// name, or the other topics' tables.
    pub routed: Vec<TableSpec>,
    /// The records table's time partitions (`--partition-by`).
    pub partitioning: Option<Partitioning>,
    /// How often partitions are checked, created ahead and dropped past the retention (not a
    /// flag: a minute, which tests shorten).
    pub partition_check_every: Duration,
    /// How long the idempotency keys written are kept (`--idempotency-key-retention`).
    pub key_retention: Duration,
    /// How often keys past `key_retention` are deleted (not a flag: a minute, which tests
    /// shorten).
    pub key_expiry_every: Duration,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = redact_url(&self.database_url);
        f.debug_struct("Settings")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics.to_string())
            .field("group", &self.group)
            .field("database_url", &url)
            .field("table", &self.table.plain)
            .field("batcher", &self.batcher)
            .field("pool_size", &self.pool_size)
            .field("rdkafka", &redact_properties(&self.rdkafka))
            .field("keep_data", &self.mapping.keep_data())
            .field("upsert", &self.mapping.upsert().map(ToString::to_string))
            .field(
                "partitioning",
                &self.partitioning.as_ref().map(ToString::to_string),
            )
            .field(
                "columns",
                &self
                    .mapping
                    .columns()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn bad(setting: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::new(setting, problem)
}

impl Settings {
    /// Defaults for the required settings (tests, loadgen's local stack).
    pub fn new(
        brokers: impl Into<String>,
        topic: impl Into<String>,
        database_url: impl Into<String>,
    ) -> Self {
        Settings {
            brokers: brokers.into(),
            topics: Topics::one(topic),
            topic_tables: vec!["records".into()],
            group: "spillway".into(),
            database_url: database_url.into(),
            table: TableName::parse("records").expect("valid default"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            batcher: BatcherConfig {
                max_batch_bytes: 8 << 20,
                max_age: Duration::from_millis(500),
                capacity_records: 200_000,
                capacity_bytes: 64 << 20,
                size: AdaptiveConfig {
                    min_records: 100,
                    max_records: 20_000,
                    initial_records: 2_000,
                    latency_target: Duration::from_millis(250),
                    increase_step: 1_000,
                    decrease_factor: 0.5,
                },
                retry: RetryConfig {
                    initial: Duration::from_millis(100),
                    max: Duration::from_secs(5),
                    multiplier: 2.0,
                    jitter: Jitter::Equal,
                    seed: 0,
                },
                // Not a setting of its own: `machine_config` sets it to `pool_size`.
                writers: 4,
            },
            pool_size: 4,
            statement_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            orphan_timeout: Duration::from_secs(20),
            rdkafka: vec![],
            mapping: Mapping::default(),
            name: None,
            routes: vec![],
            routed: vec![],
            partitioning: None,
            partition_check_every: Duration::from_secs(60),
            key_retention: Duration::from_secs(24 * 3600),
            key_expiry_every: Duration::from_secs(60),
        }
    }

    /// Reads the `--config` file under the flags, applies defaults and validates.
    pub fn from_args(mut a: Args) -> Result<Self, ConfigError> {
        if let Some(path) = &a.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad("config", format!("cannot read {}: {e}", path.display())))?;
            let f: Args = toml::from_str(&text)
                .map_err(|e| bad("config", format!("{}: {e}", path.display())))?;
            macro_rules! under_flags { ($($field:ident),*) => { $( a.$field = a.$field.or(f.$field); )* } }
            under_flags!(
                brokers,
                topic,
                group,
                database_url,
                table,
                listen,
                batch_max_records,
                batch_min_records,
                batch_max_bytes,
                batch_max_age_ms,
                flush_latency_target_ms,
                buffer_max_records,
                buffer_max_bytes,
                retry_initial_ms,
                retry_max_ms,
                retry_seed,
                pool_size,
                statement_timeout_ms,
                connect_timeout_ms,
                shutdown_timeout_ms,
                orphan_rejoin_ms,
                keep_data,
                upsert_key,
                on_conflict,
                delete_when,
                name,
                partition_by,
                partition_interval,
                retention,
                idempotency_key_retention
            );
            a.librdkafka = f.librdkafka;
            a.columns = f.columns;
            a.tables = f.tables;
            if a.route.is_empty() {
                a.route = f.route;
            }
        }
        let required = |v: Option<String>, name: &'static str, how: &str| {
            v.filter(|s| !s.trim().is_empty())
                .ok_or_else(|| bad(name, format!("required: {how}")))
        };
        let brokers = required(
            a.brokers,
            "brokers",
            "pass --brokers host:port or set KAFKA_BROKERS",
        )?;
        let topic = required(a.topic, "topic", "pass --topic NAME or set SPILLWAY_TOPIC")?;
        let listed = topic_list(&topic)?;
        let url = required(
            a.database_url,
            "database-url",
            "pass --database-url postgres://... or set DATABASE_URL",
        )?;
        let mut s = Settings::new(brokers, listed[0].0.clone(), url);
        s.topics = Topics::new(listed.iter().map(|(t, _)| t.clone()).collect())?;
        if let Some(g) = a.group {
            s.group = g;
        }
        s.table = match (&listed[..], a.table) {
            ([(_, Some(_))], Some(_)) => {
                return Err(bad(
                    "table",
                    "--topic names the table (TOPIC:TABLE) and so does --table: give it once",
                ))
            }
            ([(_, Some(t))], None) => t.clone(),
            ([_], Some(t)) => TableName::parse(&t).map_err(|e| bad("table", e))?,
            ([_], None) => s.table,
            (_, Some(_)) => {
                return Err(bad(
                    "table",
                    "with several topics each writes its own table: name them in --topic \
                     (a:table_a,b:table_b), or leave them out for tables of the topics' names",
                ))
            }
            (several, None) => table_of(&several[0])?,
        };
        let topic_tables: Vec<TableName> = match &listed[..] {
            [_] => vec![s.table.clone()],
            several => several.iter().map(table_of).collect::<Result<_, _>>()?,
        };
        for (i, t) in topic_tables.iter().enumerate() {
            if topic_tables[..i].iter().any(|o| o.plain == t.plain) {
                return Err(bad(
                    "topic",
                    format!(
                        "two topics write {}: each topic writes its own table",
                        t.plain
                    ),
                ));
            }
        }
        s.topic_tables = topic_tables.iter().map(|t| t.plain.clone()).collect();
        if let Some(n) = a.name {
            if n.trim().is_empty() || n.len() > 200 {
                return Err(bad("name", "must be 1 to 200 characters"));
            }
            s.name = Some(n);
        }
        if let Some(l) = a.listen {
            s.listen = l;
        }
        let ms = Duration::from_millis;
        let b = &mut s.batcher;
        if let Some(v) = a.batch_max_records {
            b.size.max_records = v;
            b.size.initial_records = b.size.initial_records.min(v);
            b.size.min_records = b.size.min_records.min(v);
        }
        if let Some(v) = a.batch_min_records {
            b.size.min_records = v;
            b.size.initial_records = b.size.initial_records.max(v);
        }
        b.size.increase_step = (b.size.max_records / 20).max(1);
        if let Some(v) = a.batch_max_bytes {
            b.max_batch_bytes = v;
        }
        if let Some(v) = a.batch_max_age_ms {
            b.max_age = ms(v);
        }
        if let Some(v) = a.flush_latency_target_ms {
            b.size.latency_target = ms(v);
        }
        if let Some(v) = a.buffer_max_records {
            b.capacity_records = v;
        }
        if let Some(v) = a.buffer_max_bytes {
            b.capacity_bytes = v;
        }
        if let Some(v) = a.retry_initial_ms {
            b.retry.initial = ms(v);
        }
        if let Some(v) = a.retry_max_ms {
            b.retry.max = ms(v);
        }
        b.retry.seed = a.retry_seed.unwrap_or_else(random_seed);
        b.validate()?;
        if let Some(v) = a.pool_size {
            if v == 0 {
                return Err(bad("pool-size", "must be at least 1"));
            }
            s.pool_size = v;
        }
        let positive = |v: u64, name: &'static str| {
            if v == 0 {
                Err(bad(name, "must be greater than zero"))
            } else {
                Ok(ms(v))
            }
        };
        if let Some(v) = a.statement_timeout_ms {
            s.statement_timeout = positive(v, "statement-timeout-ms")?;
        }
        if let Some(v) = a.connect_timeout_ms {
            s.connect_timeout = positive(v, "connect-timeout-ms")?;
        }
        if let Some(v) = a.shutdown_timeout_ms {
            s.shutdown_timeout = positive(v, "shutdown-timeout-ms")?;
        }
        if let Some(v) = a.orphan_rejoin_ms {
            s.orphan_timeout = positive(v, "orphan-rejoin-ms")?;
        }
        if let Some(r) = a.idempotency_key_retention {
            let r =
                Retention::parse(&r).map_err(|e| bad("idempotency-key-retention", e.problem))?;
            s.key_retention = Duration::from_micros(r.micros() as u64);
        }
        s.rdkafka = a.librdkafka.into_iter().collect();
        s.rdkafka.extend(parse_properties(&a.rdkafka)?);
        let specs: Vec<String> = if a.column.is_empty() {
            a.columns.iter().map(ColumnEntry::spec).collect()
        } else {
            a.column
        };
        let columns = specs
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.parse::<ColumnSpec>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("column", e.to_string()))?;
        s.mapping = mapping(
            columns,
            a.keep_data,
            a.upsert_key,
            a.on_conflict,
            a.delete_when,
        )?;
        s.partitioning = partitioning(
            a.partition_by,
            a.partition_interval,
            a.retention,
            &s.mapping,
        )?;
        let mut rules = Vec::new();
        for r in a.route.iter().filter(|r| !r.trim().is_empty()) {
            let (when, table) = r.rsplit_once(':').ok_or_else(|| {
                bad(
                    "route",
                    format!(
                        "{r:?} is not POINTER=VALUE:TABLE: write for example /type=click:clicks"
                    ),
                )
            })?;
            let when: Matcher = when.parse().map_err(|e: String| bad("route", e))?;
            let table = TableName::parse(table).map_err(|e| bad("route", e))?;
            rules.push((when, table));
        }
        let several = s.topics.several();
        if several && !rules.is_empty() {
            return Err(bad(
                "route",
                "--route applies to a consumer of one topic: with several topics each writes \
                 its own table; run one consumer per topic to route within a topic",
            ));
        }
        if several && s.name.is_none() {
            return Err(bad(
                "name",
                "required with several topics: pass --name NAME, the name their positions are \
                 kept under, and keep it when the list of topics changes. A consumer that read \
                 one of these topics alone kept its positions under its table's name (its \
                 --table, default records): pass that name, or that topic starts over from \
                 its first offset",
            ));
        }
        for t in &a.tables {
            let named = |r: &(Matcher, TableName)| r.1.plain == t.name;
            let routed = t.name != s.table.plain && rules.iter().any(named);
            if !(routed || several && s.topic_tables.contains(&t.name)) {
                return Err(bad(
                    "tables",
                    format!(
                        "[[tables]] {:?} is not a table a --route rule names, nor a table of \
                         one of several topics (the records table, {}, takes the top-level \
                         settings)",
                        t.name, s.table.plain
                    ),
                ));
            }
        }
        let section = |table: &TableName| a.tables.iter().find(|t| t.name == table.plain);
        // No section: the top-level settings, partitions included.
        let top = (s.mapping.clone(), s.partitioning.clone());
        if several {
            for (i, table) in topic_tables.into_iter().enumerate() {
                let (mapping, partitioning) = match section(&table) {
                    Some(t) => section_spec(t)?,
                    None => top.clone(),
                };
                if i == 0 {
                    (s.mapping, s.partitioning) = (mapping, partitioning);
                } else {
                    s.routed.push(TableSpec {
                        table,
                        mapping,
                        partitioning,
                    });
                }
            }
        }
        for (when, table) in rules {
            if table != s.table && !s.routed.iter().any(|r| r.table == table) {
                let (mapping, partitioning) = match section(&table) {
                    Some(t) => section_spec(t)?,
                    None => top.clone(),
                };
                s.routed.push(TableSpec {
                    table: table.clone(),
                    mapping,
                    partitioning,
                });
            }
            s.routes.push((when, table.plain));
        }
        Ok(s)
    }
}

/// `--topic`'s list: each topic, and the table it names (`TOPIC:TABLE`), if it names one.
/// Kafka's topic names hold no `:`.
fn topic_list(arg: &str) -> Result<Vec<(String, Option<TableName>)>, ConfigError> {
    arg.split(',')
        .map(|item| {
            let item = item.trim();
            let (topic, table) = match item.split_once(':') {
                Some((topic, table)) => (topic.trim(), Some(table.trim())),
                None => (item, None),
            };
            if topic.is_empty() {
                return Err(bad(
                    "topic",
                    format!("{arg:?} holds an empty topic name: write TOPIC[:TABLE][,...]"),
                ));
            }
            let table = table
                .map(|t| TableName::parse(t).map_err(|e| bad("topic", e)))
                .transpose()?;
            Ok((topic.to_string(), table))
        })
        .collect()
}

/// The table a topic of several writes: the one it names, or the table of its name.
fn table_of((topic, table): &(String, Option<TableName>)) -> Result<TableName, ConfigError> {
    match table {
        Some(t) => Ok(t.clone()),
        // A `.` in a topic's name is no schema.
        None => TableName::parse(topic)
            .ok()
            .filter(|_| !topic.contains('.'))
            .ok_or_else(|| {
                bad(
                    "topic",
                    format!(
                        "topic {topic:?} is not a plain table name: name its table, \
                     --topic {topic}:TABLE"
                    ),
                )
            }),
    }
}

/// A `[[tables]]` section's columns and time partitions.
fn section_spec(t: &TableEntry) -> Result<(Mapping, Option<Partitioning>), ConfigError> {
    let in_section = |e: ConfigError| bad("tables", format!("{}: {e}", t.name));
    let columns = t
        .columns
        .iter()
        .map(|c| c.spec().parse::<ColumnSpec>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tables", format!("{}: {e}", t.name)))?;
    let spec = mapping(
        columns,
        t.keep_data,
        t.upsert_key.clone(),
        t.on_conflict.clone(),
        t.delete_when.clone(),
    )
    .map_err(in_section)?;
    let partitioned = partitioning(
        t.partition_by.clone(),
        t.partition_interval.clone(),
        t.retention.clone(),
        &spec,
    )
    .map_err(in_section)?;
    Ok((spec, partitioned))
}

/// A table's columns from its settings: typed columns, `data` or not, and writing by key.
fn mapping(
    columns: Vec<ColumnSpec>,
    keep_data: Option<bool>,
    upsert_key: Option<String>,
    on_conflict: Option<String>,
    delete_when: Option<String>,
) -> Result<Mapping, ConfigError> {
    let m = Mapping::new(columns, keep_data.unwrap_or(true))
        .map_err(|e| bad("column", e.to_string()))?;
    let Some(key) = upsert_key else {
        for (set, name) in [(&on_conflict, "on-conflict"), (&delete_when, "delete-when")] {
            if set.is_some() {
                return Err(bad(
                    name,
                    "applies only to writing by key: add --upsert-key COLUMN",
                ));
            }
        }
        return Ok(m);
    };
    let on_conflict = match on_conflict {
        Some(v) => v.parse().map_err(|e: String| bad("on-conflict", e))?,
        None => OnConflict::default(),
    };
    let delete_when = match delete_when {
        Some(v) => Some(v.parse().map_err(|e: String| bad("delete-when", e))?),
        None => None,
    };
    m.with_upsert(Upsert {
        key: key.split(',').map(|k| k.trim().to_string()).collect(),
        on_conflict,
        delete_when,
    })
    .map_err(|e| bad("upsert-key", e.problem))
}

/// A table's time partitions from its settings: none without `partition-by` (and then the
/// interval and retention are refused), else by day unless the interval says otherwise.
fn partitioning(
    by: Option<String>,
    interval: Option<String>,
    retention: Option<String>,
    mapping: &Mapping,
) -> Result<Option<Partitioning>, ConfigError> {
    let Some(column) = by.filter(|c| !c.trim().is_empty()) else {
        for (set, name) in [(&interval, "partition-interval"), (&retention, "retention")] {
            if set.is_some() {
                return Err(bad(
                    name,
                    "applies only to a table partitioned by time: add --partition-by COLUMN",
                ));
            }
        }
        return Ok(None);
    };
    let interval = match interval {
        Some(i) => Interval::parse(&i)?,
        None => Interval::Day,
    };
    let retention = retention.map(|r| Retention::parse(&r)).transpose()?;
    Partitioning::new(&column, interval, retention, mapping).map(Some)
}

impl Settings {
    /// The name this consumer's positions are kept under: `--name`, or the records table's
    /// (where they were kept before routing).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.table.plain)
    }

    /// The settings of the core's state machine. With the `mutations` feature (tests only),
    /// `SPILLWAY_MUTATE=<name>` runs it with one known bug.
    pub fn machine_config(&self) -> Result<ConsumerConfig, ConfigError> {
        #[allow(unused_mut)]
        let mut config = ConsumerConfig {
            // A lane flushes early while a pooled connection would otherwise sit idle.
            batcher: BatcherConfig {
                writers: self.pool_size,
                ..self.batcher.clone()
            },
            shutdown_timeout: self.shutdown_timeout,
            orphan_timeout: self.orphan_timeout,
            ..ConsumerConfig::default()
        };
        #[cfg(feature = "mutations")]
        if let Ok(name) = std::env::var("SPILLWAY_MUTATE") {
            config.mutation = Some(spillway_core::Mutation::parse(&name).ok_or_else(|| {
                bad(
                    "SPILLWAY_MUTATE",
                    format!("{name:?} is not a known mutation"),
                )
            })?);
        }
        config.validate()?;
        Ok(config)
    }
}

/// A Postgres connection string with its password hidden, in URL form
/// (`postgres://user:secret@host/db`, where the password may itself hold `@`) or key/value form
/// (`host=h password=secret`).
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        return match authority.rfind('@') {
            Some(at) => {
                let user = authority[..at].split(':').next().unwrap_or_default();
                format!(
                    "{scheme}://{user}:<redacted>@{}{tail}",
                    &authority[at + 1..]
                )
            }
            None => url.to_string(),
        };
    }
    let mut out = Vec::new();
    let mut words = url.split_whitespace();
    while let Some(w) = words.next() {
        match w.split_once('=') {
            Some((k, v)) if k.trim().eq_ignore_ascii_case("password") => {
                // A quoted password may contain spaces: skip to its closing quote.
                if v.starts_with('\'') && !(v.len() > 1 && v.ends_with('\'')) {
                    for rest in words.by_ref() {
                        if rest.ends_with('\'') {
                            break;
                        }
                    }
                }
                out.push(format!("{k}=<redacted>"));
            }
            None if w.eq_ignore_ascii_case("password") => {
                out.push("password=<redacted>".into());
                // "password = secret": the value follows the "=".
                if words.clone().next() == Some("=") {
                    words.next();
                    words.next();
                }
            }
            _ => out.push(w.to_string()),
        }
    }
    out.join(" ")
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Settings, ConfigError> {
        Settings::from_args(
            Args::try_parse_from(std::iter::once("spillway-consumer").chain(argv.iter().copied()))
                .unwrap(),
        )
    }

    const REQUIRED: [&str; 6] = [
        "--brokers",
        "b:9092",
        "--topic",
        "t",
        "--database-url",
        "postgres://u:hunter2@h/db",
    ];

    #[test]
    fn defaults_validate_and_secrets_stay_out_of_logs() {
        let s = parse(&REQUIRED).unwrap();
        assert_eq!(s.group, "spillway");
        assert_eq!(s.table.plain, "records");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn errors_name_the_setting() {
        assert_eq!(parse(&["--topic", "t"]).unwrap_err().setting, "brokers");
        let with = |extra: &[&str]| parse(&[&REQUIRED[..], extra].concat()).unwrap_err().setting;
        assert_eq!(with(&["--table", "a;b"]), "table");
        assert_eq!(with(&["--pool-size", "0"]), "pool-size");
        assert_eq!(with(&["--buffer-max-records", "10"]), "buffer-max-records");
        assert_eq!(with(&["--batch-max-age-ms", "0"]), "batch-max-age-ms");
        assert_eq!(with(&["--retry-max-ms", "0"]), "retry-max-ms");
        assert_eq!(
            with(&["--statement-timeout-ms", "0"]),
            "statement-timeout-ms"
        );
        assert_eq!(with(&["--connect-timeout-ms", "0"]), "connect-timeout-ms");
        assert_eq!(with(&["--shutdown-timeout-ms", "0"]), "shutdown-timeout-ms");
        assert_eq!(with(&["--orphan-rejoin-ms", "0"]), "orphan-rejoin-ms");
    }

    #[test]
    fn columns_come_from_flags_or_the_file_and_keep_data_defaults_to_true() {
        let s = parse(&REQUIRED).unwrap();
        assert!(s.mapping.keep_data());
        assert!(s.mapping.columns().is_empty());
        let with = |extra: &[&str]| parse(&[&REQUIRED[..], extra].concat());
        let s = with(&[
            "--column",
            "user_id:bigint!=/user/id",
            "--column",
            "at:double precision=/t",
            "--keep-data",
            "false",
        ])
        .unwrap();
        assert!(!s.mapping.keep_data());
        let names: Vec<String> = s.mapping.columns().iter().map(|c| c.to_string()).collect();
        assert_eq!(
            names,
            ["user_id:bigint!=/user/id", "at:double precision=/t"]
        );
        let e = with(&["--column", "user_id:varchar=/u"]).unwrap_err();
        assert_eq!(e.setting, "column");
        assert!(e.to_string().contains("unknown type"), "{e}");
        let e = with(&["--column", "a:text=/a", "--column", "a:text=/b"]).unwrap_err();
        assert!(e.to_string().contains("mapped twice"), "{e}");
        assert!(Args::try_parse_from(["c", "--keep-data", "maybe"]).is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consumer.toml");
        std::fs::write(
            &path,
            "keep-data = false\n\
             [[columns]]\nname = \"user_id\"\ntype = \"bigint\"\npointer = \"/user/id\"\nnot-null = true\n\
             [[columns]]\nname = \"rid\"\ntype = \"uuid\"\npointer = \"@request_id\"\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let s = with(&["--config", file]).unwrap();
        assert!(!s.mapping.keep_data());
        let names: Vec<String> = s.mapping.columns().iter().map(|c| c.to_string()).collect();
        assert_eq!(names, ["user_id:bigint!=/user/id", "rid:uuid=@request_id"]);
        // Flags replace the file's columns; a flag overrides keep-data.
        let s = with(&[
            "--config",
            file,
            "--column",
            "x:text=/x",
            "--keep-data",
            "true",
        ])
        .unwrap();
        assert!(s.mapping.keep_data());
        assert_eq!(s.mapping.columns().len(), 1);
    }

    #[test]
    fn writing_by_key_needs_mapped_key_columns_and_its_options_need_a_key() {
        let with = |extra: &[&str]| parse(&[&REQUIRED[..], extra].concat());
        let s = with(&[
            "--column",
            "id:bigint=/id",
            "--upsert-key",
            "id",
            "--on-conflict",
            "ignore",
            "--delete-when",
            "/op=delete",
        ])
        .unwrap();
        let up = s.mapping.upsert().unwrap();
        assert_eq!(up.key, ["id"]);
        assert_eq!(up.on_conflict, OnConflict::Ignore);
        assert_eq!(up.delete_when.as_ref().unwrap().to_string(), "/op=delete");
        assert!(s.mapping.columns()[0].not_null, "the key is required");
        assert!(format!("{s:?}").contains("/op=delete"));
        let e = with(&["--upsert-key", "id"]).unwrap_err();
        assert_eq!(e.setting, "upsert-key");
        assert!(e.to_string().contains("--column id:"), "{e}");
        for flag in ["--on-conflict", "--delete-when"] {
            let e = with(&["--column", "id:bigint=/id", flag, "/op=x"]).unwrap_err();
            assert_eq!(e.setting, &flag[2..]);
            assert!(e.to_string().contains("--upsert-key"), "{e}");
        }
        let e = with(&[
            "--column",
            "id:bigint=/id",
            "--upsert-key",
            "id",
            "--on-conflict",
            "merge",
        ]);
        assert_eq!(e.unwrap_err().setting, "on-conflict");
        let e = with(&[
            "--column",
            "id:bigint=/id",
            "--upsert-key",
            "id",
            "--delete-when",
            "op",
        ]);
        assert_eq!(e.unwrap_err().setting, "delete-when");
    }

    #[test]
    fn routes_name_tables_that_take_their_own_section_or_the_top_level_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consumer.toml");
        std::fs::write(
            &path,
            "route = [\"/type=click:clicks\", \"/type=order:orders\", \"/kind=c:clicks\"]\n\
             [[tables]]\nname = \"orders\"\nkeep-data = false\nupsert-key = \"id\"\n\
             [[tables.columns]]\nname = \"id\"\ntype = \"bigint\"\npointer = \"/id\"\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let with = |extra: &[&str]| parse(&[&REQUIRED[..], extra].concat());
        let s = with(&["--config", file, "--column", "n:text=/n"]).unwrap();
        let rules: Vec<String> = s.routes.iter().map(|(m, t)| format!("{m}:{t}")).collect();
        assert_eq!(
            rules,
            ["/type=click:clicks", "/type=order:orders", "/kind=c:clicks"]
        );
        let tables: Vec<&str> = s.routed.iter().map(|t| t.table.plain.as_str()).collect();
        assert_eq!(
            tables,
            ["clicks", "orders"],
            "each routed table once, in rule order"
        );
        assert_eq!(
            s.routed[0].mapping, s.mapping,
            "no section: the top-level mapping"
        );
        let orders = &s.routed[1].mapping;
        assert!(!orders.keep_data() && orders.upsert().is_some());
        assert_eq!(orders.columns()[0].name, "id");
        assert_eq!(s.name(), "records", "positions stay under the table's name");
        // A rule may name the records table.
        let s = with(&["--route", "/a=1:records", "--name", "c1"]).unwrap();
        assert_eq!(s.routes.len(), 1);
        assert!(s.routed.is_empty());
        assert_eq!(s.name(), "c1");

        let e = with(&["--route", "/type=click"]).unwrap_err();
        assert_eq!(e.setting, "route");
        assert!(e.to_string().contains("POINTER=VALUE:TABLE"), "{e}");
        assert_eq!(with(&["--route", "type=a:b"]).unwrap_err().setting, "route");
        assert_eq!(with(&["--route", "/t=a:b;c"]).unwrap_err().setting, "route");
        // Flags replace the file's rules: its section for orders is then no rule's.
        let e = with(&["--config", file, "--route", "/a=1:clicks"]).unwrap_err();
        assert_eq!(e.setting, "tables", "a section no rule names is a mistake");
        assert!(e.to_string().contains("\"orders\""), "{e}");
        assert_eq!(with(&["--name", ""]).unwrap_err().setting, "name");
    }

    #[test]
    fn several_topics_each_write_their_own_table_named_or_of_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consumer.toml");
        std::fs::write(
            &path,
            "[[tables]]\nname = \"order_rows\"\nkeep-data = false\nupsert-key = \"id\"\n\
             [[tables.columns]]\nname = \"id\"\ntype = \"bigint\"\npointer = \"/id\"\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let with = |topics: &str, extra: &[&str]| {
            let base = ["--brokers", "b:9092", "--database-url", "postgres://h/db"];
            parse(&[&base[..], &["--topic", topics], extra].concat())
        };
        let s = with(
            "clicks, orders:order_rows",
            &["--name", "c", "--config", file],
        )
        .unwrap();
        assert_eq!(s.topics.names(), ["clicks", "orders"]);
        assert_eq!(
            s.table.plain, "clicks",
            "the first topic's table is the records table"
        );
        assert_eq!(s.topic_tables, ["clicks", "order_rows"]);
        assert_eq!(s.routed.len(), 1);
        assert_eq!(s.routed[0].table.plain, "order_rows");
        assert!(s.routed[0].mapping.upsert().is_some(), "its own section");
        assert!(s.mapping.keep_data(), "no section: the top-level settings");
        assert!(s.routes.is_empty());
        // One topic: TOPIC:TABLE is --table.
        let s = with("events:ev", &[]).unwrap();
        assert_eq!((s.table.plain.as_str(), s.name()), ("ev", "ev"));
        assert!(!s.topics.several());
        assert_eq!(with("events", &[]).unwrap().table.plain, "records");

        let refused = |topics: &str, extra: &[&str], setting: &str, says: &str| {
            let e = with(topics, extra).unwrap_err();
            assert_eq!(e.setting, setting, "{topics} {extra:?}: {e}");
            assert!(e.to_string().contains(says), "{e}");
        };
        refused("a,b", &[], "name", "--name");
        refused(
            "a,b",
            &["--name", "c", "--table", "t"],
            "table",
            "own table",
        );
        refused("a:t", &["--table", "u"], "table", "give it once");
        refused(
            "a,b",
            &["--name", "c", "--route", "/x=1:t"],
            "route",
            "one topic",
        );
        refused("a,a", &["--name", "c"], "topic", "twice");
        refused("a:t,b:t", &["--name", "c"], "topic", "own table");
        refused(
            "a,my.events",
            &["--name", "c"],
            "topic",
            "--topic my.events:TABLE",
        );
        refused("a,,b", &["--name", "c"], "topic", "empty topic");
        refused("a:bad-name", &[], "topic", "plain table name");
        // A section of neither a route nor a topic's table.
        refused("a", &["--config", file], "tables", "\"order_rows\"");
    }

    #[test]
    fn time_partitions_need_a_timestamp_column_and_an_upsert_key_holding_it() {
        let with = |extra: &[&str]| parse(&[&REQUIRED[..], extra].concat());
        let s = with(&["--partition-by", "received_at", "--retention", "30d"]).unwrap();
        let p = s.partitioning.as_ref().unwrap();
        assert_eq!(p.column(), "received_at");
        assert_eq!(p.interval(), Interval::Day, "by day unless told");
        assert_eq!(p.retention().unwrap().to_string(), "30d");
        assert!(format!("{s:?}").contains("by received_at per day, kept 30d"));
        let s = with(&[
            "--column",
            "at:timestamptz(ms)=/t",
            "--partition-by",
            "at",
            "--partition-interval",
            "hour",
        ])
        .unwrap();
        let p = s.partitioning.unwrap();
        assert_eq!((p.column(), p.interval()), ("at", Interval::Hour));
        assert!(p.retention().is_none(), "no retention: nothing is dropped");
        assert!(parse(&REQUIRED).unwrap().partitioning.is_none());

        for (extra, setting, says) in [
            (
                &["--partition-by", "data"][..],
                "partition-by",
                "received_at, or a mapped column",
            ),
            (
                &["--column", "n:bigint=/n", "--partition-by", "n"][..],
                "partition-by",
                "is bigint",
            ),
            (
                &[
                    "--partition-by",
                    "received_at",
                    "--partition-interval",
                    "daily",
                ][..],
                "partition-interval",
                "hour, day, week",
            ),
            (
                &["--partition-by", "received_at", "--retention", "30"][..],
                "retention",
                "h (hours), d (days) or w (weeks)",
            ),
            (
                &["--retention", "30d"][..],
                "retention",
                "--partition-by COLUMN",
            ),
            (
                &["--partition-interval", "day"][..],
                "partition-interval",
                "--partition-by COLUMN",
            ),
            (
                &[
                    "--column",
                    "id:bigint=/id",
                    "--column",
                    "at:timestamptz=/at",
                    "--upsert-key",
                    "id",
                    "--partition-by",
                    "at",
                ][..],
                "upsert-key",
                "must include the partition column",
            ),
        ] {
            let e = with(extra).unwrap_err();
            assert_eq!(e.setting, setting, "{extra:?}: {e}");
            assert!(e.to_string().contains(says), "{extra:?}: {e}");
        }
        let keyed = with(&[
            "--column",
            "id:bigint=/id",
            "--column",
            "at:timestamptz=/at",
            "--upsert-key",
            "id,at",
            "--partition-by",
            "at",
        ]);
        assert!(keyed.is_ok(), "the key holds the column");

        // The file, and a routed table's own section; a routed table without one takes the
        // records table's partitions.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consumer.toml");
        std::fs::write(
            &path,
            "partition-by = \"received_at\"\npartition-interval = \"week\"\nretention = \"8w\"\n\
             route = [\"/type=click:clicks\", \"/type=order:orders\"]\n\
             [[tables]]\nname = \"orders\"\npartition-by = \"day\"\npartition-interval = \"month\"\n\
             [[tables.columns]]\nname = \"day\"\ntype = \"date\"\npointer = \"/day\"\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let s = with(&["--config", file]).unwrap();
        let top = s.partitioning.clone().unwrap();
        assert_eq!(
            (top.interval(), top.retention().unwrap().micros()),
            (Interval::Week, 56 * 86_400_000_000)
        );
        assert_eq!(s.routed[0].partitioning.as_ref(), Some(&top));
        let orders = s.routed[1].partitioning.as_ref().unwrap();
        assert_eq!(
            (orders.column(), orders.interval()),
            ("day", Interval::Month)
        );
        assert!(orders.retention().is_none());
        // Flags override the file.
        let s = with(&["--config", file, "--retention", "12h"]).unwrap();
        assert_eq!(
            s.partitioning.unwrap().retention().unwrap().to_string(),
            "12h"
        );
        std::fs::write(
            &path,
            "route = [\"/type=order:orders\"]\n\
             [[tables]]\nname = \"orders\"\npartition-by = \"day\"\npartition-interval = \"hour\"\n\
             [[tables.columns]]\nname = \"day\"\ntype = \"date\"\npointer = \"/day\"\n",
        )
        .unwrap();
        let e = with(&["--config", file]).unwrap_err();
        assert_eq!(e.setting, "tables");
        assert!(
            e.to_string()
                .contains("orders: invalid setting `partition-interval`"),
            "{e}"
        );
    }

    #[test]
    fn passwords_never_reach_the_logs() {
        for (url, secret) in [
            ("postgres://u:hunter2@h/db", "hunter2"),
            (
                "postgres://u:p@ss@word@h:5432/db?sslmode=require",
                "ss@word",
            ),
            ("host=h user=u password=hunter2 dbname=db", "hunter2"),
            ("host=h password='two words' dbname=db", "words"),
            ("host=h PASSWORD = hunter2", "hunter2"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            assert!(shown.contains("<redacted>"), "{url} -> {shown}");
        }
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:<redacted>@h/db"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }
}
