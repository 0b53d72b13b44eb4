"""text.grammar: request shapes -> Constraint, llguidance over edgebox's real tokenizers, masks,
one-line errors, the bounds on hostile grammars, and Completion under a constraint."""

from __future__ import annotations

import datetime
import json
import re
import time

import jsonschema
import numpy as np
import pytest

from edgebox.gguf.file import GGUFFile
from edgebox.text import grammar
from edgebox.text.generation import Completion
from edgebox.text.grammar import (
    Constraint,
    GrammarError,
    allowed_from_bitmask,
    apply_mask,
    compile_constraint,
    parse_constraint,
)
from edgebox.text.sampler import Sampler, SamplingParams
from edgebox.text.tokenizer import Tokenizer
from tests.fixtures.paths import vocab_path

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["deepseek-llm", "qwen2"])
def tok(request) -> Tokenizer:
    return Tokenizer.from_gguf_fields(GGUFFile(vocab_path(request.param)).fields)


def walk(tok, constraint: Constraint, text: str, add_eos: bool = False):
    """Feed ``text``'s tokens to a fresh matcher, checking each was allowed by the mask before."""
    m = compile_constraint(tok, constraint).matcher()
    for t in tok.encode(text, add_bos=False):
        assert m.allowed_mask()[t], f"token {t} ({tok.token_to_piece(t)!r}) of {text!r} is not allowed"
        m.consume(t)
    return m


# -- request shapes ---------------------------------------------------------------------------
def test_openai_and_ollama_shapes_give_the_same_constraints():
    schema_fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    assert parse_constraint(schema_fmt) == Constraint.json_schema(PERSON)
    assert parse_constraint(PERSON, field="format") == Constraint.json_schema(PERSON)  # ollama: the schema itself
    assert parse_constraint({"type": "json_object"}) == parse_constraint("json", field="format") == Constraint.json_object()
    assert parse_constraint({"type": "text"}) is None and parse_constraint(None) is None
    assert parse_constraint({"type": "regex", "regex": "[0-9]+"}) == Constraint.regex("[0-9]+")
    assert parse_constraint({"type": "lark", "lark": 'start: "a"'}) == Constraint.lark('start: "a"')
    c = Constraint.regex("x")
    assert parse_constraint(c) is c
    assert Constraint.json_schema(json.dumps(PERSON)) == Constraint.json_schema(PERSON)


@pytest.mark.parametrize(
    "value, field, says",
    [
        ({"type": "json_schema"}, "response_format", "response_format.json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format", '"schema"'),
        ({"type": "json_schema", "json_schema": {"schema": 3}}, "response_format", "response_format.json_schema.schema"),
        ({"type": "regex"}, "response_format", "response_format.regex must be a non-empty string"),
        ({"type": "lark", "lark": ""}, "response_format", "response_format.lark"),
        (42, "format", "format must be an object"),
        ("yaml", "format", "format must be an object"),
    ],
)
def test_malformed_shapes_name_the_field_in_one_line(value, field, says):
    with pytest.raises(GrammarError) as e:
        parse_constraint(value, field=field)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_an_oversized_grammar_is_refused_before_compiling():
    with pytest.raises(GrammarError, match="at most 65536"):
        Constraint.regex("a" * (grammar.MAX_SPEC_BYTES + 1))


def test_date_and_time_formats_become_patterns_jsonschema_agrees_with():
    """llguidance's own date formats allow Feb 29 of any year and second 60: replaced by
    FORMAT_PATTERNS, which accept exactly the dates Python's jsonschema accepts."""
    check = jsonschema.Draft202012Validator.FORMAT_CHECKER
    date = re.compile(grammar.FORMAT_PATTERNS["date"])
    for year in range(0, 10000):
        for month, day in ((2, 29), (2, 28), (2, 30), (4, 31), (12, 31), (0, 1)):
            v = f"{year:04d}-{month:02d}-{day:02d}"
            assert bool(date.match(v)) == check.conforms(v, "date"), v
    # jsonschema checks date-time only with rfc3339-validator installed: Python's parser is the oracle
    time_ = re.compile(grammar.FORMAT_PATTERNS["date-time"])
    for v in ("2024-02-29T23:59:59.5+05:30", "2023-02-29T10:00:00Z", "2024-01-01T10:00:60Z", "2024-01-01T24:00:00Z"):
        try:
            valid = bool(datetime.datetime.fromisoformat(v))
        except ValueError:
            valid = False
        assert bool(time_.match(v)) == valid, v
    schema = {"properties": {"d": {"type": "string", "format": "date"}, "c": {"const": {"format": "date"}}}}
    assert json.loads(Constraint.json_schema(schema).text) == {
        "properties": {"d": {"type": "string", "pattern": grammar.FORMAT_PATTERNS["date"]}, "c": {"const": {"format": "date"}}}
    }


