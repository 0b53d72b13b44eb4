"""The table of quant types (``kernels.quants.registry``) drives every kernel: for each registered
type, its own dequantize against gguf-py, and pack + its kernels against the reference on a
ragged shape; the onnxruntime and one-call decode choices follow the table too."""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest

from edgebox.gguf import quant_types as qt
from edgebox.gguf.loader import Matrix
from edgebox.kernels import fused, matmul, ort, ref
from edgebox.kernels.linear import NumbaLinear
from edgebox.kernels.quants import registry
from tests.fixtures.quant_rows import make_weight

TYPES = list(registry.TYPES)
FUSABLE = [q for q, t in registry.TYPES.items() if t.kernels.fusable]


def _is_float(qtype) -> bool:
    return not qt.is_quantized(qtype)


def _n_in(qtype, blocks: int = 2) -> int:
    return blocks * max(32, qt.block_size(qtype))


def test_table_holds_exactly_the_loader_types():
    assert set(registry.TYPES) == set(qt.SUPPORTED)
    for qtype, traits in registry.TYPES.items():
        assert traits.qtype == qtype
        assert registry.get(qtype.value) is traits
    with pytest.raises(ValueError, match="IQ4_NL"):
        registry.get(qt.QType.IQ4_NL)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_type_dequantize_matches_gguf(qtype):
    """The type's own dequantize, on its blocks, bit for bit with gguf-py's."""
    rng = np.random.default_rng(int(qtype))
    raw = make_weight(qtype, 3, _n_in(qtype), rng, random_bytes=not _is_float(qtype))
    blocks = raw.reshape(-1, qt.type_size(qtype))
    ours = registry.get(qtype).dequantize(blocks).reshape(3, -1)
    theirs = np.asarray(gguf.quants.dequantize(raw, qtype), np.float32)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_type_pack_and_kernels_match_reference(qtype):
    """pack() takes the type's path from the table; its kernels agree with the reference on a
    ragged shape (13 rows: a partial 8-row group), one token and several."""
    rng = np.random.default_rng(100 + int(qtype))
    n_out, n_in = 13, _n_in(qtype)
    raw = make_weight(qtype, n_out, n_in, rng, random_bytes=not _is_float(qtype))
    w = matmul.pack(raw, qtype)
    assert w.path == registry.get(qtype).kernels.path
    X = rng.standard_normal((5, n_in)).astype(np.float32)
    want = ref.matmul(X, raw, qtype)
    tol = (1e-5 if _is_float(qtype) else 0.05) * np.abs(want).max()
    np.testing.assert_allclose(matmul.matmul(w, X), want, atol=tol, rtol=0)
    np.testing.assert_allclose(matmul.matvec(w, X[0]), want[0], atol=tol, rtol=0)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_ort_mapping_comes_from_the_table(qtype):
    mapping = registry.get(qtype).ort
    assert ort.supports(qtype) == (mapping is not None)
    assert ort.runs_well(qtype) == (mapping is not None and mapping.zero_points != "float")


@pytest.mark.parametrize("qtype", FUSABLE, ids=lambda q: q.name)
def test_fusable_types_run_in_the_one_call_block(qtype):
    """fused picks the type's kernel from the table: its one-token linear equals matvec."""
    rng = np.random.default_rng(200 + int(qtype))
    n_out, n_in = 13, _n_in(qtype)
    raw = make_weight(qtype, n_out, n_in, rng, random_bytes=True)
    lin = NumbaLinear(Matrix("w", qtype, n_out, n_in, raw))
    args = fused.weight_args(lin)
    assert args is not None
    x = rng.standard_normal(n_in).astype(np.float32)
    np.testing.assert_array_equal(fused._linear(args[0], args[1], x)[:n_out], matmul.matvec(lin.packed, x))


def test_float_weights_stay_out_of_the_one_call_block():
    raw = make_weight(qt.QType.F16, 8, 64, np.random.default_rng(0))
    assert fused.weight_args(NumbaLinear(Matrix("w", qt.QType.F16, 8, 64, raw))) is None
