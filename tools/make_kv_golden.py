"""Golden logits of llama.cpp run with a quantized KV cache (``--cache-type-k/-v``), for the KV-type
parity test (tests/unit/model/test_kv_golden.py).

    python tools/make_kv_golden.py      # rewrites tests/data/kv_golden/tiny-deepseek-coder-F32.npz

llama-cpp-python (the oracle, never a runtime dependency) runs the tiny DeepSeek-Coder model in
F32 (tests/fixtures/tiny_models.py builds it deterministically; 2 layers, 4 heads of 64; F32 so
that llama.cpp's 8-bit activations of quantized weights do not hide the cache's own rounding,
which the test must see) with type_k/type_v =
f16/f16, q8_0/q8_0 and q4_0/q4_0, flash attention on (llama.cpp quantizes V only with flash
attention; for K it quantizes the query to q8_0 in the dot product, as edgebox does), on a prompt
of ~100 tokens in one batch (its own keys are read back from the quantized cache) followed by
N_DECODE one-token steps of fixed tokens (the f16 run's greedy continuation, so every type decodes
the same ids). It records, per cache type, the logits of every position for a fixed set of ids
(random ones and the f16 rows' top ids: full 32k rows would make megabytes), each full row's
standard deviation (errors are normalized by it), and the model file's sha256.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures import tiny_models  # noqa: E402

REPO = tiny_models.REPO
SPEC = tiny_models.SPECS["tiny-deepseek-coder"]
OUT = REPO / "tests" / "data" / "kv_golden" / "tiny-deepseek-coder-F32.npz"

PROMPT = (
    "The edge box keeps the keys and values of every token it has read, one row per head and layer. "
    "def moving_average(xs, n):\n    out = []\n    for i in range(len(xs) - n + 1):\n"
    "        out.append(sum(xs[i : i + n]) / n)\n    return out\n\n"
    "print(moving_average([1, 2, 3, 4, 5, 6], 3))  # three at a time\n"
)
TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # llama.cpp's names -> GGML_TYPE_*
N_DECODE = 4
N_RANDOM_IDS = 128
N_TOP_IDS = 16


def run(model: Path, type_name: str, ids: list[int], decode: list[int] | None) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits [len(ids) + N_DECODE, V] with K and V of ``type_name``; ``decode``: the
    tokens to feed after the prompt (None: greedy from its own logits)."""
    import llama_cpp

    t = TYPES[type_name]
    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=256,
        n_batch=256,
        n_threads=2,
        type_k=t,
        type_v=t,
        flash_attn=True,
        logits_all=True,
        verbose=False,
        seed=0,
    )
    llm.eval(ids)
    rows = [np.array(llm.scores[i], np.float32) for i in range(len(ids))]
    fed = []
    for step in range(N_DECODE):
        token = int(np.argmax(rows[-1])) if decode is None else decode[step]
        fed.append(token)
        llm.eval([token])
        rows.append(np.array(llm.scores[llm.n_tokens - 1], np.float32))
    llm.close()
    return np.stack(rows), fed


def main() -> None:
    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_models.build(SPEC, Path(tmp) / f"{SPEC.name}-F32.gguf")
        vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
        ids = vocab.tokenize(PROMPT.encode(), add_bos=True, special=True)
        base, decode = run(model, "f16", ids, None)
        logits = {"f16": base}
        for name in ("q8_0", "q4_0"):
            logits[name], _ = run(model, name, ids, decode)
        sha = tiny_models.sha256(model)
    rng = np.random.default_rng(19)
    top = np.argsort(base, axis=1)[:, -N_TOP_IDS:][:: len(base) // 8].reshape(-1)  # top ids of some rows
    keep = np.union1d(rng.choice(base.shape[1], N_RANDOM_IDS, replace=False), top).astype(np.int32)
    out = {
        "prompt_ids": np.array(ids, np.int32),
        "decode_ids": np.array(decode, np.int32),
        "vocab_ids": keep,
        "sha256": np.array(sha),
    }
    for name, full in logits.items():
        out[f"logits_{name}"] = full[:, keep]
        out[f"std_{name}"] = full.std(axis=1).astype(np.float32)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    for name in ("q8_0", "q4_0"):
        d = np.abs(logits[name] - base) / base.std(axis=1, keepdims=True)
        print(f"llama.cpp {name} vs f16: max |diff|/std {d.max():.4f}, mean {d.mean():.5f}")
    print(f"{OUT.relative_to(REPO)}: {len(ids)} prompt + {N_DECODE} decode rows x {len(keep)} ids, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
