"""Fuzz: random (nested) chat templates and messages either render or fail with one line, in time.

Templates come from a small grammar of Jinja statements and expressions (loops, conditions, sets,
macros that may call themselves, filters, string and list arithmetic, big and odd literals),
sometimes cut or spliced to break their syntax. Whatever the source, ``render_chat`` returns text
no longer than the prompt bound or raises ``EdgeboxError`` with one line, within the time bound;
any other exception, or a hang, fails.
"""

from __future__ import annotations

import threading
import time

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edgebox.errors import EdgeboxError
from edgebox.text.chat import ROLES, render_chat
from edgebox.text.template_sandbox import MAX_PROMPT_CHARS, RENDER_SECONDS

# a render, plus starting a fresh worker after the previous example had its worker replaced
BOUND_SECONDS = RENDER_SECONDS + 4.0

NAMES = st.sampled_from(["messages", "m", "i", "v", "bos_token", "eos_token", "add_generation_prompt", "loop", "nope"])
STRINGS = st.text(alphabet=st.sampled_from("ab <|>{}%'\"\\\n\t\u00e9\uff5c"), max_size=6).map(repr)
INTS = st.one_of(st.integers(-3, 12), st.sampled_from([99999, 100000, 10**6, 10**9, 2**63]))
ATOMS = st.one_of(
    STRINGS,
    INTS.map(str),
    NAMES,
    st.sampled_from(["true", "false", "none", "messages[0]", "messages[-1]['content']", "m.role", "loop.index"]),
    st.sampled_from(["range(100000)", "'x' * 100000", "[0] * 100000", "lipsum(5)", "namespace(n=1)"]),  # bombs' parts
)
OPS = st.sampled_from([" + ", " - ", " * ", " ** ", " ~ ", " % ", " // ", " == ", " and ", " or ", " in "])
FILTERS = st.sampled_from(
    ["length", "join", "join(',')", "upper", "trim", "list", "reverse", "first", "last", "tojson", "string",
     "center(40)", "indent(4)", "replace('a', 'bb')", "batch(2)|list", "sum", "unique|list", "sort", "map('upper')|list"]
)  # fmt: skip


def _expressions():
    def extend(inner):
        return st.one_of(
            st.tuples(inner, OPS, inner).map("".join),
            st.tuples(inner, FILTERS).map(lambda t: f"{t[0]}|{t[1]}"),
            inner.map(lambda e: f"({e})"),
            inner.map(lambda e: f"range({e})"),
            st.lists(inner, max_size=3).map(lambda es: "[" + ", ".join(es) + "]"),
            st.tuples(inner, inner).map(lambda t: f"{t[0]}[{t[1]}]"),
            inner.map(lambda e: f"f({e})"),
            inner.map(lambda e: f"not {e}"),
        )

    return st.recursive(ATOMS, extend, max_leaves=8)


EXPR = _expressions()
TEXT = st.text(alphabet=st.sampled_from("xy \n<|>"), max_size=5)


def _templates():
    def extend(body):
        return st.one_of(
            st.tuples(body, body).map("".join),
            st.tuples(EXPR, body, body).map(lambda t: f"{{% if {t[0]} %}}{t[1]}{{% else %}}{t[2]}{{% endif %}}"),
            st.tuples(EXPR, body).map(lambda t: f"{{% for i in {t[0]} %}}{t[1]}{{% endfor %}}"),
            body.map(lambda b: f"{{% for m in messages %}}{b}{{% endfor %}}"),
            st.tuples(EXPR, body).map(lambda t: f"{{% set v = {t[0]} %}}{t[1]}"),
            st.tuples(body, EXPR).map(lambda t: f"{{% macro f(i) %}}{t[0]}{{% endmacro %}}{{{{ f({t[1]}) }}}}"),
            body.map(lambda b: f"{{% generation %}}{b}{{% endgeneration %}}"),
            body.map(lambda b: f"{{% for i in range(100000) %}}{b}{{% endfor %}}"),  # loops that multiply
            body.map(lambda b: f"{{% macro f(i) %}}{b}{{{{ f(i) }}}}{{% endmacro %}}{{{{ f(0) }}}}"),  # a macro without end
        )

    leaf = st.one_of(TEXT, EXPR.map(lambda e: f"{{{{ {e} }}}}"), st.just("{% break %}"))
    return st.recursive(leaf, extend, max_leaves=10)


def _broken(source: str, data) -> str:
    """Sometimes cut the source or splice a fragment into it: syntax errors, unclosed blocks."""
    how = data.draw(st.sampled_from(["keep", "keep", "cut", "splice"]))
    if how == "keep" or not source:
        return source
    at = data.draw(st.integers(0, len(source)))
    if how == "cut":
        return source[:at]
    return source[:at] + data.draw(st.sampled_from(["{%", "%}", "{{", "}}", "(", ")", "{% endfor %}", "|", "'"])) + source[at:]


MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES), "content": st.text(max_size=20) | st.sampled_from(["\ud800", "<think>x</think>y"])}
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=_templates(), messages=MESSAGES, data=st.data())
def test_random_templates_render_or_fail_with_one_line_in_time(source, messages, data):
    template = _broken(source, data)
    box: dict = {}

    def run():
        try:
            box["out"] = render_chat(template, messages)
        except BaseException as e:  # noqa: B036 - judged on the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t0 = time.perf_counter()
    t.start()
    t.join(BOUND_SECONDS)
    assert not t.is_alive(), f"no answer after {time.perf_counter() - t0:.1f} s: {template!r}"
    if "error" in box:
        e = box["error"]
        assert isinstance(e, EdgeboxError), f"{type(e).__name__}: {e} from {template!r}"
        assert "\n" not in str(e)
        event(" ".join(str(e).split(":")[0].split()[:5]))  # --hypothesis-show-statistics: what the errors were
    else:
        assert isinstance(box["out"], str) and len(box["out"]) <= MAX_PROMPT_CHARS
        event("rendered")
