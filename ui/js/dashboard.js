// The dashboard view: polls GET /admin/status and GET /metrics every second, GET /admin/events
// every two, and draws the pool's live state. What it has drawn is also kept on
// `window.tidepool` (the series, the last status) so tests can read the data, not the pixels.

import { get, post, ApiError } from "./api.js";
import { rollingChart, COLORS, BYTE_INCRS, INT_INCRS } from "./charts.js";
import { parsePrometheus, sample } from "./prometheus.js";
import { $, el, bytes, num, duration, clock } from "./format.js";

const POLL_MS = 1000;
const TOKENS_WINDOW_S = 5;

const listeners = [];
/** Calls fn(status, error) after every poll of /admin/status. */
export function onStatus(fn) { listeners.push(fn); }

let charts = null;
const counters = []; // [{t, completion, prompt}] from /metrics, the last TOKENS_WINDOW_S seconds and one more
const debug = (window.tidepool ||= {});

function makeCharts() {
  const mib = (v) => bytes(v);
  return {
    requests: rollingChart($("chart-requests"), {
      series: [
        { label: "req/s", color: COLORS.teal, fill: true },
        { label: "in flight", color: COLORS.orange, scale: "n", stepped: true, fmt: (v) => v.toFixed(0) },
      ],
      scales: { n: { range: (u, min, max) => [0, Math.max(max * 1.15, 1)] } },
      axes: [{ size: 40 }, { scale: "n", side: 1, size: 34, incrs: INT_INCRS }],
    }),
    queue: rollingChart($("chart-queue"), {
      series: [
        { label: "interactive", color: COLORS.red, stepped: true, fmt: (v) => v.toFixed(0) },
        { label: "standard", color: COLORS.teal, stepped: true, fmt: (v) => v.toFixed(0) },
        { label: "batch", color: COLORS.purple, stepped: true, fmt: (v) => v.toFixed(0) },
      ],
      axes: [{ size: 34, incrs: INT_INCRS }],
    }),
    workers: rollingChart($("chart-workers"), {
      series: [
        { label: "ready", color: COLORS.green, stepped: true, fill: true, fmt: (v) => v.toFixed(0) },
        { label: "loading", color: COLORS.blue, stepped: true, fmt: (v) => v.toFixed(0) },
        { label: "draining", color: COLORS.orange, stepped: true, fmt: (v) => v.toFixed(0) },
        { label: "target", color: COLORS.grey, stepped: true, dash: [5, 4], width: 1.5, fmt: (v) => v.toFixed(0) },
      ],
      axes: [{ size: 34, incrs: INT_INCRS }],
    }),
    memory: rollingChart($("chart-memory"), {
      series: [
        { label: "reserved", color: COLORS.teal, fill: true, fmt: mib },
        { label: "resident (RSS)", color: COLORS.orange, fmt: mib },
      ],
      axes: [{ size: 64, fmt: mib, incrs: BYTE_INCRS }],
    }),
    tokens: rollingChart($("chart-tokens"), {
      series: [
        { label: "generated/s", color: COLORS.purple, fill: true },
        { label: "prompt/s", color: COLORS.grey, width: 1.4 },
      ],
      axes: [{ size: 44 }],
    }),
    machine: rollingChart($("chart-machine"), {
      series: [
        { label: "hottest °C", color: COLORS.red, scale: "c", fmt: (v) => `${v.toFixed(0)} °C` },
        { label: "battery %", color: COLORS.green, scale: "pct", fmt: (v) => `${v.toFixed(0)} %` },
        { label: "CPU %", color: COLORS.grey, scale: "pct", width: 1.2, fmt: (v) => `${v.toFixed(0)} %` },
      ],
      scales: {
        c: { range: (u, min, max) => [Math.min(30, min ?? 30), Math.max(100, max ?? 100)] },
        pct: { range: [0, 100] },
      },
      axes: [{ scale: "c", size: 40, fmt: (v) => `${v}°` }, { scale: "pct", side: 1, size: 40, fmt: (v) => `${v}%` }],
    }),
  };
}

/** tokens/s over the last few seconds, from /metrics' tidepool_tokens_total counters. */
async function tokensPerSecond() {
  let parsed;
  try {
    parsed = parsePrometheus(await get("/metrics", { text: true }));
  } catch {
    return [null, null];
  }
  const now = performance.now() / 1000;
  const cur = {
    t: now,
    completion: sample(parsed, "tidepool_tokens_total", { kind: "completion" }) ?? 0,
    prompt: sample(parsed, "tidepool_tokens_total", { kind: "prompt" }) ?? 0,
  };
  counters.push(cur);
  while (counters.length > 2 && now - counters[1].t >= TOKENS_WINDOW_S) counters.shift();
  const first = counters[0];
  const dt = cur.t - first.t;
  if (dt < 0.5) return [null, null];
  return [(cur.completion - first.completion) / dt, (cur.prompt - first.prompt) / dt];
}

