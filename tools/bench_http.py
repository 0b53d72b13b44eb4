"""Benchmark: N concurrent streams over the HTTP API vs the same N streams in-process.

    python tools/bench_http.py /work/bench-models/deepseek-llm-7b-shape-Q4_0.gguf --streams 8 --tokens 64 --rounds 3

A second phase times what HTTP adds to the time to first token alone: one request at a time
(max_tokens 1), in-process and over HTTP alternately, the median of the paired differences.

`edgebox serve --broker none --no-governor` runs in its own process; this process loads the same
file for the in-process engine (the packed-weight cache and the page cache are shared). The two
take turns, round by round, so the machine's noise hits both alike; each round reports aggregate
decode tokens/s (all streams' tokens / wall time from the first submit to the last token) and
mean TTFT, and the summary gives the median of the paired ratios. Greedy with random weights:
every stream runs to --tokens (EOS is 1 in 102400). The governor is off on both sides: it would
throttle the batch by the device-time budget, the same on both, but makes rounds less alike.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = [f"Edge box report {i}: the sensors on line {i} read" for i in range(64)]


def in_process(engine, streams: int, tokens: int) -> tuple[float, float]:
    from edgebox.engine import Request
    from edgebox.text.sampler import SamplingParams

    t0 = time.perf_counter()
    handles = [
        engine.submit(Request(prompt=PROMPTS[i], max_tokens=tokens, params=SamplingParams(temperature=0.0)))
        for i in range(streams)
    ]
    firsts, total = [], 0
    for h in handles:
        s = h.result(600)
        firsts.append(s.ttft_s)
        total += s.generated_tokens
    wall = time.perf_counter() - t0
    return total / wall, statistics.mean(firsts)


def over_http(port: int, streams: int, tokens: int) -> tuple[float, float]:
    results: list[tuple[float, int]] = [None] * streams  # (ttft, tokens)
    start = threading.Barrier(streams + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = json.dumps(
            {
                "prompt": PROMPTS[i],
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        start.wait()
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        ttft, n = None, 0
        while line := r.readline():
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices") and event["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
        results[i] = (ttft or 0.0, n)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(n for _, n in results) / wall, statistics.mean(t for t, _ in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chips", type=int, default=4)
    ap.add_argument("--ttft-reps", type=int, default=10, help="single requests for the TTFT phase")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    log = open("/tmp/bench_http_server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "edgebox.cli", "serve", "--broker", "none", "--http", "127.0.0.1:0", "--model", str(a.model),
         "--chips", str(a.chips), "--max-batch", str(a.streams), "--no-governor", "--max-tokens-limit", str(a.tokens)],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        import edgebox
        from edgebox.engine import Engine

        print(f"loading {a.model.name} in-process and in the server ({a.chips} chips) ...", file=sys.stderr, flush=True)
        engine = Engine(edgebox.load(a.model, chips=a.chips), max_batch=a.streams)
        deadline = time.monotonic() + 600
        while not re.search(r"ready: serving", Path(log.name).read_text()):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start:\n" + Path(log.name).read_text()[-2000:])
            time.sleep(0.2)
        port = int(re.search(r"HTTP API on http://127.0.0.1:(\d+)", Path(log.name).read_text()).group(1))
        over_http(port, a.streams, 4)  # warm both (first-request effects)
        in_process(engine, a.streams, 4)
        rows = []
        for r in range(a.rounds):
            ip_tps, ip_ttft = in_process(engine, a.streams, a.tokens)
            h_tps, h_ttft = over_http(port, a.streams, a.tokens)
            rows.append({"inproc_tps": ip_tps, "http_tps": h_tps, "inproc_ttft_ms": ip_ttft * 1e3, "http_ttft_ms": h_ttft * 1e3})
            print(
                f"round {r + 1}/{a.rounds}: in-process {ip_tps:.2f} tok/s TTFT {ip_ttft * 1e3:.0f} ms | "
                f"HTTP {h_tps:.2f} tok/s TTFT {h_ttft * 1e3:.0f} ms | ratio {h_tps / ip_tps:.3f}, TTFT +{(h_ttft - ip_ttft) * 1e3:.1f} ms",
                file=sys.stderr,
                flush=True,
            )
        added = []
        for i in range(a.ttft_reps):
            _, ip = in_process(engine, 1, 1)
            _, ht = over_http(port, 1, 1)
            added.append((ht - ip) * 1e3)
            print(
                f"TTFT {i + 1}/{a.ttft_reps}: in-process {ip * 1e3:.1f} ms, HTTP {ht * 1e3:.1f} ms", file=sys.stderr, flush=True
            )
        summary = {
            "model": a.model.name,
            "streams": a.streams,
            "tokens": a.tokens,
            "chips": a.chips,
            "tps_ratio_median": statistics.median(r["http_tps"] / r["inproc_tps"] for r in rows),
            "ttft_added_ms_median_8_streams": statistics.median(r["http_ttft_ms"] - r["inproc_ttft_ms"] for r in rows),
            "ttft_added_ms_median_single": statistics.median(added),
            "ttft_added_ms_single": added,
            "rounds": rows,
        }
        print(json.dumps(summary, indent=1))
        if a.json:
            a.json.write_text(json.dumps(summary, indent=1))
        engine.close()
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
