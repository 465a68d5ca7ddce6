// Settings: the live policy and power config (GET/PUT /admin/config), LAN sharing
// (GET/PUT /admin/sharing, POST /admin/sharing/rotate, where the server has them) and the
// server's start-time settings, shown read-only.

import { API, get, put, post, ApiError } from "./api.js";
import { $, el, bytes } from "./format.js";

let config = null; // the last {policy, power} from the server
let dirty = { policy: false, power: false };

/** Reads "up.window_s" out of an object. */
const pick = (obj, path) => path.split(".").reduce((o, k) => (o == null ? o : o[k]), obj);
/** Writes "up.window_s" into an object. */
function assign(obj, path, value) {
  const keys = path.split(".");
  let o = obj;
  for (const k of keys.slice(0, -1)) o = o[k] ||= {};
  o[keys[keys.length - 1]] = value;
}

function fillForm(form, section) {
  for (const input of form.querySelectorAll("input[name], select[name]")) {
    const v = pick(section, input.name);
    if (input.type === "checkbox") input.checked = !!v;
    else input.value = v ?? "";
  }
}

function clearErrors(form) {
  for (const f of form.querySelectorAll(".field.invalid")) f.classList.remove("invalid");
  for (const e of form.querySelectorAll(".field-err")) e.textContent = "";
}

