#!/usr/bin/env bash
# The workspace's layout rules (docs/architecture.md), checked without building anything:
# - the scheduling, control and gateway crates (and the small ones below them) depend on neither
#   mistral.rs nor llama.cpp, so their tests build without either (candle-core, which reads GGUF
#   headers in tidepool-models, is allowed);
# - no crate has a module import circle.
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
for crate in tidepool-bounds tidepool-gguf tidepool-models tidepool-sched tidepool-control tidepool-gateway; do
    heavy=$(cargo tree -p "$crate" -e normal,build --prefix none 2>/dev/null \
        | grep -E '^(mistralrs|llama-cpp)' | sort -u || true)
    if [ -n "$heavy" ]; then
        echo "layout: $crate depends on an inference library:" $heavy >&2
        status=1
    fi
done
python3 scripts/check-cycles.py || status=1
exit $status
