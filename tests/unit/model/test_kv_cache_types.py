"""Quantized KV caches (--cache-type-k/-v q8_0, q4_0) through the cache, the model, the engine,
the chips' memory and cost model, ``edgebox plan`` and the command line.

Quantizing the cache changes the logits by itself (on the tiny random model q8_0 moves them by
~0.01 of a row's spread, q4_0 by ~0.1): paths that should agree are compared with the same cache
types, so they differ by float re-association only.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import edgebox
from edgebox.commands.plan import format_plan, make_plan
from edgebox.daemon.config import ConfigError, load_config
from edgebox.hw.step import steady_decode
from edgebox.kernels import kv_quant as KQ
from edgebox.kernels import ref
from edgebox.model import KVCache, Segment
from tests.fixtures.paths import TEST_MODEL

RNG = np.random.default_rng(77)


def fill(kv: KVCache, n: int, hd: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Store n random keys and values in every chip's slice of every layer; what was stored."""
    stored = []
    for chip in range(len(kv.k)):
        for layer in range(kv.k[chip].shape[0]):
            k = RNG.standard_normal((n, kv.k[chip].shape[2], hd)).astype(np.float32)
            v = RNG.standard_normal(k.shape).astype(np.float32)
            kv.store(chip, layer, 0, k, v)
            stored.append((k, v))
    kv.pos[:n] = np.arange(n)
    kv.length = n
    return stored


@pytest.fixture(scope="module")
def model():
    return edgebox.load(TEST_MODEL)


# -- the cache -----------------------------------------------------------------------------------


@pytest.mark.parametrize("type_k,type_v", [("q8_0", "q8_0"), ("q4_0", "f16"), ("f16", "q4_0")])
def test_store_copy_prefix_and_shift(model, type_k, type_v):
    a = model.args
    kv = KVCache(a, 40, [2, 2], type_k, type_v)
    assert kv.k[0].dtype == KQ.cache_dtype(type_k) and kv.v[1].dtype == KQ.cache_dtype(type_v)
    assert kv.nbytes == 2 * a.n_layer * 40 * 2 * (KQ.kv_row_bytes(type_k, a.head_dim) + KQ.kv_row_bytes(type_v, a.head_dim))
    stored = fill(kv, 30, a.head_dim)
    k0, v0 = stored[0]  # chip 0, layer 0
    np.testing.assert_array_equal(kv.k[0][0, :30], KQ.quantize(k0, type_k))
    np.testing.assert_array_equal(kv.v[0][0, :30], KQ.quantize(v0, type_v))

    other = KVCache(a, 40, [2, 2], type_k, type_v)
    other.copy_prefix(kv, 20)  # the prompt cache: the blocks, byte for byte
    assert other.length == 20
    for x, y in zip(other.k + other.v, kv.k + kv.v):
        np.testing.assert_array_equal(x[:, :20].view(np.uint8), y[:, :20].view(np.uint8))
    with pytest.raises(ValueError, match="cache types"):
        KVCache(a, 40, [2, 2]).copy_prefix(kv, 5)

    # context shift: V moves as it is; K is dequantized, turned out of its Hadamard basis, roped
    # back by n_discard, turned and quantized again (llama.cpp's K-shift)
    before_k, before_v = [k.copy() for k in kv.k], [v.copy() for v in kv.v]
    kv.shift(4, 6, a)
    assert kv.length == 24 and kv.pos[:24].tolist() == list(range(4)) + list(range(4, 24))
    for chip in range(2):
        np.testing.assert_array_equal(kv.k[chip][:, :4], before_k[chip][:, :4])
        np.testing.assert_array_equal(kv.v[chip][:, 4:24], before_v[chip][:, 10:30])
        for layer in range(a.n_layer):
            moved = KQ.rotate(KQ.dequantize(before_k[chip][layer, 10:30]), kv.rot_k)
            roped = ref.rope(moved, np.full(20, -6, np.int32), a.n_rot, a.rope_freq_base, a.rope_freq_scale, a.rope_neox)
            np.testing.assert_array_equal(kv.k[chip][layer, 4:24], KQ.quantize(KQ.rotate(roped, kv.rot_k), type_k))


