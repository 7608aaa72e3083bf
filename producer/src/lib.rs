//! Spillway's HTTP ingest service.
//!
//! `POST`/`PUT /store` takes JSON (an object or an array) or NDJSON, optionally gzipped, turns
//! the whole request into one Kafka message (the core's [`spillway_core::Envelope`]), keyed by
//! the request's `X-Spillway-Key` if it has one (else without a key), and answers `200` only
//! after Kafka acknowledged it with `acks=all` from an idempotent producer. A request's
//! `Idempotency-Key` travels in its envelope (the consumer writes one key's records once);
//! a key reused for another body within the window is refused with `422`
//! ([`idempotency::RecentKeys`]).
//! Bad input gets a 4xx and writes nothing; Kafka slow or down gets `503` with `Retry-After`;
//! too much in flight is shed at once with `429`. It never answers 2xx for data that is not
//! durable in Kafka.
#![warn(missing_docs)]

#[cfg(all(feature = "mutations", not(debug_assertions)))]
compile_error!(
    "the `mutations` feature switches on known bugs for the chaos suite's mutation runs: \
     never build it in release mode"
);

pub mod config;
pub mod idempotency;
pub mod ingest;
pub mod mutation;
pub mod schema;
pub mod server;

pub use config::{Args, Settings};
pub use server::{fresh_metrics_page, serve, start, RunningProducer, StartError};
