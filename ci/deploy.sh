#!/usr/bin/env bash
# Spillway in containers on this machine, without a registry: deploy/compose.local.yaml.
#
#   ci/deploy.sh build      # the images: spillway-{producer,consumer,loadgen}:local from
#                           # deploy/Dockerfile with binaries built here (target/$PROFILE),
#                           # spillway-tansu:local and spillway-prometheus:local
#   ci/deploy.sh up [N]     # the stack on free ports of 127.0.0.1, N = 1 or 3 consumers
#   ci/deploy.sh down       # stops it and drops its volumes
#   ci/deploy.sh validate   # `docker compose config` on deploy/compose.yaml and the local variant
#   ci/deploy.sh test       # build, up, loadgen's main scenario (in its container) against the
#                           # containers with the no-loss verdict, health, Prometheus, down
#   ci/deploy.sh sizing     # 3 consumers, 12 partitions, one consumer SIGKILLed under load;
#                           # verdict, throughput and CPU seconds per container (README: Sizing)
#
# SPILLWAY_IMAGE_PROFILE=debug|release (default release) picks the binaries; `build` runs
# `cargo build` for them first. Needs Docker (ci/lib.sh ensure_docker), compose and buildx.
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

PROFILE="${SPILLWAY_IMAGE_PROFILE:-release}"
STATE="${SPILLWAY_DEPLOY_STATE:-$PWD/target/spillway-deploy}"
COMPOSE=(docker compose -f deploy/compose.local.yaml --env-file "$STATE/env")

build() {
  ensure_debian_image
  ensure_pg_image
  local flags=()
  [[ "$PROFILE" == release ]] && flags+=(--release)
  step "cargo build ${flags[*]} (the binaries the images copy)"
  nice -n 10 cargo build --locked "${flags[@]}" -p spillway-producer -p spillway-consumer \
    -p spillway-loadgen --bins
  local stage=target/spillway-image
  rm -rf "$stage" && mkdir -p "$stage"
  local b
  for b in spillway-producer spillway-consumer spillway-healthcheck loadgen; do
    # Stripped copies: a debug binary is 100-250 MB with its symbols.
    strip -o "$stage/$b" "target/$PROFILE/$b"
  done
  local t
  for t in producer consumer loadgen; do
    step "docker buildx build --target $t -t spillway-$t:local (binaries from target/$PROFILE)"
    docker buildx build -q --load --network none -f deploy/Dockerfile --target "$t" -t "spillway-$t:local" \
      --build-arg BINARIES=host --build-arg "RUNTIME_IMAGE=$SPILLWAY_DEBIAN_IMAGE" . >/dev/null
  done
  local ctx
  ctx="$(mktemp -d)"
  cp "$(tansu_bin)" "$ctx/tansu"
  cp "$(command -v prometheus)" "$ctx/prometheus"
  for t in tansu prometheus; do
    step "docker buildx build --target $t -t spillway-$t:local"
    docker buildx build -q --load --network none -f deploy/local.Dockerfile --target "$t" -t "spillway-$t:local" \
      --build-arg "BASE=$SPILLWAY_DEBIAN_IMAGE" "$ctx" >/dev/null
  done
  rm -rf "$ctx"
}

free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Writes $STATE/env (ports, partitions) and $STATE/prometheus.yml (the scrape targets).
configure() {
  local consumers="$1" partitions="$2"
  mkdir -p "$STATE"
  local p
  read -r -a p <<<"$(free_ports 7)"
  cat >"$STATE/env" <<EOF
SPILLWAY_KAFKA_PORT=${p[0]}
SPILLWAY_PG_PORT=${p[1]}
SPILLWAY_PRODUCER_PORT=${p[2]}
SPILLWAY_CONSUMER_PORT_1=${p[3]}
SPILLWAY_CONSUMER_PORT_2=${p[4]}
SPILLWAY_CONSUMER_PORT_3=${p[5]}
SPILLWAY_PROMETHEUS_PORT=${p[6]}
SPILLWAY_PARTITIONS=$partitions
SPILLWAY_CONSUMERS=$consumers
SPILLWAY_DEPLOY_STATE=$STATE
EOF
  local targets="'127.0.0.1:${p[3]}'"
  ((consumers == 3)) && targets+=", '127.0.0.1:${p[4]}', '127.0.0.1:${p[5]}'"
  cat >"$STATE/prometheus.yml" <<EOF
global:
  scrape_interval: 2s
  evaluation_interval: 2s
rule_files: [/etc/prometheus/alerts.yml]
scrape_configs:
  - job_name: spillway-producer
    static_configs: [{targets: ['127.0.0.1:${p[2]}']}]
  - job_name: spillway-consumer
    static_configs: [{targets: [$targets]}]
EOF
}

