"""Plain-numpy reference of every op: the spec the fast kernels are tested against.

Conventions
-----------
* Arrays are numpy, row-major. Shapes in comments are numpy shapes, outermost first.
* GGUF (like ggml) lists dimensions fastest-first: a matrix stored with ``ne=[n_in, n_out]`` is,
  in numpy terms, ``[n_out, n_in]``: one row per output feature, so a linear layer is
  ``y = x @ W.T``. A quantized row is a run of blocks; the file holds the tensor as
  uint8 ``[n_out, row_bytes]`` with ``row_bytes = n_in / block_size * type_size``.
* Block sizes come only from :mod:`edgebox.quant_types` (gguf's ``GGML_QUANT_SIZES``).
* Activations are float32 ``[T, ...]`` with T tokens; positions are absolute positions in the
  sequence (int), which is what makes rope and the causal mask independent of batching.
* Dequantization equals ``gguf.quants.dequantize`` (and ggml's ``dequantize_row_*``) bit for bit.
  That is robust rather than lucky: an f16 scale times small integers is exact in float32, so
  each value is a single rounding (at most one, of ``d*sc*q - dmin*m``) whatever the order. What
  must match exactly is the bit layout, and the sign of zero (``d < 0`` times ``q = 0`` is -0.0).
"""

from __future__ import annotations

import math

import numpy as np

from edgebox.gguf import quant_types as qt
from edgebox.gguf.quant_types import QType

# Most float32 a matmul dequantizes at once: a 7B-shaped weight ([11008, 4096] Q4_K is 25 MB of
# bytes but 180 MB of floats) is walked in row chunks so only one chunk is ever float.
MATMUL_CHUNK_BYTES = 16 * 2**20


# ---------------------------------------------------------------------------------------------
# Dequantization: one function per block layout.
# Each takes uint8 [n_blocks, type_size] and returns float32 [n_blocks, block_size].

def _fields(blocks: np.ndarray, qtype: QType, *sizes: int) -> list[np.ndarray]:
    """Split blocks [n, type_size] into byte fields [n, size_i], in file order.

    The sizes are derived from the block size in each layout below; checking that they add up to
    gguf's type_size keeps the layouts written here tied to the one table of the file format.
    """
    if sum(sizes) != qt.type_size(qtype):
        raise AssertionError(f"{qtype.name} layout {sizes} does not add up to {qt.type_size(qtype)} bytes")
    return np.split(blocks, np.cumsum(sizes)[:-1], axis=1)


def _f16(field: np.ndarray) -> np.ndarray:
    """uint8 [n, 2] little-endian half floats -> float32 [n, 1] (exact: f16 embeds in f32)."""
    return field.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, m] -> uint8 [n, 2m]: all low nibbles first, then all high nibbles.

    That is how the 32-value blocks pack values: value j in the low nibble of byte j, value
    j + 16 in the high nibble of byte j.
    """
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(qh: np.ndarray) -> np.ndarray:
    """uint8 [n, m] -> uint8 [n, 8m]: bit i of the little-endian bit string, i.e. bit i % 8 of byte i // 8."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _deq_f32(blocks: np.ndarray) -> np.ndarray:
    # 4 bytes: one float32
    return blocks.view(np.float32)


