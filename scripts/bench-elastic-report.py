#!/usr/bin/env python3
"""The table (and plot) of scripts/bench-elastic.sh, from its JSON lines.

    bench-elastic-report.py RESULTS.jsonl WRITE MODEL STEP_S MAX_TOKENS PEAK

Prints one markdown table per engine and trace, with the targets' ratios under it: elastic p95
over the best fixed shape's p95, and elastic reserved memory-time over the fixed-max shape's (the
elastic pool's largest size held fixed) and over the best fixed shape's. Where a shape ran more
than once (bench-elastic.sh --repeat), its row is the run with the median p95, its p95 and
memory-times are the medians, and a column lists every run's p95: one run's p95 on an overloaded
trace moves by 2x with the machine's noise, and the best of five noisy shapes is biased low. With
WRITE=1 it replaces the part of docs/elasticity.md between the bench-elastic markers and writes
docs/elasticity-shapes.svg (slots admitted over time, per pool). No dependencies beyond Python.
"""
import json
import sys
from pathlib import Path

BEGIN = "<!-- bench-elastic:begin -->"
END = "<!-- bench-elastic:end -->"


def rle(v):
    out, i = [], 0
    while i < len(v):
        j = i
        while j < len(v) and v[j] == v[i]:
            j += 1
        out.append(f"{v[i]}x{j - i}")
        i = j
    return " ".join(out)


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def merge(runs):
    """One row for a shape's runs: the median-p95 run, with median p95 and memory-times."""
    runs = sorted(runs, key=lambda r: r["latency_p95_s"])
    row = dict(runs[(len(runs) - 1) // 2])
    for k in ("latency_p95_s", "reserved_gib_s", "rss_gib_s"):
        row[k] = median([r[k] for r in runs])
    row["errors"] = max(r["errors"] for r in runs)
    row["p95_runs"] = [r["latency_p95_s"] for r in sorted(runs, key=lambda r: r.get("run", 1))]
    return row


def table(rows):
    repeated = any(len(r.get("p95_runs", [])) > 1 for r in rows)
    extra = " p95 each run |" if repeated else ""
    lines = [
        "| pool | requests | 429 / errors | latency p50 / p95 | TTFT p50 / p95 | reserved GiB·s | RSS GiB·s | CPU s | transitions | slots over time (count x s) |"
        + extra,
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if repeated else ""),
    ]
    for r in rows:
        cpu = "-" if r.get("cpu_s") is None else f"{r['cpu_s']:.0f}"
        lines.append(
            f"| {r['label']} | {r['requests']} | {r['refused_429']} / {r['errors']} "
            f"| {r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f} s "
            f"| {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} s "
            f"| {r['reserved_gib_s']:.1f} | {r['rss_gib_s']:.1f} | {cpu} | {r['transitions']} "
            f"| {rle(r['slots_over_time'])} |"
            + (" " + ", ".join(f"{x:.2f}" for x in r["p95_runs"]) + " s |" if repeated else "")
        )
    return lines


def verdict(rows):
    fixed = [r for r in rows if not r["label"].startswith("elastic") and r["errors"] == 0]
    elastic = [r for r in rows if r["label"].startswith("elastic")]
    if not fixed or not elastic:
        return []
    e = elastic[0]
    best = min(fixed, key=lambda r: r["latency_p95_s"])
    # The fixed-max shape: the elastic pool's largest size held fixed ("elastic-1-3" -> "3xS").
    most = e["label"].rsplit("-", 1)[-1] + "x"
    top = next((r for r in fixed if r["label"].startswith(most)), None)
    top = top or max(fixed, key=lambda r: r["reserved_gib_s"])
    ratio = lambda a, b: a / b if b else float("nan")
    p95 = ratio(e["latency_p95_s"], best["latency_p95_s"])
    mem = ratio(e["reserved_gib_s"], top["reserved_gib_s"])
    mem_best = ratio(e["reserved_gib_s"], best["reserved_gib_s"])
    return [
        "",
        f"Elastic p95 / best fixed ({best['label']}) p95: **{p95:.2f}×** (target ≤ 1.05); "
        f"elastic reserved memory-time / fixed-max ({top['label']}): **{mem:.2f}×** "
        f"(target ≤ 0.50), / the best fixed shape's: {mem_best:.2f}×; "
        f"elastic transitions: {e['transitions']}.",
    ]


def svg(groups):
    """Slots admitted over time, one line per pool, one panel per (engine, trace)."""
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#111111"]
    w, h, pad = 640, 180, 36
    panels = []
    y0 = 0
    for (engine, trace), rows in groups:
        tmax = max(len(r["slots_over_time"]) for r in rows) or 1
        smax = max(max(r["slots_over_time"] or [0]) for r in rows) or 1
        parts = [
            f'<text x="{pad}" y="{y0 + 16}" font-size="13">{engine}, {trace} trace: '
            f"slots admitted over time (s)</text>",
            f'<line x1="{pad}" y1="{y0 + h - pad}" x2="{w - 10}" y2="{y0 + h - pad}" stroke="#999"/>',
            f'<line x1="{pad}" y1="{y0 + 24}" x2="{pad}" y2="{y0 + h - pad}" stroke="#999"/>',
            f'<text x="4" y="{y0 + 30}" font-size="10">{smax}</text>',
            f'<text x="{w - 40}" y="{y0 + h - pad + 14}" font-size="10">{tmax} s</text>',
        ]
        for i, r in enumerate(rows):
            v = r["slots_over_time"]
            pts = " ".join(
                f"{pad + (w - pad - 10) * t / tmax:.1f},"
                f"{y0 + h - pad - (h - pad - 24) * s / smax - i * 0.8:.1f}"
                for t, s in enumerate(v)
            )
            c = colors[i % len(colors)]
            width = 2.5 if r["label"].startswith("elastic") else 1.2
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="{width}" points="{pts}"/>')
            parts.append(
                f'<text x="{pad + 8 + 90 * i}" y="{y0 + h - 8}" font-size="10" fill="{c}">{r["label"]}</text>'
            )
        panels.append("\n".join(parts))
        y0 += h + 10
    body = "\n".join(panels)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{y0}" '
        f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n'
    )


