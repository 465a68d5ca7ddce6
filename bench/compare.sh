#!/usr/bin/env bash
# Side-by-side benchmark: Tidepool vs llama.cpp's server (llama-cpp-python[server]) vs mistral.rs's
# own server (mistralrs-cli `serve`), on the same GGUF files, context size, thread count and
# workload (`tidepool bench compare`: single-stream TTFT and decode speed, then a concurrency
# sweep). Then the elastic rate ramp against Tidepool alone, a memory-bandwidth probe if the binary
# has one, and the report (bench/report.py -> bench/report/).
#
#   bench/compare.sh [--models smollm2-q8_0,qwen05b-q4_0,...] [--servers tidepool,llamacpp,mistralrs]
#                    [--quick] [--no-install] [--no-ramp] [--threads N] [--ctx N]
#                    [--runs N] [--max-tokens N] [--concurrency 1,2,4,8,16]
#                    [--requests-per-client K] [--sweep-max-tokens N] [--tidepool-args "..."]
#                    [--out DIR]
#
# Servers: tidepool, llamacpp, mistralrs, and tidepool:X (Tidepool with `--engine X`, labelled
# tidepool-X), all composable in --servers. --tidepool-args is passed to every `tidepool serve`.
# Models: smollm2-q8_0, smollm2-q4_0 (real SmolLM2-135M-Instruct weights), qwen05b-q4_0,
# qwen05b-q8_0, qwen05b-q4_k_m (Qwen2.5-0.5B-shaped random-weight fixtures, made if missing), or
# a path to any .gguf file.
# Peers are installed by bench/install-peers.sh into $TIDEPOOL_PEERS (default
# ~/.cache/tidepool-bench), never into the repository; a peer that is missing is skipped loudly.
# Raw results and server logs: bench/results/<timestamp>/ (gitignored); report: bench/report/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

models="smollm2-q8_0,smollm2-q4_0,qwen05b-q4_0,qwen05b-q8_0,qwen05b-q4_k_m"
servers="tidepool,llamacpp,mistralrs"
quick=0 install=1 ramp=1
threads=$(nproc) ctx=4096
runs="" max_tokens="" concurrency="" per_client="" sweep_max_tokens=""
tidepool_args=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models="$2"; shift 2 ;;
    --servers) servers="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    --no-install) install=0; shift ;;
    --no-ramp) ramp=0; shift ;;
    --threads) threads="$2"; shift 2 ;;
    --ctx) ctx="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --max-tokens) max_tokens="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --requests-per-client) per_client="$2"; shift 2 ;;
    --sweep-max-tokens) sweep_max_tokens="$2"; shift 2 ;;
    --tidepool-args) tidepool_args="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$quick" = 1 ]; then
  : "${runs:=1}" "${max_tokens:=32}" "${concurrency:=1,2,4}" "${per_client:=1}"
  ramp_trace="3,12,3" ramp_step=8
else
  : "${runs:=3}" "${max_tokens:=128}" "${concurrency:=1,2,4,8,16}" "${per_client:=2}"
  ramp_trace="3,12,25,8,2" ramp_step=20
fi

peers="${TIDEPOOL_PEERS:-$HOME/.cache/tidepool-bench}"
home="${TIDEPOOL_HOME:-$HOME/.cache/tidepool}"
fixtures="${TIDEPOOL_FIXTURES:-/work/fx}"
[ -d "$fixtures" ] || fixtures="$home/fixtures"
out="${out:-bench/results/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
results="$out/compare.jsonl"
note() { echo "==> $*" >&2; }
loud() { echo "!!! $*" >&2; echo "$*" >> "$out/notes.txt"; }

# (a) peers
if [ "$install" = 1 ]; then
  for p in llamacpp mistralrs; do
    case ",$servers," in *",$p,"*) ;; *) continue ;; esac
    bench/install-peers.sh "$p" || loud "installing $p failed: it will be skipped"
  done
fi

# (b) Tidepool (the dev build: dependencies are compiled at opt-level 3 even there)
note "building tidepool"
cargo build -q --workspace --bins  # one feature set with the tests: nothing rebuilt
bin="${CARGO_TARGET_DIR:-$root/target}/debug/tidepool"

