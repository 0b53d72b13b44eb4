"""Host overhead of tensor parallelism, and the host profile's decode prediction against reality.

    python tools/bench_chips.py MODEL [--chips 4] [--rounds 12] [--steps 8] [--json]

Measures decode tok/s (batch 1, after a 64-token prompt) with the model on one chip and split over
N chips. Both stay loaded and take turns, a burst of ``--steps`` decode steps each per round (who
goes first alternates), because this VM's memory bandwidth drifts by tens of percent within
seconds: the ratio of a round compares two bursts taken back to back, and the figure reported is
the median of those ratios (loading the two in turn mixes the machine's states). The N-chip run splits every weight into
shards computed concurrently on host threads, with an explicit all-reduce per half-layer, and
charges device time to the chips (which one chip does too). A burst's figure is the median of
its step times. Alongside, the ``host`` chip profile (this machine,
calibrated by tools/calibrate_host.py) predicts decode tok/s exactly as ``edgebox plan`` does
(``make_plan`` -> ``hw.step.steady_decode``, one chip, at the context the measured steps attend
over), and the prediction is compared with both measurements.

Progress goes to stderr; the summary (or ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import edgebox  # noqa: E402
from edgebox.commands.plan import make_plan  # noqa: E402

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


class Decoder:
    """One loaded configuration decoding one sequence, a burst at a time."""

    def __init__(self, m, n_ctx: int):
        self.m, self.kv = m, m.new_cache(n_ctx)
        self.fwd = m.forward  # charges the chips as a real step does
        self.fwd(np.arange(100, 100 + PROMPT, dtype=np.int32), np.arange(PROMPT, dtype=np.int32), self.kv, all_logits=False)
        self.burst(2)  # caches and branch predictors warming

    def burst(self, steps: int) -> list[float]:
        """Seconds of each of ``steps`` batch-1 decode steps continuing the sequence."""
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            self.fwd(np.array([200], np.int32), np.array([self.kv.length], np.int32), self.kv, all_logits=False)
            times.append(time.perf_counter() - t)
        return times


def predict_host(m, context: int) -> dict:
    """The host profile's batch-1 decode tok/s for this model, as ``edgebox plan`` computes it."""
    plan = make_plan(m, budget_w=float("inf"), batches=(1,), context=context)
    point = max(plan.points, key=lambda p: p.freq_mhz)  # the host has one clock
    return {
        "profile": plan.profile,
        "context": context,
        "freq_mhz": point.freq_mhz,
        "tokens_per_s": point.tokens_per_s,
        "bound": point.bound,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--chips", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per burst (one burst per configuration and round)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    a = ap.parse_args()
    if a.chips < 2:
        ap.error("--chips must be >= 2 (it is compared with one chip)")

    n_ctx = PROMPT + 2 + a.rounds * a.steps
    configs = (1, a.chips)
    decoders = {n: Decoder(load(a.model, n, n_ctx), n_ctx) for n in configs}
    prediction = None
    if decoders[1].m.box.profile.name == "host":
        # the measured steps attend over PROMPT + 2 .. n_ctx positions
        prediction = predict_host(decoders[1].m, context=(PROMPT + 2 + n_ctx) // 2)
    rates: dict[int, list[float]] = {n: [] for n in configs}
    for r in range(a.rounds):
        for n in configs if r % 2 == 0 else configs[::-1]:
            rates[n].append(1.0 / statistics.median(decoders[n].burst(a.steps)))
        log(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n} chip(s) {rates[n][-1]:.2f}" for n in configs) + " tok/s")
    for d in decoders.values():
        d.m.box.close()

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
        result["host_prediction"] = dict(prediction, predicted_over_measured={str(n): pred / best[n] for n in configs})

    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']}: decode tok/s, best (median) of {a.rounds} rounds x {a.steps} steps, the two back to back")
    for n in configs:
        print(f"  {n} chip(s): {best[n]:6.2f} ({med[n]:.2f})")
    print(
        f"  {a.chips} chips / 1 chip: {result['ratio']['best']:.3f} (best), "
        f"{result['ratio']['median_of_rounds']:.3f} (median of per-round ratios)"
    )
    if prediction is not None:
        p = result["host_prediction"]
        print(
            f"  host profile predicts {p['tokens_per_s']:.2f} tok/s ({p['bound']}-bound, context {p['context']}): "
            + ", ".join(f"{v:.2f}x the {n}-chip measurement" for n, v in p["predicted_over_measured"].items())
        )


if __name__ == "__main__":
    main()
