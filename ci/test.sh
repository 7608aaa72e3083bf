#!/usr/bin/env bash
# The one command that runs every Spillway test on a fresh machine of this kind:
# installs what is missing (idempotent, fast when everything is there), then fmt, clippy and
# every test against a real Postgres and a real Kafka-compatible broker (Tansu).
#
#   ci/test.sh            # everything
#   SPILLWAY_SKIP_INSTALL=1 ci/test.sh   # assume the tools are there
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

if [[ "${SPILLWAY_SKIP_INSTALL:-0}" != 1 ]]; then
  ensure_build_tools
  ensure_postgres
  ensure_tansu
fi
export SPILLWAY_TANSU_BIN="${SPILLWAY_TANSU_BIN:-$(tansu_bin)}"

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo test (Tansu: $SPILLWAY_TANSU_BIN)"
cargo test --workspace --locked -- --test-threads="${SPILLWAY_TEST_THREADS:-2}"
