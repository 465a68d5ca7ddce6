#!/usr/bin/env bash
# For each model: the time from a scale-up decision to the new worker serving, and how close the
# ledger's reservation is to the RSS a worker really adds. Starts `tidepool serve` pinned to one
# worker, asks for a second (POST /admin/scale), times decision -> Ready from /admin/events, sends a
# request that the new worker serves, and compares RSS before and after with the reservation.
#
#   scripts/bench-scaleup.sh [MODEL ...]   (default: SmolLM2 q8_0 and q4_0, Qwen2.5-0.5B-shaped q8_0,
#                                           q4_0, q4_k_m fixtures)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/serve-lib.sh

bin="${CARGO_TARGET_DIR:-target}/debug/tidepool"
cargo build -q --workspace --bins  # one feature set with the tests: nothing rebuilt
fixtures="${TIDEPOOL_HOME:-$HOME/.cache/tidepool}/fixtures"
mkdir -p "$fixtures"
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=(smollm2-135m-instruct-q8_0 smollm2-135m-instruct-q4_0)
  for q in q8_0 q4_0 q4_k_m; do
    f="$fixtures/qwen2.5-0.5b-$q.gguf"
    [ -e "$f" ] || "$bin" fixture --size qwen2.5-0.5b --quant "$q" --out "$f" >&2
    models+=("$f")
  done
fi
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/c.toml" <<TOML
[model]
slots = 1
[policy]
min_workers = 1
max_workers = 2
TOML

echo "| model | decision → ready | ready → first token served | reserved per worker | RSS added by the worker | reserved / measured |"
echo "|---|---|---|---|---|---|"
for m in "${models[@]}"; do
  start_server "$bin" "$m" "$work/c.toml" "$work/s"
  sleep 2
  python3 - "$server_url" "$(basename "$m" .gguf)" <<'PY'
import json, sys, time, urllib.request
url, name = sys.argv[1], sys.argv[2]
def get(path):
    return json.load(urllib.request.urlopen(url + path))
def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
def chat():
    return post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
chat()  # the first worker is warm
before = get("/admin/status")
rss0 = before["memory"]["process_rss_bytes"]
post("/admin/scale", {"workers": 2, "ttl_s": 600})
while True:
    ws = get("/admin/status")["workers"]
    new = [w for w in ws if w["id"] != ws[0]["id"]]
    if new and new[0]["state"] == "ready":
        break
    if new and new[0]["state"] == "stopped":
        sys.exit(f"{name}: the new worker failed: {get('/admin/events')}")
    time.sleep(0.02)
wid = new[0]["id"]
ev = get("/admin/events")["events"]
loading = next(e["at"] for e in ev if e["worker"] == wid and e["to"] == "loading")
ready = next(e["at"] for e in ev if e["worker"] == wid and e["to"] == "ready")
# Two requests at once: one lands on the new worker.
import threading
t0 = time.time()
ts = [threading.Thread(target=chat) for _ in range(2)]
[t.start() for t in ts]; [t.join() for t in ts]
served = time.time() - t0
after = get("/admin/status")
rss1 = after["memory"]["process_rss_bytes"]
reserved = new[0]["reserved_bytes"]
added = rss1 - rss0
mib = lambda b: f"{b / 2**20:.0f} MiB"
print(f"| {name} | {ready - loading:.2f} s | {served:.2f} s (2 requests) | {mib(reserved)} | {mib(added)} | {reserved / max(added, 1):.2f} |")
PY
  stop_server
done
