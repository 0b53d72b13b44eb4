"""numba kernels for the small ops of the forward pass: RMS norm, rope, SwiGLU, softmax, argmax.

The spec is :mod:`edgebox.kernels.ref`; ``tests/unit/kernels/test_kernels_elementwise.py`` holds
the measured differences. Every op has a Python wrapper (``rms_norm``, ``apply_rope``, ...) that
checks shapes and dtypes, allocates the output and calls an ``@njit(cache=True, nogil=True)``
kernel (``*_kernel``) writing into a given output: the kernels release the GIL, so several chip
threads may run them at once, and other numba code may call them directly. None is worth
``parallel=True``: they touch each value once, in microseconds at decode sizes.

Precision against the reference:
* ``rms_norm`` squares in float32 and sums in float64 (as ggml and ref do): bit-equal to ref in
  every test (only the float64 summation order differs).
* ``rope_tables`` is ref's own numpy code; ``apply_rope`` does the same float32 products and sums
  without FMA contraction: bit-equal to ``ref.rope``.
* ``swiglu``/``softmax`` use :func:`expf`, a vectorizable float32 exp (Cephes polynomial, at most
  1.003 ulp from the exact value on [-87, 88]) instead of libm's scalar ``expf``, which LLVM
  cannot vectorize without SVML. Below 2^-126 results are subnormal, below 2^-150 zero.

Kernels use ``error_model="numpy"``: numba's default puts a ZeroDivisionError check on every
float division, which stops LLVM from vectorizing the loop.

Also here, for attention.py and other kernels: :func:`f16_to_f32` (an LLVM ``fpext``; numba has
no float16 type on the CPU, so float16 arrays travel as their ``uint16`` view) and its inverse
:func:`f32_to_f16` (``fptrunc``, for writing the KV cache). Figures: docs/performance.md.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = [
    "f16_to_f32",
    "f32_to_f16",
    "bits_to_f32",
    "expf",
    "rms_norm",
    "rms_norm_kernel",
    "rope_tables",
    "apply_rope",
    "apply_rope_kernel",
    "rope_inplace",
    "swiglu",
    "swiglu_kernel",
    "swiglu_halves",
    "swiglu_halves_kernel",
    "silu",
    "softmax",
    "softmax_kernel",
    "argmax",
    "argmax_kernel",
]

# fastmath flags for reductions only: reassociation (so LLVM may vectorize a sum) and FMA
# contraction. No nnan/ninf: -inf scores are how masked keys are written.
FM_REDUCE = {"reassoc", "contract"}


# ---------------------------------------------------------------------------------------------
# LLVM intrinsics: bit casts numba does not offer for scalars.


@intrinsic
def f16_to_f32(typingctx, h):
    """uint16 (the bits of an IEEE half) -> float32, exactly (fpext: vcvtph2ps with F16C)."""
    if h != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_f16(typingctx, x):
    """float32 -> uint16 bits of the nearest IEEE half, ties to even, as numpy's astype(float16)
    (fptrunc: vcvtps2ph with F16C)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def bits_to_f32(typingctx, i):
    """The low 32 bits of an integer -> float32 with the same bits."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if i.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif i.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(i), codegen


# ---------------------------------------------------------------------------------------------
# exp

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)  # exact in a few bits, so n * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_HI = np.float32(88.73)  # above: inf (the polynomial overflows by itself)
_EXP_LO = np.float32(-104.0)  # below: 0 (2^-150 rounds to zero)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def expf(x):
    """float32 exp that LLVM can vectorize (no libm call): Cephes' expf polynomial.

    Range reduction x = n ln2 + r, |r| <= ln2/2 (Cody-Waite, two constants), a degree-7
    polynomial for e^r, then 2^n as two exponent-field multiplies so that n = -150..128 (results
    down into the subnormals, and overflow to inf) need no branch. exp(-inf) = 0, exp(inf) = inf,
    exp(nan) = nan.
    """
    xc = x if x < _EXP_HI else _EXP_HI
    xc = xc if xc > _EXP_LO else _EXP_LO
    fn = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - fn * _LN2_HI
    r = r - fn * _LN2_LO
    z = r * r
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    p = p * z + r + np.float32(1.0)
    n = np.int32(fn)
    n1 = n >> 1
    n2 = n - n1
    y = p * bits_to_f32((n1 + np.int32(127)) << 23) * bits_to_f32((n2 + np.int32(127)) << 23)
    return y if x == x else x


# ---------------------------------------------------------------------------------------------
# RMS norm


@njit(cache=True, nogil=True, error_model="numpy", fastmath=FM_REDUCE)
def _sum_squares_f64(row):
    s = 0.0
    for i in range(row.shape[0]):
        v = row[i]
        s += np.float64(v * v)  # square in float32, add in float64 (ggml_vec / ref)
    return s


@njit(cache=True, nogil=True, error_model="numpy")
def rms_norm_kernel(x, w, eps, out):
    """out[t] = x[t] * (1 / sqrt(mean(x[t]^2) + eps)) * w.   x, out: float32 [T, D]; w: [D]."""
    T, D = x.shape
    eps32 = np.float32(eps)
    for t in range(T):
        mean = np.float32(_sum_squares_f64(x[t]) / D)
        scale = np.float32(1.0) / np.sqrt(mean + eps32)
        for i in range(D):
            out[t, i] = (x[t, i] * scale) * w[i]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """ref.rms_norm: x float32 [T, D], w float32 [D] -> float32 [T, D] (``out`` may be ``x``)."""
    x = _f32(x, "rms_norm: x", 2)
    w = _f32(w, "rms_norm: w", 1)
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"rms_norm: x has {x.shape[1]} features, the weight {w.shape[0]}")
    out = _out(out, x.shape, "rms_norm")
    rms_norm_kernel(x, w, float(eps), out)
    return out


# ---------------------------------------------------------------------------------------------
# Rope


def rope_tables(positions: np.ndarray, n_rot: int, freq_base: float, freq_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [T, n_rot/2] of theta[t, i] = pos[t] * freq_scale * freq_base^(-2i/n_rot).

    Exactly ref.rope's angles (float64, rounded once). Compute once per forward and share them
    between q and k and across layers.
    """
    if n_rot <= 0 or n_rot % 2:
        raise ValueError(f"rope: n_rot={n_rot} must be even and > 0")
    half = n_rot // 2
    inv_freq = float(freq_base) ** (-2.0 * np.arange(half) / n_rot)  # [half]
    theta = np.asarray(positions, dtype=np.float64).reshape(-1)[:, None] * float(freq_scale) * inv_freq
    return np.ascontiguousarray(np.cos(theta), np.float32), np.ascontiguousarray(np.sin(theta), np.float32)


