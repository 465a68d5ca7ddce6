#!/usr/bin/env bash
# Elastic against fixed pools, on traces relative to what this machine serves.
#
# For each engine: measure what one worker of the default shape serves (`tidepool bench capacity`,
# its slots in flight), then play each trace scaled so its peak is `--peak` (1.5) times that, against
# fixed shapes (1 worker x 1/2/4/8 slots, and `--max` workers of the default slots) and the elastic
# pool (1 to `--max` workers), each a fresh `tidepool serve`. Prints a markdown table (p50/p95
# latency and TTFT, errors, memory-time of reserved memory and RSS, CPU-seconds, transitions, the
# shape over time) and, with --write, puts it and a plot of the shapes over time into
# docs/elasticity.md and docs/elasticity-shapes.svg.
#
#   scripts/bench-elastic.sh [--model smollm2-135m-instruct] [--engines llamacpp,mistralrs]
#                            [--traces ramp,bursty,diurnal] [--step-s 20] [--max-tokens 32]
#                            [--slots N] [--max 3] [--peak 1.5] [--repeat 1] [--write]
#                            [--only elastic-1-3,1x1] [--capacity-rps 3.4]
#                            [--results bench/report/elastic.jsonl]
#
# The default shape is each engine's default on the CPU (`ModelConfig::default_slots`: 2 slots on
# llama.cpp, 1 on mistral.rs); --slots sets it for both.
#
# --repeat N plays every shape N times, interleaved (each round runs all shapes once, so a slow
# spell of the machine hits every shape alike), and the table shows each shape's median p95.
#
# --only plays just the shapes named (appending to --results, to rerun one shape beside the
# others' runs) and --capacity-rps skips the measurement, taking the figure an earlier run printed.
#
# Every run's JSON (`bench load --json` with engine, trace and capacity added) is kept in
# --results, which scripts/bench-simulate.sh --real reads.
#
# The policy's windows are compressed with the trace (a 15 s stabilization window), and it scales up
# as a pool whose workers share weights can afford to: after 1 s of demand, and whenever more than
# one request per worker waits (`--up-window-s`, `--queue-per-worker`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/serve-lib.sh

model=smollm2-135m-instruct engines=llamacpp,mistralrs traces=ramp step=20 tokens=32 slots=
max=3 peak=1.5 repeat=1 only= capacity= write=0 results=bench/report/elastic.jsonl window=1 queue=1
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --engines) engines="$2"; shift 2 ;;
    --traces) traces="$2"; shift 2 ;;
    --step-s) step="$2"; shift 2 ;;
    --max-tokens) tokens="$2"; shift 2 ;;
    --slots) slots="$2"; shift 2 ;;
    --max) max="$2"; shift 2 ;;
    --peak) peak="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --only) only=",$2,"; shift 2 ;;
    --capacity-rps) capacity="$2"; shift 2 ;;
    --write) write=1; shift ;;
    --results) results="$2"; shift 2 ;;
    --up-window-s) window="$2"; shift 2 ;;
    --queue-per-worker) queue="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

bench_setup
mkdir -p "$(dirname "$results")"
[ -n "$only" ] || : > "$results"

config() { # file engine slots min max
  # A fixed shape stays fixed: no cap on sequences at once from the measured curve (min_gain 0),
  # and every worker reserves the whole configured context per slot, as a fixed server must
  # (llama-server's -c); the elastic pool sizes its workers' context by what requests need.
  local gain=0.1 min_context=512
  [ "$4" = "$5" ] && gain=0 min_context=4096
  cat > "$1" <<TOML
[model]
engine = "$2"
slots = $3
[pool]
queue_capacity = 1000
queue_deadline_s = 120
context_tokens = 4096
min_context_tokens = $min_context
[policy]
min_workers = $4
max_workers = $5
up = { window_s = $window, queue_per_worker = $queue, min_gain = $gain }
down = { stabilization_s = 15 }
TOML
}

default_slots() { # engine
  if [ -n "$slots" ]; then echo "$slots"; elif [ "$1" = mistralrs ]; then echo 1; else echo 2; fi
}

for engine in ${engines//,/ }; do
  unit=$(default_slots "$engine")
  if [ -n "$capacity" ]; then
    rps=$capacity
  else
    config "$work/cal.toml" "$engine" "$unit" 1 1
    start_server "$bin" "$model" "$work/cal.toml" "$work/cal-$engine"
    cap=$("$bin" bench capacity --url "$server_url" --concurrency "$unit" --seconds 20 \
      --max-tokens "$tokens" --json 2>/dev/null)
    stop_server
    rps=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['requests_per_s'])" "$cap")
  fi
  peak_rps=$(python3 -c "print(round($rps * $peak, 3))")
  echo "$engine: one worker of $unit slots serves $rps req/s; traces peak at $peak_rps req/s" >&2
  for trace in ${traces//,/ }; do
   for run in $(seq 1 "$repeat"); do
    shapes=("1x1 1 1 1" "1x2 2 1 1" "1x4 4 1 1" "1x8 8 1 1" "${max}x$unit $unit $max $max"
            "elastic-1-$max $unit 1 $max")
    for s in "${shapes[@]}"; do
      read -r label sl lo hi <<< "$s"
      if [ -n "$only" ] && [[ "$only" != *",$label,"* ]]; then continue; fi
      config "$work/c.toml" "$engine" "$sl" "$lo" "$hi"
      start_server "$bin" "$model" "$work/c.toml" "$work/s"
      # A pinned pool reaches its size before the trace starts.
      for _ in $(seq 1 120); do
        ready=$(curl -sf "$server_url/admin/status" | python3 -c \
          "import json,sys; print(sum(w['state']=='ready' for w in json.load(sys.stdin)['workers']))")
        [ "$ready" -ge "$lo" ] && break
        sleep 0.5
      done
      echo "$engine $trace $label (run $run of $repeat) ..." >&2
      "$bin" bench load --url "$server_url" --shape "$trace" --peak-rps "$peak_rps" \
        --step-s "$step" --max-tokens "$tokens" --label "$label" --json 2>/dev/null \
        | python3 -c "import json,sys; r=json.load(sys.stdin); r.update(engine=sys.argv[1], trace=sys.argv[2], capacity_rps=float(sys.argv[3]), run=int(sys.argv[4])); print(json.dumps(r))" \
          "$engine" "$trace" "$rps" "$run" >> "$results"
      # The elastic pool's events (every scaling decision and cap, with its reason) beside it
      # (the last run's).
      case "$label" in elastic*)
        curl -sf "$server_url/admin/events" > "${results%.jsonl}-events-$engine-$trace.json" || true ;;
      esac
      stop_server
    done
   done
  done
done

python3 scripts/bench-elastic-report.py "$results" "$write" "$model" "$step" "$tokens" "$peak"
