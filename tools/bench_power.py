"""The power governor against every static setting: the table for edgebox/power/README.md.

    python tools/bench_power.py [MODEL.gguf] [--seconds 60] [--budgets 6,8,10,12] [--streams 1,4,16]
                                [--prompt-chunk N] [--energy-slack X|none] [--json OUT]

Per stream count, every static (DVFS level, batch limit) runs once with the governor off; a
setting "stays within" a budget when its trace passes the test the governor is held to (>= 99 %
of rolling 1 s windows within the budget after 2 s, the worst <= 105 %, every 100 ms <= 120 %).
Per budget x streams: the governor's run, the best static setting within the budget, and the
"N W mode" clock cap (the highest level whose predicted full-load power fits).  Per stream
count, a governor run with the budget stepping 10 -> 7 -> 10 W gives the settle times.

Same work: every run lasts the same device time, so runs are compared up to the step by which
each had generated G tokens (G the fewest of the runs compared); at one batch limit the engine
runs the very same steps whatever the clocks.  The bound: per batch limit, the static runs'
steps priced at every level (``StepPricer``, the one step-cost model the chips are charged
with) give ``Frontier``, the least energy any clock schedule can spend on them in a given time.

Without MODEL the DeepSeek-LLM-7B shape (Q4_0) is used without a file.  Deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgebox.power.budget import Budget, Timeline, check  # noqa: E402
from edgebox.power.frontier import Frontier  # noqa: E402
from edgebox.power.shapes import shape_model, shape_model_of_file  # noqa: E402
from edgebox.power.simulate import WARMUP_S, SimOptions, simulate  # noqa: E402
from edgebox.power.table import PowerTable, Step, StepPricer  # noqa: E402


def within(result, watts: float) -> tuple[bool, object]:
    """Does a static run's trace pass the budget test at ``watts``?"""
    rep = check(result.log, Timeline(((0.0, watts),)), WARMUP_S, result.device_s, budget=Budget(watts))
    return rep.ok(), rep


def recording(make):
    """``make`` whose model also records every step it is charged for (as a ``Step``)."""
    steps: list[Step] = []

    def make_recording():
        m = make()
        real = m.box.account_step

        def account_step(segments, n_logits):
            steps.append(Step.of(segments, n_logits))
            return real(segments, n_logits)

        m.box.account_step = account_step
        return m

    return make_recording, steps


def same_work(runs: list, n_tokens: int) -> list[dict]:
    """Each run up to the end of the step by which it had generated ``n_tokens``."""
    out = []
    for r in runs:
        t, n, e = r.at_tokens(n_tokens)
        out.append({"tokens": n, "seconds": t, "tokens_per_s": n / t, "j_per_token": e / n})
    return out