def _deq_f16(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes: one float16
    return _f16(blocks)


def _deq_bf16(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes: the upper half of a float32 (its low 16 mantissa bits are zero)
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _deq_q4_0(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 16 bytes qs (nibbles): x = d * (q - 8)
    qk = qt.block_size(QType.Q4_0)
    d, qs = _fields(blocks, QType.Q4_0, 2, qk // 2)
    q = _nibbles(qs).astype(np.int8) - np.int8(8)                           # [n, 32]
    return _f16(d) * q.astype(np.float32)


def _deq_q4_1(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 2 bytes m (f16), 16 bytes qs (nibbles): x = d * q + m
    qk = qt.block_size(QType.Q4_1)
    d, m, qs = _fields(blocks, QType.Q4_1, 2, 2, qk // 2)
    q = _nibbles(qs).astype(np.float32)                                     # [n, 32]
    return _f16(d) * q + _f16(m)


def _deq_q5_0(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 4 bytes qh (bit j = 5th bit of value j), 16 bytes qs (nibbles):
    # x = d * (q - 16)
    qk = qt.block_size(QType.Q5_0)
    d, qh, qs = _fields(blocks, QType.Q5_0, 2, qk // 8, qk // 2)
    q = (_nibbles(qs) | (_bits(qh) << 4)).astype(np.int8) - np.int8(16)     # [n, 32]
    return _f16(d) * q.astype(np.float32)


def _deq_q5_1(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 2 bytes m (f16), 4 bytes qh (5th bits), 16 bytes qs (nibbles):
    # x = d * q + m
    qk = qt.block_size(QType.Q5_1)
    d, m, qh, qs = _fields(blocks, QType.Q5_1, 2, 2, qk // 8, qk // 2)
    q = (_nibbles(qs) | (_bits(qh) << 4)).astype(np.float32)                # [n, 32]
    return _f16(d) * q + _f16(m)


def _deq_q8_0(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 32 bytes qs (int8): x = d * q
    qk = qt.block_size(QType.Q8_0)
    d, qs = _fields(blocks, QType.Q8_0, 2, qk)
    return _f16(d) * qs.view(np.int8).astype(np.float32)


# K-quants: a 256-value super-block of 16 sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 8 of 32
# (Q4_K, Q5_K). 2-bit fields are spread over 32-byte groups: in each half of 128 values,
# value 32*j + l sits in bits 2j..2j+1 of byte l of that half's 32 bytes.

def _crumbs(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 32h] -> uint8 [n, 128h]: the 2-bit fields of each 32-byte group, as above."""
    n = qs.shape[0]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, -1, 1, 32) >> shifts) & 3).reshape(n, -1)


def _deq_q2_k(blocks: np.ndarray) -> np.ndarray:
    # 16 bytes scales (low nibble: scale, high nibble: min, one per 16 values),
    # 64 bytes qs (2-bit), 2 bytes d (f16), 2 bytes dmin (f16): x = d*sc * q - dmin*m
    qk = qt.block_size(QType.Q2_K)
    n = blocks.shape[0]
    scales, qs, d, dmin = _fields(blocks, QType.Q2_K, qk // 16, qk // 4, 2, 2)
    dl = _f16(d) * (scales & 0x0F).astype(np.float32)                       # [n, 16]
    ml = _f16(dmin) * (scales >> 4).astype(np.float32)                      # [n, 16]
    q = _crumbs(qs).reshape(n, qk // 16, 16).astype(np.float32)             # [n, 16, 16]
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, qk)


def _deq_q3_k(blocks: np.ndarray) -> np.ndarray:
    # 32 bytes hmask (3rd bit, stored inverted: set means +0, clear means -4),
    # 64 bytes qs (low 2 bits), 12 bytes scales (16 x 6-bit, offset by 32), 2 bytes d (f16):
    # x = d*(sc - 32) * (q - 4*!h)
    qk = qt.block_size(QType.Q3_K)
    n = blocks.shape[0]
    hmask, qs, scales, d = _fields(blocks, QType.Q3_K, qk // 8, qk // 4, 12, 2)
    # 6-bit scale i: low 4 bits are nibble (i // 8) of byte i % 8, high 2 bits are bits
    # 2*(i // 4).. of byte 8 + i % 4.
    low = _nibbles(scales[:, :8])                                           # [n, 16]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    high = ((scales[:, None, 8:] >> shifts) & 3).reshape(n, 16)             # [n, 16]
    sc = (low | (high << 4)).astype(np.int8) - np.int8(32)                  # [n, 16]
    dl = _f16(d) * sc.astype(np.float32)                                    # [n, 16]
    # value 32*b + l takes its 3rd bit from bit b of hmask[l] (b counts over both halves).
    h = (hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = _crumbs(qs).astype(np.int8) - ((h.reshape(n, qk) ^ 1) << 2).astype(np.int8)
    return (dl[:, :, None] * q.reshape(n, qk // 16, 16).astype(np.float32)).reshape(n, qk)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 6-bit scales and 8 6-bit mins (uint8 [n, 8] each), for Q4_K and Q5_K.

    Bytes 0-3: scales 0-3 (low 6 bits); bytes 4-7: mins 0-3 (low 6 bits); bytes 8-11: low
    nibble = low 4 bits of scale 4+i, high nibble = low 4 bits of min 4+i; the top 2 bits of
    bytes 0-3 / 4-7 are the top bits of scales 4-7 / mins 4-7.
    """
    s, m, lo = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([s & 63, (lo & 0x0F) | ((s >> 6) << 4)], axis=1)
    mn = np.concatenate([m & 63, (lo >> 4) | ((m >> 6) << 4)], axis=1)
    return sc, mn


def _deq_q4_k(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 2 bytes dmin (f16), 12 bytes scales+mins (8 x 6-bit each),
    # 128 bytes qs: each 32-byte group holds sub-block 2g in its low nibbles, 2g+1 in its high.
    # x = d*sc * q - dmin*m
    qk = qt.block_size(QType.Q4_K)
    n = blocks.shape[0]
    d, dmin, scales, qs = _fields(blocks, QType.Q4_K, 2, 2, 12, qk // 2)
    sc, mn = _scale_min_k4(scales)
    dl = _f16(d) * sc.astype(np.float32)                                    # [n, 8]
    ml = _f16(dmin) * mn.astype(np.float32)                                 # [n, 8]
    q = _nibbles(qs.reshape(n * 4, 32)).reshape(n, 8, 32).astype(np.float32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, qk)


def _deq_q5_k(blocks: np.ndarray) -> np.ndarray:
    # 2 bytes d (f16), 2 bytes dmin (f16), 12 bytes scales+mins, 32 bytes qh (5th bit of value
    # 32*s + l is bit s of qh[l]), 128 bytes qs (nibbles as in Q4_K): x = d*sc * q - dmin*m
    qk = qt.block_size(QType.Q5_K)
    n = blocks.shape[0]
    d, dmin, scales, qh, qs = _fields(blocks, QType.Q5_K, 2, 2, 12, qk // 8, qk // 2)
    sc, mn = _scale_min_k4(scales)
    dl = _f16(d) * sc.astype(np.float32)                                    # [n, 8]
    ml = _f16(dmin) * mn.astype(np.float32)                                 # [n, 8]
    low = _nibbles(qs.reshape(n * 4, 32)).reshape(n, 8, 32)
    high = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = (low | (high << 4)).astype(np.float32)                              # [n, 8, 32]
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, qk)


def _deq_q6_k(blocks: np.ndarray) -> np.ndarray:
    # 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 bytes scales (int8, one per
    # 16 values), 2 bytes d (f16): x = d*sc * (q - 32).
    # Per half of 128 values (64 ql bytes, 32 qh bytes), value 32*j + l has its low nibble in
    # nibble j // 2 of ql[32*(j % 2) + l] and its high bits in bits 2j..2j+1 of qh[l].
    qk = qt.block_size(QType.Q6_K)
    n = blocks.shape[0]
    ql, qh, scales, d = _fields(blocks, QType.Q6_K, qk // 2, qk // 4, qk // 16, 2)
    low = _nibbles(ql.reshape(n * 2, 64)).reshape(n, qk)
    q = (low | (_crumbs(qh) << 4)).astype(np.int8) - np.int8(32)            # [n, 256]
    dl = _f16(d) * scales.view(np.int8).astype(np.float32)                  # [n, 16]
    return (dl[:, :, None] * q.reshape(n, qk // 16, 16).astype(np.float32)).reshape(n, qk)


_DEQUANT = {
    QType.F32: _deq_f32, QType.F16: _deq_f16, QType.BF16: _deq_bf16,
    QType.Q4_0: _deq_q4_0, QType.Q4_1: _deq_q4_1, QType.Q5_0: _deq_q5_0,
    QType.Q5_1: _deq_q5_1, QType.Q8_0: _deq_q8_0,
    QType.Q2_K: _deq_q2_k, QType.Q3_K: _deq_q3_k, QType.Q4_K: _deq_q4_k,
    QType.Q5_K: _deq_q5_k, QType.Q6_K: _deq_q6_k,
}


def _row_bytes(raw: np.ndarray, qtype: QType) -> np.ndarray:
    """raw rows -> uint8 [..., row_bytes].

    Typed float arrays are accepted for float types (GGUFReader hands out F32/F16 tensors as
    float32/float16 arrays) and are viewed, not copied, as their bytes.
    """
    raw = np.asarray(raw)
    if raw.dtype == np.uint8:
        return raw
    if qt.is_quantized(qtype) or raw.dtype.itemsize != qt.type_size(qtype):
        raise ValueError(f"{qtype.name} rows must be uint8 bytes, got a {raw.dtype} array")
    return raw.view(np.uint8)


def dequantize(raw: np.ndarray, qtype: QType) -> np.ndarray:
    """Rows of a GGUF tensor -> float32 values.

    raw:     uint8 [..., row_bytes] (or, for a float type, the typed array [..., n_values])
    returns: float32 [..., n_values], n_values = row_bytes / type_size * block_size
             (for F32, a view of raw's memory: no copy)
    """
    qtype = QType(qtype)
    if qtype not in _DEQUANT:
        raise ValueError(f"unsupported tensor type {qtype.name}")
    raw = _row_bytes(raw, qtype)
    bs, ts = qt.block_size(qtype), qt.type_size(qtype)
    if raw.ndim == 0 or raw.shape[-1] % ts:
        raise ValueError(f"{qtype.name} rows must be a whole number of {ts}-byte blocks, got shape {raw.shape}")
    blocks = raw.reshape(-1, ts)                                            # [n_blocks, type_size]
    values = _DEQUANT[qtype](blocks)                                        # [n_blocks, block_size]
    return values.reshape(*raw.shape[:-1], raw.shape[-1] // ts * bs)


# ---------------------------------------------------------------------------------------------
# Ops

def matmul(x: np.ndarray, w_raw: np.ndarray, qtype: QType) -> np.ndarray:
    """x @ dequantize(w).T, dequantizing at most MATMUL_CHUNK_BYTES of weight rows at a time.

    x:       float32 [T, n_in]
    w_raw:   uint8 [n_out, row_bytes] (or float [n_out, n_in] for a float type)
    returns: float32 [T, n_out]
    """
    qtype = QType(qtype)
    x = np.asarray(x, dtype=np.float32)
    w = _row_bytes(w_raw, qtype)                                            # [n_out, row_bytes]
    n_out = w.shape[0]
    n_in = w.shape[1] // qt.type_size(qtype) * qt.block_size(qtype)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"matmul: x has shape {x.shape}, the weight has {n_in} inputs")
    out = np.empty((x.shape[0], n_out), dtype=np.float32)                   # [T, n_out]
    rows = max(1, MATMUL_CHUNK_BYTES // (4 * n_in))
    for r0 in range(0, n_out, rows):
        w_chunk = dequantize(w[r0:r0 + rows], qtype)                        # [rows, n_in]
        out[:, r0:r0 + rows] = x @ w_chunk.T
    return out


def get_rows(w_raw: np.ndarray, qtype: QType, ids: np.ndarray) -> np.ndarray:
    """Embedding lookup: dequantize only the rows asked for.

    w_raw:   uint8 [n_rows, row_bytes] (or float [n_rows, n_values] for a float type)
    ids:     int [n]
    returns: float32 [n, n_values]
    """
    qtype = QType(qtype)
    w = _row_bytes(w_raw, qtype)                                            # [n_rows, row_bytes]
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)                       # [n]
    # numpy would silently wrap a negative id to the end of the vocabulary.
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise IndexError(f"get_rows: ids must be in [0, {w.shape[0]}), got {ids.min()}..{ids.max()}")
    return dequantize(w[ids], qtype)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, per row.

    x:       float32 [T, d]
    weight:  float32 [d]
    returns: float32 [T, d]
    """
    x = np.asarray(x, dtype=np.float32)
    # ggml squares in float32 and sums in double; then mean, eps, sqrt and the scale in float32.
    mean = (np.sum(x * x, axis=-1, keepdims=True, dtype=np.float64) / x.shape[-1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))               # [T, 1]
    return (x * scale) * np.asarray(weight, dtype=np.float32)


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, freq_base: float, freq_scale: float,
         neox: bool) -> np.ndarray:
    """Rotary position embedding of the first n_rot dims of every head; the rest pass through.

    Pair i (0 <= i < n_rot/2) turns by theta_i = pos * freq_scale * freq_base^(-2i/n_rot).
    Normal (GGML mode 0, llama): pair i is (x[2i], x[2i+1]).
    NeoX   (GGML mode 2, qwen2): pair i is (x[i], x[i + n_rot/2]).
    Linear rope scaling by a factor f is freq_scale = 1/f.

    x:         float32 [T, n_heads, head_dim]
    positions: int [T]
    returns:   float32 [T, n_heads, head_dim]
    """
    x = np.asarray(x, dtype=np.float32)
    head_dim = x.shape[-1]
    if n_rot % 2 or not 0 < n_rot <= head_dim:
        raise ValueError(f"rope: n_rot={n_rot} must be even and in (0, {head_dim}]")
    half = n_rot // 2
    # The angle is computed exactly (float64) and rounded once; ggml builds it by a running
    # float32 product, which drifts by a few ulps of the angle across the dims.
    inv_freq = float(freq_base) ** (-2.0 * np.arange(half) / n_rot)         # [half]
    theta = np.asarray(positions, dtype=np.float64)[:, None] * float(freq_scale) * inv_freq
    cos = np.cos(theta).astype(np.float32)[:, None, :]                      # [T, 1, half]
    sin = np.sin(theta).astype(np.float32)[:, None, :]                      # [T, 1, half]
    first, second = (slice(0, half), slice(half, n_rot)) if neox else (slice(0, n_rot, 2), slice(1, n_rot, 2))
    x0, x1 = x[..., first], x[..., second]                                  # [T, n_heads, half]
    out = x.copy()
    out[..., first] = x0 * cos - x1 * sin
    out[..., second] = x0 * sin + x1 * cos
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x) / sum(exp(x)) along axis, float32; -inf entries get weight 0.

    x:       float32 [...]
    returns: float32 [...] (same shape)
    """
    x = np.asarray(x, dtype=np.float32)
    # Subtracting the max keeps exp() from overflowing and leaves the result unchanged.
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
              k_pos: np.ndarray) -> np.ndarray:
    """Causal scaled dot-product attention with grouped-query heads.

    Key j is visible to query i iff k_pos[j] <= q_pos[i]; query head h reads KV head
    h // (n_head // n_kv_head).

    q:       float32 [T, n_head, hd]
    k, v:    float32 [S, n_kv_head, hd]
    q_pos:   int [T]
    k_pos:   int [S]
    returns: float32 [T, n_head * hd]
    """
    q, k, v = (np.asarray(a, dtype=np.float32) for a in (q, k, v))
    T, n_head, hd = q.shape
    n_kv_head = k.shape[1]
    if n_head % n_kv_head:
        raise ValueError(f"attention: {n_head} query heads do not group over {n_kv_head} KV heads")
    group = n_head // n_kv_head
    visible = np.asarray(k_pos)[None, :] <= np.asarray(q_pos)[:, None]     # bool [T, S]
    # A query that sees no key would softmax over nothing (NaN): a caller bug, not a value.
    if not visible.any(axis=1).all():
        raise ValueError("attention: a query has no visible key (check q_pos / k_pos)")
    scale = np.float32(1.0 / math.sqrt(hd))
    out = np.empty((T, n_head, hd), dtype=np.float32)
    for h in range(n_head):
        kv = h // group
        scores = (q[:, h, :] @ k[:, kv, :].T) * scale                       # [T, S]
        scores = np.where(visible, scores, np.float32(-np.inf))
        out[:, h, :] = softmax(scores) @ v[:, kv, :]                        # [T, hd]
    return out.reshape(T, n_head * hd)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) = x / (1 + exp(-x)).

    x:       float32 [...]
    returns: float32 [...]
    """
    x = np.asarray(x, dtype=np.float32)
    # For x < -88, exp(-x) overflows to inf and x / inf = -0, the right limit.
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up: the gated feed-forward activation.

    gate, up: float32 [T, n_ff]
    returns:  float32 [T, n_ff]
    """
    return silu(gate) * np.asarray(up, dtype=np.float32)
