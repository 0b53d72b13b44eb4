"""A small explicit-SIMD vocabulary for numba kernels: 256-bit vector values and their ops.

Why this exists: LLVM's auto-vectorizer does not turn a numba loop over quantized blocks into
the int8 dot-product code llama.cpp writes by hand (``vec_dot_q4_0_q8_0``: vpmaddubsw,
vpmaddwd, vcvtdq2ps, vfmadd; the loops tried: docs/performance.md).  So the hot loops are
written with vector *values* instead: numba types backed by LLVM vector types (``<32 x i8>``, ``<16 x i16>``,
``<8 x i32>``, ``<8 x float>``) and ``@intrinsic`` ops that emit one or two LLVM instructions
each.  A kernel written with them is still ordinary ``@njit(cache=True, nogil=True)`` code; the
vectors live in registers (mem2reg), and ``inspect_asm`` shows exactly the instruction stream
one would write with immintrin.h.

Portability: the two int8 dot-product steps (``maddubs``, ``madd``) and ``sign_i8``/``abs_i8``
call the AVX2 intrinsics when the host has AVX2 (decided once at import, from LLVM's host
feature list; numba's on-disk cache is keyed by CPU model and features too), else an equivalent
generic-IR formulation (shuffles + widening multiplies) that LLVM lowers on any target.
``EDGEBOX_SIMD_GENERIC=1`` forces the generic formulation (used by the tests to check it).
``dpbusd`` is one VNNI instruction where the host has it (``HAS_VNNI``), else maddubs + madd.

Conventions: every op is pure (returns a new value), loads/stores take a 1-D C-contiguous
array and an element index (no bounds checks: callers own the index arithmetic).

Caching caveat: numba's on-disk cache of a kernel is invalidated by edits to its own file only:
after changing the code generation here, delete ``edgebox/kernels/__pycache__/*.nbi *.nbc``.
The ``EDGEBOX_SIMD_*`` switches cache apart (``_cache_switched_kernels_apart``).
"""

from __future__ import annotations

import os

import llvmlite.binding as llb
from llvmlite import ir
from numba.core import cgutils, config, types
from numba.extending import intrinsic, models, register_model

from edgebox.kernels.entry_hint import cache_dir


class Vec(types.Type):
    """A SIMD value: ``n`` lanes of numba scalar type ``elt`` (256 bits here, 512 in ``matmul_simd512``)."""

    def __init__(self, elt, n):
        self.elt = elt
        self.n = n
        super().__init__(name=f"Vec[{elt}x{n}]")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        be = ir.VectorType(dmm.lookup(fe_type.elt).get_value_type(), fe_type.n)
        super().__init__(dmm, fe_type, be)


I8x32 = Vec(types.int8, 32)  # bytes; signedness is a property of the op, not the type
I16x16 = Vec(types.int16, 16)
I32x8 = Vec(types.int32, 8)
F32x8 = Vec(types.float32, 8)

_i8, _i16, _i32, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V = ir.VectorType

_FEATURES = llb.get_host_cpu_features().flatten().split(",")
HAS_AVX2 = "+avx2" in _FEATURES and os.environ.get("EDGEBOX_SIMD_GENERIC", "") in ("", "0")
# VNNI (vpdpbusd: 4 u8 x s8 products summed into each int32 lane, any broadcast folded into the
# instruction) on 256-bit vectors: AVX512-VNNI with AVX512-VL, or AVX-VNNI.  EDGEBOX_SIMD_NO_VNNI=1
# keeps the AVX2 formulation (the tests run both).
HAS_VNNI = (
    HAS_AVX2
    and (("+avx512vnni" in _FEATURES and "+avx512vl" in _FEATURES) or "+avxvnni" in _FEATURES)
    and os.environ.get("EDGEBOX_SIMD_NO_VNNI", "") in ("", "0")
)

SWITCHES = ("EDGEBOX_SIMD_GENERIC", "EDGEBOX_SIMD_NO_VNNI", "EDGEBOX_SIMD_NO_512")


