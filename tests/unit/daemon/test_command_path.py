"""The daemon's command path in process: prompts refused before tokenizing, the in-progress
journal. The daemon end to end, with a real Mosquitto, is tests/integration/test_daemon.py."""

from __future__ import annotations

import json
import time

import edgebox
from edgebox.daemon.engine_host import certainly_too_long, longest_token_bytes
from edgebox.daemon.journal import Journal, default_state_dir, journal_path, key_of
from tests.fixtures.paths import TEST_MODEL

REPLY = "edgebox/v1/box-1/reply/me"


# -- the in-progress journal -------------------------------------------------------------------------------


def test_journal_survives_a_restart_as_suspects(tmp_path):
    path = journal_path(tmp_path / "state", "edgebox-box/1")
    assert path.name == "in-progress-edgebox-box_1.jsonl"
    j = Journal(path)
    a, b = key_of(("generate", REPLY, b"c", "a")), key_of(("generate", REPLY, None, "b"))
    j.add(a, "generate", "a")
    j.add(b, "generate", "b")
    j.remove(b)
    assert len(j) == 1 and not j.suspects
    # the process dies here (no close); the next run finds "a" only
    again = Journal(path)
    assert set(again.suspects) == {a} and again.suspect(a)["request_id"] == "a" and again.suspect(b) is None
    again.remove(a)  # answered: forgotten for good
    assert not Journal(path).suspects


def test_journal_skips_a_torn_line_and_stays_bounded(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path, max_entries=10)
    for i in range(1000):
        j.add(f"k{i}", "generate", f"r{i}")
        if i >= 3:
            j.remove(f"k{i - 3}")
    assert len(j) == 3 and len(path.read_text().splitlines()) <= 2 * 3 + 64 + 1
    with open(path, "a") as f:
        f.write('{"op": "+", "key": "torn", "t": 1')  # a power cut mid-line
    assert set(Journal(path).suspects) == {"k997", "k998", "k999"}
    full = Journal(tmp_path / "full.jsonl", max_entries=10)
    for i in range(25):
        full.add(f"k{i}", "generate", f"r{i}")
    assert len(full) == 10 and set(Journal(tmp_path / "full.jsonl", max_entries=10).suspects) == {f"k{i}" for i in range(15, 25)}


def test_journal_forgets_what_the_session_would_have_forgotten(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"op": "+", "key": "old", "t": time.time() - 100, "method": "generate", "request_id": "o"}) + "\n")
    assert Journal(path, max_age_s=1000).suspects and not Journal(path, max_age_s=10).suspects


def test_an_unwritable_journal_goes_on_in_memory(tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    j = Journal(tmp_path / "a-file" / "j.jsonl")  # its directory cannot be made, even by root
    j.add("k", "generate", "r")
    assert len(j) == 1 and "going on without it" in caplog.text


def test_state_dir_is_systemds_or_the_xdg_state_home(tmp_path):
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/edgebox:/x"}) == default_state_dir(
        {"STATE_DIRECTORY": "/var/lib/edgebox"}
    )
    assert str(default_state_dir({"STATE_DIRECTORY": "/var/lib/edgebox"})) == "/var/lib/edgebox"
    assert default_state_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "edgebox"


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
