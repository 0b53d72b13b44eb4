"""Quantized matmul through onnxruntime: the second kernel backend (matmuls only).

``OrtLinear(matrix)`` has ``NumbaLinear``'s interface: ``prepare()`` converts the GGUF rows once
into the weight inputs of a one-node ONNX graph and opens an ``InferenceSession`` on it (never
per call); calling it computes ``x @ W.T`` for x float32 [T, n_in].

What each type becomes, and whether it is exact, is written in its module (``kernels/quants/``,
its ``OrtMapping``): MatMulNBits (value = (code - zero_point) * scale, per ORT's op schema) for
the quantized types it can compute exactly, ``Gemm(transB=1)`` on a float32 copy for the float
types (ORT's MatMul takes float16 only with float16 activations); a type with no mapping raises
``UnsupportedOnBackend``. Float zero points (Q4_1, Q4_K) put ORT on its unpacked path (exact but
~100x slower): ``OrtLinear`` builds them, but ``runs_well`` is False and the backends keep them
on numba.

Activations: ``accuracy_level=4`` lets MatMulNBits quantize them to int8 per block, as numba does.

Memory: ORT copies the converted inputs (in-memory external initializers), so ``prepare()``
drops ours once the session exists; ``resident_bytes`` estimates what a prepared weight keeps
(the auto-tuner's memory rule), and a weight over ``SESSION_BYTES`` is split over several
sessions to bound the transient peak of ``prepare()``.

Threads: each session owns an intra-op pool of ``threads`` (default: numba's count) with
spinning off, so idle pools never hold the cores numba's fork-join needs; no arena (see
``_session``). Input layouts and measurements: docs/performance.md.
"""

from __future__ import annotations

import numba
import numpy as np

from edgebox.errors import EdgeboxError
from edgebox.gguf import quant_types as qt
from edgebox.gguf.file import release_view_pages
from edgebox.gguf.loader import Matrix
from edgebox.gguf.quant_types import QType
from edgebox.kernels import ref
from edgebox.kernels.quants import registry

# the types with an onnxruntime mapping (kernels/quants/<type>.py), from the one table
NBITS_TYPES = tuple(q for q, t in registry.TYPES.items() if t.ort is not None and t.ort.op == "MatMulNBits")
FLOAT_TYPES = tuple(q for q, t in registry.TYPES.items() if t.ort is not None and t.ort.op == "Gemm")
SUPPORTED = NBITS_TYPES + FLOAT_TYPES
FLOAT_ZERO_POINT_TYPES = tuple(q for q in NBITS_TYPES if registry.TYPES[q].ort.zero_points == "float")

# rows converted at once: bounds the temporaries of the repack (codes are one byte per value)
_CHUNK_VALUES = 1 << 22
# most file bytes of weight rows behind one session (see OrtLinear)
SESSION_BYTES = 64 * 2**20


class UnsupportedOnBackend(EdgeboxError, NotImplementedError):
    """A weight this backend cannot compute exactly; the auto-tuner keeps it on numba."""


def supports(qtype) -> bool:
    """Can OrtLinear compute this type exactly?"""
    return QType(qtype) in SUPPORTED


def runs_well(qtype) -> bool:
    """Does ORT run this type from a prepacked weight (what the backends require)?"""
    return supports(qtype) and QType(qtype) not in FLOAT_ZERO_POINT_TYPES


def default_threads() -> int:
    """What numba uses in the calling thread (numba's count is per thread)."""
    return numba.get_num_threads()


# ---------------------------------------------------------------------------------------------
# GGUF blocks -> MatMulNBits codes, scales, zero points: each type's ``OrtMapping.convert``, plus
# the float zero points computed here for the types whose values are scale * code + offset.

# 2^-100: a float32 normal so small that q * it vanishes next to any offset an f16 field can hold
_TINY = np.float32(2.0**-100)


