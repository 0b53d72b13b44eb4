"""Hyper-parameters of each supported architecture, read from GGUF metadata and validated.

One dataclass per architecture (the MLX-LM habit): what differs between llama and qwen2 is stated
here once, as data, and the forward pass reads it instead of testing architecture names.
``from_gguf`` reads fields as ``GGUFFile`` gives them, whose kinds ``gguf.metadata`` has checked;
the dataclass checks what relates them (divisibility, ranges), also for arguments built by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from edgebox.errors import ModelError


@dataclass(frozen=True)
class ModelArgs:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    n_rot: int
    rope_freq_base: float
    rope_freq_scale: float  # 1 / linear scaling factor (DeepSeek-Coder: 1/4)
    rms_eps: float
    source: str = ""  # file name, for error messages

    arch: ClassVar[str] = ""
    rope_neox: ClassVar[bool] = False  # GGML rope mode: adjacent pairs (llama) or split halves (neox)
    qkv_bias: ClassVar[bool] = False
    default_rope_base: ClassVar[float] = 10000.0

    def __post_init__(self) -> None:
        where = f"{self.source}: " if self.source else ""
        for name in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx_train", "n_rot"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value > 2**31:
                raise ModelError(f"{where}{self.arch}.{_GGUF_NAMES[name]} is {value!r}, expected a positive integer")
        if self.n_embd % self.n_head:
            raise ModelError(f"{where}embedding_length {self.n_embd} is not divisible by head_count {self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ModelError(f"{where}head_count {self.n_head} is not a multiple of head_count_kv {self.n_head_kv}")
        if self.n_rot > self.head_dim or self.n_rot % 2:
            raise ModelError(f"{where}rope.dimension_count {self.n_rot} must be even and at most the head size {self.head_dim}")
        finite = all(map(math.isfinite, (self.rope_freq_base, self.rope_freq_scale, self.rms_eps)))
        if not (finite and self.rope_freq_base > 0 and self.rope_freq_scale > 0 and 0 < self.rms_eps < 1):
            raise ModelError(
                f"{where}rope freq_base {self.rope_freq_base}, scale {self.rope_freq_scale} or rms epsilon {self.rms_eps} out of range"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_gqa(self) -> int:
        """Query heads per KV head."""
        return self.n_head // self.n_head_kv

    @classmethod
    def from_gguf(cls, fields: dict[str, object], source: str = "") -> ModelArgs:
        arch = fields.get("general.architecture")
        args_cls = ARCHITECTURES.get(arch) if isinstance(arch, str) else None
        if args_cls is None:
            raise ModelError(
                f"{source}: architecture {arch!r} is not supported (general.architecture); edgebox runs {', '.join(ARCHITECTURES)}"
            )
        return args_cls._from_fields(fields, source)

    @classmethod
    def _from_fields(cls, fields: dict[str, object], source: str) -> ModelArgs:
        a = cls.arch

        def get(key: str, default=None):
            value = fields.get(f"{a}.{key}", default)
            if value is None:
                raise ModelError(f"{source}: metadata {a}.{key} is missing; the file is incomplete, re-convert it")
            return value

        n_embd, n_head = get("embedding_length"), get("attention.head_count")
        scaling = fields.get(f"{a}.rope.scaling.type", "none")
        freq_scale = 1.0
        if scaling == "linear":
            freq_scale = 1.0 / float(get("rope.scaling.factor"))  # > 0 and finite: gguf.metadata
        elif scaling not in ("none", None):
            raise ModelError(
                f"{source}: rope scaling {scaling!r} ({a}.rope.scaling.type) is not supported; edgebox supports none and linear"
            )
        tokens = fields.get("tokenizer.ggml.tokens")
        n_vocab = fields.get(f"{a}.vocab_size", len(tokens) if tokens is not None else None)
        if n_vocab is None:
            raise ModelError(f"{source}: neither {a}.vocab_size nor tokenizer.ggml.tokens is present")
        head_dim = n_embd // n_head if isinstance(n_embd, int) and isinstance(n_head, int) and n_head else 0
        return cls(
            n_vocab=int(n_vocab),
            n_embd=n_embd,
            n_layer=get("block_count"),
            n_head=n_head,
            n_head_kv=get("attention.head_count_kv", n_head),
            n_ff=get("feed_forward_length"),
            n_ctx_train=get("context_length"),
            n_rot=get("rope.dimension_count", head_dim),
            rope_freq_base=float(get("rope.freq_base", cls.default_rope_base)),
            rope_freq_scale=freq_scale,
            rms_eps=float(get("attention.layer_norm_rms_epsilon")),
            source=source,
        )


@dataclass(frozen=True)
class LlamaArgs(ModelArgs):
    """DeepSeek-LLM-7B, DeepSeek-Coder-6.7B (linear rope scaling): GGML normal rope, no biases."""

    arch: ClassVar[str] = "llama"


@dataclass(frozen=True)
class Qwen2Args(ModelArgs):
    """DeepSeek-R1-Distill-Qwen-7B: grouped-query attention, Q/K/V biases, neox rope."""

    arch: ClassVar[str] = "qwen2"
    rope_neox: ClassVar[bool] = True
    qkv_bias: ClassVar[bool] = True
    default_rope_base: ClassVar[float] = 1000000.0


ARCHITECTURES: dict[str, type[ModelArgs]] = {c.arch: c for c in (LlamaArgs, Qwen2Args)}

_GGUF_NAMES = {
    "n_vocab": "vocab_size",
    "n_embd": "embedding_length",
    "n_layer": "block_count",
    "n_head": "attention.head_count",
    "n_head_kv": "attention.head_count_kv",
    "n_ff": "feed_forward_length",
    "n_ctx_train": "context_length",
    "n_rot": "rope.dimension_count",
}
