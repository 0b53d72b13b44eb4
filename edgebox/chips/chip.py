"""Chips and the box that holds them: weight shards, parallel execution, device time.

Each ``Chip`` owns its shard of every layer (views into the mmap, prepared for the kernel
backend), runs its part of a layer on its own host thread (the kernels release the GIL), and
keeps a device clock. The ``Box`` runs the chips, does the all-reduce and gather explicitly, and
after each step charges every chip the time its work takes on the modelled hardware (roofline at
its current DVFS level, launch overheads, ring collectives) and reports that activity to the
firmware, which turns it into energy, power and temperature.

The math and the accounting are separate on purpose: a dry run (``Box.account_step`` alone)
advances clocks and power exactly as a real step would, without doing the math.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..args import ModelArgs
from ..errors import ModelError
from ..gguf_loader import Weights
from ..kernels.backend import DEFAULT_BACKEND, get_ops
from ..quant_types import is_quantized
from . import cost
from .partition import ChipShard, ColumnParallelLinear, PartitionPlan, RowParallelLinear, vocab_parallel
from .profile import ChipProfile, load_profile
from firmware_stub.firmware import Firmware

KV_BYTES = 2  # float16 cache
ACT_BYTES = 2  # activations cross the links as fp16


@dataclass
class ChipLayer:
    """One layer's shard on one chip; a None matrix means the chip has no part of it."""

    wq: object | None  # Linear [heads_i*hd, D]
    wk: object | None  # Linear [kv_i*hd, D]
    wv: object | None
    wo: object | None  # Linear [D, heads_i*hd] (row-parallel: partial sums)
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    w_gate: object | None  # Linear [ffn_i, D]
    w_up: object | None
    w_down: object | None  # Linear [D, ffn_i] (row-parallel)


