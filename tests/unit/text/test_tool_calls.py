"""Tool calls through the GGUF's own chat template: rendering, parsing back (streamed and whole),
tool_choice, and calls forced by llguidance on a tiny qwen2 model with the real Qwen2 tokenizer."""

from __future__ import annotations

import itertools
import json

import jsonschema
import llguidance
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgebox
from edgebox.errors import EdgeboxError
from edgebox.text import tool_calls as tc
from edgebox.text.chat import ReasoningStream, render_chat, split_reasoning
from edgebox.text.tool_calls import DEEPSEEK_R1, HERMES, ToolCallParser, ToolsUnsupportedError, parse_tool_calls
from tests.fixtures import tiny_models
from tests.fixtures.paths import DATA

TEMPLATES = DATA / "chat_templates"
QWEN25 = "qwen2.5-7b-instruct.jinja"
R1 = "deepseek-r1-distill-qwen-7b.jinja"
BOS_R1 = "<｜begin▁of▁sentence｜>"
EOS_R1 = "<｜end▁of▁sentence｜>"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "days", "unit"],
            "additionalProperties": False,
        },
    },
}
LIGHTS = {
    "type": "function",
    "function": {
        "name": "set_lights",
        "parameters": {
            "type": "object",
            "properties": {
                "room": {"enum": ["kitchen", "hall", "bedroom"]},
                "on": {"type": "boolean"},
                "level": {"type": "number", "minimum": 0, "maximum": 1},
                "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                "when": {
                    "type": "object",
                    "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
                    "required": ["hour"],
                    "additionalProperties": False,
                },
            },
            "required": ["room", "on", "when"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, LIGHTS]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}
TOOL_TURN = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


def template(name: str) -> str:
    return (TEMPLATES / name).read_text(encoding="utf-8")


# --- the family of each committed template -------------------------------------------------------


@pytest.mark.parametrize(
    "name, family",
    [
        (QWEN25, HERMES),
        (R1, DEEPSEEK_R1),
        ("deepseek-llm-7b-chat.jinja", None),
        ("deepseek-coder-6.7b-instruct.jinja", None),
    ],
)
def test_family_is_read_from_the_template_text(name, family):
    assert tc.detect_family(template(name)) == family


# --- rendering ----------------------------------------------------------------------------------

QWEN_SYSTEM_WITH_TOOLS = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER, ensure_ascii=False)
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)


def test_qwen25_renders_tools_a_call_with_object_arguments_and_the_tool_result():
    out = render_chat(template(QWEN25), TOOL_TURN, tools=[WEATHER])
    assert out == (
        QWEN_SYSTEM_WITH_TOOLS + "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("choice", ["none", "auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_every_tool_choice_renders_the_same_prompt_as_llama_cpp_does(choice):
    out = render_chat(template(QWEN25), ASK, tools=[WEATHER], tool_choice=choice)
    assert out == QWEN_SYSTEM_WITH_TOOLS + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"


def test_r1_gets_the_tools_in_its_system_prompt_in_its_own_call_syntax():
    out = render_chat(template(R1), ASK, tools=[WEATHER], bos_token=BOS_R1, eos_token=EOS_R1)
    system = tc.tools_system_text(DEEPSEEK_R1, [WEATHER])
    assert out == f"{BOS_R1}{system}<｜User｜>Weather in Paris?<｜Assistant｜><think>\n"
    assert json.dumps(WEATHER, ensure_ascii=False) in system
    assert "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜><function-name>\n```json\n" in system


def test_r1_renders_the_call_as_the_json_string_and_closes_what_its_template_leaves_open():
    msgs = [{"role": "system", "content": "Be brief."}, *TOOL_TURN]
    out = render_chat(template(R1), msgs, tools=[WEATHER], bos_token=BOS_R1, eos_token=EOS_R1)
    system = "Be brief.\n\n" + tc.tools_system_text(DEEPSEEK_R1, [WEATHER])
    assert out == (
        f"{BOS_R1}{system}<｜User｜>Weather in Paris?"
        "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris", "days": 1}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>' + EOS_R1 + ""
        '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"temp": 21}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>'
        + EOS_R1
        + "<｜Assistant｜>"
    )


