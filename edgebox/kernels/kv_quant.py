"""The KV cache's element types (llama.cpp's ``--cache-type-k`` / ``--cache-type-v``): f16, q8_0, q4_0.

A quantized cache row (one token's key or value of one KV head, ``hd`` values) is GGML's own
block layout, blocks of 32 along head_dim: Q8_0 = f16 scale d + 32 int8 codes (x = d*q), Q4_0 =
f16 scale d + 16 bytes of nibbles (x = d*(q-8); value j low nibble of byte j, j+16 high). numpy
holds a row as ``hd/32`` records of :data:`BLOCK_DTYPES`; the kernels read their uint8 view.

The quantization rule is ggml's reference (as gguf-py's ``gguf.quants``): q8_0 d = max|x|/127,
q = roundf(x/d); q4_0 d = (the x of largest |x|)/-8, q = min(15, trunc(x/d + 8.5)); the numpy
reference :func:`quantize` and the numba :func:`quantize_row` are tested equal.

Over a quantized K llama.cpp's flash attention quantizes the query to q8_0 too:
:func:`round_query` is that rounding, as float32.

Rotation (llama.cpp's ``attn_rot_k`` / ``attn_rot_v``): a quantized K or V is stored in a
Walsh-Hadamard basis (spreading a head's outliers over its block). Queries and keys are both
multiplied by the orthonormal Sylvester matrix of :func:`rotation_k` (dot products unchanged);
values by H of 64 and the output by H again (H @ H = I); only when hd is a multiple of 64, as
llama.cpp. :func:`rotate` is the numpy reference, :func:`fwht_rows` the numba kernel.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from edgebox.errors import EdgeboxError
from edgebox.gguf.quant_types import QType, row_bytes
from edgebox.kernels.elementwise import f16_to_f32, f32_to_f16
from edgebox.kernels.matmul_simd import I32x8, cvt_f32, ld_i8x8_i32, mul_f32_s, st_f32x8

__all__ = [
    "CACHE_TYPES",
    "BLOCK_DTYPES",
    "F16",
    "Q8_0",
    "Q4_0",
    "QK",
    "CacheTypeError",
    "cache_type",
    "cache_dtype",
    "cache_row_shape",
    "kv_row_bytes",
    "type_code",
    "name_of",
    "code_of_array",
    "quantize",
    "dequantize",
    "round_query",
    "rotation_k",
    "rotation_v",
    "hadamard",
    "rotate",
    "fwht_rows",
    "quantize_row",
    "dequantize_row",
    "block_bytes",
    "block_scale",
    "block_vec",
]

# llama.cpp's names (``--cache-type-k q8_0``) -> the GGML type; f16 is the default
CACHE_TYPES: dict[str, QType] = {"f16": QType.F16, "q8_0": QType.Q8_0, "q4_0": QType.Q4_0}
QK = 32  # values per block of both quantized types

# the kernels' codes of the types (numba branches on an int)
F16, Q8_0, Q4_0 = 0, 1, 2
_CODES = {"f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}

BLOCK_DTYPES: dict[str, np.dtype] = {
    "q8_0": np.dtype([("d", "<f2"), ("qs", "i1", (QK,))]),  # 34 bytes, block_q8_0
    "q4_0": np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))]),  # 18 bytes, block_q4_0
}


class CacheTypeError(EdgeboxError, ValueError):
    """A KV cache type edgebox does not have, or one the model's head size cannot use."""


def cache_type(value: object, field: str = "cache_type_k") -> str:
    """``value`` checked as a cache type name -> the name (``field`` names the option in the error)."""
    if isinstance(value, QType):
        value = value.name
    if isinstance(value, str) and value.lower() in CACHE_TYPES:
        return value.lower()
    raise CacheTypeError(f"{field} must be one of {', '.join(CACHE_TYPES)} (llama.cpp's names), got {value!r}")


def cache_dtype(name: str) -> np.dtype:
    """The numpy element of a cache of type ``name``: float16, or one block record."""
    return np.dtype(np.float16) if name == "f16" else BLOCK_DTYPES[name]


