//! The warp service: `/store`, `/healthz`, `/readyz`, `/metrics`, shedding and shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use spillway_core::metrics::{
    self, Counter, Gauge, Histogram, Labelled, Registry, LATENCY_SECONDS, SIZES,
};
use spillway_core::{Envelope, ProducerSequence, RequestId};
use subtle::ConstantTimeEq;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use warp::http::{HeaderMap, Response, StatusCode};
use warp::hyper::Body;
use warp::Filter;

use crate::config::{redact_properties, Settings};
use crate::idempotency::{self, KeyUse, RecentKeys, Ticket};
use crate::ingest::{self, Rejection};
use crate::mutation::{self, Mutation};
use crate::schema::{self, Mismatch, RecordSchema, SchemaError};

/// Kafka's default maximum message size, assumed when the broker does not say.
pub const KAFKA_DEFAULT_MAX_MESSAGE_BYTES: usize = 1_048_588;
/// Room kept for the envelope header and Kafka's record framing.
const FRAMING_MARGIN: usize = 1024;
/// A body refused as too large is still read, up to this many bytes, and thrown away, so that
/// a client that writes its whole body before reading gets the 413 instead of a reset
/// connection (closing a socket with unread data resets it). A larger one is not read.
const DISCARD_BYTES: usize = 64 << 20;
/// ... and for at most this long.
const DISCARD_TIME: Duration = Duration::from_secs(10);
/// At most this many refused bodies are read and thrown away at once; past it, the 413 is
/// answered without reading (a client that writes first may then see a reset).
const MAX_DISCARDS: usize = 16;

/// Why the producer could not start. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// librdkafka refused the client configuration.
    #[error(
        "the Kafka client configuration is invalid ({0}): check --brokers and the -X properties"
    )]
    KafkaConfig(KafkaError),
    /// The topic is not on the brokers.
    #[error("topic `{topic}` does not exist on {brokers}: create it first (Spillway never auto-creates topics), or fix --topic")]
    NoTopic {
        /// The topic.
        topic: String,
        /// The brokers asked.
        brokers: String,
    },
    /// A request could exceed what the broker accepts as one message.
    #[error("invalid setting `max-body-bytes`: {max_body} bytes plus {FRAMING_MARGIN} bytes of framing exceeds the broker's maximum message size ({max_message} bytes); lower --max-body-bytes or raise the topic's max.message.bytes")]
    BodyLimitTooLarge {
        /// --max-body-bytes.
        max_body: usize,
        /// The broker's limit.
        max_message: usize,
    },
    /// The process could not install its SIGTERM/SIGINT handlers.
    #[error("cannot install the signal handlers ({0}); nothing was started")]
    Signals(std::io::Error),
    /// The listen address is unusable.
    #[error("cannot listen on {addr} ({detail}): is another process using it? Change --listen")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        detail: String,
    },
    /// The `--schema` file cannot be used.
    #[error("{0}; nothing was started")]
    Schema(#[from] SchemaError),
    /// `--max-depth` too large for `--schema`.
    #[error("invalid setting `max-depth`: {max_depth} is more than {} levels, the most a record checked by --schema may have; lower --max-depth", schema::MAX_DEPTH)]
    DepthTooLargeForSchema {
        /// --max-depth.
        max_depth: usize,
    },
    /// `SPILLWAY_MUTATE` names no known mutation (builds with the `mutations` feature only).
    #[error("{0}")]
    Mutation(String),
}

/// A request that was refused, with the status, the message, and any details for the body.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
    details: serde_json::Map<String, serde_json::Value>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
            details: serde_json::Map::new(),
        }
    }

    /// The answer's body: `{"error": message, ...details}`.
    fn body(self) -> serde_json::Value {
        let mut body = self.details;
        body.insert("error".into(), self.message.into());
        body.into()
    }
}

impl From<Mismatch> for Refusal {
    fn from(m: Mismatch) -> Self {
        let mut refusal = Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, m.message());
        refusal
            .details
            .insert("failing_records".into(), m.failing_records.into());
        refusal.details.insert(
            "errors".into(),
            serde_json::to_value(&m.errors).unwrap_or_default(),
        );
        refusal
            .details
            .insert("errors_truncated".into(), m.truncated.into());
        refusal
    }
}

impl From<Rejection> for Refusal {
    fn from(r: Rejection) -> Self {
        let status = match r {
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejection::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        };
        Refusal::new(status, r.to_string())
    }
}

