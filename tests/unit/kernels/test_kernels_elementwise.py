"""numba elementwise kernels against edgebox.kernels.ref (the spec), test-backend-ops style.

Tolerances (and what was measured when they were set):
* f16_to_f32: exact, all 65536 bit patterns.
* expf: <= 1.5 ulp of the correctly rounded value on [-87, 88] (measured 1.003 ulp; numpy's own
  float32 exp measures 2.45 ulp on the same grid); exact at the special values.
* rms_norm: <= 1 ulp of the output (measured: bit-equal; only the float64 sum order differs).
* rope: bit-equal to ref.rope (the same float64 angles, the same float32 products, no FMA).
* swiglu: rtol 1e-6 (measured on [64, 11008]: max 3.7e-7 relative to ref; against float64,
  ours 1.8e-7 and ref's 2.6e-7: expf is more accurate than numpy's float32 exp).
* softmax: rtol 1e-6 / atol 1e-7 (measured on [64, 2048]: max 4.7e-7 relative, 2.4e-7 abs).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgebox.kernels import elementwise as E
from edgebox.kernels import ref

RNG = np.random.default_rng(1234)


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in units of the last place of b (float32)."""
    b = np.asarray(b, np.float32)
    return np.abs(a.astype(np.float64) - b.astype(np.float64)) / np.spacing(np.abs(b)).astype(np.float64)


# -- conversions and exp -----------------------------------------------------------------------


def test_f16_to_f32_all_bit_patterns():
    from numba import njit

    @njit
    def widen(src, dst):
        for i in range(src.shape[0]):
            dst[i] = E.f16_to_f32(src[i])

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(65536, np.float32)
    widen(bits, out)
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))  # -0.0 too


def test_expf_accuracy_and_specials():
    from numba import njit

    @njit
    def vexp(x, out):
        for i in range(x.shape[0]):
            out[i] = E.expf(x[i])

    x = np.concatenate([np.linspace(-87.0, 88.0, 200_001, dtype=np.float32), RNG.uniform(-5, 5, 20_000).astype(np.float32)])
    out = np.empty_like(x)
    vexp(x, out)
    exact = np.exp(x.astype(np.float64))
    # measured against the exact value, not its float32 rounding
    err = np.abs(out.astype(np.float64) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert err.max() <= 1.5, f"expf max error {err.max():.3f} ulp at x={x[err.argmax()]}"

    specials = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, -104.0, -110.0, 89.0, 88.72, -87.5, -100.0], np.float32)
    got = np.empty_like(specials)
    vexp(specials, got)
    with np.errstate(over="ignore"):
        want = np.exp(specials.astype(np.float64)).astype(np.float32)
    assert got[0] == 0.0 and got[1] == np.inf and np.isnan(got[2])
    assert got[3] == 1.0 and got[4] == 1.0 and got[5] == 0.0 and got[6] == 0.0 and got[7] == np.inf
    np.testing.assert_allclose(got[8:], want[8:], rtol=2e-7, atol=2e-45)  # near overflow, subnormals


# -- rms_norm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("T,D", [(1, 16), (1, 4096), (5, 896), (17, 100), (3, 3)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rms_norm(T, D, eps):
    x = (RNG.standard_normal((T, D)) * RNG.uniform(0.01, 30)).astype(np.float32)
    w = RNG.standard_normal(D).astype(np.float32)
    got = E.rms_norm(x, w, eps)
    want = ref.rms_norm(x, w, eps)
    assert got.dtype == np.float32 and got.shape == (T, D)
    assert ulps(got, want).max() <= 1.0


def test_rms_norm_in_place_and_errors():
    x = RNG.standard_normal((4, 64)).astype(np.float32)
    w = RNG.standard_normal(64).astype(np.float32)
    want = ref.rms_norm(x, w, 1e-6)
    y = x.copy()
    assert E.rms_norm(y, w, 1e-6, out=y) is y
    assert ulps(y, want).max() <= 1.0
    with pytest.raises(ValueError):
        E.rms_norm(x, w[:63], 1e-6)
    with pytest.raises(ValueError):
        E.rms_norm(x, w, 1e-6, out=np.empty((4, 64), np.float64))


