"""Quantized KV caches (q8_0, q4_0): the quantizer against gguf-py's, the numba attention kernels
against the numpy reference over the same blocks, test-backend-ops style (random shapes, ragged
lengths, every K/V type pair).

The reference is ``ref.attention`` over the dequantized cache with the query rounded through
q8_0 when K is quantized (``kv_quant.round_query``, llama.cpp's vec_dot type); the kernels do the
same math, so only float re-association separates them: the tolerance is
test_kernels_attention's (ATOL 2e-5, RTOL 1e-4). Forgetting to round the query, or reading the
blocks wrongly, gives errors of order 1e-3 .. 1 (checked below for the query).
"""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from edgebox.kernels import attention as A
from edgebox.kernels import kv_quant as KQ
from edgebox.kernels import ref

ATOL, RTOL = 2e-5, 1e-4
RNG = np.random.default_rng(2468)
TYPES = ["f16", "q8_0", "q4_0"]
PAIRS = [(k, v) for k in TYPES for v in TYPES]


def close(got, want):
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def floats(*shape, scale=1.0) -> np.ndarray:
    # a spread of row magnitudes (the scales of the blocks differ) and some all-zero blocks
    x = RNG.standard_normal(shape) * scale * RNG.uniform(0.1, 1.2, shape[:-1] + (1,))
    return x.astype(np.float32)


def ref_attention(q, kc, vc, q_pos, k_pos, kv_of_head):
    """The spec: the dequantized cache, the query as a dot product with K's type sees it."""
    tk = KQ.name_of(kc)
    keys, values = KQ.dequantize(kc)[:, kv_of_head], KQ.dequantize(vc)[:, kv_of_head]
    return ref.attention(KQ.round_query(q, tk), keys, values, np.asarray(q_pos), np.asarray(k_pos))


# -- the quantizer ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,qtype", [("q8_0", T.Q8_0), ("q4_0", T.Q4_0)])
def test_quantize_is_ggmls_reference_bit_for_bit(name, qtype):
    x = floats(40, 3, 128, scale=4.0)
    x[0, 0, :32] = 0  # d = 0
    x[1, 0, 5] = -9.0  # q4_0's d takes the sign of the largest |x|
    x[2, 1, 64:96] = np.linspace(-1, 1, 32)  # ties of roundf
    want = gguf.quants.quantize(x.reshape(-1, 128), qtype)  # gguf-py: ggml-quants.c's reference
    got = KQ.quantize(x, name)
    assert got.shape == (40, 3, 4) and got.dtype == KQ.BLOCK_DTYPES[name]
    np.testing.assert_array_equal(got.view(np.uint8).reshape(want.shape), want)
    np.testing.assert_array_equal(KQ.dequantize(got).reshape(-1, 128), gguf.quants.dequantize(want, qtype))
    # the numba kernel's rule is the same, row by row
    row, out = np.empty(KQ.kv_row_bytes(name, 128), np.uint8), np.empty(128, np.float32)
    for r in x.reshape(-1, 128):
        KQ.quantize_row(r, row, KQ.type_code(name))
        np.testing.assert_array_equal(row, KQ.quantize(r, name).view(np.uint8))
        KQ.dequantize_row(row, KQ.type_code(name), out)
        np.testing.assert_array_equal(out, KQ.dequantize(KQ.quantize(r, name)))