# -- compiling ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "constraint, says",
    [
        (Constraint.lark("start: foo"), 'unknown name: "foo"'),
        (Constraint.regex("[a-z"), "unclosed character class"),
        (Constraint.json_schema({"type": "strin"}), "strin"),
        (Constraint.json_schema({"$ref": "#/nowhere"}), "nowhere"),
        (Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 1}), "does not compile"),
    ],
)
def test_llguidance_refusals_are_one_line_grammar_errors(tok, constraint, says):
    with pytest.raises(GrammarError) as e:
        compile_constraint(tok, constraint)
    msg = str(e.value)
    assert says in msg and "\n" not in msg and len(msg) < 400
    assert msg.startswith(f"the {constraint.kind} constraint")


def test_hostile_grammar_hits_a_limit_not_the_machine(tok):
    """A regex of a million states ((a{1000}){1000}) runs into llguidance's LIMITS within a few
    tokens: one line, well under a second of work, never a hang or a memory blow-up."""
    t0 = time.perf_counter()
    m = compile_constraint(tok, Constraint.regex("(a{1000}){1000}")).matcher()
    with pytest.raises(GrammarError) as e:
        for _ in range(30):
            m.consume(int(np.flatnonzero(m.allowed_mask())[0]))
    assert "too many expressions" in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 3.0


def test_compiled_grammars_are_cached_and_bounded(tok, monkeypatch):
    monkeypatch.setattr(grammar, "GRAMMAR_CACHE", 2)
    a, b, c = (Constraint.regex(r) for r in ("a+", "b+", "c+"))
    ga = compile_constraint(tok, a)
    assert compile_constraint(tok, a) is ga
    compile_constraint(tok, b)
    compile_constraint(tok, c)  # evicts a, the least recently used
    assert compile_constraint(tok, a) is not ga
    assert grammar._slot(tok) is grammar._slot(tok)  # one LLTokenizer per tokenizer


# -- the tokenizer llguidance sees ----------------------------------------------------------------
def test_llguidance_sees_the_bytes_the_detokenizer_prints(tok):
    ll = grammar._slot(tok).ll
    assert ll.vocab_size == tok.n_vocab
    assert sorted(ll.eos_tokens) == sorted(tok.eog_ids)
    rng = np.random.default_rng(0)
    for t in rng.integers(0, tok.n_vocab, 400):
        t = int(t)
        if ll.is_special_token(t):
            assert t in tok._special_ids or t in tok.eog_ids
        else:
            assert ll.decode_bytes([t]) == tok.token_to_piece(t)
    assert all(ll.is_special_token(t) for t in tok.eog_ids)


# -- matching -----------------------------------------------------------------------------------
def test_a_valid_document_walks_to_the_end_and_only_eog_remains(tok):
    m = walk(tok, Constraint.json_schema(PERSON), '{"name":"Ada","age":36}')
    assert m.is_accepting and m.is_stopped
    assert set(np.flatnonzero(m.allowed_mask())) == set(tok.eog_ids)


def test_a_regex_accepts_and_can_go_on(tok):
    m = walk(tok, Constraint.regex("[0-9]{2,4}"), "123")
    allowed = m.allowed_mask()
    assert m.is_accepting and not m.is_stopped
    assert allowed[tok.encode("4", add_bos=False)[0]] and not allowed[tok.encode("x", add_bos=False)[0]]
    assert all(allowed[t] for t in tok.eog_ids)  # may end here


def test_lark_with_an_embedded_schema_for_tool_calls(tok):
    """What the tool-call code builds: fixed text around a %json argument object."""
    lark = 'start: "<call>" args "</call>"\nargs: %json ' + json.dumps(PERSON)
    m = walk(tok, Constraint.lark(lark), '<call>{"name":"Bo","age":7}</call>')
    assert m.is_stopped
    with pytest.raises(GrammarError, match="stopped at token"):
        m2 = compile_constraint(tok, Constraint.lark(lark)).matcher()
        for t in tok.encode('<call>{"age":', add_bos=False):  # "name" must come first
            m2.consume(t)


def test_bitmask_and_apply_mask(tok):
    m = compile_constraint(tok, Constraint.json_object()).matcher()
    allowed = allowed_from_bitmask(m.bitmask(), tok.n_vocab)
    assert allowed.dtype == np.bool_ and allowed.shape == (tok.n_vocab,)
    assert allowed[tok.encode("{", add_bos=False)[0]] and allowed.sum() < tok.n_vocab // 100
    logits = np.random.default_rng(1).standard_normal(tok.n_vocab).astype(np.float32)
    out = apply_mask(logits, allowed)
    assert out.dtype == np.float32 and np.isfinite(logits).all()  # the caller's row is untouched
    assert np.array_equal(np.isfinite(out), allowed) and np.array_equal(out[allowed], logits[allowed])
    # a mask shorter than the logits (vocab padding) disallows the tail
    assert not allowed_from_bitmask(m.bitmask(), tok.n_vocab + 40)[tok.n_vocab :].any()


