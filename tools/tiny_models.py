"""Build tiny F32 test models with the real DeepSeek/Qwen2 tokenizers (deterministic, seeded).

Each spec copies the tokenizer.* and general.* metadata of a vocab-only GGUF from shared/vocab,
adds its architecture's hyper-parameters and writes random weights with gguf-py's writer. The
output is bit-for-bit reproducible (legacy ``RandomState`` streams never change), so the tests
rebuild the F32 files instead of committing them, and golden data made by llama.cpp on them
stays valid; ``tools/make_golden.py`` quantizes them with llama.cpp's quantizer.

    python tools/tiny_models.py OUT_DIR        # writes every spec as OUT_DIR/<name>-F32.gguf
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgebox.gguf_file import GGUFFile  # noqa: E402


CHAT_TEMPLATES = REPO / "tests" / "data" / "chat_templates"


def shared_dir() -> Path:
    """shared/ sits beside the repository (in CI too); EDGEBOX_SHARED_DIR overrides."""
    return Path(os.environ.get("EDGEBOX_SHARED_DIR", REPO.parent / "shared"))


def vocab_path(name: str) -> Path:
    return shared_dir() / "vocab" / f"ggml-vocab-{name}.gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class TinySpec:
    name: str
    vocab: str  # shared/vocab/ggml-vocab-<vocab>.gguf
    arch: str  # llama | qwen2
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    rope_base: float
    rope_linear_factor: float | None = None
    tied: bool = False
    n_ctx: int = 2048
    seed: int = 0
    # Tied embeddings with unit-variance rows make every token predict itself (its own logit is
    # |e|^2); smaller rows leave the layers room to matter, so sampling shows some variety.
    embd_std: float = 1.0
    chat_template: str | None = None  # file name under tests/data/chat_templates (the real family template)


SPECS: dict[str, TinySpec] = {s.name: s for s in (
    # DeepSeek-LLM-7B in miniature: llama, MHA, its 102k vocabulary.
    TinySpec("tiny-deepseek-llm", "deepseek-llm", "llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=4,
             n_ff=160, rope_base=10000.0, seed=1, chat_template="deepseek-llm-7b-chat.jinja"),
    # DeepSeek-Coder-6.7B in miniature: linear rope scaling x4; 256 wide so K-quants apply;
    # tied embeddings keep the quantized copies small.
    TinySpec("tiny-deepseek-coder", "deepseek-coder", "llama", n_embd=256, n_layer=2, n_head=4, n_head_kv=4,
             n_ff=512, rope_base=100000.0, rope_linear_factor=4.0, tied=True, seed=2, embd_std=0.15,
             chat_template="deepseek-coder-6.7b-instruct.jinja"),
    # DeepSeek-R1-Distill-Qwen in miniature: qwen2, GQA (4 query heads per 2 KV heads), QKV bias, neox rope.
    TinySpec("tiny-qwen2", "qwen2", "qwen2", n_embd=64, n_layer=2, n_head=4, n_head_kv=2,
             n_ff=160, rope_base=1000000.0, tied=True, seed=3, embd_std=0.15,
             chat_template="deepseek-r1-distill-qwen-7b.jinja"),
)}


_OWN_KEYS = ("general.architecture", "general.file_type", "general.name")
_ARRAY_ITEM_TYPES = {
    "<i4": gguf.GGUFValueType.INT32, "<u4": gguf.GGUFValueType.UINT32, "<f4": gguf.GGUFValueType.FLOAT32,
    "|b1": gguf.GGUFValueType.BOOL, "<i8": gguf.GGUFValueType.INT64, "|u1": gguf.GGUFValueType.UINT8,
}


def _copy_vocab_metadata(writer: gguf.GGUFWriter, vocab: GGUFFile) -> None:
    for key, value in vocab.fields.items():
        if not key.startswith(("tokenizer.", "general.")) or key in _OWN_KEYS or key == "tokenizer.chat_template":
            continue
        vtype = vocab.field_types[key]
        if isinstance(value, np.ndarray):
            writer.add_key_value(key, value.tolist(), vtype, sub_type=_ARRAY_ITEM_TYPES[value.dtype.str])
        elif vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype)


def build(spec: TinySpec, out: Path) -> Path:
    """Write ``spec`` as an F32 GGUF at ``out`` and return it."""
    vocab = GGUFFile(vocab_path(spec.vocab))
    n_vocab = len(vocab.fields["tokenizer.ggml.tokens"])
    rng = np.random.RandomState(spec.seed)
    hd = spec.n_embd // spec.n_head
    a = spec.arch

    def matrix(n_out: int, n_in: int) -> np.ndarray:
        # scaled so activations keep unit size through the layers: logits stay informative
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), a)
    w.add_name(spec.name)
    w.add_description("edgebox test model with random weights: its output is noise")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(n_vocab)
    if spec.rope_linear_factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.rope_linear_factor)
    _copy_vocab_metadata(w, vocab)
    if spec.chat_template:
        w.add_chat_template((CHAT_TEMPLATES / spec.chat_template).read_text())

    w.add_tensor("token_embd.weight", (spec.embd_std * rng.standard_normal((n_vocab, spec.n_embd))).astype(np.float32))
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(spec.n_embd))
        w.add_tensor(p + "attn_q.weight", matrix(spec.n_head * hd, spec.n_embd))
        w.add_tensor(p + "attn_k.weight", matrix(spec.n_head_kv * hd, spec.n_embd))
        w.add_tensor(p + "attn_v.weight", matrix(spec.n_head_kv * hd, spec.n_embd))
        if a == "qwen2":
            w.add_tensor(p + "attn_q.bias", bias(spec.n_head * hd))
            w.add_tensor(p + "attn_k.bias", bias(spec.n_head_kv * hd))
            w.add_tensor(p + "attn_v.bias", bias(spec.n_head_kv * hd))
        w.add_tensor(p + "attn_output.weight", matrix(spec.n_embd, spec.n_head * hd))
        w.add_tensor(p + "ffn_norm.weight", norm(spec.n_embd))
        w.add_tensor(p + "ffn_gate.weight", matrix(spec.n_ff, spec.n_embd))
        w.add_tensor(p + "ffn_up.weight", matrix(spec.n_ff, spec.n_embd))
        w.add_tensor(p + "ffn_down.weight", matrix(spec.n_embd, spec.n_ff))
    w.add_tensor("output_norm.weight", norm(spec.n_embd))
    if not spec.tied:
        w.add_tensor("output.weight", matrix(n_vocab, spec.n_embd) * 4.0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for spec in SPECS.values():
        print(build(spec, Path(sys.argv[1]) / f"{spec.name}-F32.gguf"))
