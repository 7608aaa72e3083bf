//! The Kafka side: a dedicated thread polls the group consumer, carries out the core's
//! [`KafkaCommand`]s (seek, pause, resume, commit, rejoin) between two polls, and hands events to the
//! async pipeline over a bounded channel. It decides nothing: the core
//! ([`spillway_core::ConsumerMachine`]) does.
//!
//! Positions come from Postgres: on assignment the rebalance callback asks the pipeline for the
//! start offset of each partition (the core reads the stored positions and answers with a seek)
//! and assigns at exactly those offsets. Every message is tagged with its partition's epoch by
//! [`EpochTags`]: the epoch of the last seek that *succeeded*, so a failed seek can never make a
//! stale message look current. The outcome of each seek goes back as an event, in order with
//! the messages.
//!
//! A consumer of several topics numbers their partitions as [`spillway_core::topics`] says:
//! this module translates between those numbers and Kafka's (topic, partition) both ways.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use spillway_core::{Epoch, EpochTags, KafkaCommand, KafkaMeta, Partition, Topics};
use tokio::sync::mpsc;

/// The start of one assigned partition: its offset and the epoch its messages will carry.
pub type StartAt = (Partition, i64, Epoch);

/// What the Kafka thread tells the pipeline.
#[derive(Debug)]
pub enum SourceEvent {
    /// A message, tagged with its partition's epoch when it was polled.
    Message(spillway_core::Message),
    /// Partitions assigned: reply with where each starts.
    Assigned {
        /// The partitions.
        partitions: Vec<Partition>,
        /// Where to start each.
        reply: std_mpsc::SyncSender<Vec<StartAt>>,
    },
    /// Partitions revoked: reply once the pipeline dropped them.
    Revoked {
        /// The partitions.
        partitions: Vec<Partition>,
        /// Acknowledgement.
        reply: std_mpsc::SyncSender<()>,
    },
    /// A seek (or the assignment's start offset) took effect.
    SeekDone(Partition, Epoch),
    /// A seek (or the assignment) failed.
    SeekFailed(Partition, Epoch, String),
    /// A client-level error.
    Error(KafkaError),
}

/// The rebalance handling of the group consumer (see the module documentation).
pub struct Context {
    topics: Topics,
    events: mpsc::Sender<SourceEvent>,
    tags: Arc<Mutex<EpochTags>>,
    closing: Arc<AtomicBool>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("topics", &self.topics)
            .finish()
    }
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
        let partitions: Vec<Partition> = tpl
            .elements()
            .iter()
            .filter_map(|e| {
                let p = self.topics.number(e.topic(), e.partition());
                if p.is_none() {
                    tracing::error!(topic = e.topic(), partition = e.partition(), "a partition this consumer cannot number (past the 1,048,576th of its topic, or of a topic it did not ask for): not read");
                }
                p
            })
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let starts = if self.closing.load(Ordering::Relaxed) {
                    None
                } else {
                    self.start_offsets(partitions)
                };
                let Some(starts) = starts else {
                    // The pipeline is stopping: take nothing; the group gives it to others.
                    return;
                };
                let mut assigned = TopicPartitionList::new();
                for (p, offset, _) in &starts {
                    let Some((topic, kafka)) = self.topics.split(*p) else {
                        continue;
                    };
                    if let Err(e) =
                        assigned.add_partition_offset(topic, kafka, Offset::Offset(*offset))
                    {
                        tracing::error!(partition = p, error = %e, "cannot set the start offset");
                    }
                }
                let result = if cooperative {
                    consumer.incremental_assign(&assigned)
                } else {
                    consumer.assign(&assigned)
                };
                let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
                for (p, _, epoch) in starts {
                    let event = match &result {
                        Ok(()) => {
                            tags.sought(p, epoch);
                            SourceEvent::SeekDone(p, epoch)
                        }
                        Err(e) => SourceEvent::SeekFailed(p, epoch, e.to_string()),
                    };
                    if self.events.blocking_send(event).is_err() {
                        return;
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if !self.closing.load(Ordering::Relaxed) {
                    let (reply, done) = std_mpsc::sync_channel(1);
                    if self
                        .events
                        .blocking_send(SourceEvent::Revoked {
                            partitions: partitions.clone(),
                            reply,
                        })
                        .is_ok()
                    {
                        let _ = done.recv();
                    }
                }
                let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
                for p in partitions {
                    tags.forget(p);
                }
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "giving up the revoked partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "Kafka rebalance failed");
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "giving up the assignment failed");
                }
            }
        }
    }
}

