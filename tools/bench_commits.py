"""Paired speed of two checkouts of edgebox: is the new commit as fast as the old one?

    python tools/bench_commits.py OLD_DIR NEW_DIR MODEL [--prompt 64] [--rounds 5] [--threads 2] [--chips 1]
                                  [--decode 32] [--burst 2]

Measures pp64 (one forward pass over a 64-token prompt, tok/s) and decode (greedy steps after a
64-token prompt, tok/s) of the same model file in one ``edgebox bench`` child process per checkout
(cwd and PYTHONPATH = that checkout, so each runs its own code). Both stay loaded and take turns at
every measurement, who goes first alternating: per round pp64 twice each, then decode in bursts
of 2 steps. This machine's memory bandwidth drifts by tens of percent within seconds and other
users' processes take the cores in turns, so only measurements taken back to back compare the code
rather than the machine's state: the verdict is the median [range] of the paired new/old ratios (a
burst counts its fastest step: the machine only ever slows a step down). Each side's figure alone
is its best (pp64: best turn; decode: best round's median step, as ``edgebox bench`` reports).

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


def bench_module(checkout: Path) -> str:
    """The module serving ``--child`` in that checkout (it moved into edgebox/commands/)."""
    return "edgebox.commands.bench" if (checkout / "edgebox/commands/bench.py").exists() else "edgebox.bench"


def describe(checkout: Path) -> str:
    """The checkout's commit, and proof that its child imports its own edgebox (not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    where = subprocess.run([sys.executable, "-c", "import edgebox; print(edgebox.__file__)"], cwd=checkout, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(checkout):
        raise SystemExit(f"{checkout}: the child would import edgebox from {where}")
    head = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
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
    a = ap.parse_args()
    old, new, model = a.old.resolve(), a.new.resolve(), str(a.model.resolve())

    sys.path.insert(0, str(new))
    bench = importlib.import_module(bench_module(new))

    class CheckoutChild(bench._Child):
        """``bench._Child`` started from a checkout: that checkout's edgebox serves the calls."""

        def __init__(self, name: str, checkout: Path, spec: dict):
            self.name = name
            self.proc = subprocess.Popen([sys.executable, "-m", bench_module(checkout), "--child", json.dumps(spec)],
                                         cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.ready = self._reply()

    spec = {"runner": "edgebox", "model": model, "threads": a.threads, "chips": a.chips, "backend": None,
            "n_ctx": max(a.prompt, bench.TTFT_PROMPT) + a.decode + 8}
    sides = {"old": describe(old), "new": describe(new)}
    children = []
    try:
        for name, checkout in (("old", old), ("new", new)):
            bench._say(f"{name}: loading {model} in {checkout}")
            children.append(CheckoutChild(name, checkout, spec))
        pp: list[list[float]] = [[], []]         # per side, per turn: tok/s
        tg: list[list[float]] = [[], []]         # per side, per round: tok/s of the round's median step
        tg_bursts: list[list[float]] = [[], []]  # per side, per burst: tok/s of the burst's fastest step
        for r in range(-1, a.rounds):  # round -1 warms up (a first call may compile kernels): not counted
            warm = r < 0
            secs = bench._paired(children, 1 if warm else 2, lambda c: c.call("prompt", a.prompt), first=r)
            bench._paired(children, 1, lambda c: c.call("ttft"), first=r)  # the sequence the decode continues
            steps = bench._paired(children, 1 if warm else a.decode // a.burst, lambda c: c.call("decode", a.burst), first=r)
            if warm:
                continue
            for i in (0, 1):
                pp[i] += [a.prompt / s for s in secs[i]]
                tg[i].append(1.0 / statistics.median(sum(steps[i], [])))
                tg_bursts[i] += [1.0 / min(b) for b in steps[i]]
            bench._say(f"round {r + 1} of {a.rounds}: pp{a.prompt} {max(pp[0][-2:]):.2f} -> {max(pp[1][-2:]):.2f} tok/s, "
                       f"decode {tg[0][-1]:.2f} -> {tg[1][-1]:.2f} tok/s")
    finally:
        for c in children:
            c.close()

    print(f"{model}, {a.threads} threads, {a.chips} chip(s), {a.rounds} rounds")
    for name, text in sides.items():
        print(f"  {name}: {text}")
    print(f"{'':<16}{'old best':>10}{'new best':>10}   new/old: median [range] of the paired ratios")
    for label, best, paired in ((f"pp{a.prompt} tok/s", pp, pp), ("decode tok/s", tg, tg_bursts)):
        ratios = sorted(n / o for o, n in zip(*paired))
        print(f"{label:<16}{max(best[0]):>10.2f}{max(best[1]):>10.2f}   {statistics.median(ratios):.3f} "
              f"[{ratios[0]:.3f}-{ratios[-1]:.3f}] over {len(ratios)} pairs")


if __name__ == "__main__":
    main()
