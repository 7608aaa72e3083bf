//! Settings in two stages (as ripgrep does): [`Args`] are the raw flags, environment variables
//! and TOML file; [`Settings`] are validated, with defaults applied, before any connection is
//! opened. Precedence: flag, then environment variable, then `--config` file, then default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// Raw settings as the user gave them.
#[derive(Parser, Deserialize, Default, Debug)]
#[command(
    name = "spillway-producer",
    version,
    about = "HTTP ingest for Spillway: POST/PUT /store writes each request to Kafka as one \
             message and answers 200 only once Kafka (acks=all) has it."
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Args {
    /// TOML file with any of these settings (long flag names as keys; librdkafka properties
    /// in a [librdkafka] table). Flags and environment variables override it.
    #[arg(long, env = "SPILLWAY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "SPILLWAY_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Kafka bootstrap servers, host:port[,host:port...] (required).
    #[arg(long, env = "KAFKA_BROKERS")]
    pub brokers: Option<String>,

    /// Topic to write to; it must exist (required).
    #[arg(long, env = "SPILLWAY_TOPIC")]
    pub topic: Option<String>,

    /// Largest request body, after decompression, in bytes [default: 921600]. Must fit the
    /// broker's maximum message size, checked at start-up.
    #[arg(long, env = "SPILLWAY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,

    /// Deepest nesting of arrays and objects allowed in a record; a request with a deeper record
    /// is refused with 400 [default: 128]. With --schema at most 128.
    #[arg(long, env = "SPILLWAY_MAX_DEPTH")]
    pub max_depth: Option<usize>,

    /// JSON Schema (draft 2020-12) file every record must match; a request with a record that
    /// does not is refused with 422 and nothing of it is written [default: none, no check].
    #[arg(long, env = "SPILLWAY_SCHEMA")]
    pub schema: Option<PathBuf>,

    /// Requests being handled at once; more are shed with 429 [default: 4096].
    #[arg(long, env = "SPILLWAY_MAX_IN_FLIGHT_REQUESTS")]
    pub max_in_flight_requests: Option<usize>,

    /// Request bytes held in memory at once; more are shed with 429 [default: 268435456].
    #[arg(long, env = "SPILLWAY_MAX_IN_FLIGHT_BYTES")]
    pub max_in_flight_bytes: Option<usize>,

    /// How long a request waits for Kafka's acknowledgement before answering 503
    /// [default: 5000].
    #[arg(long, env = "SPILLWAY_PRODUCE_TIMEOUT_MS")]
    pub produce_timeout_ms: Option<u64>,

    /// Retry-After sent with 429 and 503, in seconds [default: 1].
    #[arg(long, env = "SPILLWAY_RETRY_AFTER_SECS")]
    pub retry_after_secs: Option<u64>,

    /// Idempotency-Keys remembered, each with its body's digest, to refuse a key reused for
    /// another body with 422; past it the oldest is forgotten [default: 100000].
    #[arg(long, env = "SPILLWAY_MAX_IDEMPOTENCY_KEYS")]
    pub max_idempotency_keys: Option<usize>,

    /// How long an Idempotency-Key is remembered, from when its request was first handed to
    /// Kafka, in seconds; keep it at the consumer's key retention [default: 86400].
    #[arg(long, env = "SPILLWAY_IDEMPOTENCY_WINDOW_SECS")]
    pub idempotency_window_secs: Option<u64>,

    /// Comma-separated bearer tokens; when set, /store requires `Authorization: Bearer <token>`.
    /// Never logged.
    #[arg(long, env = "SPILLWAY_AUTH_TOKENS", hide_env_values = true)]
    pub auth_tokens: Option<String>,

    /// librdkafka linger.ms: how long the client waits to batch messages [default: 2].
    #[arg(long, env = "SPILLWAY_LINGER_MS")]
    pub linger_ms: Option<u64>,

    /// On SIGTERM, how long to wait for in-flight requests and the Kafka flush [default: 30000].
    #[arg(long, env = "SPILLWAY_SHUTDOWN_TIMEOUT_MS")]
    pub shutdown_timeout_ms: Option<u64>,

    /// A librdkafka property, as kcat takes it: -X key=value (repeatable), for example
    /// -X security.protocol=SASL_SSL -X sasl.mechanisms=PLAIN.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    #[serde(skip)]
    pub rdkafka: Vec<String>,

    /// librdkafka properties from the config file's [librdkafka] table.
    #[arg(skip)]
    pub librdkafka: BTreeMap<String, String>,
}