model_path() { # label -> path (made if it is a missing fixture)
  case "$1" in
    *.gguf) echo "$1" ;;
    smollm2-q8_0) echo "$home/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q8_0.gguf" ;;
    smollm2-q4_0) echo "$home/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_0.gguf" ;;
    qwen05b-*)
      local q=${1#qwen05b-} f="$fixtures/$1.gguf"
      if [ ! -e "$f" ]; then
        mkdir -p "$fixtures"
        "$bin" fixture --size qwen2.5-0.5b --quant "$q" --out "$f" >&2
      fi
      echo "$f" ;;
    *) echo "unknown model label: $1" >&2; return 1 ;;
  esac
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Build flags and versions, once per server kind.
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)
llama_info="" mistralrs_version=""
if [ -x "$peers/venv/bin/python" ]; then
  llama_info=$("$peers/venv/bin/python" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "|", llama_cpp.llama_print_system_info().decode().strip())' 2> /dev/null || true)
fi
if [ -x "$peers/mistralrs/bin/mistralrs" ]; then
  mistralrs_version=$("$peers/mistralrs/bin/mistralrs" --version 2> /dev/null || true)
fi
python3 - "$out/meta.json" << PY
import json, sys
json.dump({
  "cpu": """$cpu_model""", "cores": $(nproc), "threads": $threads, "ctx": $ctx,
  "git_commit": "$(git rev-parse --short HEAD)", "git_dirty": $( [ -z "$(git status --porcelain)" ] && echo False || echo True ),
  "quick": bool($quick), "runs": $runs, "max_tokens": $max_tokens,
  "concurrency": "$concurrency", "requests_per_client": $per_client, "sweep_max_tokens": ${sweep_max_tokens:-$max_tokens},
  "builds": {
    "tidepool": "$("$bin" --version) (dev profile, dependencies at opt-level 3; -C target-cpu=x86-64-v3: AVX2/FMA/F16C; its llama.cpp engine: llama-cpp-2 $(awk '/^name = "llama-cpp-2"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock), llama.cpp compiled with -march=x86-64-v3, no AVX-512)",
    "llamacpp": """$llama_info (GGML_NATIVE=ON: this machine's vector units)""",
    "mistralrs": "$mistralrs_version (cargo install --locked, release; -C target-cpu=x86-64-v3)",
  },
}, open(sys.argv[1], "w"), indent=1)
PY

server_pid="" tidepool_config=""
stop() {
  [ -n "$server_pid" ] || return 0
  kill -INT "$server_pid" 2> /dev/null || true
  for _ in $(seq 1 40); do kill -0 "$server_pid" 2> /dev/null || break; sleep 0.25; done
  kill -TERM "$server_pid" 2> /dev/null || true
  wait "$server_pid" 2> /dev/null || true
  server_pid=""
}
trap stop EXIT

# start SERVER_LABEL MODEL_PATH LOG -> sets server_pid, server_url; 1 if it never became ready
start() {
  local label="$1" file="$2" log="$3" port health
  port=$(free_port)
  server_url="http://127.0.0.1:$port"
  case "$label" in
    tidepool|tidepool-*)
      # The answer cache off: a benchmark's repeated requests must reach the engine.
      [ -n "$tidepool_config" ] \
        || printf '[pool]\ncontext_tokens = %s\n[cache]\nenabled = false\n' "$ctx" > "$out/tidepool.toml"
      local engine=()
      [ "$label" = tidepool ] || engine=(--engine "${label#tidepool-}")
      # shellcheck disable=SC2086 # --tidepool-args is split on purpose
      RAYON_NUM_THREADS=$threads "$bin" serve --model "$file" --host 127.0.0.1 --port "$port" \
        --cpu --config "${tidepool_config:-$out/tidepool.toml}" "${engine[@]}" $tidepool_args > "$log" 2>&1 &
      health=/health ;;
    llamacpp)
      # No --chat_format: it then uses the GGUF's own chat template, as the other two do.
      # --interrupt_requests False: by default a new request cuts off the one streaming.
      "$peers/venv/bin/python" -m llama_cpp.server --model "$file" --host 127.0.0.1 \
        --port "$port" --n_ctx "$ctx" --n_threads "$threads" --n_threads_batch "$threads" \
        --interrupt_requests False > "$log" 2>&1 &
      health=/v1/models ;;
    mistralrs)
      RAYON_NUM_THREADS=$threads "$peers/mistralrs/bin/mistralrs" --token-source none serve \
        --cpu --host 127.0.0.1 -p "$port" --max-seq-len "$ctx" \
        --format gguf -m "$(dirname "$file")" -f "$(basename "$file")" > "$log" 2>&1 &
      health=/v1/models ;;
  esac
  server_pid=$!
  for _ in $(seq 1 1200); do
    if curl -sf "$server_url$health" > /dev/null 2>&1; then return 0; fi
    if ! kill -0 "$server_pid" 2> /dev/null; then
      wait "$server_pid" 2> /dev/null || true
      server_pid=""
      loud "$label exited before it was ready; the tail of $log:"
      tail -20 "$log" >&2
      return 1
    fi
    sleep 0.5
  done
  loud "$label was not ready in 600 s; the tail of $log:"
  tail -20 "$log" >&2
  stop
  return 1
}

