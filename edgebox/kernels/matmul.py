"""Quantized matrix x vector / matrix x matrix on numba: the decode and prefill workhorse.

API::

    w = pack(raw, qtype)          # raw: uint8 [n_out, row_bytes] as in the GGUF (never modified)
    y = matvec(w, x)              # x float32 [n_in]    -> float32 [n_out]
    Y = matmul(w, X)              # X float32 [T, n_in] -> float32 [T, n_out]
    qx = quantize_activations(X)  # optional: quantize once, pass qx to several matvec/matmul

Each type's layout and kernels are its module's (``kernels/quants/``, found through
``quants.registry``): quantized weights are repacked once, at load, into 8-row interleaved
layouts and multiplied against activations quantized per 32 values to int8 (llama.cpp's q8_0),
so decode reads each weight byte once and keeps up with DRAM; float weights are read in place
with float32 activations.  Error vs ``x @ dequantize(w).T``: the q8_0 rounding of the
activations, ~0.6% rms of the output's spread (tests/unit/kernels/test_kernels_matmul.py states
the tolerances); float paths differ only by summation order.

Threads: the kernels are ``parallel=True`` over row groups with numba's per-thread thread count,
and release the GIL, so several host threads (simulated chips) may call them at once; that
needs numba's ``omp`` layer (``workqueue`` calls are serialized with a lock).  Fork-join kernels
stall when the cores are oversubscribed: chips running concurrently on few cores should each
take ``numba.set_num_threads(1)`` and be the parallelism themselves.  Measurements:
docs/performance.md.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numba
import numpy as np

from edgebox.gguf import quant_types as qt
from edgebox.gguf.quant_types import QType
from edgebox.kernels import matmul_kernels as K
from edgebox.kernels import matmul_pack as P
from edgebox.kernels.quants import registry
from edgebox.kernels.quants.traits import Kernels

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
    def kernels(self) -> Kernels:
        return registry.TYPES[self.qtype].kernels

    @property
    def kernel_args(self) -> tuple:
        """The weight's arguments to its path's kernels, in their order (before the activations):
        its arrays, then its type's constant flags."""
        k = self.kernels
        return tuple(self.arrays[name] for name in k.arrays) + k.flags

    @property
    def file_bytes(self) -> int:
        """The size of the tensor in the GGUF file."""
        return self.n_out * qt.row_bytes(self.qtype, self.n_in)

    @property
    def n_out_padded(self) -> int:
        return self.n_out if self.path == "float" else P.n_groups(self.n_out) * P.ROWS


