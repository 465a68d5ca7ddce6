// The chat playground: POST /v1/chat/completions with stream: true, read as server-sent events
// through fetch(), each delta appended as it arrives. TTFT is measured here (send → first
// content); tokens/s comes from the final usage chunk over the time from first to last token.

import { API, get, parseErrorBody } from "./api.js";
import { sseParser } from "./sse.js";
import { $, el, num } from "./format.js";

let turns = []; // [{role, content}] of the conversation so far (without the system prompt)
let controller = null;

async function loadModels() {
  const select = $("chat-model");
  try {
    const r = await get("/v1/models");
    const ids = (r.data || []).map((m) => m.id);
    const current = select.value;
    select.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
    if (ids.includes(current)) select.value = current;
  } catch {
    if (!select.options.length) select.append(el("option", { value: "" }, "(server default)"));
  }
}

function scrollDown() {
  const t = $("chat-transcript");
  t.scrollTop = t.scrollHeight;
}

function addMessage(role, text) {
  $("chat-empty").hidden = true;
  const m = el("div", { class: `msg ${role}`, "data-role": role }, text);
  $("chat-transcript").append(m);
  scrollDown();
  return m;
}

function setBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").hidden = !busy;
}

function showStats(stats) {
  const box = $("chat-stats");
  box.replaceChildren();
  const item = (label, value, key) => el("span", { "data-stat": key }, `${label} `, el("b", {}, value));
  if (stats.ttft != null) box.append(item("TTFT", `${Math.round(stats.ttft * 1000)} ms`, "ttft"));
  if (stats.completion != null) box.append(item("tokens", `${stats.completion}`, "tokens"));
  if (stats.prompt != null) box.append(item("prompt", `${stats.prompt}`, "prompt"));
  if (stats.tps != null) box.append(item("speed", `${num(stats.tps, 1)} tokens/s`, "tps"));
  if (stats.total != null) box.append(item("total", `${stats.total.toFixed(2)} s`, "total"));
  if (stats.finish) box.append(item("finish", stats.finish, "finish"));
  if (stats.note) box.append(el("span", { class: "muted" }, stats.note));
}

async function send(text) {
  const body = {
    model: $("chat-model").value || undefined,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("chat-max-tokens").value) || undefined,
    temperature: $("chat-temperature").value === "" ? undefined : Number($("chat-temperature").value),
    messages: [],
  };
  const system = $("chat-system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  turns.push({ role: "user", content: text });
  body.messages.push(...turns);

  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  setBusy(true);
  showStats({ note: "waiting for the first token…" });

  controller = new AbortController();
  const t0 = performance.now();
  let tFirst = null;
  let tLast = null;
  let content = "";
  let usage = null;
  let finish = null;
  let streamError = null;

  try {
    const res = await fetch(`${API}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", "X-Tidepool-Priority": $("chat-priority").value },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!res.ok) throw parseErrorBody(res.status, await res.text());

    const feed = sseParser((data) => {
      if (data === "[DONE]") return;
      let chunk;
      try { chunk = JSON.parse(data); } catch { return; }
      if (chunk.error) { streamError = chunk.error.message || "generation failed"; return; }
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.finish_reason) finish = choice.finish_reason;
      const delta = choice.delta && choice.delta.content;
      if (delta) {
        const now = performance.now();
        if (tFirst == null) {
          tFirst = now;
          showStats({ ttft: (tFirst - t0) / 1000, note: "streaming…" });
        }
        tLast = now;
        content += delta;
        reply.textContent = content;
        scrollDown();
      }
    });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      feed(value);
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else streamError = e.message || String(e);
  } finally {
    controller = null;
    reply.classList.remove("streaming");
    setBusy(false);
  }

  if (content) turns.push({ role: "assistant", content });
  else if (!streamError) reply.textContent = "(no text)";
  if (!content && streamError) reply.remove();
  if (streamError) addMessage("error", streamError);

  const end = tLast ?? performance.now();
  const completion = usage?.completion_tokens ?? null;
  const decodeS = tFirst != null && tLast != null ? (tLast - tFirst) / 1000 : 0;
  showStats({
    ttft: tFirst != null ? (tFirst - t0) / 1000 : null,
    completion,
    prompt: usage?.prompt_tokens ?? null,
    tps: completion != null && completion > 1 && decodeS > 0 ? (completion - 1) / decodeS : null,
    total: (end - t0) / 1000,
    finish: finish || (streamError ? "error" : null),
  });
  $("chat-stats").dataset.done = "true";
}

export function startChat() {
  loadModels();
  const input = $("chat-input");
  $("chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    delete $("chat-stats").dataset.done;
    send(text);
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-stop").addEventListener("click", () => controller && controller.abort());
  $("chat-clear").addEventListener("click", () => {
    if (controller) controller.abort();
    turns = [];
    $("chat-transcript").replaceChildren($("chat-empty"));
    $("chat-empty").hidden = false;
    $("chat-stats").replaceChildren();
  });
  return { reloadModels: loadModels };
}