available() { # server label -> 0 if its binary is installed
  case "$1" in
    tidepool|tidepool-*) return 0 ;;
    llamacpp) "$peers/venv/bin/python" -c 'import llama_cpp.server' 2> /dev/null ;;
    mistralrs) [ -x "$peers/mistralrs/bin/mistralrs" ] ;;
    *) return 1 ;;
  esac
}

tidepool_failed=0
# (c) every model x server
IFS=, read -r -a model_list <<< "$models"
IFS=, read -r -a server_list <<< "$servers"
for m in "${model_list[@]}"; do
  file=$(model_path "$m")
  if [ ! -e "$file" ]; then loud "model $m: $file is missing; skipped"; continue; fi
  for s in "${server_list[@]}"; do
    label=${s/:/-}
    if ! available "$label"; then
      loud "SKIPPING $label: not installed (bench/install-peers.sh ${label}); results have no $label rows"
      continue
    fi
    log="$out/$label.$m.log"
    note "$label on $m ($file)"
    if ! start "$label" "$file" "$log"; then
      case "$label" in tidepool*) tidepool_failed=1 ;; esac
      continue
    fi
    if ! "$bin" bench compare --url "$server_url" --label "$label" --model-label "$m" \
      --gguf "$file" --runs "$runs" --max-tokens "$max_tokens" --concurrency "$concurrency" \
      --requests-per-client "$per_client" ${sweep_max_tokens:+--sweep-max-tokens "$sweep_max_tokens"} \
      --json-out "$results" | tee -a "$out/compare.md"; then
      loud "bench compare failed for $label on $m; the tail of $log:"
      tail -20 "$log" >&2
      case "$label" in tidepool*) tidepool_failed=1 ;; esac
    fi
    # Peak resident memory of the server process (its children are not counted).
    hwm=$(awk '/VmHWM/ { print $2 * 1024 }' "/proc/$server_pid/status" 2> /dev/null || echo 0)
    printf '{"server": "%s", "model": "%s", "workload": "server-peak-rss", "peak_rss_bytes": %s}\n' \
      "$label" "$m" "${hwm:-0}" >> "$results"
    stop
  done
done

# (d) the elastic rate ramp, Tidepool only, on the first model: scripts/bench-elastic.sh's ramp
# and policy, scaled to a 2-core CPU (rates x0.15; a worker is sized for 8 x 0.15 req/s).
ramp_scale=${TIDEPOOL_RAMP_SCALE:-0.15}
if [ "$ramp" = 1 ]; then
  m=${model_list[0]}
  file=$(model_path "$m")
  note "rate ramp ($ramp_trace req/s, ${ramp_step} s steps) against tidepool on $m"
  cat > "$out/tidepool-ramp.toml" << TOML
[pool]
context_tokens = $ctx
[cache]
enabled = false
[policy]
min_workers = 1
max_workers = 3
up = { rate_per_worker = $(python3 -c "print(round(8 * $ramp_scale, 3))"), window_s = 3 }
down = { stabilization_s = 15 }
TOML
  tidepool_config="$out/tidepool-ramp.toml"
  if start tidepool "$file" "$out/tidepool-ramp.$m.log"; then
    "$bin" bench load --url "$server_url" --trace "$ramp_trace" --step-s "$ramp_step" \
      --rate-scale "$ramp_scale" \
      --max-tokens 16 --label "tidepool-elastic" --json --timeline-out "$out/ramp-timeline.jsonl" \
      > "$out/ramp.json" || loud "bench load failed; see $out/tidepool-ramp.$m.log"
    stop
  fi
fi

# (e) memory bandwidth, if this tidepool has the probe
if "$bin" bench --help 2> /dev/null | grep -q '^ *bandwidth'; then
  note "memory bandwidth"
  bw_args=(); [ "$quick" = 1 ] && bw_args=(--reps 3)
  "$bin" bench bandwidth --json "${bw_args[@]}" > "$out/bandwidth.json" || loud "bench bandwidth failed"
else
  loud "this tidepool has no 'bench bandwidth': the report has no bandwidth ceiling"
fi

# (f) the report
note "report"
bench/report.sh "$out"
[ -s "$out/notes.txt" ] && { echo "Notes:" >&2; cat "$out/notes.txt" >&2; }
exit "$tidepool_failed"
