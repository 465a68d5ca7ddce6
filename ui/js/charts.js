// Rolling time-series charts over uPlot (loaded as the global `uPlot` from vendor/).

export const COLORS = {
  teal: "#0f7b8a",
  orange: "#e08a1e",
  purple: "#7b5fc7",
  green: "#1f8a4c",
  red: "#c0392b",
  grey: "#8a96a3",
  blue: "#2f6fd6",
};

const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

/**
 * A chart of `series` ([{label, color, dash?, scale?, stepped?, fill?}]) over time, fed with
 * push(t, [values...]); keeps the last `keep` points. `axes` gives each scale's formatter.
 */
export function rollingChart(container, { series, keep = 300, scales = {}, axes = [], yRange }) {
  const data = [[], ...series.map(() => [])];
  const grid = { stroke: css("--line") || "#e2e7ec", width: 1 };
  const ink = css("--muted") || "#7a8794";
  const stepped = typeof uPlot !== "undefined" ? uPlot.paths.stepped({ align: 1 }) : null;

  const opts = {
    width: Math.max(200, container.clientWidth),
    height: 170,
    cursor: { drag: { x: false, y: false }, points: { size: 6 } },
    legend: { live: true },
    hooks: {
      // Out of the chart the legend shows the latest values, not dashes.
      setData: [(u) => { if (u.cursor.idx == null) showLatest(u); }],
      setCursor: [(u) => { if (u.cursor.idx == null) showLatest(u); }],
    },
    scales: { x: { time: true }, y: { range: yRange || ((u, min, max) => [0, Math.max(max * 1.15, 1)]) }, ...scales },
    series: [
      { value: (u, v) => (v == null ? "–" : new Date(v * 1000).toLocaleTimeString([], { hour12: false })) },
      ...series.map((s) => ({
        label: s.label,
        stroke: s.color,
        width: s.width ?? 1.8,
        dash: s.dash,
        scale: s.scale || "y",
        fill: s.fill ? s.color + "1f" : undefined,
        paths: s.stepped ? stepped : undefined,
        points: { show: false },
        spanGaps: false,
        value: (u, v) => (v == null ? "–" : (s.fmt || defaultFmt)(v)),
      })),
    ],
    axes: [
      { stroke: ink, grid, ticks: { show: false }, size: 24, space: 70, font: "11px system-ui, sans-serif",
        values: (u, ticks) => ticks.map((t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false, hour: "2-digit", minute: "2-digit", second: "2-digit" })) },
      ...(axes.length ? axes : [{}]).map((a) => ({
        stroke: ink,
        grid: a.side === 1 ? { show: false } : grid,
        ticks: { show: false },
        font: "11px system-ui, sans-serif",
        size: a.size ?? 44,
        scale: a.scale || "y",
        side: a.side ?? 3,
        values: a.fmt ? (u, vals) => vals.map((v) => a.fmt(v)) : undefined,
        incrs: a.incrs,
      })),
    ],
  };
  if (typeof uPlot === "undefined") {
    // The chart library did not load: keep the rest of the dashboard alive and say so.
    container.textContent = "Charts are unavailable: the chart library did not load.";
    return { data, plot: null, push() {} };
  }
  const plot = new uPlot(opts, data, container);

  const ro = new ResizeObserver(() => {
    const w = container.clientWidth;
    if (w > 0 && Math.abs(w - plot.width) > 2) plot.setSize({ width: w, height: opts.height });
  });
  ro.observe(container);

  return {
    data,
    plot,
    push(t, values) {
      data[0].push(t);
      values.forEach((v, i) => data[i + 1].push(v == null || !isFinite(v) ? null : v));
      if (data[0].length > keep) data.forEach((a) => a.splice(0, a.length - keep));
      plot.setData(data);
    },
  };
}

/** Tick steps for byte axes: powers of two, so ticks read 64 MiB, 128 MiB, … */
export const BYTE_INCRS = Array.from({ length: 50 }, (_, i) => 2 ** i);

/** Tick steps for counts: whole numbers only. */
export const INT_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

function showLatest(u) {
  const n = u.data[0].length;
  if (n) u.setLegend({ idx: n - 1 }, false);
}

function defaultFmt(v) {
  return Math.abs(v) >= 100 ? v.toFixed(0) : (+v.toFixed(2)).toString();
}