load_env() {
  # shellcheck disable=SC1091
  set -a && . "$STATE/env" && set +a
}

up() {
  local consumers="${1:-1}" partitions="${2:-3}"
  [[ "$consumers" == 1 || "$consumers" == 3 ]] || { echo "up: 1 or 3 consumers" >&2; exit 2; }
  configure "$consumers" "$partitions"
  load_env
  local profile=()
  ((consumers == 3)) && profile=(--profile scale)
  step "docker compose -f deploy/compose.local.yaml up ($consumers consumer(s), $partitions partitions)"
  "${COMPOSE[@]}" "${profile[@]}" up -d --wait --wait-timeout 180
  cat <<EOF
ingest:     http://127.0.0.1:$SPILLWAY_PRODUCER_PORT/store
Postgres:   postgres://postgres@127.0.0.1:$SPILLWAY_PG_PORT/postgres (table records)
Prometheus: http://127.0.0.1:$SPILLWAY_PROMETHEUS_PORT (alerts: /alerts)
EOF
}

# The EXIT trap of `test` and `sizing`: the containers' logs after a failure, then down.
finish() {
  local status=$?
  if ((status != 0)) && [[ -f "$STATE/env" ]]; then
    "${COMPOSE[@]}" --profile scale logs --no-color --tail 30 >&2 || true
  fi
  down
  return "$status"
}

down() {
  [[ -f "$STATE/env" ]] || return 0
  step "docker compose -f deploy/compose.local.yaml down -v"
  "${COMPOSE[@]}" --profile scale down -v --timeout 40 >/dev/null 2>&1 || true
}

# Runs the loadgen image against the stack, with the verdict; its report lands in $STATE/$1.
loadgen() {
  local out="$1"
  shift
  mkdir -p "$STATE/$out" && chmod 777 "$STATE/$out"
  docker run --rm --network host -v "$STATE/$out:/report" spillway-loadgen:local \
    --target "http://127.0.0.1:$SPILLWAY_PRODUCER_PORT/store" \
    --verify "postgres://postgres@127.0.0.1:$SPILLWAY_PG_PORT/postgres" --table records \
    --out /report "$@"
}

