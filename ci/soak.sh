#!/usr/bin/env bash
# Runs the consumer's deterministic simulation over many seeds (release build), then the chaos
# suite and the in-process fault tests N times with random seeds, stopping at the first failure
# with its seed. With MUTANTS=1 it ends with cargo-mutants over the core's batcher and consumer
# state machine (about an hour here).
#
#   ci/soak.sh 20
#   SIM_SEEDS=100000 ci/soak.sh 0                     # only the simulation, with more seeds
#   SPILLWAY_SIM_SEED=123 cargo test -p spillway-core --test simulation             # replay one
#   SPILLWAY_CHAOS_SEED=1234 cargo test --test chaos postgres_killed_mid_copy   # replay one
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh
runs="${1:-10}"
export SPILLWAY_TANSU_BIN="${SPILLWAY_TANSU_BIN:-$(tansu_bin)}"
step "simulation: ${SIM_SEEDS:-20000} seeds (release)"
SPILLWAY_SIM_SEEDS="${SIM_SEEDS:-20000}" cargo test --locked --release -p spillway-core \
  --test simulation -- --nocapture
for ((i = 1; i <= runs; i++)); do
  seed=$(( (RANDOM << 15) | RANDOM ))
  step "soak run $i/$runs, SPILLWAY_CHAOS_SEED=$seed"
  if ! SPILLWAY_CHAOS_SEED=$seed cargo test --locked -p spillway-integration --test chaos \
       -p spillway-consumer --test consumer -p spillway-producer --test ingest \
       -p spillway-loadgen --test e2e -- --test-threads=2; then
    echo "soak: run $i failed; replay with SPILLWAY_CHAOS_SEED=$seed" >&2
    exit 1
  fi
done
echo "soak: $runs runs passed"
if [[ "${MUTANTS:-0}" == 1 ]]; then
  command -v cargo-mutants >/dev/null || cargo install cargo-mutants --locked
  step "cargo mutants over the batcher and the consumer state machine"
  SPILLWAY_SIM_SEEDS=150 PROPTEST_CASES=200 cargo mutants -p spillway-core \
    -f core/src/consumer.rs -f core/src/batcher.rs --timeout 180
fi