pub use spillway_core::ConfigError as SettingError;

fn bad(setting: &'static str, problem: impl Into<String>) -> SettingError {
    SettingError::new(setting, problem)
}

/// Validated settings.
#[derive(Clone)]
pub struct Settings {
    /// Address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Topic.
    pub topic: String,
    /// Largest decoded body.
    pub max_body_bytes: usize,
    /// Deepest nesting of arrays and objects in a record.
    pub max_depth: usize,
    /// JSON Schema file records must match (none: no check).
    pub schema: Option<PathBuf>,
    /// Concurrent requests before shedding.
    pub max_in_flight_requests: usize,
    /// Concurrent request bytes before shedding.
    pub max_in_flight_bytes: usize,
    /// Deadline for Kafka's acknowledgement.
    pub produce_timeout: Duration,
    /// Retry-After for 429 and 503.
    pub retry_after: Duration,
    /// Idempotency-Keys remembered at most.
    pub max_idempotency_keys: usize,
    /// How long an Idempotency-Key is remembered.
    pub idempotency_window: Duration,
    /// Accepted bearer tokens (empty: no auth).
    pub auth_tokens: Vec<String>,
    /// linger.ms.
    pub linger: Duration,
    /// Grace period on shutdown.
    pub shutdown_timeout: Duration,
    /// Extra librdkafka properties, applied last.
    pub rdkafka: Vec<(String, String)>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_depth", &self.max_depth)
            .field("schema", &self.schema)
            .field("max_in_flight_requests", &self.max_in_flight_requests)
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("produce_timeout", &self.produce_timeout)
            .field("max_idempotency_keys", &self.max_idempotency_keys)
            .field("idempotency_window", &self.idempotency_window)
            .field(
                "auth_tokens",
                &format_args!("<{} redacted>", self.auth_tokens.len()),
            )
            .field("rdkafka", &redact_properties(&self.rdkafka))
            .finish_non_exhaustive()
    }
}

pub use spillway_core::props::{parse_properties, redact_properties};

