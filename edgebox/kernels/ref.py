"""Plain-numpy reference of every op: the spec the fast kernels are tested against.

Conventions
-----------
* Arrays are numpy, row-major. Shapes in comments are numpy shapes, outermost first.
* GGUF (like ggml) lists dimensions fastest-first: a matrix stored with ``ne=[n_in, n_out]`` is,
  in numpy terms, ``[n_out, n_in]``: one row per output feature, so a linear layer is
  ``y = x @ W.T``. A quantized row is a run of blocks; the file holds the tensor as
  uint8 ``[n_out, row_bytes]`` with ``row_bytes = n_in / block_size * type_size``.
* Block sizes come only from :mod:`edgebox.gguf.quant_types` (gguf's ``GGML_QUANT_SIZES``).
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
from edgebox.kernels.quants import registry

# Most float32 a matmul dequantizes at once: a 7B-shaped weight ([11008, 4096] Q4_K is 25 MB of
# bytes but 180 MB of floats) is walked in row chunks so only one chunk is ever float.
MATMUL_CHUNK_BYTES = 16 * 2**20


# ---------------------------------------------------------------------------------------------
# Dequantization: each type's own function (``kernels/quants/<type>.py``), looked up in the registry.


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
    if qtype not in registry.TYPES:
        raise ValueError(f"unsupported tensor type {qtype.name}")
    raw = _row_bytes(raw, qtype)
    bs, ts = qt.block_size(qtype), qt.type_size(qtype)
    if raw.ndim == 0 or raw.shape[-1] % ts:
        raise ValueError(f"{qtype.name} rows must be a whole number of {ts}-byte blocks, got shape {raw.shape}")
    blocks = raw.reshape(-1, ts)  # [n_blocks, type_size]
    values = registry.TYPES[qtype].dequantize(blocks)  # [n_blocks, block_size]
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
    w = _row_bytes(w_raw, qtype)  # [n_out, row_bytes]
    n_out = w.shape[0]
    n_in = w.shape[1] // qt.type_size(qtype) * qt.block_size(qtype)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"matmul: x has shape {x.shape}, the weight has {n_in} inputs")
    out = np.empty((x.shape[0], n_out), dtype=np.float32)  # [T, n_out]
    rows = max(1, MATMUL_CHUNK_BYTES // (4 * n_in))
    for r0 in range(0, n_out, rows):
        w_chunk = dequantize(w[r0 : r0 + rows], qtype)  # [rows, n_in]
        out[:, r0 : r0 + rows] = x @ w_chunk.T
    return out


def get_rows(w_raw: np.ndarray, qtype: QType, ids: np.ndarray) -> np.ndarray:
    """Embedding lookup: dequantize only the rows asked for.

    w_raw:   uint8 [n_rows, row_bytes] (or float [n_rows, n_values] for a float type)
    ids:     int [n]
    returns: float32 [n, n_values]
    """
    qtype = QType(qtype)
    w = _row_bytes(w_raw, qtype)  # [n_rows, row_bytes]
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # [n]
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
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))  # [T, 1]
    return (x * scale) * np.asarray(weight, dtype=np.float32)


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, freq_base: float, freq_scale: float, neox: bool) -> np.ndarray:
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
    inv_freq = float(freq_base) ** (-2.0 * np.arange(half) / n_rot)  # [half]
    theta = np.asarray(positions, dtype=np.float64)[:, None] * float(freq_scale) * inv_freq
    cos = np.cos(theta).astype(np.float32)[:, None, :]  # [T, 1, half]
    sin = np.sin(theta).astype(np.float32)[:, None, :]  # [T, 1, half]
    first, second = (slice(0, half), slice(half, n_rot)) if neox else (slice(0, n_rot, 2), slice(1, n_rot, 2))
    x0, x1 = x[..., first], x[..., second]  # [T, n_heads, half]
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


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
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
    visible = np.asarray(k_pos)[None, :] <= np.asarray(q_pos)[:, None]  # bool [T, S]
    # A query that sees no key would softmax over nothing (NaN): a caller bug, not a value.
    if not visible.any(axis=1).all():
        raise ValueError("attention: a query has no visible key (check q_pos / k_pos)")
    scale = np.float32(1.0 / math.sqrt(hd))
    out = np.empty((T, n_head, hd), dtype=np.float32)
    for h in range(n_head):
        kv = h // group
        scores = (q[:, h, :] @ k[:, kv, :].T) * scale  # [T, S]
        scores = np.where(visible, scores, np.float32(-np.inf))
        out[:, h, :] = softmax(scores) @ v[:, kv, :]  # [T, hd]
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
