"""Fuzzing the MQTT command schemas (hypothesis, bounded): whatever arrives on a cmd topic,
validation either answers a 4xx whose message is one line and encodes as a reply, or accepts
the command; it never raises (an exception there is what the daemon answers with a 500).

Payloads: every method's envelope and params with fields overwritten by random JSON (wrong
types, huge integers, NaN and infinities, lone surrogates, NUL, oversized strings, nesting),
serialized with and without ASCII escapes (raw surrogates make invalid UTF-8), and raw bytes.
An accepted command then goes where the work lane takes it, short of an engine: a generate's
sampler settings (``build_request``), its chat template and the bundled model's tokenizer
(``engine.queued.prompt_ids``, which may refuse with an EdgeboxError only: 400 or 413); a
load_model's path (``model_path``). ``EXAMPLES`` examples per schema; ``deadline=None``.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import edgebox
from edgebox.daemon.commands import Command, Rejected, build_request, model_path, parse_command
from edgebox.daemon.schemas import METHODS, Topics, encode, error_reply, ok_reply
from edgebox.engine.queued import prompt_ids
from edgebox.errors import EdgeboxError
from tests.fixtures.paths import TEST_MODEL

EXAMPLES = 300
TOPICS = Topics("box-fuzz")
REPLY = "edgebox/v1/box-fuzz/reply/fuzz"
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

GOOD = {
    "generate": {
        "prompt": "def f(x):",
        "max_tokens": 4,
        "temperature": 0.7,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "repeat_last_n": 64,
        "seed": 1,
        "stop": ["\n"],
        "stream": True,
        "context_shift": False,
        "n_keep": 0,
    },
    "cancel": {"target": "r1"},
    "load_model": {"path": "model.gguf", "chips": 2, "ctx": 64, "force": False},
    "unload_model": {"force": True},
    "set_power_budget": {"watts": 8.5},
    "get_status": {},
    "reboot": {},  # not a method: 404
}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

# every code point, surrogates, NUL and controls included
texts = st.text(st.characters(exclude_categories=()), max_size=24)
odd_strings = st.sampled_from(
    ["", " ", "\x00", "\ud800", "a\udfffb", "\u2028", "../../etc/passwd", "/", "x" * 129, "x" * 4097, "word " * 14_000]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, 1, -1, 2**63, 2**64, 10**30, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    odd_strings,
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=10
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | values, "content": texts | odd_strings | values}
    ),
    max_size=3,
)


@st.composite
def commands(draw, method: str) -> bytes:
    """One payload for ``method``: a good command with some fields broken, removed or added."""
    params = dict(draw(st.sampled_from([GOOD[method], CHAT])) if method == "generate" else GOOD[method])
    fields = [*params, "prompt", "messages", "unknown"]
    for name in draw(st.lists(st.sampled_from(fields), max_size=2)):
        action = draw(st.sampled_from(["break", "break", "drop", "messages"]))
        if action == "drop":
            params.pop(name, None)
        elif action == "messages" and method == "generate":
            params["messages"] = draw(messages)
        else:  # strings twice as often: most fields are text, and text is where surrogates and NULs hide
            params[name] = draw(st.one_of(values, odd_strings, texts))
    good_id = draw(st.integers(0, 3)) > 0  # mostly well-formed around the broken parts, to reach deeper
    envelope = {"request_id": draw(st.sampled_from(["r1", "a" * 128, "é-1"]) if good_id else texts | values), "params": params}
    if draw(st.integers(0, 3)) == 0:
        envelope["expires_at"] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 2e9]) | st.floats() | values)
    if draw(st.integers(0, 4)) == 0:
        envelope["reply_to"] = draw(st.sampled_from(["legacy/me", "edgebox/v1/box-fuzz/cmd/generate"]) | texts | values)
    if draw(st.integers(0, 6)) == 0:
        envelope[draw(texts)] = draw(values)
    if draw(st.integers(0, 6)) == 0:
        envelope["params"] = draw(values)
    text = json.dumps(envelope, allow_nan=True, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # raw surrogates: invalid UTF-8, as a hostile client may send


@pytest.fixture(scope="module")
def model():
    return edgebox.load(TEST_MODEL, chips=1)


def check(method: str, payload: bytes, model, models_dir, response_topic: str | None = REPLY) -> None:
    """The property: a 4xx in one line that encodes, or an accepted command that goes on cleanly."""
    try:
        cmd = parse_command(method, payload, topics=TOPICS, response_topic=response_topic, correlation=b"c")
    except Rejected as r:
        assert 400 <= r.code < 500 and r.message and "\n" not in r.message, (r.code, r.message)
        json.loads(encode(error_reply(r.request_id, r.code, r.message)))
        event(f"rejected {r.code}")
        return
    event("accepted")
    assert isinstance(cmd, Command) and cmd.method == method
    json.loads(encode(ok_reply(cmd.request_id, {"echo": cmd.request_id})))
    assert cmd.expires_at is None or math.isfinite(cmd.expires_at)
    if method == "generate":
        try:
            request = build_request(cmd.params, 4096, "e1")
        except Rejected as r:
            assert r.code == 400 and "\n" not in r.message
            event("refused by the sampler or the box's limit")
            return
        try:
            ids, _, _ = prompt_ids(model, request)
        except EdgeboxError as e:  # an empty prompt, one over the context, a template error: 400/413
            assert "\n" not in str(e).strip()
            event(f"refused at tokenization: {type(e).__name__}")
            return
        assert ids and all(0 <= i < model.args.n_vocab for i in ids)
        event("tokenized")
    elif method == "load_model":
        try:
            model_path(cmd.params.path, models_dir)
            event("path found")
        except Rejected as r:
            assert r.code in (400, 404) and "\n" not in r.message
            event(f"path refused {r.code}")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    (d / "model.gguf").write_bytes(b"GGUF")
    return d


@pytest.mark.parametrize("method", [*METHODS, "reboot"])
@FUZZ
@given(data=st.data())
def test_every_schema_answers_4xx_or_accepts(method, data, model, models_dir):
    check(method, data.draw(commands(method), label="payload"), model, models_dir)


@FUZZ
@given(
    method=st.sampled_from([*METHODS, "", "generate/x", "\u00e9"]),
    payload=st.binary(max_size=256)
    | st.sampled_from([b"", b"null", b"[]", b"{}", b"[" * 100_000, b'{"a":' * 50_000, b'{"request_id": "r", "params": ' * 2000])
    | values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    response_topic=st.sampled_from([REPLY, None, "", "a/+/b", "$SYS/x", "\ud800"]) | texts,
)
def test_raw_bytes_and_any_reply_topic(method, payload, response_topic, model, models_dir):
    check(method, payload, model, models_dir, response_topic or None)
