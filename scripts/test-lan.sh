#!/usr/bin/env bash
# LAN sharing through a real non-loopback address: a network namespace joined to this one by a
# veth pair is "another machine" (10.231.7.2) reaching `tidepool serve --share-lan` at 10.231.7.1.
# Checks: no token 401, wrong token 401, right token 200, over the rate 429 with Retry-After
# (failed attempts count), repeated wrong tokens back off to 429, admin API 403 from the LAN,
# keep_alive from the LAN changes nothing, loopback needs no token, and the switch, the rate and
# the token change at run time. Needs root (ip netns); set TIDEPOOL_SKIP_NETNS=1 to skip on a machine
# without it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${TIDEPOOL_SKIP_NETNS:-}" = 1 ]; then
  echo "SKIPPED: LAN sharing test (TIDEPOOL_SKIP_NETNS=1)"
  exit 0
fi
command -v ip > /dev/null || { echo "ip (iproute2) is needed: apt-get install iproute2" >&2; exit 1; }

bin="${CARGO_TARGET_DIR:-target}/debug/tidepool"
[ -x "$bin" ] || cargo build -q --workspace --bins
work=$(mktemp -d)
ns="tplan$$"
host_if="tpa$$"
ns_if="tpb$$"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2> /dev/null && wait "$server_pid" 2> /dev/null
  ip netns del "$ns" 2> /dev/null || true
  ip link del "$host_if" 2> /dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$ns"
ip link add "$host_if" type veth peer name "$ns_if"
ip link set "$ns_if" netns "$ns"
ip addr add 10.231.7.1/24 dev "$host_if"
ip link set "$host_if" up
ip netns exec "$ns" ip addr add 10.231.7.2/24 dev "$ns_if"
ip netns exec "$ns" ip link set "$ns_if" up
ip netns exec "$ns" ip link set lo up

"$bin" fixture --size tiny --out "$work/tiny.gguf" > /dev/null
# A non-loopback bind without a token is refused before anything is served.
if env -u TIDEPOOL_LAN_TOKEN timeout 20 "$bin" serve --model "$work/tiny.gguf" --host 0.0.0.0 --port 0 \
    > /dev/null 2> "$work/refused"; then
  echo "FAIL: serve --host 0.0.0.0 without a token started"; exit 1
fi
grep -q "refusing to listen on 0.0.0.0" "$work/refused" \
  || { echo "FAIL: no clear refusal: $(tail -3 "$work/refused")"; exit 1; }
echo "ok   non-loopback bind without a token refused"

cat > "$work/c.toml" <<TOML
[server]
lan_rate_per_minute = 10
[model]
slots = 1
TOML
token="lan-test-token-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
TIDEPOOL_LAN_TOKEN="$token" "$bin" serve --model "$work/tiny.gguf" --port 0 --share-lan \
  --config "$work/c.toml" > "$work/out" 2> "$work/log" &