class Chip:
    def __init__(self, shard: ChipShard, layers: list[ChipLayer], lm_head, replicated_bytes: int,
                 profile: ChipProfile, args: ModelArgs):
        self.index = shard.chip
        self.shard = shard
        self.layers = layers
        self.lm_head = lm_head  # Linear [vocab_i, D] or None
        self.profile = profile
        hd = args.head_dim
        self.n_heads, self.n_kv = len(shard.heads), len(shard.kv_heads)
        # local KV head of each local query head (GQA, with replicated KV heads)
        self.kv_of_head = np.array([h // args.n_gqa - shard.kv_heads.start for h in shard.heads], np.intp)
        self.weight_bytes = replicated_bytes + sum(
            m.nbytes for layer in layers for m in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down)
            if m is not None) + (lm_head.nbytes if lm_head is not None else 0)
        self.kv_bytes_per_token = 2 * args.n_layer * self.n_kv * hd * KV_BYTES
        self.clock_s = 0.0
        # per layer, the matmuls of each half-layer as (n_out, n_in, weight bytes, int8?)
        self.attn_matmuls = [_matmul_shapes(layer.wq, layer.wk, layer.wv, layer.wo) for layer in layers]
        self.ffn_matmuls = [_matmul_shapes(layer.w_gate, layer.w_up, layer.w_down) for layer in layers]
        self.head_matmuls = _matmul_shapes(lm_head)

    @property
    def capacity_bytes(self) -> int:
        return self.profile.capacity_bytes


def _set_kernel_threads(n_workers: int) -> None:
    import numba

    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, (os.cpu_count() or 1) // n_workers)))


def _matmul_shapes(*linears) -> list[tuple[int, int, int, bool]]:
    return [(m.n_out, m.n_in, m.nbytes, is_quantized(m.matrix.qtype)) for m in linears if m is not None]


def _slice(v: np.ndarray | None, r: range, hd: int) -> np.ndarray | None:
    return None if v is None or not len(r) else v[r.start * hd:r.stop * hd]


class Box:
    """N chips running one model tensor-parallel, plus the firmware that watches them."""

    def __init__(self, args: ModelArgs, weights: Weights, n_chips: int = 1, profile: str | ChipProfile | None = None,
                 backend: str = DEFAULT_BACKEND, firmware=None, source: str = ""):
        self.args = args
        self.n_chips = n_chips
        self.profile = profile if isinstance(profile, ChipProfile) else load_profile(profile or ("host" if n_chips == 1 else "r100-edge"))
        self.plan = PartitionPlan.build(args, weights, n_chips)
        # the chips' management firmware (in-process; publishes hwmon files when given a root)
        self.firmware = firmware if firmware is not None else Firmware(self.profile, n_chips)
        self.ops = get_ops(backend)
        hd = args.head_dim
        shards = self.plan.shards
        per_chip_layers: list[list[ChipLayer]] = [[] for _ in range(n_chips)]
        head_cols = [range(s.heads.start * hd, s.heads.stop * hd) for s in shards]
        kv_rows = [range(s.kv_heads.start * hd, s.kv_heads.stop * hd) for s in shards]
        ffn = [s.ffn for s in shards]
        for lw in weights.layers:
            q = ColumnParallelLinear.split(lw.wq, head_cols)
            k = ColumnParallelLinear.split(lw.wk, kv_rows)
            v = ColumnParallelLinear.split(lw.wv, kv_rows)
            o = RowParallelLinear.split(lw.wo, head_cols)
            gate = ColumnParallelLinear.split(lw.w_gate, ffn)
            up = ColumnParallelLinear.split(lw.w_up, ffn)
            down = RowParallelLinear.split(lw.w_down, ffn)
            for i, s in enumerate(shards):
                lin = lambda m: self.ops.linear(m) if m is not None else None  # noqa: E731
                per_chip_layers[i].append(ChipLayer(
                    wq=lin(q.shards[i]), wk=lin(k.shards[i]), wv=lin(v.shards[i]), wo=lin(o.shards[i]),
                    bq=_slice(lw.bq, s.heads, hd), bk=_slice(lw.bk, s.kv_heads, hd), bv=_slice(lw.bv, s.kv_heads, hd),
                    w_gate=lin(gate.shards[i]), w_up=lin(up.shards[i]), w_down=lin(down.shards[i])))
        head = vocab_parallel(weights.output, [s.vocab for s in shards])
        replicated = weights.token_embd.nbytes + sum(lw.attn_norm.nbytes + lw.ffn_norm.nbytes for lw in weights.layers)
        self.chips = [Chip(s, per_chip_layers[i], self.ops.linear(head.shards[i]) if head.shards[i] is not None else None,
                           replicated, self.profile, args) for i, s in enumerate(shards)]
        for chip in self.chips:
            if chip.weight_bytes > chip.capacity_bytes:
                raise ModelError(f"{source}: the model needs {chip.weight_bytes / 2**30:.2f} GiB per chip on {n_chips} chip(s), "
                                 f"the chip ({self.profile.name}) has {chip.capacity_bytes / 2**30:.2f} GiB; use more chips or a smaller quant")
        # chips run concurrently on host threads, at most one per core: more threads than cores
        # only adds barrier stalls (measured on 2 cores, 7B Q4_0 decode: 4 threads 3.7 tok/s,
        # 2 threads 4.7); the kernels inside use the cores left to each thread (numba's thread
        # count is per calling thread), so the host is never oversubscribed
        workers = min(n_chips, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chip",
                                        initializer=_set_kernel_threads, initargs=(workers,)) if n_chips > 1 else None

    def linears(self) -> list:
        return [m for chip in self.chips for layer in chip.layers
                for m in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down) if m is not None] + \
               [chip.lm_head for chip in self.chips if chip.lm_head is not None]

    def prepare(self, progress=None) -> None:
        """Repack every weight for the kernels now rather than at first use; ``progress(done,
        total)`` is called as it goes."""
        todo = self.linears()
        for i, lin in enumerate(todo, 1):
            lin.prepare()
            if progress is not None and (i % 16 == 0 or i == len(todo)):
                progress(i, len(todo))

    # -- execution -------------------------------------------------------------------------------
    def run(self, fn) -> list:
        """fn(chip) on every chip, concurrently (one host thread per chip)."""
        if self._pool is None:
            return [fn(self.chips[0])]
        return list(self._pool.map(fn, self.chips))

    @staticmethod
    def all_reduce(partials: list[np.ndarray | None]) -> np.ndarray:
        """Sum of the chips' partial outputs (a ring all-reduce on the hardware)."""
        parts = [p for p in partials if p is not None]
        out = parts[0].copy()
        for p in parts[1:]:
            out += p
        return out

    @staticmethod
    def gather(parts: list[np.ndarray | None]) -> np.ndarray:
        """Concatenate the chips' vocabulary slices of the logits."""
        return np.concatenate([p for p in parts if p is not None], axis=1)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # -- device time -----------------------------------------------------------------------------
    @property
    def clock_s(self) -> float:
        """Device time of the box: the chips meet at every all-reduce, so they share it."""
        return max(chip.clock_s for chip in self.chips)

    def freq_mhz(self, chip: Chip) -> float:
        return self.firmware.freq_mhz(chip.index) if self.firmware is not None else self.profile.max_mhz

    def account_step(self, segments: list[tuple[int, int]], n_logits: int) -> float:
        """Charge every chip for one forward step and report it to the firmware.

        ``segments``: (rows, context after the step) of each sequence in the step; ``n_logits``:
        rows whose logits were computed. Each op costs the roofline time at the chip's current
        clock plus the launch overhead; at every all-reduce the chips wait for the slowest (idle
        time), then spend the ring's time on the link. Half-layers with the same shapes cost the
        same, so each distinct one is priced once per step. Returns the step's device seconds.
        """
        a, p, chips = self.args, self.profile, self.chips
        R = sum(n for n, _ in segments)
        attn_pairs = sum(n * ctx for n, ctx in segments)  # query x key pairs
        ctx_total = sum(ctx for _, ctx in segments)
        freqs = [self.freq_mhz(c) for c in chips]
        t0 = self.clock_s
        busy = np.zeros(len(chips))  # device seconds each chip computes in this step
        ops = np.zeros(len(chips))
        nbytes = np.zeros(len(chips))
        step_s = 0.0  # wall of the lock-stepped box
        priced: dict = {}

        def half_layer(kind: str, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            key = (kind, tuple(tuple((c.attn_matmuls if kind == "attn" else c.ffn_matmuls)[layer]) for c in chips))
            if key not in priced:
                t, o, b = np.zeros(len(chips)), np.zeros(len(chips)), np.zeros(len(chips))
                for i, c in enumerate(chips):
                    work = [(2 * R * n_out * n_in, w_bytes + R * (n_in + n_out) * ACT_BYTES, int8)
                            for n_out, n_in, w_bytes, int8 in key[1][i]]
                    work.append((2 * R * a.n_embd, 2 * R * a.n_embd * 4, False))  # rms_norm (replicated)
                    if kind == "attn" and c.n_heads:
                        work.append((4 * attn_pairs * c.n_heads * a.head_dim,
                                     2 * ctx_total * c.n_kv * a.head_dim * KV_BYTES, False))  # attention over the cache
                    t[i], o[i], b[i] = self._price(freqs[i], work)
                priced[key] = (t, o, b)
            return priced[key]

        n_allreduce = 0
        for layer in range(a.n_layer):
            for kind in ("attn", "ffn"):
                t, o, b = half_layer(kind, layer)
                busy += t
                ops += o
                nbytes += b
                step_s += t.max()
                n_allreduce += 1
        # the vocab-parallel lm head
        head = [self._price(freqs[i], [(2 * n_logits * n_out * n_in, w_bytes, int8) for n_out, n_in, w_bytes, int8 in c.head_matmuls])
                for i, c in enumerate(chips)]
        busy += [h[0] for h in head]
        ops += [h[1] for h in head]
        nbytes += [h[2] for h in head]
        step_s += max(h[0] for h in head)

        link_s = link_sent = 0.0
        if self.n_chips > 1:
            ar_bytes = R * a.n_embd * ACT_BYTES
            gather_bytes = n_logits * a.n_vocab * 4
            link_s = (n_allreduce * cost.link_time(p, ar_bytes, self.n_chips, "allreduce")
                      + cost.link_time(p, gather_bytes, self.n_chips, "allgather"))
            link_sent = (n_allreduce * cost.link_bytes_sent(ar_bytes, self.n_chips, "allreduce")
                         + cost.link_bytes_sent(gather_bytes, self.n_chips, "allgather"))
        step_s += link_s
        for i, chip in enumerate(chips):
            self._report(chip, float(busy[i]), float(ops[i]), float(nbytes[i]), idle_s=float(t0 + step_s - link_s - chip.clock_s - busy[i]))
            if link_s:
                self._report(chip, link_s, 0.0, 0.0, link_bytes=link_sent)
        return step_s

    def _price(self, f: float, work: list[tuple[float, float, bool]]) -> tuple[float, float, float]:
        """(device seconds, ops, bytes) of a list of ops run back to back at clock f."""
        seconds = sum(cost.op_time(self.profile, f, o, b, int8) for o, b, int8 in work)
        return seconds, sum(w[0] for w in work), sum(w[1] for w in work)

    def _report(self, chip: Chip, busy_s: float, ops: float, nbytes: float, idle_s: float = 0.0,
                link_bytes: float = 0.0) -> None:
        if idle_s > 0:
            chip.clock_s += idle_s
            if self.firmware is not None:
                self.firmware.idle(chip.index, idle_s)
        chip.clock_s += busy_s
        if self.firmware is not None and busy_s > 0:
            self.firmware.activity(chip.index, busy_s, ops, nbytes, link_bytes=link_bytes)

    def idle_until(self, t_s: float) -> None:
        """Every chip idles (clock-gated) until device time ``t_s``."""
        for chip in self.chips:
            self._report(chip, 0.0, 0.0, 0.0, idle_s=t_s - chip.clock_s)
