"""The box: N chips running one model tensor-parallel, with collectives, device time and firmware.

The ``Box`` places each layer's shards on the chips (``chips.tp`` says how each weight is cut),
runs a block on every chip at once on ``ChipThreads`` (``chips.blocks`` says what a chip
computes) and joins the partial outputs with an explicit all-reduce, or the lm head's slices with
a gather: one thread hand-off per block, so a caller (``model.Transformer``) sees a plain forward
pass and never touches a chip. After each step it charges every chip the time its work takes on
the modelled hardware (roofline at its current DVFS level, launch overheads, ring collectives)
and reports that activity to the firmware, which turns it into energy, power and temperature.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from pathlib import Path

import numpy as np

from edgebox.chips import blocks
from edgebox.chips.accounting import Accounting
from edgebox.chips.blocks import AttentionStep
from edgebox.chips.chip import Chip, ChipLayer, FusedLinear
from edgebox.chips.decode import TokenDecoder
from edgebox.chips.partition import PartitionPlan
from edgebox.chips.threads import ChipThreads, _kernel_threads, host_cores
from edgebox.chips.tp import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, VocabParallelLinear
from edgebox.errors import ModelError
from edgebox.gguf.args import ModelArgs
from edgebox.gguf.loader import Weights
from edgebox.hw.profile import ChipProfile, load_profile
from edgebox.kernels import kv_quant, packcache
from edgebox.kernels.backend import DEFAULT_BACKEND, get_ops
from edgebox.kernels.linear import prepare_linear
from firmware_stub.firmware import Firmware


@functools.cache
def _shard_code_digest() -> bytes:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in ("tp.py", "chip.py"))).hexdigest()[:16].encode()


class Box:
    """N chips running one model tensor-parallel, plus the firmware that watches them."""

    def __init__(
        self,
        args: ModelArgs,
        weights: Weights,
        n_chips: int = 1,
        profile: str | ChipProfile | None = None,
        backend: str = DEFAULT_BACKEND,
        firmware=None,
        source: str = "",
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
    ):
        self.args = args
        self.n_chips = n_chips
        # the KV cache's element types (llama.cpp's --cache-type-k/-v), checked against the head size
        self.cache_types = (kv_quant.cache_type(cache_type_k, "cache_type_k"), kv_quant.cache_type(cache_type_v, "cache_type_v"))
        kv_quant.cache_row_shape(self.cache_types[0], args.head_dim, "cache_type_k")
        kv_quant.cache_row_shape(self.cache_types[1], args.head_dim, "cache_type_v")
        self.profile = (
            profile if isinstance(profile, ChipProfile) else load_profile(profile or ("host" if n_chips == 1 else "r100-edge"))
        )
        self.plan = PartitionPlan.build(args, weights, n_chips)
        # the chips' management firmware (in-process; publishes hwmon files when given a root)
        self.firmware = firmware if firmware is not None else Firmware(self.profile, n_chips)
        # the chips run concurrently, one host thread per core at most (see ChipThreads); a
        # backend with its own thread pools (onnxruntime) gets the cores each chip thread has
        n_cores = host_cores()
        n_threads = min(n_chips, n_cores)
        self.ops = get_ops(backend) if n_threads == 1 else get_ops(backend, threads=_kernel_threads(n_threads, n_cores))
        self.chips = self._place(args, weights, source)
        self.threads = ChipThreads(self.chips, n_cores)
        self.token_decoder = TokenDecoder(self)  # a lone sequence's one-token step (chips.decode)
        self._weights = weights
        self.pack_cache: packcache.PackCache | None = None  # the packed-weight cache prepare() used
        self.first_pass = threading.Event()  # set by the first lm_head: a cold start's cache write waits for it

    def _place(self, args: ModelArgs, weights: Weights, source: str) -> list[Chip]:
        """Cut every weight along the plan and give each chip its shards (views into the mmap)."""
        hd, shards, ops = args.head_dim, self.plan.shards, self.ops
        per_chip_layers: list[list[ChipLayer]] = [[] for _ in shards]
        for lw in weights.layers:
            qkv = QKVParallelLinear.of(lw.wq, lw.wk, lw.wv, lw.bq, lw.bk, lw.bv, shards, hd)
            o = RowParallelLinear.attn_output(lw.wo, shards, hd)
            gate_up = MergedColumnParallelLinear.gate_up(lw.w_gate, lw.w_up, shards)
            down = RowParallelLinear.ffn_down(lw.w_down, shards)
            for i, layers in enumerate(per_chip_layers):
                layers.append(ChipLayer.place(ops, i, qkv, o, gate_up, down))
        head = VocabParallelLinear.of(weights.output, shards)
        replicated = weights.token_embd.nbytes + sum(lw.attn_norm.nbytes + lw.ffn_norm.nbytes for lw in weights.layers)
        chips = [
            Chip(
                s,
                per_chip_layers[i],
                ops.linear(head.shards[i]) if head.shards[i] is not None else None,
                replicated,
                self.profile,
                args,
                ops,
                self.cache_types,
            )
            for i, s in enumerate(shards)
        ]
        for chip in chips:
            if chip.weight_bytes > chip.capacity_bytes:
                raise ModelError(
                    f"{source}: the model needs {chip.weight_bytes / 2**30:.2f} GiB per chip on {self.n_chips} chip(s), "
                    f"the chip ({self.profile.name}) has {chip.capacity_bytes / 2**30:.2f} GiB; use more chips or a smaller quant"
                )
        return chips

    @property
    def kv_heads(self) -> list[int]:
        """KV heads each chip holds (a KV cache keeps one slice per chip)."""
        return [chip.n_kv for chip in self.chips]

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of context costs, over all chips (replicated KV heads included),
        in the cache's types."""
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
        return [
            m
            for chip in self.chips
            for layer in chip.layers
            for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
            if m is not None
        ] + [chip.lm_head for chip in self.chips if chip.lm_head is not None]

    def split_key(self) -> bytes:
        """The chip split as bytes (part of the packed-weight cache's key): the chip count, every
        chip's heads, KV heads, FFN rows and vocabulary rows, and a digest of the code that cuts
        and stacks the shards along them (``chips/tp.py``, ``chips/chip.py``)."""
        ranges = repr([(s.chip, s.heads, s.kv_heads, s.ffn, s.vocab) for s in self.plan.shards]).encode()
        return ranges + b"|" + _shard_code_digest()

    def prepare(self, progress=None) -> None:
        """Repack every weight for the kernels now rather than at first use, or map the packed
        weights from the persistent cache (``kernels.packcache``: written at the first start of
        this model on this split, read at every later one); ``progress(done, total)`` is called
        as it goes."""
        todo = self.linears()
        tune = getattr(self.ops, "tune", None)
        if tune is not None:  # a backend that picks kernels per weight shape plans them all first
            tune(todo)
        cache = self.pack_cache  # a second prepare() (the engine's warm-up after the CLI's) reuses it
        if cache is None and getattr(self.ops, "name", "ref") != "ref":  # the reference packs nothing
            w = self._weights
            views = [m.data for lw in w.layers for m in (lw.wq, lw.wk, lw.wv, lw.wo, lw.w_gate, lw.w_up, lw.w_down)]
            cache = packcache.PackCache.for_model(
                [w.token_embd.data, w.output.data, *views],
                self.split_key(),
                in_place=[w.token_embd.data],  # (the embedding lookup's rows)
                chips=len(self.chips),
            )
        for i, lin in enumerate(todo, 1):
            if isinstance(lin, FusedLinear):
                lin.prepare(cache)
            else:
                prepare_linear(lin, cache)
            if progress is not None and (i % 16 == 0 or i == len(todo)):
                progress(i, len(todo))
        if cache is not None:
            # the entry is written while the model runs, from its first forward pass on (the
            # process waits for it at exit)
            cache.finish(background=True, after=self.first_pass)
            self.pack_cache = cache

    # -- the tensor-parallel blocks --------------------------------------------------------------
    def attention_step(self, positions: np.ndarray, rows: np.ndarray, starts: list[int], caches: list) -> AttentionStep:
        """The step's attention inputs, once per step: rope ``positions`` [R]; segment i is rows
        ``rows[i]:rows[i+1]``, its keys and values go to KV cache ``caches[i]`` from slot
        ``starts[i]`` on (its one-token segments batched when there are two or more)."""
        return AttentionStep.of(self.ops, self.chips, positions, rows, starts, caches)

    def decode_layers(self, x: np.ndarray, step: AttentionStep) -> np.ndarray | None:
        """Every layer of a one-token step of one sequence at once, x [1, D] -> [1, D], in one
        hand-off per chip thread (``chips.decode``); None for any other step, or where the
        backend has no one-call layer: then the caller runs the layers one block at a time."""
        if len(x) != 1 or len(step.caches) != 1:
            return None
        return self.token_decoder(x, int(step.positions[0]), step.caches[0], step.starts[0])

    def attention(self, layer: int, h: np.ndarray, step: AttentionStep) -> np.ndarray:
        """Attention block ``layer`` of the normalized rows h [R, D]: every chip attends for its
        heads and projects by its columns of attn_output; the partial sums are all-reduced."""
        return self.all_reduce(self.threads.run(blocks.attention, layer, h, step))  # [R, D]

    def ffn(self, layer: int, h: np.ndarray) -> np.ndarray:
        """FFN block ``layer`` of h [R, D]: every chip does its FFN rows (SwiGLU) and its columns of
        ffn_down; the partial sums are all-reduced."""
        return self.all_reduce(self.threads.run(blocks.ffn, layer, h))  # [R, D]

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        """Logits [K, V] of the normalized rows x [K, D]: every chip its vocabulary slice, gathered."""
        logits = self.gather(self.threads.run(blocks.lm_head, x))
        if not self.first_pass.is_set():  # (set() takes a lock: once, not per token)
            self.first_pass.set()
        return logits

    # -- execution -------------------------------------------------------------------------------
    def run(self, fn, *args) -> list:
        """[fn(chip, *args) for every chip], concurrently on the chip threads; results in chip order."""
        return self.threads.run(fn, *args)

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
    @functools.cached_property
    def accounting(self) -> Accounting:
        """The chips' device time and what they report to the firmware (built at first use)."""
        return Accounting(self.chips, self.args, self.profile)

    @property
    def clock_s(self) -> float:
        """Device time of the box: the chips meet at every all-reduce, so they share it."""
        return self.accounting.clock_s

    def freq_mhz(self, chip: Chip) -> float:
        return self.accounting.freq_mhz(chip, self.firmware)

    def account_step(self, segments: list[tuple[int, int]], n_logits: int) -> float:
        """Charge every chip for one forward step (``Accounting.charge``); the step's device seconds."""
        return self.accounting.charge(segments, n_logits, self.firmware)

    def idle_until(self, t_s: float) -> None:
        """Every chip idles (clock-gated) until device time ``t_s``."""
        self.accounting.idle_until(t_s, self.firmware)
