"""Chat prompts from the Jinja chat template stored in a GGUF file (``tokenizer.chat_template``).

Rendering follows Hugging Face transformers' ``apply_chat_template`` (llama.cpp's ``--jinja``
reproduces it; the environment is ``chat_jinja``). A template is untrusted input from a model
file: it is compiled and rendered only in a worker process bounded in time, memory and output
(``template_sandbox``), and every failure is one ``EdgeboxError`` line.

``check_chat_template`` renders a representative conversation once when a model loads, so a
hostile or broken template refuses the load (``ModelError``, naming the file and the field)
before any request uses it; ``edgebox run FILE -p hi`` without ``--chat`` refuses it too. That is
stricter than llama.cpp, which errs only when the template is used: a file carrying a template
bomb is hostile, and the daemon must answer its ``load_model`` with 400 rather than fail the first
chat request after reporting the model loaded. The template's own ``raise_exception`` on that
conversation (say, "System role not supported") is a verdict on the messages, not a fault.

OpenAI ``tools``, assistant ``tool_calls`` and ``tool`` messages render through the same template
(``render_chat(..., tools=...)``); the call syntax, the reply parser and the forced-call grammar
live in ``tool_calls``.

``split_reasoning`` separates a DeepSeek-R1 style reply into its ``<think>`` part and the answer,
as llama.cpp's ``--reasoning-format deepseek``.
"""

from __future__ import annotations

import json
from functools import lru_cache

from edgebox.errors import EdgeboxError, ModelError
from edgebox.text import tool_calls
from edgebox.text.template_protocol import OK, RAISED
from edgebox.text.template_sandbox import RENDERER

ROLES = ("system", "user", "assistant", "tool")
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
FIELD = "tokenizer.chat_template"
# What a template is test-rendered with at load: every role a chat uses, and a generation prompt.
CHECK_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you?"},
)


def render_chat(
    template: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    tool_choice: object = None,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    template_name: str = "",
) -> str:
    """The prompt text for ``messages`` rendered through the Jinja chat ``template``.

    ``messages`` are ``{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}``; extra
    keys (JSON values) pass through to the template. An assistant message may carry OpenAI
    ``tool_calls`` (``content`` then may be None), a tool message its ``tool_call_id``. The
    result starts with ``bos_token`` when the template writes it: tokenize it without adding a
    second BOS (llama.cpp strips it for the same reason). Any template failure, including its own
    ``raise_exception`` and every limit of ``template_sandbox``, is an ``EdgeboxError``.
    Thread-safe.

    ``tools`` (OpenAI's list) are rendered as the template renders them, for every
    ``tool_choice`` (llama.cpp does so too: the choice acts on the reply, through
    ``tool_calls.plan_tools``); a template that renders calls but never describes tools gets them
    in its system prompt (``tool_calls.tools_system_text``). Tools or calls for a template with
    no call syntax are a ``ToolsUnsupportedError`` naming ``template_name``.
    """
    if not isinstance(template, str) or not template.strip():
        raise EdgeboxError("chat template is empty; the model file has no usable tokenizer.chat_template")
    messages = _validated(messages)
    tools = tool_calls.validate_tools(tools)
    tool_calls.validate_tool_choice(tool_choice, tools)
    family = None
    if tools or any(m.get("tool_calls") for m in messages):
        family = tool_calls.detect_family(template)
        if family is None:
            raise tool_calls.unsupported(template_name)
        describes_tools, object_arguments = _tool_caps(template)
        messages = _with_tool_calls(messages, object_arguments)
        if tools and not describes_tools:
            messages = _with_tools_in_system(messages, tool_calls.tools_system_text(family, tools))
    context = dict(messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt)
    if tools:
        context["tools"] = tools
    kind, text = RENDERER.render(template, context)
    if kind != OK:
        raise EdgeboxError(text)
    if family == tool_calls.DEEPSEEK_R1:
        text = tool_calls.fix_r1_prompt(text, add_generation_prompt, eos_token)
    return text