@njit(cache=True, nogil=True, error_model="numpy")
def apply_rope_kernel(x, cos, sin, neox):
    """Rotate, in place, the first 2*half dims of every head of x float32 [T, H, hd].

    cos, sin: float32 [T, half]. neox: pairs (i, i + half); otherwise (2i, 2i + 1).
    """
    T, H, _ = x.shape
    half = cos.shape[1]
    for t in range(T):
        for h in range(H):
            for i in range(half):
                c = cos[t, i]
                s = sin[t, i]
                if neox:
                    a = x[t, h, i]
                    b = x[t, h, i + half]
                    x[t, h, i] = a * c - b * s
                    x[t, h, i + half] = a * s + b * c
                else:
                    a = x[t, h, 2 * i]
                    b = x[t, h, 2 * i + 1]
                    x[t, h, 2 * i] = a * c - b * s
                    x[t, h, 2 * i + 1] = a * s + b * c


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rope x float32 [T, H, hd] in place with tables from :func:`rope_tables`; returns x."""
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 3 and x.flags.writeable):
        raise ValueError(f"rope: x must be a writable float32 [T, H, hd] array, got {_desc(x)}")
    cos = _f32(cos, "rope: cos", 2)
    sin = _f32(sin, "rope: sin", 2)
    T, _, hd = x.shape
    if cos.shape != sin.shape or cos.shape[0] != T or not 0 < 2 * cos.shape[1] <= hd:
        raise ValueError(f"rope: tables {cos.shape}/{sin.shape} do not fit x {x.shape}")
    apply_rope_kernel(x, cos, sin, bool(neox))
    return x


def rope_inplace(x: np.ndarray, positions: np.ndarray, n_rot: int, freq_base: float, freq_scale: float, neox: bool) -> np.ndarray:
    """ref.rope, in place on x float32 [T, H, hd]; returns x."""
    if isinstance(x, np.ndarray) and x.ndim == 3 and not 0 < n_rot <= x.shape[2]:
        raise ValueError(f"rope: n_rot={n_rot} must be even and in (0, {x.shape[2]}]")
    positions = np.asarray(positions).reshape(-1)
    if isinstance(x, np.ndarray) and x.ndim == 3 and positions.shape[0] != x.shape[0]:
        raise ValueError(f"rope: {positions.shape[0]} positions for {x.shape[0]} tokens")
    cos, sin = rope_tables(positions, n_rot, freq_base, freq_scale)
    return apply_rope(x, cos, sin, neox)


# ---------------------------------------------------------------------------------------------
# SwiGLU, softmax, argmax


@njit(cache=True, nogil=True, error_model="numpy")
def silu(g):
    """g / (1 + exp(-g)) in float32 (g < -88: -0, the limit, as in ref)."""
    return g / (np.float32(1.0) + expf(-g))


@njit(cache=True, nogil=True, error_model="numpy")
def swiglu_kernel(gate, up, out):
    """out = silu(gate) * up, float32 [T, F] (out may be gate or up)."""
    T, F = gate.shape
    for t in range(T):
        for i in range(F):
            out[t, i] = silu(gate[t, i]) * up[t, i]


@njit(cache=True, nogil=True, error_model="numpy")
def swiglu_halves_kernel(gate_up, T, F, out):
    """out [T*F] = silu(gate) * up where row t of gate_up (flat [T*2F]) is its gate, then its up."""
    for t in range(T):
        g = gate_up[2 * t * F : 2 * t * F + F]
        u = gate_up[2 * t * F + F : 2 * t * F + 2 * F]
        o = out[t * F : t * F + F]
        for i in range(F):
            o[i] = silu(g[i]) * u[i]


def swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ref.swiglu: silu(gate) * up, float32 [T, F] (``out`` may be ``gate`` or ``up``)."""
    # strided rows would not vectorize (8 x 11008: 343 us); contiguous copies first: 61 us (the
    # halves of one array: swiglu_halves, 53 us)
    gate = np.ascontiguousarray(_f32(gate, "swiglu: gate", 2))
    up = np.ascontiguousarray(_f32(up, "swiglu: up", 2))
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {gate.shape} and up {up.shape} differ")
    out = _out(out, gate.shape, "swiglu")
    swiglu_kernel(gate, up, out)
    return out