def _cache_switched_kernels_apart() -> None:
    """A process with a SIMD switch set keeps its compiled kernels in a numba cache of their own
    (``simd-<switches>`` under NUMBA_CACHE_DIR, else under edgebox's cache directory): numba keys
    its on-disk cache by source file and CPU, not by these switches, so a warm cache would hand
    the switched process the other variant's code. Runs before any kernel is defined (the kernel
    modules import this one first), as numba picks a function's cache directory at definition."""
    on = [name.removeprefix("EDGEBOX_SIMD_").lower() for name in SWITCHES if os.environ.get(name, "") not in ("", "0")]
    if not on:
        return
    base = config.CACHE_DIR or str(cache_dir().parent / "numba")
    config.CACHE_DIR = os.path.join(base, "simd-" + "-".join(on))


_cache_switched_kernels_apart()


# --- codegen helpers --------------------------------------------------------------------------


def _ptr(context, builder, aryty, ary, idx, vty):
    """Pointer to element ``idx`` of a 1-D array, cast to ``vty*``."""
    a = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(builder.gep(a.data, [idx]), vty.as_pointer())


def _splat(builder, val, n):
    vty = _V(val.type, n)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), val, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(_V(_i32, n), [0] * n))


def _const(ty, val, n):
    return ir.Constant(_V(ty, n), [val] * n)


def _call(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _even_odd(builder, v, n):
    u = ir.Constant(v.type, ir.Undefined)
    ev = builder.shuffle_vector(v, u, ir.Constant(_V(_i32, n // 2), list(range(0, n, 2))))
    od = builder.shuffle_vector(v, u, ir.Constant(_V(_i32, n // 2), list(range(1, n, 2))))
    return ev, od


def _scalar(context, builder, val, fromty, toty):
    return context.cast(builder, val, fromty, toty)


# --- lane-wise ops of any width: one rule each (``matmul_simd512`` makes its 512-bit ops with them)


def _named(name, doc, typer):
    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


def lanewise(name, vty, op, doc=None):
    """The intrinsic ``name(a, b)``: the IR builder's ``op`` (add, sub, mul, fmul, or_, ...) of
    two ``vty`` values, lane by lane."""

    def typer(typingctx, a, b):
        def cg(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])

        return vty(vty, vty), cg

    return _named(name, doc, typer)


def with_scalar(name, vty, op, doc=None):
    """The intrinsic ``name(a, s)``: ``op`` of a ``vty`` value and the scalar s, cast to the lane
    type (an int truncated) and put in every lane."""

    def typer(typingctx, a, s):
        def cg(context, builder, sig, args):
            return getattr(builder, op)(args[0], _splat(builder, _scalar(context, builder, args[1], sig.args[1], vty.elt), vty.n))

        return vty(vty, s), cg

    return _named(name, doc, typer)


def zeros(name, vty):
    """The intrinsic ``name()``: a ``vty`` value of zeros."""

    def typer(typingctx):
        def cg(context, builder, sig, args):
            return ir.Constant(context.get_value_type(vty), None)

        return vty(), cg

    return _named(name, None, typer)


def int_to_float(name, fty, ity):
    """The intrinsic ``name(a)``: int32 lanes to float32 lanes (vcvtdq2ps)."""

    def typer(typingctx, a):
        def cg(context, builder, sig, args):
            return builder.sitofp(args[0], context.get_value_type(fty))

        return fty(ity), cg

    return _named(name, "int32 lanes to float32 lanes (vcvtdq2ps).", typer)


def fused_multiply_add(name, vty):
    """The intrinsic ``name(a, b, c)``: a * b + c, one rounding (vfmadd)."""

    def typer(typingctx, a, b, c):
        def cg(context, builder, sig, args):
            return _call(builder, f"llvm.fma.v{vty.n}f32", context.get_value_type(vty), list(args))

        return vty(vty, vty, vty), cg

    return _named(name, "a * b + c, one rounding (vfmadd).", typer)


def nibbles(name, vty, high):
    """The intrinsic ``name(a)``: the low nibble of every byte (vpand), or with ``high`` the high
    nibble shifted down (vpsrlw + vpand)."""

    def typer(typingctx, a):
        def cg(context, builder, sig, args):
            if high:
                return builder.lshr(args[0], _const(_i8, 4, vty.n))
            return builder.and_(args[0], _const(_i8, 15, vty.n))

        return vty(vty), cg

    return _named(name, "High nibble of every byte, shifted down." if high else "Low nibble of every byte.", typer)


# --- loads / stores ---------------------------------------------------------------------------


@intrinsic
def ld_i8x32(typingctx, arr, idx):
    """32 bytes at arr[idx:idx+32] (arr: 1-D uint8/int8)."""

    def cg(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _V(_i8, 32)), align=1)

    return I8x32(arr, types.intp), cg


@intrinsic
def bc4_i8x32(typingctx, arr, idx):
    """The 4 bytes at arr[idx:idx+4] repeated in all 8 dword lanes (vpbroadcastd)."""

    def cg(context, builder, sig, args):
        w = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _i32), align=1)
        return builder.bitcast(_splat(builder, w, 8), _V(_i8, 32))

    return I8x32(arr, types.intp), cg


@intrinsic
def ld_f16x8(typingctx, arr, idx):
    """8 IEEE halves (arr: 1-D uint16 bit patterns) widened to float32 (vcvtph2ps with F16C)."""

    def cg(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _V(_i16, 8)), align=2)
        return builder.fpext(builder.bitcast(h, _V(ir.HalfType(), 8)), _V(_f32, 8))

    return F32x8(arr, types.intp), cg


@intrinsic
def ld_bf16x8(typingctx, arr, idx):
    """8 bfloat16 (arr: 1-D uint16 bit patterns) widened to float32 (shift into the top half)."""

    def cg(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _V(_i16, 8)), align=2)
        w = builder.shl(builder.zext(h, _V(_i32, 8)), _const(_i32, 16, 8))
        return builder.bitcast(w, _V(_f32, 8))

    return F32x8(arr, types.intp), cg


@intrinsic
def ld_f32x8(typingctx, arr, idx):
    def cg(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _V(_f32, 8)), align=4)

    return F32x8(arr, types.intp), cg


