#!/usr/bin/env python3
"""Renders a bench/compare.sh results folder into bench/report/: README.md with Markdown tables
(single stream per model x server with the Tidepool/peer ratios, the concurrency sweep, the
memory-bandwidth ceiling on decode, the elastic rate ramp) and PNG plots (matplotlib; without it
the tables are still written).

    python bench/report.py bench/results/<timestamp> [--report-dir bench/report]

Inputs in the results folder: compare.jsonl (`tidepool bench compare --json-out` lines plus
server peak RSS lines), meta.json (machine, settings, build flags), and when present bandwidth.json
(`tidepool bench bandwidth --json`), ramp.json and ramp-timeline.jsonl (`tidepool bench load`),
notes.txt (skipped servers and failures).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

# The server the ratios are taken against: plain `tidepool` (the default engine) when the run has
# it, else Tidepool with the engine `--engine auto` picks on the CPU, else any Tidepool.
BASE = "tidepool"
BASE_PREFERENCE = ["tidepool", "tidepool-llamacpp", "tidepool-mistralrs"]
# Tokens the compare prompt takes after the chat template, roughly (the KV read per token grows
# with the position; the ceiling uses the mean position over a run).
PROMPT_TOKENS = 60


def load_jsonl(path):
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"report: skipping a line of {path} that is not JSON", file=sys.stderr)
    return out


def order(values, first=None):
    """Unique values in first-seen order, `first` (and its variants) ahead of the rest."""
    first = first or "tidepool"
    seen = list(dict.fromkeys(values))
    return sorted(seen, key=lambda v: (not v.startswith(first), seen.index(v)))


def fmt(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def ratio(a, b):
    return a / b if a and b else None


def mib(b):
    return b / (1 << 20)


class Results:
    def __init__(self, d):
        self.dir = d
        self.meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
        rows = load_jsonl(d / "compare.jsonl")
        self.single = [r for r in rows if r.get("workload") == "single-stream"]
        self.sweep = [r for r in rows if r.get("workload") == "concurrency-sweep"]
        self.rss = {(r["server"], r["model"]): r.get("peak_rss_bytes", 0)
                    for r in rows if r.get("workload") == "server-peak-rss"}
        self.bandwidth = load_jsonl(d / "bandwidth.json")
        self.ramp = json.loads((d / "ramp.json").read_text()) if (d / "ramp.json").exists() else None
        self.timeline = load_jsonl(d / "ramp-timeline.jsonl")
        self.notes = (d / "notes.txt").read_text().strip() if (d / "notes.txt").exists() else ""
        self.models = order([r["model"] for r in self.single + self.sweep], first="")
        self.servers = order([r["server"] for r in self.single + self.sweep])

    def single_row(self, model, server):
        for r in self.single:
            if r["model"] == model and r["server"] == server:
                return r
        return None

    def bandwidth_gb_s(self):
        """(GB/s, description): the best Triad (else any kernel) at the servers' thread count, else
        at the most threads measured."""
        if not self.bandwidth:
            return None, None
        counts = {r.get("threads", 1) for r in self.bandwidth}
        most = self.meta.get("threads") if self.meta.get("threads") in counts else max(counts)
        rows = [r for r in self.bandwidth if r.get("threads", 1) == most]
        triad = [r for r in rows if str(r.get("kernel", "")).lower() == "triad"]
        best = max(triad or rows, key=lambda r: r.get("best_gb_s", 0))
        return best["best_gb_s"], f"{best.get('kernel')} on {most} thread(s), best of reps"


def single_table(res):
    lines = [
        "| model | server | TTFT (ms) | decode (tok/s) | total (s) | tokens per run | "
        f"decode {BASE}/this | TTFT {BASE}/this | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for m in res.models:
        base = res.single_row(m, BASE)
        for s in res.servers:
            r = res.single_row(m, s)
            if r is None:
                continue
            short = f" **{r['short_runs']} short**" if r.get("short_runs") else ""
            rss = res.rss.get((s, m))
            lines.append(
                f"| {m} | {s} | {fmt(r['ttft_ms_median'], 0)} | {fmt(r['decode_tok_s_median'])} | "
                f"{fmt(r['total_s_median'], 2)} | {r['tokens_generated']} ({r['token_source']}){short} | "
                f"{fmt(ratio(base and base['decode_tok_s_median'], r['decode_tok_s_median']), 2)} | "
                f"{fmt(ratio(base and base['ttft_ms_median'], r['ttft_ms_median']), 2)} | "
                f"{fmt(mib(rss), 0) if rss else '–'} |"
            )
    return lines


def bytes_per_token(r):
    """Bytes read to decode one token: every weight once, plus the f16 KV cache up to the mean
    position of the run."""
    w = r.get("gguf_tensor_bytes")
    if not w:
        return None
    kv = r.get("kv_bytes_per_token_f16") or 0
    return w + kv * (PROMPT_TOKENS + r.get("max_tokens", 0) / 2)


def bandwidth_table(res):
    bw, how = res.bandwidth_gb_s()
    if bw is None:
        return ["No bandwidth measurement in this run (`tidepool bench bandwidth` absent or failed)."]
    lines = [
        f"Memory bandwidth: **{bw:.1f} GB/s** ({how}, `tidepool bench bandwidth`). Decoding one "
        "token reads every weight once plus the KV cache so far, so decode speed cannot exceed "
        "bandwidth / bytes per token (weights = the GGUF's tensor bytes; KV in f16 at the run's "
        f"mean position, prompt ≈ {PROMPT_TOKENS} tokens). The fraction says how close each server "
        "gets to that memory-bound ceiling.",
        "",
        "| model | weights (MiB) | bytes per token (MiB) | ceiling (tok/s) | server | decode (tok/s) | of ceiling |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for m in res.models:
        for s in res.servers:
            r = res.single_row(m, s)
            if r is None or bytes_per_token(r) is None:
                continue
            bpt = bytes_per_token(r)
            ceiling = bw * 1e9 / bpt
            lines.append(
                f"| {m} | {mib(r['gguf_tensor_bytes']):.1f} | {mib(bpt):.1f} | {ceiling:.0f} | {s} | "
                f"{fmt(r['decode_tok_s_median'])} | {100 * r['decode_tok_s_median'] / ceiling:.0f}% |"
            )
    return lines


def sweep_table(res):
    lines = [
        "| model | server | clients | requests | errors | tok/s (all clients) | "
        f"tok/s {BASE}/this | latency p50 / p95 (s) | TTFT p50 (ms) | short |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for m in res.models:
        for s in res.servers:
            for r in sorted((r for r in res.sweep if r["model"] == m and r["server"] == s),
                            key=lambda r: r["concurrency"]):
                base = next((b for b in res.sweep if b["model"] == m and b["server"] == BASE
                             and b["concurrency"] == r["concurrency"]), None)
                lines.append(
                    f"| {m} | {s} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                    f"{fmt(r['aggregate_tok_s'])} | "
                    f"{fmt(ratio(base and base['aggregate_tok_s'], r['aggregate_tok_s']), 2)} | "
                    f"{fmt(r['latency_p50_s'], 2)} / {fmt(r['latency_p95_s'], 2)} | "
                    f"{fmt(r['ttft_p50_s'] * 1000, 0)} | {r.get('short_requests', 0)} |"
                )
    return lines


def ramp_section(res):
    if not res.ramp:
        return ["No rate ramp in this run."]
    r = res.ramp
    gib = 1 << 30
    return [
        f"`tidepool bench load` against Tidepool's elastic pool ({r.get('label', '')}): "
        f"{r['requests']} requests, {r['ok']} ok, {r['refused_429']} refused (429), {r['errors']} errors; "
        f"latency p50 / p95 / max {r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f} / "
        f"{r['latency_max_s']:.2f} s; TTFT p50 / p95 {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} s; "
        f"average RSS {r['avg_rss_bytes'] / gib:.2f} GiB (max {r['max_rss_bytes'] / gib:.2f}), "
        f"average reserved {r['avg_reserved_bytes'] / gib:.2f} GiB.",
    ]


def plots(res, report_dir):
    """Writes the PNGs; returns their file names (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed: tables only (bench/report.sh installs it)",
              file=sys.stderr)
        return []
    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    colors = {s: f"C{i}" for i, s in enumerate(res.servers)}
    made = []
    models = [m for m in res.models if any(r["model"] == m for r in res.sweep)]

    def per_model_figure(name, title, ylabel, series):
        fig, axes = plt.subplots(1, len(models), figsize=(max(7.5, 5.2 * len(models)), 4.2), squeeze=False)
        for ax, m in zip(axes[0], models):
            for s in res.servers:
                rows = sorted((r for r in res.sweep if r["model"] == m and r["server"] == s),
                              key=lambda r: r["concurrency"])
                if rows:
                    series(ax, s, rows)
            ax.set_title(m)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(ylabel)
            ax.set_xscale("log", base=2)
            cs = sorted({r["concurrency"] for r in res.sweep if r["model"] == m})
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(report_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)

    if models:
        per_model_figure(
            "throughput.png", "Aggregate generated tokens/s vs concurrency (higher is better)",
            "tokens/s (all clients)",
            lambda ax, s, rows: ax.plot([r["concurrency"] for r in rows],
                                        [r["aggregate_tok_s"] for r in rows],
                                        "o-", color=colors[s], label=s))

        def latency(ax, s, rows):
            cs = [r["concurrency"] for r in rows]
            ax.plot(cs, [r["latency_p50_s"] for r in rows], "o-", color=colors[s], label=f"{s} p50")
            ax.plot(cs, [r["latency_p95_s"] for r in rows], "s--", color=colors[s], alpha=0.7,
                    label=f"{s} p95")

        per_model_figure("latency.png", "Request latency vs concurrency (lower is better)",
                         "request latency (s)", latency)

    if res.timeline:
        status = [t for t in res.timeline if t["kind"] == "status"]
        reqs = [t for t in res.timeline if t["kind"] == "request"]
        fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
        ok = [r for r in reqs if r["status"] == 200]
        bad = [r for r in reqs if r["status"] != 200]
        a1.scatter([r["t"] + r["latency_s"] for r in ok], [r["latency_s"] for r in ok], s=10,
                   color="C0", label="latency (by completion time)")
        a1.scatter([r["t"] + r["ttft_s"] for r in ok], [r["ttft_s"] for r in ok], s=8,
                   color="C1", marker="x", label="time to first token")
        if bad:
            a1.scatter([r["t"] for r in bad], [0] * len(bad), s=18, color="red", marker="v",
                       label="refused / failed")
        a1.set_ylabel("seconds")
        a1.set_title("Request latency")
        a1.legend(fontsize=8, loc="upper left")
        if status:
            ts = [s["t"] for s in status]
            a2.step(ts, [s["workers"] for s in status], where="post", color="C2",
                    label="ready workers")
            a2.set_ylabel("workers")
            a2.set_ylim(bottom=0, top=max(s["workers"] for s in status) + 1)
            a2.yaxis.get_major_locator().set_params(integer=True)
            if reqs:
                end = max(r["t"] for r in reqs) + 1
                bins = [0] * (int(end) + 1)
                for r in reqs:
                    bins[int(r["t"])] += 1
                tw = a2.twinx()
                w = 5  # seconds in the moving average
                rate = [sum(bins[max(0, i - w + 1):i + 1]) / min(w, i + 1) for i in range(len(bins))]
                tw.plot(range(len(bins)), rate, color="C7", alpha=0.7,
                        label=f"arrivals ({w} s moving average)")
                tw.set_ylabel("offered load (req/s)")
                tw.set_ylim(bottom=0)
                tw.grid(False)
                h1, l1 = a2.get_legend_handles_labels()
                h2, l2 = tw.get_legend_handles_labels()
                a2.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
            a2.set_title("Pool size and offered load")
            gib = 1 << 30
            a3.plot(ts, [s["rss_bytes"] / gib for s in status], color="C3", label="process RSS")
            a3.plot(ts, [s["reserved_bytes"] / gib for s in status], color="C4", linestyle="--",
                    label="reserved in the memory ledger")
            a3.set_ylabel("GiB")
            a3.set_ylim(bottom=0)
            a3.set_title("Memory")
            a3.legend(fontsize=8, loc="upper left")
        a3.set_xlabel("time since the start of the trace (s)")
        fig.suptitle("Tidepool elastic pool under a rate ramp")
        fig.tight_layout()
        fig.savefig(report_dir / "ramp.png", dpi=110)
        plt.close(fig)
        made.append("ramp.png")
    return made


