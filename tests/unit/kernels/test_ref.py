"""The numpy reference against gguf-py's dequantizer and against independently written formulas."""

import math

import gguf.quants
import numpy as np
import pytest

from edgebox.gguf import quant_types as qt
from edgebox.gguf.quant_types import QType
from edgebox.kernels import ref

# Types gguf-py 0.19 can quantize (it only dequantizes K-quants).
GGUF_QUANTIZES = {QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0}

# Byte offsets of the f16 scale fields inside one block, from ggml's block structs; written out
# here, independently of ref.py, so random blocks can be given finite scales.
F16_FIELDS = {
    QType.Q4_0: [0],
    QType.Q4_1: [0, 2],
    QType.Q5_0: [0],
    QType.Q5_1: [0, 2],
    QType.Q8_0: [0],
    QType.Q2_K: [80, 82],
    QType.Q3_K: [108],
    QType.Q4_K: [0, 2],
    QType.Q5_K: [0, 2],
    QType.Q6_K: [208],
}


def random_blocks(rng, qtype, n_rows, blocks_per_row):
    """Random bytes uint8 [n_rows, row_bytes] whose f16 fields are finite, of both signs, with
    zeros and subnormals among them (every quant bit pattern appears, unlike quantized data)."""
    ts = qt.type_size(qtype)
    raw = rng.integers(0, 256, size=(n_rows * blocks_per_row, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.standard_normal(len(raw)) * 10.0 ** rng.uniform(-7, 1, len(raw))
        scale[::7] = 0.0
        raw[:, off : off + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(n_rows, blocks_per_row * ts)


def quantized_rows(rng, qtype, n_rows, blocks_per_row):
    """Random floats quantized by gguf-py: uint8 [n_rows, row_bytes]."""
    n = blocks_per_row * qt.block_size(qtype)
    x = (rng.standard_normal((n_rows, n)) * rng.uniform(0.01, 3.0, (n_rows, 1))).astype(np.float32)
    raw = np.asarray(gguf.quants.quantize(x, qtype))
    return raw.view(np.uint8).reshape(n_rows, -1)


def assert_bits_equal(a, b):
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.shape == b.shape
    # Compare bit patterns: catches -0.0 vs 0.0 and differing NaNs that == would hide.
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


# ---------------------------------------------------------------------------------------------
# dequantize


@pytest.mark.parametrize("qtype", qt.SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows", [1, 3, 17])
def test_dequantize_matches_gguf_bit_for_bit(qtype, n_rows):
    rng = np.random.default_rng([int(qtype), n_rows])
    blocks_per_row = 3 if qt.block_size(qtype) > 1 else 96
    sources = []
    if qtype in F16_FIELDS:
        sources.append(random_blocks(rng, qtype, n_rows, blocks_per_row))
    if qtype in GGUF_QUANTIZES:
        sources.append(quantized_rows(rng, qtype, n_rows, blocks_per_row))
    assert sources, f"no test data for {qtype.name}"
    for raw in sources:
        ours = ref.dequantize(raw, qtype)
        assert ours.shape == (n_rows, blocks_per_row * qt.block_size(qtype))
        assert_bits_equal(ours, np.asarray(gguf.quants.dequantize(raw, qtype)))


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q6_K, QType.F16], ids=lambda t: t.name)
def test_dequantize_keeps_leading_dims(qtype):
    rng = np.random.default_rng(1)
    raw = (random_blocks(rng, qtype, 6, 2) if qtype in F16_FIELDS else quantized_rows(rng, qtype, 6, 64)).reshape(2, 3, -1)
    flat = ref.dequantize(raw.reshape(6, -1), qtype)
    assert_bits_equal(ref.dequantize(raw, qtype), flat.reshape(2, 3, -1))


def test_q4_0_block_by_hand():
    # d = 0.5; byte j holds value j (low nibble) and value j + 16 (high nibble); x = d * (q - 8).
    lo = np.arange(16, dtype=np.uint8)
    hi = (15 - np.arange(16)).astype(np.uint8)
    block = np.concatenate([np.array([0.5], np.float16).view(np.uint8), lo | (hi << 4)])
    expected = 0.5 * (np.concatenate([lo, hi]).astype(np.float32) - 8)
    np.testing.assert_array_equal(ref.dequantize(block, QType.Q4_0), expected)


def test_q8_0_block_by_hand():
    q = np.arange(-16, 16, dtype=np.int8)
    block = np.concatenate([np.array([-0.25], np.float16).view(np.uint8), q.view(np.uint8)])
    np.testing.assert_array_equal(ref.dequantize(block[None], QType.Q8_0), [-0.25 * q.astype(np.float32)])


def test_dequantize_accepts_typed_float_rows():
    w = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_array_equal(ref.dequantize(w, QType.F32), w)
    np.testing.assert_array_equal(ref.dequantize(w.astype(np.float16), QType.F16), w.astype(np.float16))
    with pytest.raises(ValueError):
        ref.dequantize(w, QType.F16)  # 4-byte values are not F16 rows


def test_unsupported_type_is_named():
    with pytest.raises(ValueError, match="IQ2_XXS"):
        ref.dequantize(np.zeros((1, qt.type_size(QType.IQ2_XXS)), np.uint8), QType.IQ2_XXS)


def test_partial_block_is_refused():
    with pytest.raises(ValueError, match="Q4_K"):
        ref.dequantize(np.zeros((2, qt.type_size(QType.Q4_K) + 1), np.uint8), QType.Q4_K)


# ---------------------------------------------------------------------------------------------
# matmul and get_rows


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q5_1, QType.Q8_0, QType.Q3_K, QType.Q6_K, QType.BF16], ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 5])
def test_matmul_equals_dense_product(qtype, T):
    rng = np.random.default_rng([int(qtype), T])
    w_raw = random_blocks(rng, qtype, 7, 2) if qtype in F16_FIELDS else quantized_rows(rng, qtype, 7, 512)
    w = gguf.quants.dequantize(w_raw, qtype).astype(np.float64)  # [7, n_in]
    x = rng.standard_normal((T, w.shape[1])).astype(np.float32)
    got = ref.matmul(x, w_raw, qtype)
    assert got.shape == (T, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-5 * np.abs(x).sum() * np.abs(w).max())