@intrinsic
def ld_u8x8_i32(typingctx, arr, idx):
    """8 unsigned bytes zero-extended to int32 (vpmovzxbd)."""

    def cg(context, builder, sig, args):
        b = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _V(_i8, 8)), align=1)
        return builder.zext(b, _V(_i32, 8))

    return I32x8(arr, types.intp), cg


@intrinsic
def ld_i8x8_i32(typingctx, arr, idx):
    """8 signed bytes sign-extended to int32 (vpmovsxbd)."""

    def cg(context, builder, sig, args):
        b = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _V(_i8, 8)), align=1)
        return builder.sext(b, _V(_i32, 8))

    return I32x8(arr, types.intp), cg


@intrinsic
def st_f16x8(typingctx, arr, idx, v):
    """8 float32 lanes rounded to IEEE halves (ties to even, vcvtps2ph) stored to arr[idx:idx+8]
    (arr: 1-D uint16 bit patterns)."""

    def cg(context, builder, sig, args):
        h = builder.bitcast(builder.fptrunc(args[2], _V(ir.HalfType(), 8)), _V(_i16, 8))
        builder.store(h, _ptr(context, builder, sig.args[0], args[0], args[1], _V(_i16, 8)), align=2)
        return context.get_dummy_value()

    return types.none(arr, types.intp, F32x8), cg


@intrinsic
def st_i8x32(typingctx, arr, idx, v):
    """32 bytes stored to arr[idx:idx+32] (arr: 1-D uint8/int8)."""

    def cg(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], args[1], _V(_i8, 32)), align=1)
        return context.get_dummy_value()

    return types.none(arr, types.intp, I8x32), cg


@intrinsic
def st_f32x8(typingctx, arr, idx, v):
    def cg(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], args[1], _V(_f32, 8)), align=4)
        return context.get_dummy_value()

    return types.none(arr, types.intp, F32x8), cg


