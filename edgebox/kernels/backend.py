"""Kernel backends behind one small interface, chosen once at load.

``Linear`` is a weight matrix prepared for a backend (packed once, never per call): calling it
computes ``x @ W.T``. ``ops`` gives the other kernels of the forward pass. The ``ref`` backend is
the numpy reference (the spec); faster backends must agree with it within the tolerances their
tests state.
"""

from __future__ import annotations

import numpy as np

from ..gguf_loader import Matrix
from . import ref


class RefLinear:
    """x @ W.T through the numpy reference (dequantizes row chunks per call: slow, exact)."""

    def __init__(self, m: Matrix):
        self.matrix = m
        self.n_out, self.n_in = m.n_out, m.n_in
        self.nbytes = m.nbytes

    def __call__(self, x: np.ndarray) -> np.ndarray:  # [T, n_in] -> [T, n_out]
        return ref.matmul(np.ascontiguousarray(x, dtype=np.float32), self.matrix.data, self.matrix.qtype)


BACKENDS = ("ref",)


def make_linear(m: Matrix, backend: str = "ref"):
    if backend == "ref":
        return RefLinear(m)
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
