"""Kernel backends behind one small interface, chosen once at load.

A backend gives ``linear(matrix)`` (a weight prepared once, never per call; calling it computes
``x @ W.T``) and the other ops of the forward pass. ``ref`` is the numpy reference (the spec);
``numba`` runs the JIT kernels, which their tests hold to the reference within stated tolerances.
``onnxruntime`` runs the matmuls through onnxruntime (``kernels.ort``: MatMulNBits for the
quantized types it can compute exactly, Gemm for float weights) and keeps every other op (norm,
rope, SwiGLU, attention) on numba: those are small next to the matmuls and ORT would cost a
session and a copy per call for them.  A weight type ORT has no exact mapping for, or runs only
unpacked (float zero points: Q4_1, Q4_K), stays on numba there too.  ``auto`` picks numba or
onnxruntime per weight shape and batch bucket from timings taken on this CPU and cached on
disk, under a memory rule (``kernels.autotune``); its non-matmul ops are numba's as well.

Which kernel each op takes on the numba backend, and why:
- matmuls: ``kernels.matmul`` (weights repacked at load, int8 activations for quantized types);
- attention: ``kernels.attention`` reads the float16 or q8_0/q4_0 cache in place (decode: one
  query row per head; prefill: tiled online softmax), so the cache is never converted per step;
- rms_norm, rope, SwiGLU: ``kernels.elementwise``;
- the embedding lookup stays on the reference: it dequantizes only the looked-up rows.
The weight handles themselves (``RefLinear``, ``NumbaLinear``, ``OrtLinear``, ``AutoLinear``)
live in ``kernels.linear`` and are importable from here.
"""

from __future__ import annotations

import threading
import time

import numba
import numpy as np

from edgebox.gguf.loader import Matrix
from edgebox.kernels import attention, autotune, elementwise, fused, fused_batch, kv_quant, ort, ref
from edgebox.kernels.linear import AutoLinear, NumbaLinear, OrtLinear, RefLinear

# the weight handles live in kernels.linear; importable from here as before
__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "PARALLEL_DECODE_CONTEXT",
    "get_ops",
    "RefOps",
    "NumbaOps",
    "OrtOps",
    "AutoOps",
    "RefLinear",
    "NumbaLinear",
    "OrtLinear",
    "AutoLinear",
]

BACKENDS = ("numba", "onnxruntime", "auto", "ref")
PARALLEL_DECODE_CONTEXT = 512  # cached tokens from which decode attention runs on every core
DEFAULT_BACKEND = "numba"


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
    def swiglu_halves(gate_up: np.ndarray) -> np.ndarray:
        """[T, 2F]: each row its gate, then its up -> [T, F]."""
        F = gate_up.shape[1] // 2
        return ref.swiglu(gate_up[:, :F], gate_up[:, F:])

    @staticmethod
    def attention(
        q: np.ndarray,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        start: int,
        positions: np.ndarray,
        cache_pos: np.ndarray,
        kv_of_head: np.ndarray,
    ) -> np.ndarray:
        """q [T, Hc, hd] at ``positions`` over cache slots [0, start + T) ([S, Hkv_c, hd] f16, or
        q8_0/q4_0 blocks [S, Hkv_c, hd/32]) -> [T, Hc*hd]. A quantized K sees the query rounded
        through q8_0, as llama.cpp's dot product (``kv_quant.round_query``)."""
        end = start + len(q)
        keys = kv_quant.dequantize(k_cache[:end][:, kv_of_head])  # [S, Hc, hd] (the KV head of each query head)
        values = kv_quant.dequantize(v_cache[:end][:, kv_of_head])  # [S, Hc, hd]
        q = kv_quant.round_query(q, "f16" if k_cache.dtype == np.float16 else "q8_0")
        return ref.attention(q, keys, values, positions, cache_pos[:end])

    @staticmethod
    def kv_lists(k_caches: list[np.ndarray], v_caches: list[np.ndarray]) -> tuple:
        return list(k_caches), list(v_caches)

    @staticmethod
    def hadamard(x: np.ndarray, n: int) -> np.ndarray:
        """x [..., hd] with each run of n values turned by the Walsh-Hadamard matrix (kv_quant.rotate)."""
        return kv_quant.rotate(x, n)

    @staticmethod
    def decode_attention_block(*args) -> None:
        return None  # the reference has no one-call path: the model takes the step by step one

    @staticmethod
    def decode_ffn_block(*args) -> None:
        return None

    @staticmethod
    def decode_attention_args(*args) -> None:
        return None  # nor one-call layers

    @staticmethod
    def decode_ffn_args(*args) -> None:
        return None

    @classmethod
    def attention_decode_append(
        cls, q: np.ndarray, k: np.ndarray, v: np.ndarray, caches: tuple, layer: int, starts: np.ndarray, kv_of_head: np.ndarray
    ) -> np.ndarray:
        """One new token per sequence: q [B, Hc, hd], k, v [B, Hkv_c, hd]; sequence b's key and
        value go to slot starts[b] of its cache (caches: ``kv_lists`` of the B caches), then it
        attends over slots 0..starts[b] -> [B, Hc*hd]."""
        out = np.empty((len(q), q.shape[1] * q.shape[2]), np.float32)
        for b, (kc, vc) in enumerate(zip(*caches)):  # caches: (k caches, v caches)
            s = int(starts[b])
            kc[layer, s] = kv_quant.quantize(k[b], kv_quant.name_of(kc))
            vc[layer, s] = kv_quant.quantize(v[b], kv_quant.name_of(vc))
            out[b] = cls.attention(q[b : b + 1], kc[layer], vc[layer], s, np.array([s]), np.arange(s + 1), kv_of_head)[0]
        return out


