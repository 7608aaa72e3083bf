//! Spillway's engine, with no IO and no clock.
//!
//! This crate decides everything about *what* to write and *when*: how an accepted HTTP request
//! is framed as one Kafka message ([`envelope`]), when buffered records form a batch and what
//! happens to a batch after its flush succeeds, fails or is rejected for a bad record
//! ([`batcher`]), how big batches should be ([`adaptive`]), how long to wait before trying
//! again ([`retry`]), which Kafka position is safe to commit ([`ledger`]), and how a record
//! becomes a row of typed columns in COPY BINARY ([`columns`], [`pgcopy`]), and which time
//! partitions a table needs and which are past their retention ([`partitions`]), and how the
//! partitions of several topics share one number space ([`topics`]), and which records of a
//! request sent again with its `Idempotency-Key` are repeats ([`idempotency`]).
//!
//! It never performs IO and never reads a clock: every method that depends on time takes `now`
//! as an argument. The services (`spillway-producer`, `spillway-consumer`) are thin shells that
//! own sockets and timers, call into this crate, and map their errors into [`ErrorClass`].
//! As a result every batching and retry decision can be replayed exactly in a test.
#![warn(missing_docs)]

pub mod adaptive;
pub mod batcher;
mod calendar;
pub mod columns;
pub mod consumer;
pub mod envelope;
pub mod error;
pub mod idempotency;
pub mod ledger;
pub mod metrics;
pub mod partitions;
pub mod pgcopy;
pub mod props;
pub mod retry;
pub mod routing;
mod scan;
pub mod topics;
pub mod upsert;

pub use adaptive::{AdaptiveConfig, BatchSizer};
pub use batcher::{
    AfterFlush, Batch, BatchId, Batcher, BatcherConfig, BatcherStats, Entry, FlushOutcome,
    KafkaMeta, Push, Record,
};
pub use columns::{ColumnSpec, ColumnType, ConvertError, Mapping, Meta, SpecError};
pub use consumer::{
    Command, ConsumerConfig, ConsumerMachine, ConsumerStats, Epoch, EpochTags, Exit, FlushResult,
    KafkaCommand, Message, Mutation, Notice, PartitionLag, Phase, StoredPosition,
};
pub use envelope::{DecodeError, Envelope, ProducerSequence, RequestId};
pub use error::{ConfigError, ErrorClass};
pub use ledger::{OffsetLedger, Partition, Position};
pub use partitions::{Interval, Partitioning, Retention};
pub use pgcopy::CopyRows;
pub use retry::{Jitter, RetryConfig, RetryPolicy};
pub use routing::Router;
pub use scan::plain_run;
pub use topics::Topics;
pub use upsert::{Matcher, OnConflict, Upsert};
