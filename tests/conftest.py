"""Shared fixtures: paths to shared/ and test data, tiny models (real tokenizers), micro models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
# The tiny random-weight DeepSeek-Coder model (Q8_0 by llama.cpp): behaviour tests use it rather
# than the bundled trained model, whose replies (EOS, stops) depend on its training.
TEST_MODEL = DATA / "models" / "tiny-deepseek-coder-Q8_0.gguf"
sys.path.insert(0, str(REPO / "tools"))

import tiny_models  # noqa: E402


def shared_vocab(name: str) -> Path:
    path = tiny_models.vocab_path(name)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: shared/ must sit beside the repository (or set EDGEBOX_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_f32(tmp_path_factory):
    """Build (once per run) the F32 tiny model named ``name`` and check it is the file llama.cpp saw."""
    out_dir = tmp_path_factory.mktemp("tiny")
    record = json.loads((DATA / "golden" / "record.json").read_text())
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            path = tiny_models.build(tiny_models.SPECS[name], out_dir / f"{name}-F32.gguf")
            expected = record["models"][f"{name}-F32"]["sha256"]
            assert tiny_models.sha256(path) == expected, (
                f"tools/tiny_models.py no longer builds the {name} file the golden data was made from; "
                "run tools/make_golden.py again")
            built[name] = path
        return built[name]

    return get


def golden(key: str) -> dict[str, np.ndarray]:
    with np.load(DATA / "golden" / f"{key}.npz") as z:
        return dict(z)


# -- micro models: a 259-token byte vocabulary and one small layer, for the loader's error cases --

def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: one printable character per byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


MICRO = dict(n_embd=32, n_head=2, n_ff=64, n_layer=1)


def write_micro_gguf(path: Path, *, arch: str = "llama", skip: tuple[str, ...] = (), shapes: dict | None = None,
                     raw_types: dict | None = None, extra_kv: dict | None = None, vocab_size: int | None = None) -> Path:
    """A valid tiny GGUF, unless told to break it: drop tensors, change shapes or types, add keys."""
    tokens = _byte_tokens() + ["ab", "<s>", "</s>"]
    n_vocab = len(tokens)
    d, f = MICRO["n_embd"], MICRO["n_ff"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(MICRO["n_layer"])
    w.add_feed_forward_length(f)
    w.add_head_count(MICRO["n_head"])
    w.add_head_count_kv(MICRO["n_head"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab_size or n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * 257 + [3, 3])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    for key, value in (extra_kv or {}).items():
        w.add_string(key, value)
    rng = np.random.RandomState(0)
    names = {
        "token_embd.weight": (n_vocab, d), "output_norm.weight": (d,), "output.weight": (n_vocab, d),
        "blk.0.attn_norm.weight": (d,), "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (d, d),
        "blk.0.attn_v.weight": (d, d), "blk.0.attn_output.weight": (d, d), "blk.0.ffn_norm.weight": (d,),
        "blk.0.ffn_gate.weight": (f, d), "blk.0.ffn_up.weight": (f, d), "blk.0.ffn_down.weight": (d, f),
    }
    for name, shape in names.items():
        if name in skip:
            continue
        shape = (shapes or {}).get(name, shape)
        raw_type = (raw_types or {}).get(name)
        if raw_type is not None:
            block, size = gguf.GGML_QUANT_SIZES[raw_type]
            raw = rng.randint(0, 256, size=(int(np.prod(shape[:-1])), shape[-1] // block * size)).astype(np.uint8)
            w.add_tensor(name, raw, raw_dtype=raw_type)
        else:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def micro_gguf(tmp_path):
    def make(name: str = "micro.gguf", **kwargs) -> Path:
        return write_micro_gguf(tmp_path / name, **kwargs)

    return make
