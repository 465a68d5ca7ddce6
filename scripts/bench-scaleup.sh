#!/usr/bin/env bash
# For each model: how fast a new worker serves, and how close the ledger's reservation is to the
# RSS it really adds. Starts `tidepool serve` with one worker whose slots are kept busy, asks for a
# second (POST /admin/scale) and times the decision to the new worker's Ready event and to the
# first generated text of a short request that only the new worker can serve; compares the RSS before and after
# with what the new worker reserved. Then scales to zero (the weights unload on llama.cpp) and times
# a request from zero to its first token.
#
#   scripts/bench-scaleup.sh [--engine llamacpp|mistralrs] [MODEL ...]
#     (default models: SmolLM2 q8_0, Qwen2.5-0.5B-shaped q4_0 and q8_0 fixtures)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/serve-lib.sh

bench_setup
fixtures="${TIDEPOOL_HOME:-$HOME/.cache/tidepool}/fixtures"
mkdir -p "$fixtures"
engine=llamacpp
if [ "${1:-}" = "--engine" ]; then engine="$2"; shift 2; fi
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=(smollm2-135m-instruct-q8_0)
  for q in q4_0 q8_0; do
    f="$fixtures/qwen2.5-0.5b-$q.gguf"
    [ -e "$f" ] || "$bin" fixture --size qwen2.5-0.5b --quant "$q" --out "$f" >&2
    models+=("$f")
  done
fi
cat > "$work/c.toml" <<TOML
[model]
engine = "$engine"
slots = 2
[policy]
min_workers = 0
max_workers = 2
TOML

echo "| model | engine | decision → ready | decision → first token on the new worker | from zero: loading → ready | from zero: request → first token | reserved by the new worker | RSS it added | reserved / measured |"
echo "|---|---|---|---|---|---|---|---|---|"
for m in "${models[@]}"; do
  start_server "$bin" "$m" "$work/c.toml" "$work/s"
  python3 - "$server_url" "$(basename "$m" .gguf)" "$engine" <<'PY'
import json, sys, threading, time, urllib.request
url, name, engine = sys.argv[1:4]
def get(path):
    return json.load(urllib.request.urlopen(url + path))
def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
LONG = "Tell me everything about the sea, its tides and its creatures. " * 12
def chat(max_tokens=4, content=LONG):
    return post("/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
SHORT = "What is the tide?"
def first_token(t0):
    """Streams one short request; seconds from t0 to its first generated text (the first
    chunk only names the role: its content is empty)."""
    body = {"messages": [{"role": "user", "content": SHORT}], "max_tokens": 4, "stream": True}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                at = time.time() - t0
                for _ in r:
                    pass
                return at
    return float("nan")
chat(); chat()  # the first worker is warm
first = get("/admin/status")["workers"][0]["id"]
# Keep the first worker's two slots busy, so the next request can only go to the new worker.
busy = [threading.Thread(target=chat, args=(400,)) for _ in range(2)]
[b.start() for b in busy]
while get("/admin/status")["workers"][0]["slots_busy"] < 2:
    time.sleep(0.01)
rss0 = get("/admin/status")["memory"]["process_rss_bytes"]
t0 = time.time()
post("/admin/scale", {"workers": 2, "ttl_s": 600})
to_token = first_token(t0)
ws = get("/admin/status")["workers"]
new = [w for w in ws if w["id"] != first]
if not new:
    sys.exit(f"{name}: no new worker: {get('/admin/events')}")
wid = new[0]["id"]
ev = get("/admin/events")["events"]
loading = next(e["at"] for e in ev if e["worker"] == wid and e["to"] == "loading")
ready = next(e["at"] for e in ev if e["worker"] == wid and e["to"] == "ready")
rss1 = get("/admin/status")["memory"]["process_rss_bytes"]
reserved = new[0]["reserved_bytes"]
added = rss1 - rss0
[b.join() for b in busy]
# Scale to zero: an override to 0 workers (min_workers is 0) long enough for the arrival rate's
# average to fall below the activation rate, so the pool stays at zero once it expires.
post("/admin/scale", {"workers": 0, "ttl_s": 12})
t_zero = time.time()
deadline = t_zero + 60
while get("/admin/status")["workers"] and time.time() < deadline:
    time.sleep(0.05)
time.sleep(max(0.0, t_zero + 12.5 - time.time()))
assert not get("/admin/status")["workers"], "the pool did not reach zero"
t0 = time.time()
from_zero = first_token(t0)
ev = get("/admin/events")["events"]
cold = max(e["worker"] for e in ev if e["worker"] is not None)
cold_loading = next(e["at"] for e in ev if e["worker"] == cold and e["to"] == "loading")
cold_ready = next(e["at"] for e in ev if e["worker"] == cold and e["to"] == "ready")
mib = lambda b: f"{b / 2**20:.0f} MiB"
print(f"| {name} | {engine} | {ready - loading:.3f} s | {to_token:.3f} s | {cold_ready - cold_loading:.2f} s | {from_zero:.2f} s | {mib(reserved)} | {mib(added)} | {reserved / max(added, 1):.2f} |")
PY
  stop_server
done
