"""Chat prompts from the Jinja chat template stored in a GGUF file (``tokenizer.chat_template``).

Rendering follows Hugging Face transformers' ``apply_chat_template`` (which llama.cpp's
``--jinja`` mode also reproduces): an immutable sandbox with ``trim_blocks`` and
``lstrip_blocks``, the globals ``raise_exception`` and ``strftime_now``, a ``tojson`` filter that
keeps key order and non-ASCII text, and ``messages``, ``bos_token``, ``eos_token`` and
``add_generation_prompt`` in the context. A template is untrusted input (it comes from a model
file), hence the sandbox.

``split_reasoning`` separates a DeepSeek-R1 style reply into its ``<think>`` part and the answer,
as llama.cpp's ``--reasoning-format deepseek``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgebox.errors import EdgeboxError

ROLES = ("system", "user", "assistant", "tool")
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class _TemplateRaised(Exception):
    """What ``raise_exception(...)`` in a template throws, so we can word it as the template's own."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF's override of Jinja's tojson: no key sorting, no HTML escaping, UTF-8 kept as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: HF marks assistant spans for training masks with
    it. We only need the text, so the block renders its body unchanged (templates that use the
    tag would otherwise fail to parse)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the "generation" token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # A server renders the same template for every request: parse it once.
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise EdgeboxError(f"chat template does not parse: {_one_line(e.message)} (template line {e.lineno})") from None


def render_chat(
    template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "", add_generation_prompt: bool = True
) -> str:
    """The prompt text for ``messages`` rendered through the Jinja chat ``template``.

    ``messages`` are ``{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}``; extra
    keys pass through to the template. The result starts with ``bos_token`` when the template
    writes it: tokenize it without adding a second BOS (llama.cpp strips it for the same reason).
    Any template failure, including its own ``raise_exception``, is an ``EdgeboxError``.
    """
    if not isinstance(template, str) or not template.strip():
        raise EdgeboxError("chat template is empty; the model file has no usable tokenizer.chat_template")
    checked = _validated(messages)
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=checked, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
        )
    except _TemplateRaised as e:
        raise EdgeboxError(f"chat template refused the messages: {_one_line(str(e))}") from None
    except Exception as e:  # undefined names, sandbox violations, type errors in the template...
        raise EdgeboxError(f"chat template failed: {type(e).__name__}: {_one_line(str(e))}") from None


def _validated(messages: object) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise EdgeboxError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise EdgeboxError("messages is empty; give at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise EdgeboxError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise EdgeboxError(f"messages[{i}]['role'] must be one of {', '.join(ROLES)}; got {role!r}")
        content = m.get("content")
        if not isinstance(content, str):
            raise EdgeboxError(f"messages[{i}]['content'] must be a string; got {type(content).__name__}")
        out.append(dict(m))  # a copy: the caller's dicts stay theirs
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


def split_reasoning(text: str, *, thinking_open: bool = False) -> tuple[str, str]:
    """``(reasoning, content)`` of a DeepSeek-R1 style reply, like llama.cpp's
    ``--reasoning-format deepseek``.

    - ``"<think>R</think>C"``: reasoning R, content C;
    - ``"R</think>C"``: the ``<think>`` was the end of the prompt (R1-Distill templates add it
      to the generation prompt), same split;
    - ``"<think>R"`` with no closing tag (the reply was cut short): all reasoning, no content;
    - no tags: no reasoning, all content, unless ``thinking_open`` says the prompt opened a
      ``<think>`` block, in which case an unterminated reply is all reasoning.

    Reasoning is stripped of surrounding whitespace (whitespace-only reasoning becomes ""),
    content of leading whitespace (R1 writes ``"</think>\\n\\n"`` before its answer). The split is
    at the first ``</think>``.
    """
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
        body, opened = body[len(THINK_OPEN) :], True
    else:
        body, opened = text, thinking_open
    head, sep, tail = body.partition(THINK_CLOSE)
    if sep:
        return head.strip(), tail.lstrip()
    if opened:
        return body.strip(), ""
    return "", text


class ReasoningStream:
    """Tags streamed text as reasoning or content, the streaming form of ``split_reasoning``.

    ``push(delta)`` returns ``[(is_reasoning, text), ...]`` ready to emit; a suffix that could be
    the start of ``<think>``/``</think>`` is held back until the next push decides it, so a tag
    split across tokens is never emitted as text. The tags themselves are not emitted.
    """

    def __init__(self, thinking_open: bool = False):
        self.in_reasoning = thinking_open
        self._seen_text = thinking_open  # an opening <think> counts only at the very start
        self._held = ""

    def push(self, delta: str) -> list[tuple[bool, str]]:
        text, out = self._held + delta, []
        self._held = ""
        while text:
            if not self._seen_text:
                stripped = text.lstrip()
                if not stripped or THINK_OPEN.startswith(stripped):
                    self._held = text  # only whitespace or a partial "<think>" so far
                    return out
                self._seen_text = True
                if stripped.startswith(THINK_OPEN):
                    self.in_reasoning, text = True, stripped[len(THINK_OPEN) :]
                    continue
            if not self.in_reasoning:
                out.append((False, text))
                return out
            head, sep, tail = text.partition(THINK_CLOSE)
            if sep:
                if head:
                    out.append((True, head))
                self.in_reasoning, text = False, tail
                continue
            keep = _partial_suffix(text, THINK_CLOSE)
            if len(text) > keep:
                out.append((True, text[: len(text) - keep]))
            self._held = text[len(text) - keep :]
            return out
        return out

    def flush(self) -> list[tuple[bool, str]]:
        held, self._held = self._held, ""
        return [(self.in_reasoning, held)] if held else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
