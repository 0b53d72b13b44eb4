"""kernels.fused_batch: a batched decode step's attention block in one compiled call per chip and
layer gives the logits and the caches of the step-by-step Python path (blocks.attention's
projections, rope, attention_decode_append, output projection), on the tiny models of every
fusable weight type mix (Q4_K_M: q/k Q4_K and v Q6_K in one stack), qwen2 (QKV bias, GQA, neox
rope), 1 and 4 chips, float16 and quantized caches, ragged contexts and batch sizes."""

from __future__ import annotations

import numpy as np
import pytest

import edgebox
from edgebox.kernels import kv_quant
from edgebox.kernels.backend import RefOps
from edgebox.model import Segment
from tests.fixtures.paths import DATA
from tests.unit.model.test_model import _quantized_copy

PROMPTS = [[1, 50, 900, 7], [1, 31], [1, 2000, 15, 400, 3, 9, 8], [1], [1, 77, 78], [1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 3]]
CTX = [16, 9, 32, 12, 8, 24, 40]  # cache sizes differ too


def _step(m, n: int, fused: bool):
    """Prefill the first n prompts, then one decode step of all n (one segment each)."""
    kvs = []
    for ids, c in zip(PROMPTS[:n], CTX[:n]):
        kvs.append(m.transformer.new_cache(c))
        m.transformer.forward(np.array(ids, np.int32), np.arange(len(ids), dtype=np.int32), kvs[-1])
    layers = [layer for chip in m.box.chips for layer in chip.layers]
    for layer in layers:  # the Python path: every chip's batched block refused
        if not fused:
            layer.decode_cache[("attn_batch", n)] = None
        else:
            layer.decode_cache.pop(("attn_batch", n), None)
    segs = [
        Segment(np.array([40 + i], np.int32), np.array([len(p)], np.int32), kv) for i, (p, kv) in enumerate(zip(PROMPTS, kvs))
    ]
    logits = m.transformer.forward_segments(segs)
    if fused:  # the one-call path was taken wherever a chip has the block
        assert all(layer.decode_cache[("attn_batch", n)] is not None for layer in layers if layer.wqkv is not None)
    return logits, kvs


@pytest.mark.parametrize(
    "name,chips,types",
    [
        ("coder-Q4_K_M", 1, ("f16", "f16")),
        ("coder-Q4_K_M", 4, ("f16", "f16")),
        ("coder-Q4_0", 1, ("q8_0", "q4_0")),
        ("coder-Q8_0", 4, ("q8_0", "q8_0")),
        ("qwen2-Q8_0", 1, ("f16", "f16")),
        ("qwen2-Q8_0", 4, ("f16", "f16")),  # (its head size, 16, takes no quantized cache)
    ],
)
def test_batched_block_equals_the_python_path(name, chips, types, tiny_f32, tmp_path):
    path = (
        _quantized_copy(tiny_f32("tiny-qwen2"), tmp_path / "qwen2-Q8_0.gguf")
        if name == "qwen2-Q8_0"
        else DATA / "models" / f"tiny-deepseek-{name}.gguf"
    )
    m = edgebox.load(path, chips=chips, backend="numba", cache_type_k=types[0], cache_type_v=types[1])
    for n in (2, 3, 7):
        got, kv_got = _step(m, n, fused=True)
        want, kv_want = _step(m, n, fused=False)
        for g, w in zip(got, want):
            # the same kernels on the same rows: equal up to float re-association
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * float(np.abs(w).max()))
        for a, b in zip(kv_got, kv_want):
            assert a.length == b.length
            for x, y in zip(a.k + a.v, b.k + b.v):
                np.testing.assert_array_equal(
                    kv_quant.dequantize(x[:, : a.length]) if x.dtype != np.float16 else x[:, : a.length],
                    kv_quant.dequantize(y[:, : b.length]) if y.dtype != np.float16 else y[:, : b.length],
                )
    m.box.close()


def test_reference_and_float_weights_keep_the_python_path(tiny_f32):
    """The reference backend has no one-call block; float weights cannot go in one (None)."""
    m = edgebox.load(tiny_f32("tiny-qwen2"), chips=1, backend="numba")
    lw = m.box.chips[0].layers[0]
    assert (
        m.box.ops.decode_attention_batch(lw, np.zeros((2, m.args.n_embd), np.float32), None, None, 0, None, 0, 0, None, m.args)
        is None
    )
    m.box.close()
    assert not hasattr(RefOps, "decode_attention_batch")