@pytest.mark.parametrize("name", TYPES)
def test_store_writes_what_quantize_gives(name):
    """attention.store (a prompt's keys and values into the cache, in place) is bit for bit
    kv_quant.quantize, from a strided view of the projections as the attention block passes it,
    float16's subnormals, overflow and ties included; it touches no other slot."""
    qkv = floats(20, 3 * 2 * 128, scale=4.0)
    qkv[0, :8] = [1e-6, -3e-8, 7e4, -1e5, 2049.0, 2051.0, 0.0, -0.0]  # f16: subnormal, 0, inf, ties
    x = qkv[:, 256:512].reshape(20, 2, 128)  # [n, Hkv, hd], rows strided as the block's k
    cache = np.zeros((30, 2, *KQ.cache_row_shape(name, 128, "t")), KQ.cache_dtype(name))
    A.store(x, cache, 7)
    np.testing.assert_array_equal(cache[7:27].view(np.uint8), KQ.quantize(x, name).view(np.uint8))
    assert not cache[:7].view(np.uint8).any() and not cache[27:].view(np.uint8).any()
    with pytest.raises(ValueError, match="do not fit"):
        A.store(x, cache, 11)


def test_row_bytes_are_ggmls():
    assert [KQ.kv_row_bytes(t, 128) for t in TYPES] == [256, 136, 72]
    assert [KQ.cache_dtype(t).itemsize for t in TYPES] == [2, 34, 18]


def test_bad_type_and_head_size_are_one_line_errors():
    with pytest.raises(KQ.CacheTypeError, match=r"^cache_type_v must be one of f16, q8_0, q4_0 .*got 'q5_1'$"):
        KQ.cache_type("q5_1", "cache_type_v")
    with pytest.raises(ValueError, match="multiple of 32"):
        KQ.cache_row_shape("q8_0", 80, "cache_type_k")
    assert KQ.cache_type("Q8_0") == "q8_0" and KQ.cache_row_shape("f16", 80) == (80,)


# -- decode ------------------------------------------------------------------------------------

SHAPES = [(1, 1, 32), (4, 2, 64), (28, 4, 128), (7, 1, 64), (6, 3, 128)]


@pytest.mark.parametrize("tk,tv", PAIRS)
@pytest.mark.parametrize("H,Hkv,hd", SHAPES)
@pytest.mark.parametrize("S,n", [(1, 1), (19, 19), (300, 123)])
def test_decode(tk, tv, H, Hkv, hd, S, n):
    kc, vc = KQ.quantize(floats(S, Hkv, hd), tk), KQ.quantize(floats(S, Hkv, hd), tv)
    q = floats(1, H, hd, scale=2.0)
    m = np.arange(H) // (H // Hkv)
    got = A.attention_decode(q[0], kc, vc, n)
    close(got, ref_attention(q, kc[:n], vc[:n], [n - 1], np.arange(n), m)[0])
    if n >= 64:  # the parallel variant: the same math
        close(A.attention_decode(q[0], kc, vc, n, parallel=True), got)


def test_the_query_is_rounded_as_llama_cpp_rounds_it():
    """Without rounding the query through q8_0 the reference misses the kernel by far more than
    the tolerance: the test above would catch a kernel that skipped it."""
    kc, vc = KQ.quantize(floats(200, 2, 128), "q8_0"), KQ.quantize(floats(200, 2, 128), "f16")
    q = floats(1, 4, 128, scale=3.0)
    got = A.attention_decode(q[0], kc, vc, 200)
    m = np.arange(4) // 2
    unrounded = ref.attention(q, KQ.dequantize(kc)[:, m], KQ.dequantize(vc)[:, m], np.array([199]), np.arange(200))[0]
    assert np.abs(got - unrounded).max() > 20 * (ATOL + RTOL * np.abs(unrounded).max())