# --- byte ops ---------------------------------------------------------------------------------


nib_lo = nibbles("nib_lo", I8x32, high=False)
nib_hi = nibbles("nib_hi", I8x32, high=True)
and_i8 = with_scalar("and_i8", I8x32, "and_", "a & c (c splatted to every byte).")


@intrinsic
def shl_w8(typingctx, a, n):
    """Left shift by n of the bytes taken as 16-bit words (vpsllw): bits cross into the next
    byte, so callers mask the result.  (LLVM makes a byte-wise shift a GF2P8AFFINEQB where GFNI
    exists, which takes the execution ports the multiplies need.)"""

    def cg(context, builder, sig, args):
        w = builder.bitcast(args[0], _V(_i16, 16))
        w = builder.shl(w, _splat(builder, builder.trunc(args[1], _i16), 16))
        return builder.bitcast(w, _V(_i8, 32))

    return I8x32(I8x32, types.intp), cg


@intrinsic
def shr_w8(typingctx, a, n):
    """Logical right shift by n of the bytes taken as 16-bit words (vpsrlw); callers mask."""

    def cg(context, builder, sig, args):
        w = builder.bitcast(args[0], _V(_i16, 16))
        w = builder.lshr(w, _splat(builder, builder.trunc(args[1], _i16), 16))
        return builder.bitcast(w, _V(_i8, 32))

    return I8x32(I8x32, types.intp), cg


or_i8 = lanewise("or_i8", I8x32, "or_")
xor_i8 = with_scalar(
    "xor_i8", I8x32, "xor", "a ^ c (c splatted to every byte): with c = 0x80, signed bytes as unsigned ones + 128."
)


@intrinsic
def abs_i8(typingctx, a):
    """|a| of signed bytes as unsigned bytes (-128 -> 128) (vpabsb)."""

    def cg(context, builder, sig, args):
        neg = builder.icmp_signed("<", args[0], _const(_i8, 0, 32))
        return builder.select(neg, builder.sub(_const(_i8, 0, 32), args[0]), args[0])

    return I8x32(I8x32), cg


@intrinsic
def sign_i8(typingctx, a, s):
    """a * sign(s) per signed byte: -a where s < 0, 0 where s == 0, a where s > 0 (vpsignb)."""

    def cg(context, builder, sig, args):
        if HAS_AVX2:
            return _call(builder, "llvm.x86.avx2.psign.b", _V(_i8, 32), list(args))
        a, s = args
        zero = _const(_i8, 0, 32)
        neg = builder.select(builder.icmp_signed("<", s, zero), builder.sub(zero, a), a)
        return builder.select(builder.icmp_signed("==", s, zero), zero, neg)

    return I8x32(I8x32, I8x32), cg


# --- integer dot-product steps ----------------------------------------------------------------


@intrinsic
def maddubs(typingctx, a, b):
    """Unsigned bytes a times signed bytes b, adjacent pairs summed (signed saturation) -> 16 x i16.

    vpmaddubsw.  Callers keep |a_2i*b_2i + a_2i+1*b_2i+1| < 32768 so saturation never happens.
    """

    def cg(context, builder, sig, args):
        return _maddubs_ir(builder, *args)

    return I16x16(I8x32, I8x32), cg


def _maddubs_ir(builder, a, b):
    if HAS_AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V(_i16, 16), [a, b])
    ae, ao = _even_odd(builder, a, 32)
    be, bo = _even_odd(builder, b, 32)
    pe = builder.mul(builder.zext(ae, _V(_i16, 16)), builder.sext(be, _V(_i16, 16)))
    po = builder.mul(builder.zext(ao, _V(_i16, 16)), builder.sext(bo, _V(_i16, 16)))
    return _call(builder, "llvm.sadd.sat.v16i16", _V(_i16, 16), [pe, po])