def test_matmul_float_weights():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((9, 16)).astype(np.float32)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_allclose(ref.matmul(x, w, QType.F32), x @ w.T, rtol=1e-6, atol=1e-6)


def test_matmul_chunks_bound_the_float_copy(monkeypatch):
    """A weight bigger than MATMUL_CHUNK_BYTES as floats is dequantized in row chunks, none over
    the limit, with an uneven last chunk, and the result is unchanged."""
    rng = np.random.default_rng(4)
    n_in, n_out = 4096, 1100  # 18 MB as float32 > 16 MB
    assert n_in * n_out * 4 > ref.MATMUL_CHUNK_BYTES
    w_raw = random_blocks(rng, QType.Q8_0, n_out, n_in // 32)
    x = rng.standard_normal((3, n_in)).astype(np.float32)

    chunk_rows = []
    real_dequantize = ref.dequantize

    def spy(raw, qtype):
        chunk_rows.append(raw.shape[0])
        return real_dequantize(raw, qtype)

    monkeypatch.setattr(ref, "dequantize", spy)
    got = ref.matmul(x, w_raw, QType.Q8_0)
    monkeypatch.undo()

    assert len(chunk_rows) > 1 and sum(chunk_rows) == n_out
    assert max(chunk_rows) * n_in * 4 <= ref.MATMUL_CHUNK_BYTES
    w = gguf.quants.dequantize(w_raw, QType.Q8_0)
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-4, atol=1e-4 * np.abs(x @ w.T).max())


