#!/usr/bin/env bash
# Runs the chaos suite and the in-process fault tests N times with random seeds, stopping at the
# first failure with its seed.
#
#   ci/soak.sh 20
#   SPILLWAY_CHAOS_SEED=1234 cargo test --test chaos postgres_killed_mid_copy   # replay one
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh
runs="${1:-10}"
export SPILLWAY_TANSU_BIN="${SPILLWAY_TANSU_BIN:-$(tansu_bin)}"
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