def cache_row_shape(name: str, hd: int, field: str = "cache_type_k") -> tuple[int]:
    """The shape of one cached row of ``hd`` values (a whole number of blocks for q8_0/q4_0)."""
    if name == "f16":
        return (hd,)
    if hd % QK:
        raise CacheTypeError(f"{field} {name} needs a head size that is a multiple of {QK}; this model's is {hd}; use f16")
    return (hd // QK,)


def kv_row_bytes(name: str, hd: int) -> int:
    """Bytes of one cached row of ``hd`` values (GGML's row size of the type)."""
    return row_bytes(CACHE_TYPES[name], hd)


def type_code(name: str) -> int:
    return _CODES[name]


def name_of(a: np.ndarray) -> str | None:
    """The cache type of an array by its element (float16 or a block record), or None."""
    if a.dtype == np.float16:
        return "f16"
    for name, dt in BLOCK_DTYPES.items():
        if a.dtype == dt:
            return name
    return None


def code_of_array(a: np.ndarray) -> int:
    """The type code of a cache array by its element, or -1."""
    name = name_of(a)
    return -1 if name is None else _CODES[name]


def rotation_k(name: str, hd: int) -> int:
    """Values per Hadamard rotation of queries and keys for a K of type ``name`` (0: none)."""
    if name == "f16" or hd % 64:
        return 0
    n = 64
    while hd % (2 * n) == 0:
        n *= 2
    return n


def rotation_v(name: str, hd: int) -> int:
    """Values per Hadamard rotation of values and of the attention output (0: none)."""
    return 0 if name == "f16" or hd % 64 else 64


# ---------------------------------------------------------------------------------------------
# numpy reference


def hadamard(n: int) -> np.ndarray:
    """The orthonormal n x n Walsh-Hadamard matrix in Sylvester order (ggml_gen_hadamard): float32."""
    h = np.full((1, 1), 1 / np.sqrt(np.float32(n)), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def rotate(x: np.ndarray, n: int) -> np.ndarray:
    """Each run of ``n`` values along the last axis of x float32 [..., hd] multiplied by H (n = 0: x)."""
    x = np.asarray(x, np.float32)
    if not n:
        return x
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // n, n)
    return (groups @ hadamard(n)).reshape(x.shape).astype(np.float32)  # H is symmetric


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), exactly: floor(|x|) + floor(2 frac), signed."""
    a = np.abs(x)
    fl = np.floor(a)
    return np.sign(x) * (fl + np.floor(2 * (a - fl)))


def quantize(x: np.ndarray, name: str) -> np.ndarray:
    """float32 [..., hd] -> the cache's elements: float16 [..., hd] or block records [..., hd/32]."""
    x = np.asarray(x, np.float32)
    if name == "f16":
        return x.astype(np.float16)
    lead = x.shape[:-1]
    blocks = x.reshape(-1, QK)
    out = np.empty(len(blocks), BLOCK_DTYPES[name])
    if name == "q8_0":
        d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        out["qs"] = _roundf(blocks * inv).astype(np.int8)
    else:
        imax = np.abs(blocks).argmax(axis=1)[:, None]
        d = np.take_along_axis(blocks, imax, axis=1) / np.float32(-8)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        q = np.minimum(np.trunc(blocks * inv + np.float32(8.5)), 15).astype(np.uint8)
        out["qs"] = q[:, : QK // 2] | (q[:, QK // 2 :] << np.uint8(4))
    out["d"] = d[:, 0].astype(np.float16)
    return out.reshape(*lead, x.shape[-1] // QK)


def dequantize(a: np.ndarray) -> np.ndarray:
    """The cache's elements -> float32 [..., hd] (exact: every code times its f16 scale)."""
    if a.dtype == np.float16:
        return a.astype(np.float32)
    d = a["d"].astype(np.float32)[..., None]  # [..., nb, 1]
    if a.dtype == BLOCK_DTYPES["q8_0"]:
        q = a["qs"].astype(np.float32)
    else:
        qs = a["qs"]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8
    return (d * q).reshape(*a.shape[:-1], a.shape[-1] * QK)


def round_query(q: np.ndarray, name: str) -> np.ndarray:
    """The query as attention over a cache of K type ``name`` multiplies it: unchanged for f16
    (edgebox keeps the query float32 there), else rounded through q8_0 (llama.cpp quantizes the
    query to the vec_dot type of the quantized K, Q8_0 for both q8_0 and q4_0)."""
    q = np.asarray(q, np.float32)
    return q if name == "f16" else dequantize(quantize(q, "q8_0"))


# ---------------------------------------------------------------------------------------------
# numba: one row of hd values; rows are the uint8 view of the block records


@njit(cache=True, nogil=True, inline="always")
def _f16_at(row, o):
    return f16_to_f32(np.uint16(np.uint32(row[o]) | (np.uint32(row[o + 1]) << np.uint32(8))))


@njit(cache=True, nogil=True, inline="always")
def _put_f16(row, o, x):
    h = f32_to_f16(x)
    row[o] = np.uint8(h & np.uint16(0xFF))
    row[o + 1] = np.uint8(h >> np.uint16(8))


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row(x, row, t):
    """x float32 [hd] -> row uint8 [row bytes] of type code t (Q8_0 or Q4_0), as :func:`quantize`."""
    hd = x.shape[0]
    if t == Q8_0:
        for b in range(hd // QK):
            o = b * 34
            amax = np.float32(0.0)
            for i in range(QK):
                amax = max(amax, abs(x[b * QK + i]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _put_f16(row, o, d)
            for i in range(QK):
                v = x[b * QK + i] * inv
                a = abs(v)
                fl = np.floor(a)
                r = fl + np.floor(np.float32(2.0) * (a - fl))
                row[o + 2 + i] = np.uint8(np.int8(-r if v < 0 else r))
    else:
        for b in range(hd // QK):
            o = b * 18
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for i in range(QK):
                v = x[b * QK + i]
                if amax < abs(v):  # the first of the largest |x|, as ggml
                    amax = abs(v)
                    vmax = v
            d = vmax / np.float32(-8.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _put_f16(row, o, d)
            for j in range(QK // 2):
                lo = min(np.int32(15), np.int32(np.trunc(x[b * QK + j] * inv + np.float32(8.5))))
                hi = min(np.int32(15), np.int32(np.trunc(x[b * QK + QK // 2 + j] * inv + np.float32(8.5))))
                row[o + 2 + j] = np.uint8(lo | (hi << 4))


@njit(cache=True, nogil=True, error_model="numpy")
def dequantize_row(row, t, out):
    """row uint8 [row bytes] of type code t (Q8_0 or Q4_0) -> out float32 [hd] (1-D, C order)."""
    bs = block_bytes(t)
    for b in range(out.shape[0] // QK):
        d = block_scale(row, b * bs)
        for j in range(4):
            st_f32x8(out, b * QK + 8 * j, mul_f32_s(block_vec(row, b * bs, j, t), d))


@njit(cache=True, nogil=True, error_model="numpy")
def round_query_row(x, scratch, out):
    """x float32 [hd] -> out float32 [hd]: x rounded through q8_0 (scratch: uint8 [hd/32*34])."""
    quantize_row(x, scratch, Q8_0)
    dequantize_row(scratch, Q8_0, out)


@njit(cache=True, nogil=True, error_model="numpy")
def fwht_rows(x, n):
    """In place: each run of ``n`` values (a power of two) of every row of x float32 [R, hd] -> H times it."""
    scale = np.float32(1.0 / np.sqrt(np.float32(n)))
    R, hd = x.shape
    for r in range(R):
        for g0 in range(0, hd, n):
            h = 1
            while h < n:
                for i in range(g0, g0 + n, 2 * h):
                    for j in range(i, i + h):
                        a = x[r, j]
                        b = x[r, j + h]
                        x[r, j] = a + b
                        x[r, j + h] = a - b
                h *= 2
            for j in range(g0, g0 + n):
                x[r, j] *= scale


# ---------------------------------------------------------------------------------------------
# numba SIMD: what the attention kernels read of a block without widening the row first


@intrinsic
def _ld_q4x8_i32(typingctx, arr, idx, hi):
    """The low (hi = 0) or high (hi = 1) nibbles of the 8 bytes arr[idx:idx+8], minus 8, as int32
    lanes (Q4_0 codes; vpmovzxbd, vpsrld, vpand, vpsubd)."""

    def cg(context, builder, sig, args):
        i32, v8 = ir.IntType(32), ir.VectorType(ir.IntType(32), 8)
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.VectorType(ir.IntType(8), 8).as_pointer())
        b = builder.zext(builder.load(ptr, align=1), v8)
        sh = builder.mul(builder.trunc(args[2], i32), ir.Constant(i32, 4))
        shv = builder.shuffle_vector(
            builder.insert_element(ir.Constant(v8, ir.Undefined), sh, ir.Constant(i32, 0)),
            ir.Constant(v8, ir.Undefined),
            ir.Constant(v8, [0] * 8),
        )
        nib = builder.and_(builder.lshr(b, shv), ir.Constant(v8, [15] * 8))
        return builder.sub(nib, ir.Constant(v8, [8] * 8))

    return I32x8(arr, types.intp, types.intp), cg


@njit(cache=True, nogil=True, inline="always")
def block_bytes(t):
    """Bytes of one block of type code t (Q8_0 34, Q4_0 18)."""
    return 34 if t == Q8_0 else 18


@intrinsic
def _ld_f16(typingctx, arr, idx):
    """The IEEE half at bytes arr[idx:idx+2] (any alignment) widened to float32: one load and
    one vcvtph2ps, where reading the two bytes apart costs five instructions."""

    def cg(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.HalfType().as_pointer())
        return builder.fpext(builder.load(ptr, align=1), ir.FloatType())

    return types.float32(arr, types.intp), cg


@njit(cache=True, nogil=True, inline="always")
def block_scale(a, o):
    """The f16 scale d of the block at byte o of a (uint8, 1-D), as float32."""
    return _ld_f16(a, o)


@njit(cache=True, nogil=True, inline="always")
def block_vec(a, o, j, t):
    """Codes 8j..8j+7 (j < 4) of the block of type code t at byte o of a (uint8, 1-D), as a
    float32 vector (int8 codes for Q8_0, nibble - 8 for Q4_0): the values are these times d."""
    if t == Q8_0:
        return cvt_f32(ld_i8x8_i32(a, o + 2 + 8 * j))
    return cvt_f32(_ld_q4x8_i32(a, o + 2 + 8 * (j & 1), j >> 1))