impl Context {
    /// Asks the pipeline where each partition starts (it waits for the stored positions).
    /// `None` when the pipeline has stopped.
    fn start_offsets(&self, partitions: Vec<Partition>) -> Option<Vec<StartAt>> {
        let (reply, starts) = std_mpsc::sync_channel(1);
        self.events
            .blocking_send(SourceEvent::Assigned { partitions, reply })
            .ok()?;
        starts.recv().ok()
    }
}

/// The running Kafka thread.
pub struct Source {
    consumer: Arc<BaseConsumer<Context>>,
    commands: std_mpsc::Sender<KafkaCommand>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    topics: Topics,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("topics", &self.topics)
            .finish()
    }
}

impl Source {
    /// Creates the group consumer, subscribes, and starts polling. Messages arrive on the
    /// returned channel, which holds at most `channel_capacity` of them.
    pub fn start(
        config: &ClientConfig,
        topics: &Topics,
        channel_capacity: usize,
        tags: EpochTags,
        with_kafka_meta: bool,
    ) -> KafkaResult<(Self, mpsc::Receiver<SourceEvent>)> {
        let (events, rx) = mpsc::channel(channel_capacity);
        let tags = Arc::new(Mutex::new(tags));
        let closing = Arc::new(AtomicBool::new(false));
        let context = Context {
            topics: topics.clone(),
            events: events.clone(),
            tags: tags.clone(),
            closing: closing.clone(),
        };
        let consumer: Arc<BaseConsumer<Context>> = Arc::new(config.create_with_context(context)?);
        consumer.subscribe(&names(topics))?;
        let (commands, command_rx) = std_mpsc::channel();
        let poller = Poller {
            consumer: consumer.clone(),
            topics: topics.clone(),
            events,
            commands: command_rx,
            tags,
            stop: closing.clone(),
            with_kafka_meta,
        };
        let thread = std::thread::Builder::new()
            .name("spillway-kafka".into())
            .spawn(move || poller.run())
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        Ok((
            Source {
                consumer,
                commands,
                stop: closing,
                thread: Some(thread),
                topics: topics.clone(),
            },
            rx,
        ))
    }

    /// Queues a command for the Kafka thread.
    pub fn command(&self, c: KafkaCommand) {
        let _ = self.commands.send(c);
    }

    /// The consumer, for read-only queries (watermarks, metadata).
    pub fn consumer(&self) -> &Arc<BaseConsumer<Context>> {
        &self.consumer
    }

    /// The topics.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Stops polling, leaves the group and joins the thread. Drop the event receiver first:
    /// a thread blocked on a full channel then wakes up and sees the stop.
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

struct Poller {
    consumer: Arc<BaseConsumer<Context>>,
    topics: Topics,
    events: mpsc::Sender<SourceEvent>,
    commands: std_mpsc::Receiver<KafkaCommand>,
    tags: Arc<Mutex<EpochTags>>,
    stop: Arc<AtomicBool>,
    /// Copy each message's key, timestamp and headers (a column maps them).
    with_kafka_meta: bool,
}

impl Poller {
    fn one(&self, p: Partition) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        if let Some((topic, kafka)) = self.topics.split(p) {
            tpl.add_partition(topic, kafka);
        }
        tpl
    }