def test_sampling_within_the_mask_equals_sampling_the_masked_row():
    """The sampler given the mask (it works on the allowed tokens only, fast) keeps the same
    candidates with the same probabilities as on the whole row with -inf outside the mask, for
    every setting that orders candidates differently: greedy, top-k above and below the allowed
    count, top-p, min-p, penalties, ties."""
    rng = np.random.default_rng(0)
    vocab = 3000
    for trial in range(300):
        allowed = np.zeros(vocab, bool)
        allowed[rng.choice(vocab, int(rng.choice([1, 2, 39, 40, 41, 100, vocab - 1])), replace=False)] = True
        logits = rng.standard_normal(vocab).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits, 1)  # many ties
        history = [int(t) for t in rng.integers(0, vocab, int(rng.integers(0, 100)))] + [
            int(t) for t in np.flatnonzero(allowed)[:5]
        ]
        params = SamplingParams(
            temperature=float(rng.choice([0.0, 0.7, 1.5])),
            top_k=int(rng.choice([0, 1, 40, 5000])),
            top_p=float(rng.choice([1.0, 0.9])),
            min_p=float(rng.choice([0.0, 0.05])),
            repeat_penalty=float(rng.choice([1.0, 1.3])),
            repeat_last_n=int(rng.choice([-1, 0, 64])),
            seed=trial,
        )
        whole, within = Sampler(params), Sampler(params)
        ids_a, probs_a = whole.candidates(apply_mask(logits, allowed), history)
        ids_b, probs_b = within.candidates(logits, history, allowed=allowed)
        # the same distribution (the order of tied candidates may differ, so the same u may not
        # pick the same one of them: compare the distributions, and greedy's token exactly)
        a, b = dict(zip(ids_a.tolist(), probs_a.tolist())), dict(zip(ids_b.tolist(), probs_b.tolist()))
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-6 for t in a), (trial, params)
        if params.greedy:
            assert whole.sample(apply_mask(logits, allowed), history) == within.sample(logits, history, allowed=allowed)


# -- Completion under a constraint --------------------------------------------------------------
def test_completion_stops_when_the_grammar_is_complete(tok):
    """Random logits, sampled: the output is the schema's, and it ends with stop without an EOG draw."""
    rng = np.random.default_rng(5)
    c = Completion(tok, [], SamplingParams(seed=1, temperature=1.0), 200, constraint=Constraint.json_schema(PERSON))
    text = ""
    while c.done_reason is None:
        text += c.push(c.sample(rng.standard_normal(tok.n_vocab).astype(np.float32)))
    text += c.finish()
    assert c.done_reason == "stop", text
    doc = json.loads(text)
    assert list(doc) == ["name", "age"] and 0 <= doc["age"] <= 150 and len(doc["name"]) <= 8


def test_completion_json_object_ends_and_parses(tok):
    """Logits that favour a few one-character JSON tokens (a model that likes closing strings) drive
    an "any JSON object" completion to its end: stop, and the text parses."""
    favoured = np.array([tok.token_to_piece(i) in (b'"', b"}", b":", b"1", b"{") for i in range(tok.n_vocab)])
    rng = np.random.default_rng(2)
    for seed in range(3):
        c = Completion(tok, [], SamplingParams(seed=seed), 100, constraint=parse_constraint({"type": "json_object"}))
        text = ""
        while c.done_reason is None:
            text += c.push(c.sample((rng.standard_normal(tok.n_vocab) + 6.0 * favoured).astype(np.float32)))
        text += c.finish()
        assert c.done_reason == "stop" and isinstance(json.loads(text), dict), text


def test_completion_cut_by_max_tokens_ends_with_length(tok):
    c = Completion(tok, [], SamplingParams(seed=1), 3, constraint=Constraint.json_schema(PERSON))
    rng = np.random.default_rng(0)
    text = ""
    while c.done_reason is None:
        text += c.push(c.sample(rng.standard_normal(tok.n_vocab).astype(np.float32)))
    text += c.finish()
    assert c.done_reason == "length" and len(c.tokens) == 3 and text.startswith('{"name"')
    with pytest.raises(json.JSONDecodeError):  # cut short: an incomplete document, as OpenAI's
        json.loads(text)
