"""The HTTP API's pieces without a server: settings, request bodies -> engine requests, error
lines, metrics. The server itself is tested end to end in tests/integration/test_http.py."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from edgebox.daemon.config import ConfigError, http_address, load_config
from edgebox.daemon.http_app import describe_errors
from edgebox.daemon.metrics import Metrics
from edgebox.daemon.openai_schemas import ChatCompletionRequest, CompletionRequest, engine_request
from edgebox.engine.request import Summary


@pytest.mark.parametrize(
    "text, expected", [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:0", ("::1", 0)), ("box.local:80", ("box.local", 80))]
)
def test_http_addresses(text, expected):
    assert http_address(text) == expected


@pytest.mark.parametrize("text", ["8080", "127.0.0.1", ":8080", "host:http", "host:70000", "[::1]"])
def test_bad_http_addresses_name_the_form(text):
    with pytest.raises(ValueError, match="HOST:PORT"):
        http_address(text)


def test_http_settings_are_checked(tmp_path):
    assert load_config(flags={"broker": "none"}, env={}).has_broker is False
    with pytest.raises(ConfigError, match="reserved"):
        load_config(flags={"device_id": "fleet"}, env={})
    with pytest.raises(ConfigError, match="unreachable"):
        load_config(flags={"broker": "none", "http": "none"}, env={})
    with pytest.raises(ConfigError, match="ssl_cert_file and ssl_key_file go together"):
        load_config(flags={"ssl_cert_file": tmp_path / "c.pem"}, env={})
    with pytest.raises(ConfigError, match="http"):
        load_config(flags={"http": "nowhere"}, env={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(flags={"api_key_file": tmp_path / "empty"}, env={}).resolved_api_key({})
    (tmp_path / "api-key").write_text("k1\n")
    assert load_config(env={}).resolved_api_key({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "k1"
    assert "api_key_file" not in load_config(flags={"api_key_file": tmp_path / "api-key"}, env={}).public()


def _request(body: dict, limit: int = 100):
    model = ChatCompletionRequest if "messages" in body else CompletionRequest
    return engine_request(model.model_validate(body), default_max_tokens=limit, max_tokens_limit=limit, request_id="r1")


def test_chat_bodies_become_engine_requests():
    r = _request(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_completion_tokens": 7,
            "temperature": 0,
            "stop": "\n",
            "top_k": 3,
            "unknown_newer_field": {"ignored": True},
        }
    )
    assert r.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"})
    assert (r.max_tokens, r.stop, r.params.temperature, r.params.top_k, r.request_id) == (7, ("\n",), 0.0, 3, "r1")
    assert _request({"messages": [{"role": "user", "content": "x"}]}).params.top_k == 40  # the sampler's default


def test_completion_prompts_are_text_or_token_ids():
    assert _request({"prompt": "x"}).prompt == "x"
    assert _request({"prompt": [1, 2, 3]}).prompt_ids == (1, 2, 3)
    assert _request({"prompt": [[4, 5]]}).prompt_ids == (4, 5)
    assert _request({"prompt": ["y"]}).prompt == "y"
    for body, where in [
        ({"prompt": ["a", "b"]}, "one prompt per request"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "max_tokens": "5"}, "integer"),
        ({"prompt": "x", "stream": 1}, "boolean"),
        ({"prompt": "x", "stop": ["s"] * 17}, "16"),
    ]:
        with pytest.raises(ValidationError, match=where):
            CompletionRequest.model_validate(body)
    with pytest.raises(ValueError, match="max_tokens 101 exceeds this server's limit of 100"):
        _request({"prompt": "x", "max_tokens": 101})


def test_validation_errors_read_as_one_line_naming_the_field():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": [{"role": "bot", "content": "x"}], "top_p": 3})
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    message, param = describe_errors(errors)
    assert param in ("messages.0.role", "top_p") and message.startswith(f"{param}: ") and "(and 1 more problems)" in message
    assert "\n" not in message


def test_metrics_count_requests_and_read_the_box_at_scrape():
    chips = [
        {
            "chip": "chip0",
            "power_w": 2.5,
            "freq_mhz": 800,
            "temp_c": 41.0,
            "throttle_reasons": ["budget"],
            "energy_counter_j": 12.0,
        }
    ]
    m = Metrics(
        engine=lambda: {"running": 2, "queued": 1, "batch_limit": 4, "kv_used_bytes": 50, "kv_budget_bytes": 200},
        power=lambda: {"budget_w": 10.0, "enforced": True},
        chips=lambda: chips,
    )
    done = Summary(
        "r",
        "length",
        "t",
        "t",
        "",
        prompt_tokens=9,
        cached_prompt_tokens=4,
        generated_tokens=5,
        ttft_s=0.05,
        decode_s=0.4,
        total_s=0.5,
    )
    m.finished("http", "/v1/completions", done)
    m.finished("mqtt", "generate", Summary("s", "cancelled", "", "", ""))
    m.refused("http", "/v1/completions", 429)
    samples = [s for f in text_string_to_metric_families(m.render().decode()) for s in f.samples]

    def value(name, **labels):
        named = [s for s in samples if s.name in (name, name + "_total")]
        assert named, name
        return sum(s.value for s in named if all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("edgebox_requests", transport="http", outcome="length") == 1
    assert value("edgebox_requests", transport="mqtt", outcome="cancelled") == 1
    assert value("edgebox_requests", outcome="refused_429") == 1
    assert value("edgebox_prompt_tokens", transport="http") == 9 and value("edgebox_prefix_cache_hits") == 4
    assert value("edgebox_time_per_output_token_seconds_sum") == pytest.approx(0.1)
    assert value("edgebox_kv_cache_usage_perc") == 0.25 and value("edgebox_num_requests_waiting") == 1
    assert value("edgebox_chip_throttled", chip="chip0", reason="budget") == 1
    assert value("edgebox_chip_energy_joules", chip="chip0") == 12.0


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("reasoning", [True, False])
def test_a_pre_rendered_stream_event_is_the_chunk_json(chat, reasoning):
    import json

    from edgebox.daemon.openai_responses import Shape

    shape = Shape(chat, "abc", 'model "x"')
    for text in ["", "a", 'quote " and \\ backslash', "ünïcödé \n\t", "\x00\u2028"]:
        event = shape.delta_event(text, reasoning)
        assert event.startswith("data: ") and event.endswith("\n\n") and "\n" not in event[:-2]
        expected = shape.delta(text, reasoning)
        if chat and not text:  # delta() leaves an empty text out; the stream never sends one
            expected["choices"][0]["delta"] = {"reasoning_content" if reasoning else "content": ""}
        if not chat:
            expected = shape.delta(text)
        assert json.loads(event[6:]) == expected


def test_mqtt_generate_takes_the_same_sampler_fields():
    from edgebox.daemon.commands import Rejected, build_request
    from edgebox.daemon.schemas import GenerateParams

    p = GenerateParams.model_validate(
        {"prompt": "x", "typical_p": 0.5, "logit_bias": {"7": -1.5}, "samplers": ["top_k", "temp"], "ignore_eos": True}
    )
    params = build_request(p, 4096, "e").params
    assert (params.typical_p, params.logit_bias, params.samplers, params.ignore_eos) == (
        0.5,
        ((7, -1.5),),
        ("top_k", "temperature"),
        True,
    )
    with pytest.raises(Rejected, match="samplers"):
        build_request(GenerateParams.model_validate({"prompt": "x", "samplers": ["nope"]}), 4096, "e")
    with pytest.raises(ValidationError, match="typical_p"):
        GenerateParams.model_validate({"prompt": "x", "typical_p": 2})