class Bound:
    """Per batch limit: the static runs' step sequence, priced at every level, as a frontier."""

    def __init__(self, pricer: StepPricer):
        self.pricer = pricer
        self.priced: dict[Step, tuple[np.ndarray, np.ndarray]] = {}
        self.sequences: dict[int, tuple[list[Step], object]] = {}  # batch -> (steps, a run of them)

    def add(self, batch: int, steps: list[Step], run) -> None:
        self.sequences[batch] = (list(steps[: len(run.token_log[0])]), run)

    def _frontier(self, batch: int, n_tokens: int) -> tuple[Frontier, int] | None:
        """None: the run at the top clock did not reach ``n_tokens`` (no schedule at this batch
        limit does them as fast as any run that did)."""
        steps, run = self.sequences[batch]
        t, tokens = run.token_log
        i = int(np.searchsorted(tokens, n_tokens))
        if i >= len(tokens):
            return None
        seconds, joules = [], []
        for s in steps[: i + 1]:
            if s not in self.priced:
                p = self.pricer.price(s)
                self.priced[s] = (p.step_s, p.step_s * p.power_w)
            seconds.append(self.priced[s][0])
            joules.append(self.priced[s][1])
        return Frontier.of(np.array(seconds), np.array(joules)), tokens[i]

    def least_j_per_token(self, n_tokens: int, tokens_per_s: float) -> float:
        """The least J/token of any clock schedule, at any fixed batch limit, reaching
        ``tokens_per_s`` on the first ``n_tokens`` tokens."""
        best = float("inf")
        for batch in self.sequences:
            fn = self._frontier(batch, n_tokens)
            if fn is not None:
                best = min(best, fn[0].least_energy_j(fn[1] / tokens_per_s) / fn[1])
        return best

    def most_tokens_per_s(self, n_tokens: int, j_per_token: float) -> float:
        """The most tokens/s of any clock schedule, at any fixed batch limit, spending at most
        ``j_per_token`` on the first ``n_tokens`` tokens."""
        best = 0.0
        for batch in self.sequences:
            fn = self._frontier(batch, n_tokens)
            if fn is not None:
                best = max(best, fn[1] / fn[0].least_time_s(j_per_token * fn[1]))
        return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, help="GGUF file whose shape to use (default: DeepSeek-LLM-7B Q4_0 shape)")
    ap.add_argument("--seconds", type=float, default=60.0, help="device seconds per run (default 60)")
    ap.add_argument("--budgets", default="6,8,10,12")
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument(
        "--prompt-chunk",
        type=int,
        default=None,
        help="the governor caps the engine's prompt rows per step at this (default: the governor's, 32)",
    )
    ap.add_argument(
        "--energy-slack",
        default=None,
        help="the governor's energy-per-token slack over the reference clock (default: the governor's; 'none': off)",
    )
    ap.add_argument("--json", type=Path, help="also write every number as JSON here")
    args = ap.parse_args(argv)
    budgets = [float(x) for x in args.budgets.split(",")]
    streams = [int(x) for x in args.streams.split(",")]
    if args.model is not None:
        make = lambda: shape_model_of_file(args.model)  # noqa: E731
    else:
        make = shape_model
    gov_config = {}
    if args.energy_slack is not None:
        gov_config["energy_slack"] = None if args.energy_slack == "none" else float(args.energy_slack)

    def governed(**kw) -> SimOptions:
        return SimOptions(max_batch=args.max_batch, prompt_chunk=args.prompt_chunk, governor_config=gov_config, **kw)

    wall0 = time.perf_counter()
    probe = make()
    table = PowerTable.from_box(probe.box, args.max_batch)
    pricer = StepPricer(probe.box)
    levels = list(table.levels_mhz)
    name = getattr(probe, "name", "")

    rows, steps_out = [], {}
    for n in streams:
        # every static setting once; batch limits above the stream count run the same as n
        static = {}
        bound = Bound(pricer)
        for b in range(1, min(n, args.max_batch) + 1):
            for f in reversed(levels):  # the top level's run covers the most work: record its steps
                rec_make, rec = recording(make) if b not in bound.sequences else (make, None)
                r = simulate(
                    rec_make,
                    SimOptions(streams=n, seconds=args.seconds, governor=False, freq_mhz=f, batch=b, max_batch=args.max_batch),
                )
                if rec is not None:
                    bound.add(b, rec, r)
                static[(f, b)] = r
        print(f"  static sweep: {n} streams ({time.perf_counter() - wall0:.0f} s)", file=sys.stderr)
        steps = simulate(
            make,
            governed(
                streams=n,
                seconds=args.seconds,
                budget_w=10.0,
                budget_steps=((args.seconds / 3, 7.0), (2 * args.seconds / 3, 10.0)),
            ),
        )
        steps_out[n] = steps.settle
        for w in budgets:
            gov = simulate(make, governed(streams=n, seconds=args.seconds, budget_w=w))
            ok_static = [(r.tokens_per_s, fb, r) for fb, r in static.items() if within(r, w)[0]]
            best = max(ok_static, key=lambda x: (x[0], -x[2].joules_per_token)) if ok_static else None
            cap_f = table.clock_cap(w)
            cap = static[(cap_f, min(n, args.max_batch))]
            cap_ok = within(cap, w)[0]
            runs = [gov, cap] + ([best[2]] if best else [])
            g_tokens = min(r.tokens for r in runs)
            sw = same_work(runs, g_tokens)
            g, c = sw[0], sw[1]
            s = sw[2] if best else None
            # what any schedule could do on this work: faster than the cap (and >= 90 % of the
            # best static), at the least energy; and at the cap's energy, as fast as possible
            want = max(c["tokens_per_s"], 0.9 * s["tokens_per_s"] if s else 0.0) * (1 + 1e-9)
            least_j = bound.least_j_per_token(g_tokens, want)
            most_tok = bound.most_tokens_per_s(g_tokens, c["j_per_token"])
            ends = np.arange(WARMUP_S + 1.0, gov.device_s, 0.01)
            roll = np.array([gov.log.average_w(t - 1.0, t) for t in ends])
            rows.append(
                {
                    "budget_w": w,
                    "streams": n,
                    "same_work_tokens": g_tokens,
                    "governor_tok_s": g["tokens_per_s"],
                    "governor_j_tok": g["j_per_token"],
                    "governor_60s_tok_s": gov.tokens_per_s,
                    "governor_60s_j_tok": gov.joules_per_token,
                    "governor_ok": gov.report["ok"],
                    "within_fraction": gov.report["long_within_fraction"],
                    "worst_1s_ratio": gov.report["worst_long_ratio"],
                    "worst_100ms_ratio": gov.report["worst_short_ratio"],
                    "mean_power_w": gov.mean_power_w,
                    "steady_within_2pct": float(np.mean(np.abs(roll - roll.mean()) <= 0.02 * roll.mean())),
                    "best_static": list(best[1]) if best else None,
                    "best_static_tok_s": s["tokens_per_s"] if s else None,
                    "best_static_j_tok": s["j_per_token"] if s else None,
                    "best_static_60s_tok_s": best[2].tokens_per_s if best else None,
                    "best_static_60s_j_tok": best[2].joules_per_token if best else None,
                    "ratio": g["tokens_per_s"] / s["tokens_per_s"] if s else None,
                    "energy_ratio": s["j_per_token"] / g["j_per_token"] if s else None,
                    "energy_ratio_60s": best[2].joules_per_token / gov.joules_per_token if best else None,
                    "cap_mhz": cap_f,
                    "cap_tok_s": c["tokens_per_s"],
                    "cap_j_tok": c["j_per_token"],
                    "cap_within": cap_ok,
                    "least_j_tok_at_targets": least_j,
                    "targets_tok_s": want,
                    "most_tok_s_at_cap_j": most_tok,
                    "freq_time_s": gov.freq_time_s,
                    "batch_time_s": gov.batch_time_s,
                    "events": len(gov.events),
                    "oc_events": sum(gov.protections["over_current_events"]),
                    "max_temp_c": gov.max_temp_c,
                }
            )
            print(f"  done: {w:g} W x {n} streams ({time.perf_counter() - wall0:.0f} s)", file=sys.stderr)
    probe.close()

    from edgebox.power.governor import DEFAULT_PROMPT_CHUNK

    extra = [f"governor prompt chunk {args.prompt_chunk or DEFAULT_PROMPT_CHUNK}"]
    if gov_config:
        extra.append(f"governor {gov_config}")
    print(
        f"edgebox power governor vs static settings: {name or 'DeepSeek-LLM-7B shape'}, {probe.box.n_chips} chips, "
        f"{probe.box.profile.name}, {args.seconds:g} s of device time per run, streams of requests with "
        f"200-400-token prompts and 200-400 generated tokens" + (f"; {', '.join(extra)}" if extra else "")
    )
    print()
    hdr = (
        f"{'budget':>6} {'streams':>7} | {'gov tok/s':>9} {'J/tok':>6} | {'best static':>11} {'tok/s':>6} {'J/tok':>6} | "
        f"{'ratio':>5} {'J ratio':>7} | {'cap MHz':>7} {'tok/s':>6} {'J/tok':>6} | {'least J/tok':>11} | "
        f"{'worst 1s':>8} {'in budget':>9} {'worst 100ms':>11}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        best = f"({r['best_static'][0]},{r['best_static'][1]})" if r["best_static"] else "none fits"
        print(
            f"{r['budget_w']:>5g}W {r['streams']:>7} | {r['governor_tok_s']:>9.1f} {r['governor_j_tok']:>6.4f} | "
            f"{best:>11} {r['best_static_tok_s'] or 0:>6.1f} {r['best_static_j_tok'] or 0:>6.4f} | "
            f"{(r['ratio'] or 0):>5.3f} {(r['energy_ratio'] or 0):>7.3f} | {r['cap_mhz']:>7} {r['cap_tok_s']:>6.1f} {r['cap_j_tok']:>6.4f} | "
            f"{r['least_j_tok_at_targets']:>11.4f} | "
            f"{r['worst_1s_ratio'] * 100:>7.1f}% {r['within_fraction'] * 100:>8.1f}% {r['worst_100ms_ratio'] * 100:>10.1f}%"
        )
    print()
    print("tokens/s and J/tok on the same work (each run's first G tokens, G the fewest of the three runs);")
    print("ratio = governor tok/s / best static tok/s; J ratio = best static J/tok / governor J/tok (>= 0.95 wanted);")
    print("least J/tok = the least energy per token of any clock schedule at any fixed batch limit that is faster than")
    print("the cap and >= 90 % of the best static (>= the cap's J/tok: beating the cap on both counts is impossible);")
    print("worst 1s / worst 100ms = the worst rolling window / budget; in budget = share of rolling 1 s windows <= budget.")
    print()
    print(
        f"{'budget':>6} {'streams':>7} | {'G tokens':>8} | {'gov 60 s tok/s':>14} {'J/tok':>6} {'J ratio':>7} | "
        f"{'most tok/s at cap J/tok':>23} | {'mean W':>6} {'steady ±2 %':>11}"
    )
    for r in rows:
        print(
            f"{r['budget_w']:>5g}W {r['streams']:>7} | {r['same_work_tokens']:>8} | {r['governor_60s_tok_s']:>14.1f} "
            f"{r['governor_60s_j_tok']:>6.4f} {(r['energy_ratio_60s'] or 0):>7.3f} | "
            f"{r['most_tok_s_at_cap_j']:>10.1f} ({r['most_tok_s_at_cap_j'] / r['cap_tok_s']:>5.3f}x cap) | "
            f"{r['mean_power_w']:>6.2f} {r['steady_within_2pct'] * 100:>10.1f}%"
        )
    print("gov 60 s: over the whole run (equal time, as the earlier table had it); most tok/s at cap J/tok: the fastest")
    print("any clock schedule can be on the same work without spending more per token than the cap; steady ±2 %: share")
    print("of rolling 1 s windows (after 3 s) within ±2 % of the run's mean.")
    print()
    print("budget steps 10 -> 7 -> 10 W (rolling 1 s window; steady = mean of the phase's second half):")
    print(f"{'streams':>7} | {'step':>9} {'steady W':>8} {'reach s':>7} {'settle s':>8} {'stays s':>7}")
    for n, settle in steps_out.items():
        for s in settle:
            prev = 10.0 if s["budget_w"] == 7.0 else 7.0
            print(
                f"{n:>7} | {prev:>3g} -> {s['budget_w']:<3g} {s['steady_w']:>8.2f} {_f(s['reach_s']):>7} {_f(s['settle_s']):>8} {_f(s['stays_s']):>7}"
            )
    print("reach: first window within the budget and ±2 % of steady; settle: ... and staying so for 1 s;")
    print("stays: ... and staying so to the end of the phase ('-': the steady state itself leaves the ±2 % band).")
    print(f"\nwall time {time.perf_counter() - wall0:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "settle": steps_out,
                    "seconds": args.seconds,
                    "prompt_chunk": args.prompt_chunk,
                    "governor_config": gov_config,
                },
                indent=1,
            )
        )
    return 0


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