def test_get_rows():
    rng = np.random.default_rng(5)
    w_raw = random_blocks(rng, QType.Q4_K, 10, 2)
    ids = np.array([7, 0, 7, 9])
    assert_bits_equal(ref.get_rows(w_raw, QType.Q4_K, ids), gguf.quants.dequantize(w_raw, QType.Q4_K)[ids])
    for bad in ([10], [-1]):
        with pytest.raises(IndexError):
            ref.get_rows(w_raw, QType.Q4_K, bad)


# ---------------------------------------------------------------------------------------------
# rms_norm, silu, swiglu, softmax


def test_rms_norm_formula():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((4, 96)) * [[0.01], [1.0], [30.0], [1e-4]]).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64**2).mean(axis=1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(ref.rms_norm(x, w, 1e-5), expected, rtol=2e-6, atol=1e-7)


def test_silu_swiglu_formula():
    x = np.linspace(-120, 30, 301, dtype=np.float32)
    expected = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64)))
    with np.errstate(all="raise"):
        got = ref.silu(x)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-30)
    up = np.cos(x)
    np.testing.assert_allclose(ref.swiglu(x, up), expected * up, rtol=2e-6, atol=1e-30)


def test_softmax_formula():
    x = np.array([[1000.0, 1001.0, 999.0], [0.0, -np.inf, 1.0]], dtype=np.float32)
    e0 = np.exp([-1.0, 0.0, -2.0])
    e1 = np.exp([-1.0, 0.0])
    expected = [e0 / e0.sum(), [e1[0] / e1.sum(), 0.0, e1[1] / e1.sum()]]
    np.testing.assert_allclose(ref.softmax(x), expected, rtol=1e-6)
    np.testing.assert_allclose(ref.softmax(x.T, axis=0), np.transpose(expected), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# rope


def rope_args(rng, T=5, n_heads=3, head_dim=16):
    x = rng.standard_normal((T, n_heads, head_dim)).astype(np.float32)
    pos = rng.integers(0, 5000, T)
    return x, pos


@pytest.mark.parametrize("neox", [False, True])
def test_rope_position_zero_is_identity(neox):
    x, _ = rope_args(np.random.default_rng(7))
    np.testing.assert_array_equal(ref.rope(x, np.zeros(5, int), 16, 10000.0, 1.0, neox), x)


@pytest.mark.parametrize("neox", [False, True])
def test_rope_preserves_pair_norms_and_passes_extra_dims(neox):
    x, pos = rope_args(np.random.default_rng(8))
    y = ref.rope(x, pos, 12, 10000.0, 1.0, neox)
    np.testing.assert_array_equal(y[..., 12:], x[..., 12:])
    pairs = np.stack([np.arange(6), np.arange(6) + 6]) if neox else np.stack([np.arange(0, 12, 2), np.arange(1, 12, 2)])

    def pair_norms(a):
        return np.hypot(a[..., pairs[0]], a[..., pairs[1]])

    np.testing.assert_allclose(pair_norms(y), pair_norms(x), rtol=1e-5)


def test_rope_angle_formula():
    # A unit vector on the first axis of pair i comes out at angle theta_i.
    n_rot, base, scale = 16, 10000.0, 0.25
    pos = np.array([0, 1, 7, 300])
    x = np.zeros((4, 8, n_rot), np.float32)
    for i in range(8):
        x[:, i, 2 * i] = 1.0  # head i carries pair i
    y = ref.rope(x, pos, n_rot, base, scale, neox=False)
    i = np.arange(8)
    got = np.arctan2(y[:, i, 2 * i + 1], y[:, i, 2 * i])
    expected = pos[:, None] * scale * base ** (-2.0 * i / n_rot)
    np.testing.assert_allclose(np.angle(np.exp(1j * (got - expected))), 0, atol=2e-6)


def test_rope_neox_is_normal_up_to_a_permutation():
    x, pos = rope_args(np.random.default_rng(9))
    n_rot = 12
    # Normal's pair (2i, 2i+1) sits at (i, i + n_rot/2) in neox's layout.
    perm = np.concatenate([np.arange(0, n_rot, 2), np.arange(1, n_rot, 2), np.arange(n_rot, 16)])
    normal = ref.rope(x, pos, n_rot, 10000.0, 1.0, neox=False)
    neox = ref.rope(x[..., perm], pos, n_rot, 10000.0, 1.0, neox=True)
    np.testing.assert_array_equal(neox, normal[..., perm])
    assert not np.allclose(ref.rope(x, pos, n_rot, 10000.0, 1.0, neox=True), normal)


def test_rope_freq_scale_halves_the_angle():
    x, pos = rope_args(np.random.default_rng(10))
    for neox in (False, True):
        np.testing.assert_allclose(
            ref.rope(x, 2 * pos, 16, 10000.0, 0.5, neox), ref.rope(x, pos, 16, 10000.0, 1.0, neox), rtol=1e-5, atol=1e-5
        )


# ---------------------------------------------------------------------------------------------
# attention


def attend_one(q, k, v):
    """One query head over S keys, float64: q [hd], k/v [S, hd] -> [hd]."""
    s = k.astype(np.float64) @ q / math.sqrt(len(q))
    p = np.exp(s - s.max())
    return (p / p.sum()) @ v


def test_attention_single_query_formula():
    rng = np.random.default_rng(11)
    S, n_head, hd = 9, 4, 8
    q = rng.standard_normal((1, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((S, n_head, hd)).astype(np.float32)
    v = rng.standard_normal((S, n_head, hd)).astype(np.float32)
    got = ref.attention(q, k, v, np.array([S - 1]), np.arange(S))
    expected = np.concatenate([attend_one(q[0, h], k[:, h], v[:, h]) for h in range(n_head)])
    assert got.shape == (1, n_head * hd)
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)


def test_attention_is_causal_by_position():
    rng = np.random.default_rng(12)
    n_head, hd = 2, 4
    k_pos = np.array([0, 1, 2, 5, 6, 7])  # a gap: positions, not indices, decide
    q_pos = np.array([2, 5, 7])
    q = rng.standard_normal((3, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((6, n_head, hd)).astype(np.float32)
    v = rng.standard_normal((6, n_head, hd)).astype(np.float32)
    got = ref.attention(q, k, v, q_pos, k_pos).reshape(3, n_head, hd)
    for t in range(3):
        seen = k_pos <= q_pos[t]
        for h in range(n_head):
            np.testing.assert_allclose(got[t, h], attend_one(q[t, h], k[seen, h], v[seen, h]), rtol=1e-5, atol=1e-6)
    # Changing the last (future for every query but one) key must not move earlier queries.
    k2, v2 = k.copy(), v.copy()
    k2[-1] += 10
    v2[-1] -= 10
    got2 = ref.attention(q, k2, v2, q_pos, k_pos).reshape(3, n_head, hd)
    np.testing.assert_array_equal(got2[:2], got[:2])
    assert not np.allclose(got2[2], got[2])


def test_attention_gqa_equals_repeated_kv_heads():
    rng = np.random.default_rng(13)
    T, S, n_head, n_kv, hd = 3, 7, 6, 2, 8
    q = rng.standard_normal((T, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((S, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((S, n_kv, hd)).astype(np.float32)
    q_pos, k_pos = np.arange(4, 7), np.arange(S)
    got = ref.attention(q, k, v, q_pos, k_pos)
    # Query heads 0-2 share KV head 0, heads 3-5 share KV head 1.
    full = ref.attention(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1), q_pos, k_pos)
    np.testing.assert_allclose(got, full, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.reshape(T, n_head, hd)[0, 4], attend_one(q[0, 4], k[:5, 1], v[:5, 1]), rtol=1e-5, atol=1e-6)


def test_attention_refuses_a_query_with_no_key():
    z = np.zeros((1, 1, 4), np.float32)
    with pytest.raises(ValueError):
        ref.attention(z, z, z, np.array([0]), np.array([1]))