def test_r1_two_calls_in_one_turn_are_closed_once():
    second = {"id": "call_2", "type": "function", "function": {"name": "set_lights", "arguments": '{"room": "hall"}'}}
    msgs = [*ASK, {"role": "assistant", "content": "", "tool_calls": [CALL, second]}]  # "" is no content too
    out = render_chat(template(R1), msgs, tools=TOOLS, bos_token=BOS_R1, eos_token=EOS_R1, add_generation_prompt=False)
    calls = out.split("<｜Assistant｜>", 1)[1]
    assert calls == (
        r1_calls(r1_call("get_weather", '{"city": "Paris", "days": 1}'), r1_call("set_lights", '{"room": "hall"}')) + EOS_R1
    )
    assert parse_tool_calls(DEEPSEEK_R1, TOOLS, calls.removesuffix(EOS_R1)).tool_calls[1]["function"]["name"] == "set_lights"


def test_r1_final_answer_after_the_tool_result_follows_the_outputs():
    msgs = [*TOOL_TURN, {"role": "assistant", "content": "21 degrees."}, {"role": "user", "content": "Thanks"}]
    out = render_chat(template(R1), msgs, bos_token=BOS_R1, eos_token=EOS_R1)
    assert out.endswith(f"<｜tool▁outputs▁end｜>21 degrees.{EOS_R1}<｜User｜>Thanks<｜Assistant｜><think>\n")


def test_caller_messages_are_not_changed():
    msgs = json.loads(json.dumps(TOOL_TURN))
    render_chat(template(QWEN25), msgs, tools=[WEATHER])
    assert msgs == TOOL_TURN


# --- a template without tool syntax, and bad fields ------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek-llm-7b-chat.jinja", "deepseek-coder-6.7b-instruct.jinja"])
def test_tools_for_a_template_without_call_syntax_are_a_one_line_error_naming_it(name):
    with pytest.raises(ToolsUnsupportedError) as e:
        render_chat(template(name), ASK, tools=[WEATHER], template_name="tiny-deepseek-llm-F32.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "tiny-deepseek-llm-F32.gguf" in msg and "without tools" in msg
    with pytest.raises(ToolsUnsupportedError):
        render_chat(template(name), TOOL_TURN)  # a past call needs the syntax too
    with pytest.raises(ToolsUnsupportedError, match="tiny-deepseek-llm-F32.gguf"):
        tc.plan_tools(template(name), [WEATHER], "auto", template_name="tiny-deepseek-llm-F32.gguf")
    assert render_chat(template(name), ASK)  # without tools the template still serves


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(tools={"name": "f"}), "tools must be a list"),
        (dict(tools=[{"type": "function"}]), "tools[0] must be"),
        (dict(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools[0].function.name"),
        (dict(tools=[WEATHER, WEATHER]), "given twice"),
        (dict(tools=[WEATHER], tool_choice="always"), "tool_choice must be one of"),
        (dict(tools=[], tool_choice="required"), "tools is empty"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "not in tools"),
        (dict(tools=[WEATHER], tool_choice={"function": "get_weather"}), "tool_choice must be"),
    ],
)
def test_bad_tools_and_tool_choice_are_one_line_errors_naming_the_field(kwargs, fragment):
    with pytest.raises(EdgeboxError) as e:
        render_chat(template(QWEN25), ASK, **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "message, fragment",
    [
        ({"role": "assistant", "content": None, "tool_calls": []}, "non-empty list"),
        ({"role": "user", "content": "x", "tool_calls": [CALL]}, "only assistant messages make calls"),
        ({"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}, "['tool_calls'][0] must be"),
        (
            {"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{"}}]},
            "must be a JSON object as a string",
        ),
        ({"role": "assistant", "content": None}, "'content'] must be a string"),
        ({"role": "tool", "content": "x", "tool_call_id": 7}, "tool_call_id'] must be a string"),
    ],
)
def test_bad_messages_with_calls_are_one_line_errors(message, fragment):
    with pytest.raises(EdgeboxError) as e:
        render_chat(template(QWEN25), [*ASK, message])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_plan_tools():
    plan = tc.plan_tools(template(QWEN25), TOOLS, None)
    assert (plan.family, plan.tool_choice, plan.grammar) == (HERMES, "auto", None)
    assert isinstance(plan.parser(), ToolCallParser)
    assert tc.plan_tools(template(QWEN25), TOOLS, "none").parser() is None
    named = tc.plan_tools(template(R1), TOOLS, {"type": "function", "function": {"name": "set_lights"}}, thinking_open=True)
    assert named.tool_choice == "set_lights" and "set_lights" in named.grammar and "get_weather" not in named.grammar
    assert named.grammar.startswith('start: "</think>\\n\\n"')
    assert tc.plan_tools(template("deepseek-llm-7b-chat.jinja"), None).parser() is None  # no tools: nothing to check


