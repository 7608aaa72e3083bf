//! Spillway's load generator as a library: rate profiles, payloads, the open-model runner,
//! the retries of requests with idempotency keys, the local stack, the no-loss verdict and the reports. The `loadgen` binary and the chaos
//! suite drive traffic through it.
#![warn(missing_docs)]

pub mod keyed;
pub mod payload;
pub mod profile;
pub mod report;
pub mod retry;
pub mod runner;
pub mod stack;
pub mod verify;
