"""The box: N chips running one model tensor-parallel, with collectives, device time and firmware.

The ``Box`` runs the chips concurrently on ``ChipThreads``, does the all-reduce and gather
explicitly, and after each step charges every chip the time its work takes on the modelled
hardware (roofline at its current DVFS level, launch overheads, ring collectives) and reports that
activity to the firmware, which turns it into energy, power and temperature.
"""

from __future__ import annotations

import functools

import numpy as np

from edgebox.gguf.args import ModelArgs
from edgebox.errors import ModelError
from edgebox.gguf.loader import Weights
from edgebox.kernels.backend import DEFAULT_BACKEND, get_ops
from edgebox.chips.partition import (MergedColumnParallelLinear, PartitionPlan, RowParallelLinear, vocab_parallel)
from edgebox.hw.profile import ChipProfile, load_profile
from firmware_stub.firmware import Firmware
from edgebox.chips.accounting import Accounting
from edgebox.chips.chip import Chip, ChipLayer, FusedLinear, _matmul_shapes, _slice
from edgebox.chips.threads import ChipThreads, _kernel_threads, host_cores



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