@pytest.mark.parametrize("tk,tv", PAIRS)
@pytest.mark.parametrize("parallel", [False, True])
def test_decode_append_ragged(tk, tv, parallel):
    """Each sequence its own cache (ragged sizes); the kernel quantizes the new key and value
    into their slot exactly as kv_quant.quantize does, and nothing else moves."""
    H, Hkv, hd, n_layer, sizes, starts = 10, 2, 64, 3, [70, 5, 300, 33], np.array([69, 0, 151, 20])
    kv_of_head = [0] * 7 + [1] * 3  # a chip straddling KV heads
    kc = [KQ.quantize(floats(n_layer, n, Hkv, hd), tk) for n in sizes]
    vc = [KQ.quantize(floats(n_layer, n, Hkv, hd), tv) for n in sizes]
    before = [c.copy() for c in kc + vc]
    q = floats(4, H, hd, scale=2.0)
    k_new, v_new = floats(4, Hkv, hd, scale=3.0), floats(4, Hkv, hd)
    got = A.attention_decode_append(q, k_new, v_new, A.kv_lists(kc, vc), 1, starts, kv_of_head=kv_of_head, parallel=parallel)
    m = np.asarray(kv_of_head)
    for b, s in enumerate(starts):
        np.testing.assert_array_equal(kc[b][1, s], KQ.quantize(k_new[b], tk))
        np.testing.assert_array_equal(vc[b][1, s], KQ.quantize(v_new[b], tv))
        for new, old in ((kc[b], before[b]), (vc[b], before[4 + b])):
            changed = np.argwhere((new.view(np.uint8) != old.view(np.uint8)).reshape(n_layer, len(new[0]), -1).any(axis=2))
            assert set(map(tuple, changed)) <= {(1, s)}
        close(got[b], ref_attention(q[b : b + 1], kc[b][1, : s + 1], vc[b][1, : s + 1], [s], np.arange(s + 1), m)[0])
        np.testing.assert_array_equal(got[b], A.attention_decode(q[b], kc[b][1], vc[b][1], s + 1, kv_of_head=kv_of_head))


def test_kv_lists_refuses_mixed_types():
    a = [np.zeros((1, 4, 1, 32), np.float16)]
    b = [KQ.quantize(np.zeros((1, 4, 1, 32), np.float32), "q8_0")]
    with pytest.raises(ValueError, match="same K and V types"):
        A.kv_lists(a + b, a + a)
    with pytest.raises(ValueError, match="float16, q8_0 or q4_0"):
        A.kv_lists([np.zeros((1, 4, 1, 32), np.float32)], a)


# -- prefill -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tk,tv", PAIRS)
@pytest.mark.parametrize("H,Hkv,hd", [(4, 2, 64), (28, 4, 128), (3, 3, 32)])
@pytest.mark.parametrize("T,start", [(1, 0), (37, 0), (70, 130)])
def test_prefill(tk, tv, H, Hkv, hd, T, start):
    S = start + T
    kc, vc = KQ.quantize(floats(S, Hkv, hd), tk), KQ.quantize(floats(S, Hkv, hd), tv)
    q = floats(T, H, hd, scale=2.0)
    m = np.arange(H) // (H // Hkv)
    want = ref_attention(q, kc, vc, np.arange(start, S), np.arange(S), m)
    close(A.attention_prefill(q, kc, vc, start).reshape(want.shape), want)
    close(A.attention_prefill(q, kc, vc, start, parallel=True).reshape(want.shape), want)


@pytest.mark.parametrize("tk,tv", [("q8_0", "q8_0"), ("q4_0", "f16")])
def test_prefill_general_positions_and_one_token_equals_decode(tk, tv):
    S, H, Hkv, hd = 90, 4, 2, 64
    kc, vc = KQ.quantize(floats(S, Hkv, hd), tk), KQ.quantize(floats(S, Hkv, hd), tv)
    k_pos = RNG.permutation(S).astype(np.int64)  # a shifted cache: slots out of position order
    q_pos = np.array([40, 89, 3])
    q = floats(3, H, hd, scale=2.0)
    got = A.attention_prefill(q, kc, vc, 0, q_pos=q_pos, k_pos=k_pos)
    close(got, ref_attention(q, kc, vc, q_pos, k_pos, np.arange(H) // 2))
    one = A.attention_prefill(q[:1], kc, vc, S - 1)
    np.testing.assert_allclose(one[0], A.attention_decode(q[0], kc, vc, S), rtol=1e-5, atol=1e-6)