# --- parsing the reply ------------------------------------------------------------------------------


def hermes_call(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def r1_call(name: str, args: str) -> str:
    return f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>"


def r1_calls(*calls: str) -> str:
    return "<｜tool▁calls▁begin｜>" + "\n".join(calls) + "<｜tool▁calls▁end｜>"


def calls_of(result) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in result.tool_calls]


def test_hermes_reply_with_content_and_two_calls():
    text = "Let me check.\n" + hermes_call("get_weather", '{"city": "Oslo"}') + "\n" + hermes_call("set_lights", "{}")
    r = parse_tool_calls(HERMES, TOOLS, text)
    assert r.content == "Let me check."
    assert calls_of(r) == [("get_weather", {"city": "Oslo"}), ("set_lights", {})]
    assert r.finish_reason == "tool_calls"
    assert all(c["id"].startswith("call_") and len(c["id"]) == 29 and c["type"] == "function" for c in r.tool_calls)
    assert len({c["id"] for c in r.tool_calls}) == 2


def test_r1_reply_with_two_calls_and_only_calls_has_no_content():
    text = r1_calls(r1_call("get_weather", '{"city": "Oslo"}'), r1_call("set_lights", '{"room": "hall"}')) + "\n"
    r = parse_tool_calls(DEEPSEEK_R1, TOOLS, text)
    assert r.content is None and calls_of(r) == [("get_weather", {"city": "Oslo"}), ("set_lights", {"room": "hall"})]


def test_arguments_are_compact_json_text_and_a_json_string_of_arguments_is_read_too():
    r = parse_tool_calls(HERMES, TOOLS, hermes_call("get_weather", json.dumps('{"city": "Zürich"}')))
    assert r.tool_calls[0]["function"]["arguments"] == '{"city":"Zürich"}'


@pytest.mark.parametrize(
    "family, text",
    [
        (HERMES, hermes_call("get_weather", '{"city": ')),  # bad JSON
        (HERMES, hermes_call("launch_rocket", "{}")),  # unknown function
        (HERMES, hermes_call("get_weather", "[1, 2]")),  # arguments not an object
        (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}'),  # cut short
        (DEEPSEEK_R1, r1_calls(r1_call("get_weather", "{oops}"))),
        (DEEPSEEK_R1, r1_calls(r1_call("unknown", "{}"))),
        (DEEPSEEK_R1, "<｜tool▁call▁begin｜>get_weather something else<｜tool▁call▁end｜>"),
    ],
)
def test_a_malformed_or_unfinished_call_is_plain_content(family, text):
    r = parse_tool_calls(family, TOOLS, "Sure: " + text)
    assert r.tool_calls == [] and r.finish_reason is None
    assert r.content == "Sure: " + text.replace("<｜tool▁calls▁begin｜>", "").replace("<｜tool▁calls▁end｜>", "")


def test_a_good_call_next_to_a_bad_one_is_kept():
    text = hermes_call("nope", "{}") + "\n" + hermes_call("get_weather", '{"city": "Rome"}')
    r = parse_tool_calls(HERMES, TOOLS, text)
    assert r.content == hermes_call("nope", "{}") and calls_of(r) == [("get_weather", {"city": "Rome"})]


def test_without_tools_everything_is_content_untouched():
    text = "  " + hermes_call("get_weather", "{}") + "\n"
    r = parse_tool_calls(HERMES, [], text)
    assert r.content == text and r.tool_calls == []


def test_plain_replies_keep_their_whitespace_and_text_like_markers():
    for text in ["", "Hello\n", "  <tool is not a call> </tool_call> <｜tool", "a <tool_cal"]:
        r = parse_tool_calls(HERMES, TOOLS, text)
        assert (r.content, r.tool_calls) == (text, [])


