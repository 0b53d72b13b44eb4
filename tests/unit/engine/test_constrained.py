"""Constrained generation end to end on the tiny models with real tokenizers (the DeepSeek-Coder
llama one and the qwen2 one): every output under a schema that ends with "stop" validates, one cut
by max_tokens says "length", constrained and free requests share engine steps, the engine (masks
computed during the forward pass) gives what Model.generate gives, and bad constraints are
refused at submit in one line."""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path

import jsonschema
import pytest

import edgebox
from edgebox.engine import Chunk, Engine, Request
from edgebox.text.grammar import Constraint, GrammarError
from tests.fixtures.paths import DATA, TEST_MODEL

SCHEMAS = {p.stem: json.loads(p.read_text()) for p in sorted(Path(DATA / "schemas").glob("*.json"))}
MAX_TOKENS = 64


def test_the_schema_set_is_varied_and_valid():
    assert len(SCHEMAS) >= 30
    text = json.dumps(SCHEMAS)
    for keyword in ("anyOf", "minItems", "maxItems", "enum", "const", "$ref", '"null"', "minimum", "maximum", "pattern"):
        assert keyword in text, keyword
    for fmt in ("date", "email", "uuid", "date-time", "ipv4"):
        assert f'"format": "{fmt}"' in text
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.fixture(scope="module", params=["tiny-deepseek-coder", "tiny-qwen2", "bundled"])
def model(request, tiny_f32):
    if request.param == "bundled":  # the trained default model: its own preferences meet the grammar
        return edgebox.load()
    path = TEST_MODEL if request.param == "tiny-deepseek-coder" else tiny_f32(request.param)
    return edgebox.load(path)


@pytest.fixture(scope="module")
def engine(model):
    e = Engine(model, max_batch=8, max_queue=256, prefill_chunk=64)
    yield e
    e.close(drain=False)


