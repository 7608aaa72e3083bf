#!/usr/bin/env bash
# Flame graphs of the producer and the consumer at saturation on the fast broker (issue 15):
# builds the fast broker, the release binaries and inferno if missing, runs benches/profile.rs
# (perf attached to each service in turn), and writes benches/profiles/{producer,consumer}.svg
# with each one's top functions (self time) beside them as .txt.
#
#   benches/profile.sh [SECONDS]      # default 10 s of samples per service
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

ensure_build_tools
ensure_postgres
ensure_fast_broker
command -v perf >/dev/null || apt_install linux-perf
command -v wrk >/dev/null || apt_install wrk
INFERNO="$SPILLWAY_CACHE/inferno"
if [[ ! -x "$INFERNO/bin/inferno-flamegraph" ]]; then
  step "cargo install inferno (first run only)"
  cargo install inferno --version 0.12.8 --locked --root "$INFERNO"
fi
export SPILLWAY_FAST_BROKER_BIN="${SPILLWAY_FAST_BROKER_BIN:-$(fast_broker_bin)}"
step "building the release binaries"
cargo build --locked --release -p spillway-producer -p spillway-consumer -p spillway-benches --bin spillway-producer --bin spillway-consumer --bin profile
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
step "profiling (perf record, ${1:-10} s per service)"
target/release/profile "$work" "${1:-10}"
mkdir -p benches/profiles
for svc in producer consumer; do
  perf script -i "$work/$svc.perf.data" 2>/dev/null | "$INFERNO/bin/inferno-collapse-perf" >"$work/$svc.folded"
  "$INFERNO/bin/inferno-flamegraph" --minwidth 1 \
    --title "spillway-$svc at saturation ($(date -u +%F), fast broker)" \
    <"$work/$svc.folded" >"benches/profiles/$svc.svg"
  {
    # Samples by thread (librdkafka's are rdk:*, tokio's workers tokio-runtime-w), then self
    # time by function, the top 40 (awk reads everything: no SIGPIPE).
    echo "samples by thread:"
    awk '{ n = $NF; split($0, f, ";"); t[f[1]] += n; all += n }
      END { for (k in t) printf "%7.2f%%  %s\n", 100 * t[k] / all, k }' "$work/$svc.folded" |
      sort -rn
    echo "self time by function:"
    perf report -i "$work/$svc.perf.data" --no-children --sort dso,symbol --stdio -g none \
      --percent-limit 0.3 2>/dev/null | awk '/%/ && n < 40 { sub(/[ -]+$/, ""); print; n++ }'
  } >"benches/profiles/$svc.txt"
  echo "benches/profiles/$svc.svg; top functions (self):"
  head -30 "benches/profiles/$svc.txt"
done
