"""Host overhead of tensor parallelism: decode tok/s with the model on N chips vs one chip.

    python tools/bench_chips.py MODEL [--chips 4] [--steps 12]

Both runs use the same threads (numba's default) and alternate, so background noise hits both;
the N-chip run splits every weight into shards computed on N host threads, with an explicit
all-reduce per half-layer, and charges device time to the chips (which one chip does too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import edgebox  # noqa: E402


def decode_rate(m, steps: int) -> float:
    kv = m.new_cache(64 + steps + 1)
    fwd = m.transformer.forward
    fwd(np.arange(100, 164, dtype=np.int32), np.arange(64, dtype=np.int32), kv, all_logits=False)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        fwd(np.array([200 + i], np.int32), np.array([64 + i], np.int32), kv, all_logits=False)
        times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--chips", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    rates: dict[int, list[float]] = {1: [], a.chips: []}
    for r in range(a.rounds):
        for n in (1, a.chips):
            m = edgebox.load(a.model, chips=n, n_ctx=128)
            m.prepare()
            rates[n].append(decode_rate(m, a.steps))
            m.box.close()
            del m
            print(f"round {r + 1}: {n} chip(s): {rates[n][-1]:.2f} tok/s", file=sys.stderr, flush=True)
    one, many = max(rates[1]), max(rates[a.chips])
    print(f"decode: 1 chip {one:.2f} tok/s, {a.chips} chips {many:.2f} tok/s, ratio {many / one:.3f}")


if __name__ == "__main__":
    main()
