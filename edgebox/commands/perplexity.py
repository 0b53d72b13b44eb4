"""Perplexity the way llama.cpp's ``llama-perplexity`` measures it, so the figures compare.

The text is tokenized once (BOS added when the model says so) and cut into non-overlapping
chunks of ``n_ctx`` tokens (a tail shorter than a chunk is dropped). Each chunk is evaluated from
an empty cache with its first token replaced by BOS, and only the second half of the chunk is
scored, so every scored token has at least ``n_ctx/2`` tokens of context. The result is
``exp(mean NLL)`` with the standard error of the mean NLL times the perplexity as its ± (both as
llama.cpp prints them in "Final estimate: PPL = X +/- Y").
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgebox.errors import EdgeboxError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_err: float  # ± (standard error), llama.cpp's "+/-"
    n_chunks: int
    n_ctx: int
    scored_tokens: int
    seconds: float = 0.0


def chunk_tokens(tokens: Sequence[int], n_ctx: int, bos_id: int | None) -> list[list[int]]:
    """The chunks llama.cpp evaluates: n_ctx tokens each, the first one set to BOS."""
    if n_ctx < 4:
        raise EdgeboxError(f"--ctx must be at least 4, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise EdgeboxError(
            f"the text tokenizes to {len(tokens)} tokens; perplexity with --ctx {n_ctx} needs at least {2 * n_ctx}"
        )
    chunks = []
    for i in range(len(tokens) // n_ctx):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        chunks.append(chunk)
    return chunks


def chunk_nll(logits: np.ndarray, chunk: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of the second half of a chunk.

    ``logits`` [n_ctx, V] (row i predicts token i + 1); returns NLL [n_ctx - n_ctx/2 - 1] in float64.
    """
    n_ctx = len(chunk)
    first = n_ctx // 2
    rows = logits[first : n_ctx - 1].astype(np.float64)  # [n_scored, V]
    targets = np.asarray(chunk[first + 1 : n_ctx])  # [n_scored]
    top = rows.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    return log_z - rows[np.arange(len(targets)), targets]


def summarize(nll: np.ndarray, n_chunks: int, n_ctx: int, seconds: float = 0.0) -> PerplexityResult:
    count = len(nll)
    mean = float(nll.mean())
    var = float((nll**2).mean() - mean * mean)
    err = math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, err * ppl, n_chunks, n_ctx, count, seconds)


def perplexity(
    logits_of: Callable[[list[int]], np.ndarray], tokens: Sequence[int], n_ctx: int, bos_id: int | None, progress: bool = True
) -> PerplexityResult:
    """Perplexity with any evaluator ``logits_of(chunk) -> [n_ctx, V]`` (edgebox or llama.cpp)."""
    import time

    t0 = time.perf_counter()
    chunks = chunk_tokens(tokens, n_ctx, bos_id)
    nll = []
    for i, chunk in enumerate(chunks):
        nll.append(chunk_nll(logits_of(chunk), chunk))
        if progress:
            running = math.exp(float(np.concatenate(nll).mean()))
            print(f"\r[{i + 1}/{len(chunks)}] ppl {running:.4f}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return summarize(np.concatenate(nll), len(chunks), n_ctx, time.perf_counter() - t0)


def llama_cpp_logits_of(model_path: str, n_ctx: int, n_threads: int = 2) -> Callable[[list[int]], np.ndarray]:
    """llama.cpp (llama-cpp-python, an optional oracle) as an evaluator for the same chunks."""
    try:
        import llama_cpp
    except ImportError:
        raise EdgeboxError(
            "--vs-llama-cpp needs llama-cpp-python: pip install llama-cpp-python (it builds llama.cpp, ~10 min)"
        ) from None
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, logits_all=True, verbose=False)

    def logits_of(chunk: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(chunk)
        return np.array(llm.scores[: len(chunk)], dtype=np.float32)

    return logits_of