@intrinsic
def madd(typingctx, a, b):
    """Signed i16 products, adjacent pairs summed -> 8 x i32 (vpmaddwd)."""

    def cg(context, builder, sig, args):
        if HAS_AVX2:
            return _call(builder, "llvm.x86.avx2.pmadd.wd", _V(_i32, 8), list(args))
        ae, ao = _even_odd(builder, args[0], 16)
        be, bo = _even_odd(builder, args[1], 16)
        pe = builder.mul(builder.sext(ae, _V(_i32, 8)), builder.sext(be, _V(_i32, 8)))
        po = builder.mul(builder.sext(ao, _V(_i32, 8)), builder.sext(bo, _V(_i32, 8)))
        return builder.add(pe, po)

    return I32x8(I16x16, I16x16), cg


@intrinsic
def dpbusd(typingctx, acc, a, b):
    """acc + the sums of 4 adjacent products of unsigned bytes a and signed bytes b per int32
    lane (vpdpbusd; no intermediate saturation).  Without VNNI: maddubs then madd with ones,
    the same value while each pair sum of maddubs stays within int16 (callers' codes do)."""

    def cg(context, builder, sig, args):
        acc, a, b = args
        if HAS_VNNI:
            v = _V(_i32, 8)
            return _call(builder, "llvm.x86.avx512.vpdpbusd.256", v, [acc, builder.bitcast(a, v), builder.bitcast(b, v)])
        return builder.add(acc, _hadd_ir(builder, _maddubs_ir(builder, a, b)))

    return I32x8(I32x8, I8x32, I8x32), cg


@intrinsic
def hadd_i16(typingctx, a):
    """Adjacent i16 pairs summed into i32 lanes (vpmaddwd with ones)."""

    def cg(context, builder, sig, args):
        return _hadd_ir(builder, args[0])

    return I32x8(I16x16), cg


def _hadd_ir(builder, a):
    if HAS_AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V(_i32, 8), [a, _const(_i16, 1, 16)])
    ae, ao = _even_odd(builder, a, 16)
    return builder.add(builder.sext(ae, _V(_i32, 8)), builder.sext(ao, _V(_i32, 8)))


add_i16 = lanewise("add_i16", I16x16, "add")
sub_i16 = lanewise("sub_i16", I16x16, "sub", "a - b per int16 lane, wrapping.")


@intrinsic
def bc2_i16(typingctx, arr, idx):
    """The int32 arr[idx] read as two int16 (low, high) and repeated in all 8 dword lanes."""

    def cg(context, builder, sig, args):
        w = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _i32), align=4)
        return builder.bitcast(_splat(builder, w, 8), _V(_i16, 16))

    return I16x16(arr, types.intp), cg


