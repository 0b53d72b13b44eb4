"""The one table of tensor types edgebox accepts.

Block sizes come from gguf-py's ``GGML_QUANT_SIZES`` so the reader, the kernels and the tests
all agree with the file format; names are the GGML names (``Q4_K``, not "q4k").
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

QType = GGMLQuantizationType

# The types the loader accepts for weights; everything else is refused at load with the
# tensor's name.  Order: float types, legacy 32-value blocks, K-quants (256-value super-blocks).
SUPPORTED: tuple[QType, ...] = (
    QType.F32,
    QType.F16,
    QType.BF16,
    QType.Q4_0,
    QType.Q4_1,
    QType.Q5_0,
    QType.Q5_1,
    QType.Q8_0,
    QType.Q2_K,
    QType.Q3_K,
    QType.Q4_K,
    QType.Q5_K,
    QType.Q6_K,
)


def block_size(qtype: QType) -> int:
    """Values per block (1 for float types, 32 for legacy quants, 256 for K-quants)."""
    return GGML_QUANT_SIZES[qtype][0]


def type_size(qtype: QType) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[qtype][1]


def row_bytes(qtype: QType, n_values: int) -> int:
    """Bytes taken by ``n_values`` consecutive values (must be a whole number of blocks)."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    if n_values % bs:
        raise ValueError(f"{n_values} values is not a whole number of {qtype.name} blocks of {bs}")
    return n_values // bs * ts


def is_quantized(qtype: QType) -> bool:
    return block_size(qtype) > 1
