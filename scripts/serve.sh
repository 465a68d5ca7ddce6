#!/usr/bin/env bash
# The README's first command: builds Tidepool in release mode and runs `tidepool serve` on the
# default model. The llama.cpp engine is compiled from source, which needs cmake, a C++ compiler
# and libclang: on Debian, as root, they are installed first if missing (otherwise the script
# names them). Arguments go to `tidepool serve`.
#
#   scripts/serve.sh                        # the default model on 127.0.0.1:8433
#   scripts/serve.sh --model smollm2-135m-instruct --port 9000
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-packages.sh --build
exec cargo run --release -p tidepool-cli -- serve "$@"
