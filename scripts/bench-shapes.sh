#!/usr/bin/env bash
# Throughput against pool shape: the same saturating load (`tidepool bench load`, one step) against
# `tidepool serve` pinned to W workers of S slots each, for every W x S given. Prints one markdown
# row per shape; completed requests x tokens / step seconds is the throughput.
#
#   scripts/bench-shapes.sh [--model smollm2-135m-instruct] [--workers 1,2,3] [--slots 1,2,4]
#                           [--rate 6] [--step-s 30] [--max-tokens 16]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/serve-lib.sh

model=smollm2-135m-instruct workers=1,2,3 slots=1,2,4 rate=6 step=30 tokens=16
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --slots) slots="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --step-s) step="$2"; shift 2 ;;
    --max-tokens) tokens="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

bench_setup

echo "| workers x slots | requests | ok | tokens/s | latency p50 / p95 | TTFT p50 |"
echo "|---|---|---|---|---|---|"
for w in ${workers//,/ }; do
  for s in ${slots//,/ }; do
    cat > "$work/c.toml" <<TOML
[model]
slots = $s
[pool]
queue_deadline_s = $((step + 30))
queue_capacity = 1000
[policy]
min_workers = $w
max_workers = $w
TOML
    start_server "$bin" "$model" "$work/c.toml" "$work/server"
    # Let the pinned pool reach its size before the load starts.
    sleep 3
    started=$(date +%s.%N)
    "$bin" bench load --url "$server_url" --trace "$rate" --step-s "$step" --max-tokens "$tokens" --json 2>/dev/null > "$work/r.json"
    ended=$(date +%s.%N)
    python3 - "$work/r.json" "$w" "$s" "$tokens" "$started" "$ended" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
w, s, tokens, t0, t1 = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
tps = r["ok"] * tokens / (t1 - t0)
print(f"| {w} x {s} | {r['requests']} | {r['ok']} | {tps:.1f} | {r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f} s | {r['ttft_p50_s']:.2f} s |")
PY
    stop_server
  done
done