impl Settings {
    /// Defaults for a broker and topic (tests, loadgen's local stack).
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            brokers: brokers.into(),
            topic: topic.into(),
            max_body_bytes: 900 * 1024,
            max_depth: 128,
            schema: None,
            max_in_flight_requests: 4096,
            max_in_flight_bytes: 256 << 20,
            produce_timeout: Duration::from_secs(5),
            retry_after: Duration::from_secs(1),
            max_idempotency_keys: 100_000,
            idempotency_window: Duration::from_secs(24 * 3600),
            auth_tokens: vec![],
            linger: Duration::from_millis(2),
            shutdown_timeout: Duration::from_secs(30),
            rdkafka: vec![],
        }
    }

    /// Reads the `--config` file (if any) under the flags, applies defaults and validates.
    pub fn from_args(mut args: Args) -> Result<Self, SettingError> {
        if let Some(path) = &args.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad("config", format!("cannot read {}: {e}", path.display())))?;
            let file: Args = toml::from_str(&text)
                .map_err(|e| bad("config", format!("{}: {e}", path.display())))?;
            args.listen = args.listen.or(file.listen);
            args.brokers = args.brokers.or(file.brokers);
            args.topic = args.topic.or(file.topic);
            args.max_body_bytes = args.max_body_bytes.or(file.max_body_bytes);
            args.max_depth = args.max_depth.or(file.max_depth);
            args.schema = args.schema.or(file.schema);
            args.max_in_flight_requests =
                args.max_in_flight_requests.or(file.max_in_flight_requests);
            args.max_in_flight_bytes = args.max_in_flight_bytes.or(file.max_in_flight_bytes);
            args.produce_timeout_ms = args.produce_timeout_ms.or(file.produce_timeout_ms);
            args.retry_after_secs = args.retry_after_secs.or(file.retry_after_secs);
            args.max_idempotency_keys = args.max_idempotency_keys.or(file.max_idempotency_keys);
            args.idempotency_window_secs = args
                .idempotency_window_secs
                .or(file.idempotency_window_secs);
            args.auth_tokens = args.auth_tokens.or(file.auth_tokens);
            args.linger_ms = args.linger_ms.or(file.linger_ms);
            args.shutdown_timeout_ms = args.shutdown_timeout_ms.or(file.shutdown_timeout_ms);
            args.librdkafka = file.librdkafka;
        }
        let brokers = args
            .brokers
            .filter(|b| !b.trim().is_empty())
            .ok_or_else(|| {
                bad(
                    "brokers",
                    "required: pass --brokers host:port or set KAFKA_BROKERS",
                )
            })?;
        let topic = args
            .topic
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| bad("topic", "required: pass --topic NAME or set SPILLWAY_TOPIC"))?;
        let mut s = Settings::new(brokers, topic);
        if let Some(v) = args.listen {
            s.listen = v;
        }
        let positive = |name: &'static str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(bad(name, "must be greater than zero")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        s.max_body_bytes = positive("max-body-bytes", args.max_body_bytes, s.max_body_bytes)?;
        s.max_depth = positive("max-depth", args.max_depth, s.max_depth)?;
        s.schema = args.schema;
        if s.schema.is_some() && s.max_depth > crate::schema::MAX_DEPTH {
            return Err(bad(
                "max-depth",
                format!(
                    "with --schema it can be at most {}: records are checked as trees, whose \
                     depth must stay bounded; lower --max-depth",
                    crate::schema::MAX_DEPTH
                ),
            ));
        }
        s.max_in_flight_requests = positive(
            "max-in-flight-requests",
            args.max_in_flight_requests,
            s.max_in_flight_requests,
        )?;
        s.max_in_flight_bytes = positive(
            "max-in-flight-bytes",
            args.max_in_flight_bytes,
            s.max_in_flight_bytes,
        )?;
        if s.max_in_flight_bytes < s.max_body_bytes {
            return Err(bad(
                "max-in-flight-bytes",
                format!(
                    "must hold at least one request of max-body-bytes ({})",
                    s.max_body_bytes
                ),
            ));
        }
        if let Some(ms) = args.produce_timeout_ms {
            if ms == 0 {
                return Err(bad("produce-timeout-ms", "must be greater than zero"));
            }
            s.produce_timeout = Duration::from_millis(ms);
        }
        if let Some(secs) = args.retry_after_secs {
            s.retry_after = Duration::from_secs(secs.max(1));
        }
        s.max_idempotency_keys = positive(
            "max-idempotency-keys",
            args.max_idempotency_keys,
            s.max_idempotency_keys,
        )?;
        if let Some(secs) = args.idempotency_window_secs {
            if secs == 0 {
                return Err(bad(
                    "idempotency-window-secs",
                    "must be greater than zero: set it to the consumer's key retention",
                ));
            }
            s.idempotency_window = Duration::from_secs(secs);
        }
        if let Some(tokens) = args.auth_tokens {
            s.auth_tokens = tokens
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect();
        }
        if let Some(ms) = args.linger_ms {
            s.linger = Duration::from_millis(ms);
        }
        if let Some(ms) = args.shutdown_timeout_ms {
            s.shutdown_timeout = Duration::from_millis(ms);
        }
        s.rdkafka = args.librdkafka.into_iter().collect();
        s.rdkafka.extend(parse_properties(&args.rdkafka)?);
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Settings, SettingError> {
        let args =
            Args::try_parse_from(std::iter::once("spillway-producer").chain(argv.iter().copied()))
                .unwrap();
        Settings::from_args(args)
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile_dir();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "brokers = \"file:9092\"\ntopic = \"t\"\nmax-body-bytes = 1000\n[librdkafka]\n\"security.protocol\" = \"SASL_SSL\"\n",
        )
        .unwrap();
        let s = parse(&[
            "--config",
            path.to_str().unwrap(),
            "--brokers",
            "flag:9092",
            "-X",
            "sasl.password=hunter2",
        ])
        .unwrap();
        assert_eq!(s.brokers, "flag:9092");
        assert_eq!(s.topic, "t");
        assert_eq!(s.max_body_bytes, 1000);
        assert_eq!(s.produce_timeout, Duration::from_secs(5));
        assert_eq!(
            s.rdkafka,
            vec![
                ("security.protocol".into(), "SASL_SSL".into()),
                ("sasl.password".into(), "hunter2".into())
            ]
        );
        assert!(
            !format!("{s:?}").contains("hunter2"),
            "secrets never reach logs"
        );
    }

    #[test]
    fn errors_name_the_setting() {
        assert_eq!(parse(&["--topic", "t"]).unwrap_err().setting, "brokers");
        assert_eq!(
            parse(&["--brokers", "b", "--topic", "t", "--max-body-bytes", "0"])
                .unwrap_err()
                .setting,
            "max-body-bytes"
        );
        assert_eq!(
            parse(&["--brokers", "b", "--topic", "t", "-X", "nonsense"])
                .unwrap_err()
                .setting,
            "X"
        );
    }

    #[test]
    fn max_depth_and_schema_come_from_flags_or_the_file() {
        let s = parse(&["--brokers", "b", "--topic", "t"]).unwrap();
        assert_eq!((s.max_depth, s.schema), (128, None));
        let dir = tempfile_dir();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "brokers = \"b\"\ntopic = \"t\"\nmax-depth = 40\nschema = \"records.json\"\n",
        )
        .unwrap();
        let s = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(s.max_depth, 40);
        assert_eq!(s.schema, Some(PathBuf::from("records.json")));
        let s = parse(&["--config", path.to_str().unwrap(), "--max-depth", "7"]).unwrap();
        assert_eq!(s.max_depth, 7);
        let err = parse(&["--brokers", "b", "--topic", "t", "--max-depth", "0"]).unwrap_err();
        assert_eq!(err.setting, "max-depth");
        let err = parse(&["--config", path.to_str().unwrap(), "--max-depth", "500"]).unwrap_err();
        assert_eq!(err.setting, "max-depth", "{err}");
        assert!(err.to_string().contains("--schema"), "{err}");
    }

    #[test]
    fn idempotency_key_memory_comes_from_flags_or_the_file() {
        let s = parse(&["--brokers", "b", "--topic", "t"]).unwrap();
        assert_eq!(
            (s.max_idempotency_keys, s.idempotency_window),
            (100_000, Duration::from_secs(86_400))
        );
        let dir = tempfile_dir();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "brokers = \"b\"\ntopic = \"t\"\nmax-idempotency-keys = 50\nidempotency-window-secs = 600\n",
        )
        .unwrap();
        let s = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(
            (s.max_idempotency_keys, s.idempotency_window),
            (50, Duration::from_secs(600))
        );
        let s = parse(&[
            "--config",
            path.to_str().unwrap(),
            "--max-idempotency-keys",
            "7",
            "--idempotency-window-secs",
            "60",
        ])
        .unwrap();
        assert_eq!(
            (s.max_idempotency_keys, s.idempotency_window),
            (7, Duration::from_secs(60))
        );
        for (flag, setting) in [
            ("--max-idempotency-keys", "max-idempotency-keys"),
            ("--idempotency-window-secs", "idempotency-window-secs"),
        ] {
            let err = parse(&["--brokers", "b", "--topic", "t", flag, "0"]).unwrap_err();
            assert_eq!(err.setting, setting, "{err}");
        }
    }

    /// A directory removed when the test ends (it used to be left in the temp directory).
    fn tempfile_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("spillway-producer-cfg-")
            .tempdir()
            .unwrap()
    }
}