@dataclass(eq=False)
class QuantizedActivations:
    """Activations quantized to q8_0 (per 32 values: float32 scale, int8 values), flattened.

    x:     the float32 [T, n_in] they came from (the float-weight path uses it directly)
    xq:    int8 [T*n_in]; xd: float32 [T*nb] (nb = n_in / 32)
    xs16:  int32 [T*2nb], Q6_K's offset per 16 values: with VNNI -32 x the sum of xq; else two
           int16, 32 x the sum over the 8 values a ``maddubs`` dword's low half sees
           (0,1,4,5,8,9,12,13) and over the others (``matmul_kernels``)
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


def _rows(raw: np.ndarray, qtype: QType, kernels: Kernels) -> tuple[np.ndarray, int]:
    """GGUF rows as uint8 [n_out, row_bytes] and their n_in; ValueError naming what is wrong."""
    raw = _as_bytes(raw, qtype)
    row_bytes, ts = raw.shape[1], qt.type_size(qtype)
    if row_bytes % ts:
        raise ValueError(f"pack: {row_bytes} bytes per row is not a whole number of {qtype.name} blocks")
    n_in = row_bytes // ts * qt.block_size(qtype)
    if kernels.repack is not None and n_in % 32:
        raise ValueError(f"pack: n_in={n_in} is not a multiple of 32")
    return raw, n_in


def pack(raw: np.ndarray, qtype, trim: Trim | None = None) -> PackedWeight:
    """GGUF rows uint8 [n_out, row_bytes] (e.g. a view into the mmap; not modified) -> PackedWeight.

    Quantized types get one repacked copy (it replaces reading the mmap); float types are
    used in place when their rows are contiguous.  Never a dequantized float copy.  ``trim``
    (``Trim``) is handed each run of contiguous rows once it is repacked.
    """
    qtype = QType(qtype)
    if qtype not in registry.TYPES:
        raise ValueError(f"matmul: unsupported weight type {qtype.name}")
    kernels = registry.TYPES[qtype].kernels
    raw, n_in = _rows(raw, qtype, kernels)
    n_out = raw.shape[0]
    if kernels.repack is None:  # float types: the rows are read in place
        w = raw if raw.flags.c_contiguous else np.ascontiguousarray(raw)
        dt = np.float32 if qtype == QType.F32 else np.uint16
        arrays = {"w": w.view(dt).reshape(-1)}
        return PackedWeight(qtype, n_out, n_in, kernels.path, arrays, int(w.nbytes))
    planes = _repack(kernels, raw, n_in, trim=trim)
    arrays = {k: v.reshape(-1) for k, v in planes.items()}
    return PackedWeight(qtype, n_out, n_in, kernels.path, arrays, int(sum(v.nbytes for v in arrays.values())))


STAGE_BYTES = 4 << 20  # a strided shard is copied to contiguous rows through this much memory at a time
TRIM_BYTES = 16 << 20  # contiguous rows are repacked this many at a time when they are to be trimmed
_stage = threading.local()
Trim = Callable[[np.ndarray], None]  # rows -> None, called once they are repacked: their pages may go


def _repack(
    kernels: Kernels, raw: np.ndarray, n_in: int, out: dict | None = None, trim: Trim | None = None
) -> dict[str, np.ndarray]:
    """``kernels.repack`` of the rows ``raw``, run by run.  A strided shard (a column slice of the
    mmap: the row-parallel weights on several chips) goes through a small contiguous buffer reused
    by the thread: a shard-sized copy per weight was ~1 GB of fresh pages on a 4-chip 7B start,
    each one zeroed by the kernel (docs/performance.md, "Start-up, fifth look").  Contiguous rows
    with a ``trim`` go TRIM_BYTES at a time, each run trimmed once repacked: a first-ever start
    then never maps a whole weight's file pages beside its packed copy (the 7B Q8_0 lm head: 445
    MB).  Runs are whole group pairs, so the padding stays at the end, where one call puts it."""
    n_out, row_bytes = raw.shape
    if kernels.planes is None:  # a type without ``planes`` takes no ``out=`` (``Kernels``), and copies strided rows itself
        return kernels.repack(raw, n_out, n_in)
    strided = not raw.flags.c_contiguous
    if not strided and (trim is None or raw.nbytes <= TRIM_BYTES):
        planes = kernels.repack(raw, n_out, n_in, out=out)
        if trim is not None:
            trim(raw)
        return planes
    planes = kernels.planes(n_out, n_in) if out is None else out
    step = max(1, (STAGE_BYTES if strided else TRIM_BYTES) // (2 * P.ROWS * row_bytes)) * 2 * P.ROWS
    if strided:
        buf = getattr(_stage, "buf", None)
        if buf is None or buf.size < step * row_bytes:
            buf = _stage.buf = np.empty(step * row_bytes, np.uint8)
    for r0 in range(0, n_out, step):
        part = raw[r0 : r0 + step]
        if strided:
            rows = buf[: part.size].reshape(part.shape)
            np.copyto(rows, part)
        else:
            rows = part
        g0 = r0 // P.ROWS
        kernels.repack(rows, len(part), n_in, out={k: v[g0 : g0 + P.n_groups(len(part))] for k, v in planes.items()})
        if trim is not None and not strided:
            trim(part)
    return planes


def pack_rows(blocks: Sequence[np.ndarray], qtype, trim: Trim | None = None) -> PackedWeight:
    """Several GGUF row blocks of one type stacked (a chip's q/k/v or gate/up rows) -> one
    PackedWeight, as ``pack(np.concatenate(blocks))`` but with no stacked copy: each block is
    repacked straight into its row groups of the weight's arrays when the type allocates its
    own (``Kernels.planes``) and every block but the last fills whole group pairs (the padding
    stays at the end, where one pack puts it).  A cold 7B start thus skips a 2.3 GB copy.
    ``trim``: as ``pack``'s, for the blocks' rows."""
    qtype = QType(qtype)
    if len(blocks) == 1:
        return pack(blocks[0], qtype, trim)
    kernels = registry.TYPES[qtype].kernels if qtype in registry.TYPES else None
    if kernels is None or kernels.planes is None or any(len(b) % (2 * P.ROWS) for b in blocks[:-1]):
        return pack(np.concatenate(blocks), qtype)  # (a stacked copy: the blocks' pages go with the caller's release)
    rows = [_rows(b, qtype, kernels) for b in blocks]
    n_in = rows[0][1]
    if any(n != n_in for _, n in rows):
        raise ValueError(f"pack: row blocks of {sorted({n for _, n in rows})} values cannot be stacked")
    n_out = sum(len(r) for r, _ in rows)
    planes = kernels.planes(n_out, n_in)
    g = 0
    for r, _ in rows:
        G = P.n_groups(len(r))
        _repack(kernels, r, n_in, out={k: v[g : g + G] for k, v in planes.items()}, trim=trim)
        g += G
    arrays = {k: v.reshape(-1) for k, v in planes.items()}
    return PackedWeight(qtype, n_out, n_in, kernels.path, arrays, int(sum(v.nbytes for v in arrays.values())))


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
        except ValueError:  # no parallel kernel has run yet
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
    kernels = w.kernels
    if w.path == "float":
        res = out if out is not None else np.empty((T, w.n_out), np.float32)
        _run(kernels.mm, *w.kernel_args, w.n_out, w.n_in, xf.reshape(-1), T, res.reshape(-1))
        return res
    if qx is None:
        qx = quantize_activations(xf)
    ldo = w.n_out_padded
    padded = ldo != w.n_out
    res = np.empty((T, ldo), np.float32) if (out is None or padded) else out
    o = res.reshape(-1)
    if T == 1:
        _run(kernels.mv, *w.kernel_args, *qx.arrays(), o)
    else:
        _run(kernels.mm, *w.kernel_args, *qx.arrays(), T, o)
    if padded:
        if out is None:
            return np.ascontiguousarray(res[:, : w.n_out])
        out[...] = res[:, : w.n_out]
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
