"""edgebox.kernels.ort against the numpy reference (llama.cpp test-backend-ops habit).

Every type OrtLinear computes, on ragged shapes (n_in not a multiple of 256 where the type
allows it, odd n_out, n_out = 1, T = 1 and 5), from gguf-quantized normals and from random bytes
(which hit the extreme codes).  ``ref.matmul(x, raw, qtype)`` is the spec.  Errors are
normalized as in test_kernels_matmul: ``max|y - ref| / s``, ``s = sqrt(mean(x^2 @ (W^2).T))``.

* accuracy_level 0 (float activations, float accumulation): the repacked weight must give the
  reference up to summation order.  Tolerance 1e-5; measured <= 1.9e-6 (these cases and
  256-row ones).
* accuracy_level 4 (the default: MatMulNBits quantizes the activations to int8 per block, as
  numba's kernels do): tolerance 0.05 as for numba; measured 0.019-0.022 (numba: 0.020-0.029).
  Float zero points (Q4_1, Q4_K) run ORT's unpacked float path whatever the level, and float
  weights run Gemm: both held to 1e-5.
* The repack itself, bit for bit: ``OrtLinear(W)(I)`` with the identity as activations and
  accuracy_level 0 returns W^T exactly (each output is one product by 1.0 plus zeros), so it
  must equal ``ref.dequantize`` with ``array_equal`` for every exact mapping; the float-zero-
  point mappings are held to 1e-6 of the row's largest |value| (measured <= 1e-7).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgebox.errors import EdgeboxError
from edgebox.gguf import quant_types as qt
from edgebox.gguf.loader import Matrix
from edgebox.gguf.quant_types import QType
from edgebox.kernels import ort, ref
from edgebox.kernels.backend import NumbaLinear, NumbaOps, OrtOps, get_ops
from tests.fixtures.floats import assert_same_product
from tests.fixtures.quant_rows import make_weight  # the GGUF rows the numba kernels are tested on

EXACT = (QType.Q4_0, QType.Q8_0, QType.Q5_0, QType.Q6_K, QType.F32, QType.F16, QType.BF16)
FLOAT_ZP = (QType.Q4_1, QType.Q4_K)
TOL_FLOAT_ACT = 1e-5
TOL_INT8_ACT = 0.05
TOL_ZP_DEQUANT = 1e-6


def shapes(qtype):
    """(n_out, n_in): ragged wherever the block size allows."""
    if qtype in (QType.Q4_K, QType.Q6_K):
        return [(13, 512), (1, 256)]
    if qtype in ort.FLOAT_TYPES:
        return [(13, 72), (1, 40)]
    return [(13, 96), (1, 160), (7, 32)]


def dot_scale(x: np.ndarray, Wf: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x.astype(np.float64) ** 2) @ (Wf.astype(np.float64) ** 2).T)))


def nerr(y, r, scale) -> float:
    return float(np.abs(np.asarray(y, np.float64) - np.asarray(r, np.float64)).max() / (scale + 1e-30))


def linear(raw, qtype, **kw) -> ort.OrtLinear:
    """An OrtLinear over a copy of ``raw`` (prepare() drops the pages under its rows, which
    zeroes anonymous memory: the tests keep ``raw`` for the reference)."""
    n_out = raw.shape[0]
    n_in = raw.shape[1] // qt.type_size(qtype) * qt.block_size(qtype)
    return ort.OrtLinear(Matrix("w", qtype, n_out, n_in, raw.copy()), **kw)


@pytest.mark.parametrize("qtype", ort.SUPPORTED, ids=lambda q: q.name)
def test_matmul_vs_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    worst = {0: 0.0, 4: 0.0}
    for n_out, n_in in shapes(qtype):
        for rb in (False, True) if qtype not in ort.FLOAT_TYPES else (False,):
            raw = make_weight(qtype, n_out, n_in, rng, random_bytes=rb)
            Wf = ref.dequantize(raw, qtype)
            for level in (0, 4):
                lin = linear(raw, qtype, accuracy_level=level)
                assert (lin.n_out, lin.n_in, lin.nbytes) == (n_out, n_in, raw.nbytes)
                for T in (1, 5):
                    x = rng.standard_normal((T, n_in)).astype(np.float32)
                    y = lin(x)
                    assert y.shape == (T, n_out) and y.dtype == np.float32
                    e = nerr(y, ref.matmul(x, raw, qtype), dot_scale(x, Wf))
                    worst[level] = max(worst[level], e)
    int8 = qtype not in ort.FLOAT_TYPES + FLOAT_ZP
    assert worst[0] < TOL_FLOAT_ACT, worst
    assert worst[4] < (TOL_INT8_ACT if int8 else TOL_FLOAT_ACT), worst


@pytest.mark.parametrize("qtype", ort.SUPPORTED, ids=lambda q: q.name)
def test_repack_dequantizes_like_reference(qtype):
    """The identity through the session is the weight itself: proves the code/scale/zero-point
    layout against ORT's own kernel, not against our reading of its docs."""
    rng = np.random.default_rng(100 + int(qtype))
    n_out, n_in = shapes(qtype)[0]
    for rb in (False, True) if qtype not in ort.FLOAT_TYPES else (False,):
        raw = make_weight(qtype, n_out, n_in, rng, random_bytes=rb)
        W = ref.dequantize(raw, qtype)  # [n_out, n_in]
        D = linear(raw, qtype, accuracy_level=0)(np.eye(n_in, dtype=np.float32)).T
        if qtype in EXACT:
            assert np.array_equal(D, W), f"{qtype.name}: max diff {np.abs(D - W).max()}"
        else:
            err = np.abs(D - W).max(axis=1) / np.abs(W).max(axis=1)
            assert err.max() < TOL_ZP_DEQUANT, err.max()


