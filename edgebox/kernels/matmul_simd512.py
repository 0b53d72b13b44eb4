"""512-bit vector values for the batched kernels on AVX-512 hosts: two 8-row groups side by side.

Why: on a core whose vector units are 512 bits wide (Zen 5 here), one ``vpdpbusd`` on zmm does
the work of two on ymm at the same rate: 470 against 235 GMAC/s in a register-only loop on this
machine. The repacked planes stay 8 rows per group (``matmul_pack``), so a 512-bit kernel loads
group g into the low half and group g + 1 into the high half of each value (``ld2_*``) and stores
the halves back to their own rows (``lo_f32x8``/``hi_f32x8``); the decode kernels, the repacker
and the packed-weight cache's layout are unchanged.

``HAS_512``: AVX512-F/BW/VL with VNNI, decided once at import from LLVM's host features (numba's
cache is keyed by them too); ``EDGEBOX_SIMD_NO_512=1`` keeps the 256-bit kernels (the tests run
both). The conventions are ``matmul_simd``'s: pure ops, 1-D arrays and element indices, no bounds
checks.
"""

from __future__ import annotations

import os

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from edgebox.kernels.matmul_simd import (
    _FEATURES,
    HAS_VNNI,
    F32x8,
    I8x32,
    Vec,
    _call,
    _ptr,
    _splat,
    fused_multiply_add,
    int_to_float,
    lanewise,
    nibbles,
    with_scalar,
    zeros,
)

I8x64 = Vec(types.int8, 64)
I32x16 = Vec(types.int32, 16)
F32x16 = Vec(types.float32, 16)

HAS_512 = (
    HAS_VNNI
    and all(f"+{f}" in _FEATURES for f in ("avx512f", "avx512bw", "avx512vl", "avx512vnni"))
    and os.environ.get("EDGEBOX_SIMD_NO_512", "") in ("", "0")
)

_i8, _i16, _i32, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V = ir.VectorType


def _concat(builder, a, b):
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(_V(_i32, 2 * n), list(range(2 * n))))


def _half(builder, v, hi):
    n = v.type.count // 2
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(_V(_i32, n), list(range(hi * n, hi * n + n))))


def _load(context, builder, sig, args, i, vty, align):
    return builder.load(_ptr(context, builder, sig.args[0], args[0], args[i], vty), align=align)


# --- loads ------------------------------------------------------------------------------------


@intrinsic
def ld2_i8x64(typingctx, arr, ia, ib):
    """arr[ia:ia+32] in the low half, arr[ib:ib+32] in the high half."""

    def cg(context, builder, sig, args):
        v = _V(_i8, 32)
        return _concat(builder, _load(context, builder, sig, args, 1, v, 1), _load(context, builder, sig, args, 2, v, 1))

    return I8x64(arr, types.intp, types.intp), cg


@intrinsic
def ld_i8x64(typingctx, arr, idx):
    """64 bytes at arr[idx:idx+64]."""

    def cg(context, builder, sig, args):
        return _load(context, builder, sig, args, 1, _V(_i8, 64), 1)

    return I8x64(arr, types.intp), cg


@intrinsic
def st_i8x64(typingctx, arr, idx, v):
    """64 bytes stored to arr[idx:idx+64]."""

    def cg(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], args[1], _V(_i8, 64)), align=1)
        return context.get_dummy_value()

    return types.none(arr, types.intp, I8x64), cg


@intrinsic
def cat_i8x64(typingctx, a, b):
    """a (32 bytes) in the low half, b in the high half."""

    def cg(context, builder, sig, args):
        return _concat(builder, args[0], args[1])

    return I8x64(I8x32, I8x32), cg


@intrinsic
def bc4_i8x64(typingctx, arr, idx):
    """The 4 bytes at arr[idx:idx+4] in all 16 dword lanes (folded into vpdpbusd as {1to16})."""

    def cg(context, builder, sig, args):
        w = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _i32), align=1)
        return builder.bitcast(_splat(builder, w, 16), _V(_i8, 64))

    return I8x64(arr, types.intp), cg


@intrinsic
def ld2_f16x16(typingctx, arr, ia, ib):
    """8 IEEE halves at ia and 8 at ib (1-D uint16 bit patterns) widened to 16 float32 lanes."""

    def cg(context, builder, sig, args):
        v = _V(_i16, 8)
        h = _concat(builder, _load(context, builder, sig, args, 1, v, 2), _load(context, builder, sig, args, 2, v, 2))
        return builder.fpext(builder.bitcast(h, _V(ir.HalfType(), 16)), _V(_f32, 16))

    return F32x16(arr, types.intp, types.intp), cg