struct Metrics {
    registry: Registry,
    by_status: Labelled<Counter>,
    records: Counter,
    bytes: Counter,
    produce_latency: Histogram,
    records_per_request: Histogram,
    in_flight: Gauge,
    queue_depth: Gauge,
    client_resets: Counter,
    idempotency_keys: Labelled<Counter>,
    remembered_keys: Gauge,
}

/// The statuses `/store` answers, each exported from the start (at 0) so that a rate over
/// them exists before the first such answer.
const STATUSES: [u16; 12] = [200, 400, 401, 404, 405, 413, 415, 422, 429, 500, 503, 504];

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::new();
        let by_status = registry.counters(
            "spillway_producer_requests_total",
            "Ingest requests answered, by HTTP status.",
            "status",
        );
        for s in STATUSES {
            by_status.get(&s.to_string());
        }
        let idempotency_keys = registry.counters(
            "spillway_producer_idempotency_keys_total",
            "Requests with an Idempotency-Key, by what the key was to the keys remembered: new, \
             repeat (same body, produced again) or conflict (another body, refused with 422).",
            "outcome",
        );
        for outcome in ["new", "repeat", "conflict"] {
            idempotency_keys.get(outcome);
        }
        Metrics {
            idempotency_keys,
            remembered_keys: registry.gauge(
                "spillway_producer_idempotency_keys_remembered",
                "Idempotency-Keys remembered with their body's digest (at most \
                 --max-idempotency-keys, each for --idempotency-window-secs).",
            ),
            client_resets: registry.counter(
                "spillway_producer_kafka_client_resets_total",
                "Kafka clients replaced after the broker rejected the idempotent producer's state.",
            ),
            records: registry.counter(
                "spillway_producer_records_accepted_total",
                "Records acknowledged by Kafka and answered 200.",
            ),
            bytes: registry.counter(
                "spillway_producer_bytes_accepted_total",
                "Envelope bytes acknowledged by Kafka.",
            ),
            produce_latency: registry.histogram(
                "spillway_producer_produce_latency_seconds",
                "Time from handing a message to the Kafka client to its acknowledgement.",
                LATENCY_SECONDS,
            ),
            records_per_request: registry.histogram(
                "spillway_producer_records_per_request",
                "Records in each accepted request.",
                SIZES,
            ),
            in_flight: registry.gauge(
                "spillway_producer_in_flight_requests",
                "Ingest requests being handled.",
            ),
            queue_depth: registry.gauge(
                "spillway_producer_kafka_queue_depth",
                "Messages in the Kafka client's queue, not yet acknowledged.",
            ),
            by_status,
            registry,
        }
    }

    fn count(&self, status: StatusCode) {
        self.by_status.get(status.as_str()).inc();
    }
}

struct State {
    settings: Settings,
    /// The compiled `--schema`, if any.
    schema: Option<RecordSchema>,
    /// The Kafka client and its generation; replaced when the broker stops accepting its
    /// idempotent writes (see [`State::replace_client`]).
    kafka: std::sync::RwLock<KafkaClient>,
    kafka_config: ClientConfig,
    max_message_bytes: usize,
    requests: Arc<Semaphore>,
    /// Request bytes, in KiB permits.
    kib: Arc<Semaphore>,
    /// Refused bodies being read and thrown away ([`MAX_DISCARDS`]).
    discards: Arc<Semaphore>,
    metrics: Metrics,
    readiness: Mutex<Option<(Instant, Result<(), String>)>>,
    /// Recent Idempotency-Keys and their bodies' digests, to refuse a key reused for another
    /// body.
    recent_keys: Mutex<RecentKeys>,
    /// Keys the body digests: drawn at start-up, so no client can aim at a collision.
    digests: std::collections::hash_map::RandomState,
}

struct KafkaClient {
    generation: u64,
    producer: Arc<SequencedProducer>,
    created: Instant,
}

/// A Kafka client that numbers its messages. Each message's request id is the client's id and
/// the message's sequence number ([`RequestId::sequenced`]), stamped while holding the lock the
/// message is handed to librdkafka under: within a partition, the client's messages are in
/// Kafka in sequence order. A copy that librdkafka stores again (it re-sends a message whose
/// answer was lost at a new epoch after a timeout) repeats a sequence the partition already
/// has, and the consumer skips it.
struct SequencedProducer {
    id: u64,
    producer: FutureProducer,
    next: Mutex<u64>,
}

impl SequencedProducer {
    fn new(producer: FutureProducer) -> Arc<Self> {
        Arc::new(SequencedProducer {
            id: random_client_id(),
            producer,
            next: Mutex::new(0),
        })
    }

