"""The forward pass, the KV cache and generation through the public API, on the bundled model."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest

import edgebox
from edgebox.gguf.file import GGUFFile
from edgebox.model import KVCache
from tests.fixtures import tiny_models
from tests.fixtures.paths import TEST_MODEL


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


@pytest.mark.parametrize("backend,chips", [("numba", 1), ("numba", 4), ("ref", 1), ("ref", 4)])
def test_decode_segments_attend_together_as_alone(backend, chips):
    """Several one-token segments in one step (continuous batching's decode: one attention call
    per chip and layer) give each sequence the logits, and the cache, it gets decoding alone."""
    from edgebox.model import Segment

    m = edgebox.load(TEST_MODEL, chips=chips, backend=backend)
    prompts = [[1, 50, 900, 7], [1, 31], [1, 2000, 15, 400, 3, 9, 8], [1]]  # ragged contexts
    ctx = [16, 9, 32, 12]  # and cache sizes
    together, alone = [], []
    for kvs in (together, alone):
        for ids, n in zip(prompts, ctx):
            kvs.append(m.transformer.new_cache(n))
            m.transformer.forward(np.array(ids, np.int32), np.arange(len(ids), dtype=np.int32), kvs[-1])
    nxt = [5, 6, 7, 8]
    segs = [Segment(np.array([t], np.int32), np.array([len(ids)], np.int32), kv) for t, ids, kv in zip(nxt, prompts, together)]
    got = m.transformer.forward_segments(segs)
    for t, ids, kv, kv_alone, row in zip(nxt, prompts, together, alone, got):
        want = m.transformer.forward(np.array([t], np.int32), np.array([len(ids)], np.int32), kv_alone, all_logits=False)
        # the matmuls of 4 rows and of 1 row sum in different orders (and may round an int8
        # activation differently): re-association only
        np.testing.assert_allclose(row, want, atol=2e-3 * float(np.abs(want).max()))
        assert kv.length == kv_alone.length == len(ids) + 1
        for a, b in zip(kv.k + kv.v, kv_alone.k + kv_alone.v):
            np.testing.assert_allclose(a[:, : kv.length].astype(np.float32), b[:, : kv.length].astype(np.float32), atol=2e-2)
    m.box.close()


def _quantized_copy(src, dst, qtype=gguf.GGMLQuantizationType.Q8_0):
    """The F32 file ``src`` with its layer matrices quantized (gguf-py's quantizer): a quantized
    qwen2 (QKV bias, GQA, neox rope) for the one-call decode path."""
    f = GGUFFile(src)
    w = gguf.GGUFWriter(str(dst), f.fields["general.architecture"])
    for key, value in f.fields.items():
        if key in ("general.architecture", "GGUF.kv_count", "GGUF.tensor_count", "GGUF.version"):
            continue
        vtype = f.field_types[key]
        if isinstance(value, np.ndarray):
            w.add_key_value(key, value.tolist(), vtype, sub_type=tiny_models._ARRAY_ITEM_TYPES[value.dtype.str])
        elif vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for name, t in f.tensors.items():
        values = t.data.view(np.float32).reshape(t.shape)
        if name.startswith("blk.") and name.endswith(".weight") and values.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.array(values))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("name", ["coder-Q8_0", "coder-Q4_0", "coder-Q4_K_M", "qwen2-Q8_0"])
@pytest.mark.parametrize("chips", [1, 4])
def test_one_call_decode_equals_the_step_by_step_path(name, chips, tiny_f32, tmp_path):
    """A one-token step of one sequence runs every layer in one hand-off per chip thread and one
    compiled call per layer (chips.decode); with that off, each chip's attention and FFN block in
    one compiled call (kernels.fused); with those off, step by step. The three give the same
    logits and cache (bit for bit on one chip; on four the threads' partial sums add in another
    order)."""
    from tests.fixtures.paths import DATA

    path = (
        _quantized_copy(tiny_f32("tiny-qwen2"), tmp_path / "qwen2-Q8_0.gguf")
        if name == "qwen2-Q8_0"
        else DATA / "models" / f"tiny-deepseek-{name}.gguf"
    )
    m = edgebox.load(path, chips=chips, backend="numba")
    ids = [1, 50, 900, 7, 31]
    kvs = [m.transformer.new_cache(16) for _ in range(3)]
    for kv in kvs:
        m.transformer.forward(np.array(ids, np.int32), np.arange(len(ids), dtype=np.int32), kv)
    layers = [layer for chip in m.box.chips for layer in chip.layers]
    assert m.box.token_decoder.plan() is not None  # every layer fits one call (Q4_K_M mixes types)
    decode = m.transformer.forward(np.array([9], np.int32), np.array([len(ids)], np.int32), kvs[0])
    assert not any(layer.decode_cache for layer in layers)  # the blocks were not called
    m.box.token_decoder.enabled = False
    blocks = m.transformer.forward(np.array([9], np.int32), np.array([len(ids)], np.int32), kvs[1])
    # the block path was taken wherever a chip has the block (Q4_K_M's q/k/v stacks hold two types)
    assert all(layer.decode_cache["ffn"] is not None for layer in layers if layer.w_gate_up is not None)
    assert all(layer.decode_cache["attn"] is not None for layer in layers if layer.wqkv is not None)
    for layer in layers:
        layer.decode_cache.update(attn=None, ffn=None)  # the step by step path from here on
    step_by_step = m.transformer.forward(np.array([9], np.int32), np.array([len(ids)], np.int32), kvs[2])
    tol = 1e-4 * float(np.abs(step_by_step).max())
    np.testing.assert_allclose(blocks, step_by_step, rtol=0, atol=tol)
    np.testing.assert_allclose(decode, step_by_step, rtol=0, atol=tol)
    if chips == 1:
        np.testing.assert_array_equal(decode, blocks)
    for a, b, c in zip(kvs[0].k + kvs[0].v, kvs[1].k + kvs[1].v, kvs[2].k + kvs[2].v):
        np.testing.assert_array_equal(b[:, : len(ids) + 1], c[:, : len(ids) + 1])
        if chips == 1:
            np.testing.assert_array_equal(a[:, : len(ids) + 1], b[:, : len(ids) + 1])
        else:
            np.testing.assert_allclose(
                a[:, : len(ids) + 1].astype(np.float32), b[:, : len(ids) + 1].astype(np.float32), atol=2e-3
            )
    m.box.close()


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
    proc = subprocess.run(
        [sys.executable, "-m", "edgebox.cli", "run", "-p", "def fibonacci(n):", "-n", "8", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "prompt:" in proc.stderr and "decode:" in proc.stderr and "tok/s" in proc.stderr


def test_cli_chat_uses_the_template():
    proc = subprocess.run(
        [sys.executable, "-m", "edgebox.cli", "run", "--chat", "-p", "hello", "-n", "4", "--temp", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # the DeepSeek-Coder instruct template wraps the message in its system prompt and "### Instruction:"
    assert "prompt: " in proc.stderr and int(proc.stderr.split("prompt: ")[1].split()[0]) > 20


def test_cli_bad_sampling_value_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "edgebox.cli", "run", "-p", "x", "--top-p", "2"], capture_output=True, text=True, timeout=120
    )
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


def test_transformer_never_touches_a_chip():
    """The forward pass sees only the box's blocks (box.attention / box.ffn / box.lm_head), as
    gpt-fast's model sees its tp.py: no chip, no per-chip attribute, no closure handed to the box."""
    import ast
    import inspect

    from edgebox.model import transformer

    tree = ast.parse(inspect.getsource(transformer))
    per_chip = {
        "chips",
        "index",
        "kv_of_head",
        "decode_cache",
        "n_kv",
        "n_heads",
        "wqkv",
        "run",
        "threads",
        "all_reduce",
        "gather",
    }
    assert not [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in per_chip]
    assert not [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id.lower() in ("chip", "chips")]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Lambda)]
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m.startswith("edgebox.chips")} == {"edgebox.chips.box"}
    called = {
        n.func.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "box"
    }
    assert {"attention", "ffn", "lm_head"} <= called


