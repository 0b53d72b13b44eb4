"""Chat templates (jinja2, HF / llama.cpp --jinja semantics) and DeepSeek-R1 reasoning splits."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from edgebox.errors import EdgeboxError
from edgebox.text.chat import render_chat, split_reasoning
from tests.fixtures.paths import DATA

TEMPLATES = DATA / "chat_templates"
EXPECTED = json.loads((TEMPLATES / "expected.json").read_text(encoding="utf-8"))
CONVERSATION = EXPECTED["conversation"]

BOS_R1 = "<｜begin▁of▁sentence｜>"
EOS_R1 = "<｜end▁of▁sentence｜>"


def template(name: str) -> str:
    return (TEMPLATES / name).read_text(encoding="utf-8")


# --- the three DeepSeek families against llama.cpp's expected prompts --------------------------


@pytest.mark.parametrize("case", EXPECTED["cases"], ids=lambda c: c["template"])
def test_deepseek_templates_render_llama_cpp_expected_output(case):
    out = render_chat(
        template(case["template"]),
        CONVERSATION,
        bos_token=case["bos_token"],
        eos_token=case["eos_token"],
        add_generation_prompt=True,
    )
    assert out == case["expected"]


def test_every_committed_template_has_an_expected_case():
    assert sorted(c["template"] for c in EXPECTED["cases"]) == sorted(p.name for p in TEMPLATES.glob("*.jinja"))


def test_r1_drops_past_reasoning_and_opens_thinking():
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    out = render_chat(template("deepseek-r1-distill-qwen-7b.jinja"), msgs, bos_token=BOS_R1, eos_token=EOS_R1)
    assert out == (f"{BOS_R1}<｜User｜>2+2?<｜Assistant｜>\n\n4{EOS_R1}<｜User｜>and 3+3?<｜Assistant｜><think>\n")


def test_r1_without_generation_prompt_ends_at_the_last_message():
    out = render_chat(
        template("deepseek-r1-distill-qwen-7b.jinja"), CONVERSATION[:2], bos_token=BOS_R1, add_generation_prompt=False
    )
    assert out == f"{BOS_R1}You are a helpful assistant<｜User｜>Hello"


def test_llm_chat_bos_and_eos_tokens_come_from_the_caller():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]
    out = render_chat(template("deepseek-llm-7b-chat.jinja"), msgs, bos_token="<B>", eos_token="<E>")
    assert out == "<B>User: Hi\n\nAssistant: Yo<E>User: ?\n\nAssistant:"


def test_coder_inserts_its_default_system_prompt_when_none_is_given():
    out = render_chat(template("deepseek-coder-6.7b-instruct.jinja"), [{"role": "user", "content": "sort a list"}])
    assert out.startswith("You are an AI programming assistant, utilizing the Deepseek Coder model")
    assert out.endswith("### Instruction:\nsort a list\n### Response:\n")


# --- environment: the HF / llama.cpp --jinja conventions ---------------------------------------

USER = [{"role": "user", "content": "x"}]


def test_trim_blocks_and_lstrip_blocks():
    assert render_chat("  {% if true %}\nA\n  {% endif %}\nB", USER) == "A\nB"


def test_tojson_keeps_key_order_and_unicode_like_hf():
    out = render_chat("{{ {'b': 1, 'a': 'é<>'} | tojson }}|{{ [1, 2] | tojson(indent=2) }}", USER)
    assert out == '{"b": 1, "a": "é<>"}|[\n  1,\n  2\n]'


def test_strftime_now():
    assert render_chat("{{ strftime_now('%Y') }}", USER) == str(datetime.now().year)


def test_loop_controls_and_generation_blocks():
    assert render_chat("{% for i in range(9) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}", USER) == "012"
    assert render_chat("{% generation %}kept{% endgeneration %}", USER) == "kept"


def test_messages_reach_the_template_with_extra_keys_and_are_not_modified():
    msgs = [{"role": "tool", "content": "42", "name": "calc"}]
    assert render_chat("{{ messages[0].name }}={{ messages[0]['content'] }}", msgs) == "calc=42"
    assert msgs == [{"role": "tool", "content": "42", "name": "calc"}]


# --- errors: one clear line, always EdgeboxError ----------------------------------------------


def _error(tmpl: str, messages=USER) -> str:
    with pytest.raises(EdgeboxError) as info:
        render_chat(tmpl, messages)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_raise_exception_becomes_edgebox_error():
    text = _error("{{ raise_exception('Conversation roles must\nalternate user/assistant') }}")
    assert "refused" in text and "Conversation roles must alternate user/assistant" in text


def test_syntax_error_names_the_line():
    text = _error("line one\n{% if %}")
    assert "does not parse" in text and "line 2" in text


@pytest.mark.parametrize(
    "tmpl",
    [
        "{{ ''.__class__.__mro__ }}",  # sandbox: no dunder access
        "{% set x = [] %}{{ x.append(1) }}",  # immutable sandbox: no mutation
        "{{ messages[5]['content'] }}",  # undefined, then used
        "{{ 1 + 'a' }}",  # type error inside the template
        "{{ undefined_function() }}",
    ],
)
def test_template_runtime_failures_are_edgebox_errors(tmpl):
    assert _error(tmpl).startswith("chat template failed:")


def test_empty_template_is_refused():
    _error("   ")


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ("hello", "must be a list"),
        ([], "is empty"),
        (["hi"], "messages[0] must be a dict"),
        ([{"role": "bot", "content": "hi"}], "messages[0]['role'] must be one of system, user, assistant, tool"),
        ([{"content": "hi"}], "messages[0]['role']"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": None}], "messages[1]['content'] must be a string"),
        ([{"role": "user", "content": ["parts"]}], "must be a string"),
    ],
)
def test_invalid_messages(messages, fragment):
    assert fragment in _error("{{ messages }}", messages)


# --- split_reasoning (llama.cpp --reasoning-format deepseek) -----------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        # llama.cpp tests/test-chat.cpp: message_assist_thoughts from the unparsed DeepSeek reply
        ("<think>I'm\nthinking</think>Hello, world!\nWhat's up?", ("I'm\nthinking", "Hello, world!\nWhat's up?")),
        # R1-Distill: the prompt ended with "<think>\n", so the reply only closes it (llama.cpp's
        # forced-open thinking tests)
        ("I'm\nthinking</think>Hello, world!\nWhat's up?", ("I'm\nthinking", "Hello, world!\nWhat's up?")),
        ("</think>Hello, world!\nWhat's up?", ("", "Hello, world!\nWhat's up?")),
        # R1's usual layout: whitespace around the reasoning and before the answer goes
        ("<think>\nLet me add.\n</think>\n\n4", ("Let me add.", "4")),
        ("\n<think>a</think>b", ("a", "b")),
        ("<think>\n\n</think>\n\nAnswer", ("", "Answer")),  # empty thinking
        # unterminated thinking (cut by max_tokens or a stop): all reasoning
        ("<think>\nstill going", ("still going", "")),
        ("<think>", ("", "")),
        # no tags: all content, untouched
        ("Just an answer.\n", ("", "Just an answer.\n")),
        ("", ("", "")),
        # split at the first </think>; later ones belong to the content
        ("<think>a</think>b</think>c", ("a", "b</think>c")),
        # <think> not at the start is content, not reasoning
        ("Use <think> tags.", ("", "Use <think> tags.")),
    ],
)
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_split_reasoning_when_the_prompt_opened_thinking():
    assert split_reasoning("cut off mid-thought", thinking_open=True) == ("cut off mid-thought", "")
    assert split_reasoning("done</think>\n\nanswer", thinking_open=True) == ("done", "answer")
    assert split_reasoning("cut off mid-thought") == ("", "cut off mid-thought")