def test_shift_of_a_quantized_k_stays_close_to_the_f16_shift(model):
    """Requantizing after the rotation adds about one more rounding of the type, no more."""
    a = model.args
    caches = {t: KVCache(a, 64, None, t, "f16") for t in ("f16", "q8_0")}
    k = RNG.standard_normal((50, a.n_head_kv, a.head_dim)).astype(np.float32)
    for kv in caches.values():
        for layer in range(a.n_layer):
            kv.store(0, layer, 0, KQ.rotate(k, kv.rot_k), k)
        kv.length = 50
        kv.shift(2, 9, a)
    rot = caches["q8_0"].rot_k
    got = KQ.rotate(KQ.dequantize(caches["q8_0"].k[0][:, :41]), rot)
    want = caches["f16"].k[0][:, :41].astype(np.float32)
    step = np.abs(k).max() / 127  # one q8_0 step of the largest block
    assert np.abs(got - want).max() < 2.5 * step


def test_bad_types_are_refused_with_the_field_name(model, micro_gguf):
    with pytest.raises(edgebox.EdgeboxError, match="^cache_type_k must be one of f16, q8_0, q4_0"):
        edgebox.load(TEST_MODEL, cache_type_k="q5_0")
    with pytest.raises(edgebox.EdgeboxError, match="^cache_type_v must be one of"):
        KVCache(model.args, 8, None, "f16", "int8")
    with pytest.raises(edgebox.EdgeboxError, match="cache_type_k q8_0 needs a head size that is a multiple of 32"):
        edgebox.load(micro_gguf(), cache_type_k="q8_0")


# -- the model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("types", [("q8_0", "q8_0"), ("q4_0", "q4_0")])
def test_incremental_decode_equals_full_prompt_and_four_chips_one(types):
    ids = [1, 50, 900, 7, 31, 400, 12, 999, 5000, 3]
    out = {}
    for chips in (1, 4):
        m = edgebox.load(TEST_MODEL, chips=chips, cache_type_k=types[0], cache_type_v=types[1])
        full = m.logits(ids)
        kv = m.new_cache()
        rows = [m.transformer.forward(np.array(ids[:4], np.int32), np.arange(4, dtype=np.int32), kv)]
        for i in range(4, len(ids)):
            rows.append(m.transformer.forward(np.array([ids[i]], np.int32), np.array([i], np.int32), kv))
        # the prompt path (float scores over dequantized keys) and the one-call decode path
        # (q8_0: integer dot products) read the same blocks
        agree_but_for_flipped_codes(np.concatenate(rows), full)
        out[chips] = full
        m.box.close()
    agree_but_for_flipped_codes(out[4], out[1])  # four chips sum attn_output in another order


def agree_but_for_flipped_codes(got: np.ndarray, want: np.ndarray) -> None:
    """Two paths that differ by float re-association: equal to 1e-4 of a row's spread, except
    that an ulp of difference in a key or value now and then moves it across a rounding
    boundary of the cache's type (one code, one quantization step), which moves that row and the
    ones after it a little more (measured here: rows 4 and 7 of q8_0 by 0.004 and 0.034 of the
    spread, every other row by < 1e-5; q4_0's coarser steps are crossed less often)."""
    err = np.abs(got - want).max(axis=1) / want.std(axis=1)
    assert np.median(err) < 1e-4 and err.max() < 0.06, err


