#!/usr/bin/env bash
# Browser tests of the dashboard (ui/): builds `tidepool`, serves the tiny fixture model with a
# pool that can grow from 1 to 2 workers, and drives Debian's Chromium with playwright-core
# (tests/ui/dashboard.test.mjs, node's built-in test runner). Screenshots land in
# tests/ui/screenshots/ (gitignored). Exits non-zero when a test fails.
#
#   scripts/test-ui.sh                      # honours CARGO_TARGET_DIR
#   CHROMIUM=/path/to/chrome scripts/test-ui.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target="${CARGO_TARGET_DIR:-target}"
bin="$target/debug/tidepool"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

# Chromium comes from Debian's packages (playwright's own browser download cannot work offline).
[ -x "$CHROMIUM" ] || bash scripts/system-packages.sh
command -v node > /dev/null || { echo "node (20 or newer) is needed for the UI tests" >&2; exit 1; }

echo "==> cargo build --workspace --bins"
cargo build --workspace --bins

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2> /dev/null; then
    kill -INT "$server_pid" || true
    wait "$server_pid" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" fixture --size tiny --out "$work/tiny.gguf" > /dev/null
# One slot per worker and a low per-worker rate, so the test's burst of requests grows the pool
# to its second worker; a long stabilization keeps it through dips in load (though not once it is
# measured not to add throughput: the test reads the server's event log for it afterwards).
cat > "$work/tidepool.toml" << 'EOF'
[model]
slots = 1

[policy]
min_workers = 1
max_workers = 2
up = { rate_per_worker = 0.5, queue_per_worker = 1, window_s = 1 }
down = { stabilization_s = 120 }

[power]
mode = "performance"
EOF

# shellcheck source=scripts/serve-lib.sh
source scripts/serve-lib.sh
echo "==> tidepool serve (tiny fixture)"
# A home of its own: the tests rotate the LAN token, whose file lives there.
TIDEPOOL_HOME="$work/home" start_server "$bin" "$work/tiny.gguf" "$work/tidepool.toml" "$work/serve"
echo "    $server_url"

echo "==> npm ci (tests/ui)"
(cd tests/ui && npm ci --no-audit --no-fund --loglevel=error)

echo "==> dashboard browser tests"
mkdir -p tests/ui/screenshots
status=0
(cd tests/ui && TIDEPOOL_URL="$server_url" SCREENSHOT_DIR="$root/tests/ui/screenshots" \
  node --test --test-concurrency=1 --test-reporter=spec parsers.test.mjs dashboard.test.mjs) || status=$?
if [ "$status" != 0 ]; then
  echo "---- server log (last 40 lines) ----" >&2
  tail -n 40 "$work/serve.log" >&2 || true
fi
echo "screenshots: tests/ui/screenshots/"
exit "$status"