def _float_zero_points(scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scale * q + offset  ->  (scale', zp) with scale' * (q - zp) == it up to float32 rounding.

    zp = -offset / scale is rounded once, so a value is off by at most ~1 ulp of |offset| (the
    rest is the rounding ORT's own dequantization does).  A zero scale (Q4_K sub-block scale 0,
    Q4_1 d = 0: every value equals the offset) gets scale' = 2^-100 and zp = -offset * 2^100,
    both exact powers of two, so (q - zp) rounds to -zp and the value is the offset exactly
    (scale 0 with offset 0 stays scale 0, zero point 0).
    """
    scale = scale.astype(np.float32)
    offset = offset.astype(np.float32)
    s = np.where((scale == 0) & (offset != 0), _TINY, scale)  # (0, 0) stays (0, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(s == 0, np.float32(0), -offset / s).astype(np.float32)
    return s.astype(np.float32), zp


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., block] -> MatMulNBits blob bytes [..., block*bits/8] (low bits first)."""
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _nbits_inputs(raw: np.ndarray, qtype: QType, n_out: int, n_in: int) -> tuple[dict, dict]:
    """GGUF rows uint8 [n_out, row_bytes] -> (node attributes, initializers) of MatMulNBits."""
    mapping = registry.TYPES[qtype].ort
    bits, bs = mapping.bits, mapping.block
    ts, gbs = qt.type_size(qtype), qt.block_size(qtype)
    kb = n_in // bs
    B = np.empty((n_out, kb, bs * bits // 8), np.uint8)  # [N, k_blocks, blob]
    S = np.empty((n_out, kb), np.float32)  # [N, k_blocks]
    Z = None
    rows = max(1, _CHUNK_VALUES // n_in)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        blocks = np.ascontiguousarray(raw[r0:r1]).reshape(r1 - r0, n_in // gbs, ts)
        codes, scale, zp = mapping.convert(blocks)
        if mapping.zero_points == "float":  # zp is the offset
            scale, zp = _float_zero_points(scale, zp)
        B[r0:r1] = _pack_codes(codes.reshape(r1 - r0, kb, bs), bits)
        S[r0:r1] = scale.reshape(r1 - r0, kb)
        if zp is not None:
            if Z is None:
                Z = np.empty((n_out, kb), zp.dtype)  # [N, k_blocks]
            Z[r0:r1] = zp.reshape(r1 - r0, kb)
    inits = {"B": B, "S": S}
    if Z is not None:
        inits["Z"] = Z
    return {"bits": bits, "block_size": bs}, inits


def _float_weight(raw: np.ndarray, qtype: QType, n_out: int, n_in: int) -> np.ndarray:
    """float32 [n_out, n_in] copy of a float weight (exact for F16 and BF16)."""
    W = np.empty((n_out, n_in), np.float32)
    rows = max(1, _CHUNK_VALUES // n_in)
    for r0 in range(0, n_out, rows):
        W[r0 : r0 + rows] = ref.dequantize(raw[r0 : r0 + rows], qtype)
    return W


def resident_bytes(qtype, n_out: int, n_in: int, accuracy_level: int = 4) -> int:
    """Estimated resident bytes of one prepared OrtLinear (ORT's packed copy + kept inputs).

    4/8-bit prepacked (int8 compute): packed codes + a float32 scale and a float32 block sum per
    block, plus ORT's copy of the float32 scales (and uint8 zero points), which it keeps; +5%
    (RSS, 11008 x 4096: Q4_0 38.8 MB measured, estimate 39.5; Q8_0 60.3 / 62.1; Q6_K 79 / 82).
    Float zero points (not prepacked): codes, scales and zero points as given (Q4_K 33.5 / 32.2).
    Float: the float32 copy.
    """
    qtype = QType(qtype)
    if qtype in FLOAT_TYPES:
        return 4 * n_out * n_in
    mapping = registry.TYPES[qtype].ort
    blocks = n_out * (n_in // mapping.block)
    codes = n_out * n_in * mapping.bits // 8
    zp = blocks if mapping.zero_points == "uint8" else 0
    if qtype in FLOAT_ZERO_POINT_TYPES:
        return codes + 8 * blocks
    per_block = 8 if accuracy_level == 4 else 4
    return int(1.05 * (codes + per_block * blocks + 4 * blocks + zp))


class OrtLinear:
    """x @ W.T through onnxruntime sessions holding W (prepared once, by ``prepare()`` or at the
    first call; see the module docstring for what each type becomes).  A weight larger than
    ``SESSION_BYTES`` of file bytes is split by rows over several sessions, built one after the
    other, which bounds the transient peak of ``prepare()`` (our converted inputs + ORT's copy of
    them + its prepacked copy: ~4x the chunk's file bytes) and costs one more ``run`` per chunk."""

    def __init__(self, m: Matrix, threads: int | None = None, accuracy_level: int = 4, spin: bool = False):
        qtype = QType(m.qtype)
        if qtype not in SUPPORTED:
            raise UnsupportedOnBackend(
                f"{m.name or 'weight'}: {qtype.name} has no exact onnxruntime mapping "
                f"(supported: {', '.join(q.name for q in SUPPORTED)}); use the numba backend"
            )
        self.matrix = m
        self.qtype = qtype
        self.n_out, self.n_in = m.n_out, m.n_in
        self.nbytes = m.nbytes
        self.threads = threads or default_threads()
        self.accuracy_level = accuracy_level
        self.spin = spin
        self.sessions: list | None = None  # [(first row, session)] once prepared

    @property
    def resident_bytes(self) -> int:
        return resident_bytes(self.qtype, self.n_out, self.n_in, self.accuracy_level)

    def prepare(self, release: bool = True) -> None:
        """Build the session(s); then drop the pages under the rows, as NumbaLinear does (ORT
        holds its own copy; a fused linear's stacked copy relies on it to leave RSS).
        ``release=False`` keeps them, for a caller that builds a second copy from the rows."""
        if self.sessions is not None:
            return
        raw = self.matrix.data  # [n_out, row_bytes]
        rows = max(1, SESSION_BYTES // max(1, raw.shape[1]))
        sessions = []
        for r0 in range(0, self.n_out, rows):
            sessions.append((r0, self._session(raw[r0 : r0 + rows])))
        self.sessions = sessions
        if release:
            release_view_pages(raw)

    def _session(self, raw: np.ndarray):
        n_out = raw.shape[0]
        if qt.is_quantized(self.qtype):
            attrs, inits = _nbits_inputs(raw, self.qtype, n_out, self.n_in)
            node = (
                "MatMulNBits",
                ["A", "B", "S"] + (["Z"] if "Z" in inits else []),
                dict(domain="com.microsoft", K=self.n_in, N=n_out, accuracy_level=self.accuracy_level, **attrs),
            )
        else:
            inits = {"W": _float_weight(raw, self.qtype, n_out, self.n_in)}
            node = ("Gemm", ["A", "W"], dict(transB=1))
        # ORT copies in-memory external initializers into its own buffers (then prepacks B and
        # frees its copy of it), so ``inits`` can go as soon as the session exists
        # (tests/unit/kernels/test_kernels_ort.py::test_session_owns_its_weights proves it)
        return _session(node, inits, self.n_in, n_out, self.threads, self.spin)

    def __call__(self, x: np.ndarray) -> np.ndarray:  # [T, n_in] -> [T, n_out]
        if self.sessions is None:
            self.prepare()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"OrtLinear: x has shape {x.shape}, the weight has n_in={self.n_in}")
        feed = {"A": x}
        if len(self.sessions) == 1:
            return self.sessions[0][1].run(None, feed)[0]
        return np.concatenate([s.run(None, feed)[0] for _, s in self.sessions], axis=1)


def _session(node, inits: dict[str, np.ndarray], n_in: int, n_out: int, threads: int, spin: bool):
    """A session over one node, its weight inputs given as in-memory external initializers."""
    # here, not at the top: heavy optional dependencies, loaded only when a session is built
    import onnxruntime as ort
    from onnx import TensorProto, helper

    op, inputs, attrs = node
    tensors = []
    for name, arr in inits.items():
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", f"edgebox-memory-{name}"), ("offset", "0"), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        tensors.append(t)
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["Y"], **attrs)],
        "edgebox_linear",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["T", n_in])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", n_out])],
        initializer=tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    # no arena: each session's arena would keep its largest call's buffers for good (a 128-row
    # prefill through a 7B FFN weight leaves ~6 MB in each of 64 sessions)
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.add_external_initializers(list(inits), [ort.OrtValue.ortvalue_from_numpy(a) for a in inits.values()])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
