"""Paired speed of two checkouts of edgebox: is the new commit as fast as the old one?

    python tools/bench_commits.py OLD_DIR NEW_DIR MODEL [--prompt 64] [--rounds 5] [--threads 2] [--chips 1]
                                  [--decode 32] [--burst 2]

Measures pp64 (one forward pass over a 64-token prompt, tok/s) and decode (greedy steps after a
64-token prompt, tok/s) of the same model file in one ``edgebox bench`` child process per checkout
(cwd and PYTHONPATH = that checkout, so each runs its own code). Both stay loaded and take turns at
every measurement, who goes first alternating: per round pp64 four times each, then decode in
bursts of 2 steps. This machine's memory bandwidth drifts by tens of percent within seconds and other
users' processes take the cores in turns, so only measurements taken back to back compare the code
rather than the machine's state: the verdict is the median [range] of the paired new/old ratios (a
burst counts its fastest step: the machine only ever slows a step down) with a 95 % confidence
interval over the rounds' medians, which says whether the run can tell a 2 % change at all. Each side's figure
alone is its best (pp64: best turn; decode: best round's median step, as ``edgebox bench`` does).

The child protocol and its handle (``_Child``, ``_paired``) are imported from NEW_DIR's bench module.
Progress goes to stderr, the summary to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PP_TURNS = 4  # pp64 pairs per round: a pair reads 0.8-1.2 on this machine, so it needs more than decode's 16


def bench_module(checkout: Path) -> str:
    """The module serving ``--child`` in that checkout (it moved into edgebox/commands/)."""
    return "edgebox.commands.bench" if (checkout / "edgebox/commands/bench.py").exists() else "edgebox.bench"


def describe(checkout: Path) -> str:
    """The checkout's commit, and proof that its child imports its own edgebox (not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    where = subprocess.run(
        [sys.executable, "-c", "import edgebox; print(edgebox.__file__)"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(checkout):
        raise SystemExit(f"{checkout}: the child would import edgebox from {where}")
    head = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return f"{checkout} @ {head.stdout.strip()[:70]}" + (" (+ uncommitted changes)" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--prompt", type=int, default=64, help="prompt-processing length (tokens)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chips", type=int, default=1)
    ap.add_argument("--decode", type=int, default=32, help="decode steps per round")
    ap.add_argument("--burst", type=int, default=2, help="decode steps per turn")
    ap.add_argument("--save", metavar="JSON", help="also write every measurement (seconds) there")
    a = ap.parse_args()
    old, new, model = a.old.resolve(), a.new.resolve(), str(a.model.resolve())

    sys.path.insert(0, str(new))
    bench = importlib.import_module(bench_module(new))

    class CheckoutChild(bench._Child):
        """``bench._Child`` started from a checkout: that checkout's edgebox serves the calls."""

        def __init__(self, name: str, checkout: Path, spec: dict):
            self.name = name
            self.proc = subprocess.Popen(
                [sys.executable, "-m", bench_module(checkout), "--child", json.dumps(spec)],
                cwd=checkout,
                env={**os.environ, "PYTHONPATH": str(checkout)},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            self.ready = self._reply()

    spec = {
        "runner": "edgebox",
        "model": model,
        "threads": a.threads,
        "chips": a.chips,
        "backend": None,
        "n_ctx": max(a.prompt, bench.TTFT_PROMPT) + a.decode + 8,
    }
    run = {
        "model": model,
        "threads": a.threads,
        "chips": a.chips,
        "rounds": a.rounds,
        "prompt": a.prompt,
        "sides": {"old": describe(old), "new": describe(new)},
        "pp_s": [[], []],  # per side (old, new), per turn: seconds of the prompt
        "decode_s": [[], []],
    }  # per side, per round, per burst: seconds of each step
    children = []
    try:
        for name, checkout in (("old", old), ("new", new)):
            bench._say(f"{name}: loading {model} in {checkout}")
            children.append(CheckoutChild(name, checkout, spec))
        for r in range(-1, a.rounds):  # round -1 warms up (a first call may compile kernels): not counted
            warm = r < 0
            secs = bench._paired(children, 1 if warm else PP_TURNS, lambda c: c.call("prompt", a.prompt), first=r)
            bench._paired(children, 1, lambda c: c.call("ttft"), first=r)  # the sequence the decode continues
            steps = bench._paired(children, 1 if warm else a.decode // a.burst, lambda c: c.call("decode", a.burst), first=r)
            if warm:
                continue
            for i in (0, 1):
                run["pp_s"][i] += secs[i]
                run["decode_s"][i].append(steps[i])
            bench._say(
                f"round {r + 1} of {a.rounds}: pp{a.prompt} {a.prompt / min(secs[0]):.2f} -> "
                f"{a.prompt / min(secs[1]):.2f} tok/s (best), decode {1 / _median_step(steps[0]):.2f} -> "
                f"{1 / _median_step(steps[1]):.2f} tok/s"
            )
    finally:
        for c in children:
            c.close()
    if a.save:
        Path(a.save).write_text(json.dumps(run))
    print(report(run))


def _median_step(bursts: list[list[float]]) -> float:
    return statistics.median(sum(bursts, []))


def report(run: dict) -> str:
    """Each side's best, and the median [range] of the paired new/old ratios."""
    prompt, rounds = run["prompt"], run["rounds"]
    pp_ratios = [o / n for o, n in zip(*run["pp_s"])]  # seconds old / new = speed new / old
    per_round = len(pp_ratios) // rounds
    ratios = {
        f"pp{prompt} tok/s": [pp_ratios[r * per_round : (r + 1) * per_round] for r in range(rounds)],
        "decode tok/s": [[min(o) / min(n) for o, n in zip(*bursts)] for bursts in zip(*run["decode_s"])],
    }
    best = {
        f"pp{prompt} tok/s": [prompt / min(side) for side in run["pp_s"]],
        "decode tok/s": [max(1 / _median_step(bursts) for bursts in side) for side in run["decode_s"]],
    }
    lines = [f"{run['model']}, {run['threads']} threads, {run['chips']} chip(s), {rounds} rounds"]
    lines += [f"  {name}: {text}" for name, text in run["sides"].items()]
    lines.append(f"{'':<16}{'old best':>10}{'new best':>10}   new/old: median [range] of the paired ratios")
    for label, by_round in ratios.items():
        pairs = sorted(sum(by_round, []))
        # the median's 95 % confidence interval, free of any assumed distribution, over the rounds'
        # medians (the pairs of a round share the machine's state, so rounds are the independent
        # samples): the order statistics of rank n/2 -+ 0.98 sqrt(n), 1-based. Wider than the
        # effect in question: take more rounds
        meds = sorted(statistics.median(v) for v in by_round)
        k = max(0, int(rounds / 2 - 0.98 * rounds**0.5) - 1)
        lines.append(
            f"{label:<16}{best[label][0]:>10.2f}{best[label][1]:>10.2f}   {statistics.median(pairs):.3f} "
            f"[{pairs[0]:.3f}-{pairs[-1]:.3f}] over {len(pairs)} pairs; 95 % CI over the rounds "
            f"{meds[k]:.3f}-{meds[-1 - k]:.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
