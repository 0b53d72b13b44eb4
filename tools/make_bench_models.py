"""Build DeepSeek-LLM-7B-shaped GGUF files with random weights, for benchmarks and load tests.

    python tools/make_bench_models.py [OUT_DIR] [--types Q4_0,Q8_0,Q4_K_M]

Q4_0 and Q8_0 are written block by block straight from random bytes (with scales set so the
weights have the spread of a trained layer: std ~ 1/sqrt(n_in)); Q4_K_M is made from the Q8_0
file by llama.cpp's own quantizer (needs `pip install llama-cpp-python`). The hyper-parameters and
the 102k-token tokenizer are the real DeepSeek-LLM-7B ones, taken from tests/data/vocab.
Output: OUT_DIR/deepseek-llm-7b-shape-<TYPE>.gguf (OUT_DIR defaults to ./bench-models).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgebox.gguf.file import GGUFFile  # noqa: E402
from tests.fixtures import tiny_models  # noqa: E402

Q = gguf.GGMLQuantizationType


def _random_blocks(rng: np.random.Generator, n_rows: int, n_in: int, qtype: Q) -> np.ndarray:
    """uint8 [n_rows, row_bytes] of valid random blocks; the f16 scale of each block leads it."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n_in // block
    raw = rng.integers(0, 256, size=(n_rows, n_blocks, size), dtype=np.uint8)
    # values of a Q4_0 block are (q - 8) * d with q uniform in 0..15 (std 4.6); Q8_0: q * d, q uniform int8 (std 74)
    spread = 4.6 if qtype == Q.Q4_0 else 74.0
    d = (rng.uniform(0.8, 1.2, size=(n_rows, n_blocks)) / np.sqrt(n_in) / spread).astype(np.float16)
    raw[:, :, 0:2] = d.view(np.uint8).reshape(n_rows, n_blocks, 2)
    return raw.reshape(n_rows, n_blocks * size)


def write_raw(out: Path, qtype: Q, seed: int = 0) -> Path:
    vocab = GGUFFile(tiny_models.vocab_path("deepseek-llm"))
    f = vocab.fields
    n_vocab, d, n_ff, n_layer = (
        len(f["tokenizer.ggml.tokens"]),
        f["llama.embedding_length"],
        f["llama.feed_forward_length"],
        f["llama.block_count"],
    )
    rng = np.random.default_rng(seed)

    w = gguf.GGUFWriter(str(out), "llama")
    for key, value in f.items():
        if key in ("general.architecture", "general.file_type"):
            continue
        vtype = vocab.field_types[key]
        if isinstance(value, np.ndarray):
            w.add_key_value(key, value.tolist(), vtype, sub_type=tiny_models._ARRAY_ITEM_TYPES[value.dtype.str])
        elif vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if qtype == Q.Q4_0 else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_description("edgebox benchmark model: DeepSeek-LLM-7B shape, random weights")

    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (n_vocab, d))]
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes += [
            (p + "attn_norm.weight", (d,)),
            (p + "attn_q.weight", (d, d)),
            (p + "attn_k.weight", (d, d)),
            (p + "attn_v.weight", (d, d)),
            (p + "attn_output.weight", (d, d)),
            (p + "ffn_norm.weight", (d,)),
            (p + "ffn_gate.weight", (n_ff, d)),
            (p + "ffn_up.weight", (n_ff, d)),
            (p + "ffn_down.weight", (d, n_ff)),
        ]
    shapes += [("output_norm.weight", (d,)), ("output.weight", (n_vocab, d))]

    for name, shape in shapes:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4, Q.F32)
        else:
            row_bytes = shape[1] // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1]
            # a uint8 tensor is described by its byte shape; the writer derives the value shape
            w.add_tensor_info(name, (shape[0], row_bytes), np.dtype(np.uint8), shape[0] * row_bytes, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.time()
    for k, (_name, shape) in enumerate(shapes):
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, np.float32))
        else:
            w.write_tensor_data(_random_blocks(rng, shape[0], shape[1], qtype))
        if k % 45 == 0:
            print(f"  {out.name}: {k + 1}/{len(shapes)} tensors, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    w.close()
    return out


def quantize_with_llama_cpp(src: Path, dst: Path, ftype_name: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.allow_requantize = True  # the source is the Q8_0 file: a 7B F16 file would be 14 GB of disk for nothing
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise SystemExit(f"llama.cpp failed to quantize {src} to {ftype_name}")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default="bench-models")
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_K_M")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")
    path = lambda t: out_dir / f"deepseek-llm-7b-shape-{t}.gguf"  # noqa: E731
    for t in ("Q4_0", "Q8_0"):
        if t in types or (t == "Q8_0" and "Q4_K_M" in types):
            if not path(t).exists():
                print(write_raw(path(t), Q[t]))
    if "Q4_K_M" in types and not path("Q4_K_M").exists():
        print(quantize_with_llama_cpp(path("Q8_0"), path("Q4_K_M"), "Q4_K_M"))


if __name__ == "__main__":
    main()
