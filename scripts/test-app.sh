#!/usr/bin/env bash
# The tray app for real: builds `tidepool-app`, starts it under Xvfb (with a D-Bus session, as a
# desktop has) on the tiny fixture, and checks that it creates its tray and its dashboard window,
# serves the API in-process, and takes a screenshot of the screen (target/app-screenshot.png, or $TIDEPOOL_SHOT).
#
# Needs Debian's libwebkit2gtk-4.1-dev libayatana-appindicator3-dev librsvg2-dev (to build),
# xvfb, dbus, x11-utils/xdotool and imagemagick (to run and look); .ci/run installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
shot="${TIDEPOOL_SHOT:-$target/app-screenshot.png}"

echo "==> cargo build --workspace --bins (the app with the rest: one feature set, one build of mistral.rs)"
cargo build --workspace --bins
app="$target/debug/tidepool-app"
cli="$target/debug/tidepool"


work=$(mktemp -d)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2> /dev/null && wait "$pid" 2> /dev/null
  rm -rf "$work"
}
trap cleanup EXIT

"$cli" fixture --size tiny --out "$work/tiny.gguf" > /dev/null
cat > "$work/app.toml" <<TOML
[server]
port = 0
[model]
id = "$work/tiny.gguf"
slots = 1
[power]
mode = "performance"
TOML

# A private home, so the app's settings store and autostart entry stay in the temp dir.
HOME="$work/home" XDG_CONFIG_HOME="$work/home/.config" XDG_DATA_HOME="$work/home/.local/share" \
  TIDEPOOL_APP_CONFIG="$work/app.toml" \
  xvfb-run -a -s "-screen 0 1280x860x24" dbus-run-session -- \
  bash -c "\"$app\" & app=\$!; sleep \${TIDEPOOL_APP_WAIT:-40}; import -window root \"$work/shot.png\"; \
           xdotool search --name '^Tidepool\$' > \"$work/windows\" || true; \
           curl -s \"\$(grep -o 'http://127.0.0.1:[0-9]*' \"$work/log\" | head -1)/health\" > \"$work/health\" || true; \
           kill -0 \$app && echo alive > \"$work/alive\"; kill \$app; wait \$app || true" \
  > "$work/out" 2> "$work/log" &
pid=$!
wait "$pid" || true
pid=""

failures=0
check() { # check NAME PATTERN FILE
  if grep -q "$2" "$3"; then echo "ok   $1"; else echo "FAIL $1"; failures=$((failures + 1)); fi
}
check "tray created" "tray created" "$work/log"
check "server listening in-process" "server listening on http://127.0.0.1:" "$work/log"
check "dashboard window created" "dashboard window created" "$work/log"
check "the model loaded" "model loaded in" "$work/log"
if [ -s "$work/windows" ]; then echo "ok   window on screen"; else echo "FAIL window on screen"; failures=$((failures + 1)); fi
if [ -f "$work/alive" ]; then echo "ok   still running"; else echo "FAIL the app exited"; failures=$((failures + 1)); fi
check "the in-process server answers /health" '"status":"ok"' "$work/health"
mkdir -p "$(dirname "$shot")"
cp "$work/shot.png" "$shot" 2> /dev/null && echo "screenshot: $shot"
if [ "$failures" -gt 0 ]; then
  echo "$failures tray app check(s) failed; its log:"
  tail -40 "$work/log"
  exit 1
fi
echo "tray app: all checks passed"
