#!/usr/bin/env python3
"""The combined profile's prefix-cache saving, measured.

`sentiment+chat` answers a label, then a reply, in one request: the label's prompt is the
conversation plus a question, and the reply's prompt is the same conversation, so with the engine's
prefix cache the reply starts from the KV cache the label left instead of computing the prompt a
second time. This script serves the same model twice, with `[model] prefix_cache = 16` and with it
off (`0`), sends the same long conversations (streaming, greedy) to each, and prints per setting
the medians of: time to the label (the response starts when the label is known), the reply's time
to first token after that (its prompt processing), and the whole request.

    .cache/venv/bin/python scripts/bench-combined.py [--model smollm2-135m-instruct] [--requests 6]

Only the standard library and `requests` (in the e2e venv). Never a timed assertion: it prints.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(binary, model, prefix_cache, log):
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(f"[model]\nprefix_cache = {prefix_cache}\nslots = 1\n[cache]\nenabled = false\n")
    cfg.close()
    proc = subprocess.Popen(
        [binary, "serve", "--model", model, "--port", "0", "--config", cfg.name],
        stdout=subprocess.PIPE, stderr=log, text=True)
    m = re.search(r"http://([0-9.]+:\d+)", proc.stdout.readline())
    base = f"http://{m.group(1)}"
    for _ in range(1200):
        try:
            if requests.get(base + "/health", timeout=5).status_code == 200:
                return proc, base
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server not ready")


def conversation(i, turns):
    msgs = []
    for t in range(turns):
        msgs.append({"role": "user", "content":
                     f"Day {i}.{t}: we walked along the harbour, watched the boats come in with the "
                     f"evening tide, counted {t + i} crabs in the rock pools and argued about "
                     f"whether the lighthouse keeper still lives there. What do you think?"})
        msgs.append({"role": "assistant", "content":
                     "It sounds like a lovely walk. Lighthouses are mostly automated now, so the "
                     "keeper probably moved away, but some stay on as caretakers."})
    msgs.append({"role": "user", "content":
                 f"Honestly the whole trip number {i} was wonderful and I want to go back soon!"})
    return msgs


def one(base, model, msgs, max_tokens):
    body = {"model": model, "profile": "sentiment+chat", "messages": msgs, "stream": True,
            "temperature": 0, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    r = requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=600)
    r.raise_for_status()
    started = reply_first = None
    seen_separator = False
    usage = None
    for line in r.iter_lines(chunk_size=None):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        c = json.loads(line[6:])
        if c.get("usage"):
            usage = c["usage"]
        if not c.get("choices"):
            continue
        text = c["choices"][0]["delta"].get("content") or ""
        now = time.perf_counter()
        if text and started is None:
            started = now  # the label: sent as soon as it is known
        elif text == "\n\n" and not seen_separator:
            seen_separator = True
        elif text and seen_separator and reply_first is None:
            reply_first = now
    done = time.perf_counter()
    return {"label_s": started - sent, "reply_ttft_s": (reply_first or done) - started,
            "total_s": done - sent, "prompt_tokens": usage["prompt_tokens"],
            "label_prompt_tokens": usage["tidepool_label"]["label_prompt_tokens"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--bin", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug", "tidepool"))
    a = ap.parse_args()
    rows = []
    for prefix_cache in (16, 0):
        with open(os.devnull, "w") as log:
            proc, base = start(a.bin, a.model, prefix_cache, log)
            try:
                served = requests.get(base + "/health").json()["model"]
                one(base, served, conversation(999, 1), a.max_tokens)  # warm-up
                results = [one(base, served, conversation(i, a.turns), a.max_tokens)
                           for i in range(a.requests)]
            finally:
                proc.terminate()
                proc.wait(timeout=60)
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        rows.append((prefix_cache, med))
    print(f"model {a.model}, {a.requests} requests, reply prompt "
          f"{rows[0][1]['prompt_tokens'] - rows[0][1]['label_prompt_tokens']:.0f} tokens, "
          f"label prompt {rows[0][1]['label_prompt_tokens']:.0f} tokens, medians:")
    print("| prefix_cache | time to label | reply TTFT after label | whole request |")
    print("|---|---|---|---|")
    for pc, m in rows:
        print(f"| {pc} | {m['label_s']:.3f} s | {m['reply_ttft_s']:.3f} s | {m['total_s']:.3f} s |")
    on, off = rows[0][1], rows[1][1]
    print(f"saving: reply TTFT {off['reply_ttft_s'] - on['reply_ttft_s']:.3f} s "
          f"({100 * (1 - on['reply_ttft_s'] / off['reply_ttft_s']):.0f} %), whole request "
          f"{off['total_s'] - on['total_s']:.3f} s "
          f"({100 * (1 - on['total_s'] / off['total_s']):.0f} %)")


if __name__ == "__main__":
    sys.exit(main())
