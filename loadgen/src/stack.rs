//! The embedded local stack: a private Postgres, a Kafka broker (Tansu when installed, else
//! librdkafka's in-process mock cluster), the producer and the consumer, all in this process
//! except the servers, and all torn down after.

use std::time::Duration;

use spillway_consumer::RunningConsumer;
use spillway_harness::{kafka, postgres_from_env, KafkaBroker, PostgresServer};
use spillway_producer::RunningProducer;

/// The running stack.
pub struct LocalStack {
    /// Postgres (native or in a container, as `SPILLWAY_TEST_BACKEND` says).
    pub pg: Box<dyn PostgresServer>,
    /// The broker.
    pub broker: Box<dyn KafkaBroker>,
    /// The ingest service.
    pub producer: RunningProducer,
    /// The writer.
    pub consumer: RunningConsumer,
}

impl std::fmt::Debug for LocalStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStack")
            .field("producer", &self.producer.addr())
            .finish()
    }
}

/// The topic and table the local stack uses.
pub const TOPIC: &str = "spillway";
/// The records table.
pub const TABLE: &str = "records";
/// The table written by key that keyed traffic's states go to ([`LocalStack::start_keyed`]).
pub const STATES: &str = "states";

impl LocalStack {
    /// Starts everything; `partitions` for the topic.
    pub async fn start(partitions: i32) -> anyhow::Result<Self> {
        Self::start_with(partitions, spillway_core::Mapping::default()).await
    }

    /// Starts everything, the consumer with `mapping` (typed columns, keep-data).
    pub async fn start_with(
        partitions: i32,
        mapping: spillway_core::Mapping,
    ) -> anyhow::Result<Self> {
        Self::start_full(partitions, mapping, None).await
    }

    /// Starts everything for keyed traffic ([`crate::payload::PayloadSpec::keys`]): the
    /// consumer also routes the states (`--route /kind=state:`[`STATES`]) to a table written
    /// by key (`--upsert-key key --delete-when /op=delete`, [`state_columns`]).
    ///
    /// [`state_columns`]: crate::payload::state_columns
    pub async fn start_keyed(
        partitions: i32,
        mapping: spillway_core::Mapping,
        id_field: &str,
    ) -> anyhow::Result<Self> {
        let columns = crate::payload::state_columns(id_field)
            .iter()
            .map(|c| c.parse())
            .collect::<Result<Vec<_>, _>>()?;
        let states =
            spillway_core::Mapping::new(columns, true)?.with_upsert(spillway_core::Upsert {
                key: vec!["key".into()],
                on_conflict: spillway_core::OnConflict::Update,
                delete_when: Some("/op=delete".parse().map_err(anyhow::Error::msg)?),
            })?;
        Self::start_full(partitions, mapping, Some(states)).await
    }

    async fn start_full(
        partitions: i32,
        mapping: spillway_core::Mapping,
        states: Option<spillway_core::Mapping>,
    ) -> anyhow::Result<Self> {
        let pg = tokio::task::spawn_blocking(postgres_from_env).await??;
        let broker = tokio::task::block_in_place(kafka::from_env)?;
        broker.create_topic(TOPIC, partitions).await?;
        let mut ps = spillway_producer::Settings::new(broker.bootstrap(), TOPIC);
        ps.listen = "127.0.0.1:0".parse()?;
        ps.max_in_flight_requests = 8192;
        let producer = spillway_producer::start(ps).await?;
        let mut cs = spillway_consumer::Settings::new(broker.bootstrap(), TOPIC, pg.url());
        cs.listen = "127.0.0.1:0".parse()?;
        cs.group = "loadgen".into();
        cs.batcher.max_age = Duration::from_millis(200);
        cs.mapping = mapping;
        if let Some(states) = states {
            cs.routes = vec![(
                "/kind=state".parse().map_err(anyhow::Error::msg)?,
                STATES.to_string(),
            )];
            cs.routed = vec![spillway_consumer::config::TableSpec {
                table: spillway_consumer::pg::TableName::parse(STATES)
                    .map_err(anyhow::Error::msg)?,
                mapping: states,
                partitioning: None,
            }];
        }
        let consumer = spillway_consumer::start(cs).await?;
        Ok(LocalStack {
            pg,
            broker,
            producer,
            consumer,
        })
    }

    /// Postgres URL.
    pub fn database_url(&self) -> String {
        self.pg.url()
    }

    /// Stops the services (servers go when dropped).
    pub async fn shutdown(self) {
        self.producer.shutdown().await;
        if let Err(e) = self.consumer.shutdown().await {
            tracing::warn!(error = %e, "consumer shutdown");
        }
    }
}