# -- rope --------------------------------------------------------------------------------------


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("T,H,hd,n_rot", [(1, 1, 16, 16), (5, 7, 64, 64), (17, 3, 128, 128), (4, 2, 128, 64), (3, 5, 80, 32)])
@pytest.mark.parametrize("base,scale", [(10000.0, 1.0), (1000000.0, 0.25)])
def test_rope_bit_equal(neox, T, H, hd, n_rot, base, scale):
    x = RNG.standard_normal((T, H, hd)).astype(np.float32)
    pos = RNG.integers(0, 40000, T).astype(np.int32)  # not monotone, some large
    want = ref.rope(x, pos, n_rot, base, scale, neox)
    got = x.copy()
    assert E.rope_inplace(got, pos, n_rot, base, scale, neox) is got
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # shared tables: the same tables rope q and k (different head counts)
    cos, sin = E.rope_tables(pos, n_rot, base, scale)
    assert cos.shape == (T, n_rot // 2) and cos.dtype == np.float32
    k = RNG.standard_normal((T, 1, hd)).astype(np.float32)
    want_k = ref.rope(k, pos, n_rot, base, scale, neox)
    assert np.array_equal(E.apply_rope(k, cos, sin, neox), want_k)


def test_rope_errors():
    x = np.zeros((2, 2, 16), np.float32)
    with pytest.raises(ValueError):
        E.rope_inplace(x, [0, 1], 15, 1e4, 1.0, False)  # odd
    with pytest.raises(ValueError):
        E.rope_inplace(x, [0, 1], 32, 1e4, 1.0, False)  # > head size
    with pytest.raises(ValueError):
        E.rope_inplace(x, [0, 1, 2], 16, 1e4, 1.0, False)  # positions vs tokens
    with pytest.raises(ValueError):
        E.apply_rope(x.astype(np.float64), *E.rope_tables([0, 1], 16, 1e4, 1.0), False)


# -- swiglu / softmax / argmax -----------------------------------------------------------------


@pytest.mark.parametrize("T,F", [(1, 11008), (5, 64), (3, 17)])
def test_swiglu(T, F):
    gate = (RNG.standard_normal((T, F)) * 8).astype(np.float32)
    up = RNG.standard_normal((T, F)).astype(np.float32)
    gate.flat[:6] = [-100.0, -88.5, -0.0, 0.0, 90.0, 1e-30][: gate.size]
    got = E.swiglu(gate, up)
    with np.errstate(over="ignore"):
        want = ref.swiglu(gate, up)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-37)
    # in place into gate
    g2 = gate.copy()
    assert E.swiglu(g2, up, out=g2) is g2
    np.testing.assert_array_equal(g2, got)


@pytest.mark.parametrize("T,F", [(1, 11008), (8, 2752), (3, 17)])
def test_swiglu_halves(T, F):
    """A fused gate/up output read in place equals swiglu of its two halves, bit for bit."""
    gate_up = (RNG.standard_normal((T, 2 * F)) * 8).astype(np.float32)
    got = E.swiglu_halves(gate_up)
    assert got.shape == (T, F)
    np.testing.assert_array_equal(got, E.swiglu(gate_up[:, :F], gate_up[:, F:]))
    with pytest.raises(ValueError, match="halves"):
        E.swiglu_halves(gate_up[:, 1:])


def test_softmax():
    x = (RNG.standard_normal((7, 300)) * 10).astype(np.float32)
    x[0, ::3] = -np.inf  # masked entries get weight 0
    x[1, :] = -np.inf
    x[1, 5] = 2.0  # one visible entry: weight 1
    x[2] = 80.0  # large equal values: uniform, no overflow
    got = E.softmax(x)
    want = ref.softmax(x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.all(got[0, ::3] == 0.0) and got[1, 5] == 1.0
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    assert E.softmax(x[3]).shape == (300,)


def test_argmax():
    x = RNG.standard_normal(151_936).astype(np.float32)
    assert E.argmax(x) == int(np.argmax(x))
    x[[10, 20]] = 1e9  # ties: the lowest index, as np.argmax
    assert E.argmax(x) == 10
    x[5] = np.nan  # NaN wins, as np.argmax
    assert E.argmax(x) == int(np.argmax(x)) == 5
    assert E.argmax(np.array([-np.inf, -np.inf], np.float32)) == 0
    with pytest.raises(ValueError):
        E.argmax(np.zeros(0, np.float32))
