"""Host overhead of tensor parallelism, and the host profile's decode prediction against reality.

    python tools/bench_chips.py MODEL [--chips 4] [--rounds 3] [--steps 16] [--json]

Measures decode tok/s (batch 1, after a 64-token prompt) with the model on one chip and split over
N chips, alternating the two in every round so background load hits both; one model is in memory
at a time. The N-chip run splits every weight into shards computed concurrently on host threads,
with an explicit all-reduce per half-layer, and charges device time to the chips (which one chip
does too). A round's figure is the median step time of its decode steps; over rounds the best is
the least disturbed (the machine is shared). Alongside, the ``host`` chip profile (this machine,
calibrated by tools/calibrate_host.py) predicts decode tok/s exactly as ``edgebox plan`` does
(``make_plan`` -> ``cost.predict_decode``, one chip, at the context the measured steps attend
over), and the prediction is compared with both measurements.

Progress goes to stderr; the summary (or ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import edgebox  # noqa: E402
from edgebox.chips.plan import make_plan  # noqa: E402

PROMPT = 64


def log(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


def load(path: str, chips: int, n_ctx: int):
    t = time.perf_counter()
    log(f"loading {Path(path).name} on {chips} chip(s) ...")
    m = edgebox.load(path, chips=chips, n_ctx=n_ctx)
    m.box.prepare(lambda done, total: log(f"\r  packing weights {done}/{total}", end="" if done < total else "\n"))
    log(f"  ready in {time.perf_counter() - t:.1f} s")
    return m


def decode_step_times(m, steps: int) -> list[float]:
    """Seconds of each batch-1 decode step after a PROMPT-token prompt (the first two dropped:
    caches and branch predictors warming)."""
    kv = m.new_cache(PROMPT + steps + 2)
    fwd = m.transformer.forward
    fwd(np.arange(100, 100 + PROMPT, dtype=np.int32), np.arange(PROMPT, dtype=np.int32), kv, all_logits=False)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        fwd(np.array([200 + i], np.int32), np.array([PROMPT + i], np.int32), kv, all_logits=False)
        times.append(time.perf_counter() - t)
    return times[2:]


def predict_host(m, context: int) -> dict:
    """The host profile's batch-1 decode tok/s for this model, as ``edgebox plan`` computes it."""
    plan = make_plan(m, budget_w=float("inf"), batches=(1,), context=context)
    point = max(plan.points, key=lambda p: p.freq_mhz)  # the host has one clock
    return {"profile": plan.profile, "context": context, "freq_mhz": point.freq_mhz,
            "tokens_per_s": point.tokens_per_s, "bound": point.bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--chips", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round and configuration")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    a = ap.parse_args()
    if a.chips < 2:
        ap.error("--chips must be >= 2 (it is compared with one chip)")

    n_ctx = PROMPT + a.steps + 2
    configs = (1, a.chips)
    rates: dict[int, list[float]] = {n: [] for n in configs}
    prediction = None
    for r in range(a.rounds):
        for n in configs:
            m = load(a.model, n, n_ctx)
            times = decode_step_times(m, a.steps)
            rates[n].append(1.0 / statistics.median(times))
            if prediction is None and n == 1 and m.box.profile.name == "host":
                # decode steps attend over PROMPT + 2 .. PROMPT + steps + 2 positions
                prediction = predict_host(m, context=PROMPT + 2 + a.steps // 2)
            m.box.close()
            del m
            gc.collect()
            log(f"round {r + 1}/{a.rounds}: {n} chip(s): {rates[n][-1]:.2f} tok/s")

    best = {n: max(v) for n, v in rates.items()}
    med = {n: statistics.median(v) for n, v in rates.items()}
    paired = [many / one for one, many in zip(rates[1], rates[a.chips])]
    result = {
        "model": Path(a.model).name,
        "chips": a.chips,
        "rounds": a.rounds,
        "steps": a.steps,
        "decode_tok_s": {str(n): {"best": best[n], "median": med[n], "rounds": rates[n]} for n in configs},
        "ratio": {"best": best[a.chips] / best[1], "median_of_rounds": statistics.median(paired), "rounds": paired},
    }
    if prediction is not None:
        pred = prediction["tokens_per_s"]
        result["host_prediction"] = dict(prediction, predicted_over_measured={
            str(n): pred / best[n] for n in configs})

    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']}: decode tok/s, best (median) of {a.rounds} rounds x {a.steps} steps")
    for n in configs:
        print(f"  {n} chip(s): {best[n]:6.2f} ({med[n]:.2f})")
    print(f"  {a.chips} chips / 1 chip: {result['ratio']['best']:.3f} (best), "
          f"{result['ratio']['median_of_rounds']:.3f} (median of per-round ratios)")
    if prediction is not None:
        p = result["host_prediction"]
        print(f"  host profile predicts {p['tokens_per_s']:.2f} tok/s ({p['bound']}-bound, context {p['context']}): "
              + ", ".join(f"{v:.2f}x the {n}-chip measurement" for n, v in p["predicted_over_measured"].items()))


if __name__ == "__main__":
    main()
