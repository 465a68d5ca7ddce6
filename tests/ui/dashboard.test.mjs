// Browser tests of the dashboard (ui/) against a real `tidepool serve` on the tiny fixture model.
// scripts/test-ui.sh starts the server and sets TIDEPOOL_URL; the server's config must be
// min_workers 1, max_workers 2, slots 1 and a low up.rate_per_worker, so a burst of requests
// makes the pool grow. Assertions read the DOM and the dashboard's data, never pixels; PNG
// screenshots go to SCREENSHOT_DIR for a person to look at.
//
//   TIDEPOOL_URL=http://127.0.0.1:8500 node --test dashboard.test.mjs

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const URL = (process.env.TIDEPOOL_URL || "http://127.0.0.1:8433").replace(/\/$/, "");
const HERE = dirname(fileURLToPath(import.meta.url));
const SHOTS = process.env.SCREENSHOT_DIR || join(HERE, "screenshots");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

let context;
let page;
let profile;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, fn, { timeout = 30000, every = 200 } = {}) {
  const end = Date.now() + timeout;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await sleep(every);
  }
  throw new Error(`timed out after ${timeout} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
}

async function api(path, init) {
  const r = await fetch(URL + path, init);
  const body = await r.text();
  assert.ok(r.ok, `${path}: HTTP ${r.status} ${body}`);
  return JSON.parse(body);
}

/** One chat request, read to its end; resolves to the HTTP status (never throws). */
async function chat(maxTokens) {
  try {
    const r = await fetch(URL + "/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", "x-tidepool-priority": "standard" },
      body: JSON.stringify({ messages: [{ role: "user", content: "Tell me about tides." }], max_tokens: maxTokens, stream: true }),
    });
    await r.text();
    return r.status;
  } catch {
    return 0;
  }
}

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  profile = mkdtempSync(join(tmpdir(), "tidepool-ui-"));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 800 },
  });
  page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (e) => console.error("page error:", e.message));
  page.on("console", (m) => { if (m.type() === "error") console.error("console error:", m.text()); });
});

after(async () => {
  await context?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

test("the dashboard loads from / with its assets and shows the pool", async () => {
  const failed = [];
  page.on("response", (r) => { if (r.status() >= 400 && !/\/admin\/(sharing|models)/.test(r.url())) failed.push(`${r.status()} ${r.url()}`); });
  await page.goto(URL + "/");
  await until("the first status poll", () => page.evaluate(() => (window.tidepool?.polls ?? 0) >= 2));
  assert.deepEqual(failed, [], "every asset and API call answered");
  assert.ok(await page.evaluate(() => typeof uPlot === "function"), "uPlot loaded from ui/vendor");
  assert.equal(await page.locator(".uplot").count(), 6, "six charts drawn");
  const model = await page.locator("#badge-model").textContent();
  const status = await api("/admin/status");
  assert.equal(model, status.model);
  assert.equal(await page.locator("#badge-status").textContent(), "ready");
  assert.match(await page.locator("#decision-reason").textContent(), /\w/);
  await until("one worker row", async () => (await page.locator("#workers-body tr[data-worker]").count()) >= 1);
});

test("under a burst of requests the charts and the worker list follow the load", async () => {
  await page.goto(URL + "/#dashboard");
  await until("the first status poll", () => page.evaluate(() => (window.tidepool?.polls ?? 0) >= 1));
  const rowsBefore = await page.locator("#workers-body tr[data-worker]").count();
  assert.equal(rowsBefore, 1, "min_workers = 1 at rest");

  // Load: keep 6 streaming requests running (bounded: at most 25 s and 600 requests).
  let stop = false;
  let sent = 0;
  const statuses = [];
  const deadline = Date.now() + 25000;
  const client = async () => {
    while (!stop && Date.now() < deadline && sent < 600) {
      sent++;
      statuses.push(await chat(96));
    }
  };
  const clients = Array.from({ length: 6 }, client);

  // The tile is sampled all through the load, not only until the second worker shows up: that can
  // happen before the first poll that sees requests in flight.
  const maxInFlightSeen = { dom: 0 };
  const sampleTile = async () => {
    const n = Number(await page.locator("#tile-inflight").textContent());
    if (n > maxInFlightSeen.dom) maxInFlightSeen.dom = n;
  };
  try {
    await until("a second worker in the list", async () => {
      await sampleTile();
      return (await page.locator("#workers-body tr[data-worker]").count()) >= 2;
    }, { timeout: 25000 });
    // Let the charts take a few more points under load, then photograph it.
    await until("a ready second worker", async () => {
      await sampleTile();
      return (await page.locator('#workers-body tr[data-state="ready"]').count()) >= 2;
    }, { timeout: 15000 });
    for (let i = 0; i < 25; i++) {
      await sampleTile();
      await sleep(100);
    }
    await page.screenshot({ path: join(SHOTS, "dashboard-under-load.png"), fullPage: true });
  } finally {
    stop = true;
    await Promise.all(clients);
  }
  assert.ok(statuses.some((s) => s === 200), `some requests succeeded: ${statuses.join(",")}`);

  const series = await page.evaluate(() => window.tidepool.series());
  const max = (a) => Math.max(...a.filter((v) => v != null));
  assert.ok(max(series.requests[1]) > 0, "the request-rate chart saw arrivals");
  assert.ok(max(series.requests[2]) >= 2, "the in-flight series saw concurrent requests");
  assert.ok(max(series.workers[1]) >= 2, "the workers chart shows two ready workers");
  assert.ok(max(series.workers[4]) >= 2, "the target went to two");
  assert.ok(max(series.memory[1]) > 0 && max(series.memory[2]) > 0, "reserved and RSS are charted");
  assert.ok(maxInFlightSeen.dom > 0, "the in-flight tile moved");
  // tokens/s comes from /metrics counters; requests finished, so it went above zero.
  await until("tokens/s above zero", () => page.evaluate(() => Math.max(...window.tidepool.series().tokens[1].filter((v) => v != null)) > 0), { timeout: 8000 });

  // The event timeline shows the new worker's transitions with their reasons.
  await until("a loading → ready event for a second worker", async () => {
    const texts = await page.locator("#events-list li").allTextContents();
    return texts.some((t) => /worker #\d+.*loading.*→.*ready/s.test(t));
  }, { timeout: 8000 });
  // The server's own log agrees. (Not its worker list now: a second worker that was measured not
  // to add throughput is drained at once, so it may be gone by the time the load has stopped.)
  const { events } = await api("/admin/events");
  const readied = new Set(events.filter((e) => e.to === "ready" && e.worker != null).map((e) => e.worker));
  assert.ok(readied.size >= 2, `the server agrees: two workers became ready: ${JSON.stringify(events)}`);
});

test("manual scale from the workers panel holds a worker count", async () => {
  await page.goto(URL + "/#dashboard");
  await page.getByLabel("Workers to hold").fill("1");
  await page.getByLabel("Hold for seconds").fill("5");
  await page.getByRole("button", { name: "Scale" }).click();
  await until("the confirmation", async () => /Holding 1 worker/.test(await page.locator("#scale-msg").textContent()));
  assert.match(await page.locator("#scale-msg").textContent(), /manual override to 1/);
  const status = await api("/admin/status");
  assert.match(status.decision.reason, /manual override/);
  await until("the override on the dashboard", async () => /manual override/.test(await page.locator("#decision-reason").textContent()), { timeout: 5000 });
});

test("the dashboard reflows at a narrow width", async () => {
  await page.setViewportSize({ width: 420, height: 900 });
  await page.goto(URL + "/#dashboard");
  await until("a status poll", () => page.evaluate(() => (window.tidepool?.polls ?? 0) >= 2));
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  assert.ok(overflow <= 1, `no horizontal scroll at 420 px (overflow ${overflow} px)`);
  await page.screenshot({ path: join(SHOTS, "dashboard-narrow.png"), fullPage: true });
  await page.setViewportSize({ width: 1280, height: 800 });
});

test("a setting changed in the UI reaches GET /admin/config", async () => {
  const before = await api("/admin/config");
  await page.goto(URL + "/#settings");
  const max = page.getByLabel("Max workers");
  await until("the policy form filled from the server", async () => (await max.inputValue()) === String(before.policy.max_workers));

  await max.fill("3");
  await page.getByRole("button", { name: "Save policy" }).click();
  await until("the saved message", async () => /Saved/.test(await page.locator("#policy-msg").textContent()));
  const afterSave = await api("/admin/config");
  assert.equal(afterSave.policy.max_workers, 3, "max_workers reached the server");
  assert.deepEqual({ ...afterSave.policy, max_workers: before.policy.max_workers }, before.policy, "the other fields were kept");

  // A refused value: the server's 400 message appears next to the field it names.
  await page.getByLabel("Min workers").fill("9");
  await page.getByRole("button", { name: "Save policy" }).click();
  const err = page.locator('[data-param="policy.min_workers"] .field-err');
  await until("the field's error", async () => /above max_workers/.test(await err.textContent()));
  assert.equal((await api("/admin/config")).policy.min_workers, before.policy.min_workers, "the refused value was not applied");

  // The power mode too.
  await page.getByLabel("Power mode").selectOption("balanced");
  await page.getByRole("button", { name: "Save power" }).click();
  await until("the power saved message", async () => /Saved/.test(await page.locator("#power-msg").textContent()));
  assert.equal((await api("/admin/config")).power.mode, "balanced");
  await until("the effective mode shown", async () => (await page.locator("#set-power-effective").textContent()) === "balanced", { timeout: 8000 });

  // LAN sharing: its panel, or a clear note where this server build has no sharing endpoint.
  const sharing = await fetch(URL + "/admin/sharing");
  if (sharing.status === 404) {
    await until("the not-available note", () => page.locator("#sharing-unavailable").isVisible());
  } else {
    await until("the sharing panel", () => page.locator("#set-sharing").isVisible());
    // The token reaches the dashboard (its own origin) and nobody else: the page's own request
    // gets it, a client without that origin does not, and the page, reloaded, shows it.
    const rotated = await page.evaluate(async () => {
      const r = await fetch("/admin/sharing/rotate", { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
      return (await r.json()).token;
    });
    assert.match(String(rotated), /^[0-9a-f]{64}$/);
    assert.equal((await (await fetch(URL + "/admin/sharing")).json()).token, null, "GET without the dashboard's origin hides the token");
    await page.reload();
    await until("the token shown after a reload", async () => (await page.locator("#sharing-token").textContent()) === rotated);
  }
  await page.screenshot({ path: join(SHOTS, "settings.png"), fullPage: true });


  // Put things back for the tests after this one.
  await page.getByLabel("Min workers").fill(String(before.policy.min_workers));
  await page.getByLabel("Max workers").fill(String(before.policy.max_workers));
  await page.getByRole("button", { name: "Save policy" }).click();
  await until("restored", async () => (await api("/admin/config")).policy.max_workers === before.policy.max_workers);
  await page.getByLabel("Power mode").selectOption(before.power.mode);
  await page.getByRole("button", { name: "Save power" }).click();
  await until("power restored", async () => (await api("/admin/config")).power.mode === before.power.mode);
});

test("the chat playground streams a reply and shows its stats", async () => {
  await page.goto(URL + "/#chat");
  // The tiny fixture model writes 200 tokens in a fraction of a second, which the browser may
  // read in one or two network chunks; a slow link (20 kB/s, as over a poor LAN) spreads the
  // same server-sent events over a couple of seconds, so the growth can be watched.
  const cdp = await context.newCDPSession(page);
  await cdp.send("Network.enable");
  await cdp.send("Network.emulateNetworkConditions", { offline: false, latency: 0, downloadThroughput: 20000, uploadThroughput: -1 });
  const models = await api("/v1/models");
  await until("the model list", async () => (await page.getByLabel("Model", { exact: true }).inputValue()) === models.data[0].id);
  await page.getByLabel("Max tokens").fill("200");
  // Greedy: a sampled reply of the random-weights fixture sometimes ends after a few tokens.
  await page.getByLabel("Temperature").fill("0");
  await page.getByLabel("Priority class").selectOption("interactive");

  // Record every change of the reply's text, with its time, from inside the page.
  await page.evaluate(() => {
    window.replyLengths = [];
    new MutationObserver(() => {
      const m = document.querySelector('.msg.assistant');
      if (m) window.replyLengths.push([performance.now(), m.textContent.length]);
    }).observe(document.getElementById("chat-transcript"), { childList: true, subtree: true, characterData: true });
  });
  await page.getByLabel("Message").fill("Write a short poem about the sea.");
  await page.getByRole("button", { name: "Send" }).click();
  await until("the reply to finish", () => page.locator('#chat-stats[data-done="true"]').count(), { timeout: 60000 });

  const lengths = await page.evaluate(() => window.replyLengths.map(([, n]) => n).filter((n) => n > 0));
  const distinct = [...new Set(lengths)];
  assert.ok(distinct.length >= 3, `the reply grew over time (lengths seen: ${distinct.join(",")})`);
  for (let i = 1; i < distinct.length; i++) assert.ok(distinct[i] > distinct[i - 1], "the text only grows");

  const reply = await page.locator(".msg.assistant").last().textContent();
  assert.ok(reply.length > 0);
  assert.equal(await page.locator(".msg.error").count(), 0, "no error shown");
  const stat = async (k) => page.locator(`[data-stat="${k}"] b`).textContent();
  assert.match(await stat("ttft"), /^\d+ ms$/);
  assert.match(await stat("tokens"), /^\d+$/);
  assert.ok(Number(await stat("tokens")) > 1);
  assert.match(await stat("tps"), /tokens\/s$/);
  assert.match(await stat("finish"), /^(stop|length)$/);
  await page.screenshot({ path: join(SHOTS, "chat.png"), fullPage: false });
  await cdp.send("Network.emulateNetworkConditions", { offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: -1 });
  await cdp.detach();
});

test("the chat playground stops a reply on Stop", async () => {
  await page.goto(URL + "/#chat");
  const cdp = await context.newCDPSession(page);
  await cdp.send("Network.enable");
  await cdp.send("Network.emulateNetworkConditions", { offline: false, latency: 0, downloadThroughput: 4000, uploadThroughput: -1 });
  try {
    await page.getByLabel("Max tokens").fill("400");
    await page.getByLabel("Message").fill("Tell me a long story.");
    await page.getByRole("button", { name: "Send" }).click();
    const reply = page.locator(".msg.assistant").last();
    await until("some text", async () => (await reply.textContent()).length > 0);
    await page.getByRole("button", { name: "Stop" }).click();
    await until("the stats", () => page.locator('#chat-stats[data-done="true"]').count());
    assert.equal(await page.locator('[data-stat="finish"] b').textContent(), "stopped");
    assert.ok(await page.getByRole("button", { name: "Send" }).isEnabled());
  } finally {
    await cdp.send("Network.emulateNetworkConditions", { offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: -1 });
    await cdp.detach();
  }
});

test("the chat playground shows the server's error message", async () => {
  await page.goto(URL + "/#chat");
  await page.getByLabel("Temperature").fill("9");
  await page.getByLabel("Message").fill("hello");
  await page.getByRole("button", { name: "Send" }).click();
  const err = page.locator(".msg.error");
  await until("an error message", () => err.count());
  assert.match(await err.textContent(), /temperature/i);
  await page.getByLabel("Temperature").fill("0.7");
});

test("the models tab lists models, or says downloads are not available", async () => {
  await page.goto(URL + "/#models");
  const r = await fetch(URL + "/admin/models");
  if (r.status === 404) {
    await until("the note", () => page.locator("#models-unavailable").isVisible());
    const status = await api("/admin/status");
    await until("the served model", async () => (await page.locator("#models-list li").allTextContents()).some((t) => t.includes(status.model)));
  } else {
    const { models } = await r.json();
    await until("one row per model", async () => (await page.locator("#models-list li").count()) === models.length);
  }
  await page.screenshot({ path: join(SHOTS, "models.png"), fullPage: true });
});

// Download progress and a LAN address cannot be had for real in CI (no hub, loopback only), so the
// browser answers these endpoints here, in the shapes the server's own tests pin down.
test("model downloads and LAN sharing, against the agreed API shapes (answered in the browser)", async () => {
  const pulls = [];
  let progress = 0;
  const total = 1_100_000_000;
  const catalog = () => ({
    models: [
      { id: "qwen2.5-0.5b-instruct-q8_0", name: "Qwen2.5 0.5B Instruct", downloaded: true, active: true, size_bytes: 531_000_000, download: null },
      {
        id: "qwen2.5-1.5b-instruct-q4_k_m", name: "Qwen2.5 1.5B Instruct", downloaded: false, active: false, size_bytes: total,
        download: pulls.length ? { state: "downloading", bytes: Math.min(progress, total), total } : null,
      },
      { id: "qwen2.5-3b-instruct-q4_k_m", name: "Qwen2.5 3B Instruct", downloaded: false, active: false, size_bytes: 2_100_000_000, download: { state: "failed", bytes: 0, total: 0, error: "the hub is not reachable" } },
    ],
  });
  let sharing = { enabled: false, urls: ["http://192.168.1.5:8433"], token: "tp-first-token", rate_per_minute: 100 };
  const sharingPuts = [];
  await page.route("**/admin/models", (r) => {
    if (pulls.length) progress += 150_000_000;
    return r.fulfill({ json: catalog() });
  });
  await page.route("**/admin/models/pull", (r) => {
    pulls.push(r.request().postDataJSON());
    return r.fulfill({ status: 202, json: { id: pulls.at(-1).id } });
  });
  await page.route("**/admin/sharing", (r) => {
    if (r.request().method() === "PUT") {
      const body = r.request().postDataJSON();
      sharingPuts.push(body);
      sharing = { ...sharing, ...body };
    }
    return r.fulfill({ json: sharing });
  });
  await page.route("**/admin/sharing/rotate", (r) => {
    sharing = { ...sharing, token: "tp-second-token" };
    return r.fulfill({ json: sharing });
  });
  page.on("dialog", (d) => d.accept());
  try {
    await page.goto("about:blank"); // a fresh page: the earlier one learned these routes were 404
    await page.goto(URL + "/#models");
    await until("three models", async () => (await page.locator("#models-list li").count()) === 3);
    assert.ok(!(await page.locator("#models-unavailable").isVisible()));
    assert.match(await page.locator('[data-model="qwen2.5-3b-instruct-q4_k_m"]').textContent(), /failed: the hub is not reachable/);
    await page.getByRole("button", { name: "Download qwen2.5-1.5b-instruct-q4_k_m" }).click();
    const bar = page.getByRole("progressbar", { name: "Downloading qwen2.5-1.5b-instruct-q4_k_m" });
    await until("a progress bar", () => bar.count());
    const first = Number(await bar.getAttribute("aria-valuenow"));
    await until("progress moving", async () => Number(await bar.getAttribute("aria-valuenow")) > first, { timeout: 5000 });
    assert.deepEqual(pulls[0], { id: "qwen2.5-1.5b-instruct-q4_k_m" });
    await page.screenshot({ path: join(SHOTS, "models-downloading.png"), fullPage: true });

    await page.goto(URL + "/#settings");
    const toggle = page.getByLabel("Share on the local network");
    await until("the sharing switch", () => toggle.isVisible());
    assert.equal(await toggle.isChecked(), false);
    assert.equal(await page.locator("#badge-lan").textContent(), "LAN off");
    await toggle.check();
    // The token is already known while sharing is off, so wait for the PUT's answer to be drawn.
    await until("the badge to say shared", async () => /LAN shared/.test(await page.locator("#badge-lan").textContent()));
    assert.equal(await page.locator("#sharing-token").textContent(), "tp-first-token");
    assert.deepEqual(sharingPuts[0], { enabled: true });
    assert.match(await page.locator("#sharing-urls").textContent(), /192\.168\.1\.5:8433/);
    await page.getByRole("button", { name: "Copy" }).click();
    await until("copied or selected", async () => /copied|selected/.test(await page.locator("#sharing-msg").textContent()));
    await page.getByRole("button", { name: "Rotate" }).click();
    await until("the new token", async () => (await page.locator("#sharing-token").textContent()) === "tp-second-token");
    await page.screenshot({ path: join(SHOTS, "settings-sharing.png"), fullPage: true });
  } finally {
    await page.unrouteAll({ behavior: "ignoreErrors" });
  }
});
