"""Models that have a shape but no bytes: what a dry run needs, without a 3.9 GB file.

A dry run (``Engine(..., dry_run=True)``) reads only the hyper-parameters, the partition plan and
each tensor's type and byte count; it never touches a weight.  So a power experiment on the full
DeepSeek-LLM-7B shape can run where the file is not (CI): ``shape_model(DEEPSEEK_7B, "Q4_0")``
builds the same ``Box`` (same shards, same per-chip bytes, same device time and power) over
zero-stride views of a single byte, which report the full ``nbytes`` and occupy nothing.

``ShapeModel`` is the part of ``edgebox.api.Model`` the engine uses; its tokenizer counts one
token per whitespace-separated word, so a workload states its prompt lengths exactly, whichever
model the shape came from.  It cannot generate text (a dry run samples nothing).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType

from edgebox.chips.box import Box
from edgebox.errors import ModelError
from edgebox.gguf.args import LlamaArgs, ModelArgs
from edgebox.gguf.loader import LayerWeights, Matrix, Weights
from edgebox.gguf.quant_types import row_bytes
from edgebox.hw.profile import ChipProfile
from edgebox.model import KVCache, Transformer

# DeepSeek-LLM-7B (base and chat): the hyper-parameters of its GGUF files.
DEEPSEEK_7B = LlamaArgs(
    n_vocab=102400,
    n_embd=4096,
    n_layer=30,
    n_head=32,
    n_head_kv=32,
    n_ff=11008,
    n_ctx_train=4096,
    n_rot=128,
    rope_freq_base=10000.0,
    rope_freq_scale=1.0,
    rms_eps=1e-6,
    source="deepseek-llm-7b (shape)",
)

_ONE_BYTE = np.zeros(1, np.uint8)


def _matrix(name: str, qtype: GGMLQuantizationType, n_out: int, n_in: int) -> Matrix:
    # a zero-stride view: slicing (the partition's row/column shards) and nbytes behave as on the
    # mmap of a real file, and no memory is used
    data = np.broadcast_to(_ONE_BYTE, (n_out, row_bytes(qtype, n_in)))
    return Matrix(name, qtype, n_out, n_in, data)


def shape_weights(
    args: ModelArgs, qtype: GGMLQuantizationType | str = "Q4_0", types: dict[str, GGMLQuantizationType] | None = None
) -> Weights:
    """Weights of ``args``'s shape: every matrix ``qtype`` unless ``types`` (tensor name -> type,
    as in a GGUF file) says otherwise; norms are float32 ones."""
    default = GGMLQuantizationType[qtype] if isinstance(qtype, str) else qtype
    types = types or {}
    q_dim, kv_dim, d = args.n_head * args.head_dim, args.n_head_kv * args.head_dim, args.n_embd
    ones = np.ones(d, np.float32)

    def m(name: str, n_out: int, n_in: int) -> Matrix:
        return _matrix(name, types.get(name, default), n_out, n_in)

    layers = tuple(
        LayerWeights(
            attn_norm=ones,
            ffn_norm=ones,
            wq=m(f"blk.{i}.attn_q.weight", q_dim, d),
            wk=m(f"blk.{i}.attn_k.weight", kv_dim, d),
            wv=m(f"blk.{i}.attn_v.weight", kv_dim, d),
            wo=m(f"blk.{i}.attn_output.weight", d, q_dim),
            bq=np.zeros(q_dim, np.float32) if args.qkv_bias else None,
            bk=np.zeros(kv_dim, np.float32) if args.qkv_bias else None,
            bv=np.zeros(kv_dim, np.float32) if args.qkv_bias else None,
            w_gate=m(f"blk.{i}.ffn_gate.weight", args.n_ff, d),
            w_up=m(f"blk.{i}.ffn_up.weight", args.n_ff, d),
            w_down=m(f"blk.{i}.ffn_down.weight", d, args.n_ff),
        )
        for i in range(args.n_layer)
    )
    token_embd = m("token_embd.weight", args.n_vocab, d)
    tied = bool(types) and "output.weight" not in types
    output = token_embd if tied else m("output.weight", args.n_vocab, d)
    return Weights(token_embd=token_embd, output_norm=ones, output=output, layers=layers, tied_embeddings=tied)


class WordTokenizer:
    """One token per whitespace-separated word (ids 1..n_vocab-1, never end-of-generation)."""

    eog_ids = frozenset({0})
    add_bos = False
    bos_id = None

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return [1 + zlib.crc32(w.encode()) % (self.n_vocab - 1) for w in text.split()]  # stable across runs

    def decode(self, ids) -> str:
        return " ".join("w" for _ in ids)

    def stream_decoder(self):
        return _NullDecoder()


class _NullDecoder:
    def feed(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


@dataclass
class ShapeModel:
    """What the engine needs of a model, for dry runs only."""

    args: ModelArgs
    box: Box
    n_ctx: int = 4096
    name: str = ""

    def __post_init__(self) -> None:
        self.tokenizer = WordTokenizer(self.args.n_vocab)
        self.transformer = Transformer(self.args, None, self.box)
        self.n_ctx = min(self.n_ctx, self.args.n_ctx_train)

    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        return self.transformer.new_cache(n_ctx or self.n_ctx)

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text)

    def tokenize_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def render_chat(self, messages: list[dict]) -> str:
        return " ".join(str(m.get("content", "")) for m in messages)

    def close(self) -> None:
        self.box.close()


def shape_model(
    args: ModelArgs = DEEPSEEK_7B,
    qtype: GGMLQuantizationType | str = "Q4_0",
    chips: int = 4,
    profile: str | ChipProfile | None = None,
    n_ctx: int = 4096,
    types: dict[str, GGMLQuantizationType] | None = None,
    name: str = "",
) -> ShapeModel:
    """A dry-run model of ``args``'s shape split over ``chips`` chips (r100-edge for chips > 1)."""
    weights = shape_weights(args, qtype, types)
    # the reference backend: it prepares nothing per matrix (a packing backend would copy the
    # zero-stride views into real memory, 3.9 GB for the 7B shape)
    box = Box(args, weights, chips, profile=profile, backend="ref", source=name or args.source)
    return ShapeModel(args, box, n_ctx=n_ctx, name=name or args.source)


def shape_model_of_file(
    path: str | Path, chips: int = 4, profile: str | ChipProfile | None = None, n_ctx: int = 4096
) -> ShapeModel:
    """The shape of a GGUF file (hyper-parameters and tensor types; the header only is read)."""
    from edgebox.gguf.file import GGUFFile

    f = GGUFFile(path)
    args = ModelArgs.from_gguf(f.fields, f.path.name)
    types = {name: t.qtype for name, t in f.tensors.items() if len(t.shape) == 2}
    if "token_embd.weight" not in types:
        raise ModelError(f"{f.path.name}: tensor 'token_embd.weight' is missing; the file is incomplete")
    return shape_model(args, types["token_embd.weight"], chips, profile, n_ctx, types=types, name=f.path.name)
