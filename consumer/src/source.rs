//! The Kafka side: a dedicated thread polls the group consumer and hands messages to the
//! async pipeline over a bounded channel. The pipeline never blocks this thread for long, so
//! the consumer keeps polling (and stays in its group) through any Postgres outage.
//!
//! Positions come from Postgres: on assignment the rebalance callback asks the pipeline where
//! each partition stands and assigns at exactly those offsets. A per-partition *epoch* tags
//! every message; the pipeline bumps it when it rewinds a partition (after dropping records it
//! had no room for), and this thread applies the matching seek between two polls, so a message
//! fetched before the seek can never be mistaken for one after it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use spillway_core::{Partition, Position};
use tokio::sync::mpsc;

/// What the Kafka thread tells the pipeline.
#[derive(Debug)]
pub enum SourceEvent {
    /// A message, tagged with its partition's epoch when it was polled.
    Message {
        /// Partition.
        partition: Partition,
        /// Offset.
        offset: i64,
        /// Epoch of the partition at poll time.
        epoch: u64,
        /// The payload (`None` for a null message).
        payload: Option<Vec<u8>>,
    },
    /// Partitions assigned: reply with (partition, stored position, new epoch) for each.
    Assigned {
        /// The partitions.
        partitions: Vec<Partition>,
        /// Where to start each.
        reply: std_mpsc::SyncSender<Vec<(Partition, Position, u64)>>,
    },
    /// Partitions revoked: reply once the pipeline dropped them.
    Revoked {
        /// The partitions.
        partitions: Vec<Partition>,
        /// Acknowledgement.
        reply: std_mpsc::SyncSender<()>,
    },
    /// A client-level error (broker down, ...), for logs and readiness.
    Error(String),
}

/// What the pipeline asks of the Kafka thread.
#[derive(Debug)]
pub enum SourceCommand {
    /// Re-read `partition` from `offset`; messages polled afterwards carry `epoch`.
    Seek {
        /// Partition.
        partition: Partition,
        /// Offset.
        offset: i64,
        /// The new epoch.
        epoch: u64,
    },
    /// Stop fetching these partitions.
    Pause(Vec<Partition>),
    /// Fetch them again.
    Resume(Vec<Partition>),
    /// Commit these next-offsets to the group (asynchronously), for lag tools.
    Commit(Vec<(Partition, i64)>),
}

/// The rebalance handling of the group consumer (see the module documentation).
#[derive(Debug)]
pub struct Context {
    topic: String,
    events: mpsc::Sender<SourceEvent>,
    epochs: Arc<Mutex<HashMap<Partition, u64>>>,
    closing: Arc<AtomicBool>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions: Vec<Partition> = tpl.elements().iter().map(|e| e.partition()).collect();
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if !self.closing.load(Ordering::Relaxed) {
                    self.set_start_positions(tpl, partitions);
                }
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if !self.closing.load(Ordering::Relaxed) {
                    let (reply, done) = std_mpsc::sync_channel(1);
                    if self
                        .events
                        .blocking_send(SourceEvent::Revoked { partitions, reply })
                        .is_ok()
                    {
                        let _ = done.recv();
                    }
                }
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "Kafka rebalance failed");
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying the Kafka assignment failed");
        }
    }
}

impl Context {
    /// Asks the pipeline for the stored positions and writes them into the assignment.
    fn set_start_positions(&self, tpl: &mut TopicPartitionList, partitions: Vec<Partition>) {
        let (reply, positions) = std_mpsc::sync_channel(1);
        if self
            .events
            .blocking_send(SourceEvent::Assigned { partitions, reply })
            .is_err()
        {
            return;
        }
        let Ok(positions) = positions.recv() else {
            return;
        };
        let mut epochs = self.epochs.lock().unwrap_or_else(|p| p.into_inner());
        for (partition, position, epoch) in positions {
            epochs.insert(partition, epoch);
            if crate::mutation::active(crate::mutation::Mutation::CommitKafkaFirst) {
                continue; // MUTATION commit-kafka-first: Kafka's committed offset, not Postgres's
            }
            if let Err(e) = tpl.set_partition_offset(
                &self.topic,
                partition,
                Offset::Offset(position.kafka_offset()),
            ) {
                tracing::error!(partition, error = %e, "cannot set the start offset");
            }
        }
    }
}