class NumbaOps:
    name = "numba"
    linear = NumbaLinear

    def __init__(self):
        self._att, self._ew = attention, elementwise
        self._rope_tables = (None, None)  # (key, (cos, sin)) of the last positions roped

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return self._ew.rms_norm(np.ascontiguousarray(x), w, eps)

    def rope(self, x: np.ndarray, positions: np.ndarray, n_rot: int, base: float, scale: float, neox: bool) -> np.ndarray:
        return self._ew.apply_rope(np.ascontiguousarray(x), *self._tables(positions, n_rot, base, scale), neox)

    def _tables(self, positions, n_rot: int, base: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
        # every layer (and every chip) of a step ropes the same positions: the tables are made
        # once per step, not once per layer (a tuple swap, so chip threads may share it)
        key = (np.asarray(positions).tobytes(), n_rot, base, scale)
        last_key, tables = self._rope_tables
        if key != last_key:
            tables = self._ew.rope_tables(positions, n_rot, base, scale)
            self._rope_tables = (key, tables)
        return tables

    def decode_attention_block(
        self,
        lw,
        h: np.ndarray,
        position: int,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        layer: int,
        start: int,
        n_heads: int,
        n_kv: int,
        kv_of_head: np.ndarray,
        a,
        kv_rot: tuple[int, int] = (0, 0),
    ) -> np.ndarray | None:
        """One token's attention block on one chip in one compiled call (``kernels.fused``):
        h [D] -> partial sum [D], its key and value appended at slot ``start`` of the chip's
        caches [n_layer, n_ctx, Hkv_c, hd]; None when the chip's weights cannot go in one call.
        kv_rot: the Hadamard rotations of a quantized K and V (``kv_quant.rotation_k/_v``)."""
        if "attn" not in lw.decode_cache:
            lw.decode_cache["attn"] = fused.attention_args(lw.wqkv, lw.bqkv, lw.wo)
            lw.decode_cache["groups"] = self._att.head_groups(n_heads, n_kv, kv_of_head)
        w = lw.decode_cache["attn"]
        if w is None:
            return None
        cos, sin = self.rope_tables(np.array([position], np.int32), a)
        order, hstart = lw.decode_cache["groups"]
        kc, tk, _ = self._att.cache_view(k_cache, 4, "decode_attention_block", "k")
        vc, tv, _ = self._att.cache_view(v_cache, 4, "decode_attention_block", "v")
        return fused.attention_decode_block(
            h,
            w[0],
            w[1],
            w[2],
            w[3],
            a.n_embd,
            n_heads,
            n_kv,
            a.head_dim,
            cos,
            sin,
            a.rope_neox,
            kc,
            vc,
            tk,
            tv,
            kv_rot[0],
            kv_rot[1],
            layer,
            start,
            order,
            hstart,
            self.decode_attention_threads(start + 1),
        )

    def decode_attention_threads(self, n_cached: int) -> int:
        """numba threads a decode step's attention over ``n_cached`` keys (of all its sequences) is spread over:
        this thread's count over a long context (7B, one chip: 1.00x at 256 cached tokens, 1.05x
        per step at 1024 and 2048), else 1."""
        if n_cached >= PARALLEL_DECODE_CONTEXT and self._att.threading_layer_is_threadsafe():
            return numba.get_num_threads()
        return 1

    def prefill_attention_threads(self) -> int:
        """numba threads a prompt chunk's attention is spread over (by KV head): this thread's
        count (``attention_prefill`` runs serially where the threading layer is not thread-safe).
        On one thread it took 13 % of a 512-token prompt on the 7B while the other core waited
        (docs/performance.md)."""
        return numba.get_num_threads()

    def hadamard(self, x: np.ndarray, n: int) -> np.ndarray:
        """kv_quant.rotate by the fast transform: a new array."""
        y = np.array(x, np.float32, order="C")
        kv_quant.fwht_rows(y.reshape(-1, y.shape[-1]), n)
        return y

    def decode_ffn_block(self, lw, h: np.ndarray, n_ffn: int, n_embd: int) -> np.ndarray | None:
        """One token's FFN rows on one chip in one compiled call: h [D] -> partial sum [D]."""
        if "ffn" not in lw.decode_cache:
            lw.decode_cache["ffn"] = fused.ffn_args(lw.w_gate_up, lw.w_down)
        w = lw.decode_cache["ffn"]
        if w is None:
            return None
        return fused.ffn_decode_block(h, w[0], w[1], n_ffn, w[2], w[3], n_embd)

    def swiglu_halves(self, gate_up: np.ndarray) -> np.ndarray:
        return self._ew.swiglu_halves(gate_up)

    def decode_attention_args(self, lw, n_heads: int, n_kv: int, kv_of_head: np.ndarray, kv_rot: tuple[int, int]):
        """A chip's attention block of layer ``lw`` as ``fused.decode_layer`` takes it (None: it cannot)."""
        return fused.decode_attention_args(lw, n_heads, n_kv, kv_rot, self._att.head_groups(n_heads, n_kv, kv_of_head))

    def decode_ffn_args(self, lw, n_ffn: int):
        """A chip's FFN block of layer ``lw`` as ``fused.decode_layer`` takes it (None: it cannot)."""
        return fused.decode_ffn_args(lw, n_ffn)

    def rope_tables(self, positions: np.ndarray, a) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin) of ``positions`` under the model's rope (shared by every layer of a step)."""
        return self._tables(positions, a.n_rot, a.rope_freq_base, a.rope_freq_scale)

    def attention(
        self,
        q: np.ndarray,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        start: int,
        positions: np.ndarray,
        cache_pos: np.ndarray,
        kv_of_head: np.ndarray,
    ) -> np.ndarray:
        # the engine keeps cache slot == rope position (context shift included), which is
        # what the kernels' causal mask assumes
        if len(q) == 1:
            return self._att.attention_decode(
                q[0], k_cache, v_cache, start + 1, kv_of_head=kv_of_head, parallel=self.decode_attention_threads(start + 1) > 1
            )[None]
        return self._att.attention_prefill(
            q, k_cache, v_cache, start, kv_of_head=kv_of_head, parallel=self.prefill_attention_threads() > 1
        )

    def kv_lists(self, k_caches: list[np.ndarray], v_caches: list[np.ndarray]) -> tuple:
        return self._att.kv_lists(k_caches, v_caches)

    def attention_decode_append(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, caches: tuple, layer: int, starts: np.ndarray, kv_of_head: np.ndarray
    ) -> np.ndarray:
        # spread the sequences over the cores once their caches add up to a long context (the
        # same rule as one sequence's)
        return self._att.attention_decode_append(
            q,
            k,
            v,
            caches,
            layer,
            starts,
            kv_of_head=kv_of_head,
            parallel=self.decode_attention_threads(int(starts.sum()) + len(starts)) > 1,
        )

    def decode_attention_batch(
        self,
        lw,
        h: np.ndarray,
        positions: np.ndarray,
        caches,
        layer: int,
        starts: np.ndarray,
        n_heads: int,
        n_kv: int,
        kv_of_head: np.ndarray,
        a,
        kv_rot: tuple[int, int] = (0, 0),
    ) -> np.ndarray | None:
        """The attention block of B one-token sequences on one chip in one compiled call
        (``kernels.fused_batch``): h [B, D] at ``positions`` [B] -> partial sums [B, D], their
        keys and values appended at slots ``starts`` [B] of their caches (``kv_lists``); None
        when the chip's weights cannot go in one call."""
        key = ("attn_batch", len(h))  # an AutoLinear's weights depend on the batch bucket
        if key not in lw.decode_cache:
            lw.decode_cache[key] = fused_batch.attention_args(lw.wqkv, lw.bqkv, lw.wo, len(h))
        w = lw.decode_cache[key]
        if w is None:
            return None
        cos, sin = self.rope_tables(positions, a)
        order, hstart = self._att.head_groups(n_heads, n_kv, kv_of_head)
        parallel = self.decode_attention_threads(int(starts.sum()) + len(starts)) > 1
        return fused_batch.attention_decode_batch_block(
            np.ascontiguousarray(h, np.float32),
            w[0],
            w[1],
            w[2],
            a.n_embd,
            n_heads,
            n_kv,
            a.head_dim,
            cos,
            sin,
            a.rope_neox,
            caches.k,
            caches.v,
            caches.tk,
            caches.tv,
            kv_rot[0],
            kv_rot[1],
            layer,
            starts,
            order,
            hstart,
            parallel,
            numba.get_num_threads(),
        )


