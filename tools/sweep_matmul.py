"""Old against new batched matmul kernels, back to back in one process, on a GGUF's matrices.

    python tools/sweep_matmul.py FILE.gguf --old HEAD~1 --T 8 16 64 512
    python tools/sweep_matmul.py FILE.gguf --tensors blk.0.attn_v.weight --random Q5_K:4096x11008

The old kernels are the ``edgebox`` package of git revision ``--old``, extracted to a temporary
directory as the package ``edgebox_old`` (imports rewritten), so both versions run in this
process on the same machine state; the new ones are this checkout's.  For every matrix and T,
calls alternate old, new, old, new, ... over two packed copies of each (so no call is served
from the last-level cache the previous one filled); the figure is GFLOP/s (2 * T * n_out * n_in
per call), best and median of --reps calls per side, and the ratio of the medians.  With
``--threads 1`` calls are timed by the calling thread's CPU time, which preemption by other jobs
does not inflate (the kernel then runs on that thread): the figure for a busy machine.

Matrices: the named tensors of FILE (default: the 7B shapes of a Q4_K_M file, Q4_K and Q6_K),
plus ``--random TYPE:n_outxn_in`` weights of random blocks (speed does not depend on values).
Run it while holding /tmp/edgebox-bench.lock on a shared machine (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgebox.gguf.quant_types import QType  # noqa: E402
from edgebox.kernels import matmul as M  # noqa: E402

DEFAULT_TENSORS = (
    "blk.0.attn_q.weight",  # Q4_K 4096 x 4096
    "blk.0.attn_v.weight",  # Q6_K 4096 x 4096
    "blk.0.ffn_gate.weight",  # Q4_K 11008 x 4096
    "blk.3.ffn_down.weight",  # Q4_K 4096 x 11008
    "blk.0.ffn_down.weight",  # Q6_K 4096 x 11008
)


def old_package(rev: str, tmp: Path):
    """``edgebox.kernels.matmul`` of git revision ``rev``, importable beside this checkout's."""
    dst = tmp / "edgebox_old"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "edgebox"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    (tmp / "edgebox").rename(dst)
    for f in dst.rglob("*.py"):
        src = f.read_text()
        f.write_text(re.sub(r"\bedgebox\b(?=[.\s])", "edgebox_old", src))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("edgebox_old.kernels.matmul")


def gguf_weights(path: str, names) -> list[tuple[str, QType, np.ndarray]]:
    from gguf import GGUFReader

    r = GGUFReader(path)
    by_name = {t.name: t for t in r.tensors}
    out = []
    for name in names:
        t = by_name[name]
        out.append((name, QType(int(t.tensor_type)), np.asarray(t.data).reshape(int(t.shape[1]), -1)))
    return out


def random_weight(spec: str, rng) -> tuple[str, QType, np.ndarray]:
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_matmul import random_weight as rw

    name, shape = spec.split(":")
    n_out, n_in = (int(v) for v in shape.lower().split("x"))
    qtype = QType[name]
    return f"random {name} {n_out}x{n_in}", qtype, rw(qtype, n_out, n_in, rng)


def sweep(mods, weights, Ts, reps: int, rng, cpu: bool) -> None:
    print(f"{'matrix':28s} {'type':5s} {'n_out x n_in':12s} {'T':>4s}  {'old best/med':>13s}  {'new best/med':>13s}  new/old")
    for name, qtype, raw in weights:
        packed = [[m.pack(raw, qtype) for _ in range(2)] for m in mods]
        n_out, n_in = packed[1][0].n_out, packed[1][0].n_in
        for T in Ts:
            X = rng.standard_normal((T, n_in)).astype(np.float32)
            flop = 2.0 * T * n_out * n_in
            times: list[list[float]] = [[], []]
            for m, ws in zip(mods, packed):  # compile / warm
                m.matmul(ws[0], X)
            clock = time.thread_time if cpu else time.perf_counter
            for i in range(reps):
                for side, (m, ws) in enumerate(zip(mods, packed)):
                    w = ws[i % 2]
                    t = clock()
                    m.matmul(w, X)
                    times[side].append(clock() - t)
            rates = [(flop / min(ts) / 1e9, flop / statistics.median(ts) / 1e9) for ts in times]
            print(
                f"{name[:28]:28s} {qtype.name:5s} {f'{n_out}x{n_in}':12s} {T:4d}  "
                f"{rates[0][0]:6.0f}/{rates[0][1]:<6.0f}  {rates[1][0]:6.0f}/{rates[1][1]:<6.0f}  "
                f"{rates[1][1] / rates[0][1]:.3f}",
                flush=True,
            )
        packed = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", nargs="?", help="a GGUF file whose tensors are swept")
    ap.add_argument("--tensors", nargs="*", default=None, help=f"tensor names (default: {', '.join(DEFAULT_TENSORS)})")
    ap.add_argument("--random", nargs="*", default=[], help="TYPE:n_outxn_in weights of random blocks")
    ap.add_argument("--old", default="HEAD", help="git revision of the old kernels (default HEAD)")
    ap.add_argument("--T", nargs="+", type=int, default=[8, 16, 64, 512])
    ap.add_argument("--reps", type=int, default=8, help="timed calls per side, matrix and T")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    weights = []
    if args.gguf:
        weights += gguf_weights(args.gguf, args.tensors if args.tensors is not None else DEFAULT_TENSORS)
    weights += [random_weight(s, rng) for s in args.random]
    with tempfile.TemporaryDirectory() as tmp:
        old = old_package(args.old, Path(tmp))
        clock = "the calling thread's CPU time" if args.threads == 1 else "wall time"
        print(f"old = {args.old}, new = {ROOT} (working tree); {args.threads} threads, {clock}; numba {numba.__version__}")
        sweep((old, M), weights, args.T, args.reps, rng, args.threads == 1)


if __name__ == "__main__":
    main()
