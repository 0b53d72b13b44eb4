"""Where a batched decode step of 8 sequences goes, old kernels against this checkout's, in one process.

    python tools/profile_decode_step.py FILE.gguf [OLD_REV]

One chip, one kernel thread, every figure the calling thread's CPU time (which preemption by
other jobs does not inflate), the least of 5 calls: the whole step (8 one-token segments over
caches of 80 tokens), 8 tokens' share of a 64-token prompt, all layer matmuls at T = 8 and at
T = 64 / 8, the lm head at T = 8 and T = 1, the 30 attention and FFN blocks.  "old" runs
OLD_REV's Q6_K batched kernel (``sweep_matmul.old_package``) and the Python attention path;
"new" this checkout's kernels and the one-call batched attention block (kernels/fused_batch).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgebox  # noqa: E402
from edgebox.chips import blocks  # noqa: E402
from edgebox.gguf.quant_types import QType  # noqa: E402
from edgebox.kernels.quants import registry  # noqa: E402
from edgebox.model.kv_cache import Segment  # noqa: E402
from tools.sweep_matmul import old_package  # noqa: E402

B, CTX = 8, 80


def least_ms(f, n: int = 5) -> float:
    f()
    ts = []
    for _ in range(n):
        t = time.thread_time()
        f()
        ts.append(time.thread_time() - t)
    return min(ts) * 1e3


def main(path: str, old_rev: str) -> None:
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        os.environ.pop(k, None)
    numba.set_num_threads(1)
    old_package(old_rev, Path(tempfile.mkdtemp()))
    old_q6 = importlib.import_module("edgebox_old.kernels.quants.q6_k")
    new_tr = registry.TYPES[QType.Q6_K]
    old_tr = dataclasses.replace(new_tr, kernels=dataclasses.replace(new_tr.kernels, mm=old_q6.q6_k_mm))
    m = edgebox.load(path, chips=1, n_ctx=160)
    m.prepare()
    tr, box, a = m.transformer, m.box, m.args
    chip = box.chips[0]
    rng = np.random.default_rng(0)
    kv0 = m.new_cache(160)
    tr.forward_segments([Segment(rng.integers(100, 30000, CTX).astype(np.int32), np.arange(CTX, dtype=np.int32), kv0, False)])
    caches = []
    for _ in range(B):
        kv = m.new_cache(160)
        kv.copy_prefix(kv0, CTX)
        caches.append(kv)

    def reset():
        for kv in caches:
            kv.length = CTX

    def step():
        reset()
        tr.forward_segments([Segment(np.array([7], np.int32), np.array([CTX], np.int32), kv, False) for kv in caches])

    def pp64():
        kv = m.new_cache(65)
        tr.forward_segments([Segment(rng.integers(100, 30000, 64).astype(np.int32), np.arange(64, dtype=np.int32), kv, False)])

    h8 = rng.standard_normal((B, a.n_embd)).astype(np.float32)
    reset()
    st = box.attention_step(np.full(B, CTX, np.int32), np.arange(B + 1), [CTX] * B, caches)

    def attention():
        reset()
        for layer in range(a.n_layer):
            blocks.attention(chip, layer, h8, st)

    def ffn():
        for layer in range(a.n_layer):
            blocks.ffn(chip, layer, h8)

    def linears(T):
        xs = {n: rng.standard_normal((T, n)).astype(np.float32) for n in (a.n_embd, a.n_ff)}

        def run():
            for layer in chip.layers:
                for lin in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down):
                    lin(xs[lin.n_in])

        return run

    for mode in ("old", "new"):
        registry.TYPES[QType.Q6_K] = old_tr if mode == "old" else new_tr
        for layer in chip.layers:  # the one-call batched attention block on (new) or refused (old)
            if mode == "new":
                layer.decode_cache.pop(("attn_batch", B), None)
            else:
                layer.decode_cache[("attn_batch", B)] = None
        figures = dict(
            step=least_ms(step),
            pp64_per_8=least_ms(pp64, 3) / 8,
            linears_T8=least_ms(linears(8), 3),
            linears_T64_per_8=least_ms(linears(64), 2) / 8,
            lm_head_T8=least_ms(lambda: chip.lm_head(h8)),
            lm_head_T1=least_ms(lambda: chip.lm_head(h8[:1])),
            attention_blocks=least_ms(attention, 3),
            ffn_blocks=least_ms(ffn, 3),
        )
        print(mode, {k: round(v, 1) for k, v in figures.items()}, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "HEAD~1")