/// The running Kafka thread.
pub struct Source {
    consumer: Arc<BaseConsumer<Context>>,
    commands: std_mpsc::Sender<SourceCommand>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    topic: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("topic", &self.topic)
            .finish()
    }
}

impl Source {
    /// Creates the group consumer, subscribes, and starts polling. Messages arrive on the
    /// returned channel, which holds at most `channel_capacity` of them.
    pub fn start(
        config: &ClientConfig,
        topic: &str,
        channel_capacity: usize,
    ) -> KafkaResult<(Self, mpsc::Receiver<SourceEvent>)> {
        let (events, rx) = mpsc::channel(channel_capacity);
        let epochs = Arc::new(Mutex::new(HashMap::new()));
        let closing = Arc::new(AtomicBool::new(false));
        let context = Context {
            topic: topic.to_string(),
            events: events.clone(),
            epochs: epochs.clone(),
            closing: closing.clone(),
        };
        let consumer: Arc<BaseConsumer<Context>> = Arc::new(config.create_with_context(context)?);
        consumer.subscribe(&[topic])?;
        let (commands, command_rx) = std_mpsc::channel();
        let thread_consumer = consumer.clone();
        let thread_topic = topic.to_string();
        let thread_stop = closing.clone();
        let thread = std::thread::Builder::new()
            .name("spillway-kafka".into())
            .spawn(move || {
                poll_loop(
                    thread_consumer,
                    thread_topic,
                    events,
                    command_rx,
                    epochs,
                    thread_stop,
                )
            })
            .map_err(|e| rdkafka::error::KafkaError::ClientCreation(e.to_string()))?;
        Ok((
            Source {
                consumer,
                commands,
                stop: closing,
                thread: Some(thread),
                topic: topic.to_string(),
            },
            rx,
        ))
    }

    /// Queues a command for the Kafka thread.
    pub fn command(&self, c: SourceCommand) {
        let _ = self.commands.send(c);
    }

    /// The consumer, for read-only queries (watermarks, metadata).
    pub fn consumer(&self) -> &Arc<BaseConsumer<Context>> {
        &self.consumer
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Stops polling, commits synchronously what was committed asynchronously, leaves the
    /// group, and joins the thread.
    pub fn close(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn poll_loop(
    consumer: Arc<BaseConsumer<Context>>,
    topic: String,
    events: mpsc::Sender<SourceEvent>,
    commands: std_mpsc::Receiver<SourceCommand>,
    epochs: Arc<Mutex<HashMap<Partition, u64>>>,
    stop: Arc<AtomicBool>,
) {
    let tpl_of = |partitions: &[Partition]| {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&topic, *p);
        }
        tpl
    };
    while !stop.load(Ordering::Relaxed) {
        while let Ok(c) = commands.try_recv() {
            match c {
                SourceCommand::Seek {
                    partition,
                    offset,
                    epoch,
                } => {
                    epochs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(partition, epoch);
                    if let Err(e) = consumer.seek(
                        &topic,
                        partition,
                        Offset::Offset(offset),
                        Duration::from_secs(10),
                    ) {
                        tracing::warn!(partition, offset, error = %e, "seek failed (partition no longer assigned?)");
                    }
                }
                SourceCommand::Pause(ps) => {
                    if let Err(e) = consumer.pause(&tpl_of(&ps)) {
                        tracing::debug!(error = %e, "pause");
                    }
                }
                SourceCommand::Resume(ps) => {
                    if let Err(e) = consumer.resume(&tpl_of(&ps)) {
                        tracing::debug!(error = %e, "resume");
                    }
                }
                SourceCommand::Commit(offsets) => {
                    let mut tpl = TopicPartitionList::new();
                    for (p, o) in offsets {
                        let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(o));
                    }
                    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                        tracing::debug!(error = %e, "Kafka commit (informational; Postgres holds the positions)");
                    }
                }
            }
        }
        let event = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Ok(m)) => {
                let epoch = epochs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&m.partition())
                    .copied()
                    .unwrap_or(0);
                SourceEvent::Message {
                    partition: m.partition(),
                    offset: m.offset(),
                    epoch,
                    payload: m.payload().map(<[u8]>::to_vec),
                }
            }
            Some(Err(e)) => SourceEvent::Error(e.to_string()),
        };
        if events.blocking_send(event).is_err() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    // Leave the group now rather than at the session timeout; the rebalance callback sees
    // `closing` and does not wait for the pipeline.
    consumer.unsubscribe();
    let _ = consumer.poll(Duration::from_millis(100));
}