class OrtOps(NumbaOps):
    """Matmuls on onnxruntime (numba for the weight types it cannot run well: ``ort.runs_well``),
    everything else on numba.

    ``threads``: each session's intra-op pool (default: numba's thread count in this thread).
    """

    name = "onnxruntime"

    def __init__(self, threads: int | None = None):
        super().__init__()
        self.threads = threads or ort.default_threads()

    def linear(self, m: Matrix):
        if not ort.runs_well(m.qtype):
            return NumbaLinear(m)
        return OrtLinear(m, threads=self.threads)


class AutoOps(NumbaOps):
    """numba or onnxruntime per (weight shape, batch bucket), measured here and cached on disk
    (``kernels.autotune``: what is timed, the cache, and the memory rule).

    ``tune(linears, progress)`` plans every shape of the model at once (Box.prepare calls it
    before preparing the weights: the memory budget needs the whole model); a linear prepared
    without it is planned alone at its ``prepare()``.  ``plan`` / ``report()`` show the choices.
    """

    name = "auto"

    bucket_of = staticmethod(autotune.bucket_of)

    def __init__(self, threads: int | None = None, cache_dir=None, timer=None):
        super().__init__()
        self.threads = threads or ort.default_threads()
        self.tuner = autotune.Tuner(self.threads, cache_dir=cache_dir, timer=timer or time.perf_counter)
        self.plan: dict[str, autotune.Choice] = {}
        self._lock = threading.Lock()

    def linear(self, m: Matrix):
        if not ort.runs_well(m.qtype):
            return NumbaLinear(m)
        return AutoLinear(m, self)

    def tune(self, linears, progress=None) -> dict:
        """Measure (or read from the cache) and plan the shapes of ``linears`` (the Box's
        linears: plain ones, or fused ones whose ``parts`` are stacked at prepare()); returns
        the plan.  ``progress(done, total)`` is called per shape measured (none when cached)."""
        matrices = [m for lin in linears for m in autotune.matrices_of(lin)]
        with self._lock:
            if matrices:
                self.plan.update(self.tuner.plan(matrices, progress))
            return self.plan

    def choice(self, lin: AutoLinear) -> autotune.Choice:
        m = lin.matrix
        key = autotune.shape_key(m.qtype, m.n_out, m.n_in)
        with self._lock:
            if key not in self.plan:
                self.plan.update(self.tuner.plan([m]))
            return self.plan[key]

    def report(self) -> list[str]:
        return autotune.describe(self.plan, self.tuner.load())


def get_ops(backend: str, threads: int | None = None):
    """The ops of ``backend`` (one of BACKENDS).  ``threads``: the intra-op threads of each
    onnxruntime session ("onnxruntime", "auto"), and the count "auto" tunes with; default:
    numba's thread count in the calling thread."""
    if backend == "ref":
        return RefOps()
    if backend == "numba":
        return NumbaOps()
    if backend == "onnxruntime":
        return OrtOps(threads)
    if backend == "auto":
        return AutoOps(threads)
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
