"""Quantized matrix x vector / matrix x matrix on numba: the decode and prefill workhorse.

API::

    w = pack(raw, qtype)          # raw: uint8 [n_out, row_bytes] as in the GGUF (never modified)
    y = matvec(w, x)              # x float32 [n_in]    -> float32 [n_out]
    Y = matmul(w, X)              # X float32 [T, n_in] -> float32 [T, n_out]
    qx = quantize_activations(X)  # optional: quantize once, pass qx to several matvec/matmul

Which path each type takes, and why
-----------------------------------
* Q4_0, Q8_0, Q4_K, Q5_K, Q6_K (the types of Q4_0 / Q8_0 / Q4_K_M / Q5_K_M files): repacked at load into
  interleaved 8-row layouts (``matmul_pack``) and multiplied against int8 activations with the
  integer dot-product instructions (vpmaddubsw, vpmaddwd; ``matmul_kernels``).  Decode reads each
  weight byte once, and the arithmetic per byte is small enough that a core keeps up with its
  share of DRAM bandwidth.  Activations are quantized per 32 values to int8 with a float32
  scale (llama.cpp's q8_0; llama.cpp uses q8_K per 256 for K-quants, per 32 is finer).
* Q4_1, Q5_0, Q5_1, Q2_K, Q3_K: the same int8 machinery over a generic layout (4-bit
  plane + optional 2-bit plane of an unsigned code, exact float32 scale and offset per
  sub-block).  Correct and SIMD, but the repacked copy is larger than the file (1.2x for Q4_1
  up to 3x for Q2_K, see matmul_pack), so decode of those files is proportionally slower.
* F32, F16, BF16: no repacking (the mmap rows are read in place; a copy is made only if the
  rows are not contiguous), float32 activations, 8-wide FMA dot products per row.

Error vs. the exact float reference ``x @ dequantize(w).T``: the int8 paths carry the q8_0
rounding of the activations, ~0.6% rms of the output's spread, max 2-3% over thousands of
outputs (tests/test_kernels_matmul.py states the measured figures and the tolerances); against
a reference fed the same int8 activations they agree to float32 rounding (<= 7e-6).  The float
paths differ from the reference only by summation order.

Measured (tools/bench_matmul.py --T 8 64 --rounds 2, 2026-11-30; AMD EPYC Zen3 guest, 2 cores,
AVX2 but no AVX-512/VNNI; 7B FFN shapes 11008x4096 and 4096x11008; best over rounds, next to a
streaming-read probe taken in the same round; the machine's memory bandwidth drifts with its
neighbours, so read the ratio to the probe, not the absolute figure):

=====  ======================================  ============================================
type   matvec GB/s of file bytes               matmul GFLOP/s, T=8 / T=64 (2 thr; 1 thr)
=====  ======================================  ============================================
Q4_0   2 thr 34.0-36.4 (probe 35: 97-104%)     394-395 / 421-434;  199 / 213-218
       1 thr 22.8-27.5 (probe 33: 69-83%)
Q8_0   2 thr 36.1-39.8 (104-113%); 1 thr 27-29  243 / 257;  122 / 129
Q4_K   2 thr 34.0-35.7 (93-101%);  1 thr 24-30  380-381 / 397-407;  189-192 / 199-204
Q5_K   2 thr 35.0-36.2 (95-101%);  1 thr 24-28  314-323 / 344-345;  160-163 / 172-173
Q6_K   2 thr 36.8-37.5 (102-107%); 1 thr 25-28  260-263 / 273-278;  131-134 / 137-139
=====  ======================================  ============================================

Two threads read at or above the probe, which leaves prefetching to the hardware; the kernels'
software prefetch 4 KiB ahead is what pushes past it (see matmul_kernels, "Loop structure").
One core alone reads 23-30 GB/s, near its compute ceiling (Q4_0 on L3-resident weights: 25-33
GB/s).  For comparison on this machine, in paired runs (``edgebox bench --vs-llama-cpp``):
llama.cpp decodes the 7B Q4_0 file at up to 9.5 tok/s (~35 GB/s of weights) and reads 64-token
prompts at ~22 tok/s (~300 GFLOP/s); onnxruntime MatMulNBits (Q4_0 format, 1 thread) ~10 GB/s
and 60-90 GFLOP/s; the planes types ~6-8 GB/s of file bytes (1 thread).

Threads: the kernels are ``parallel=True`` over row groups and use numba's current thread count
(``numba.set_num_threads``, which is per calling thread), and release the GIL, so several host
threads (simulated chips) may call them at once; this module asks numba for the ``omp`` layer,
which allows that (on ``workqueue`` calls are serialized with a lock instead).  Fork-join kernels
stall badly when the cores are oversubscribed (a worker thread waiting for a CPU holds up the
whole call: measured 1.4 ms -> 7-11 ms for a 25 MB matvec while other jobs ran): when several
chips run concurrently on the 2 host cores, give each chip thread ``numba.set_num_threads(1)``
and let the chips be the parallelism.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numba
import numpy as np

from edgebox.gguf import quant_types as qt
from edgebox.kernels import matmul_kernels as K
from edgebox.kernels import matmul_pack as P
from edgebox.gguf.quant_types import QType

# Parallel kernels entered from several host threads at once need a thread-safe layer: omp (or
# tbb); workqueue aborts the process.  Unless NUMBA_THREADING_LAYER says otherwise, ask for omp
# (kernels/attention.py makes the same choice, so import order does not matter).  Should numba
# still end up on workqueue (or before the first parallel call reveals the layer), calls are
# serialized with a lock.
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    try:
        from numba.np.ufunc import omppool  # noqa: F401
        numba.config.THREADING_LAYER = "omp"
    except ImportError:
        pass

_WQ_LOCK = threading.Lock()

FAST_TYPES = (QType.Q4_0, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K)
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
SUPPORTED = FAST_TYPES + P.PLANES_TYPES + FLOAT_TYPES
_FLOAT_KIND = {QType.F32: 0, QType.F16: 1, QType.BF16: 2}


@dataclass(eq=False)
class PackedWeight:
    """A weight matrix in the layout its kernel reads (decided once, at load).

    qtype, n_out, n_in: the GGUF tensor's type and shape (y = x @ W.T, W [n_out, n_in]).
    path:   "q4_0" | "q8_0" | "q4_k" | "q5_k" | "q6_k" | "planes" | "float"
    arrays: the kernel's arrays (flat views of the repacked copy, or of the mmap for float types)
    nbytes: bytes a matvec reads (the figure bandwidths are computed from)
    """
    qtype: QType
    n_out: int
    n_in: int
    path: str
    arrays: dict[str, np.ndarray] = field(repr=False)
    nbytes: int = 0

    @property
    def kernel_args(self) -> tuple:
        """The weight's arguments to its path's kernels, in their order (before the activations)."""
        args = tuple(self.arrays[name] for name in _KERNELS[self.path][2])
        if self.path == "planes":  # and its flags: is there a crumb plane, are sub-blocks 16 wide
            args += (self.arrays["qh"].size > 0, self.qtype in (QType.Q2_K, QType.Q3_K))
        return args

    @property
    def file_bytes(self) -> int:
        """The size of the tensor in the GGUF file."""
        return self.n_out * qt.row_bytes(self.qtype, self.n_in)

    @property
    def n_out_padded(self) -> int:
        return self.n_out if self.path == "float" else P.n_groups(self.n_out) * P.ROWS


# Each packed path's kernels (one token, several tokens) and the arrays they take, in order.
_KERNELS = {
    "q4_0": (K.q4_0_mv, K.q4_0_mm, ("q", "d")),
    "q8_0": (K.q8_0_mv, K.q8_0_mm, ("q", "d")),
    "q4_k": (K.q4_k_mv, K.q4_k_mm, ("q", "sc", "m", "d", "dmin")),
    "q5_k": (K.q5_k_mv, K.q5_k_mm, ("q", "qb", "sc", "m", "d", "dmin")),
    "q6_k": (K.q6_k_mv, K.q6_k_mm, ("q", "qh", "sc", "d")),
    "planes": (K.planes_mv, K.planes_mm, ("q", "qh", "S", "M")),
}


@dataclass(eq=False)
class QuantizedActivations:
    """Activations quantized to q8_0 (per 32 values: float32 scale, int8 values), flattened.

    x:     the float32 [T, n_in] they came from (the float-weight path uses it directly)
    xq:    int8 [T*n_in]; xd: float32 [T*nb] (nb = n_in / 32)
    xs16:  int32 [T*2nb], 32 x the sums of xq per 16 values (Q6_K's offset, ready to subtract)
    xsd16: float32 [T*2nb] = xd * (sum per 16);  xsd32: float32 [T*nb] = xd * (sum per 32)
    """
    x: np.ndarray
    xq: np.ndarray
    xd: np.ndarray
    xs16: np.ndarray
    xsd16: np.ndarray
    xsd32: np.ndarray

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.xq, self.xd, self.xs16, self.xsd16, self.xsd32

    @property
    def T(self) -> int:
        return self.x.shape[0]

    @property
    def n_in(self) -> int:
        return self.x.shape[1]


def _as_bytes(raw: np.ndarray, qtype: QType) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise ValueError(f"pack: expected a 2-D weight [n_out, row_bytes], got shape {raw.shape}")
    if raw.dtype == np.uint8:
        return raw
    if not qt.is_quantized(qtype) and raw.dtype.itemsize == qt.type_size(qtype):
        if raw.strides[1] != raw.dtype.itemsize:
            raw = np.ascontiguousarray(raw)
        return raw.view(np.uint8)
    raise ValueError(f"pack: {qtype.name} rows must be uint8 bytes, got {raw.dtype}")


def pack(raw: np.ndarray, qtype) -> PackedWeight:
    """GGUF rows uint8 [n_out, row_bytes] (e.g. a view into the mmap; not modified) -> PackedWeight.

    Quantized types get one repacked copy (it replaces reading the mmap); float types are
    used in place when their rows are contiguous.  Never a dequantized float copy.
    """
    qtype = QType(qtype)
    if qtype not in SUPPORTED:
        raise ValueError(f"matmul: unsupported weight type {qtype.name}")
    raw = _as_bytes(raw, qtype)
    n_out, row_bytes = raw.shape
    bs, ts = qt.block_size(qtype), qt.type_size(qtype)
    if row_bytes % ts:
        raise ValueError(f"pack: {row_bytes} bytes per row is not a whole number of {qtype.name} blocks")
    n_in = row_bytes // ts * bs
    if qtype in FLOAT_TYPES:
        w = raw if raw.flags.c_contiguous else np.ascontiguousarray(raw)
        dt = np.float32 if qtype == QType.F32 else np.uint16
        arrays = {"w": w.view(dt).reshape(-1)}
        return PackedWeight(qtype, n_out, n_in, "float", arrays, int(w.nbytes))
    if n_in % 32:
        raise ValueError(f"pack: n_in={n_in} is not a multiple of 32")
    planes = P.repack(raw, qtype, n_out, n_in)
    path = qtype.name.lower() if qtype in FAST_TYPES else "planes"
    arrays = {k: v.reshape(-1) for k, v in planes.items()}
    return PackedWeight(qtype, n_out, n_in, path, arrays, int(sum(v.nbytes for v in arrays.values())))


def quantize_activations(x: np.ndarray) -> QuantizedActivations:
    """float32 [T, n_in] or [n_in] -> q8_0 activations (n_in a multiple of 32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    T, n_in = x.shape
    if n_in % 32:
        raise ValueError(f"quantize_activations: n_in={n_in} is not a multiple of 32")
    nb = n_in // 32
    xq = np.empty(T * n_in, np.int8)
    xd = np.empty(T * nb, np.float32)
    xs16 = np.empty(T * 2 * nb, np.int32)
    xsd16 = np.empty(T * 2 * nb, np.float32)
    xsd32 = np.empty(T * nb, np.float32)
    if T >= 32:
        _run(K.quantize_act_par, x.reshape(-1), n_in, xq, xd, xs16, xsd16, xsd32)
    else:
        K.quantize_act(x.reshape(-1), n_in, xq, xd, xs16, xsd16, xsd32)
    return QuantizedActivations(x, xq, xd, xs16, xsd16, xsd32)


def _run(kernel, *args):
    if _threading_layer() in ("workqueue", "unknown"):
        with _WQ_LOCK:
            return kernel(*args)
    return kernel(*args)


_LAYER: list[str] = []


def _threading_layer() -> str:
    if not _LAYER:
        try:
            _LAYER.append(numba.threading_layer())
        except ValueError:          # no parallel kernel has run yet
            return "unknown"
    return _LAYER[0]


def _matmul_into(w: PackedWeight, x, out: np.ndarray | None) -> np.ndarray:
    """Shared body of matvec / matmul: returns float32 [T, n_out]."""
    if isinstance(x, QuantizedActivations):
        qx = x
        xf = x.x
    else:
        xf = np.ascontiguousarray(x, dtype=np.float32)
        if xf.ndim == 1:
            xf = xf.reshape(1, -1)
        qx = None
    if xf.ndim != 2 or xf.shape[1] != w.n_in:
        raise ValueError(f"matmul: x has shape {xf.shape}, the weight has n_in={w.n_in}")
    T = xf.shape[0]
    a = w.arrays
    if w.path == "float":
        res = out if out is not None else np.empty((T, w.n_out), np.float32)
        _run(K.float_mm, a["w"], _FLOAT_KIND[w.qtype], w.n_out, w.n_in, xf.reshape(-1), T, res.reshape(-1))
        return res
    if qx is None:
        qx = quantize_activations(xf)
    ldo = w.n_out_padded
    padded = ldo != w.n_out
    res = np.empty((T, ldo), np.float32) if (out is None or padded) else out
    o = res.reshape(-1)
    mv, mm, _ = _KERNELS[w.path]
    if T == 1:
        _run(mv, *w.kernel_args, *qx.arrays(), o)
    else:
        _run(mm, *w.kernel_args, *qx.arrays(), T, o)
    if padded:
        if out is None:
            return np.ascontiguousarray(res[:, :w.n_out])
        out[...] = res[:, :w.n_out]
        return out
    return res


def matvec(w: PackedWeight, x, out: np.ndarray | None = None) -> np.ndarray:
    """x float32 [n_in] (or QuantizedActivations with T=1) -> float32 [n_out]."""
    if not isinstance(x, QuantizedActivations):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"matvec: x must be 1-D, got shape {x.shape}")
    elif x.T != 1:
        raise ValueError("matvec: quantized activations hold more than one token; use matmul")
    res = _matmul_into(w, x, None if out is None else out.reshape(1, -1))
    return res.reshape(-1)


def matmul(w: PackedWeight, x, out: np.ndarray | None = None) -> np.ndarray:
    """x float32 [T, n_in] (or QuantizedActivations) -> float32 [T, n_out] = x @ W.T."""
    if not isinstance(x, QuantizedActivations):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"matmul: x must be 2-D [T, n_in], got shape {x.shape}")
    return _matmul_into(w, x, out)