def _format_checker() -> jsonschema.FormatChecker:
    """Draft 2020-12's format checks; jsonschema checks date-time and time only when
    rfc3339-validator is installed, so where it is not, Python's ISO parser checks them."""
    checker = copy.deepcopy(jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for fmt, parse in (("date-time", datetime.datetime.fromisoformat), ("time", datetime.time.fromisoformat)):
        if fmt not in checker.checkers:
            checker.checks(fmt, raises=ValueError)(_parses_with(parse))
    return checker


def _parses_with(parse):
    def check(value) -> bool:
        if isinstance(value, str):
            parse(value)  # raises ValueError when it is not one
        return True

    return check


FORMATS = _format_checker()


def validator(schema):
    return jsonschema.Draft202012Validator(schema, format_checker=FORMATS)


def check_schema_outputs(engine, seeds):
    """All schemas x ``seeds``, sampled at temperature 1 through the batched engine: every output
    that ends with "stop" validates (formats checked too); the others were cut at max_tokens."""
    jobs = [
        (
            name,
            engine.submit(
                Request(
                    prompt="JSON: ",
                    max_tokens=MAX_TOKENS,
                    params=edgebox.SamplingParams(seed=seed, temperature=1.0),
                    response_format=schema,
                )
            ),
        )
        for name, schema in SCHEMAS.items()
        for seed in seeds
    ]
    stopped = 0
    for name, h in jobs:
        s = h.result(timeout=300)
        assert s.ok, (name, s.error)
        if s.done_reason == "stop":
            stopped += 1
            validator(SCHEMAS[name]).validate(json.loads(s.text))
        else:
            assert s.done_reason == "length" and s.generated_tokens == MAX_TOKENS, (name, s)
    # most end on their own (strings are bounded in most schemas), so the check above has teeth
    assert stopped >= 0.6 * len(jobs), f"only {stopped}/{len(jobs)} outputs completed"


def test_every_schema_output_that_stops_validates(engine):
    check_schema_outputs(engine, seeds=(1,))


@pytest.mark.slow
def test_every_schema_output_that_stops_validates_more_seeds(engine):
    check_schema_outputs(engine, seeds=(2, 3, 4))


def test_max_tokens_cuts_with_length_and_an_incomplete_document(engine):
    s = engine.generate(
        Request(prompt="JSON: ", max_tokens=4, params=edgebox.SamplingParams(seed=3), response_format=SCHEMAS["person"])
    )
    assert s.done_reason == "length" and s.generated_tokens == 4 and s.text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(s.text)


def test_json_object_output_parses_or_is_cut(engine):
    """Any JSON object: a random model's strings rarely close within 48 tokens, so most are cut
    ("length"); test_grammar's json_object test drives one to its end."""
    hs = [
        engine.submit(
            Request(prompt="{", max_tokens=48, params=edgebox.SamplingParams(seed=s), response_format={"type": "json_object"})
        )
        for s in range(4)
    ]
    for h in hs:
        s = h.result(timeout=60)
        if s.done_reason == "stop":
            assert isinstance(json.loads(s.text), dict)
        else:
            assert s.done_reason == "length" and s.generated_tokens == 48 and s.text.startswith("{")


def test_constrained_and_free_requests_share_steps(engine):
    """Each chunk notes the engine's step count as it is emitted (steps are counted at the end of
    each step), so equal counts mean the same step."""
    steps: dict[str, set[int]] = {"constrained": set(), "free": set()}

    def noting(kind):
        return lambda ev: steps[kind].add(engine.stats().steps) if isinstance(ev, Chunk) else None

    params = edgebox.SamplingParams(seed=4)
    hs = [
        engine.submit(
            Request(prompt="a", max_tokens=24, params=params, response_format=Constraint.regex("[a-z ]{300}")),
            noting("constrained"),
        ),
        engine.submit(Request(prompt="b", max_tokens=24, params=params), noting("free")),
    ]
    constrained, free = (h.result(timeout=60) for h in hs)
    assert constrained.done_reason == "length" and constrained.generated_tokens == 24
    assert all(c.isalpha() or c == " " for c in constrained.text)
    assert free.generated_tokens >= 12  # this seed's free text runs that long before an EOG
    assert len(steps["constrained"] & steps["free"]) >= 8


def test_engine_and_model_generate_agree(model, engine):
    """Masks computed on the engine's helper thread during the forward pass, and by Model.generate
    in line, give the same tokens (greedy and seeded)."""
    for schema, params in [
        (SCHEMAS["home_automation_intent"], edgebox.SamplingParams(temperature=0.0)),
        (SCHEMAS["todo_list_objects"], edgebox.SamplingParams(seed=9)),
    ]:
        via_engine = engine.generate(Request(prompt="JSON: ", max_tokens=40, params=params, response_format=schema))
        alone = "".join(model.stream("JSON: ", max_tokens=40, params=params, response_format=schema))
        assert via_engine.text == alone


def test_model_generate_takes_response_format(model):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMAS["yes_no_confidence"], "strict": True}}
    g = model.stream("Q: ", 64, edgebox.SamplingParams(seed=1), (), fmt)
    text = "".join(g)
    if g.stats.done_reason == "stop":
        validator(SCHEMAS["yes_no_confidence"]).validate(json.loads(text))
    else:  # the bundled model likes long reasons: cut at max_tokens, as OpenAI's "length"
        assert g.stats.done_reason == "length" and text.startswith("{")
    assert "".join(model.generate("Q: ", max_tokens=64, seed=1, response_format=fmt)) == text


@pytest.mark.parametrize(
    "fmt, says",
    [
        ({"type": "lark", "lark": "start: nothing"}, 'unknown name: "nothing"'),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "Invalid type: strin"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "regex", "regex": "(unclosed"}, "regex"),
    ],
)
def test_bad_constraints_are_refused_at_submit_in_one_line(engine, model, fmt, says):
    with pytest.raises(GrammarError) as e:
        engine.submit(Request(prompt="x", response_format=fmt))
    assert says in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(GrammarError):
        model.generate("x", response_format=fmt)
