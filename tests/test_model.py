"""The forward pass, the KV cache and generation through the public API, on the bundled model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import edgebox
from conftest import TEST_MODEL
from edgebox.model import KVCache


@pytest.fixture(scope="module")
def model():
    return edgebox.load(TEST_MODEL)


def test_default_model_is_bundled():
    m = edgebox.load()
    assert edgebox.default_model_path().exists()
    assert m.path == edgebox.default_model_path()
    assert m.args.arch == "llama" and m.args.rope_freq_scale == 0.25  # DeepSeek-Coder's linear rope x4


def test_incremental_decode_equals_full_prompt(model):
    ids = model.tokenize("def add(a, b):\n    return a + b\n")
    full = model.logits(ids)  # [T, V]
    kv = model.new_cache()
    split = len(ids) // 2
    first = model.transformer.forward(np.array(ids[:split], np.int32), np.arange(split, dtype=np.int32), kv)
    rows = [first]
    for i in range(split, len(ids)):
        rows.append(model.transformer.forward(np.array([ids[i]], np.int32), np.array([i], np.int32), kv))
    incremental = np.concatenate(rows)
    # f16 KV cache on both paths: only float re-association separates them
    np.testing.assert_allclose(incremental, full, rtol=0, atol=1e-3 * full.std())


def test_same_seed_same_text(model):
    # the random-weight model mostly repeats its input; a hot, unfiltered sampler makes seeds matter
    hot = dict(max_tokens=20, temperature=3.0, top_k=0, top_p=1.0, min_p=0.0)
    a = "".join(model.generate("import os\n", seed=7, **hot))
    b = "".join(model.generate("import os\n", seed=7, **hot))
    c = "".join(model.generate("import os\n", seed=8, **hot))
    assert a == b and a != c


def test_max_tokens_and_done_reason(model):
    gen = model.stream("x = ", max_tokens=5, params=edgebox.SamplingParams(temperature=0.0))
    text = "".join(gen)
    assert len(gen.tokens) == 5 and gen.stats.done_reason == "length"
    assert text == model.detokenize(gen.tokens)


def test_stop_string_ends_generation(model):
    greedy = edgebox.SamplingParams(temperature=0.0)
    full = "".join(model.stream("x = ", max_tokens=12, params=greedy))
    stop = full[3:5]
    gen = model.stream("x = ", max_tokens=12, params=greedy, stop=[stop])
    text = "".join(gen)
    assert gen.stats.done_reason == "stop"
    assert text == full[: full.index(stop)]


def test_prompt_over_context_is_refused(micro_gguf):
    m = edgebox.load(micro_gguf(), n_ctx=16)
    with pytest.raises(edgebox.ContextOverflowError, match="16"):
        list(m.generate("a" * 40, max_tokens=4))
    with pytest.raises(edgebox.ContextOverflowError):
        m.logits(list(range(17)))


def test_logits_rejects_bad_ids(model):
    with pytest.raises(edgebox.EdgeboxError, match="token ids"):
        model.logits([1, model.args.n_vocab])


def test_kv_cache_is_lazily_committed(model):
    kv = KVCache(model.args, 2048)
    assert kv.k[0].shape == (model.args.n_layer, 2048, model.args.n_head_kv, model.args.head_dim)
    assert kv.k[0].dtype == np.float16 and kv.length == 0


def test_cli_run_streams_text_and_timing():
    """The README's quick-start command, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "edgebox.cli", "run", "-p", "def fibonacci(n):", "-n", "8", "--seed", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "prompt:" in proc.stderr and "decode:" in proc.stderr and "tok/s" in proc.stderr


def test_cli_chat_uses_the_template():
    proc = subprocess.run([sys.executable, "-m", "edgebox.cli", "run", "--chat", "-p", "hello", "-n", "4", "--temp", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # the DeepSeek-Coder instruct template wraps the message in its system prompt and "### Instruction:"
    assert "prompt: " in proc.stderr and int(proc.stderr.split("prompt: ")[1].split()[0]) > 20


def test_cli_bad_sampling_value_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "edgebox.cli", "run", "-p", "x", "--top-p", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "top_p" in proc.stderr


def test_engine_on_four_chips_matches_one_chip():
    """Continuous batching (prompt chunks and decode rows of several sequences in one step) on four
    chips run from the engine's thread: the same greedy text as one chip gives."""
    from edgebox.engine import Engine, Request

    greedy = edgebox.SamplingParams(temperature=0.0)
    prompts = ["def add(a, b):", "import numpy as np\n", "class Stack:\n    def push(self, x):"]
    texts = {}
    for chips in (1, 4):
        m = edgebox.load(TEST_MODEL, chips=chips)
        e = Engine(m, max_batch=3, prefill_chunk=8)
        try:
            handles = [e.submit(Request(prompt=p, max_tokens=10, params=greedy)) for p in prompts]
            texts[chips] = [h.result(timeout=120).text for h in handles]
        finally:
            e.close(drain=False)
            m.box.close()
    assert texts[4] == texts[1]
