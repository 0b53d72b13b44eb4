"""Priorities under the budget, in device time: the table for docs/performance.md (issue 18).

    python tools/bench_priorities.py [--budgets 6,10] [--mix 2:8] [--think 3] [--seconds 120]
                                     [--seeds 0,1,2] [--json OUT]

The workload (``edgebox power simulate --mix I:B``): B background streams of batch work, back to
back, and I interactive users who each ask, wait for the reply and think ~``think`` s.  Per
budget, on the DeepSeek-LLM-7B shape (4 chips, no file), each pooled over the seeds:

* ``priority``: the governor on, requests carry their priority (interactive first, batch-only
  work at the most efficient clock and batch);
* ``fifo``: the governor on, every request interactive (first come, first served);
* ``batch only``: the B streams alone, governor on (the batch throughput reference);
* ``best static``: every static (clock, batch limit) with the governor off, with and without
  priorities, that stays within the budget; the one with the fewest batch joules per token.

Reported per row: interactive TTFT p50/p95 (device s, every request pooled over the seeds; one
still waiting at the end counts its wait so far), batch tokens/s and batch J/token (the batch
requests' own energy, ``engine.energy``), and the box's J/token.  Deterministic.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgebox.power.shapes import shape_model  # noqa: E402
from edgebox.power.simulate import SimOptions, parse_mix, simulate  # noqa: E402

LEVELS_MHZ = (400, 600, 800, 1000, 1200, 1400, 1500)
STATIC_BATCHES = (8, 10, 12, 16)


def run(opts: dict, seeds: list[int]) -> dict:
    """One configuration over the seeds, each in a fresh process (glibc keeps a run's freed
    heap: 0.5-1 GB a simulation adds up over a sweep), pooled."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        results = pool.starmap(_simulate, [(opts, seed) for seed in seeds])
    return _pool(results)


def _simulate(opts: dict, seed: int) -> dict:
    r = simulate(lambda: shape_model(chips=4), SimOptions(seed=seed, **opts))
    return {
        "device_s": r.device_s,
        "energy_j": r.energy_j,
        "tokens": r.tokens,
        "report": r.report,
        "classes": r.classes,
        "budget_w": r.options["budget_w"],
    }


def _pool(results: list[dict]) -> dict:
    """The seeds' runs pooled: every interactive TTFT, batch tokens and joules summed."""
    ttft, batch_tokens, batch_j, seconds, box_j, tokens, ok = [], 0, 0.0, 0.0, 0.0, 0, True
    worst = worst_short = 0.0
    for r in results:
        seconds += r["device_s"]
        box_j += r["energy_j"]
        tokens += r["tokens"]
        ok &= r["report"]["ok"]
        worst = max(worst, r["report"]["worst_long_ratio"] * r["budget_w"])
        worst_short = max(worst_short, r["report"]["worst_short_ratio"] * r["budget_w"])
        ttft += r["classes"].get("interactive", {}).get("ttft_s", [])
        b = r["classes"].get("batch")
        if b:
            batch_tokens += b["tokens"]
            batch_j += b["joules_per_token"] * b["tokens"]
    return {
        "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else None,
        "ttft_p95_s": float(np.percentile(ttft, 95)) if ttft else None,
        "interactive_requests": len(ttft),
        "batch_tokens_per_s": batch_tokens / seconds,
        "batch_j_per_token": batch_j / batch_tokens if batch_tokens else None,
        "box_j_per_token": box_j / tokens if tokens else None,
        "within_budget": ok,
        "worst_1s_w": worst,
        "worst_100ms_w": worst_short,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="6,10")
    ap.add_argument("--mix", default="2:8")
    ap.add_argument("--think", type=float, default=3.0)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    users, streams = parse_mix(a.mix)
    seeds = [int(x) for x in a.seeds.split(",")]
    mix = {"interactive": users, "streams": streams, "batch_priority": True, "think_s": a.think, "seconds": a.seconds}
    out = {"mix": a.mix, "think_s": a.think, "seconds": a.seconds, "seeds": seeds, "budgets": {}}
    # static settings do not depend on the budget: run each once, judge it against every budget
    static = {}
    for sched in ("priority", "fifo"):
        for f in LEVELS_MHZ:
            for b in STATIC_BATCHES:
                print(f"static {sched} {f} MHz batch {b} ...", file=sys.stderr, flush=True)
                o = {**mix, "governor": False, "freq_mhz": f, "batch": b, "scheduler": sched, "budget_w": 100.0}
                static[(sched, f, b)] = run(o, seeds)
    for watts in (float(x) for x in a.budgets.split(",")):
        print(f"budget {watts:g} W ...", file=sys.stderr, flush=True)
        rows = {
            "priority": run({**mix, "budget_w": watts}, seeds),
            "fifo": run({**mix, "budget_w": watts, "scheduler": "fifo"}, seeds),
            "batch only": run({**mix, "interactive": 0, "budget_w": watts}, seeds),
        }
        # a static setting fits when no 1 s window is over the budget and no 100 ms one over 1.2x
        fits = {k: v for k, v in static.items() if v["worst_1s_w"] <= watts and v["worst_100ms_w"] <= 1.2 * watts}
        best = min(fits, key=lambda k: fits[k]["batch_j_per_token"])
        rows[f"best static ({best[0]}, {best[1]} MHz, batch {best[2]})"] = fits[best]
        out["budgets"][str(watts)] = rows
    print(format_table(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


def format_table(out: dict) -> str:
    lines = [
        f"mix {out['mix']} (interactive users : batch streams), think {out['think_s']:g} s, "
        f"{out['seconds']:g} device s x seeds {out['seeds']}",
        "| budget | run | interactive TTFT p50 / p95 (s) | batch tokens/s | batch J/token | box J/token |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for watts, rows in out["budgets"].items():
        for name, r in rows.items():
            ttft = "-" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f}"
            lines.append(
                f"| {float(watts):g} W | {name} | {ttft} | {r['batch_tokens_per_s']:.1f} | "
                f"{r['batch_j_per_token']:.4f} | {r['box_j_per_token']:.4f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
