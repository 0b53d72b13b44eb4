"""The power governor against every static setting: the table for the README.

    python tools/bench_power.py [MODEL.gguf] [--seconds 60] [--budgets 6,8,10,12] [--streams 1,4,16] [--json OUT]

For each stream count, every static (DVFS level, batch limit) setting runs once with the
governor off (``power simulate --governor off --freq F --batch B``); a setting "stays within" a
budget when its power trace passes the same test the governor is held to (>= 99 % of rolling
1 s windows within the budget after the first 2 s, the worst <= 105 %, every 100 ms window
<= 120 %).  Then, per budget x streams: the governor's run, the best static setting within the
budget, and the "N W mode" clock cap (Jetson nvpmodel's idea: the highest level whose predicted
full-load power fits the budget, batch unrestricted).  Per stream count, one more governor run
with the budget stepping 10 -> 7 -> 10 W gives the settle times.

Without MODEL the full DeepSeek-LLM-7B shape (Q4_0) is used without a file (the dry run needs
only the shape); with MODEL, that file's shape.  Deterministic: the same options print the same
table.  Wall time: a few minutes (the sweep is 7 levels x up to 16 batch limits per stream count).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgebox.power.budget import Budget, Timeline, check  # noqa: E402
from edgebox.power.shapes import shape_model, shape_model_of_file  # noqa: E402
from edgebox.power.simulate import WARMUP_S, SimOptions, simulate  # noqa: E402
from edgebox.power.table import PowerTable  # noqa: E402


def within(result, watts: float) -> tuple[bool, object]:
    """Does a static run's trace pass the budget test at ``watts``?"""
    rep = check(result.log, Timeline(((0.0, watts),)), WARMUP_S, result.device_s, budget=Budget(watts))
    return rep.ok(), rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, help="GGUF file whose shape to use (default: DeepSeek-LLM-7B Q4_0 shape)")
    ap.add_argument("--seconds", type=float, default=60.0, help="device seconds per run (default 60)")
    ap.add_argument("--budgets", default="6,8,10,12")
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write every number as JSON here")
    args = ap.parse_args(argv)
    budgets = [float(x) for x in args.budgets.split(",")]
    streams = [int(x) for x in args.streams.split(",")]
    if args.model is not None:
        make = lambda: shape_model_of_file(args.model)  # noqa: E731
    else:
        make = shape_model
    wall0 = time.perf_counter()
    probe = make()
    table = PowerTable.from_box(probe.box, args.max_batch)
    levels = list(table.levels_mhz)
    name = getattr(probe, "name", "")
    probe.close()

    rows, steps_out = [], {}
    for n in streams:
        # every static setting once; batch limits above the stream count run the same as n
        static = {}
        for f in levels:
            for b in range(1, min(n, args.max_batch) + 1):
                r = simulate(make, SimOptions(streams=n, seconds=args.seconds, governor=False, freq_mhz=f, batch=b,
                                              max_batch=args.max_batch))
                static[(f, b)] = r
        steps = simulate(make, SimOptions(streams=n, seconds=args.seconds, budget_w=10.0,
                                          budget_steps=((args.seconds / 3, 7.0), (2 * args.seconds / 3, 10.0)),
                                          max_batch=args.max_batch))
        steps_out[n] = steps.settle
        for w in budgets:
            gov = simulate(make, SimOptions(streams=n, seconds=args.seconds, budget_w=w, max_batch=args.max_batch))
            ok_static = [(r.tokens_per_s, fb, r) for fb, r in static.items() if within(r, w)[0]]
            best = max(ok_static, key=lambda x: (x[0], -x[2].joules_per_token)) if ok_static else None
            cap_f = table.clock_cap(w)
            cap = static[(cap_f, min(n, args.max_batch))]
            cap_ok = within(cap, w)[0]
            rows.append({
                "budget_w": w, "streams": n,
                "governor_tok_s": gov.tokens_per_s, "governor_j_tok": gov.joules_per_token,
                "governor_ok": gov.report["ok"], "within_fraction": gov.report["long_within_fraction"],
                "worst_1s_ratio": gov.report["worst_long_ratio"], "worst_100ms_ratio": gov.report["worst_short_ratio"],
                "best_static": list(best[1]) if best else None,
                "best_static_tok_s": best[0] if best else None,
                "best_static_j_tok": best[2].joules_per_token if best else None,
                "ratio": gov.tokens_per_s / best[0] if best else None,
                "energy_ratio": best[2].joules_per_token / gov.joules_per_token if best else None,
                "cap_mhz": cap_f, "cap_tok_s": cap.tokens_per_s, "cap_j_tok": cap.joules_per_token, "cap_within": cap_ok,
                "freq_time_s": gov.freq_time_s, "events": len(gov.events),
                "oc_events": sum(gov.protections["over_current_events"]), "max_temp_c": gov.max_temp_c,
            })
            print(f"  done: {w:g} W x {n} streams ({time.perf_counter() - wall0:.0f} s)", file=sys.stderr)

    print(f"edgebox power governor vs static settings: {name or 'DeepSeek-LLM-7B shape'}, {probe.box.n_chips} chips, "
          f"{probe.box.profile.name}, {args.seconds:g} s of device time per run, streams of requests with "
          f"200-400-token prompts and 200-400 generated tokens")
    print()
    hdr = (f"{'budget':>6} {'streams':>7} | {'gov tok/s':>9} {'J/tok':>6} | {'best static (MHz,batch)':>23} {'tok/s':>6} {'J/tok':>6} | "
           f"{'ratio':>5} {'J ratio':>7} | {'cap MHz':>7} {'tok/s':>6} {'J/tok':>6} | {'worst 1s':>8} {'in budget':>9} {'worst 100ms':>11}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        best = f"({r['best_static'][0]},{r['best_static'][1]})" if r["best_static"] else "none fits"
        print(f"{r['budget_w']:>5g}W {r['streams']:>7} | {r['governor_tok_s']:>9.1f} {r['governor_j_tok']:>6.3f} | "
              f"{best:>23} {r['best_static_tok_s'] or 0:>6.1f} {r['best_static_j_tok'] or 0:>6.3f} | "
              f"{(r['ratio'] or 0):>5.2f} {(r['energy_ratio'] or 0):>7.2f} | {r['cap_mhz']:>7} {r['cap_tok_s']:>6.1f} {r['cap_j_tok']:>6.3f} | "
              f"{r['worst_1s_ratio'] * 100:>7.1f}% {r['within_fraction'] * 100:>8.1f}% {r['worst_100ms_ratio'] * 100:>10.1f}%")
    print()
    print("ratio = governor tok/s / best static tok/s; J ratio = best static J/tok / governor J/tok (>= 0.95 wanted);")
    print("worst 1s / worst 100ms = the worst rolling window / budget; in budget = share of rolling 1 s windows <= budget.")
    print()
    print("budget steps 10 -> 7 -> 10 W (rolling 1 s window; steady = mean of the phase's second half):")
    print(f"{'streams':>7} | {'step':>9} {'steady W':>8} {'reach s':>7} {'settle s':>8} {'stays s':>7}")
    for n, settle in steps_out.items():
        for s in settle:
            prev = 10.0 if s["budget_w"] == 7.0 else 7.0
            print(f"{n:>7} | {prev:>3g} -> {s['budget_w']:<3g} {s['steady_w']:>8.2f} {_f(s['reach_s']):>7} {_f(s['settle_s']):>8} {_f(s['stays_s']):>7}")
    print("reach: first window within the budget and ±2 % of steady; settle: ... and staying so for 1 s;")
    print("stays: ... and staying so to the end of the phase ('-': the steady state itself leaves the ±2 % band).")
    print(f"\nwall time {time.perf_counter() - wall0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "settle": steps_out, "seconds": args.seconds}, indent=1))
    return 0


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
