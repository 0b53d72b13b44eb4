"""The one table of what each GGML tensor type is for the kernels (``traits.QuantTraits``).

``ref`` (dequantize), ``matmul`` (repack + kernels), ``fused`` (which weights go in the one-call
decode blocks) and ``ort`` (the onnxruntime mapping) all look a type up here, and the tests
iterate over it.  Adding a type: its module in this package, and one line below.  Block sizes
are gguf's (``edgebox.gguf.quant_types``); this table must hold exactly the types the loader
accepts (``quant_types.SUPPORTED``).
"""

from __future__ import annotations

from edgebox.gguf.quant_types import SUPPORTED, QType
from edgebox.kernels.quants import floats, q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0
from edgebox.kernels.quants.traits import Kernels, QuantTraits

TYPES: dict[QType, QuantTraits] = {
    t.qtype: t
    for t in (
        floats.F32,
        floats.F16,
        floats.BF16,
        q4_0.TRAITS,
        q4_1.TRAITS,
        q5_0.TRAITS,
        q5_1.TRAITS,
        q8_0.TRAITS,
        q2_k.TRAITS,
        q3_k.TRAITS,
        q4_k.TRAITS,
        q5_k.TRAITS,
        q6_k.TRAITS,
    )
}

assert set(TYPES) == set(SUPPORTED), "the kernels' table and the loader's accepted types differ"
# fused.py picks a weight's kernel from the numba types of its arrays: they must tell the paths apart
assert len({t.kernels.arg_types for t in TYPES.values() if t.kernels.fusable}) == len(
    {t.kernels.path for t in TYPES.values() if t.kernels.fusable}
)


def get(qtype) -> QuantTraits:
    """The traits of ``qtype``; ValueError for a type edgebox does not support."""
    try:
        return TYPES[QType(qtype)]
    except (KeyError, ValueError):
        name = getattr(qtype, "name", qtype)
        raise ValueError(f"unsupported tensor type {name}") from None


def fusable_paths() -> dict[tuple[str, ...], Kernels]:
    """arg_types -> kernels of every path the one-call decode blocks can run (one per path)."""
    return {t.kernels.arg_types: t.kernels for t in TYPES.values() if t.kernels.fusable}
