#!/usr/bin/env bash
# The one command that runs every Spillway test on a fresh machine of this kind:
# installs what is missing (idempotent, fast when everything is there), then fmt, clippy and
# every test against a real Postgres and a real Kafka-compatible broker (Tansu).
#
#   ci/test.sh            # everything
#   SPILLWAY_SKIP_INSTALL=1 ci/test.sh   # assume the tools are there
#   SPILLWAY_DOCKER=0 ci/test.sh         # skip the docker backend pass and the container deployment
#
# After the whole workspace on the native backend (Postgres from the machine's server binaries),
# the chaos suite's mutation runs show that it can fail (each known bug switched on in a debug
# build of the services, and caught), then the harness and the chaos suite run again on the
# docker backend (Postgres in a container, through testcontainers; SPILLWAY_DOCKER_PG_IMAGE
# picks the image). Last, ci/deploy.sh builds the images from the debug binaries and runs
# loadgen's main scenario against the services in containers (deploy/compose.local.yaml), with
# the verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh
# A failing test's own message must stay readable in a CI log: panics keep their backtraces
# (RUST_BACKTRACE, if the CI sets it), errors returned by tests (anyhow) do not capture one.
export RUST_LIB_BACKTRACE=0

if [[ "${SPILLWAY_SKIP_INSTALL:-0}" != 1 ]]; then
  ensure_build_tools
  ensure_postgres
  ensure_tansu
  ensure_prometheus
  if [[ "${SPILLWAY_DOCKER:-1}" == 1 ]]; then
    ensure_docker
    ensure_pg_image
    ensure_compose
    ensure_debian_image
  fi
fi
export SPILLWAY_TANSU_BIN="${SPILLWAY_TANSU_BIN:-$(tansu_bin)}"

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo clippy --features mutations (the services' known bugs, for the mutation runs)"
cargo clippy --locked -p spillway-integration --all-targets --features mutations -- -D warnings
step "promtool: the alert rules and their unit tests"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml
step "cargo test (Tansu: $SPILLWAY_TANSU_BIN)"
cargo test --workspace --locked -- --test-threads="${SPILLWAY_TEST_THREADS:-2}"
step "cargo test --features mutations --test chaos_mutations (every known bug is caught)"
cargo test --locked -p spillway-integration --features mutations --test chaos_mutations \
  -- --test-threads="${SPILLWAY_TEST_THREADS:-2}"
if [[ "${SPILLWAY_DOCKER:-1}" == 1 ]]; then
  step "cargo test --test harness --test chaos on the docker backend ($SPILLWAY_PG_IMAGE)"
  SPILLWAY_TEST_BACKEND=docker cargo test --locked -p spillway-harness --test harness \
    -p spillway-integration --test chaos -- --test-threads="${SPILLWAY_TEST_THREADS:-2}"
  step "deploy: compose files, images, the main scenario with both services in containers"
  ci/deploy.sh validate
  SPILLWAY_IMAGE_PROFILE=debug ci/deploy.sh test
fi