    /// Stamps `payload` (an encoded envelope) with the next request id and hands it to the
    /// client.
    fn send(
        &self,
        topic: &str,
        payload: &mut [u8],
        key: Option<&[u8]>,
    ) -> Result<(RequestId, DeliveryFuture), KafkaError> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let id = RequestId::sequenced(ProducerSequence {
            producer: self.id,
            sequence: *next,
        });
        // Taken before the send: a number is never used twice (a refused send leaves a gap,
        // which is harmless).
        *next += 1;
        Envelope::stamp_request_id(payload, id);
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(&*payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        let delivery = self.producer.send_result(record).map_err(|(e, _)| e)?;
        Ok((id, delivery))
    }
}

/// A Kafka client's id: 64 random bits from the OS's source (std seeds `RandomState` from
/// it), never 0 (the id of a message that is not an envelope). Two clients with one id would
/// mix their sequences, so it is not drawn from a time-seeded generator.
fn random_client_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let id = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        if id != 0 {
            return id;
        }
    }
}

/// The shortest time between two client replacements, so a broker that rejects every client
/// is not hammered with new ones.
const CLIENT_RESET_INTERVAL: Duration = Duration::from_secs(2);

impl State {
    fn lock_recent_keys(&self) -> std::sync::MutexGuard<'_, RecentKeys> {
        self.recent_keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `key` with a body of `digest` is to the keys remembered, as its message is about to
    /// be handed to Kafka (see [`RecentKeys::remember`]); counted.
    fn remember_key(&self, key: &str, digest: u64) -> KeyUse {
        let mut keys = self.lock_recent_keys();
        let key_use = keys.remember(key, digest, Instant::now());
        self.metrics.remembered_keys.set(keys.len() as i64);
        drop(keys);
        self.metrics.idempotency_keys.get(key_use.outcome()).inc();
        key_use
    }

    /// After a request whose key was new certainly wrote nothing: the key may be used for
    /// another body.
    fn forget_key(&self, new_key: Option<(&str, Ticket)>) {
        if let Some((key, ticket)) = new_key {
            let mut keys = self.lock_recent_keys();
            keys.forget(key, ticket);
            self.metrics.remembered_keys.set(keys.len() as i64);
        }
    }

    fn producer(&self) -> (u64, Arc<SequencedProducer>) {
        let k = self.kafka.read().unwrap_or_else(|p| p.into_inner());
        (k.generation, Arc::clone(&k.producer))
    }

    /// After `error` on a message sent by client `generation`: if the error says the broker no
    /// longer accepts this idempotent producer's sequence (a fatal error, or a broker that lost
    /// or garbled the producer's state), the client can never write again; librdkafka's advice
    /// is to destroy it and create a new one (a new producer id). Requests still waiting on
    /// the old client are answered 503 (not acknowledged).
    fn replace_client_after(&self, generation: u64, error: &KafkaError) {
        let stuck = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Unknown
                    | RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::InvalidProducerIdMapping
            )
        );
        if !stuck {
            return;
        }
        let mut k = self.kafka.write().unwrap_or_else(|p| p.into_inner());
        if k.generation != generation || k.created.elapsed() < CLIENT_RESET_INTERVAL {
            return;
        }
        match self.kafka_config.create::<FutureProducer>() {
            Ok(fresh) => {
                // A new client id too: the old client may still store messages.
                let old = std::mem::replace(&mut k.producer, SequencedProducer::new(fresh));
                k.generation += 1;
                k.created = Instant::now();
                self.metrics.client_resets.inc();
                tracing::warn!(%error, generation = k.generation,
                    "Kafka rejects this client's idempotent writes: replaced the Kafka client; \
                     requests waiting on the old one are answered 503");
                // Dropping a client purges and waits for its queue: not on a request's thread.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => tracing::error!(error = %e, "could not create a new Kafka client"),
        }
    }
}