# -- arguments the API refuses with one line (issue 15, item 6) -------------------------------------


@pytest.mark.parametrize("ids", [[], [2**40], [-1], [1.5], [True], [[1, 2]]])
def test_logits_refuses_ids_that_are_not_token_ids(model, ids):
    """Before: [] divided by zero in the forward pass, [2**40] overflowed int32 with a traceback."""
    with pytest.raises(edgebox.EdgeboxError) as err:
        model.logits(ids)
    assert "token id" in str(err.value) and "\n" not in str(err.value)


def test_stream_refuses_prompt_ids_outside_the_vocabulary(model):
    with pytest.raises(edgebox.EdgeboxError, match="token ids must be integers"):
        list(model.stream([1, model.args.n_vocab + 5], max_tokens=1))


@pytest.mark.parametrize("n_ctx, expected", [(None, 4096), (0, 8192), (16, 16), (10_000, 8192)])
def test_context_size(tmp_path, n_ctx, expected):
    """None: min(4096, trained); 0: the trained context (llama.cpp's -c 0); larger: capped at it.
    Before: 0 silently meant 4096."""
    from tools.make_hostile_corpus import U32, nano

    path = tmp_path / "ctx8192.gguf"
    path.write_bytes(nano().with_kv("llama.context_length", U32, 8192).to_bytes())
    assert edgebox.load(path, n_ctx=n_ctx, backend="ref").n_ctx == expected


@pytest.mark.parametrize("n_ctx", [-5, -1, 2.5, "64", True])
def test_context_size_refuses_what_is_not_a_size(micro_gguf, n_ctx):
    """Before: -5 was accepted (and 0 meant 4096)."""
    with pytest.raises(edgebox.EdgeboxError, match="n_ctx must be None"):
        edgebox.load(micro_gguf(), n_ctx=n_ctx, backend="ref")


def test_non_finite_logits_are_one_model_error(tmp_path):
    """Corrupt weights (a NaN in the lm head): generate raises a ModelError naming the token, not
    the sampler's ValueError traceback."""
    from tools.make_hostile_corpus import nano

    base = nano()
    out = np.frombuffer(base.tensors[-1].data, "<f4").copy()
    out[5] = np.nan
    path = tmp_path / "nan.gguf"
    path.write_bytes(base.with_tensor("output.weight", data=out.tobytes()).to_bytes())
    m = edgebox.load(path, backend="ref")
    with pytest.raises(edgebox.ModelError, match=r"non-finite logits \(largest nan\) at token 2; the file's weights are corrupt"):
        list(m.generate("hi", max_tokens=2))
