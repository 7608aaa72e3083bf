//! Spillway's chaos suite lives in `tests/chaos.rs` (`cargo test --test chaos`); this crate
//! holds no library code of its own. The harness it uses is `spillway-harness`.