def test_streamed_deltas_follow_openai_shapes():
    p = ToolCallParser(HERMES, TOOLS, new_id=lambda: "call_x")
    call = hermes_call("get_weather", '{"city": "Oslo"}')
    pieces = ["Hi ", *call]  # the call one character at a time
    deltas = [d for piece in pieces for d in p.feed(piece)] + p.finish().deltas
    assert deltas == [
        {"content": "Hi"},
        {"tool_calls": [{"index": 0, "id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Oslo"}'}}]},
    ]


def assemble(deltas: list[dict]) -> tuple[str | None, list[dict]]:
    """What an OpenAI client builds from the stream."""
    content, calls = None, []
    for d in deltas:
        if "content" in d:
            content = (content or "") + d["content"]
        for c in d.get("tool_calls", []):
            if c["index"] == len(calls):
                calls.append({"id": c["id"], "type": c["type"], "function": dict(c["function"])})
            else:
                calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
    return content, calls


REPLIES = [
    (HERMES, "Checking.\n\n" + hermes_call("get_weather", '{"city": "Oslo", "days": 2}') + "\n"),
    (HERMES, hermes_call("set_lights", '{"room": "hall"}') + "\n" + hermes_call("get_weather", "{}") + " done "),
    (HERMES, "text " + hermes_call("bad", "{}") + " more <tool_ca"),
    (HERMES, "  <tool_call>\n{}\n</tool_call>  " + hermes_call("get_weather", '{"a": "</tool_call"}')),
    (HERMES, "unicode ü 日本 <tool_call" + hermes_call("get_weather", '{"city": "Zürich"}')),
    (DEEPSEEK_R1, "Sure.\n" + r1_calls(r1_call("get_weather", '{"city": "Oslo"}'), r1_call("set_lights", "{}")) + EOS_R1),
    (DEEPSEEK_R1, r1_calls(r1_call("nope", "{}"), r1_call("get_weather", '{"x": "```"}')) + "\n\nok"),
    (DEEPSEEK_R1, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(REPLIES), st.data())
def test_streamed_deltas_assemble_to_the_whole_reply_for_any_split(reply, data):
    family, text = reply
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
    ids = itertools.count()
    p = ToolCallParser(family, TOOLS, new_id=lambda: f"call_{next(ids)}")
    deltas = [d for piece in pieces for d in p.feed(piece)]
    result = p.finish()
    deltas += result.deltas
    whole_ids = itertools.count()
    whole = ToolCallParser(family, TOOLS, new_id=lambda: f"call_{next(whole_ids)}")
    whole_deltas = whole.feed(text)
    expected = whole.finish()
    content, calls = assemble(deltas)
    assert calls == expected.tool_calls == result.tool_calls
    assert (content or None) == expected.content == result.content
    assert assemble(whole_deltas + expected.deltas) == (content, calls)
    assert all(d.get("content") != "" for d in deltas)


FORCED_REPLIES = [  # as forced_call_grammar writes them (the last two cut short by max_tokens)
    (HERMES, hermes_call("get_weather", '{"city": "Oslo", "days": 2, "unit": "c"}')),
    (
        HERMES,
        hermes_call("set_lights", '{"room": "hall", "on": true, "when": {"hour": 7}}') + "\n" + hermes_call("get_weather", "{}"),
    ),
    (DEEPSEEK_R1, r1_calls(r1_call("get_weather", '{"city": "}```"}'), r1_call("set_lights", '{"room": "hall"}'))),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os'),
    (DEEPSEEK_R1, r1_calls(r1_call("get_weather", '{"city": "Oslo"}'))[:-40]),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FORCED_REPLIES), st.data())
def test_streamed_arguments_of_a_forced_call_assemble_to_the_whole_call_for_any_split(reply, data):
    family, text = reply
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
    p = ToolCallParser(family, TOOLS, stream_arguments=True, new_id=lambda: "call_x")
    deltas = [d for piece in pieces for d in p.feed(piece)]
    result = p.finish()
    whole = ToolCallParser(family, TOOLS, stream_arguments=True, new_id=lambda: "call_x")
    whole.feed(text)
    expected = whole.finish()
    assert assemble(deltas + result.deltas) == (None, expected.tool_calls) and result.content is None
    assert result.tool_calls == expected.tool_calls and expected.tool_calls
    by_auto = parse_tool_calls(family, TOOLS, text)  # the same calls as the validating parser reads them
    if by_auto.tool_calls:
        assert calls_of(by_auto) == calls_of(expected)
        assert all(c["function"]["arguments"] in text for c in expected.tool_calls)  # the model's own text


def test_a_streamed_call_shows_its_arguments_before_it_closes():
    p = ToolCallParser(HERMES, TOOLS, stream_arguments=True, new_id=lambda: "call_x")
    assert p.feed('<tool_call>\n{"name": "get_weather", "arguments": ') == [
        {"tool_calls": [{"index": 0, "id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}
    ]
    first = p.feed('{"city": "Oslo", "days": 3, "unit": "c"}')  # the last 2 characters could start the tail "}\n"
    assert first == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Oslo", "days": 3, "unit": "c'}}]}]
    assert p.feed("}\n</tool_") == [{"tool_calls": [{"index": 0, "function": {"arguments": '"}'}}]}]
    assert p.feed("call>") == []
    assert p.finish().tool_calls[0]["function"]["arguments"] == '{"city": "Oslo", "days": 3, "unit": "c"}'


# --- forcing a call with llguidance on the tiny qwen2 model --------------------------------------


class _Vocab:
    """What llguidance's TokenizerWrapper reads: each token's bytes, EOS and BOS, and encode."""

    def __init__(self, tok):
        self.tokens = [tok.token_to_piece(i) for i in range(tok.n_vocab)]
        self.eos_token_id, self.bos_token_id = tok.eos_id, tok.bos_id
        self.special_token_ids = [i for i in range(tok.n_vocab) if tok.decode([i], skip_special=True) == ""]
        self._tok = tok

    def __call__(self, text: bytes | str) -> list[int]:
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        return self._tok.encode(text, add_bos=False, parse_special=False)


@pytest.fixture(scope="module")
def qwen_models(tiny_f32, tmp_path_factory):
    """tiny-qwen2 with R1-Distill's template (the golden file) and the same weights with Qwen2.5's."""
    q25 = tiny_models.build(tiny_models.SPECS["tiny-qwen2"], tmp_path_factory.mktemp("q25") / "q25.gguf", chat_template=QWEN25)
    models = {DEEPSEEK_R1: edgebox.load(tiny_f32("tiny-qwen2")), HERMES: edgebox.load(q25)}
    ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(models[HERMES].tokenizer)))
    return models, ll


def constrained(model, ll, prompt: str, grammar: str, seed: int, max_tokens: int = 200) -> tuple[list[int], bool]:
    """Sample (temperature 1) under the grammar's token masks; ``(token ids, the grammar was completed)``."""
    matcher = llguidance.LLMatcher(ll, grammar)
    assert not matcher.is_error(), matcher.get_error()
    ids = model.tokenize_prompt(prompt)
    kv, rng, out = model.new_cache(), np.random.default_rng(seed), []
    logits = model.forward(np.array(ids, np.int32), np.arange(len(ids), dtype=np.int32), kv, all_logits=False)[-1]
    n_vocab = len(logits)
    while not matcher.is_stopped() and len(out) < max_tokens:
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")[:n_vocab]
        masked = np.where(bits.astype(bool), logits.astype(np.float64), -np.inf)
        p = np.exp(masked - masked.max())
        token = int(rng.choice(n_vocab, p=p / p.sum()))
        assert matcher.consume_token(token), matcher.get_error()
        if token in model.tokenizer.eog_ids:
            break
        out.append(token)
        pos = np.array([len(ids) + len(out) - 1], np.int32)
        logits = model.forward(np.array([token], np.int32), pos, kv, all_logits=False)[-1]
    return out, matcher.is_accepting()


def stream(model, plan, ids: list[int], thinking_open: bool):
    """The reply as the lead's stream sees it: token texts, reasoning split off, then the plan's
    parser; checks the deltas assemble to the parser's result and returns it."""
    decoder, reasoning, parser, deltas = model.tokenizer.stream_decoder(), ReasoningStream(thinking_open), plan.parser(), []
    pieces = [decoder.feed(token) for token in ids] + [decoder.flush()]
    tagged = [part for piece in pieces for part in reasoning.push(piece)] + reasoning.flush()
    assert not any(is_reasoning for is_reasoning, _ in tagged)  # the grammar closed <think> at once
    for _, text in tagged:
        deltas += parser.feed(text)
    result = parser.finish()
    assert assemble(deltas + result.deltas) == (result.content, result.tool_calls)
    assert result.finish_reason == "tool_calls" and result.content is None
    return result


def generated_calls(family: str, text: str) -> list[tuple[str, dict]]:
    if family == DEEPSEEK_R1:
        reasoning, text = split_reasoning(text, thinking_open=True)
        assert reasoning == ""
    result = parse_tool_calls(family, TOOLS, text)
    assert result.content is None and result.finish_reason == "tool_calls", text
    return calls_of(result)


@pytest.mark.parametrize("family", [HERMES, DEEPSEEK_R1])
@pytest.mark.parametrize("grammar_text", [False, True])
def test_forced_call_grammars_compile_against_the_qwen2_tokenizer(qwen_models, family, grammar_text):
    _, ll = qwen_models
    for choice, parallel, thinking in itertools.product(["required", "get_weather", "set_lights"], [False, True], [False, True]):
        grammar = tc.forced_call_grammar(family, TOOLS, choice, parallel=parallel, thinking_open=thinking)
        if grammar_text:
            assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", grammar), ll) == ""
        else:
            assert not llguidance.LLMatcher(ll, llguidance.grammar_from("lark", grammar)).is_error()


@pytest.mark.parametrize("family", [HERMES, DEEPSEEK_R1])
def test_forced_calls_round_trip_call_result_and_final_answer(qwen_models, family):
    models, ll = qwen_models
    model = models[family]
    specials = dict(bos_token=BOS_R1, eos_token=EOS_R1) if family == DEEPSEEK_R1 else {}
    seen = set()
    for seed, choice in enumerate(["required", "get_weather", "set_lights", "required"]):
        tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
        prompt = render_chat(model.chat_template, ASK, tools=TOOLS, tool_choice=tool_choice, **specials)
        plan = tc.plan_tools(model.chat_template, TOOLS, tool_choice, thinking_open=prompt.endswith("<think>\n"))
        ids, completed = constrained(model, ll, prompt, plan.grammar, seed)
        text = model.detokenize(ids)
        assert completed, text
        calls = generated_calls(family, text)
        streamed = stream(model, plan, ids, thinking_open=family == DEEPSEEK_R1)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed.tool_calls] == calls
        assert len(calls) == 1
        name, args = calls[0]
        assert choice in ("required", name)
        schema = next(t for t in TOOLS if t["function"]["name"] == name)["function"]["parameters"]
        jsonschema.validate(args, schema)
        seen.add(name)

        # the call and its result go back through the template; the answer is free text (tool_choice none)
        call = parse_tool_calls(family, TOOLS, split_reasoning(text, thinking_open=family == DEEPSEEK_R1)[1]).tool_calls[0]
        msgs = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}]
        msgs.append({"role": "tool", "tool_call_id": call["id"], "content": '{"ok": true}'})
        follow = render_chat(model.chat_template, msgs, tools=TOOLS, tool_choice="none", **specials)
        assert call["function"]["name"] in follow and '{"ok": true}' in follow
        assert follow.count(call["function"]["name"]) == prompt.count(call["function"]["name"]) + 1
        assert tc.plan_tools(model.chat_template, TOOLS, "none").parser() is None
        answer = "".join(model.generate(follow, max_tokens=4, temperature=0.0))
        assert answer.strip()
    assert seen == {"get_weather", "set_lights"}  # the named choices at least


def test_a_call_forced_under_parallel_may_hold_several(qwen_models):
    models, ll = qwen_models
    prompt = render_chat(models[HERMES].chat_template, ASK, tools=TOOLS)
    grammar = tc.forced_call_grammar(HERMES, TOOLS, "required", parallel=True)
    ids, completed = constrained(models[HERMES], ll, prompt, grammar, seed=7, max_tokens=400)
    text = models[HERMES].detokenize(ids)
    assert completed
    for name, args in generated_calls(HERMES, text):
        jsonschema.validate(args, next(t for t in TOOLS if t["function"]["name"] == name)["function"]["parameters"])