# Prints the value of a PromQL query's first sample, or nothing.
promql() {
  curl -sf "http://127.0.0.1:$SPILLWAY_PROMETHEUS_PORT/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}

# Waits (60 s at most) until a PromQL query's value is $2.
await_promql() {
  local deadline=$((SECONDS + 60)) v=""
  while ((SECONDS < deadline)); do
    v="$(promql "$1" || true)"
    [[ "$v" == "$2" ]] && return 0
    sleep 1
  done
  echo "FAIL: Prometheus: $1 = '$v', expected $2" >&2
  return 1
}

container() { "${COMPOSE[@]}" ps -q "$1"; }

check_images() {
  local t user
  for t in producer consumer loadgen; do
    user="$(docker image inspect -f '{{.Config.User}}' "spillway-$t:local")"
    [[ "$user" == 65532:65532 ]] || { echo "FAIL: spillway-$t:local runs as '$user'" >&2; return 1; }
    if docker run --rm --entrypoint /bin/sh "spillway-$t:local" -c true >/dev/null 2>&1; then
      echo "FAIL: spillway-$t:local has a shell" >&2
      return 1
    fi
  done
  echo "images: non-root (65532), no shell"
}

check_health() {
  local s h
  for s in "$@"; do
    h="$(docker inspect -f '{{.State.Health.Status}}' "$(container "$s")")"
    [[ "$h" == healthy ]] || { echo "FAIL: $s is $h" >&2; return 1; }
  done
  echo "HEALTHCHECK: $* healthy"
}

test_scenario() {
  SPILLWAY_IMAGE_PROFILE="$PROFILE" build
  check_images
  trap finish EXIT
  up 1 3
  check_health producer consumer-1
  step "loadgen (container): the main scenario through the containers, with the verdict"
  loadgen main --rate-profile spiky --seed 42
  step "Prometheus scraped both services and loaded the rules"
  await_promql 'sum(up{job=~"spillway-(producer|consumer)"})' 2
  await_promql 'count(spillway_consumer_rows_written_total > 0)' 1
  await_promql 'count(count by (alertname) (ALERTS))' ""
  [[ "$(curl -sf "http://127.0.0.1:$SPILLWAY_PROMETHEUS_PORT/api/v1/rules" | grep -o '"name":"Spillway[A-Za-z]*"' | sort -u | wc -l)" -ge 8 ]] ||
    { echo "FAIL: Prometheus did not load the alert rules" >&2; return 1; }
  echo "Prometheus: both targets up, rows counted, rules loaded, no alert firing"
  # Reached only if every check above held (set -e): images, health, verdict, Prometheus.
  echo "deploy: 4 passed, 0 failed"
}

# Kernel CPU and memory accounting of one container (cgroup v1 or v2): "cpu_seconds peak_mib".
usage() {
  local id cg
  id="$(docker inspect -f '{{.Id}}' "$1")"
  if [[ "$(docker inspect -f '{{.State.Running}}' "$1")" != true ]]; then
    echo "(stopped: its accounting is gone)"
  elif [[ -d /sys/fs/cgroup/cpu,cpuacct/docker/$id ]]; then
    awk -v n="$(cat "/sys/fs/cgroup/cpu,cpuacct/docker/$id/cpuacct.usage")" \
      -v m="$(cat "/sys/fs/cgroup/memory/docker/$id/memory.max_usage_in_bytes")" \
      'BEGIN { printf "%.2f %.1f\n", n / 1e9, m / 1048576 }'
  else
    cg="$(find /sys/fs/cgroup -maxdepth 3 -type d -name "*$id*" | head -1)"
    awk -v m="$(cat "$cg/memory.peak" 2>/dev/null || echo 0)" \
      '/^usage_usec/ { printf "%.2f %.1f\n", $2 / 1e6, m / 1048576 }' "$cg/cpu.stat"
  fi
}

sizing() {
  local rate="${SPILLWAY_SIZING_RATE:-300}" duration="${SPILLWAY_SIZING_DURATION:-60s}"
  local kill_after="${SPILLWAY_SIZING_KILL_AFTER:-20}"
  trap finish EXIT
  up 3 12
  check_health producer consumer-1 consumer-2 consumer-3
  local victim
  victim="$(container consumer-2)"
  step "loadgen: constant $rate req/s for $duration; consumer-2 SIGKILLed after ${kill_after}s"
  (sleep "$kill_after" && docker kill -s KILL "$victim" >/dev/null &&
    echo "consumer-2 SIGKILLed at ${kill_after}s") &
  local killer=$!
  loadgen sizing --rate-profile constant --rate "$rate" --duration "$duration" --seed 7
  wait "$killer"
  [[ "$(docker inspect -f '{{.State.ExitCode}}' "$victim")" == 137 ]] ||
    { echo "FAIL: consumer-2 was not SIGKILLed" >&2; return 1; }
  await_promql 'sum(spillway_consumer_assigned_partitions)' 12
  step "CPU seconds and peak memory per container (cgroup accounting)"
  local s
  for s in producer consumer-1 consumer-2 consumer-3 kafka postgres; do
    printf '%-11s %s\n' "$s" "$(usage "$(container "$s")")"
  done
  printf 'rows written per consumer: '
  for s in 1 2 3; do
    local port="SPILLWAY_CONSUMER_PORT_$s"
    printf '%s ' "$(promql "max_over_time(spillway_consumer_rows_written_total{instance=\"127.0.0.1:${!port}\"}[10m])")"
  done
  echo
  echo "requests answered: $(promql 'sum(spillway_producer_requests_total)'), records accepted: $(promql 'sum(spillway_producer_records_accepted_total)')"
}

validate() {
  step "docker compose config: deploy/compose.yaml, deploy/compose.local.yaml"
  docker compose -f deploy/compose.yaml config -q
  # The local variant needs its ports; any will do for the check.
  env SPILLWAY_KAFKA_PORT=1 SPILLWAY_PG_PORT=2 SPILLWAY_PRODUCER_PORT=3 SPILLWAY_CONSUMER_PORT_1=4 \
    SPILLWAY_PROMETHEUS_PORT=5 SPILLWAY_DEPLOY_STATE="$STATE" \
    docker compose -f deploy/compose.local.yaml --profile scale config -q
  echo "both compose files are valid"
}

case "${1:-}" in
  build) build ;;
  validate) validate ;;
  up) up "${2:-1}" "${3:-3}" ;;
  down) down ;;
  test) test_scenario ;;
  sizing) sizing ;;
  *)
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac
