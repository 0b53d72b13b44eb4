"""edgebox.kernels.matmul against the numpy reference (llama.cpp test-backend-ops habit).

Every supported type, matvec and matmul, ragged shapes (n_out not a multiple of the 8-row
groups, n_out = 1, T = 1, 3, 17).  Errors are normalized: ``max|y - ref| / s`` with
``s = sqrt(mean(x^2 @ (W^2).T))``, the spread a dot product of these inputs and rows has when
its terms do not cancel (= std(ref) for independent zero-mean data, and still meaningful for a
single output).  Two comparisons per case:

* exact activations: against ``dequantize(q8_0(x)) @ dequantize(W).T`` in float64, where q8_0(x)
  are the very int8 activations the kernel used.  This isolates layout/bit errors from the
  (intended) activation rounding: only float32 rounding and summation order differ.
  Tolerance 3e-5; measured <= 6.5e-6 (Q3_K), <= 2.7e-6 for the fast types.
* float activations: against ``x @ dequantize(W).T``, the exact reference.  The int8 paths round
  every activation to 1/254 of its block's max; measured max 0.020-0.029 (these cases and 256-row ones)
  (Q4_0 0.026, Q8_0 0.028, Q4_K 0.029, Q5_K 0.026, Q6_K 0.020, planes types 0.021-0.026) for normal
  x: about 0.6% rms, as llama.cpp's q8_0 activations.  Tolerance 0.05.
  Float weights (F32/F16/BF16) keep float activations: measured <= 7e-7, tolerance 1e-5.

Weights: gguf.quants.quantize of random normals where gguf can quantize the type (Q4_0, Q8_0,
Q4_1, Q5_0, Q5_1, BF16, F16, F32), and random bytes with finite f16 scale fields for every
quantized type (the only source for K-quants; random bytes also hit the extreme codes, e.g.
15/63 and Q8_0's -128, that int16 overflow bugs need).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import tracemalloc

import numba
import numpy as np
import pytest
from gguf import quants as gq

from edgebox.gguf import quant_types as qt
from edgebox.gguf.quant_types import QType
from edgebox.kernels import matmul as M
from edgebox.kernels import matmul_simd
from edgebox.kernels.quants import registry
from tests.fixtures.quant_rows import make_weight

try:
    from edgebox.kernels.ref import dequantize
except ImportError:  # pragma: no cover - the reference is being written beside this
    dequantize = gq.dequantize

ALL_TYPES = [
    QType.Q4_0,
    QType.Q8_0,
    QType.Q4_K,
    QType.Q6_K,
    QType.Q4_1,
    QType.Q5_0,
    QType.Q5_1,
    QType.Q2_K,
    QType.Q3_K,
    QType.Q5_K,
    QType.F16,
    QType.BF16,
    QType.F32,
]
FLOATS = (QType.F16, QType.BF16, QType.F32)
TOL_EXACT = 3e-5
TOL_Q8 = 0.05
TOL_FLOAT = 1e-5


def nerr(a, b, scale) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / (scale + 1e-30))


def dot_scale(x: np.ndarray, Wf: np.ndarray) -> float:
    """sqrt(mean over outputs of sum_k (x_k w_rk)^2): the spread a dot product of these inputs
    and rows has when its terms do not cancel (= std(x @ W.T) for independent zero-mean data,
    but not at the mercy of a handful of samples when n_out = 1 and T = 1)."""
    x2 = x.astype(np.float64) ** 2
    return float(np.sqrt(np.mean(x2 @ (Wf.astype(np.float64) ** 2).T)))


def q8_dequant(qx: M.QuantizedActivations) -> np.ndarray:
    T, n = qx.x.shape
    return (qx.xq.reshape(T, n // 32, 32).astype(np.float64) * qx.xd.reshape(T, n // 32, 1).astype(np.float64)).reshape(T, n)


def check(w: M.PackedWeight, Wf: np.ndarray, x: np.ndarray, y: np.ndarray, what: str) -> dict:
    ref = x.astype(np.float64) @ Wf.T.astype(np.float64)
    assert y.shape == ref.shape and y.dtype == np.float32, what
    assert np.isfinite(y).all(), what
    scale = dot_scale(x, Wf)
    e_float = nerr(y, ref, scale)
    if w.qtype in FLOATS:
        assert e_float < TOL_FLOAT, f"{what}: {e_float:.2e}"
        return {"float": e_float}
    qx = M.quantize_activations(x)
    e_exact = nerr(y, q8_dequant(qx) @ Wf.T.astype(np.float64), scale)
    assert e_exact < TOL_EXACT, f"{what}: vs exact-activation reference {e_exact:.2e}"
    assert e_float < TOL_Q8, f"{what}: vs float reference {e_float:.3f}"
    return {"exact": e_exact, "float": e_float}


def _n_in(qtype, k):
    return k * (256 if qt.block_size(qtype) == 256 else 32)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_matvec_matmul_all_types(qtype):
    rng = np.random.default_rng(int(qtype))
    cases = [(1, _n_in(qtype, 2)), (13, _n_in(qtype, 3)), (40, _n_in(qtype, 2))]
    for n_out, n_in in cases:
        for rb in (False, True) if qtype not in FLOATS else (False,):
            raw = make_weight(qtype, n_out, n_in, rng, random_bytes=rb)
            before = raw.copy()
            w = M.pack(raw, qtype)
            assert (w.qtype, w.n_out, w.n_in) == (qtype, n_out, n_in)
            np.testing.assert_array_equal(raw, before)  # pack never writes the rows
            Wf = dequantize(raw, qtype).astype(np.float32)
            x = rng.standard_normal(n_in).astype(np.float32)
            y = M.matvec(w, x)
            check(w, Wf, x[None], y[None], f"{qtype.name} matvec {n_out}x{n_in} rb={rb}")
            for T in (1, 3, 8, 12, 17):
                X = rng.standard_normal((T, n_in)).astype(np.float32)
                Y = M.matmul(w, X)
                check(w, Wf, X, Y, f"{qtype.name} matmul T={T} {n_out}x{n_in} rb={rb}")
                # every token of a batch equals its own matvec (same integer sums; the float
                # epilogues may associate differently)
                y1 = M.matvec(w, X[T - 1])
                assert nerr(Y[T - 1], y1, dot_scale(X[T - 1 :], Wf)) < TOL_EXACT


FAST = [QType.Q4_0, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K]


@pytest.mark.parametrize("qtype", FAST, ids=lambda q: q.name)
def test_fast_types_7b_like_rows(qtype):
    """A wider n_in (several K super-blocks, many blocks per row) and many row groups."""
    rng = np.random.default_rng(7)
    n_out, n_in = 203, 2048
    raw = make_weight(qtype, n_out, n_in, rng)
    w = M.pack(raw, qtype)
    Wf = dequantize(raw, qtype).astype(np.float32)
    X = (rng.standard_normal((5, n_in)) * rng.uniform(0.1, 10, n_in)).astype(np.float32)
    check(w, Wf, X, M.matmul(w, X), f"{qtype.name} 203x2048")
    check(w, Wf, X[:1], M.matvec(w, X[0])[None], f"{qtype.name} 203x2048 matvec")


def test_units_cover_every_token_once_and_leave_lone_tokens_to_singles():
    """``_units``: octets while 8 tokens remain or 6-7 are left (a short octet, not two quads),
    then quads (the last one short by up to 2), and a lone token left over (T % 8 = 1 or 5) as a
    single, not a quad computing 3 tokens for nothing; every token in exactly one unit; ``_last``
    marks the last octet or quad."""
    from edgebox.kernels.matmul_kernels import _last, _unit, _units

    cuts = {2: (0, 1, 0), 3: (0, 1, 0), 5: (0, 1, 1), 6: (1, 0, 0), 7: (1, 0, 0), 8: (1, 0, 0), 9: (1, 0, 1)}
    cuts |= {10: (1, 1, 0), 13: (1, 1, 1), 15: (2, 0, 0), 16: (2, 0, 0), 21: (2, 1, 1), 64: (8, 0, 0)}
    for T, want in cuts.items():
        assert _units(T) == want, T
    for T in range(2, 70):
        n8, n4, n1 = _units(T)
        units = [_unit(n8, n4, u) for u in range(n8 + n4 + n1)]
        covered = [t for t0, w in units for t in range(t0, min(t0 + w, T))]
        assert covered == list(range(T)), T
        assert all(t0 + w <= T + 2 for t0, w in units) and n1 <= 1, T  # a unit is short by 2 at most
        wide = [(t0, w) for t0, w in units if w > 1]
        assert [_last(T, t0, w) for t0, w in wide] == [i == len(wide) - 1 for i in range(len(wide))], T


@pytest.mark.parametrize("qtype", FAST, ids=lambda q: q.name)
def test_token_octets_and_quads(qtype):
    """T cut into octets, quads and singles (``matmul_kernels._units``: 8, 8 + 1..7, 16, 21 = 8 +
    8 + 4 + 1; ragged rows): every token equals the reference and its own matvec."""
    rng = np.random.default_rng(int(qtype) + 100)
    n_out, n_in = 203, _n_in(qtype, 3)
    raw = make_weight(qtype, n_out, n_in, rng)
    w = M.pack(raw, qtype)
    Wf = dequantize(raw, qtype).astype(np.float32)
    for T in (7, 8, 9, 12, 15, 16, 21):
        X = rng.standard_normal((T, n_in)).astype(np.float32)
        Y = M.matmul(w, X)
        check(w, Wf, X, Y, f"{qtype.name} matmul T={T}")
        for t in range(T):
            assert nerr(Y[t], M.matvec(w, X[t]), dot_scale(X[t : t + 1], Wf)) < TOL_EXACT, (T, t)


def _k_blocks(qtype: QType, code: int, n_out: int, n_sb: int, rng) -> np.ndarray:
    """K-quant rows [n_out, row_bytes] whose every code is ``code`` (random scales, incl. the
    extreme int8 ones for Q6_K, and small f16 d / dmin)."""
    n = n_out * n_sb
    f16 = np.full(n, 2.0**-10, np.float16).view(np.uint8).reshape(n, 2)
    if qtype == QType.Q6_K:
        sc = rng.integers(-128, 128, (n, 16)).astype(np.int8)
        sc[:, :2] = (-128, 127)
        ql = np.full((n, 128), (code & 15) * 17, np.uint8)
        qh = np.full((n, 64), (code >> 4) * 0x55, np.uint8)
        b = np.concatenate([ql, qh, sc.view(np.uint8), f16], axis=1)
    else:
        scales = rng.integers(0, 256, (n, 12), dtype=np.uint8)
        qs = np.full((n, 128), (code & 15) * 17, np.uint8)
        parts = [f16, f16, scales]
        if qtype == QType.Q5_K:
            parts.append(np.full((n, 32), 0xFF if code >> 4 else 0, np.uint8))
        b = np.concatenate([*parts, qs], axis=1)
    assert b.shape[1] == qt.type_size(qtype)
    return b.reshape(n_out, -1)


@pytest.mark.parametrize(
    "qtype,codes", [(QType.Q6_K, (0, 63)), (QType.Q5_K, (0, 31)), (QType.Q4_K, (0, 15))], ids=lambda v: getattr(v, "name", "")
)
def test_k_quant_int16_sums_at_their_bounds(qtype, codes):
    """Every code at its extreme against activations of +-127 (the block max), so the int16
    partial sums reach their bounds: Q6_K's 4-chunk sums wrap before the -32 offset is taken
    off in int16 and must come out exact (|sum (q-32) x| up to 8 * 32 * 127 = 32512)."""
    rng = np.random.default_rng(17)
    n_out, n_in = 21, 512
    signs = np.ones((6, n_in), np.float32)
    signs[1] = -1.0
    signs[2, ::2] = -1.0  # alternating: the low and high int16 halves see opposite sums
    signs[3] = np.where(np.arange(n_in) % 4 < 2, 1.0, -1.0)
    signs[4] = np.where(np.arange(n_in) // 16 % 2 == 0, 1.0, -1.0)
    signs[5] = rng.choice([-1.0, 1.0], n_in)
    for code in codes:
        raw = _k_blocks(qtype, code, n_out, n_in // 256, rng)
        w = M.pack(raw, qtype)
        Wf = dequantize(raw, qtype).astype(np.float32)
        for T in (1, 3, 6):
            X = signs[:T] * np.float32(3.0)
            Y = M.matmul(w, X) if T > 1 else M.matvec(w, X[0])[None]
            check(w, Wf, X, Y, f"{qtype.name} code {code} T={T}")


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q6_K, QType.F16, QType.Q5_K], ids=lambda q: q.name)
def test_strided_shard_and_typed_rows(qtype):
    """Row-parallel shards are column slices of the mmap (non-contiguous rows)."""
    rng = np.random.default_rng(3)
    n_in = _n_in(qtype, 4)
    raw = make_weight(qtype, 24, n_in, rng)
    half = raw.shape[1] // 2
    shard = raw[:, half:]  # the second half of every row
    w = M.pack(shard, qtype)
    assert w.n_in == n_in // 2
    Wf = dequantize(np.ascontiguousarray(shard), qtype)
    x = rng.standard_normal(n_in // 2).astype(np.float32)
    check(w, Wf, x[None], M.matvec(w, x)[None], f"{qtype.name} strided shard")
    if qtype == QType.F16:  # GGUFReader hands out float16 arrays
        typed = np.ascontiguousarray(raw).view(np.float16)
        y = M.matvec(M.pack(typed, qtype), rng.standard_normal(n_in).astype(np.float32))
        assert y.shape == (24,)


@pytest.mark.parametrize("qtype", [*FAST, QType.Q4_1], ids=lambda q: q.name)
def test_strided_shard_staged_in_pieces_packs_as_its_copy(qtype, monkeypatch):
    """A strided shard goes to the repacker through a small reused buffer (``matmul._repack``):
    with a buffer of 16 rows, several pieces and a ragged last one (also inside ``pack_rows``)
    give exactly the arrays of packing the shard's contiguous copy, and no shard-sized copy is
    made (types with ``Kernels.planes``; the others copy)."""
    rng = np.random.default_rng(29)
    for n_out in (5, 40, 53):
        raw = make_weight(qtype, n_out, 2048, rng, random_bytes=True)
        shard = raw[:, raw.shape[1] // 2 :]
        want = M.pack(np.ascontiguousarray(shard), qtype)
        monkeypatch.setattr(M, "STAGE_BYTES", 16 * shard.shape[1] + 1)
        tracemalloc.start()
        staged = M.pack(shard, qtype)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if n_out == 53 and registry.get(qtype).kernels.planes is not None:
            assert peak < want.nbytes + shard.nbytes // 2, f"{qtype.name}: a shard-sized copy was made"
        for got in (staged, M.pack_rows([np.ascontiguousarray(shard[:16]), shard[16:]], qtype)):
            assert got.arrays.keys() == want.arrays.keys()
            for k in want.arrays:
                np.testing.assert_array_equal(got.arrays[k], want.arrays[k], err_msg=f"{qtype.name} n_out={n_out} {k}")
        monkeypatch.undo()


@pytest.mark.parametrize("qtype", [*FAST, QType.Q4_1], ids=lambda q: q.name)
def test_trimmed_rows_pack_in_runs_as_in_one(qtype, monkeypatch):
    """With a ``trim``, contiguous rows are repacked TRIM_BYTES at a time and each run handed to
    it once repacked (``matmul._repack``): the runs cover the rows once, in order, whole group
    pairs but the last, and the arrays are those of one repack (also inside ``pack_rows``)."""
    rng = np.random.default_rng(31)
    for n_out in (5, 40, 53):
        raw = make_weight(qtype, n_out, 1024, rng, random_bytes=True)
        want = M.pack(raw, qtype)
        monkeypatch.setattr(M, "TRIM_BYTES", 16 * raw.shape[1] + 1)
        for blocks in ([raw], [raw[:16], raw[16:]])[: 1 + (n_out > 16)]:
            runs = []
            got = M.pack_rows(blocks, qtype, trim=runs.append)
            for k in want.arrays:
                np.testing.assert_array_equal(got.arrays[k], want.arrays[k], err_msg=f"{qtype.name} n_out={n_out} {k}")
            if registry.get(qtype).kernels.planes is None or qtype in (QType.F32, QType.F16, QType.BF16):
                continue
            assert [len(r) for r in runs] == [min(16, n_out - r0) for r0 in range(0, n_out, 16)]  # (16-row runs: ~TRIM_BYTES)
            assert np.array_equal(np.concatenate(runs), raw)
        monkeypatch.undo()


@pytest.mark.parametrize("qtype", [*FAST, QType.Q4_1], ids=lambda q: q.name)
def test_pack_rows_equals_packing_the_stacked_rows(qtype):
    """Row blocks repacked in place (a chip's q/k/v or gate/up) give the arrays of one pack of
    their concatenation: whole group pairs then a ragged last block, a ragged block before the
    end (the concatenating fallback), one block, strided blocks; also types without ``planes``."""
    rng = np.random.default_rng(23)
    for sizes in ((32, 16, 48), (16, 16, 5), (48, 27), (5, 16), (21,)):
        blocks = [make_weight(qtype, n, 256, rng, random_bytes=True) for n in sizes]
        blocks[-1] = np.concatenate([blocks[-1], blocks[-1]], axis=1)[:, blocks[-1].shape[1] :]  # strided
        want = M.pack(np.concatenate(blocks), qtype)
        got = M.pack_rows(blocks, qtype)
        assert (got.n_out, got.n_in, got.path, got.nbytes) == (want.n_out, want.n_in, want.path, want.nbytes)
        assert got.arrays.keys() == want.arrays.keys()
        for k in want.arrays:
            np.testing.assert_array_equal(got.arrays[k], want.arrays[k], err_msg=f"{qtype.name} {sizes} {k}")


@pytest.mark.parametrize("qtype", FAST, ids=lambda q: q.name)
def test_numba_repack_equals_numpy_spec(qtype):
    """The load-time numba repackers produce exactly the planes of the numpy formulation."""
    repack = registry.get(qtype).kernels.repack
    rng = np.random.default_rng(17)
    for n_out in (5, 16, 27):
        raw = make_weight(qtype, n_out, 512, rng, random_bytes=True)
        spec = repack(raw, n_out, 512, use_numba=False)
        wide = np.concatenate([raw, raw], axis=1)[:, raw.shape[1] :]  # strided rows too
        for src in (raw, wide):
            got = repack(src, n_out, 512)
            assert got.keys() == spec.keys()
            for k in spec:
                np.testing.assert_array_equal(got[k], spec[k], err_msg=f"{qtype.name} {k} n_out={n_out}")


@pytest.mark.parametrize("qtype", FLOATS, ids=lambda q: q.name)
def test_float_types_ragged_n_in(qtype):
    """Float weights have no block size: n_in need not be a multiple of 8 (scalar tail)."""
    rng = np.random.default_rng(19)
    n_out, n_in = 11, 37
    Wf = rng.standard_normal((n_out, n_in)).astype(np.float32)
    raw = np.ascontiguousarray(gq.quantize(Wf, qtype)).view(np.uint8).reshape(n_out, -1)
    w = M.pack(raw, qtype)
    X = rng.standard_normal((3, n_in)).astype(np.float32)
    check(w, dequantize(raw, qtype), X, M.matmul(w, X), f"{qtype.name} n_in=37")
    check(w, dequantize(raw, qtype), X[:1], M.matvec(w, X[0])[None], f"{qtype.name} n_in=37 matvec")


@pytest.mark.parametrize("T,n_in", [(3, 256), (1, 4096), (8, 11008), (5, 96), (40, 64)])
def test_activation_quantization_matches_q8_0(T, n_in):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((T, n_in)) * rng.uniform(0.01, 30, (T, 1))).astype(np.float32)
    x[T // 2, :32] = 0.0  # an all-zero block: scale 0
    x[-1, -32:] = np.arange(32) - 15.5  # ties: x * (1/d) lands on .5
    qx = M.quantize_activations(x)
    nb = n_in // 32
    xb = x.reshape(T, nb, 32)
    # llama.cpp's quantize_row_q8_0: d = amax / 127, id = 1/d (0 for d = 0), q = round(x * id)
    # (numpy's rint: ties to even, as the kernel's vroundps), bit for bit
    d = np.abs(xb).max(-1) / np.float32(127)
    np.testing.assert_array_equal(qx.xd.reshape(T, nb), d)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[..., None])
    np.testing.assert_array_equal(qx.xq.reshape(T, nb, 32), q)
    assert (qx.xq.reshape(T, nb, 32)[T // 2, 0] == 0).all()
    s16 = qx.xq.reshape(-1, 16).astype(np.int32).sum(1)
    # xs16, Q6_K's offset: with VNNI -32 x the sum per 16; else two int16 per 16 values, 32 x the
    # sums over the values a maddubs dword's low half (positions 0, 1 of each 4) and high half
    # (2, 3) multiplies
    if matmul_simd.HAS_VNNI:
        np.testing.assert_array_equal(qx.xs16, -32 * s16)
    else:
        pos = qx.xq.reshape(-1, 4, 2, 2).astype(np.int32)  # [16-groups, chunk, half, 2]
        halves = 32 * pos.sum(axis=(1, 3))
        assert np.abs(halves).max() <= 32512
        np.testing.assert_array_equal(qx.xs16.view(np.int16).reshape(-1, 2), halves)
    np.testing.assert_allclose(qx.xsd16, qx.xd.repeat(2) * s16, rtol=1e-6)
    np.testing.assert_allclose(qx.xsd32, qx.xd * qx.xq.reshape(-1, 32).astype(np.int32).sum(1), rtol=1e-6)


def test_reuse_quantized_activations_and_out():
    rng = np.random.default_rng(11)
    raw = make_weight(QType.Q4_0, 19, 128, rng)
    w = M.pack(raw, QType.Q4_0)
    X = rng.standard_normal((4, 128)).astype(np.float32)
    qx = M.quantize_activations(X)
    np.testing.assert_array_equal(M.matmul(w, qx), M.matmul(w, X))
    out = np.full((4, 19), np.nan, np.float32)
    r = M.matmul(w, X, out=out)
    assert r is out
    np.testing.assert_array_equal(out, M.matmul(w, X))
    q1 = M.quantize_activations(X[2])
    np.testing.assert_array_equal(M.matvec(w, q1), M.matvec(w, X[2]))


def test_thread_counts_agree_and_concurrent_calls():
    """Results do not depend on the thread count, and host threads may call at once."""
    rng = np.random.default_rng(13)
    ws = [M.pack(make_weight(q, 64, 512, rng), q) for q in FAST]
    X = rng.standard_normal((6, 512)).astype(np.float32)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        ref = [(M.matvec(w, X[0]), M.matmul(w, X)) for w in ws]
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        for w, (v, m) in zip(ws, ref):
            np.testing.assert_array_equal(M.matvec(w, X[0]), v)
            np.testing.assert_array_equal(M.matmul(w, X), m)
    finally:
        numba.set_num_threads(old)
    errors = []

    def worker(i):
        try:
            for _ in range(20):
                w = ws[i % len(ws)]
                np.testing.assert_array_equal(M.matvec(w, X[0]), ref[i % len(ws)][0])
                np.testing.assert_array_equal(M.matmul(w, X), ref[i % len(ws)][1])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        M.pack(np.zeros((4, 10), np.uint8), QType.Q4_0)  # not whole blocks
    with pytest.raises(ValueError):
        M.pack(np.zeros((4, 18), np.uint8), QType.IQ4_NL)  # unsupported type
    w = M.pack(make_weight(QType.Q8_0, 8, 64, rng), QType.Q8_0)
    with pytest.raises(ValueError):
        M.matvec(w, np.zeros(32, np.float32))  # wrong n_in
    with pytest.raises(ValueError):
        M.matvec(w, np.zeros((2, 64), np.float32))  # matvec takes one vector


def test_packed_sizes():
    """The fast types read (almost) exactly the file's bytes: decode speed is bytes / bandwidth."""
    rng = np.random.default_rng(1)
    for q, ratio in ((QType.Q4_0, 1.0), (QType.Q8_0, 1.0), (QType.Q4_K, 1.028), (QType.Q5_K, 1.023), (QType.Q6_K, 1.0)):
        w = M.pack(make_weight(q, 64, 512, rng), q)
        assert w.nbytes / w.file_bytes == pytest.approx(ratio, abs=0.002), q.name


def test_inner_loop_is_simd():
    """The Q4_0 block loop is vpmaddubsw on 256-bit registers (read the assembly); on a host
    without AVX2 no AVX2 intrinsic may reach the code (the generic formulation is used instead).

    The cached kernels carry no assembly, so the row-group body is compiled afresh here.
    """
    from edgebox.kernels import matmul_simd
    from edgebox.kernels.quants import q4_0

    f = numba.njit(nogil=True)(q4_0._q4_0_group.py_func)
    args = (
        np.zeros(256, np.uint8),
        np.zeros(16, np.uint16),
        np.zeros(64, np.int8),
        np.zeros(2, np.float32),
        np.zeros(2, np.float32),
        2,
        0,
        np.zeros(8, np.float32),
    )
    f(*args)
    uses_avx2 = "llvm.x86.avx2" in f.inspect_llvm(f.signatures[0])
    assert uses_avx2 == matmul_simd.HAS_AVX2
    if not matmul_simd.HAS_AVX2:
        return  # the generic path's results are checked by test_generic_simd_fallback
    asm = f.inspect_asm(f.signatures[0])
    assert asm.count("vpmaddubsw") == 24  # (2 blocks + odd tail) x 4 loads x (low, high)
    assert "vpmaddwd" in asm and "vcvtph2ps" in asm and "vfmadd" in asm
    body = [ln for ln in asm.splitlines() if "vpmaddubsw" in ln]
    assert all("ymm" in ln for ln in body)


@pytest.mark.slow
def test_generic_simd_fallback(tmp_path):
    """The non-AVX2 formulation of the SIMD ops (any LLVM target) gives the same results.

    Runs the Q4_0 and Q8_0 matvec kernels (maddubs, hadd, abs, sign) in a subprocess with
    EDGEBOX_SIMD_GENERIC=1 and its own numba cache; planes come from the numpy repacker so that
    only the kernels themselves are compiled there.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    code = r"""
import numpy as np, sys
ROOT, TMP = sys.argv[1], sys.argv[2]
sys.path.insert(0, ROOT)
from edgebox.kernels import matmul_simd
assert not matmul_simd.HAS_AVX2
import edgebox
assert edgebox.__file__.startswith(ROOT), edgebox.__file__
from edgebox.kernels import matmul as M, matmul_pack as P
from edgebox.kernels.quants import registry
from edgebox.gguf.quant_types import QType
x = np.load(TMP + "/x.npy")
qx = M.quantize_activations(x)
for q in (QType.Q4_0, QType.Q8_0):
    kernels = registry.get(q).kernels
    for rb in (0, 1):
        raw = np.load(TMP + f"/{q.name}_{rb}.npy")
        a = kernels.repack(raw, raw.shape[0], 256, use_numba=False)
        out = np.empty(P.n_groups(raw.shape[0]) * 8, np.float32)
        kernels.mv(a["q"].reshape(-1), a["d"].reshape(-1), *qx.arrays(), out)
        np.save(TMP + f"/{q.name}_{rb}_y.npy", out[:raw.shape[0]])
"""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(256).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for q in (QType.Q4_0, QType.Q8_0):
        for rb in (0, 1):
            np.save(tmp_path / f"{q.name}_{rb}.npy", make_weight(q, 16, 256, rng, random_bytes=bool(rb)))
    env = dict(os.environ, EDGEBOX_SIMD_GENERIC="1", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run(
        [sys.executable, "-c", code, root, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300, cwd=root
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for q in (QType.Q4_0, QType.Q8_0):
        for rb in (0, 1):
            raw = np.load(tmp_path / f"{q.name}_{rb}.npy")
            y_generic = np.load(tmp_path / f"{q.name}_{rb}_y.npy")
            np.testing.assert_array_equal(M.matvec(M.pack(raw, q), x), y_generic)


@pytest.mark.slow
def test_k_quants_without_vnni(tmp_path):
    """The AVX2 formulation of the K-quant and Q8_0 kernels (int16 sums, Q6_K's int16 offset and
    scales, Q8_0's sign trick) on a host whose default is VNNI: their cases of this file in a subprocess with
    EDGEBOX_SIMD_NO_VNNI=1 and its own numba cache (on a host without VNNI: the default path
    once more)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    code = r"""
import sys
import pytest
from edgebox.kernels import matmul_simd
assert not matmul_simd.HAS_VNNI
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", sys.argv[1], "-k",
    "(Q4_K or Q5_K or Q6_K or Q8_0) and not without_vnni or activation_quantization"]))
"""
    env = dict(os.environ, EDGEBOX_SIMD_NO_VNNI="1", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run(
        [sys.executable, "-c", code, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600, cwd=root
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


# the types with 512-bit batched kernels (``matmul_simd512``)
WIDE_TYPES = [QType.Q4_0, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K]


@pytest.mark.slow
def test_512_bit_kernels_give_the_bits_of_the_256_bit_ones(tmp_path):
    """The batched kernels that run two row groups in 512-bit lanes, against the 256-bit kernels
    (a subprocess with EDGEBOX_SIMD_NO_512=1 and its own numba cache, where the switched kernels
    go to a directory of their own): the same integer sums and float steps lane for lane, so
    equal bits, with an odd row group left to the 256-bit quad and ragged token quads. (On a
    host without AVX-512 both sides run the 256-bit kernels.)"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    code = r"""
import numpy as np, sys
ROOT, TMP = sys.argv[1], sys.argv[2]
sys.path.insert(0, ROOT)
from edgebox.kernels import matmul_simd512
assert not matmul_simd512.HAS_512
from edgebox.kernels import matmul as M
from edgebox.gguf.quant_types import QType
for name in sys.argv[3:]:
    for n_out in (40, 203):
        raw, X = np.load(f"{TMP}/{name}_{n_out}_w.npy"), np.load(f"{TMP}/{name}_{n_out}_x.npy")
        w = M.pack(raw, QType[name])
        for T in (2, 5, 7, 9, 64):
            np.save(f"{TMP}/{name}_{n_out}_{T}_y.npy", M.matmul(w, X[:T]))
"""
    rng = np.random.default_rng(512)
    for q in WIDE_TYPES:
        for n_out in (40, 203):  # 5 row groups (two pairs and one more), 26
            np.save(tmp_path / f"{q.name}_{n_out}_w.npy", make_weight(q, n_out, _n_in(q, 8), rng))
            np.save(tmp_path / f"{q.name}_{n_out}_x.npy", rng.standard_normal((64, _n_in(q, 8))).astype(np.float32))
    env = dict(os.environ, EDGEBOX_SIMD_NO_512="1", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run(
        [sys.executable, "-c", code, root, str(tmp_path), *(q.name for q in WIDE_TYPES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # the switched process kept its kernels apart: numba's cache key ignores the switch, so a warm
    # cache of the default kernels would otherwise be loaded in their place
    cached = list((tmp_path / "cache").rglob("*.nbi"))
    assert cached and all(tmp_path / "cache" / "simd-no_512" in p.parents for p in cached), cached[:3]
    for q in WIDE_TYPES:
        for n_out in (40, 203):
            w = M.pack(np.load(tmp_path / f"{q.name}_{n_out}_w.npy"), q)
            X = np.load(tmp_path / f"{q.name}_{n_out}_x.npy")
            for T in (2, 5, 7, 9, 64):
                np.testing.assert_array_equal(
                    M.matmul(w, X[:T]), np.load(tmp_path / f"{q.name}_{n_out}_{T}_y.npy"), f"{q.name} {n_out} T={T}"
                )
