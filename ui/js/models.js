// The model picker: the catalog from GET /admin/models (where the server has it), with download
// progress while POST /admin/models/pull runs, and "Use" to switch the served model
// (PUT /admin/model). Without that endpoint it shows the served model.

import { get, post, request, ApiError } from "./api.js";
import { $, el, bytes } from "./format.js";

let timer = null;
let available = true;

function stateOf(m) {
  const d = m.download;
  if (d && d.state === "downloading") {
    const pct = d.total ? (100 * d.bytes) / d.total : 0;
    return el("div", {},
      el("div", { class: "progress", role: "progressbar", "aria-label": `Downloading ${m.id}`, "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct.toFixed(0) },
        el("i", { style: `width:${pct.toFixed(1)}%` })),
      el("div", { class: "model-state" }, `${bytes(d.bytes)} of ${d.total ? bytes(d.total) : "?"} · ${pct.toFixed(0)} %`));
  }
  if (d && d.state === "failed") return el("div", { class: "model-state" }, el("span", { class: "bad" }, `Download failed: ${d.error || "unknown error"}`));
  if (m.active) return el("div", { class: "model-state" }, el("span", { class: "state ready" }, "serving"));
  if (m.downloaded) return el("div", { class: "model-state" }, el("span", { class: "state" }, "downloaded"));
  return el("div", { class: "model-state muted" }, "not downloaded");
}

function render(models, sw) {
  const list = $("models-list");
  list.replaceChildren();
  const switching = sw && sw.state === "switching";
  for (const m of models) {
    const downloading = m.download && m.download.state === "downloading";
    const action = m.active
      ? el("span", { class: "muted small" }, "")
      : m.downloaded
      ? el("button", {
          type: "button", class: "btn small", disabled: switching, "aria-label": `Use ${m.id}`,
          onclick: () => use(m.id),
        }, switching && sw.id === m.id ? "Loading…" : "Use")
      : el("button", {
          type: "button", class: "btn small", disabled: downloading, "aria-label": `Download ${m.id}`,
          onclick: () => pull(m.id),
        }, downloading ? "Downloading" : m.download?.state === "failed" ? "Retry" : "Download");
    list.append(el("li", { "data-model": m.id },
      el("div", {}, el("div", { class: "model-name" }, m.name || m.id), el("div", { class: "model-id" }, [m.name && m.name !== m.id ? m.id : "", m.size_bytes ? bytes(m.size_bytes) : ""].filter(Boolean).join(" · "))),
      stateOf(m),
      el("div", {}, action)));
  }
  const active = models.find((m) => m.active);
  $("models-active").textContent = active ? `serving ${active.id}` : "";
  if (sw) {
    const msg = $("models-msg");
    if (sw.state === "switching") { msg.className = "form-msg"; msg.textContent = `Loading ${sw.id}; the current model serves until it is ready…`; }
    else if (sw.state === "failed") { msg.className = "form-msg bad"; msg.textContent = `Could not switch to ${sw.id}: ${sw.error}`; }
    else if (sw.state === "done" && active && active.id === sw.id) { msg.className = "form-msg"; msg.textContent = `Now serving ${sw.id}.`; }
  }
  return switching || models.some((m) => m.download && m.download.state === "downloading");
}

async function fallback() {
  // The server has no model catalog endpoint: show what it serves, from the OpenAI API.
  $("models-unavailable").hidden = false;
  try {
    const r = await get("/v1/models");
    render((r.data || []).map((m, i) => ({ id: m.id, name: m.id, active: i === 0, downloaded: true })));
  } catch { /* the header shows the connection */ }
}

async function load() {
  if (!available) return;
  clearTimeout(timer);
  try {
    const r = await get("/admin/models");
    $("models-unavailable").hidden = true;
    const busy = render(r.models || [], r.switch);
    timer = setTimeout(load, busy ? 1000 : 10000);
  } catch (e) {
    if (e instanceof ApiError && (e.status === 404 || e.status === 405)) {
      available = false;
      fallback();
    } else {
      $("models-msg").className = "form-msg bad";
      $("models-msg").textContent = e.message;
      timer = setTimeout(load, 5000);
    }
  }
}

async function pull(id) {
  const msg = $("models-msg");
  msg.textContent = "";
  try {
    await post("/admin/models/pull", { id });
    msg.className = "form-msg";
    msg.textContent = `Downloading ${id}…`;
  } catch (e) {
    msg.className = "form-msg bad";
    msg.textContent = e.message;
  }
  load();
}

async function use(id) {
  const msg = $("models-msg");
  try {
    await request("PUT", "/admin/model", { id });
  } catch (e) {
    msg.className = "form-msg bad";
    msg.textContent = e.message;
  }
  load();
}

export function startModels() {
  load();
  return { refresh: () => { if (available) load(); } };
}
