//! Spillway's chaos suite: real processes, real faults, and one invariant checked after every
//! one of them: no acknowledged record is lost and none is duplicated.
//!
//! Each scenario ([`scenarios`]) starts a private Postgres, a Tansu broker, and the producer and
//! consumers as child processes (the test binary re-executed in a service role through
//! [`child_process`], so a SIGKILL or SIGSTOP is real), drives traffic with unique ids through
//! loadgen's open-model runner, injects its fault at a precise moment, and records evidence
//! that the fault happened as described (a COPY stalled in `pg_stat_activity` at the kill, a
//! process in state `T`, a counter that moved). It heals, waits until the pipeline is quiet and
//! asks loadgen's verdict.
//!
//! A scenario runs in one of two ways ([`Run`]): as the suite's proof (`cargo test --test
//! chaos`: the verdict must pass and every check hold), or with a known bug switched on in one
//! service (`cargo test -p spillway-integration --features mutations --test chaos_mutations`:
//! the fault's evidence must still hold and the verdict must report the loss or duplicate the
//! bug causes).
//!
//! This crate starts servers and child processes and sends traffic on 127.0.0.1 only; it never
//! touches anything it did not start.
#![warn(missing_docs)]

mod child;
mod cluster;
mod prometheus;
pub mod scenarios;

pub use child::child_process;
pub use cluster::{Harm, Mutant, Role, Run};