@pytest.mark.parametrize("backend,chips", [("numba", 1), ("numba", 4), ("ref", 4)])
def test_batched_decode_equals_alone_with_a_quantized_cache(backend, chips):
    """One attention call for several sequences' one-token steps (attention_decode_append, which
    quantizes each new key and value itself) = each sequence decoding alone (the one-call block,
    or the step-by-step path on the reference)."""
    m = edgebox.load(TEST_MODEL, chips=chips, backend=backend, cache_type_k="q8_0", cache_type_v="q4_0")
    prompts, ctx = [[1, 50, 900, 7], [1, 31], [1, 2000, 15, 400, 3, 9, 8]], [16, 9, 32]
    together, alone = [], []
    for kvs in (together, alone):
        for ids, n in zip(prompts, ctx):
            kvs.append(m.transformer.new_cache(n))
            m.transformer.forward(np.array(ids, np.int32), np.arange(len(ids), dtype=np.int32), kvs[-1])
    segs = [
        Segment(np.array([5 + i], np.int32), np.array([len(p)], np.int32), kv) for i, (p, kv) in enumerate(zip(prompts, together))
    ]
    got = m.transformer.forward_segments(segs)
    for i, (p, kv, kv_alone) in enumerate(zip(prompts, together, alone)):
        want = m.transformer.forward(np.array([5 + i], np.int32), np.array([len(p)], np.int32), kv_alone, all_logits=False)
        np.testing.assert_allclose(got[i], want, atol=2e-3 * float(np.abs(want).max()))
        # the new slot holds the same blocks up to a rounding step of the activations
        for a, b in zip(kv.k + kv.v, kv_alone.k + kv_alone.v):
            np.testing.assert_allclose(KQ.dequantize(a[:, : kv.length]), KQ.dequantize(b[:, : kv.length]), atol=5e-2)
    m.box.close()


def test_one_call_decode_equals_the_step_by_step_path():
    m = edgebox.load(TEST_MODEL, chips=1, backend="numba", cache_type_k="q8_0", cache_type_v="q8_0")
    ids = [1, 50, 900, 7, 31]
    kvs = [m.transformer.new_cache(16) for _ in range(2)]
    for kv in kvs:
        m.transformer.forward(np.array(ids, np.int32), np.arange(len(ids), dtype=np.int32), kv)
    m.box.token_decoder.enabled = False  # each block in one call (the layer path: test_model.py)
    one_call = m.transformer.forward(np.array([9], np.int32), np.array([len(ids)], np.int32), kvs[0])
    layers = m.box.chips[0].layers
    assert all(layer.decode_cache["attn"] is not None for layer in layers)
    for layer in layers:
        layer.decode_cache.update(attn=None, ffn=None)
    step_by_step = m.transformer.forward(np.array([9], np.int32), np.array([len(ids)], np.int32), kvs[1])
    np.testing.assert_allclose(one_call, step_by_step, rtol=0, atol=1e-4 * float(np.abs(step_by_step).max()))
    for a, b in zip(kvs[0].k + kvs[0].v, kvs[1].k + kvs[1].v):  # the fused block quantizes as the step path
        np.testing.assert_array_equal(a[:, : len(ids) + 1].view(np.uint8), b[:, : len(ids) + 1].view(np.uint8))
    m.box.close()


@pytest.mark.parametrize("types", [("f16", "f16"), ("q8_0", "q4_0")])
def test_one_call_decode_over_a_long_context_agrees_with_the_step_path(types):
    """Past PARALLEL_DECODE_CONTEXT cached keys the step-by-step path spreads attention over
    numba's threads while the one-call block keeps it on its chip thread: the same per-head
    arithmetic, the same logits."""
    from edgebox.kernels.backend import PARALLEL_DECODE_CONTEXT

    m = edgebox.load(TEST_MODEL, chips=1, backend="numba", cache_type_k=types[0], cache_type_v=types[1])
    ids = RNG.integers(10, 30000, PARALLEL_DECODE_CONTEXT + 40).astype(np.int32)
    kvs = [m.transformer.new_cache(len(ids) + 4) for _ in range(2)]
    for kv in kvs:
        m.transformer.forward(ids, np.arange(len(ids), dtype=np.int32), kv)
    pos = np.array([len(ids)], np.int32)
    one_call = m.transformer.forward(np.array([9], np.int32), pos, kvs[0])  # every layer in one hand-off (chips.decode)
    for layer in m.box.chips[0].layers:
        layer.decode_cache.update(attn=None, ffn=None)
    step_by_step = m.transformer.forward(np.array([9], np.int32), pos, kvs[1])
    np.testing.assert_allclose(one_call, step_by_step, rtol=0, atol=1e-4 * float(np.abs(step_by_step).max()))
    m.box.close()


