"""Benchmark: the daemon's ``load_model`` swap between GGUF files, over MQTT (issue 19, item 1).

    NUMBA_NUM_THREADS=2 python tools/bench_swap.py /work/bench-models/deepseek-llm-7b-shape-Q4_0.gguf \
        /work/bench-models/deepseek-llm-7b-shape-Q4_K_M.gguf --chips 4 --reps 3 --cache-dir /tmp/swapcache

Mosquitto on a free loopback port and ``edgebox serve --model FILE1 --chips N`` (its own
``EDGEBOX_CACHE_DIR``); then ``load_model`` FILE2, FILE1, FILE2, ... (``--reps`` rounds of every
file after the first). Each swap's wall time is measured at the client (command sent to reply
received), beside the reply's ``load_s`` and ``warmup_s``; then two 1-token greedy generates of
equally long prompts that differ from their first word on (``PROMPTS``: the engine copies a shared
prefix of 4+ tokens instead of computing it, and "Report 12" / "Report 13" share 4) give the first
and the second request's TTFT after the swap: the warm-up's promise is that the first is no slower
than the second. Each row keeps both replies' ``cached_prompt_tokens``, which must be 0.
A first round (``--prime``, on by default) loads every file once uncounted, so the packed-weight
cache entries exist and the files are in the page cache: the swaps measured are warm ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgebox.daemon.client import FleetClient  # noqa: E402
from tests.fixtures.daemon import Daemon  # noqa: E402
from tests.fixtures.mosquitto import Mosquitto  # noqa: E402

DEVICE = "swap"
PROMPTS = ("Report {n}: the edge box", "Summary {n}: the edge box")  # one token each word: equally long


def generate(f: FleetClient, prompt: str) -> tuple[float, int]:
    """The reply's TTFT (ms) and how many prompt tokens it took from the prompt cache."""
    r = f.call(DEVICE, "generate", {"prompt": prompt, "max_tokens": 1, "temperature": 0}, timeout=300)
    return float(r["timings"]["ttft_ms"]), int(r["usage"]["cached_prompt_tokens"])


def swap(f: FleetClient, path: Path, chips: int, n: int) -> dict:
    t = time.perf_counter()
    r = f.call(DEVICE, "load_model", {"path": path.name, "chips": chips}, timeout=900)["result"]
    wall = time.perf_counter() - t
    first, first_cached = generate(f, PROMPTS[0].format(n=n))
    second, second_cached = generate(f, PROMPTS[1].format(n=n))
    return {
        "file": path.name,
        "wall_s": round(wall, 3),
        "load_s": r["load_s"],
        "warmup_s": r["warmup_s"],
        "ttft_first_ms": first,
        "ttft_second_ms": second,
        "cached_prompt_tokens": [first_cached, second_cached],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="GGUF files: the first is served at start, then swapped in turn")
    ap.add_argument("--chips", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3, help="rounds of swaps over the files")
    ap.add_argument("--cache-dir", type=Path, required=True, help="EDGEBOX_CACHE_DIR of the daemon (the weight cache)")
    ap.add_argument("--no-prime", dest="prime", action="store_false", help="count the first round too")
    ap.add_argument("--json", type=Path, help="write every swap's figures here")
    args = ap.parse_args()
    files = [p.resolve() for p in args.files]
    if len({p.parent for p in files}) != 1:
        sys.exit("bench_swap: the files must share a directory (the daemon's models_dir)")
    order = files[1:] + files[:1]  # from the first, through the others, back to it
    work = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    broker = Mosquitto(work / "broker").start()
    env = {"EDGEBOX_CACHE_DIR": str(args.cache_dir)}
    t = time.perf_counter()
    daemon = Daemon(
        work / "daemon",
        "--model",
        str(files[0]),
        "--chips",
        str(args.chips),
        "--broker",
        broker.url,
        "--device-id",
        DEVICE,
        "--models-dir",
        str(files[0].parent),
        "--fw-root",
        str(work / "fw"),
        env=env,
    ).start(timeout=900)
    print(f"serve start -> ready ({files[0].name}, {args.chips} chips): {time.perf_counter() - t:.1f} s", flush=True)
    rows, n = [], 0
    try:
        with FleetClient(broker.url) as f:
            for rnd in range(args.reps + (1 if args.prime else 0)):
                for path in order:
                    row = {**swap(f, path, args.chips, n), "round": rnd, "primed": args.prime and rnd == 0}
                    n += 1
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        daemon.stop()
        broker.stop()
    counted = [r for r in rows if not r["primed"]]
    if counted:
        walls = [r["wall_s"] for r in counted]
        warm = [r["warmup_s"] for r in counted]
        ratio = [r["ttft_first_ms"] / r["ttft_second_ms"] for r in counted]
        hits = sum(1 for r in counted if any(r["cached_prompt_tokens"]))
        print(
            f"{args.chips} chips, {len(counted)} warm swaps: wall {min(walls):.2f}-{max(walls):.2f} s "
            f"(median {statistics.median(walls):.2f}), warmup_s {min(warm):.2f}-{max(warm):.2f}, "
            f"first/second TTFT after the swap {min(ratio):.2f}-{max(ratio):.2f}x (median {statistics.median(ratio):.2f}), prompt-cache hits {hits}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"chips": args.chips, "swaps": rows}, indent=1))


if __name__ == "__main__":
    main()