def swiglu_halves(gate_up: np.ndarray) -> np.ndarray:
    """swiglu of a fused gate/up output: float32 [T, 2F] (each row its gate, then its up) -> [T, F].
    Read in place, a row's halves as flat runs (no copies)."""
    gate_up = np.ascontiguousarray(_f32(gate_up, "swiglu_halves: gate_up", 2))
    T, F2 = gate_up.shape
    if F2 % 2:
        raise ValueError(f"swiglu_halves: {F2} columns do not split into gate and up halves")
    out = np.empty((T, F2 // 2), np.float32)
    swiglu_halves_kernel(gate_up.reshape(-1), T, F2 // 2, out.reshape(-1))
    return out


@njit(cache=True, nogil=True, error_model="numpy", fastmath=FM_REDUCE)
def _exp_sub_sum(row, m, dst):
    s = np.float32(0.0)
    for i in range(row.shape[0]):
        e = expf(row[i] - m)
        dst[i] = e
        s += e
    return s


@njit(cache=True, nogil=True, error_model="numpy")
def softmax_kernel(x, out):
    """Row softmax of x float32 [R, n] into out (max subtracted; -inf -> 0)."""
    R, n = x.shape
    for r in range(R):
        m = -np.inf
        for i in range(n):
            if x[r, i] > m:
                m = x[r, i]
        m32 = np.float32(m)
        s = _exp_sub_sum(x[r], m32, out[r])
        inv = np.float32(1.0) / s
        for i in range(n):
            out[r, i] = out[r, i] * inv


def softmax(x: np.ndarray) -> np.ndarray:
    """ref.softmax over the last axis, float32 [..., n] -> [..., n]."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"softmax: need a non-empty last axis, got shape {x.shape}")
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = np.empty_like(x2)
    softmax_kernel(x2, out)
    return out.reshape(x.shape)


@njit(cache=True, nogil=True, error_model="numpy")
def argmax_kernel(x):
    """np.argmax of a 1-D array: the first index of the maximum (the first NaN if there is one)."""
    best = 0
    m = x[0]
    if m != m:
        return 0
    for i in range(1, x.shape[0]):
        v = x[i]
        if v > m:
            m = v
            best = i
        elif v != v:
            return i
    return best


def argmax(x: np.ndarray) -> int:
    """Greedy sampling: the lowest index of the largest value of x (1-D, non-empty)."""
    x = np.asarray(x)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"argmax: need a non-empty 1-D array, got shape {x.shape}")
    return int(argmax_kernel(x))


# ---------------------------------------------------------------------------------------------
# helpers


def _desc(a) -> str:
    return f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__


def _f32(a, what: str, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {a.shape}")
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    return a


def _out(out, shape, what: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == tuple(shape) and out.flags.writeable):
        raise ValueError(f"{what}: out must be a writable float32 array of shape {tuple(shape)}, got {_desc(out)}")
    return out