/// A running producer. Drop it or call [`RunningProducer::shutdown`] to stop.
pub struct RunningProducer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for RunningProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningProducer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl RunningProducer {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr/store`.
    pub fn store_url(&self) -> String {
        format!("http://{}/store", self.addr)
    }

    /// The `/metrics` text.
    pub fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        render_metrics(&self.state)
    }

    /// Stops accepting, lets in-flight requests finish (each gets its answer), flushes the
    /// Kafka client, and returns. Bounded by the shutdown timeout.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let grace = self.state.settings.shutdown_timeout;
        let server = &mut self.server;
        if tokio::time::timeout(grace, server).await.is_err() {
            tracing::warn!(?grace, "in-flight requests did not finish in time; closing");
            self.server.abort();
        }
        let (_, producer) = self.state.producer();
        let flushed =
            tokio::task::spawn_blocking(move || producer.producer.flush(Timeout::After(grace)))
                .await;
        match flushed {
            Ok(Ok(())) => {
                tracing::info!("Kafka client flushed; every acknowledged request is durable")
            }
            other => tracing::warn!(
                ?other,
                "Kafka flush did not complete; unanswered requests were answered 503"
            ),
        }
    }
}

/// Runs the service until SIGTERM or SIGINT, then finishes the requests in flight and the
/// Kafka flush (bounded by the shutdown timeout). What `spillway-producer` runs; the chaos
/// suite's producer child processes run it too.
pub async fn serve(settings: Settings) -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
    let producer = start(settings).await?;
    println!("spillway-producer listening on {}", producer.addr());
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: finishing in-flight requests, then exiting");
    producer.shutdown().await;
    Ok(())
}

/// Connects to Kafka, checks the topic and the message size limit, and starts serving.
pub async fn start(settings: Settings) -> Result<RunningProducer, StartError> {
    mutation::init().map_err(StartError::Mutation)?;
    let schema = match &settings.schema {
        Some(_) if settings.max_depth > schema::MAX_DEPTH => {
            return Err(StartError::DepthTooLargeForSchema {
                max_depth: settings.max_depth,
            })
        }
        Some(path) => {
            let schema = RecordSchema::load(path)?;
            tracing::info!(schema = %schema.path().display(), "every record is checked against the schema");
            Some(schema)
        }
        None => None,
    };
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            settings.produce_timeout.as_millis().to_string(),
        )
        .set("linger.ms", settings.linger.as_millis().to_string())
        .set(
            "queue.buffering.max.messages",
            (settings.max_in_flight_requests * 2).max(1000).to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            (settings.max_in_flight_bytes / 1024 + 1).to_string(),
        )
        .set("allow.auto.create.topics", "false")
        // A message with a key (`X-Spillway-Key`) goes to the partition the CRC32 of its key
        // names, one without to any. librdkafka's default, pinned: a new default would move
        // keys to other partitions, and a key's requests would be split across the change.
        .set("partitioner", "consistent_random");
    for (k, v) in &settings.rdkafka {
        cfg.set(k, v);
    }
    if cfg.get("partitioner") == Some("random") {
        tracing::warn!(
            "-X partitioner=random ignores message keys: the requests of one X-Spillway-Key \
             land in any partition, in no defined order; use consistent_random (the default) \
             or murmur2_random"
        );
    }
    tracing::info!(brokers = %settings.brokers, topic = %settings.topic,
        rdkafka = ?redact_properties(&settings.rdkafka), "connecting to Kafka");
    let producer: FutureProducer = cfg.create().map_err(StartError::KafkaConfig)?;
    check_topic(&producer, &settings).await?;
    let max_message_bytes = broker_max_message_bytes(&cfg, &settings.topic).await;
    if settings.max_body_bytes + FRAMING_MARGIN > max_message_bytes {
        return Err(StartError::BodyLimitTooLarge {
            max_body: settings.max_body_bytes,
            max_message: max_message_bytes,
        });
    }
    let state = Arc::new(State {
        requests: Arc::new(Semaphore::new(settings.max_in_flight_requests)),
        kib: Arc::new(Semaphore::new(settings.max_in_flight_bytes.div_ceil(1024))),
        discards: Arc::new(Semaphore::new(MAX_DISCARDS)),
        metrics: Metrics::new(),
        readiness: Mutex::new(None),
        recent_keys: Mutex::new(RecentKeys::new(
            settings.max_idempotency_keys,
            settings.idempotency_window,
        )),
        digests: std::collections::hash_map::RandomState::new(),
        max_message_bytes,
        kafka: std::sync::RwLock::new(KafkaClient {
            generation: 0,
            producer: SequencedProducer::new(producer),
            created: Instant::now(),
        }),
        kafka_config: cfg,
        schema,
        settings,
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let addr = state.settings.listen;
    let (addr, server) = warp::serve(routes(state.clone()))
        .try_bind_with_graceful_shutdown(addr, async {
            let _ = stop_rx.await;
        })
        .map_err(|e| StartError::Bind {
            addr,
            detail: e.to_string(),
        })?;
    tracing::info!(%addr, max_message_bytes, "listening");
    Ok(RunningProducer {
        addr,
        state,
        stop: Some(stop_tx),
        server: tokio::spawn(server),
    })
}

async fn check_topic(producer: &FutureProducer, settings: &Settings) -> Result<(), StartError> {
    let client = producer.clone();
    let topic = settings.topic.clone();
    let md = tokio::task::spawn_blocking(move || {
        client
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .map(|md| {
                md.topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map(|t| (t.error(), t.partitions().len()))
            })
    })
    .await;
    match md {
        Ok(Ok(Some((None, n)))) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err(StartError::NoTopic {
            topic: settings.topic.clone(),
            brokers: settings.brokers.clone(),
        }),
        other => {
            tracing::warn!(
                ?other,
                "Kafka is not reachable at start-up; answering 503 until it is"
            );
            Ok(())
        }
    }
}

/// The topic's `max.message.bytes`, else the broker's `message.max.bytes`, else Kafka's default
/// (with a warning: the check at start-up then rests on an assumption).
async fn broker_max_message_bytes(cfg: &ClientConfig, topic: &str) -> usize {
    let Ok(admin) = cfg.create::<AdminClient<DefaultClientContext>>() else {
        return KAFKA_DEFAULT_MAX_MESSAGE_BYTES;
    };
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    // Ask a broker that exists (Kafka numbers them from 1; other brokers do not).
    let admin = Arc::new(admin);
    let client = admin.clone();
    let broker = tokio::task::spawn_blocking(move || {
        let md = client
            .inner()
            .fetch_metadata(None, Duration::from_secs(5))
            .ok()?;
        md.brokers().first().map(|b| b.id())
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(1);
    let lookups = [
        (ResourceSpecifier::Topic(topic), "max.message.bytes"),
        (ResourceSpecifier::Broker(broker), "message.max.bytes"),
    ];
    for (resource, key) in &lookups {
        if let Ok(results) = admin.describe_configs([resource], &options).await {
            let found = results.iter().flatten().find_map(|r| {
                r.get(key)
                    .and_then(|e| e.value.as_deref())
                    .and_then(|v| v.parse().ok())
            });
            if let Some(limit) = found {
                return limit;
            }
        }
    }
    tracing::warn!(
        assumed = KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
        "the broker did not report its maximum message size; assuming Kafka's default"
    );
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES
}

fn routes(
    state: Arc<State>,
) -> impl Filter<Extract = (Response<Body>,), Error = Infallible> + Clone {
    let with_state = warp::any().map(move || state.clone());
    let store = warp::path("store")
        .and(warp::path::end())
        .and(warp::post().or(warp::put()).unify())
        .and(with_state.clone())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(|state: Arc<State>, headers: HeaderMap, body| async move {
            let started = Instant::now();
            state.metrics.in_flight.inc();
            let response = match store(&state, &headers, body).await {
                Ok(accepted) => json(StatusCode::OK, &accepted, None),
                Err(refusal) => {
                    let retry = matches!(
                        refusal.status,
                        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                    )
                    .then_some(state.settings.retry_after);
                    if refusal.status.is_server_error() {
                        tracing::warn!(status = %refusal.status, error = %refusal.message, "request not accepted");
                    }
                    json(refusal.status, &refusal.body(), retry)
                }
            };
            state.metrics.in_flight.dec();
            state.metrics.count(response.status());
            tracing::debug!(status = %response.status(), elapsed = ?started.elapsed(), "store");
            response
        });
    let healthz = warp::path("healthz")
        .and(warp::path::end())
        .and(warp::get())
        .map(|| {
            json(
                StatusCode::OK,
                &serde_json::json!({ "status": "alive" }),
                None,
            )
        });
    let readyz = warp::path("readyz")
        .and(warp::path::end())
        .and(warp::get())
        .and(with_state.clone())
        .then(|state: Arc<State>| async move {
            match ready(&state).await {
                Ok(()) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "status": "ready" }),
                    None,
                ),
                Err(e) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({ "status": "not ready", "error": e }),
                    Some(state.settings.retry_after),
                ),
            }
        });
    let metrics = warp::path("metrics")
        .and(warp::path::end())
        .and(warp::get())
        .and(with_state)
        .map(|state: Arc<State>| match render_metrics(&state) {
            Ok(text) => Response::builder()
                .header("content-type", metrics::CONTENT_TYPE)
                .body(Body::from(text))
                .unwrap_or_default(),
            Err(_) => Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(Body::from("the metrics could not be encoded\n"))
                .unwrap_or_default(),
        });
    store
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .recover(|rejection: warp::Rejection| async move {
            let (status, message) = if rejection.is_not_found() {
                (
                    StatusCode::NOT_FOUND,
                    "no such endpoint: use POST or PUT /store, GET /healthz, /readyz, /metrics",
                )
            } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
                (
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method not allowed: /store takes POST or PUT",
                )
            } else {
                (StatusCode::BAD_REQUEST, "the request could not be read")
            };
            Ok::<_, Infallible>(json(status, &serde_json::json!({ "error": message }), None))
        })
        .unify()
}

fn json(
    status: StatusCode,
    value: &serde_json::Value,
    retry_after: Option<Duration>,
) -> Response<Body> {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(d) = retry_after {
        b = b.header("retry-after", d.as_secs().max(1).to_string());
    }
    if status == StatusCode::UNAUTHORIZED {
        b = b.header("www-authenticate", "Bearer");
    }
    b.body(Body::from(value.to_string())).unwrap_or_default()
}

/// The `/metrics` page of a producer that has just started: every family it exports, each
/// with its HELP and TYPE (what a dashboard or an alert may name).
pub fn fresh_metrics_page() -> Result<String, std::fmt::Error> {
    Metrics::new().registry.render()
}

fn render_metrics(state: &State) -> Result<String, std::fmt::Error> {
    {
        let mut keys = state.lock_recent_keys();
        keys.expire(Instant::now());
        state.metrics.remembered_keys.set(keys.len() as i64);
    }
    state
        .metrics
        .queue_depth
        .set(state.producer().1.producer.in_flight_count() as i64);
    state.metrics.registry.render()
}

async fn ready(state: &Arc<State>) -> Result<(), String> {
    if let Some((at, result)) = state
        .readiness
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        if at.elapsed() < Duration::from_secs(1) {
            return result.clone();
        }
    }
    let (_, producer) = state.producer();
    let topic = state.settings.topic.clone();
    let result = tokio::task::spawn_blocking(move || {
        producer
            .producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(2))
            .map_err(|e| format!("Kafka is not reachable: {e}"))
            .and_then(|md| match md.topics().first().and_then(|t| t.error()) {
                None => Ok(()),
                Some(e) => Err(format!("topic {topic}: {e:?}")),
            })
    })
    .await
    .unwrap_or_else(|e| Err(format!("readiness check failed: {e}")));
    *state.readiness.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((Instant::now(), result.clone()));
    result
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn authorized(state: &State, headers: &HeaderMap) -> bool {
    if state.settings.auth_tokens.is_empty() {
        return true;
    }
    let Some(presented) = header(headers, "authorization").and_then(|h| h.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Compare against every token, in constant time each, so timing tells nothing.
    state
        .settings
        .auth_tokens
        .iter()
        .fold(subtle::Choice::from(0), |acc, t| {
            acc | t.as_bytes().ct_eq(presented.trim().as_bytes())
        })
        .into()
}

/// `POST`/`PUT /store`: the body's records become one Kafka message (an envelope), answered
/// `200` with its partition and offset once Kafka acknowledged it. The request headers read:
///
/// - `Authorization: Bearer <token>`, required with `--auth-tokens` (else `401`).
/// - `Content-Type`: `application/json` or `application/x-ndjson` (else `415`);
///   `Content-Encoding`: `gzip` or none (else `415`); `Content-Length` and
///   `Expect: 100-continue`, to refuse a body over `--max-body-bytes` before reading it.
/// - `X-Spillway-Source` (optional): stored in the envelope as the request's source.
/// - `X-Spillway-Key` (optional): the Kafka message key, so that the partitioner sends every
///   request of one key to one partition of the topic, where Kafka keeps them in the order it
///   wrote them (what a consumer writing by key, `--upsert-key`, relies on). 1 to
///   [`ingest::MAX_KEY_BYTES`] bytes of printable ASCII, sent once; anything else is a `400`
///   before the body is read, and nothing is written. HTTP drops a value's leading and
///   trailing spaces, so they are not part of a key. Without it the message has no key and
///   goes to any partition.
/// - `Idempotency-Key` (optional): travels in the envelope; the consumer writes one key's
///   records once. A key [`spillway_core::envelope::check_idempotency_key`] refuses, or the
///   header sent twice, is a `400` before the body is read. A key this process handed to
///   Kafka with another body within `--idempotency-window-secs` is a `422`, and nothing is
///   written ([`RecentKeys`]); with the same body the request is produced again, as usual.
///   The `200` echoes the key.
async fn store<S, B>(
    state: &Arc<State>,
    headers: &HeaderMap,
    body: S,
) -> Result<serde_json::Value, Refusal>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    if !authorized(state, headers) {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: send `Authorization: Bearer <token>`. Nothing was written.",
        ));
    }
    let key = ingest::message_key(
        headers
            .get_all("x-spillway-key")
            .iter()
            .map(|v| v.as_bytes()),
    )?;
    let idempotency_key = ingest::idempotency_key(
        headers
            .get_all("idempotency-key")
            .iter()
            .map(|v| v.as_bytes()),
    )?;
    let kind = ingest::body_kind(header(headers, "content-type"))?;
    let encoding = header(headers, "content-encoding");
    let gzip = encoding.is_some_and(|e| e.to_ascii_lowercase().contains("gzip"));
    let limit = state.settings.max_body_bytes;
    // A compressed body may be a little larger than its content: allow for gzip's framing.
    let wire_limit = if gzip {
        limit + limit / 16 + 1024
    } else {
        limit
    };
    let declared = header(headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    futures::pin_mut!(body);
    if let Some(declared) = declared.filter(|n| *n > wire_limit) {
        // A client that waits for `100 Continue` has sent nothing: answer at once.
        let waits =
            header(headers, "expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));
        if !waits && declared <= DISCARD_BYTES {
            if let Ok(_discarding) = state.discards.clone().try_acquire_owned() {
                discard(body.as_mut(), DISCARD_BYTES).await;
            }
        }
        return Err(too_large(limit));
    }
    let request_permit = state.requests.clone().try_acquire_owned().map_err(|_| {
        Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} requests are already in flight, the limit: nothing was written, retry later",
                state.settings.max_in_flight_requests
            ),
        )
    })?;
    let reserve = declared.unwrap_or(wire_limit).min(wire_limit) + if gzip { limit } else { 0 };
    let byte_permits = state
        .kib
        .clone()
        .try_acquire_many_owned(reserve.div_ceil(1024).max(1) as u32)
        .map_err(|_| {
            Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many request bytes are in flight: nothing was written, retry later",
            )
        })?;
    let raw = match read_body(body.as_mut(), wire_limit).await {
        Ok(raw) => raw,
        Err(Unread::Failed(refusal)) => return Err(refusal),
        Err(Unread::OverLimit { read }) => {
            // Nothing is held while the rest is thrown away: this request no longer counts.
            drop((request_permit, byte_permits));
            if let Ok(_discarding) = state.discards.clone().try_acquire_owned() {
                discard(body, DISCARD_BYTES.saturating_sub(read)).await;
            }
            return Err(too_large(limit));
        }
    };
    let decoded = ingest::decode(encoding, raw, limit)?;
    let max_depth = state.settings.max_depth;
    let records = match &state.schema {
        None => ingest::records(kind, &decoded, max_depth)?,
        Some(schema) => {
            let mut check = schema.begin();
            let raws = ingest::parsed_records(kind, &decoded, max_depth, |r| check.record(r))?;
            check.finish()?;
            raws
        }
    };
    let received_at_micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let source = header(headers, "x-spillway-source");
    let envelope = Envelope {
        received_at_micros,
        // Stamped when the message is handed to Kafka (`SequencedProducer::send`).
        request_id: RequestId::from_u128(0),
        sequenced: true,
        idempotency_key,
        source,
        records,
    };
    // The key travels beside the envelope, in the same Kafka record.
    let len = envelope.encoded_len() + key.map_or(0, <[u8]>::len);
    if len + FRAMING_MARGIN > state.max_message_bytes {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "this request encodes to {len} bytes, more than the broker accepts in one message \
                 ({} bytes): split it into smaller requests. Nothing was written.",
                state.max_message_bytes
            ),
        ));
    }
    let count = envelope.records.len();
    let mut payload = envelope.encode();
    // Remembered as the message is handed to Kafka: from here on it may be written, whatever
    // the answer says.
    let mut new_key = None;
    if let Some(key) = idempotency_key {
        match state.remember_key(
            key,
            idempotency::body_digest(&state.digests, kind, &decoded),
        ) {
            KeyUse::New(ticket) => new_key = Some((key, ticket)),
            KeyUse::Repeat => {}
            KeyUse::Conflict { since } => return Err(key_conflict(key, since)),
        }
    }
    let sent = Instant::now();
    let (generation, producer) = state.producer();
    let (request_id, delivery) = producer
        .send(&state.settings.topic, &mut payload, key)
        .map_err(|e| {
            // The client never took the message.
            state.forget_key(new_key);
            state.replace_client_after(generation, &e);
            kafka_refusal(&e, state)
        })?;
    drop(producer);
    if mutation::active(Mutation::AckBeforeKafka) {
        // MUTATION ack-before-kafka: answer now. The delivery report is only watched in the
        // background, so a client the broker no longer accepts is still replaced as usual.
        let state = Arc::clone(state);
        tokio::spawn(async move {
            if let Ok(Err((e, _))) = delivery.await {
                state.replace_client_after(generation, &e);
            }
        });
        let mut accepted =
            serde_json::json!({"request_id": request_id.to_string(), "records": count});
        echo_key(&mut accepted, idempotency_key);
        return Ok(accepted);
    }
    // librdkafka fails the message itself at message.timeout.ms; the margin only guards a bug.
    let waited = tokio::time::timeout(
        state.settings.produce_timeout + Duration::from_secs(2),
        delivery,
    )
    .await;
    let delivery = match waited {
        Ok(Ok(Ok(d))) => d,
        Ok(Ok(Err((e, _)))) => {
            state.replace_client_after(generation, &e);
            let refusal = kafka_refusal(&e, state);
            if refusal.status == StatusCode::PAYLOAD_TOO_LARGE {
                // The broker refused the message: it is not stored.
                state.forget_key(new_key);
            }
            return Err(refusal);
        }
        Ok(Err(_canceled)) => {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the Kafka client shut down before acknowledging: the records are not acknowledged, retry",
            ))
        }
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "Kafka did not acknowledge within {:?}: the records are not acknowledged; retry \
                     (if the broker stored them late, the retry adds a second copy)",
                    state.settings.produce_timeout
                ),
            ))
        }
    };
    state
        .metrics
        .produce_latency
        .observe(sent.elapsed().as_secs_f64());
    state.metrics.records.inc_by(count as u64);
    state.metrics.bytes.inc_by(payload.len() as u64);
    state.metrics.records_per_request.observe(count as f64);
    let mut accepted = serde_json::json!({
        "request_id": request_id.to_string(),
        "records": count,
        "partition": delivery.partition,
        "offset": delivery.offset,
    });
    echo_key(&mut accepted, idempotency_key);
    Ok(accepted)
}

/// Adds the request's `Idempotency-Key`, if it sent one, to its answer.
fn echo_key(answer: &mut serde_json::Value, key: Option<&str>) {
    if let (Some(fields), Some(key)) = (answer.as_object_mut(), key) {
        fields.insert("idempotency_key".into(), key.into());
    }
}

/// `key` was handed to Kafka with another body `since` ago.
fn key_conflict(key: &str, since: Duration) -> Refusal {
    let mut refusal = Refusal::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!(
            "Idempotency-Key {key:?} was used with a different body {}s ago; nothing was \
             written. A retry must send the same body as its first attempt; a new request needs \
             a new key.",
            since.as_secs()
        ),
    );
    refusal.details.insert("idempotency_key".into(), key.into());
    refusal
}

fn too_large(limit: usize) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is larger than {limit} bytes, the limit: split it into smaller requests. Nothing was written."),
    )
}

/// Why a body was not read whole.
enum Unread {
    /// The connection failed.
    Failed(Refusal),
    /// It went past the limit after `read` bytes; the rest is still to come.
    OverLimit { read: usize },
}

async fn read_body<S, B>(mut body: Pin<&mut S>, wire_limit: usize) -> Result<Bytes, Unread>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            Unread::Failed(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("the body could not be read ({e}). Nothing was written."),
            ))
        })?;
        let read = buf.len() + chunk.remaining();
        if read > wire_limit {
            return Err(Unread::OverLimit { read });
        }
        buf.put(chunk);
    }
    Ok(buf.freeze())
}

/// Reads and drops the rest of a refused body, up to `budget` bytes and [`DISCARD_TIME`], so the
/// client reads the answer rather than a reset. Past either bound the connection is closed.
async fn discard<S, B>(mut body: Pin<&mut S>, budget: usize)
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let drained = tokio::time::timeout(DISCARD_TIME, async {
        let mut read = 0usize;
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.remaining();
            if read > budget {
                return false;
            }
        }
        true
    })
    .await;
    if drained != Ok(true) {
        tracing::debug!("a refused body was not read to its end; the connection is closed");
    }
}

fn kafka_refusal(e: &KafkaError, state: &State) -> Refusal {
    let code = e.rdkafka_error_code();
    match code {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) | Some(RDKafkaErrorCode::InvalidMessageSize) => Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Kafka refused the message as too large ({e}): split the request. Nothing was written."),
        ),
        Some(RDKafkaErrorCode::QueueFull) => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the Kafka client's queue is full (Kafka is slow or down): nothing was written, retry later",
        ),
        _ => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "Kafka did not acknowledge the write within {:?} ({e}): the records are not \
                 acknowledged; retry later (if the broker stored them late, the retry adds a second copy)",
                state.settings.produce_timeout
            ),
        ),
    }
}