    /// The core's number of a message's partition.
    fn number(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> Option<Partition> {
        if self.topics.several() {
            self.topics.number(m.topic(), m.partition())
        } else {
            Some(m.partition())
        }
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, EpochTags> {
        self.tags.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Carries out one command; returns an event to report, if any.
    fn perform(&self, c: KafkaCommand) -> Option<SourceEvent> {
        match c {
            KafkaCommand::Seek {
                partition,
                offset,
                epoch,
            } => {
                self.tags().seeking(partition, epoch);
                let Some((topic, kafka)) = self.topics.split(partition) else {
                    let why = "not a partition of this consumer's topics".to_string();
                    return Some(SourceEvent::SeekFailed(partition, epoch, why));
                };
                let result = self.consumer.seek(
                    topic,
                    kafka,
                    Offset::Offset(offset),
                    Duration::from_secs(10),
                );
                Some(match result {
                    Ok(()) => {
                        self.tags().sought(partition, epoch);
                        SourceEvent::SeekDone(partition, epoch)
                    }
                    Err(e) => SourceEvent::SeekFailed(partition, epoch, e.to_string()),
                })
            }
            KafkaCommand::Pause(p) => {
                if let Err(e) = self.consumer.pause(&self.one(p)) {
                    tracing::debug!(partition = p, error = %e, "pause (partition not assigned yet?)");
                }
                None
            }
            KafkaCommand::Resume(p) => {
                if let Err(e) = self.consumer.resume(&self.one(p)) {
                    tracing::debug!(partition = p, error = %e, "resume (partition not assigned?)");
                }
                None
            }
            KafkaCommand::Commit {
                partition: p,
                offset,
            } => {
                let mut tpl = TopicPartitionList::new();
                if let Some((topic, kafka)) = self.topics.split(p) {
                    let _ = tpl.add_partition_offset(topic, kafka, Offset::Offset(offset));
                }
                if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                    tracing::debug!(error = %e, "Kafka commit (informational; Postgres holds the positions)");
                }
                None
            }
            KafkaCommand::Rejoin => {
                self.consumer.unsubscribe();
                if let Err(e) = self.consumer.subscribe(&names(&self.topics)) {
                    Some(SourceEvent::Error(e))
                } else {
                    None
                }
            }
        }
    }

    fn run(self) {
        'polling: while !self.stop.load(Ordering::Relaxed) {
            while let Ok(c) = self.commands.try_recv() {
                if let Some(event) = self.perform(c) {
                    if self.events.blocking_send(event).is_err() {
                        break 'polling;
                    }
                }
            }
            let event = match self.consumer.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Ok(m)) => {
                    let Some(partition) = self.number(&m) else {
                        continue;
                    };
                    SourceEvent::Message(spillway_core::Message {
                        partition,
                        offset: m.offset(),
                        epoch: self.tags().tag(partition),
                        payload: m.payload().map(<[u8]>::to_vec),
                        kafka: self.with_kafka_meta.then(|| Arc::new(kafka_meta(&m))),
                    })
                }
                Some(Err(e)) => SourceEvent::Error(e),
            };
            if self.events.blocking_send(event).is_err() {
                break;
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        // Leave the group now rather than at the session timeout; the rebalance callback sees
        // `closing` and does not wait for the pipeline.
        self.consumer.unsubscribe();
        let _ = self.consumer.poll(Duration::from_millis(100));
    }
}

fn names(topics: &Topics) -> Vec<&str> {
    topics.names().iter().map(String::as_str).collect()
}

/// A message's key, timestamp and headers (only when a column maps them).
fn kafka_meta(m: &rdkafka::message::BorrowedMessage<'_>) -> KafkaMeta {
    use rdkafka::message::Headers;
    KafkaMeta {
        key: m.key().map(<[u8]>::to_vec),
        timestamp_millis: m.timestamp().to_millis(),
        headers: m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Whether a Kafka error needs a person (credentials, permissions, a missing topic) rather
/// than patience (a broker restarting).
pub fn needs_attention(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SSL
        )
    )
}
