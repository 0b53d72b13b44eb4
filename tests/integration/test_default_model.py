"""The bundled model: it is the recipe's output, and its perplexity agrees with llama.cpp's."""

from __future__ import annotations

import json
import math

import pytest

import edgebox
from edgebox.commands.perplexity import perplexity
from tests.fixtures import tiny_models
from tests.fixtures.paths import DATA, REPO

RECORD = json.loads((REPO / "edgebox" / "data" / "default.json").read_text())
GOLDEN = json.loads((DATA / "golden" / "perplexity.json").read_text())

pytestmark = pytest.mark.golden


def test_bundled_model_is_the_recipes_output():
    path = edgebox.default_model_path()
    assert tiny_models.sha256(path) == RECORD["files"]["Q8_0"]["sha256"], (
        "edgebox/data/default.gguf is not the Q8_0 file tools/train_tiny.py recorded in edgebox/data/default.json"
    )
    assert path.stat().st_size < 25 * 2**20


def test_bundled_model_perplexity_matches_llama_cpp():
    golden = GOLDEN["variants"]["Q8_0"]
    assert golden["sha256"] == RECORD["files"]["Q8_0"]["sha256"]
    m = edgebox.load(n_ctx=GOLDEN["ctx"])
    tokens = m.tokenize((REPO / GOLDEN["sample"]).read_text())
    ours = perplexity(m.logits, tokens, GOLDEN["ctx"], m.tokenizer.bos_id, progress=False)
    theirs = golden["llama_cpp"]
    assert ours.n_chunks == theirs["n_chunks"]
    assert abs(ours.ppl / theirs["ppl"] - 1) < 0.01, (ours.ppl, theirs["ppl"])
    # trained: far below the untrained model's held-out perplexity (about the vocabulary's size)
    assert ours.ppl < GOLDEN["untrained_heldout_ppl"] / 20
    assert math.isfinite(ours.ppl_err) and ours.ppl_err > 0


def test_bundled_model_completes_python():
    m = edgebox.load()
    text = "".join(m.generate("def fibonacci(n):", max_tokens=24, temperature=0.0))
    # a model trained on the standard library indents the body and writes Python (measured: a
    # docstring, then a comment); the random-weight model it replaced wrote word salad
    assert text.startswith("\n    ") and any(word in text for word in ('"""', "#", "return", "if ", "=", "("))
