#!/usr/bin/env bash
# The fixed-1 / fixed-max / elastic table: the same rate trace (`tidepool bench load`, default ramp
# 3,12,25,8,2 req/s) against `tidepool serve` pinned to 1 worker, pinned to the maximum, and
# autoscaling between them. Prints one markdown row per configuration.
#
#   scripts/bench-elastic.sh [--model smollm2-135m-instruct] [--max 3] [--step-s 20]
#                            [--rate-scale 0.15] [--max-tokens 16] [--slots 2]
#
# Defaults fit a 2-core CPU: the ramp is scaled to 0.45 … 3.75 req/s and compressed to 20 s steps,
# so the elastic policy uses a 3 s up window and a 15 s stabilization window instead of 300 s.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/serve-lib.sh

model=smollm2-135m-instruct max=3 step=20 scale=0.15 tokens=16 slots=2
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --max) max="$2"; shift 2 ;;
    --step-s) step="$2"; shift 2 ;;
    --rate-scale) scale="$2"; shift 2 ;;
    --max-tokens) tokens="$2"; shift 2 ;;
    --slots) slots="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

bin="${CARGO_TARGET_DIR:-target}/debug/tidepool"
cargo build -q --workspace --bins  # one feature set with the tests: nothing rebuilt
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
# Requests/s one worker is sized for, in the scaled trace.
per_worker=$(python3 -c "print(round(8 * $scale, 3))")

run() { # label min max
  cat > "$work/$1.toml" <<TOML
[model]
slots = $slots
[policy]
min_workers = $2
max_workers = $3
up = { rate_per_worker = $per_worker, window_s = 3 }
down = { stabilization_s = 15 }
TOML
  start_server "$bin" "$model" "$work/$1.toml" "$work/$1"
  # Let a pinned pool reach its size before the trace starts.
  sleep 5
  "$bin" bench load --url "$server_url" --step-s "$step" --rate-scale "$scale" --max-tokens "$tokens" --label "$1" 2>/dev/null
  stop_server
}

echo "| pool | requests | 429 | errors | latency p50 / p95 / max | TTFT p50 / p95 | avg reserved | avg RSS | ready workers over time (count x seconds) |"
echo "|---|---|---|---|---|---|---|---|---|"
run "fixed-1" 1 1
run "fixed-$max" "$max" "$max"
run "elastic 1-$max" 1 "$max"
