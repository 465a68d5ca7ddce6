// How the dashboard reaches the server: over HTTP, the same way in a browser and in the tray app.
//
// The server's address: `window.TIDEPOOL_API` (the tray app may set it), else `?api=` in the page's
// address, else the page's own origin when the server served the page, else the default port.

function apiBase() {
  if (typeof location === "undefined") return "http://127.0.0.1:8433"; // not in a browser (unit tests)
  const fromWindow = typeof window !== "undefined" && window.TIDEPOOL_API;
  if (fromWindow) return String(fromWindow).replace(/\/$/, "");
  const fromQuery = new URLSearchParams(location.search).get("api");
  if (fromQuery) return fromQuery.replace(/\/$/, "");
  if (/^https?:$/.test(location.protocol) && location.hostname !== "tauri.localhost") return location.origin;
  return "http://127.0.0.1:8433";
}

export const API = apiBase();

/** An HTTP answer that was not 2xx, with the server's OpenAI-shaped error when it sent one. */
export class ApiError extends Error {
  constructor(status, message, param = null, code = null) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }
}

/** The message of an OpenAI-shaped error body (`{"error": {"message", "param", ...}}`), or the text. */
export function parseErrorBody(status, text) {
  try {
    const body = JSON.parse(text);
    const e = body && body.error;
    if (e && typeof e === "object") return new ApiError(status, e.message || `HTTP ${status}`, e.param ?? null, e.code ?? null);
    if (typeof e === "string") return new ApiError(status, e);
  } catch { /* not JSON */ }
  return new ApiError(status, text.trim() || `HTTP ${status}`);
}

/** fetch() against the server; JSON in, JSON (or text) out; throws ApiError on non-2xx. */
export async function request(method, path, body, { text = false, signal, headers = {} } = {}) {
  const init = { method, signal, headers: { ...headers } };
  // The server takes state-changing admin requests only as JSON (a web page's form or text/plain
  // POST never is), so every non-GET request sends a JSON body, empty or not.
  if (body === undefined && method !== "GET" && method !== "HEAD") body = {};
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(API + path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `cannot reach the server at ${API}`);
  }
  const raw = await res.text();
  if (!res.ok) throw parseErrorBody(res.status, raw);
  if (text) return raw;
  return raw ? JSON.parse(raw) : null;
}

export const get = (path, opts) => request("GET", path, undefined, opts);
export const put = (path, body) => request("PUT", path, body);
export const post = (path, body) => request("POST", path, body);