@pytest.mark.parametrize("chips", [1, 4])
def test_engine_with_q8_0_on_one_and_four_chips(chips):
    """The engine (continuous batching, prompt chunks) runs on a q8_0 cache and budgets its bytes:
    the same greedy text on 4 chips as on 1, each prompt's text as it is alone."""
    from edgebox.engine import Engine, Request

    greedy = edgebox.SamplingParams(temperature=0.0)
    prompts = ["def add(a, b):", "import numpy as np\n", "class Stack:\n    def push(self, x):"]
    m = edgebox.load(TEST_MODEL, chips=chips, cache_type_k="q8_0", cache_type_v="q8_0")
    f16 = edgebox.load(TEST_MODEL, chips=chips)
    e = Engine(m, max_batch=3, prefill_chunk=8)
    try:
        assert e.kv_bytes_per_token == f16.box.kv_bytes_per_token * 34 // 64
        handles = [e.submit(Request(prompt=p, max_tokens=10, params=greedy)) for p in prompts]
        texts = [h.result(timeout=120).text for h in handles]
    finally:
        e.close(drain=False)
    alone = ["".join(m.generate(p, max_tokens=10, temperature=0.0)) for p in prompts]
    assert texts == alone
    m.box.close()
    f16.box.close()


# -- memory, cost model, plan, command line --------------------------------------------------------


def test_kv_bytes_and_the_cost_of_reading_them():
    """Per token: f16 2 bytes a value, q8_0 34/32, q4_0 18/32; decode at a long context reads
    fewer KV bytes, so the cost model prices it faster (the weights are the same)."""
    ms = {t: edgebox.load(TEST_MODEL, chips=4, cache_type_k=t, cache_type_v=t) for t in ("f16", "q8_0", "q4_0")}
    per_token = {t: m.box.kv_bytes_per_token for t, m in ms.items()}
    a = ms["f16"].args
    assert per_token["f16"] == 2 * a.n_layer * a.n_head_kv * a.head_dim * 2
    assert per_token["q8_0"] * 64 == per_token["f16"] * 34 and per_token["q4_0"] * 64 == per_token["f16"] * 18
    assert ms["q8_0"].new_cache(100).nbytes == 100 * per_token["q8_0"]
    freqs = np.array(ms["f16"].box.profile.freqs_mhz, float)
    speed = {t: steady_decode(m.box.accounting.work, 8, 2048, freqs).tokens_per_s for t, m in ms.items()}
    assert (speed["q8_0"] > speed["f16"]).all() and (speed["q4_0"] > speed["q8_0"]).all()
    for m in ms.values():
        m.box.close()


def test_plan_shows_the_smaller_kv_cache():
    plans = {}
    for t in ("f16", "q8_0"):
        m = edgebox.load(TEST_MODEL, chips=4, cache_type_k=t, cache_type_v=t)
        plans[t] = make_plan(m, budget_w=10.0, context=2048)
        m.box.close()
    f16, q8 = plans["f16"], plans["q8_0"]
    assert (q8.cache_type_k, q8.cache_type_v) == ("q8_0", "q8_0")
    assert q8.kv_mib_per_token_per_chip == pytest.approx([k * 34 / 64 for k in f16.kv_mib_per_token_per_chip])
    assert q8.max_batch_that_fits > f16.max_batch_that_fits
    assert "KV cache (q8_0/q8_0)" in format_plan(q8)


def test_cli_plan_and_run_take_the_cache_types():
    proc = subprocess.run(
        [sys.executable, "-m", "edgebox.cli", "plan", str(TEST_MODEL), "--cache-type-k", "q8_0", "--cache-type-v", "q4_0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "KV cache (q8_0/q4_0)" in proc.stdout
    run = [sys.executable, "-m", "edgebox.cli", "run", str(TEST_MODEL), "-p", "x", "-n", "2", "--chips", "1"]
    proc = subprocess.run(run + ["--cache-type-k", "q8_0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(run + ["--cache-type-v", "q5_1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cache_type_v must be one of f16, q8_0, q4_0" in proc.stderr


def test_daemon_config_cache_types():
    cfg = load_config(flags={"cache_type_k": "q8_0", "broker": "none"}, env={})
    assert (cfg.cache_type_k, cfg.cache_type_v) == ("q8_0", "f16")
    with pytest.raises(ConfigError, match="cache_type_v") as e:
        load_config(flags={"cache_type_v": "q4_1", "broker": "none"}, env={})
    assert "\n" not in str(e.value)
