"""The daemon's command path in process: prompts refused before tokenizing.
The daemon end to end, with a real Mosquitto, is tests/integration/test_daemon.py."""

from __future__ import annotations

import edgebox
from edgebox.daemon.engine_host import certainly_too_long, longest_token_bytes
from tests.fixtures.paths import TEST_MODEL

# -- prompts that cannot fit are refused before the tokenizer holds the GIL for them -----------------------


def test_a_prompt_that_cannot_fit_is_known_without_tokenizing():
    m = edgebox.load(TEST_MODEL, chips=1)
    longest = longest_token_bytes(m.tokenizer)
    assert longest == max(len(m.tokenizer.token_to_piece(i)) for i in range(m.tokenizer.n_vocab))
    flood = "word " * 40_000  # issue #15's 200 kB prompts
    assert certainly_too_long(flood, m.n_ctx, longest) >= m.n_ctx
    for prompt in (flood, "x" * 200_000, "é" * 70_000, "<|EOT|>" * 30_000, " " * 150_000, "word " * 3_000):
        bound = certainly_too_long(prompt, m.n_ctx, longest)
        assert bound <= len(m.tokenize(prompt, add_bos=False)), prompt[:10]  # a true lower bound
    assert certainly_too_long("word " * 3_000, m.n_ctx, longest) == 0  # too long too, but the tokenizer says so
