"""GGUF file -> ModelArgs + Tokenizer + validated weight views (no copy of any matrix).

Every tensor the forward pass will touch is checked here, once, for presence, shape and type, so
the forward pass itself never meets a surprise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType

from edgebox.errors import ModelError
from edgebox.gguf.args import ModelArgs
from edgebox.gguf.file import GGUFFile, TensorInfo
from edgebox.gguf.quant_types import SUPPORTED
from edgebox.text.tokenizer import Tokenizer

# 1-D tensors (norm weights, biases) are read into float32 arrays; they are tiny.
_VECTOR_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


@dataclass(frozen=True)
class Matrix:
    """A weight matrix as stored: ``data`` uint8 [n_out, row_bytes] (a view into the mmap)."""

    name: str
    qtype: GGMLQuantizationType
    n_out: int
    n_in: int
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def row_blocks(self) -> tuple[np.ndarray, ...]:
        """The rows as the blocks they are stored in (one; a chip's stacked rows have several)."""
        return (self.data,)


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # [n_embd]
    wq: Matrix  # [n_head*hd, n_embd]
    wk: Matrix  # [n_head_kv*hd, n_embd]
    wv: Matrix  # [n_head_kv*hd, n_embd]
    wo: Matrix  # [n_embd, n_head*hd]
    bq: np.ndarray | None  # [n_head*hd] (qwen2)
    bk: np.ndarray | None  # [n_head_kv*hd]
    bv: np.ndarray | None  # [n_head_kv*hd]
    ffn_norm: np.ndarray  # [n_embd]
    w_gate: Matrix  # [n_ff, n_embd]
    w_up: Matrix  # [n_ff, n_embd]
    w_down: Matrix  # [n_embd, n_ff]


@dataclass(frozen=True)
class Weights:
    token_embd: Matrix  # [n_vocab, n_embd]
    output_norm: np.ndarray  # [n_embd]
    output: Matrix  # [n_vocab, n_embd]; token_embd itself when the embeddings are tied
    layers: tuple[LayerWeights, ...]
    tied_embeddings: bool


@dataclass(frozen=True)
class LoadedModel:
    file: GGUFFile
    args: ModelArgs
    tokenizer: Tokenizer
    weights: Weights


def load_gguf(path: str | os.PathLike) -> LoadedModel:
    file = GGUFFile(path)
    source = file.path.name
    args = ModelArgs.from_gguf(file.fields, source)
    tokenizer = Tokenizer.from_gguf_fields(file.fields, source)
    if tokenizer.n_vocab != args.n_vocab:
        raise ModelError(
            f"{source}: vocabulary size mismatch: tokenizer.ggml.tokens has {tokenizer.n_vocab} tokens, {args.arch}.vocab_size says {args.n_vocab}"
        )
    weights = _WeightReader(file, args).read()
    return LoadedModel(file, args, tokenizer, weights)


class _WeightReader:
    def __init__(self, file: GGUFFile, args: ModelArgs):
        self.file, self.args, self.source = file, args, file.path.name

    def _tensor(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        info = self.file.tensors.get(name)
        if info is None:
            raise ModelError(f"{self.source}: tensor {name!r} is missing; the file is incomplete or not a {self.args.arch} model")
        if not isinstance(info.qtype, GGMLQuantizationType) or info.qtype not in SUPPORTED:
            type_name = getattr(info.qtype, "name", f"id {info.qtype}")
            raise ModelError(
                f"{self.source}: tensor {name!r} has type {type_name}, which edgebox does not support; use one of {', '.join(t.name for t in SUPPORTED)}"
            )
        if info.shape != shape:
            raise ModelError(
                f"{self.source}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} from the model's hyper-parameters"
            )
        return info

    def matrix(self, name: str, n_out: int, n_in: int) -> Matrix:
        info = self._tensor(name, (n_out, n_in))
        return Matrix(name, info.qtype, n_out, n_in, info.data)

    def vector(self, name: str, n: int) -> np.ndarray:
        info = self._tensor(name, (n,))
        if info.qtype not in _VECTOR_TYPES:
            raise ModelError(
                f"{self.source}: tensor {name!r} is {info.qtype.name}; norm weights and biases must be F32, F16 or BF16"
            )
        # gguf-py's own decoding of its float types (exact, as kernels.ref's: the loader sits
        # below the kernels and must not import them); F32 stays a view of the mmap
        return gguf_quants.dequantize(info.data, info.qtype).reshape(n)

    def read(self) -> Weights:
        a = self.args
        q_dim, kv_dim = a.n_head * a.head_dim, a.n_head_kv * a.head_dim
        layers = []
        for i in range(a.n_layer):
            p = f"blk.{i}."
            bias = (lambda name, n: self.vector(p + name, n)) if a.qkv_bias else (lambda name, n: None)
            layers.append(
                LayerWeights(
                    attn_norm=self.vector(p + "attn_norm.weight", a.n_embd),
                    wq=self.matrix(p + "attn_q.weight", q_dim, a.n_embd),
                    wk=self.matrix(p + "attn_k.weight", kv_dim, a.n_embd),
                    wv=self.matrix(p + "attn_v.weight", kv_dim, a.n_embd),
                    wo=self.matrix(p + "attn_output.weight", a.n_embd, q_dim),
                    bq=bias("attn_q.bias", q_dim),
                    bk=bias("attn_k.bias", kv_dim),
                    bv=bias("attn_v.bias", kv_dim),
                    ffn_norm=self.vector(p + "ffn_norm.weight", a.n_embd),
                    w_gate=self.matrix(p + "ffn_gate.weight", a.n_ff, a.n_embd),
                    w_up=self.matrix(p + "ffn_up.weight", a.n_ff, a.n_embd),
                    w_down=self.matrix(p + "ffn_down.weight", a.n_embd, a.n_ff),
                )
            )
        token_embd = self.matrix("token_embd.weight", a.n_vocab, a.n_embd)
        tied = "output.weight" not in self.file.tensors
        output = token_embd if tied else self.matrix("output.weight", a.n_vocab, a.n_embd)
        return Weights(
            token_embd=token_embd,
            output_norm=self.vector("output_norm.weight", a.n_embd),
            output=output,
            layers=tuple(layers),
            tied_embeddings=tied,
        )
