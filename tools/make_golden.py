"""Make the golden test data with llama.cpp (the oracle): quantized tiny models and their logits.

    pip install llama-cpp-python        # builds llama.cpp from source (~10 min); never a runtime dependency
    python tools/make_golden.py         # rewrites tests/data/models/*.gguf and tests/data/golden/*

For every tiny model (tests/fixtures/tiny_models.py) and quant type it records, from llama.cpp:
- the prompt's token ids (llama.cpp's tokenizer, BOS added),
- logits at every prompt position, for the top-64 ids of each row and a fixed set of 1024 ids
  (full rows of a 150k vocabulary would make megabytes of test data),
- each full row's standard deviation (the tests normalize errors by it),
- a greedy continuation computed from llama.cpp's own logits,
- the sha256 of the model file, so a drifting model builder is caught instead of compared.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures import tiny_models  # noqa: E402

REPO = tiny_models.REPO
MODELS_DIR = REPO / "tests" / "data" / "models"
GOLDEN_DIR = REPO / "tests" / "data" / "golden"

PROMPT = (
    "The DeepSeek models run on small boxes at the edge of the network, where every watt counts. "
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
)
N_GREEDY = 16
N_TOP = 64
N_FIXED = 1024

# The quantized variants committed under tests/data/models (F32 files are rebuilt by the tests).
# Quant types are covered on the coder model only: a quantized copy of the 102k/152k-vocabulary
# models would add 15 MB each to the repository (their tokenizer metadata alone is 4-6 MB) and
# test no code path the F32 files and the coder quants do not already reach.
QUANTS: dict[str, tuple[str, ...]] = {
    "tiny-deepseek-coder": ("Q8_0", "Q4_0", "Q4_K_M"),
    "tiny-deepseek-llm": (),
    "tiny-qwen2": (),
}


def quantized_path(name: str, qtype: str) -> Path:
    return MODELS_DIR / f"{name}-{qtype}.gguf"


def quantize(src: Path, dst: Path, ftype_name: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src.name} -> {ftype_name}) failed with {rc}")


def golden(model_path: Path, out: Path) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)  # [T, V]

    # greedy continuation from llama.cpp's own logits
    greedy, last = [], logits[-1]
    for _ in range(N_GREEDY):
        token = int(np.argmax(last))
        greedy.append(token)
        llm.eval([token])
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)

    n_vocab = logits.shape[1]
    fixed = np.random.RandomState(1234).choice(n_vocab, size=min(N_FIXED, n_vocab), replace=False)
    top = np.argsort(-logits, axis=1)[:, :N_TOP]
    np.savez_compressed(
        out,
        ids=np.array(ids, np.int32),
        fixed_ids=fixed.astype(np.int32),
        fixed_logits=logits[:, fixed],
        top_ids=top.astype(np.int32),
        top_logits=np.take_along_axis(logits, top, axis=1),
        row_std=logits.std(axis=1),
        greedy=np.array(greedy, np.int32),
    )
    del llm


def main() -> None:
    import llama_cpp

    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    record = {"llama_cpp_python": llama_cpp.__version__, "prompt": PROMPT, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in tiny_models.SPECS.items():
            f32 = tiny_models.build(spec, Path(tmp) / f"{name}-F32.gguf")
            variants = {"F32": f32}
            for q in QUANTS[name]:
                variants[q] = quantized_path(name, q)
                quantize(f32, variants[q], q)
            for q, path in variants.items():
                key = f"{name}-{q}"
                print(f"golden {key}", flush=True)
                golden(path, GOLDEN_DIR / f"{key}.npz")
                record["models"][key] = {
                    "sha256": tiny_models.sha256(path),
                    "path": str(path.relative_to(REPO)) if q != "F32" else None,
                }
    (GOLDEN_DIR / "record.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
