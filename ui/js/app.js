// Entry point: tabs, the header's badges, and the views.

import { startDashboard, onStatus } from "./dashboard.js";
import { startChat } from "./chat.js";
import { startSettings, settingsOnStatus } from "./settings.js";
import { startModels } from "./models.js";
import { API } from "./api.js";
import { $ } from "./format.js";

const VIEWS = ["dashboard", "chat", "models", "settings"];
let views = {};

function showTab() {
  const name = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "dashboard";
  for (const v of VIEWS) {
    $(`view-${v}`).hidden = v !== name;
    $(`tab-${v}`).setAttribute("aria-selected", String(v === name));
  }
  if (name === "settings") views.settings?.refresh();
  if (name === "models") views.models?.refresh();
  if (name === "chat") { views.chat?.reloadModels(); $("chat-input").focus(); }
}

function badge(id, text, kind, title) {
  const b = $(id);
  b.textContent = text;
  b.className = `badge ${kind || ""}`;
  if (title) b.title = title;
}

function headerOnStatus(s, err) {
  const banner = $("conn-error");
  if (s) {
    banner.hidden = true;
    badge("badge-model", s.model, "plain");
    const shedding = s.shedding || s.power?.shed;
    badge("badge-status", shedding ? "ready · shedding load" : "ready", shedding ? "warn" : "ok", s.decision?.reason);
    const p = s.power;
    if (p) {
      const bits = [p.effective];
      if (p.on_battery) bits.push(p.battery_percent != null ? `battery ${p.battery_percent.toFixed(0)} %` : "on battery");
      if (p.thermal && p.thermal !== "normal") bits.push(p.thermal);
      const kind = p.thermal === "critical" ? "bad" : p.thermal === "warm" || p.on_battery ? "warn" : "";
      badge("badge-power", bits.join(" · "), kind, p.reason);
    } else {
      badge("badge-power", "power: no readings", "muted");
    }
    document.title = `Tidepool · ${s.model}`;
  } else if (err && err.status === 503) {
    badge("badge-status", "loading", "warn", err.message);
    banner.hidden = true;
  } else if (err) {
    badge("badge-status", "offline", "bad", err.message);
    banner.hidden = false;
    banner.textContent = `Cannot reach Tidepool at ${API} (${err.message}). Retrying every second…`;
  }
  settingsOnStatus(s);
}

window.addEventListener("hashchange", showTab);
// With <base href="/ui/"> a plain link to "#chat" would load /ui/#chat anew; switch in place.
for (const v of VIEWS) {
  $(`tab-${v}`).addEventListener("click", (ev) => {
    ev.preventDefault();
    if (location.hash !== `#${v}`) history.pushState(null, "", `${location.pathname}${location.search}#${v}`);
    showTab();
  });
}
window.addEventListener("popstate", showTab);
onStatus(headerOnStatus);
startDashboard();
views = { chat: startChat(), settings: startSettings(), models: startModels() };
showTab();
