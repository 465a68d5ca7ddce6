# Shared by the benchmark scripts (source it): start `tidepool serve` in the background and wait
# until it is ready.
#
#   bench_setup                                 -> builds, sets bin and work (removed on exit)
#   start_server BIN MODEL CONFIG OUT_PREFIX   -> sets server_pid and server_url
#   stop_server                                 -> SIGINT, then waits for the drain
bench_setup() {
  bin="${CARGO_TARGET_DIR:-target}/debug/tidepool"
  cargo build -q --workspace --bins  # one feature set with the tests: nothing rebuilt
  work=$(mktemp -d)
  trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
}

start_server() {
  local bin="$1" model="$2" config="$3" out="$4"
  "$bin" serve --model "$model" --port 0 --config "$config" > "$out.out" 2> "$out.log" &
  server_pid=$!
  server_url=""
  for _ in $(seq 1 600); do
    server_url=$(grep -o 'http://[0-9.:]*' "$out.out" | head -1 || true)
    if [ -n "$server_url" ] && curl -sf "$server_url/health" > /dev/null; then return 0; fi
    if ! kill -0 "$server_pid" 2> /dev/null; then
      echo "tidepool serve exited; its log: $out.log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "tidepool serve did not become ready in 300 s; its log: $out.log" >&2
  return 1
}

stop_server() {
  kill -INT "$server_pid"
  wait "$server_pid" || true
}
