"""OpenAI tool calls in a chat template's own syntax: detecting it, parsing replies, forcing calls.

A template *family* is the call syntax its text writes (``detect_family``), as llama.cpp's
``common/chat.cpp`` tells formats apart by markers in the template source:

- ``hermes`` (Qwen2.5, Hermes 2 Pro): ``<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>``
- ``deepseek-r1`` (DeepSeek-R1-Distill): ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>N``
  ``\\n```json\\n{...}\\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>``

``ToolCallParser`` turns the generated text, fed piece by piece, into OpenAI's ``content`` and
``tool_calls``; its deltas are OpenAI's streaming deltas and the whole text at once gives the
non-streaming answer, so the two agree. Rules, each applied once:

- markup is never emitted; whitespace next to markup is dropped; a call is emitted when its
  closing marker arrives and its body parsed (header delta, then compact JSON arguments);
- a malformed call (not JSON, arguments not an object, an unknown function) or one cut short is
  plain content, markup included, as llama.cpp leaves text it cannot read;
- under a forced call (``stream_arguments``) the header goes out as soon as the arguments start
  and the arguments follow as generated; a call cut short keeps what it has;
- with no tools (``tool_choice: "none"``) everything is content.

``forced_call_grammar``: the Lark text (llguidance) making a reply exactly a call with arguments
valid against the parameter schema (``tool_choice`` "required" or a named function).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from edgebox.errors import EdgeboxError

HERMES = "hermes"
DEEPSEEK_R1 = "deepseek-r1"
FAMILIES = (HERMES, DEEPSEEK_R1)

# DeepSeek's markers (the ▁ is U+2581, the bars U+FF5C, as in its vocabulary)
R1_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
R1_CALLS_END = "<｜tool▁calls▁end｜>"
R1_CALL_BEGIN = "<｜tool▁call▁begin｜>"
R1_CALL_END = "<｜tool▁call▁end｜>"
R1_SEP = "<｜tool▁sep｜>"
R1_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
THINK_CLOSE = "</think>"

TOOL_CHOICES = ("none", "auto", "required")


class ToolsUnsupportedError(EdgeboxError):
    """A request with tools for a model whose chat template has no tool-call syntax (HTTP 400)."""


def detect_family(template: str) -> str | None:
    """The tool-call family the template text writes, or None when it writes no call syntax."""
    if R1_CALLS_BEGIN in template:
        return DEEPSEEK_R1
    if HERMES_OPEN in template:
        return HERMES
    return None


# --- the request's fields --------------------------------------------------------------------


def validate_tools(tools: object) -> list[dict]:
    """``tools`` as OpenAI sends it, checked: ``[{"type": "function", "function": {"name",
    "description"?, "parameters"?}}]``; names unique. None is no tools."""
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise EdgeboxError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}; got {type(tools).__name__}")
    seen = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise EdgeboxError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise EdgeboxError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'; got {repr(name)[:80]}")
        if name in seen:
            raise EdgeboxError(f"tools[{i}].function.name {name!r} is given twice; function names must be unique")
        seen.add(name)
        params = fn.get("parameters", {})
        if not isinstance(params, dict):
            raise EdgeboxError(f"tools[{i}].function.parameters must be a JSON Schema object; got {type(params).__name__}")
    return list(tools)


def validate_tool_choice(tool_choice: object, tools: list[dict]) -> str:
    """``"none"``, ``"auto"``, ``"required"`` or the forced function's name (from
    ``{"type": "function", "function": {"name": N}}``), checked against ``tools``."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise EdgeboxError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a function; got {tool_choice[:80]!r}")
        if tool_choice == "required" and not tools:
            raise EdgeboxError("tool_choice is 'required' but tools is empty; give the functions the model may call")
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise EdgeboxError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")
    if name not in tool_names(tools):
        raise EdgeboxError(f"tool_choice names function {name[:64]!r}, which is not in tools")
    return name


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def parameters(tool: dict) -> dict:
    """A function's argument schema; OpenAI lets ``parameters`` be left out: then no arguments."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


# --- the template's call syntax ----------------------------------------------------------------


def render_call_example(family: str, name: str, arguments: str) -> str:
    """One call as the family writes it in a reply (the markup the template renders and the
    parser reads); ``arguments`` is JSON text."""
    if family == HERMES:
        return f'{HERMES_OPEN}\n{{"name": "{name}", "arguments": {arguments}}}\n{HERMES_CLOSE}'
    return f"{R1_CALLS_BEGIN}{R1_CALL_BEGIN}function{R1_SEP}{name}\n```json\n{arguments}\n```{R1_CALL_END}{R1_CALLS_END}"


def tools_system_text(family: str, tools: list[dict]) -> str:
    """What a template that renders calls but never describes the tools (R1-Distill's) gets
    added to its system prompt: the functions and the template's own call syntax. minja's
    tools polyfill, which llama.cpp applied to such templates, did the same."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    example = render_call_example(family, "<function-name>", "<arguments-json-object>")
    return f"You may call one or more of these functions:\n{lines}\n\nTo call one, reply with:\n{example}"


def fix_r1_prompt(prompt: str, add_generation_prompt: bool, eos_token: str) -> str:
    """The R1-Distill template's two gaps in tool conversations, closed as llama.cpp closes them:
    after a single call it never writes ``<｜tool▁calls▁end｜>`` and the end of the turn, and after
    tool results it leaves the turn open with no assistant prompt."""
    prompt = re.sub(
        re.escape(R1_CALL_END) + r"\s*(" + re.escape("<｜tool▁outputs▁begin｜>") + "|" + re.escape("<｜User｜>") + ")",
        lambda m: R1_CALL_END + R1_CALLS_END + eos_token + m.group(1),
        prompt,
    )
    if prompt.endswith(R1_OUTPUTS_END):
        prompt += eos_token + ("<｜Assistant｜>" if add_generation_prompt else "")
    return prompt


# --- parsing the reply -------------------------------------------------------------------------


def new_call_id() -> str:
    """``call_`` and 24 random letters and digits, OpenAI's shape."""
    alphabet = string.ascii_letters + string.digits
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


@dataclass
class ToolCallResult:
    """The whole reply: ``content`` (None when the reply was only calls), OpenAI ``tool_calls``,
    and ``deltas``: what ``finish`` released for a stream (text held back to the end)."""

    content: str | None
    tool_calls: list[dict]
    deltas: list[dict] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        """``"tool_calls"`` when calls were made; otherwise the caller keeps its own (stop, length)."""
        return "tool_calls" if self.tool_calls else None


@dataclass(frozen=True)
class _Syntax:
    call_open: str
    call_close: str
    framing: tuple[str, ...]  # markers around the calls, dropped
    head: str  # a call's text from call_open to its arguments, "{name}" for the name (forced_call_grammar's)
    tail: str  # from the arguments to call_close


_SYNTAX = {
    HERMES: _Syntax(HERMES_OPEN, HERMES_CLOSE, (), '\n{{"name": "{name}", "arguments": ', "}\n"),
    DEEPSEEK_R1: _Syntax(
        R1_CALL_BEGIN, R1_CALL_END, (R1_CALLS_BEGIN, R1_CALLS_END), f"function{R1_SEP}{{name}}\n```json\n", "\n```"
    ),
}
_R1_BODY = re.compile(r"\s*(?:function)?" + re.escape(R1_SEP) + r"\s*([^\n`]+?)\s*```(?:json)?\s*(.*?)\s*```\s*", re.S)


class ToolCallParser:
    """Splits a reply into content and tool calls while it streams; see the module docstring.

    ``feed(text)`` returns the deltas ready to send: ``{"content": str}`` or ``{"tool_calls":
    [{"index", "id", "type", "function": {"name", "arguments"}}]}`` (later deltas of a call carry
    only ``index`` and ``function.arguments``). ``finish()`` returns the ``ToolCallResult``.
    Text that could be the start of a marker is held until the next piece decides it.
    """

    def __init__(
        self, family: str, tools: list[dict], *, stream_arguments: bool = False, new_id: Callable[[], str] = new_call_id
    ):
        if family not in _SYNTAX:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
        self.family = family
        self.syntax = _SYNTAX[family]
        self.names = set(tool_names(tools))
        self._new_id = new_id
        self._buf = ""  # text not yet decided
        self._in_call = False
        self._held_ws = ""  # trailing whitespace of the content, dropped if markup follows
        self._after_markup = False  # drop the whitespace that starts the next content
        self._ws_before_call = ""  # whitespace before a run of markup, given back if the call is plain text
        self._content: list[str] = []
        self.tool_calls: list[dict] = []
        self._markers = (self.syntax.call_open, *self.syntax.framing)
        self.stream_arguments = stream_arguments
        self._heads = {n: self.syntax.head.format(name=n) for n in self.names}
        self._open: dict | None = None  # the streamed call in progress: its dict and where its arguments start

    def feed(self, text: str) -> list[dict]:
        if not self.names:
            return self._content_delta(text)
        self._buf += text
        out: list[dict] = []
        while self._buf:
            if self._in_call:
                end = self._buf.find(self.syntax.call_close)
                if self.stream_arguments:
                    out += self._stream_call(self._buf if end < 0 else self._buf[:end], done=end >= 0)
                if end < 0:
                    return out
                body, self._buf = self._buf[:end], self._buf[end + len(self.syntax.call_close) :]
                self._in_call = False
                out += self._close_call(body)
                continue
            at, marker = _first_marker(self._buf, self._markers)
            if marker is None:
                keep = max(_partial_suffix(self._buf, m) for m in self._markers)
                ready, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
                out += self._emit(ready)
                return out
            out += self._emit(self._buf[:at])
            self._buf = self._buf[at + len(marker) :]
            if not self._after_markup:  # the first marker of a run: keep what it dropped
                self._ws_before_call = self._held_ws
            self._in_call = marker == self.syntax.call_open
            self._held_ws, self._after_markup = "", True
        return out

    def finish(self) -> ToolCallResult:
        out: list[dict] = []
        if self._in_call and self._open is not None:  # a streamed call cut short: the rest of its text
            out += self._stream_call(self._buf, done=False, cut=True)
            self._in_call, self._open = False, None
        elif self._in_call:  # cut short before its closing marker: plain text
            self._in_call = False
            out += self._as_text(self.syntax.call_open + self._buf)
        elif self._buf:
            out += self._emit(self._buf)
        self._buf = ""
        if self._held_ws and not self.tool_calls:
            out += self._content_delta(self._held_ws)
        self._held_ws = ""
        content = "".join(self._content)
        if self.tool_calls and not content:
            content = None
        return ToolCallResult(content, list(self.tool_calls), out)

    def _emit(self, text: str) -> list[dict]:
        """Content, minus whitespace that touches markup (held until we know)."""
        if self._after_markup:
            text = text.lstrip()
            if not text:
                return []
            self._after_markup = False
        text = self._held_ws + text
        body = text.rstrip()
        self._held_ws = text[len(body) :]
        return self._content_delta(body)

    def _as_text(self, raw: str) -> list[dict]:
        """A call that is not one (malformed, cut short): its raw text is content, with the
        whitespace before it given back."""
        self._held_ws, self._after_markup = self._ws_before_call, False
        return self._emit(raw)

    def _content_delta(self, text: str) -> list[dict]:
        if not text:
            return []
        self._content.append(text)
        return [{"content": text}]

    def _stream_call(self, body: str, done: bool, cut: bool = False) -> list[dict]:
        """Stream mode: the header delta once the call's text has reached its arguments, then
        each new piece of the arguments, holding back what could still be the tail. Under the
        forced-call grammar the call always ends well; a call cut short keeps the arguments it has."""
        out = []
        if self._open is None:
            name = next((n for n, h in self._heads.items() if body.startswith(h)), None)
            if name is None:
                return out
            out += self._new_call(name, "")
            self._open = {"call": self.tool_calls[-1], "at": len(self._heads[name])}
        args, sent = body[self._open["at"] :], self._open["call"]["function"]["arguments"]
        if done:
            args = args.removesuffix(self.syntax.tail)
        elif not cut:
            hold = len(self.syntax.tail) + _partial_suffix(args, self.syntax.call_close)
            args = args[: max(0, len(args) - hold)]
        if len(args) > len(sent) and args.startswith(sent):
            self._open["call"]["function"]["arguments"] = args
            out.append({"tool_calls": [{"index": len(self.tool_calls) - 1, "function": {"arguments": args[len(sent) :]}}]})
        return out

    def _new_call(self, name: str, arguments: str) -> list[dict]:
        index, call_id = len(self.tool_calls), self._new_id()
        self._ws_before_call = ""
        self.tool_calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        self._after_markup = True
        header = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        return [{"tool_calls": [header]}]

    def _close_call(self, body: str) -> list[dict]:
        if self._open is not None:  # streamed: already out
            self._open = None
            return []
        parsed = self._parse_body(body)
        if parsed is None:
            return self._as_text(self.syntax.call_open + body + self.syntax.call_close)
        name, arguments = parsed
        return self._new_call(name, arguments) + [
            {"tool_calls": [{"index": len(self.tool_calls) - 1, "function": {"arguments": arguments}}]}
        ]

    def _parse_body(self, body: str) -> tuple[str, str] | None:
        """``(name, arguments JSON text)`` of a well-formed call to a known function, else None."""
        if self.family == HERMES:
            try:
                call = json.loads(body)
            except ValueError:
                return None
            if not isinstance(call, dict):
                return None
            name, args = call.get("name"), call.get("arguments", {})
        else:
            m = _R1_BODY.fullmatch(body)
            if m is None:
                return None
            name = m.group(1)
            try:
                args = json.loads(m.group(2))
            except ValueError:
                return None
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if name not in self.names or not isinstance(args, dict):
            return None
        return name, json.dumps(args, ensure_ascii=False, separators=(",", ":"))


def parse_tool_calls(family: str, tools: list[dict], text: str) -> ToolCallResult:
    """The non-streaming form: the whole reply fed at once."""
    parser = ToolCallParser(family, tools)
    deltas = parser.feed(text)
    result = parser.finish()
    result.deltas = deltas + result.deltas
    return result


def _first_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    best, which = len(text), None
    for m in markers:
        i = text.find(m, 0, best + len(m))
        if 0 <= i < best:
            best, which = i, m
    return best, which


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


# --- forcing a call ------------------------------------------------------------------------------


def forced_call_grammar(
    family: str, tools: list[dict], tool_choice: str, *, parallel: bool = False, thinking_open: bool = False
) -> str:
    """Lark grammar (llguidance dialect) whose sentences are exactly one call (``parallel``: one
    or more) in the family's syntax, to one of ``tools`` (``tool_choice="required"``) or to the
    named function, its arguments valid against that function's ``parameters`` (``%json``).

    ``thinking_open``: the prompt ended inside ``<think>`` (R1's generation prompt); the reply
    first closes it (``</think>\\n\\n``, as R1 writes it, so ``chat.split_reasoning`` finds the
    call in the content), with no reasoning: llama.cpp's grammar allows only the closing tag too.
    """
    if family not in _SYNTAX:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    if tool_choice == "required":
        chosen = list(tools)
    else:
        chosen = [t for t in tools if t["function"]["name"] == tool_choice]
        if not chosen:
            raise EdgeboxError(f"tool_choice names function {tool_choice[:64]!r}, which is not in tools")
    rules = []
    alternatives = []
    for i, tool in enumerate(chosen):
        syntax = _SYNTAX[family]
        head = syntax.call_open + syntax.head.format(name=tool["function"]["name"])
        tail = syntax.tail + syntax.call_close
        rules.append(f"call_{i}: {_lit(head)} args_{i} {_lit(tail)}")
        schema = {**parameters(tool), "x-guidance": _JSON_LAYOUT}
        rules.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        alternatives.append(f"call_{i}")
    calls = 'call ("\\n" call)*' if parallel else "call"  # the templates put calls a newline apart
    if family == DEEPSEEK_R1:
        calls = f"{_lit(R1_CALLS_BEGIN)} {calls} {_lit(R1_CALLS_END)}"
    start = f"{_lit(THINK_CLOSE + chr(10) + chr(10))} {calls}" if thinking_open else calls
    lines = [f"start: {start}", f"call: {' | '.join(alternatives)}", *rules]
    return "\n".join(lines) + "\n"


# Arguments laid out as Python's json.dumps writes them (Qwen2.5's template renders past calls
# so): flexible whitespace would let a model pad the call without end.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lit(text: str) -> str:
    """A Lark string literal (JSON's escapes, which llguidance's Lark reads)."""
    return json.dumps(text, ensure_ascii=False)


# --- one request's plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    """What a request's ``tools`` and ``tool_choice`` mean for one model: the family, the grammar
    that forces a call (None unless ``required`` or a named function) and the reply's parser."""

    family: str | None
    tools: list[dict]
    tool_choice: str  # "none" | "auto" | "required" | a function name
    grammar: str | None

    def parser(self) -> ToolCallParser | None:
        """A fresh parser for one reply; None when no call may be made (then the reply is content)."""
        if self.family is None or self.tool_choice == "none":
            return None
        return ToolCallParser(self.family, self.tools, stream_arguments=self.grammar is not None)


def plan_tools(
    template: str | None, tools: object, tool_choice: object = None, *, template_name: str = "", thinking_open: bool = False
) -> ToolPlan:
    """Check ``tools`` and ``tool_choice`` against the model's chat ``template`` (named by
    ``template_name``, say the model file): tools for a template without call syntax are a
    ``ToolsUnsupportedError``, never a format of our own."""
    tools = validate_tools(tools)
    choice = validate_tool_choice(tool_choice, tools)
    if not tools:
        return ToolPlan(None, [], "none", None)
    family = detect_family(template or "")
    if family is None:
        raise unsupported(template_name)
    grammar = None
    if choice not in ("none", "auto"):
        grammar = forced_call_grammar(family, tools, choice, thinking_open=thinking_open)
    return ToolPlan(family, tools, choice, grammar)


def unsupported(template_name: str) -> ToolsUnsupportedError:
    where = f"the chat template of {template_name}" if template_name else "the model's chat template"
    return ToolsUnsupportedError(
        f"tools are not supported: {where} has no tool-call syntax (edgebox reads Qwen2.5's <tool_call> and "
        "DeepSeek-R1's <｜tool▁calls▁begin｜>); send the request without tools"
    )
