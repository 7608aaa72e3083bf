#!/usr/bin/env bash
# Spillway in containers on this machine, without a registry: deploy/compose.local.yaml.
#
#   ci/deploy.sh build      # the images: spillway-{producer,consumer,loadgen}:local from
#                           # deploy/Dockerfile with binaries built here (target/$PROFILE),
#                           # spillway-tansu:local and spillway-prometheus:local
#   ci/deploy.sh up [N] [P] # the stack on free ports of 127.0.0.1: N = 1 or 3 consumers, P partitions
#   ci/deploy.sh down       # stops it and drops its volumes
#   ci/deploy.sh validate   # `docker compose config` on deploy/compose.yaml and the local variant
#   ci/deploy.sh test       # build, up, loadgen's main scenario (in its container) against the
#                           # containers with the no-loss verdict, health, Prometheus, down
#   ci/deploy.sh sizing     # 3 consumers, 12 partitions: CPU and memory per container under
#                           # steady load; one consumer SIGKILLed under load (Docker restarts
#                           # it); Postgres paused; Kafka paused. Each with the verdict.
#
# SPILLWAY_IMAGE_PROFILE=debug|release (default release) picks the binaries; `build` runs
# `cargo build` for them first (SPILLWAY_IMAGE_CARGO_BUILD=0: the binaries there as they are).
# Needs Docker (ci/lib.sh ensure_docker), compose and buildx.
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
  if [[ "${SPILLWAY_IMAGE_CARGO_BUILD:-1}" == 1 ]]; then
    step "cargo build ${flags[*]} (the binaries the images copy)"
    nice -n 10 cargo build --locked "${flags[@]}" -p spillway-producer -p spillway-consumer \
      -p spillway-loadgen --bins
  fi
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
SPILLWAY_PG_IMAGE=$SPILLWAY_PG_IMAGE
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
    --brokers "127.0.0.1:$SPILLWAY_KAFKA_PORT" --topic events --out /report "$@"
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
  # A number either way, so that a query that failed (empty) cannot pass for "none".
  await_promql 'count(ALERTS{alertstate="firing"}) or vector(0)' 0
  [[ "$(curl -sf "http://127.0.0.1:$SPILLWAY_PROMETHEUS_PORT/api/v1/rules" | grep -o '"name":"Spillway[A-Za-z]*"' | sort -u | wc -l)" -ge 8 ]] ||
    { echo "FAIL: Prometheus did not load the alert rules" >&2; return 1; }
  echo "Prometheus: both targets up, rows counted, rules loaded, no alert firing"
  # Reached only if every check above held (set -e): images, health, verdict, Prometheus.
  echo "deploy: 4 passed, 0 failed"
}

# The kernel's accounting of a compose service's container (cgroup v1, as dockerd sets it up
# here): "CPU_SECONDS MEMORY_MIB PEAK_MEMORY_MIB", or "- - -" once it stopped.
usage() {
  local id d
  id="$(docker inspect -f '{{.Id}}' "$(container "$1")")"
  d="/sys/fs/cgroup/memory/docker/$id"
  if [[ ! -d "$d" ]]; then
    echo "- - -"
    return
  fi
  awk -v c="$(cat "/sys/fs/cgroup/cpuacct/docker/$id/cpuacct.usage")" \
    -v m="$(cat "$d/memory.usage_in_bytes")" -v p="$(cat "$d/memory.max_usage_in_bytes")" \
    'BEGIN { printf "%.2f %.1f %.1f\n", c / 1e9, m / 1048576, p / 1048576 }'
}

SIZED=(producer consumer-1 consumer-2 consumer-3 kafka postgres)

snapshot() {
  local s
  for s in "${SIZED[@]}"; do echo "$s $(usage "$s")"; done
}

# What each container used between two snapshots: CPU seconds, CPU cores on average over
# SECONDS, memory now and at its peak.
report_usage() {
  local before="$1" after="$2" seconds="$3"
  printf '%-11s %10s %9s %11s %9s\n' container cpu_s cores memory_mib peak_mib
  join <(sort <<<"$before") <(sort <<<"$after") | awk -v t="$seconds" '{
    if ($5 == "-" || $2 == "-") { printf "%-11s %10s\n", $1, "(stopped)"; next }
    printf "%-11s %10.2f %9.2f %11.1f %9.1f\n", $1, $5 - $2, ($5 - $2) / t, $6, $7 }'
}

