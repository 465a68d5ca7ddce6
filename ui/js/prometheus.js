// Reads the Prometheus text format of GET /metrics into {name: [{labels, value}]}.

export function parsePrometheus(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const l of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    }
    const value = Number(m[4]);
    (out[m[1]] ||= []).push({ labels, value });
  }
  return out;
}

/** The value of one series: the first sample of `name` whose labels include `match`. */
export function sample(parsed, name, match = {}) {
  const list = parsed[name] || [];
  const s = list.find((x) => Object.entries(match).every(([k, v]) => x.labels[k] === v));
  return s ? s.value : null;
}