def test_float_zero_point_with_zero_scale_is_exact():
    """Q4_K sub-blocks with scale 0 (all values = -dmin*m) and Q4_1 blocks with d = 0 (all = m):
    no finite zero point exists for scale 0, so they take scale 2^-100 (see _float_zero_points)."""
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (3, 144), dtype=np.uint8)
    raw[:, 0:2] = np.array([0.01], np.float16).view(np.uint8)
    raw[:, 2:4] = np.array([0.003], np.float16).view(np.uint8)
    raw[0, 4:16] = 0  # row 0: every scale and min 0
    raw[1, 4] &= 0xC0  # row 1, sub-block 0: scale 0 ...
    raw[1, 8] = 17  # ... min 17
    W = ref.dequantize(raw, QType.Q4_K)
    D = linear(raw, QType.Q4_K, accuracy_level=0)(np.eye(256, dtype=np.float32)).T
    assert np.array_equal(D[0], W[0]) and np.array_equal(D[1, :32], W[1, :32])
    assert W[1, 0] != 0
    raw = rng.integers(0, 256, (2, 20), dtype=np.uint8)
    raw[:, 0:2] = 0
    raw[:, 2:4] = np.array([-0.37], np.float16).view(np.uint8)
    W = ref.dequantize(raw, QType.Q4_1)
    assert np.array_equal(linear(raw, QType.Q4_1)(np.eye(32, dtype=np.float32)).T, W)


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q8_0, QType.Q6_K, QType.Q4_K, QType.F16], ids=lambda q: q.name)
def test_session_owns_its_weights(qtype):
    """prepare() drops its converted inputs right after building the session: ORT must have its
    own copy.  Overwrite the inputs after the session exists: the output must not change."""
    rng = np.random.default_rng(3)
    raw = make_weight(qtype, 13, 256, rng, random_bytes=qtype not in ort.FLOAT_TYPES)
    lin = linear(raw, qtype)
    if qt.is_quantized(qtype):
        attrs, inits = ort._nbits_inputs(raw, qtype, 13, 256)
        node = (
            "MatMulNBits",
            ["A", "B", "S"] + (["Z"] if "Z" in inits else []),
            dict(domain="com.microsoft", K=256, N=13, accuracy_level=4, **attrs),
        )
    else:
        inits = {"W": ort._float_weight(raw, qtype, 13, 256)}
        node = ("Gemm", ["A", "W"], dict(transB=1))
    sess = ort._session(node, inits, 256, 13, 1, False)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y0 = sess.run(None, {"A": x})[0]
    for a in inits.values():
        a.reshape(-1).view(np.uint8)[:] = 0x55
    np.testing.assert_array_equal(sess.run(None, {"A": x})[0], y0)
    np.testing.assert_array_equal(lin(x), y0)