summary() {
  python3 - "$STATE/$1/summary.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
v = d["verdict"]
print(f"requests {sum(d['statuses'].values())} ({d['statuses']}), records acknowledged "
      f"{d['records_acknowledged']}, in {d['elapsed_seconds']:.1f} s; verdict: lost {v['lost']}, "
      f"duplicated {v['duplicated']}, quiet {v['quiet']} after {v['waited_seconds']:.1f} s "
      f"(including the 3 s settle period)")
EOF
}

sizing() {
  local rate="${SPILLWAY_SIZING_RATE:-1000}" seconds="${SPILLWAY_SIZING_SECONDS:-30}"
  trap finish EXIT
  up 3 12
  check_health producer consumer-1 consumer-2 consumer-3
  local t0 a b

  step "1. steady load: constant $rate req/s for ${seconds}s (1-10 records of 150-250 bytes)"
  a="$(snapshot)" t0=$SECONDS
  loadgen steady --rate-profile constant --rate "$rate" --duration "${seconds}s" --seed 7
  b="$(snapshot)"
  report_usage "$a" "$b" $((SECONDS - t0))
  summary steady

  step "2. Postgres paused for ${seconds}s under $rate req/s: the consumers' buffers fill"
  SIZED=(producer consumer-1 consumer-2 consumer-3)
  a="$(snapshot)"
  # Postgres is resumed whatever the measurements do; a failed measurement fails the phase
  # after the resume (not as a verdict that timed out on a paused database).
  (
    sleep 5
    docker pause "$(container postgres)" >/dev/null
    echo "postgres paused"
    sleep "$seconds"
    measured=0
    { promql 'sum(spillway_consumer_buffered_records)' >"$STATE/buffered" &&
      promql 'sum(spillway_consumer_buffered_bytes)' >"$STATE/buffered-bytes" &&
      snapshot >"$STATE/paused"; } || measured=1
    docker unpause "$(container postgres)" >/dev/null
    echo "postgres resumed"
    exit "$measured"
  ) &
  killer=$!
  loadgen outage --rate-profile constant --rate "$rate" --duration "$((seconds + 10))s" --seed 9
  wait "$killer"
  echo "buffered at the end of the pause: $(cat "$STATE/buffered") records, $(cat "$STATE/buffered-bytes") bytes"
  echo "memory before the pause and at its end:"
  join <(sort <<<"$a") <(sort "$STATE/paused") | awk '{ printf "%-11s %8.1f MiB -> %8.1f MiB\n", $1, $3, $6 }'
  summary outage

  step "3. consumer-2's process SIGKILLed ${seconds}s into a $((seconds * 2))s run at $rate req/s; Docker restarts it"
  local victim pid
  victim="$(container consumer-2)"
  pid="$(docker inspect -f '{{.State.Pid}}' "$victim")"
  (sleep "$seconds" && kill -KILL "$pid" && echo "consumer-2 (pid $pid) SIGKILLed at ${seconds}s") &
  local killer=$!
  loadgen kill --rate-profile constant --rate "$rate" --duration "$((seconds * 2))s" --seed 8
  wait "$killer"
  [[ "$(docker inspect -f '{{.RestartCount}}' "$victim")" == 1 ]] ||
    { echo "FAIL: consumer-2 was not killed and restarted" >&2; return 1; }
  await_promql 'sum(spillway_consumer_assigned_partitions)' 12
  echo "group rejoins the consumers asked for: $(promql 'sum(max_over_time(spillway_consumer_rejoins_total[5m]))')"
  summary kill
  echo "consumer-2 was restarted once (pid $pid -> $(docker inspect -f '{{.State.Pid}}' "$victim")); the 3 consumers own the 12 partitions"

  step "4. Kafka paused for 4s under $rate req/s: requests wait in the producer (at most --max-in-flight-requests)"
  SIZED=(producer)
  a="$(snapshot)"
  (sleep 5 && docker pause "$(container kafka)" >/dev/null && echo "kafka paused" && sleep 3.5 &&
    curl -sf "http://127.0.0.1:$SPILLWAY_PRODUCER_PORT/metrics" |
    awk '/^spillway_producer_in_flight_requests / { print $2 }' >"$STATE/in-flight" &&
    snapshot >"$STATE/kafka-paused" && sleep 0.5 && docker unpause "$(container kafka)" >/dev/null &&
    echo "kafka resumed") &
  killer=$!
  loadgen backpressure --rate-profile constant --rate "$rate" --duration 15s --seed 10 \
    --connections 1100
  wait "$killer"
  echo "producer: $(cat "$STATE/in-flight") requests in flight; memory" \
    "$(awk '{ print $3 }' <<<"$a") MiB before -> $(awk '{ print $3 }' "$STATE/kafka-paused") MiB"
  summary backpressure
  echo "sizing: 4 passed, 0 failed"
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
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