function maxCelsius(machine) {
  if (!machine) return null;
  let best = null;
  for (const s of machine.system?.temperatures || []) if (best == null || s.celsius > best) best = s.celsius;
  for (const g of machine.gpus?.gpus || []) if (g.celsius != null && (best == null || g.celsius > best)) best = g.celsius;
  return best;
}

function renderTiles(s, tps) {
  const q = s.queue || {};
  const queued = Object.values(q).reduce((a, b) => a + b, 0);
  const ready = s.workers.filter((w) => w.state === "ready").length;
  $("tile-rate").textContent = num(s.signals?.arrival_rate ?? 0, 2);
  $("tile-inflight").textContent = s.in_flight;
  $("tile-queued").textContent = queued;
  $("tile-queued-sub").textContent = `${q.interactive ?? 0} int · ${q.standard ?? 0} std · ${q.batch ?? 0} batch`;
  $("tile-workers").textContent = `${ready} / ${s.decision?.workers ?? "–"}`;
  $("tile-tps").textContent = tps == null ? "–" : num(tps, 1);
  $("tile-mem").textContent = bytes(s.memory?.reserved_bytes);
  $("tile-mem-sub").textContent = `RSS ${bytes(s.memory?.process_rss_bytes)}`;
  $("tile-mem-sub").title = `budget ${bytes(s.memory?.budget_bytes)}`;

  const c = maxCelsius(s.machine);
  const thermal = s.power?.thermal;
  $("tile-temp").textContent = c == null ? "–" : `${c.toFixed(0)} °C`;
  $("tile-temp-sub").textContent = c == null ? "no sensor" : thermal && thermal !== "normal" ? thermal : "normal";
  const b = s.machine?.battery;
  if (b && b.state === "present") {
    $("tile-battery").textContent = `${b.percent.toFixed(0)} %`;
    $("tile-battery-sub").textContent = b.on_ac ? "on AC" : b.time_to_empty_s ? `on battery · ${duration(b.time_to_empty_s)} left` : "on battery";
  } else {
    $("tile-battery").textContent = "–";
    $("tile-battery-sub").textContent = "no battery";
  }
}

function renderDecision(s) {
  const d = s.decision;
  $("decision-workers").textContent = d ? `${d.workers} worker${d.workers === 1 ? "" : "s"}` : "–";
  $("decision-reason").textContent = d ? d.reason : "waiting for the first tick…";
  const p = s.power;
  if (p) {
    $("power-effective").textContent = p.mode === p.effective || p.mode !== "auto" ? p.effective : `${p.effective} (auto)`;
    $("power-reason").textContent = [p.reason === `${p.effective} mode` ? "" : p.reason, p.shed ? "shedding batch requests" : "", s.cpu_cores_in_use ? `${s.cpu_cores_in_use} CPU cores in use` : ""].filter(Boolean).join(" · ");
  } else {
    $("power-effective").textContent = "–";
    $("power-reason").textContent = "no machine readings yet";
  }
}

let workersKey = "";
function renderWorkers(s) {
  const key = JSON.stringify(s.workers.map((w) => [w.id, w.state, w.slots_busy, w.slots_total, w.device, w.reserved_bytes, Math.floor(w.age_s)]));
  if (key === workersKey) return;
  workersKey = key;
  const body = $("workers-body");
  body.replaceChildren();
  if (!s.workers.length) {
    body.append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No workers running (the pool scales from zero on the next request).")));
    return;
  }
  for (const w of s.workers) {
    const slots = el("span", { class: "slotbar", "aria-hidden": "true" },
      Array.from({ length: Math.min(w.slots_total, 16) }, (_, i) => el("i", { class: i < w.slots_busy ? "on" : "" })));
    body.append(el("tr", { "data-worker": w.id, "data-state": w.state },
      el("td", {}, `#${w.id}`),
      el("td", {}, el("span", { class: `state ${w.state}` }, w.state)),
      el("td", {}, w.device || "–"),
      el("td", {}, el("span", { class: "slots" }, slots, `${w.slots_busy}/${w.slots_total}`)),
      el("td", {}, bytes(w.reserved_bytes)),
      el("td", {}, duration(w.age_s)),
    ));
  }
}

