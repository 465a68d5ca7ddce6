#!/usr/bin/env bash
# The CPU table of docs/performance.md: `tidepool bench engine` on SmolLM2 (Q4_1 as shipped, requantized Q4_0
# and Q8_0) and on Qwen2.5-0.5B-shaped fixtures (q4_0, q8_0, q4_k_m), built with and without the
# vector target features. Prints one markdown row per (build, model).
#
#   scripts/bench-cpu.sh [--runs 3] [--max-tokens 64]
#
# The build without vector features goes to its own target directory (a full second build of the
# dependencies, ~15 minutes on 2 cores, once).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3
max_tokens=64
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --max-tokens) max_tokens="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

target="${CARGO_TARGET_DIR:-target}"
plain_target="${TIDEPOOL_PLAIN_TARGET:-$PWD/target-plain}"
echo "==> building (x86-64-v3 from .cargo/config.toml, and plain x86-64 in $plain_target)" >&2
cargo build -q --workspace --bins  # one feature set with the tests: nothing rebuilt
RUSTFLAGS="-C target-cpu=x86-64" CARGO_TARGET_DIR="$plain_target" cargo build -q -p tidepool-cli
v3="$target/debug/tidepool"
plain="$plain_target/debug/tidepool"

fixtures="${TIDEPOOL_HOME:-$HOME/.cache/tidepool}/fixtures"
mkdir -p "$fixtures"
models=(smollm2-135m-instruct-q4_1 smollm2-135m-instruct-q4_0 smollm2-135m-instruct-q8_0)
for q in q4_0 q8_0 q4_k_m; do
  f="$fixtures/qwen2.5-0.5b-$q.gguf"
  [ -e "$f" ] || "$v3" fixture --size qwen2.5-0.5b --quant "$q" --out "$f" >&2
  models+=("$f")
done
for m in smollm2-135m-instruct-q4_1 smollm2-135m-instruct-q4_0 smollm2-135m-instruct-q8_0; do
  "$v3" pull "$m" >&2
done

echo "| build | model | types | load | RSS | TTFT | decode | cores | CPU s / 1000 tokens | tokens per run |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for build in v3 plain; do
  bin="$v3"; label="AVX2+FMA (x86-64-v3)"
  if [ "$build" = plain ]; then bin="$plain"; label="no vector features (x86-64)"; fi
  for m in "${models[@]}"; do
    "$bin" bench engine --cpu --model "$m" --runs "$runs" --max-tokens "$max_tokens" --label "$label" 2>/dev/null
  done
done
