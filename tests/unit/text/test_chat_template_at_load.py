"""A model whose chat template is hostile or broken is refused at load, with one line (text.chat)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import edgebox
from edgebox.errors import ModelError
from edgebox.text.chat import check_chat_template
from edgebox.text.template_sandbox import RENDER_SECONDS
from tests.fixtures.paths import DATA

HOSTILE = DATA / "chat_templates" / "hostile"
LOOP_BOMB = (HOSTILE / "loop-bomb.jinja").read_text(encoding="utf-8")


def refusal(template: str) -> str:
    with pytest.raises(ModelError) as info:
        check_chat_template(template, "bomb.gguf")
    text = str(info.value)
    assert "\n" not in text and text.startswith("bomb.gguf: tokenizer.chat_template is refused")
    return text


@pytest.mark.parametrize("name", ["loop-bomb.jinja", "string-multiplication-bomb.jinja", "nested-parentheses-300.jinja"])
def test_hostile_templates_are_refused(name):
    refusal((HOSTILE / name).read_text(encoding="utf-8"))


def test_a_template_that_fails_on_a_plain_conversation_is_refused():
    assert "UndefinedError" in refusal("{{ messages[0].content.missing.deeper }}")


def test_the_templates_own_raise_exception_is_not_a_fault():
    # Gemma-style: refuses system messages, fine for every other conversation
    check_chat_template("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}", "m")


@pytest.mark.parametrize("template", [None, "", "  \n", 42])
def test_no_template_is_nothing_to_check(template):
    check_chat_template(template, "m")


def test_load_refuses_the_model_and_accepts_a_good_one(micro_gguf):
    with pytest.raises(ModelError, match="bomb.gguf: tokenizer.chat_template is refused.*ran longer than"):
        edgebox.load(micro_gguf("bomb.gguf", extra_kv={"tokenizer.chat_template": LOOP_BOMB}))
    good = edgebox.load(micro_gguf("good.gguf", extra_kv={"tokenizer.chat_template": "{{ messages[-1].content }}"}))
    try:
        assert good.render_chat([{"role": "user", "content": "hi"}]) == "hi"
    finally:
        good.box.close()


@pytest.mark.slow
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_cli_run_refuses_a_bomb_model_with_one_line(micro_gguf, chat):
    """``edgebox run FILE [--chat] -p hi``: exit 2 and one line within seconds, chat mode or not
    (the file is hostile either way; text.chat says why)."""
    path = micro_gguf("bomb.gguf", extra_kv={"tokenizer.chat_template": LOOP_BOMB})
    cmd = [sys.executable, "-m", "edgebox.cli", "run", str(path), "-p", "hi", "-n", "2"] + (["--chat"] if chat else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "bomb.gguf: tokenizer.chat_template is refused" in proc.stderr
    assert "ran longer than" in proc.stderr and proc.stdout == ""
    assert seconds < RENDER_SECONDS + 15, f"{seconds:.1f} s"  # the CLI starts (imports, model load) in a few seconds