@intrinsic
def ld2_u8x16_i32(typingctx, arr, ia, ib):
    """8 unsigned bytes at ia and 8 at ib zero-extended to 16 int32 lanes."""

    def cg(context, builder, sig, args):
        v = _V(_i8, 8)
        b = _concat(builder, _load(context, builder, sig, args, 1, v, 1), _load(context, builder, sig, args, 2, v, 1))
        return builder.zext(b, _V(_i32, 16))

    return I32x16(arr, types.intp, types.intp), cg


@intrinsic
def ld2_i8x16_i32(typingctx, arr, ia, ib):
    """8 signed bytes at ia and 8 at ib sign-extended to 16 int32 lanes."""

    def cg(context, builder, sig, args):
        v = _V(_i8, 8)
        b = _concat(builder, _load(context, builder, sig, args, 1, v, 1), _load(context, builder, sig, args, 2, v, 1))
        return builder.sext(b, _V(_i32, 16))

    return I32x16(arr, types.intp, types.intp), cg


@intrinsic
def bc_i32x16(typingctx, arr, idx):
    """arr[idx] (int32) in all 16 lanes."""

    def cg(context, builder, sig, args):
        return _splat(builder, builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _i32), align=4), 16)

    return I32x16(arr, types.intp), cg


@intrinsic
def bc_f32x16(typingctx, arr, idx):
    """arr[idx] (float32) in all 16 lanes."""

    def cg(context, builder, sig, args):
        return _splat(builder, builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _f32), align=4), 16)

    return F32x16(arr, types.intp), cg


# --- integer ops ------------------------------------------------------------------------------


nib_lo64 = nibbles("nib_lo64", I8x64, high=False)
nib_hi64 = nibbles("nib_hi64", I8x64, high=True)
xor_i8x64 = with_scalar(
    "xor_i8x64", I8x64, "xor", "a ^ c (c splatted to every byte): with c = 0x80, signed bytes as unsigned ones + 128."
)


@intrinsic
def dpbusd64(typingctx, acc, a, b):
    """acc + the sums of 4 adjacent products of unsigned bytes a and signed bytes b per int32
    lane (one zmm vpdpbusd)."""

    def cg(context, builder, sig, args):
        v = _V(_i32, 16)
        return _call(
            builder, "llvm.x86.avx512.vpdpbusd.512", v, [args[0], builder.bitcast(args[1], v), builder.bitcast(args[2], v)]
        )

    return I32x16(I32x16, I8x64, I8x64), cg


add_i32x16 = lanewise("add_i32x16", I32x16, "add")
mul_i32x16 = lanewise("mul_i32x16", I32x16, "mul", "Low 32 bits of the lane products (vpmulld).")


@intrinsic
def splat_i32x16(typingctx, v):
    """The integer v (truncated to int32) in all 16 lanes."""

    def cg(context, builder, sig, args):
        return _splat(builder, builder.trunc(args[0], _i32) if args[0].type.width > 32 else args[0], 16)

    return I32x16(types.intp), cg


zero_i32x16 = zeros("zero_i32x16", I32x16)


# --- float ops --------------------------------------------------------------------------------


cvt_f32x16 = int_to_float("cvt_f32x16", F32x16, I32x16)
zero_f32x16 = zeros("zero_f32x16", F32x16)
mul_f32x16 = lanewise("mul_f32x16", F32x16, "fmul")
mul_f32x16_s = with_scalar("mul_f32x16_s", F32x16, "fmul", "a times the scalar s in every lane.")


@intrinsic
def neg_f32x16(typingctx, a):
    def cg(context, builder, sig, args):
        return builder.fneg(args[0])

    return F32x16(F32x16), cg


fma_f32x16 = fused_multiply_add("fma_f32x16", F32x16)


@intrinsic
def lo_f32x8(typingctx, a):
    """Lanes 0-7 (the first group's rows)."""

    def cg(context, builder, sig, args):
        return _half(builder, args[0], 0)

    return F32x8(F32x16), cg


@intrinsic
def hi_f32x8(typingctx, a):
    """Lanes 8-15 (the second group's rows)."""

    def cg(context, builder, sig, args):
        return _half(builder, args[0], 1)

    return F32x8(F32x16), cg
