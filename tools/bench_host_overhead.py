"""Host time per decode token: a step's wall time minus the time its calling thread spends in
compiled calls, for the two paths of a lone sequence's one-token step, paired.

    python tools/bench_host_overhead.py /work/bench-models/deepseek-llm-7b-shape-Q4_0.gguf \\
        --chips 1,4 --steps 24

"layers": every layer in one hand-off per chip thread, one compiled call per layer
(``chips.decode``); "blocks": ``token_decoder.enabled = False``, each block through the chip
threads in one compiled call per chip (``kernels.fused``), norms and residual adds in Python.
The two paths alternate step by step on one loaded model (the machine's drift hits both alike).
Compiled time is what a thread spends inside the compiled functions (layer calls or blocks and
rms_norm kernels, and the lm head), timed by wrappers installed after both paths have compiled;
"host" = wall - the largest of the chip threads' compiled times: what the token costs beyond
the busiest thread's compiled work (a layer call's compiled time includes its waits at the
all-reduce, which the block path spends in Python instead).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import edgebox  # noqa: E402
from edgebox.chips import blocks, decode  # noqa: E402
from edgebox.kernels import elementwise, fused  # noqa: E402

compiled_s: dict[int, float] = {}  # per thread, this step


def _timed(fn):
    def call(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            me = threading.get_ident()
            compiled_s[me] = compiled_s.get(me, 0.0) + time.perf_counter() - t

    return call


TIMED = (
    (decode, "decode_layer"),
    (fused, "attention_decode_block"),
    (fused, "ffn_decode_block"),
    (elementwise, "rms_norm_kernel"),
    (blocks, "lm_head"),
)


@contextlib.contextmanager
def _timers():
    """The compiled kernels wrapped in timers for one measurement, then restored: compiled code
    that calls them (fused blocks call ``rms_norm_kernel``) and compiles later (a second chip
    count's thread groups) must find the compiled functions, not the wrappers."""
    originals = [(mod, name, getattr(mod, name)) for mod, name in TIMED]
    for mod, name, fn in originals:
        setattr(mod, name, _timed(fn))
    try:
        yield
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)


def measure(path: str, chips: int, steps: int) -> dict:
    m = edgebox.load(path, chips=chips, backend="numba")
    m.prepare()
    tr = m.transformer
    kv = tr.new_cache(64 + 2 * steps + 8)
    ids = np.arange(10, 74, dtype=np.int32)
    tr.forward(ids, np.arange(len(ids), dtype=np.int32), kv, all_logits=False)

    def step(layers: bool) -> tuple[float, float]:
        m.box.token_decoder.enabled = layers
        compiled_s.clear()
        t = time.perf_counter()
        tr.forward(np.array([30], np.int32), np.array([kv.length], np.int32), kv, all_logits=False)
        wall = time.perf_counter() - t
        return wall * 1e3, max(compiled_s.values(), default=0.0) * 1e3

    step(True), step(False)  # both paths compiled before the wrappers go in
    out = {"layers": [], "blocks": []}
    with _timers():
        for i in range(steps):
            for layers in (True, False) if i % 2 == 0 else (False, True):
                out["layers" if layers else "blocks"].append(step(layers))
                print(f"\rchips {chips}: step {i + 1} of {steps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    m.box.close()
    return {
        k: {
            "wall_ms": statistics.median(w for w, _ in v),
            "host_ms": statistics.median(w - c for w, c in v),
            "host_p90_ms": float(np.percentile([w - c for w, c in v], 90)),
        }
        for k, v in out.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--chips", default="1,4")
    p.add_argument("--steps", type=int, default=24)
    a = p.parse_args()
    print("| chips | path | step wall ms (median) | host ms (median) | host ms (p90) |")
    print("| --- | --- | --- | --- | --- |")
    for chips in (int(c) for c in a.chips.split(",")):
        for path, r in measure(a.model, chips, a.steps).items():
            print(f"| {chips} | {path} | {r['wall_ms']:.1f} | {r['host_ms']:.2f} | {r['host_p90_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
