#!/usr/bin/env bash
# Builds the fast broker for benchmarks (once, cached in ~/.cache/spillway) and checks whether
# it is fit to measure with: a fetch from inside a stored batch must read the rest of it, a
# 200,000-message backlog must read back completely, its high watermark must count every
# message, and loadgen's spiky run through the whole pipeline on it must pass the no-loss
# verdict. Benchmarks select it with SPILLWAY_TEST_KAFKA=fast; fault tests never do (it loses
# everything on restart). Unpatched, Tansu 0.6.0's in-memory engine fails the first and the
# third check (ci/tansu/dynostore.patch fixes both).
#
#   ci/fast-broker.sh           # build if missing, then the three checks
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

ensure_fast_broker
export SPILLWAY_FAST_BROKER_BIN="${SPILLWAY_FAST_BROKER_BIN:-$(fast_broker_bin)}"
step "the fast broker's own checks ($SPILLWAY_FAST_BROKER_BIN)"
cargo test --locked -p spillway-harness --test fast_broker -- --ignored --test-threads=1
step "loadgen --rate-profile spiky on the fast broker, with the verdict"
SPILLWAY_TEST_KAFKA=fast cargo run --locked --release -p spillway-loadgen --bin loadgen -- \
  --rate-profile spiky --out "${TMPDIR:-/tmp}/spillway-fast-broker-loadgen"
