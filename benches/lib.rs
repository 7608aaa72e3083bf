//! Spillway benchmarks (criterion). Run with `cargo bench`.
