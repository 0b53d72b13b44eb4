"""Kernel backends behind one small interface, chosen once at load.

A backend gives ``linear(matrix)`` (a weight prepared once, never per call; calling it computes
``x @ W.T``) and the other ops of the forward pass. ``ref`` is the numpy reference (the spec);
``numba`` runs the JIT kernels, which their tests hold to the reference within stated tolerances.

Which kernel each op takes on the numba backend, and why:
- matmuls: ``kernels.matmul`` (weights repacked at load, int8 activations for quantized types);
- attention: ``kernels.attention`` reads the float16 cache in place (decode: one query row per
  head; prefill: tiled online softmax), so the cache is never converted per step;
- rms_norm, rope, SwiGLU: ``kernels.elementwise``;
- the embedding lookup stays on the reference: it dequantizes only the looked-up rows.
"""

from __future__ import annotations

import numpy as np

from ..gguf_file import release_view_pages
from ..gguf_loader import Matrix
from . import ref

BACKENDS = ("numba", "ref")
DEFAULT_BACKEND = "numba"


class RefLinear:
    """x @ W.T through the numpy reference (dequantizes row chunks per call: slow, exact)."""

    def __init__(self, m: Matrix):
        self.matrix = m
        self.n_out, self.n_in = m.n_out, m.n_in
        self.nbytes = m.nbytes

    def prepare(self) -> None:
        """Nothing to prepare: the reference reads the file's rows as they are."""

    def __call__(self, x: np.ndarray) -> np.ndarray:  # [T, n_in] -> [T, n_out]
        return ref.matmul(np.ascontiguousarray(x, dtype=np.float32), self.matrix.data, self.matrix.qtype)


class NumbaLinear:
    """x @ W.T through the numba kernels. The weight is repacked once, by ``prepare()`` (the
    engine's warm-up and the CLI call it with a progress line) or else at its first use, never at
    ``edgebox.load``: mapping a model stays instant and costs no memory until it runs."""

    def __init__(self, m: Matrix):
        from . import matmul

        self._matmul = matmul
        self.matrix = m
        self.n_out, self.n_in = m.n_out, m.n_in
        self.nbytes = m.nbytes
        self.packed = None

    def prepare(self) -> None:
        if self.packed is None:
            m = self.matrix
            self.packed = self._matmul.pack(m.data, m.qtype)
            if self.packed.path != "float":  # float weights are read in place: keep their pages
                release_view_pages(m.data)

    def __call__(self, x: np.ndarray) -> np.ndarray:  # [T, n_in] -> [T, n_out]
        if self.packed is None:
            self.prepare()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == 1:
            return self._matmul.matvec(self.packed, x[0])[None]
        return self._matmul.matmul(self.packed, x)


class RefOps:
    name = "ref"
    linear = RefLinear

    @staticmethod
    def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return ref.rms_norm(x, w, eps)

    @staticmethod
    def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float, scale: float, neox: bool) -> np.ndarray:
        return ref.rope(x, positions, n_rot, base, scale, neox)

    @staticmethod
    def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return ref.swiglu(gate, up)

    @staticmethod
    def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, positions: np.ndarray,
                  cache_pos: np.ndarray, kv_of_head: np.ndarray) -> np.ndarray:
        """q [T, Hc, hd] at ``positions`` over cache slots [0, start + T) ([S, Hkv_c, hd] f16) -> [T, Hc*hd]."""
        end = start + len(q)
        keys = k_cache[:end][:, kv_of_head].astype(np.float32)  # [S, Hc, hd] (the KV head of each query head)
        values = v_cache[:end][:, kv_of_head].astype(np.float32)  # [S, Hc, hd]
        return ref.attention(q, keys, values, positions, cache_pos[:end])


class NumbaOps:
    name = "numba"
    linear = NumbaLinear

    def __init__(self):
        from . import attention, elementwise

        self._att, self._ew = attention, elementwise

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return self._ew.rms_norm(np.ascontiguousarray(x), w, eps)

    def rope(self, x: np.ndarray, positions: np.ndarray, n_rot: int, base: float, scale: float, neox: bool) -> np.ndarray:
        return self._ew.rope_inplace(np.ascontiguousarray(x), positions, n_rot, base, scale, neox)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self._ew.swiglu(gate, up)

    def attention(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, positions: np.ndarray,
                  cache_pos: np.ndarray, kv_of_head: np.ndarray) -> np.ndarray:
        # the engine keeps cache slot == rope position (context shift included), which is
        # what the kernels' causal mask assumes
        if len(q) == 1:
            return self._att.attention_decode(q[0], k_cache, v_cache, start + 1, kv_of_head=kv_of_head)[None]
        return self._att.attention_prefill(q, k_cache, v_cache, start, kv_of_head=kv_of_head)


def get_ops(backend: str):
    if backend == "ref":
        return RefOps()
    if backend == "numba":
        return NumbaOps()
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
