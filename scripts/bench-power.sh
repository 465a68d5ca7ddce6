#!/usr/bin/env bash
# Tokens/s and CPU time per 1000 tokens under each power mode's CPU limit on this machine
# (`tidepool bench engine --power-mode`), for SmolLM2-135M Q8_0 and the Qwen2.5-0.5B-shaped q8_0
# fixture. Prints one markdown row per (mode, model).
#
#   scripts/bench-power.sh [--runs 3] [--max-tokens 64]
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3 max_tokens=64
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --max-tokens) max_tokens="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

bin="${CARGO_TARGET_DIR:-target}/debug/tidepool"
cargo build -q --workspace --bins  # one feature set with the tests: nothing rebuilt
fixtures="${TIDEPOOL_HOME:-$HOME/.cache/tidepool}/fixtures"
mkdir -p "$fixtures"
qwen="$fixtures/qwen2.5-0.5b-q8_0.gguf"
[ -e "$qwen" ] || "$bin" fixture --size qwen2.5-0.5b --quant q8_0 --out "$qwen" >&2
"$bin" pull smollm2-135m-instruct-q8_0 >&2

echo "| mode | model | types | load | RSS | TTFT | decode | cores | CPU s / 1000 tokens | tokens per run |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for m in smollm2-135m-instruct-q8_0 "$qwen"; do
  for mode in performance balanced power-saver; do
    "$bin" bench engine --cpu --model "$m" --runs "$runs" --max-tokens "$max_tokens" \
      --power-mode "$mode" --label "$mode" 2>/dev/null
  done
done