/** Shows a 400's message next to the field it names (`param`), else under the form. */
function showError(form, msgEl, err) {
  const field = err.param && form.querySelector(`[data-param="${CSS.escape(err.param)}"]`);
  if (field) {
    field.classList.add("invalid");
    // The message names the key (`policy.min_workers` 9 is above …); next to the field it need not.
    field.querySelector(".field-err").textContent = err.message.replace(/^`[^`]+`\s*/, "");
    msgEl.className = "form-msg bad";
    msgEl.textContent = "Not saved: see the highlighted field.";
  } else {
    msgEl.className = "form-msg bad";
    msgEl.textContent = err.message || String(err);
  }
}

/** The form's values over a copy of `base`: numbers as numbers, the rest as text. */
function readForm(form, base) {
  const out = structuredClone(base);
  for (const input of form.querySelectorAll("input[name], select[name]")) {
    let v = input.value;
    if (input.type === "number") v = v === "" ? NaN : Number(v);
    assign(out, input.name, v);
  }
  return out;
}

async function loadConfig(force = false) {
  try {
    config = await get("/admin/config");
  } catch (e) {
    $("policy-msg").className = "form-msg bad";
    $("policy-msg").textContent = e.message;
    return;
  }
  if (force || !dirty.policy) fillForm($("policy-form"), config.policy);
  if (force || !dirty.power) fillForm($("power-form"), config.power);
}

function wireConfigForm(formId, section, msgId) {
  const form = $(formId);
  form.addEventListener("input", () => { dirty[section] = true; });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const msg = $(msgId);
    clearErrors(form);
    if (!config) await loadConfig();
    if (!config) return;
    const blank = [...form.querySelectorAll("input[type=number][name]")].filter((i) => i.value === "" || !isFinite(Number(i.value)));
    for (const i of blank) {
      const field = i.closest(".field");
      field.classList.add("invalid");
      field.querySelector(".field-err").textContent = "Enter a number.";
    }
    if (blank.length) {
      msg.className = "form-msg bad";
      msg.textContent = "Not saved: see the highlighted field.";
      return;
    }
    const body = { [section]: readForm(form, config[section]) };
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      config = await put("/admin/config", body);
      dirty[section] = false;
      fillForm(form, config[section]);
      msg.className = "form-msg ok";
      msg.textContent = `Saved ${new Date().toLocaleTimeString([], { hour12: false })}; in force from the next tick.`;
    } catch (e) {
      if (e instanceof ApiError) showError(form, msg, e);
      else { msg.className = "form-msg bad"; msg.textContent = String(e); }
    } finally {
      button.disabled = false;
    }
  });
}

// ── LAN sharing ──

let sharing = null;

function renderSharing(s) {
  sharing = s;
  $("sharing-unavailable").hidden = true;
  $("sharing-body").hidden = false;
  $("set-sharing").checked = !!s.enabled;
  $("sharing-details").hidden = !s.enabled;
  const token = s.token || "";
  if (!token && s.token_set) revealToken();
  const urls = s.urls || [];
  $("sharing-urls").replaceChildren(...(urls.length ? urls.map((u) => el("li", {}, u)) : [el("li", { class: "muted" }, "no LAN address found")]));
  $("sharing-token").textContent = token || "–";
  if (document.activeElement !== $("set-sharing-rate")) $("set-sharing-rate").value = s.rate_per_minute ?? "";
  const badge = $("badge-lan");
  badge.hidden = false;
  badge.className = s.enabled ? "badge ok" : "badge muted";
  badge.textContent = s.enabled ? `LAN shared${urls[0] ? " · " + urls[0].replace(/^https?:\/\//, "") : ""}` : "LAN off";
}

// The server hands the token only to this page's own origin, on a POST (a browser's GET carries
// no Origin header, so GET /admin/sharing leaves the token out).
async function revealToken() {
  try {
    const r = await post("/admin/sharing/token");
    if (sharing) sharing.token = r.token;
    $("sharing-token").textContent = r.token || "–";
  } catch (e) {
    $("sharing-token").textContent = "–";
  }
}

function sharingUnavailable() {
  $("sharing-unavailable").hidden = false;
  $("sharing-body").hidden = true;
  $("badge-lan").hidden = true;
}

async function loadSharing() {
  try {
    renderSharing(await get("/admin/sharing"));
  } catch (e) {
    if (e instanceof ApiError && (e.status === 404 || e.status === 405)) sharingUnavailable();
    else { $("sharing-msg").className = "form-msg bad"; $("sharing-msg").textContent = e.message; }
  }
}

async function changeSharing(action) {
  const msg = $("sharing-msg");
  msg.textContent = "";
  try {
    renderSharing(await action());
    return true;
  } catch (e) {
    msg.className = "form-msg bad";
    msg.textContent = e.message;
    return false;
  }
}

function wireSharing() {
  $("set-sharing").addEventListener("change", async (ev) => {
    const ok = await changeSharing(() => put("/admin/sharing", { enabled: ev.target.checked }));
    if (!ok) ev.target.checked = !ev.target.checked;
  });
  $("set-sharing-rate").addEventListener("change", async (ev) => {
    const field = ev.target.closest(".field");
    field.classList.remove("invalid");
    field.querySelector(".field-err").textContent = "";
    const rate = Number(ev.target.value);
    try {
      renderSharing(await put("/admin/sharing", { enabled: !!sharing?.enabled, rate_per_minute: rate }));
      $("sharing-msg").className = "form-msg ok";
      $("sharing-msg").textContent = "Saved.";
    } catch (e) {
      field.classList.add("invalid");
      field.querySelector(".field-err").textContent = e.message;
    }
  });
  $("sharing-rotate").addEventListener("click", async () => {
    if (!confirm("Rotate the token? LAN clients using the old one will be refused.")) return;
    if (await changeSharing(() => post("/admin/sharing/rotate"))) {
      $("sharing-msg").className = "form-msg ok";
      $("sharing-msg").textContent = "New token made; the old one no longer works.";
    }
  });
  $("sharing-copy").addEventListener("click", async () => {
    const text = sharing?.token || "";
    const msg = $("sharing-msg");
    try {
      await navigator.clipboard.writeText(text);
      msg.className = "form-msg ok";
      msg.textContent = "Token copied.";
    } catch {
      // Clipboard API refused (an insecure origin): select the token so Ctrl+C copies it.
      const range = document.createRange();
      range.selectNodeContents($("sharing-token"));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      msg.className = "form-msg";
      msg.textContent = "Token selected: press Ctrl+C (or ⌘C) to copy.";
    }
  });
}

/** Fills the read-only parts from each /admin/status poll. */
export function settingsOnStatus(s) {
  if (!s) return;
  $("server-model").textContent = s.model;
  $("server-address").textContent = API;
  $("server-budget").textContent = `${bytes(s.memory?.budget_bytes)} (${bytes(s.memory?.reserved_bytes)} reserved)`;
  $("server-cores").textContent = s.cpu_cores_in_use ?? "–";
  const p = s.power;
  $("set-power-effective").textContent = p ? p.effective : "–";
  const caps = p ? [
    p.reason !== `${p.effective} mode` ? p.reason : "",
    p.max_workers != null ? `at most ${p.max_workers} worker${p.max_workers === 1 ? "" : "s"}` : "",
    p.slots_per_worker != null ? `${p.slots_per_worker} slot${p.slots_per_worker === 1 ? "" : "s"} per worker` : "",
    p.cpu_threads != null ? `${p.cpu_threads} CPU core${p.cpu_threads === 1 ? "" : "s"}` : "",
    p.shed ? "shedding batch requests" : "",
  ].filter(Boolean) : [];
  $("set-power-reason").textContent = caps.length ? `· ${caps.join(" · ")}` : "";
}

export function startSettings() {
  wireConfigForm("policy-form", "policy", "policy-msg");
  wireConfigForm("power-form", "power", "power-msg");
  wireSharing();
  loadConfig(true);
  loadSharing();
  return {
    // Called when the Settings tab is opened: show what the server has now, unless being edited.
    refresh() { loadConfig(); loadSharing(); },
  };
}
