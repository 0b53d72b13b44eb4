"""Chips and the box that holds them: weight shards, parallel execution, device time.

Each ``Chip`` owns its shard of every layer (views into the mmap, prepared for the kernel
backend; a chip's rows of q/k/v and of gate/up each merged into one matrix), runs its part of a
layer on a host thread (the kernels release the GIL), and keeps a device clock. The ``Box`` runs
the chips concurrently on ``ChipThreads``, does the all-reduce and gather explicitly, and after
each step charges every chip the time its work takes on the modelled hardware (roofline at its
current DVFS level, launch overheads, ring collectives) and reports that activity to the
firmware, which turns it into energy, power and temperature.

The math and the accounting are separate on purpose: a dry run (``Box.account_step`` alone)
advances clocks and power exactly as a real step would, without doing the math. The accounting
prices the model's tensors one by one (q, k, v, ...), whatever the host fuses.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..args import ModelArgs
from ..errors import ModelError
from ..gguf_file import release_view_pages
from ..gguf_loader import Matrix, Weights
from ..kernels.backend import DEFAULT_BACKEND, get_ops
from ..quant_types import is_quantized
from . import cost
from .partition import (ChipShard, MergedColumnParallelLinear, PartitionPlan, RowParallelLinear, _deal,
                        vocab_parallel)
from .profile import ChipProfile, load_profile
from firmware_stub.firmware import Firmware

KV_BYTES = 2  # float16 cache
ACT_BYTES = 2  # activations cross the links as fp16


class FusedLinear:
    """One chip's rows of several weights that read the same input, as one linear: x [R, n_in]
    -> [R, sum of the parts' n_out], each part's output side by side in order.

    The parts (views into the mmap) are stacked into one matrix when the weight is prepared (the
    copy the backend packs; packing frees its pages, as it does the mmap's), so one kernel call
    replaces one per part. Parts of different types cannot share a kernel: each run of one type
    is its own matmul, and the outputs are concatenated.
    """

    def __init__(self, ops, parts: Sequence[Matrix]):
        self.parts = tuple(parts)
        self.n_out = sum(p.n_out for p in self.parts)
        self.n_in = self.parts[0].n_in
        self.nbytes = sum(p.nbytes for p in self.parts)
        self._ops = ops
        self._runs: list | None = None  # one backend linear per run of same-type parts

    def prepare(self) -> None:
        if self._runs is not None:
            return
        runs = []
        for qtype, group in itertools.groupby(self.parts, key=lambda p: p.qtype):
            group = list(group)
            if len(group) == 1:
                runs.append(self._ops.linear(group[0]))
            else:
                stacked = np.concatenate([p.data for p in group])  # [sum n_out, row_bytes]
                runs.append(self._ops.linear(Matrix("+".join(p.name for p in group), qtype,
                                                    len(stacked), self.n_in, stacked)))
            runs[-1].prepare()
            if len(group) > 1:
                for p in group:  # the stacked copy replaced them
                    release_view_pages(p.data)
        self._runs = runs

    def __call__(self, x: np.ndarray) -> np.ndarray:  # [R, n_in] -> [R, n_out]
        if self._runs is None:
            self.prepare()
        if len(self._runs) == 1:
            return self._runs[0](x)
        return np.concatenate([lin(x) for lin in self._runs], axis=1)


@dataclass
class ChipLayer:
    """One layer's shard on one chip; None means the chip has no part of that block."""

    wqkv: FusedLinear | None  # [(Hc + 2 Hkv_c)*hd, D]: its q, k, v heads' rows stacked
    bqkv: np.ndarray | None  # [(Hc + 2 Hkv_c)*hd] their biases (qwen2)
    wo: object | None  # Linear [D, Hc*hd] (row-parallel: partial sums)
    w_gate_up: FusedLinear | None  # [2 Fc, D]: its ffn_gate rows, then its ffn_up rows
    w_down: object | None  # Linear [D, Fc] (row-parallel)
    attn_shapes: list  # the block's matmuls as the hardware prices them: (n_out, n_in, bytes, int8)
    ffn_shapes: list
    decode_cache: dict = field(default_factory=dict)  # the backend's one-call decode arguments, made at first use


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
        self.n_ffn = len(shard.ffn)
        # local KV head of each local query head (GQA, with replicated KV heads)
        self.kv_of_head = np.array([h // args.n_gqa - shard.kv_heads.start for h in shard.heads], np.intp)
        self.weight_bytes = replicated_bytes + sum(
            m.nbytes for layer in layers for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
            if m is not None) + (lm_head.nbytes if lm_head is not None else 0)
        self.kv_bytes_per_token = 2 * args.n_layer * self.n_kv * hd * KV_BYTES
        self.clock_s = 0.0
        # per layer, the matmuls of each half-layer as (n_out, n_in, weight bytes, int8?)
        self.attn_matmuls = [layer.attn_shapes for layer in layers]
        self.ffn_matmuls = [layer.ffn_shapes for layer in layers]
        self.head_matmuls = _matmul_shapes(lm_head)

    @property
    def capacity_bytes(self) -> int:
        return self.profile.capacity_bytes


def _matmul_shapes(*ms) -> list[tuple[int, int, int, bool]]:
    """(n_out, n_in, bytes, int8?) of each matrix or linear that is not None."""
    return [(m.n_out, m.n_in, m.nbytes, is_quantized(getattr(m, "matrix", m).qtype)) for m in ms if m is not None]


def _slice(v: np.ndarray | None, r: range, hd: int) -> np.ndarray | None:
    return None if v is None or not len(r) else v[r.start * hd:r.stop * hd]


def host_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _kernel_threads(n_host_threads: int, n_cores: int) -> int:
    """Kernel threads for each host thread that runs chips: the cores left to it (capped by
    NUMBA_NUM_THREADS, read from the environment so that a dry run need not import numba)."""
    cap = int(os.environ.get("NUMBA_NUM_THREADS") or n_cores)
    return max(1, min(cap, n_cores // n_host_threads))


class _Helper:
    """What a helper thread shares with the caller: a job, its result, and two locks used as
    binary semaphores (``go`` released by the caller to start a job, ``done`` by the helper when
    it is finished). The thread holds only this, never the Box, so a dropped Box is collected."""

    def __init__(self):
        self.go = threading.Lock()
        self.done = threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.job: Callable[[], list] | None = None
        self.result: list | None = None
        self.error: BaseException | None = None
        self.stop = False


def _helper_loop(h: _Helper, kernel_threads: int) -> None:
    import numba

    numba.set_num_threads(kernel_threads)  # per thread: this thread's kernels only
    while True:
        h.go.acquire()
        if h.stop:
            return
        try:
            h.result = h.job()
        except BaseException as e:  # noqa: BLE001 -- handed to the caller, which raises it
            h.error = e
        h.job = None
        h.done.release()


def _stop_helpers(helpers: list[_Helper]) -> None:
    for h in helpers:
        h.stop = True
        h.go.release()


class ChipThreads:
    """The host threads the chips run on: at most one per core, each with a fixed, contiguous
    group of chips; the calling thread runs the last (never larger) group itself, beside the
    serial work between runs (norms, all-reduces), and helper threads run the others.

    ``run(fn)`` starts every helper on its group (one lock release each), runs the caller's
    group, then waits for each helper (one lock acquire each): per call two hand-offs per helper
    (a lock round trip between two threads costs ~43 µs on this 2-core VM), no task queue, no
    futures. The kernels release the GIL, so the groups compute at the same time. More threads
    than cores would only add stalls at every all-reduce (measured with the earlier thread pool
    on 2 cores, 7B Q4_0 decode: 4 threads 3.7 tok/s, 2 threads 4.7), so the kernels inside each
    thread use the cores left to it (numba's thread count is per calling thread; the caller's is
    set for its group and restored after). Helpers start at the first run (a dry run starts none), again in a forked
    child, and stop at ``close()`` or when this object is collected.
    """

    def __init__(self, chips: list, n_cores: int | None = None):
        n_cores = n_cores or host_cores()
        n_threads = max(1, min(len(chips), n_cores))
        self.groups = [chips[r.start:r.stop] for r in _deal(len(chips), n_threads)]  # [thread][chip]
        self.kernel_threads = _kernel_threads(n_threads, n_cores) if n_threads > 1 else None
        self._helpers: list[_Helper] = []  # one per group but the last
        self._pid = 0  # the process the helpers run in
        self._stopper = None
        self._lock = threading.Lock()

    @property
    def n_threads(self) -> int:
        return len(self.groups)

    def _start(self) -> None:
        self._helpers = [_Helper() for _ in self.groups[:-1]]
        for i, h in enumerate(self._helpers):
            threading.Thread(target=_helper_loop, args=(h, self.kernel_threads), name=f"chip-thread-{i}",
                             daemon=True).start()
        self._pid = os.getpid()
        self._stopper = weakref.finalize(self, _stop_helpers, self._helpers)

    def run(self, fn: Callable) -> list:
        """[fn(chip) for every chip], the groups concurrently; results in chip order."""
        if len(self.groups) == 1:
            return [fn(chip) for chip in self.groups[0]]
        import numba

        with self._lock:  # one run at a time: the helpers have one job slot each
            if self._pid != os.getpid():  # first run, or a fork left the helpers behind
                self._start()
            for h, group in zip(self._helpers, self.groups):
                h.job = lambda group=group: [fn(chip) for chip in group]
                h.go.release()
            prev = numba.get_num_threads()
            numba.set_num_threads(self.kernel_threads)
            try:
                mine = [fn(chip) for chip in self.groups[-1]]
            finally:
                numba.set_num_threads(prev)
                theirs, error = [], None
                for h in self._helpers:  # wait for every helper, even after an error: they share the arrays
                    h.done.acquire()
                    theirs += h.result or []
                    error = error or h.error
                    h.result = h.error = None
            if error is not None:
                raise error
            return theirs + mine

    def close(self) -> None:
        if self._stopper is not None:
            self._stopper()


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
        # the chips run concurrently, one host thread per core at most (see ChipThreads); a
        # backend with its own thread pools (onnxruntime) gets the cores each chip thread has
        n_cores = host_cores()
        n_threads = min(n_chips, n_cores)
        self.ops = get_ops(backend) if n_threads == 1 else get_ops(backend, threads=_kernel_threads(n_threads, n_cores))
        hd = args.head_dim
        shards = self.plan.shards
        lin = lambda m: self.ops.linear(m) if m is not None else None  # noqa: E731
        fused = lambda parts: FusedLinear(self.ops, parts) if parts is not None else None  # noqa: E731
        per_chip_layers: list[list[ChipLayer]] = [[] for _ in range(n_chips)]
        head_cols = [range(s.heads.start * hd, s.heads.stop * hd) for s in shards]
        kv_rows = [range(s.kv_heads.start * hd, s.kv_heads.stop * hd) for s in shards]
        ffn = [s.ffn for s in shards]
        for lw in weights.layers:
            qkv = MergedColumnParallelLinear.split([lw.wq, lw.wk, lw.wv], [head_cols, kv_rows, kv_rows])
            o = RowParallelLinear.split(lw.wo, head_cols)
            gate_up = MergedColumnParallelLinear.split([lw.w_gate, lw.w_up], [ffn, ffn])
            down = RowParallelLinear.split(lw.w_down, ffn)
            for i, s in enumerate(shards):
                biases = [_slice(lw.bq, s.heads, hd), _slice(lw.bk, s.kv_heads, hd), _slice(lw.bv, s.kv_heads, hd)]
                per_chip_layers[i].append(ChipLayer(
                    wqkv=fused(qkv.shard(i)),
                    bqkv=np.concatenate(biases) if all(b is not None for b in biases) else None,
                    wo=lin(o.shards[i]),
                    w_gate_up=fused(gate_up.shard(i)),
                    w_down=lin(down.shards[i]),
                    attn_shapes=_matmul_shapes(*(qkv.shard(i) or ()), o.shards[i]),
                    ffn_shapes=_matmul_shapes(*(gate_up.shard(i) or ()), down.shards[i])))
        head = vocab_parallel(weights.output, [s.vocab for s in shards])
        replicated = weights.token_embd.nbytes + sum(lw.attn_norm.nbytes + lw.ffn_norm.nbytes for lw in weights.layers)
        self.chips = [Chip(s, per_chip_layers[i], lin(head.shards[i]), replicated, self.profile, args)
                      for i, s in enumerate(shards)]
        for chip in self.chips:
            if chip.weight_bytes > chip.capacity_bytes:
                raise ModelError(f"{source}: the model needs {chip.weight_bytes / 2**30:.2f} GiB per chip on {n_chips} chip(s), "
                                 f"the chip ({self.profile.name}) has {chip.capacity_bytes / 2**30:.2f} GiB; use more chips or a smaller quant")
        self.threads = ChipThreads(self.chips, n_cores)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of context costs, over all chips (replicated KV heads included)."""
        return sum(chip.kv_bytes_per_token for chip in self.chips)

    def publish_firmware(self, root, publish_interval_s: float = 0.02) -> Firmware:
        """Give the chips a firmware that publishes its hwmon/cpufreq tree under ``root`` (what
        sensors and the governor read); call before the first step, as a board's firmware runs
        from power-on.  ``publish_interval_s``: device seconds between sensor updates (a board's
        INA-class monitor converts every few ms; 20 ms keeps the governor's 100 ms windows well
        sampled)."""
        self.firmware = Firmware(self.profile, self.n_chips, root=root, publish_interval_s=publish_interval_s)
        return self.firmware

    def linears(self) -> list:
        return [m for chip in self.chips for layer in chip.layers
                for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down) if m is not None] + \
               [chip.lm_head for chip in self.chips if chip.lm_head is not None]

    def prepare(self, progress=None) -> None:
        """Repack every weight for the kernels now rather than at first use; ``progress(done,
        total)`` is called as it goes."""
        todo = self.linears()
        tune = getattr(self.ops, "tune", None)
        if tune is not None:  # a backend that picks kernels per weight shape plans them all first
            tune(todo)
        for i, lin in enumerate(todo, 1):
            lin.prepare()
            if progress is not None and (i % 16 == 0 or i == len(todo)):
                progress(i, len(todo))

    # -- execution -------------------------------------------------------------------------------
    def run(self, fn) -> list:
        """[fn(chip) for every chip], concurrently on the chip threads; results in chip order."""
        return self.threads.run(fn)

    @staticmethod
    def all_reduce(partials: list[np.ndarray | None]) -> np.ndarray:
        """Sum of the chips' partial outputs (a ring all-reduce on the hardware). The partials are
        the step's own fresh arrays, so the first is summed into in place."""
        parts = [p for p in partials if p is not None]
        out = parts[0]
        for p in parts[1:]:
            out += p
        return out

    @staticmethod
    def gather(parts: list[np.ndarray | None]) -> np.ndarray:
        """Concatenate the chips' vocabulary slices of the logits."""
        return np.concatenate([p for p in parts if p is not None], axis=1)

    def close(self) -> None:
        self.threads.close()

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
