#!/usr/bin/env bash
# Where CPU throughput comes from: two in-process workers sharing candle's one rayon pool, against
# two single-worker processes with a rayon pool of their own (RAYON_NUM_THREADS), against one
# worker. The same saturating load (`tidepool bench load`, one step) in every case, split evenly
# between the two processes. Prints one markdown row per layout.
#
#   scripts/bench-threads.sh [--model smollm2-135m-instruct] [--rate 6] [--step-s 20] [--max-tokens 16]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/serve-lib.sh

model=smollm2-135m-instruct rate=6 step=20 tokens=16
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --step-s) step="$2"; shift 2 ;;
    --max-tokens) tokens="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

bench_setup
cores=$(nproc)

config() { # workers -> config file
  cat > "$work/c$1.toml" <<TOML
[model]
slots = 1
[pool]
queue_deadline_s = $((step + 60))
queue_capacity = 1000
[policy]
min_workers = $1
max_workers = $1
TOML
  echo "$work/c$1.toml"
}

# load URL RATE OUT: one step of the trace at RATE req/s, results as JSON in OUT.
load() {
  "$bin" bench load --url "$1" --trace "$2" --step-s "$step" --max-tokens "$tokens" --json 2>/dev/null > "$3"
}

row() { # label threads-note started ended json...
  python3 - "$tokens" "$@" <<'PY'
import json, sys
tokens, label, note, t0, t1 = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
rs = [json.load(open(p)) for p in sys.argv[6:]]
ok = sum(r["ok"] for r in rs)
n = sum(r["requests"] for r in rs)
p50 = max(r["latency_p50_s"] for r in rs)
p95 = max(r["latency_p95_s"] for r in rs)
print(f"| {label} | {note} | {n} | {ok} | {ok * tokens / (t1 - t0):.1f} | {p50:.2f} / {p95:.2f} s |")
PY
}

echo "| layout | rayon threads | requests | ok | tokens/s | latency p50 / p95 (worst process) |"
echo "|---|---|---|---|---|---|"

# One process, one worker.
start_server "$bin" "$model" "$(config 1)" "$work/a"
sleep 2
t0=$(date +%s.%N); load "$server_url" "$rate" "$work/a.json"; t1=$(date +%s.%N)
row "1 process x 1 worker" "$cores shared" "$t0" "$t1" "$work/a.json"
stop_server

# One process, two workers on the one global rayon pool.
start_server "$bin" "$model" "$(config 2)" "$work/b"
sleep 3
t0=$(date +%s.%N); load "$server_url" "$rate" "$work/b.json"; t1=$(date +%s.%N)
row "1 process x 2 workers" "$cores shared" "$t0" "$t1" "$work/b.json"
stop_server

# Two processes, one worker each, each with its own rayon pool of cores/2 threads.
per=$(( cores / 2 > 0 ? cores / 2 : 1 ))
half=$(python3 -c "print($rate / 2)")
RAYON_NUM_THREADS=$per start_server "$bin" "$model" "$(config 1)" "$work/c1"
pid1=$server_pid url1=$server_url
RAYON_NUM_THREADS=$per start_server "$bin" "$model" "$(config 1)" "$work/c2"
pid2=$server_pid url2=$server_url
sleep 2
t0=$(date +%s.%N)
load "$url1" "$half" "$work/c1.json" & l1=$!
load "$url2" "$half" "$work/c2.json" & l2=$!
wait "$l1" "$l2"
t1=$(date +%s.%N)
row "2 processes x 1 worker" "$per each" "$t0" "$t1" "$work/c1.json" "$work/c2.json"
kill -INT "$pid1" "$pid2"; wait "$pid1" "$pid2" || true
