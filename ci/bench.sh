#!/usr/bin/env bash
# A quick benchmark pass compared with a saved criterion baseline; fails when any benchmark is
# slower than the baseline by more than BENCH_MARGIN (default 0.15 = 15%), printing the table.
#
#   ci/bench.sh --save          # record the baseline (run on main)
#   ci/bench.sh                 # compare the working tree with it
#   BENCHES="core postgres" ci/bench.sh    # which bench targets (default: core)
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

BASELINE="${BENCH_BASELINE:-main}"
MARGIN="${BENCH_MARGIN:-0.15}"
BENCHES="${BENCHES:-core}"
QUICK=(--warm-up-time 1 --measurement-time 3)
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

if [[ "${1:-}" == "--save" ]]; then
  for b in $BENCHES; do
    step "cargo bench --bench $b (saving baseline $BASELINE)"
    cargo bench -p spillway-benches --bench "$b" -- "${QUICK[@]}" --save-baseline "$BASELINE"
  done
  exit 0
fi

if ! find "$TARGET_DIR/criterion" -type d -name "$BASELINE" 2>/dev/null | grep -q .; then
  echo "no saved baseline '$BASELINE' under $TARGET_DIR/criterion: run 'ci/bench.sh --save' on the reference commit first" >&2
  exit 2
fi
started=$(date +%s)
for b in $BENCHES; do
  step "cargo bench --bench $b (against baseline $BASELINE)"
  cargo bench -p spillway-benches --bench "$b" -- "${QUICK[@]}" --baseline "$BASELINE"
done

# criterion writes change/estimates.json for each benchmark compared: the relative change in
# mean time (+0.20 = 20% slower).
python3 - "$TARGET_DIR/criterion" "$MARGIN" "$started" <<'PY'
import json, os, sys
root, margin, started = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rows, failed = [], False
for dirpath, _, files in os.walk(root):
    if dirpath.endswith("/change") and "estimates.json" in files:
        path = os.path.join(dirpath, "estimates.json")
        if os.path.getmtime(path) < started:
            continue
        name = os.path.relpath(os.path.dirname(dirpath), root)
        change = json.load(open(path))["mean"]["point_estimate"]
        bad = change > margin
        failed |= bad
        rows.append((name, change, bad))
print(f"\n{'benchmark':<55}{'time change':>12}  verdict (margin {margin:+.0%})")
for name, change, bad in sorted(rows):
    print(f"{name:<55}{change:>+12.1%}  {'REGRESSION' if bad else 'ok'}")
if not rows:
    print("no comparisons were made"); sys.exit(2)
sys.exit(1 if failed else 0)
PY