def main():
    results, write, model, step, tokens, peak = sys.argv[1:7]
    rows = [json.loads(l) for l in open(results) if l.strip()]
    shapes = {}
    for r in rows:
        shapes.setdefault((r["engine"], r["trace"], r["label"]), []).append(r)
    groups = {}
    for (engine, trace, _), runs in shapes.items():
        groups.setdefault((engine, trace), []).append(merge(runs))
    out = [
        f"Model `{model}`, {tokens} tokens per answer, {step} s per trace step, each trace scaled so "
        f"its peak is {peak}× what one worker of the default shape serves (measured first, "
        f"`tidepool bench capacity`). Where a shape ran more than once, its row is its median-p95 run, with the median p95 and memory-times. Written by `scripts/bench-elastic.sh --write`.",
    ]
    for (engine, trace), g in groups.items():
        rates = ", ".join(f"{x:.2f}" for x in g[0]["rates"])
        n = max(len(r["p95_runs"]) for r in g)
        runs = f"; {n} runs of each shape" if n > 1 else "; one run of each shape"
        out += [
            "",
            f"**{engine}, {trace} trace** (one worker serves {g[0]['capacity_rps']:.2f} req/s; "
            f"rates {rates} req/s{runs}):",
            "",
        ]
        out += table(g)
        out += verdict(g)
    text = "\n".join(out)
    print(text)
    if write == "1":
        doc = Path("docs/elasticity.md")
        d = doc.read_text()
        if BEGIN in d and END in d:
            head, rest = d.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            d = f"{head}{BEGIN}\n{text}\n\n![slots over time](elasticity-shapes.svg)\n{END}{tail}"
        else:
            d += f"\n{BEGIN}\n{text}\n\n![slots over time](elasticity-shapes.svg)\n{END}\n"
        doc.write_text(d)
        Path("docs/elasticity-shapes.svg").write_text(svg(list(groups.items())))
        print("wrote docs/elasticity.md and docs/elasticity-shapes.svg", file=sys.stderr)


if __name__ == "__main__":
    main()
