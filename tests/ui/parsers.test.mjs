// Unit tests of the dashboard's parsers (no browser, no server).
import { test } from "node:test";
import assert from "node:assert/strict";
import { parsePrometheus, sample } from "../../ui/js/prometheus.js";
import { sseParser } from "../../ui/js/sse.js";
import { parseErrorBody } from "../../ui/js/api.js";

test("Prometheus text: samples by name and labels", () => {
  const p = parsePrometheus([
    "# HELP tidepool_tokens_total Tokens processed.",
    "# TYPE tidepool_tokens_total counter",
    'tidepool_tokens_total{kind="prompt"} 120',
    'tidepool_tokens_total{kind="completion"} 3456',
    'tidepool_request_duration_seconds_bucket{le="+Inf"} 7',
    "tidepool_in_flight 2",
    "",
  ].join("\n"));
  assert.equal(sample(p, "tidepool_tokens_total", { kind: "completion" }), 3456);
  assert.equal(sample(p, "tidepool_tokens_total", { kind: "prompt" }), 120);
  assert.equal(sample(p, "tidepool_request_duration_seconds_bucket", { le: "+Inf" }), 7);
  assert.equal(sample(p, "tidepool_in_flight"), 2);
  assert.equal(sample(p, "tidepool_missing"), null);
});

test("SSE: events split across chunks, CRLF, [DONE]", () => {
  const got = [];
  const feed = sseParser((d) => got.push(d));
  feed('data: {"a":1}\n\ndata: {"b"');
  feed(':2}\r\n\r\n: comment\n\ndata: [DONE]\n\n');
  assert.deepEqual(got, ['{"a":1}', '{"b":2}', "[DONE]"]);
});

test("OpenAI-shaped error bodies give their message and param", () => {
  const e = parseErrorBody(400, JSON.stringify({ error: { message: "`policy.min_workers` 9 is above max_workers (2)", type: "invalid_request_error", param: "policy.min_workers", code: null } }));
  assert.equal(e.status, 400);
  assert.equal(e.param, "policy.min_workers");
  assert.match(e.message, /above max_workers/);
  assert.equal(parseErrorBody(502, "Bad gateway\n").message, "Bad gateway");
});