def render(results_dir, report_dir):
    res = Results(results_dir)
    global BASE
    BASE = next((s for s in BASE_PREFERENCE if s in res.servers), BASE)
    report_dir.mkdir(parents=True, exist_ok=True)
    meta = res.meta
    out = ["# Benchmarks: Tidepool vs llama.cpp vs mistral.rs", ""]
    out.append(
        "Generated by `bench/report.py` from `bench/compare.sh` (raw data of this run in "
        "[`data/`](data/)). Same GGUF file, context size, thread count and workload for every "
        "server; every request streams, bans the end tokens with `logit_bias` so that all "
        "`max_tokens` are generated, and counts tokens from the stream's final usage (else from "
        "content chunks). Decode speed is (tokens − 1) / (last content chunk − first)."
    )
    out.append("")
    if meta:
        out += [
            "## Setup",
            "",
            f"- Machine: {meta.get('cpu')}, {meta.get('cores')} cores; servers ran with "
            f"{meta.get('threads')} threads and a {meta.get('ctx')}-token context.",
            f"- Tidepool commit {meta.get('git_commit')}{' (dirty tree)' if meta.get('git_dirty') else ''}"
            f"{'; **quick smoke run** (few runs, short sweep): not for conclusions' if meta.get('quick') else ''}.",
            f"- Single stream: {meta.get('runs')} measured runs after 1 warm-up, "
            f"max_tokens {meta.get('max_tokens')}; sweep: {meta.get('concurrency')} closed-loop "
            f"clients, {meta.get('requests_per_client')} request(s) each"
            f"{', max_tokens ' + str(meta['sweep_max_tokens']) if meta.get('sweep_max_tokens') else ''}.",
            *[f"- {n}" for n in meta.get("notes", [])],
            "- Builds:",
        ]
        for k, v in meta.get("builds", {}).items():
            if any(s == k or s.startswith(k + "-") for s in res.servers):
                out.append(f"  - {k}: {v}")
        out.append("")
    out += ["## Single stream", "", *single_table(res), ""]
    short = [r for r in res.single if r.get("short_runs")]
    if short:
        out += ["**Short runs** (fewer than max_tokens: the server ignored `logit_bias` and stopped "
                "at an end token; its speed is over the tokens it generated): "
                + ", ".join(f"{r['server']} on {r['model']}" for r in short), ""]
    out += ["## Bandwidth bound", "", *bandwidth_table(res), ""]
    out += ["## Concurrency sweep", "", *sweep_table(res), ""]
    made = plots(res, report_dir)
    for name, caption in [("throughput.png", "Throughput"), ("latency.png", "Latency")]:
        if name in made:
            out += [f"![{caption}]({name})", ""]
    out += ["## Elastic rate ramp (Tidepool)", "", *ramp_section(res), ""]
    if "ramp.png" in made:
        out += ["![Rate ramp](ramp.png)", ""]
    if res.notes:
        out += ["## Notes from the run", "", *[f"- {n}" for n in res.notes.splitlines()], ""]
    (report_dir / "README.md").write_text("\n".join(out))
    data = report_dir / "data"
    data.mkdir(exist_ok=True)
    for f in ["compare.jsonl", "meta.json", "bandwidth.json", "ramp.json", "ramp-timeline.jsonl",
              "compare.md", "notes.txt"]:
        if (results_dir / f).exists() and results_dir.resolve() != data.resolve():
            shutil.copy(results_dir / f, data / f)
    print(f"report: wrote {report_dir / 'README.md'} and {', '.join(made) or 'no plots'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="a bench/results/<timestamp> folder (or report/data)")
    p.add_argument("--report-dir", type=Path, default=Path(__file__).resolve().parent / "report")
    a = p.parse_args()
    if not (a.results / "compare.jsonl").exists() and not (a.results / "ramp.json").exists():
        sys.exit(f"report: {a.results} has no compare.jsonl or ramp.json: not a results folder")
    render(a.results, a.report_dir)


if __name__ == "__main__":
    main()