@intrinsic
def ld_i8x8_i16x2(typingctx, arr, idx):
    """8 signed bytes, each sign-extended to int16 and put in both halves of its dword lane:
    the multiplier vector of ``madd`` that scales lane r's pair sums by byte r."""

    def cg(context, builder, sig, args):
        b = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _V(_i8, 8)), align=1)
        w = builder.sext(b, _V(_i16, 8))
        mask = ir.Constant(_V(_i32, 16), [i // 2 for i in range(16)])
        return builder.shuffle_vector(w, ir.Constant(w.type, ir.Undefined), mask)

    return I16x16(arr, types.intp), cg


zero_i16 = zeros("zero_i16", I16x16)
add_i32 = lanewise("add_i32", I32x8, "add")
sub_i32 = lanewise("sub_i32", I32x8, "sub")
mul_i32 = lanewise("mul_i32", I32x8, "mul", "Low 32 bits of lane products (vpmulld).")
sub_i32_s = with_scalar("sub_i32_s", I32x8, "sub", "a - s with a scalar s broadcast.")
zero_i32 = zeros("zero_i32", I32x8)


# --- float ops --------------------------------------------------------------------------------


cvt_f32 = int_to_float("cvt_f32", F32x8, I32x8)


@intrinsic
def splat_f32(typingctx, s):
    def cg(context, builder, sig, args):
        return _splat(builder, _scalar(context, builder, args[0], sig.args[0], types.float32), 8)

    return F32x8(s), cg


zero_f32 = zeros("zero_f32", F32x8)
fma_f32 = fused_multiply_add("fma_f32", F32x8)


@intrinsic
def fma_f32_s(typingctx, a, s, c):
    """a * s + c with a scalar s broadcast."""

    def cg(context, builder, sig, args):
        sv = _splat(builder, _scalar(context, builder, args[1], sig.args[1], types.float32), 8)
        return _call(builder, "llvm.fma.v8f32", _V(_f32, 8), [args[0], sv, args[2]])

    return F32x8(F32x8, s, F32x8), cg


mul_f32 = lanewise("mul_f32", F32x8, "fmul")
mul_f32_s = with_scalar("mul_f32_s", F32x8, "fmul", "a times the scalar s in every lane.")
add_f32 = lanewise("add_f32", F32x8, "fadd")
sub_f32 = lanewise("sub_f32", F32x8, "fsub")


def _tree(builder, v, combine):
    """The 8 lanes of v folded pairwise (lanes 0-3 with 4-7, then 0-1 with 2-3, ...) -> a scalar."""
    n = 8
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(_V(_i32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(_V(_i32, n), list(range(n, 2 * n))))
        v = combine(lo, hi)
    return builder.extract_element(v, ir.Constant(_i32, 0))


@intrinsic
def hsum_f32(typingctx, a):
    """Sum of the 8 lanes (pairwise tree) -> float32."""

    def cg(context, builder, sig, args):
        return _tree(builder, args[0], builder.fadd)

    return types.float32(F32x8), cg


@intrinsic
def lane_f32(typingctx, a, i):
    """Lane i of a float vector."""

    def cg(context, builder, sig, args):
        return builder.extract_element(args[0], builder.trunc(args[1], _i32))

    return types.float32(F32x8, types.intp), cg


@intrinsic
def absmax_f32(typingctx, a, b):
    """max(|a|, |b|) per lane (vandps + vmaxps)."""

    def cg(context, builder, sig, args):
        fa = _call(builder, "llvm.fabs.v8f32", _V(_f32, 8), [args[0]])
        fb = _call(builder, "llvm.fabs.v8f32", _V(_f32, 8), [args[1]])
        return builder.select(builder.fcmp_ordered(">", fa, fb), fa, fb)

    return F32x8(F32x8, F32x8), cg


@intrinsic
def hmax_f32(typingctx, a):
    """Largest of the 8 lanes (pairwise tree) -> float32."""

    def cg(context, builder, sig, args):
        return _tree(builder, args[0], lambda lo, hi: builder.select(builder.fcmp_ordered(">", lo, hi), lo, hi))

    return types.float32(F32x8), cg


@intrinsic
def rint_i32(typingctx, a):
    """float32 lanes rounded to the nearest int32, ties to even, as np.rint (vroundps + vcvttps2dq)."""

    def cg(context, builder, sig, args):
        return builder.fptosi(_call(builder, "llvm.rint.v8f32", _V(_f32, 8), [args[0]]), _V(_i32, 8))

    return I32x8(F32x8), cg


@intrinsic
def hsum_i32(typingctx, a):
    """Sum of the 8 int32 lanes -> int32."""

    def cg(context, builder, sig, args):
        return _tree(builder, args[0], builder.add)

    return types.int32(I32x8), cg


@intrinsic
def hsum_pairs_i32(typingctx, a, odd):
    """Sum of lanes 0, 1, 4, 5 (odd == 0) or 2, 3, 6, 7 (odd == 1) -> int32: over the int8
    values of a chunk row, the ones ``maddubs`` puts in the low / high int16 of a dword."""

    def cg(context, builder, sig, args):
        u = ir.Constant(args[0].type, ir.Undefined)
        ev = builder.shuffle_vector(args[0], u, ir.Constant(_V(_i32, 4), [0, 1, 4, 5]))
        od = builder.shuffle_vector(args[0], u, ir.Constant(_V(_i32, 4), [2, 3, 6, 7]))
        v = builder.select(builder.icmp_signed("!=", args[1], ir.Constant(args[1].type, 0)), od, ev)
        lo = builder.shuffle_vector(v, v, ir.Constant(_V(_i32, 2), [0, 1]))
        hi = builder.shuffle_vector(v, v, ir.Constant(_V(_i32, 2), [2, 3]))
        v = builder.add(lo, hi)
        return builder.add(builder.extract_element(v, ir.Constant(_i32, 0)), builder.extract_element(v, ir.Constant(_i32, 1)))

    return types.int32(I32x8, types.intp), cg


@intrinsic
def st_i32x8_i8(typingctx, arr, idx, v):
    """The low byte of each int32 lane stored to arr[idx:idx+8] (arr: 1-D int8; lanes in range)."""

    def cg(context, builder, sig, args):
        builder.store(
            builder.trunc(args[2], _V(_i8, 8)), _ptr(context, builder, sig.args[0], args[0], args[1], _V(_i8, 8)), align=1
        )
        return context.get_dummy_value()

    return types.none(arr, types.intp, I32x8), cg


# --- scalars ----------------------------------------------------------------------------------


@intrinsic
def f16_to_f32(typingctx, h):
    """IEEE half bit pattern (uint16) -> float32."""

    def cg(context, builder, sig, args):
        v = builder.trunc(args[0], _i16) if args[0].type.width > 16 else args[0]
        return builder.fpext(builder.bitcast(v, ir.HalfType()), _f32)

    return types.float32(h), cg


@intrinsic
def bf16_to_f32(typingctx, h):
    """bfloat16 bit pattern (uint16) -> float32."""

    def cg(context, builder, sig, args):
        v = builder.trunc(args[0], _i16) if args[0].type.width > 16 else args[0]
        return builder.bitcast(builder.shl(builder.zext(v, _i32), ir.Constant(_i32, 16)), _f32)

    return types.float32(h), cg


def _prefetch_cg(locality):
    def cg(context, builder, sig, args):
        p = builder.bitcast(_ptr(context, builder, sig.args[0], args[0], args[1], _i8), ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [p.type, _i32, _i32, _i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [p, ir.Constant(_i32, 0), ir.Constant(_i32, locality), ir.Constant(_i32, 1)])
        return context.get_dummy_value()

    return cg


@intrinsic
def prefetch(typingctx, arr, idx):
    """Software prefetch of the cache line holding arr[idx] (llvm.prefetch: read, keep in all
    cache levels).  Out-of-range addresses are harmless: a prefetch never faults."""
    return types.none(arr, types.intp), _prefetch_cg(3)


@intrinsic
def prefetch_l2(typingctx, arr, idx):
    """prefetch into L2 and below, not L1 (prefetcht1): data wanted a while from now, which
    should not push out what the core works on."""
    return types.none(arr, types.intp), _prefetch_cg(2)


@intrinsic
def bc_f32(typingctx, arr, idx):
    """arr[idx] (float32) in all 8 lanes: one vbroadcastss from memory (no index wraparound)."""

    def cg(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _f32), align=4)
        return _splat(builder, v, 8)

    return F32x8(arr, types.intp), cg


@intrinsic
def bc_i32(typingctx, arr, idx):
    """arr[idx] (int32) in all 8 lanes: one vpbroadcastd from memory."""

    def cg(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _i32), align=4)
        return _splat(builder, v, 8)

    return I32x8(arr, types.intp), cg


@intrinsic
def shl_i32(typingctx, a, n):
    """Left shift of every int32 lane by n."""

    def cg(context, builder, sig, args):
        return builder.shl(args[0], _splat(builder, builder.trunc(args[1], _i32), 8))

    return I32x8(I32x8, types.intp), cg


@intrinsic
def ldf(typingctx, arr, idx):
    """arr[idx] as a scalar, without numba's negative-index wraparound code."""

    def cg(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.load(builder.gep(a.data, [args[1]]))

    return arr.dtype(arr, types.intp), cg