let eventsKey = "";
function renderEvents(events) {
  const key = events.length + ":" + (events.length ? events[events.length - 1].at : "");
  if (key === eventsKey) return;
  eventsKey = key;
  debug.events = events;
  const list = $("events-list");
  list.replaceChildren();
  $("events-count").textContent = events.length ? `${events.length} recent, newest first` : "";
  if (!events.length) {
    list.append(el("li", { class: "muted" }, "No events yet."));
    return;
  }
  for (const e of events.slice().reverse().slice(0, 150)) {
    const head = el("div", { class: "ev-head" },
      e.worker != null ? el("span", { class: "ev-worker" }, `worker #${e.worker}`) : el("span", { class: "ev-worker" }, "pool"),
      e.from ? el("span", { class: `state ${e.from}` }, e.from) : null,
      e.from || e.to ? el("span", { class: "arrow" }, "→") : null,
      e.to ? el("span", { class: `state ${e.to}` }, e.to) : null,
    );
    list.append(el("li", {},
      el("time", { datetime: new Date(e.at * 1000).toISOString() }, clock(e.at)),
      // "loading: scale up: …" repeats the state the badges show; keep the reason.
      el("div", {}, head, el("div", { class: "ev-msg" }, e.to && e.message.startsWith(`${e.to}: `) ? e.message.slice(e.to.length + 2) : e.message))));
  }
}

function pushCharts(s, tps, pps) {
  const t = Date.now() / 1000;
  const q = s.queue || {};
  const count = (st) => s.workers.filter((w) => w.state === st).length;
  charts.requests.push(t, [s.signals?.arrival_rate ?? 0, s.in_flight]);
  charts.queue.push(t, [q.interactive ?? 0, q.standard ?? 0, q.batch ?? 0]);
  charts.workers.push(t, [count("ready"), count("loading"), count("draining"), s.decision?.workers]);
  charts.memory.push(t, [s.memory?.reserved_bytes, s.memory?.process_rss_bytes]);
  charts.tokens.push(t, [tps, pps]);
  const b = s.machine?.battery;
  charts.machine.push(t, [maxCelsius(s.machine), b && b.state === "present" ? b.percent : null, s.machine?.system?.cpu_percent]);
  const noSensors = maxCelsius(s.machine) == null && !(b && b.state === "present");
  const note = $("machine-note");
  note.hidden = !noSensors;
  note.textContent = noSensors ? "No temperature sensor or battery is readable on this machine; CPU load only." : "";
}

debug.series = () => charts && Object.fromEntries(Object.entries(charts).map(([k, c]) => [k, c.data]));

async function pollStatus() {
  let status = null;
  let error = null;
  try {
    status = await get("/admin/status");
  } catch (e) {
    error = e;
  }
  if (status) {
    const [tps, pps] = await tokensPerSecond();
    debug.status = status;
    debug.tokensPerSecond = tps;
    debug.polls = (debug.polls || 0) + 1;
    const hold = $("scale-workers");
    if (!hold.dataset.touched && status.decision) hold.value = status.decision.workers;
    renderTiles(status, tps);
    renderDecision(status);
    renderWorkers(status);
    pushCharts(status, tps, pps);
  }
  for (const fn of listeners) fn(status, error);
}

async function pollEvents() {
  try {
    const r = await get("/admin/events");
    renderEvents(r.events || []);
  } catch { /* the status poll reports the connection */ }
}

function loop(fn, ms) {
  const tick = async () => {
    const start = performance.now();
    await fn();
    setTimeout(tick, Math.max(50, ms - (performance.now() - start)));
  };
  tick();
}

function wireScale() {
  $("scale-workers").addEventListener("input", (ev) => { ev.target.dataset.touched = "1"; });
  $("scale-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const msg = $("scale-msg");
    const workers = Number($("scale-workers").value);
    const ttl_s = Number($("scale-ttl").value);
    try {
      const r = await post("/admin/scale", { workers, ttl_s });
      msg.className = "form-msg ok";
      msg.textContent = `Holding ${workers} worker${workers === 1 ? "" : "s"} for ${duration(ttl_s)}: ${r.decision?.reason ?? ""}`;
    } catch (e) {
      msg.className = "form-msg bad";
      msg.textContent = e instanceof ApiError ? e.message : String(e);
    }
  });
}

export function startDashboard() {
  charts = makeCharts();
  wireScale();
  loop(pollStatus, POLL_MS);
  loop(pollEvents, 2 * POLL_MS);
}