server_pid=$!
port=""
for _ in $(seq 1 200); do
  port=$(grep -o 'http://127.0.0.1:[0-9]*' "$work/out" | head -1 | sed 's/.*://' || true)
  if [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/health" > /dev/null; then break; fi
  sleep 0.25
done
[ -n "$port" ] || { echo "server did not start"; cat "$work/log"; exit 1; }

failures=0
# expect NAME WANT CODE
expect() {
  if [ "$3" = "$2" ]; then
    echo "ok   $1 ($3)"
  else
    echo "FAIL $1: want $2, got $3"
    failures=$((failures + 1))
  fi
}
lan() { # lan PATH [curl args...] -> HTTP status from inside the namespace (000: no connection)
  local path="$1"; shift
  ip netns exec "$ns" curl -s -m 10 -o "$work/body" -D "$work/headers" -w '%{http_code}' \
    "$@" "http://10.231.7.1:$port$path" || true
}
local_() {
  local path="$1"; shift
  curl -s -m 10 -o "$work/body" -w '%{http_code}' "$@" "http://127.0.0.1:$port$path" || true
}
auth=(-H "Authorization: Bearer $token")

expect "LAN without a token" 401 "$(lan /v1/models)"
grep -q invalid_api_key "$work/body" || { echo "FAIL 401 body is not OpenAI-shaped: $(cat "$work/body")"; failures=$((failures + 1)); }
expect "LAN with a wrong token" 401 "$(lan /v1/models -H "Authorization: Bearer nope-$token")"
expect "LAN with the token" 200 "$(lan /v1/models "${auth[@]}")"
expect "LAN chat completion" 200 "$(lan /v1/chat/completions "${auth[@]}" -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}')"
expect "LAN admin API" 403 "$(lan /admin/status "${auth[@]}")"
expect "LAN dashboard" 403 "$(lan / "${auth[@]}")"
expect "LAN metrics" 403 "$(lan /metrics "${auth[@]}")"
# 10 per minute: 7 used above (the refused ones count too); the 11th request is over.
for _ in 1 2 3; do lan /health "${auth[@]}" > /dev/null; done
expect "LAN over the rate" 429 "$(lan /v1/models "${auth[@]}")"
grep -qi '^retry-after: [0-9]' "$work/headers" || { echo "FAIL 429 without Retry-After"; failures=$((failures + 1)); }
expect "loopback needs no token" 200 "$(local_ /v1/models)"
expect "loopback admin" 200 "$(local_ /admin/sharing)"
grep -q "10.231.7.1:$port" "$work/body" || { echo "FAIL /admin/sharing does not list the LAN URL: $(cat "$work/body")"; failures=$((failures + 1)); }

# Switched off at run time: the LAN listener is gone.
expect "switch off" 200 "$(local_ /admin/sharing -X PUT -H 'content-type: application/json' -d '{"enabled": false}')"
expect "LAN while off" 000 "$(lan /v1/models "${auth[@]}")"
expect "loopback while off" 200 "$(local_ /v1/models)"
# On again with a higher rate.
expect "switch on" 200 "$(local_ /admin/sharing -X PUT -H 'content-type: application/json' -d '{"enabled": true, "rate_per_minute": 100}')"
expect "LAN after switching on" 200 "$(lan /v1/models "${auth[@]}")"
# keep_alive from the LAN changes no policy and no expiry.
expect "LAN keep_alive 0" 200 "$(lan /api/generate "${auth[@]}" -d '{"model":"tiny","prompt":"hi","stream":false,"keep_alive":0,"options":{"num_predict":2}}')"
local_ /admin/status > /dev/null
python3 - "$work/body" <<'PY' || failures=$((failures + 1))
import json, sys
s = json.load(open(sys.argv[1]))
bad = []
if s.get("keep_alive") is not None: bad.append(f"keep_alive {s.get('keep_alive')}")
if s["policy"]["min_workers"] != 1: bad.append(f"min_workers {s['policy']['min_workers']}")
if s["policy"]["idle_ttl_s"] != 600: bad.append(f"idle_ttl_s {s['policy']['idle_ttl_s']}")
print(("FAIL LAN keep_alive changed the server: " + ", ".join(bad)) if bad else "ok   LAN keep_alive changed no policy")
sys.exit(1 if bad else 0)
PY
# The token is shown only to the dashboard's own origin.
local_ /admin/sharing > /dev/null
python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["token"] is None else 1)' "$work/body" \
  && echo "ok   GET /admin/sharing hides the token from a client without the dashboard's origin" \
  || { echo "FAIL GET /admin/sharing showed the token"; failures=$((failures + 1)); }
# A rotated token replaces the old one at once (seen by the dashboard's origin).
local_ /admin/sharing/rotate -X POST -H 'content-type: application/json' -H "Origin: http://127.0.0.1:$port" > /dev/null
new_token=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"])' "$work/body")
expect "LAN with the old token" 401 "$(lan /v1/models "${auth[@]}")"
expect "LAN with the new token" 200 "$(lan /v1/models -H "Authorization: Bearer $new_token")"

# Wrong tokens back off: after 5 free failures an address waits, even with the right token.
for _ in 1 2 3 4 5 6; do lan /v1/models -H "Authorization: Bearer wrong-$new_token" > /dev/null; done
expect "LAN wrong tokens back off" 429 "$(lan /v1/models -H "Authorization: Bearer wrong-$new_token")"
grep -qi '^retry-after: [0-9]' "$work/headers" || { echo "FAIL backoff 429 without Retry-After"; failures=$((failures + 1)); }
expect "LAN right token during backoff" 429 "$(lan /v1/models -H "Authorization: Bearer $new_token")"
if [ "$failures" -gt 0 ]; then
  echo "$failures LAN sharing check(s) failed; server log:"
  tail -20 "$work/log"
  exit 1
fi
echo "LAN sharing: all checks passed"