def test_prepare_drops_the_rows_pages_like_numba():
    """prepare() releases the pages under the rows once ORT holds its copy (a fused linear's
    stacked copy leaves RSS that way, as with NumbaLinear); release=False keeps them."""
    rng = np.random.default_rng(6)
    raw = make_weight(QType.Q4_0, 512, 256, rng)  # 72 KiB: whole pages inside
    x = rng.standard_normal((2, 256)).astype(np.float32)
    kept = raw.copy()
    lin_kept = ort.OrtLinear(Matrix("w", QType.Q4_0, 512, 256, kept))
    lin_kept.prepare(release=False)
    np.testing.assert_array_equal(kept, raw)
    dropped = raw.copy()
    lin = ort.OrtLinear(Matrix("w", QType.Q4_0, 512, 256, dropped))
    lin.prepare()
    assert not np.array_equal(dropped, raw)  # anonymous pages read back as zeros
    np.testing.assert_array_equal(lin(x), lin_kept(x))


def test_large_weight_split_over_sessions(monkeypatch):
    rng = np.random.default_rng(4)
    raw = make_weight(QType.Q4_0, 45, 128, rng)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    whole = linear(raw, QType.Q4_0)
    monkeypatch.setattr(ort, "SESSION_BYTES", 10 * raw.shape[1])  # 10 rows per session
    split = linear(raw, QType.Q4_0)
    split.prepare()
    assert [r0 for r0, _ in split.sessions] == [0, 10, 20, 30, 40]
    # each session is a matrix of other width: MLAS may block its sums otherwise
    w = ref.dequantize(raw, QType.Q4_0)
    assert_same_product(split(x), whole(x), x, w)
    assert_same_product(split(x[:1]), whole(x[:1]), x[:1], w)


@pytest.mark.parametrize("qtype", [QType.Q5_K, QType.Q5_1, QType.Q2_K, QType.Q3_K], ids=lambda q: q.name)
def test_unsupported_types_raise_clearly(qtype):
    n_in = 256
    raw = np.zeros((4, qt.row_bytes(qtype, n_in)), np.uint8)
    with pytest.raises(ort.UnsupportedOnBackend, match=qtype.name) as e:
        ort.OrtLinear(Matrix("blk.0.ffn_down.weight", qtype, 4, n_in, raw))
    assert "blk.0.ffn_down.weight" in str(e.value)
    assert isinstance(e.value, NotImplementedError) and isinstance(e.value, EdgeboxError)
    assert not ort.supports(qtype)
    # the onnxruntime backend keeps such a weight on numba rather than failing the model
    assert isinstance(get_ops("onnxruntime").linear(Matrix("w", qtype, 4, n_in, raw)), NumbaLinear)


@pytest.mark.parametrize("qtype", FLOAT_ZP, ids=lambda q: q.name)
def test_backends_keep_unpacked_types_on_numba(qtype):
    """Q4_1 / Q4_K are exact through OrtLinear but run ORT's unpacked path (the whole weight
    dequantized to float32 on every call): the backends leave them on numba."""
    raw = make_weight(qtype, 4, 256, np.random.default_rng(8))
    m = Matrix("w", qtype, 4, 256, raw)
    assert ort.supports(qtype) and not ort.runs_well(qtype)
    for name in ("onnxruntime", "auto"):
        assert isinstance(get_ops(name, threads=1).linear(m), NumbaLinear)


def test_ort_refuses_8bit_float_zero_points():
    """Why Q5_K / Q5_1 are unsupported: their 5-bit codes need bits=8, and ORT's CPU kernel
    refuses 8-bit weights with float zero points (should that change, this test says so)."""
    inits = {"B": np.zeros((4, 1, 32), np.uint8), "S": np.ones((4, 1), np.float32), "Z": np.zeros((4, 1), np.float32)}
    node = ("MatMulNBits", ["A", "B", "S", "Z"], dict(domain="com.microsoft", K=32, N=4, bits=8, block_size=32))
    with pytest.raises(Exception, match="8-bit"):
        ort._session(node, inits, 32, 4, 1, False)


def test_ort_ops_keep_other_ops_on_numba():
    ops = get_ops("onnxruntime", threads=1)
    assert isinstance(ops, OrtOps) and ops.name == "onnxruntime" and ops.threads == 1
    for op in ("rms_norm", "rope", "swiglu_halves", "attention", "attention_decode_append"):
        assert getattr(type(ops), op) is getattr(NumbaOps, op)
    raw = make_weight(QType.Q4_0, 5, 64, np.random.default_rng(5))
    lin = ops.linear(Matrix("w", QType.Q4_0, 5, 64, raw))
    assert isinstance(lin, ort.OrtLinear) and lin.threads == 1
    with pytest.raises(ValueError, match="n_in=64"):
        lin(np.zeros((2, 63), np.float32))


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="numba, onnxruntime, auto, ref"):
        get_ops("tensorrt")
