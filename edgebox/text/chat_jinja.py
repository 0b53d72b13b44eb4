"""The Jinja side of chat templates: the environment and one render, run only inside the template
worker process (``template_worker``), never in the process that serves requests.

The environment follows Hugging Face transformers' ``apply_chat_template`` (which llama.cpp's
``--jinja`` mode also reproduces): an immutable sandbox with ``trim_blocks`` and
``lstrip_blocks``, the globals ``raise_exception`` and ``strftime_now``, a ``tojson`` filter that
keeps key order and non-ASCII text, and ``messages``, ``bos_token``, ``eos_token`` and
``add_generation_prompt`` in the context. The sandbox stops attribute escapes; it does not bound
CPU, memory or output, and compiling can itself recurse or fold constants such as ``9**9**9``:
the worker's process limits bound all of that (``template_sandbox``).

``render`` returns ``(kind, text)`` with the kinds of ``template_protocol``.
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

from edgebox.text.template_protocol import FAILED, LIMIT, OK, RAISED


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


class _CompileError(Exception):
    pass


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # A server renders the same template for every request: parse it once.
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise _CompileError(f"chat template does not parse: {one_line(e.message or '')} (template line {e.lineno})") from None
    except (RecursionError, IndentationError) as e:
        # Jinja's parser recurses per nesting level (300 nested parentheses: RecursionError) and
        # Python's compiler allows 100 indented blocks (150 nested ifs: IndentationError).
        raise _CompileError(f"chat template nests too deeply to compile ({type(e).__name__}); flatten it") from None
    except SyntaxError as e:  # Python code Jinja generated but Python refuses: a break outside a loop, ...
        raise _CompileError(f"chat template does not compile: {one_line(e.msg or '')}") from None


def render(template: str, context: dict, max_chars: int) -> tuple[str, str]:
    """``(OK, text)`` or ``(kind, one-line message)``; stops as soon as the text passes ``max_chars``."""
    try:
        compiled = _compile(template)
    except _CompileError as e:
        return FAILED, str(e)
    except MemoryError:
        raise
    except Exception as e:  # anything else Jinja's compiler or Python's may throw
        return FAILED, f"chat template does not compile: {type(e).__name__}: {one_line(str(e))}"
    parts, size = [], 0
    try:
        for part in compiled.generate(**context):
            size += len(part)
            if size > max_chars:
                return LIMIT, f"chat template rendered more than {max_chars} characters; the prompt cannot be that long"
            parts.append(part)
    except _TemplateRaised as e:
        return RAISED, f"chat template refused the messages: {one_line(str(e))}"
    except MemoryError:
        raise  # the worker words it with its memory budget and starts afresh
    except RecursionError:
        return LIMIT, "chat template recursed too deeply (RecursionError); a macro that calls itself without end?"
    except Exception as e:  # undefined names, sandbox violations, type errors in the template...
        return FAILED, f"chat template failed: {type(e).__name__}: {one_line(str(e))}"
    return OK, "".join(parts)


MESSAGE_CHARS = 300  # an error quotes the template's values (a missing key, its own message): keep the line short


def one_line(text: str) -> str:
    text = " ".join(text[: 4 * MESSAGE_CHARS].split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."