_PROBE_NAME = "edgebox_probe_function"
_PROBE_VALUE = "edgebox_probe_value"


@lru_cache(maxsize=16)
def _tool_caps(template: str) -> tuple[bool, bool]:
    """``(describes_tools, object_arguments)``, found the way llama.cpp's ``jinja/caps.cpp`` finds
    them, by rendering probes: does a tool's name reach the prompt; does a call with its arguments
    as an object render them (Qwen2.5 writes ``arguments | tojson``) or must they stay the JSON
    string OpenAI sends (R1 concatenates them)."""
    user = {"role": "user", "content": "x"}
    tool = {"type": "function", "function": {"name": _PROBE_NAME, "parameters": {"type": "object"}}}
    kind, text = RENDERER.render(template, dict(messages=[user], tools=[tool], add_generation_prompt=True))
    describes_tools = kind == OK and _PROBE_NAME in text
    call = {"id": "call_0", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {"arg": _PROBE_VALUE}}}
    msgs = [user, {"role": "assistant", "content": None, "tool_calls": [call]}]
    kind, text = RENDERER.render(template, dict(messages=msgs, add_generation_prompt=False))
    return describes_tools, kind == OK and _PROBE_VALUE in text


def _with_tool_calls(messages: list[dict], object_arguments: bool) -> list[dict]:
    """Calls as the template wants them: arguments parsed into objects or kept as JSON text, and
    no content (None, which R1's template tests for) beside calls when none was given."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                args = c["function"]["arguments"]
                args = json.loads(args) if object_arguments else args
                calls.append({**c, "function": {**c["function"], "arguments": args}})
            m = {**m, "content": m.get("content") or None, "tool_calls": calls}
        out.append(m)
    return out


def _with_tools_in_system(messages: list[dict], text: str) -> list[dict]:
    if messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def check_chat_template(template: object, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
    """Refuse (``ModelError``) a template that cannot render ``CHECK_CONVERSATION`` within the
    limits; ``source`` names the model file. No template (or a blank one) is nothing to check:
    chat mode then says the model has none."""
    if not isinstance(template, str) or not template.strip():
        return
    context = dict(messages=list(CHECK_CONVERSATION), bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True)
    kind, text = RENDERER.render(template, context)
    if kind not in (OK, RAISED):
        raise ModelError(f"{source}: {FIELD} is refused, the model is not loaded: {text}")


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
            raise EdgeboxError(f"messages[{i}]['role'] must be one of {', '.join(ROLES)}; got {repr(role)[:80]}")
        content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise EdgeboxError(f"messages[{i}] has tool_calls but role {role!r}; only assistant messages make calls")
            _check_calls(calls, f"messages[{i}]['tool_calls']")
        if not isinstance(content, str) and not (calls and content is None):
            raise EdgeboxError(f"messages[{i}]['content'] must be a string; got {type(content).__name__}")
        if "tool_call_id" in m and not isinstance(m["tool_call_id"], str):
            raise EdgeboxError(f"messages[{i}]['tool_call_id'] must be a string; got {type(m['tool_call_id']).__name__}")
        out.append(m)  # the worker gets a JSON copy: the caller's dicts stay theirs
    return out


def _check_calls(calls: object, where: str) -> None:
    """OpenAI's shape: ``[{"id", "type": "function", "function": {"name", "arguments": JSON text}}]``."""
    if not isinstance(calls, list) or not calls:
        raise EdgeboxError(f"{where} must be a non-empty list of {{'type': 'function', 'function': {{...}}}}")
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise EdgeboxError(f"{where}[{j}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
        args = fn.get("arguments")
        try:
            ok = isinstance(args, str) and isinstance(json.loads(args), dict)
        except ValueError:
            ok = False
        if not ok:
            raise EdgeboxError(f"{where}[{j}].function.arguments must be a JSON object as a string; got {repr(args)[:80]}")


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
