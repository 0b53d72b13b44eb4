"""The daemon end to end: ``edgebox serve`` as a subprocess against a real Mosquitto on loopback.

One shared daemon serves the protocol tests (streaming, concurrency, bad input, status, CLI);
the lifecycle tests (systemd notify, SIGHUP, SIGTERM drain, SIGKILL + persistent session,
broker restart, deployed broker config) each run their own.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import edgebox
from edgebox.daemon.client import ClientError, CommandFailed, FleetClient
from tests.fixtures.daemon import REPO, Daemon
from tests.fixtures.mosquitto import MOSQUITTO, Mosquitto, free_port
from tests.fixtures.paths import TEST_MODEL

# No broker, no daemon tests: fail loudly rather than skip (.ci/run installs mosquitto).
assert MOSQUITTO is not None, "mosquitto is not installed: apt-get install mosquitto (.ci/run does)"

PROMPT = "def fibonacci(n):"
# Requests that must run long (to be cancelled, expire behind, or straddle a restart) are greedy
# and ask for many tokens: the bundled model has random weights, so sampling may draw EOS early;
# greedy, these prompts reach max_tokens (checked with the library), and the tiny model decodes
# at 10 to 300 tokens/s depending on what else runs on the machine.

pytestmark = [pytest.mark.broker, pytest.mark.slow]


# -- helpers ----------------------------------------------------------------------------------------


class Recorder:
    """A raw paho client (MQTT 5 unless told) recording everything on the topics it follows."""

    def __init__(
        self, url: str, *topics: str, protocol=mqtt.MQTTv5, client_id: str | None = None, session_expiry: int | None = None
    ):
        host, port = url.removeprefix("mqtt://").split(":")
        self.messages: list[tuple[str, dict | bytes, object]] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"rec-{uuid.uuid4().hex[:8]}", protocol=protocol
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, u, f, rc, p: [c.subscribe(t, qos=1) for t in topics]
        kwargs = {}
        if protocol == mqtt.MQTTv5 and session_expiry:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
            kwargs["properties"] = props
            kwargs["clean_start"] = False  # Mosquitto persists only sessions begun without clean start
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect(host, int(port), **kwargs)
        self.client.loop_start()
        assert not topics or subscribed.wait(5), "no SUBACK"
        time.sleep(0.05)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            data = msg.payload
        with self.cond:
            self.messages.append((msg.topic, data, msg.properties))
            self.cond.notify_all()

    def find(self, predicate) -> list:
        with self.cond:
            return [m for m in self.messages if predicate(m)]

    def wait_for(self, predicate, timeout: float = 20.0, count: int = 1) -> list:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in self.messages if predicate(m)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"waited {timeout} s for {count} message(s); have {len(found)}; last messages: {self.messages[-5:]}"
                    )
                self.cond.wait(left)

    def publish(
        self,
        topic: str,
        payload,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry: int | None = None,
        qos: int = 1,
        retain: bool = False,
    ) -> None:
        props = None
        if self.client._protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
            if expiry is not None:
                props.MessageExpiryInterval = expiry
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        self.client.publish(topic, data, qos=qos, retain=retain, properties=props).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def finals(rec: Recorder, request_id: str | None = None) -> list[dict]:
    return [
        d
        for _, d, _ in rec.messages
        if isinstance(d, dict) and d.get("done") is True and (request_id is None or d.get("request_id") == request_id)
    ]


def chunks(rec: Recorder, request_id: str) -> list[dict]:
    return [d for _, d, _ in rec.messages if isinstance(d, dict) and d.get("done") is False and d.get("request_id") == request_id]


def is_final(request_id: str):
    return lambda m: isinstance(m[1], dict) and m[1].get("done") is True and m[1].get("request_id") == request_id


@pytest.fixture
def stopper():
    """Register brokers, daemons and recorders as they start; all are stopped at teardown, even when
    a start fails half-way (a leaked broker would outlive the test run)."""
    started: list = []
    yield started.append
    for thing in reversed(started):
        try:
            thing.stop() if hasattr(thing, "stop") else thing.close()
        except Exception:  # noqa: BLE001 - cleanup goes on
            pass


# -- the shared daemon ------------------------------------------------------------------------------

DEVICE = "box-test"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Mosquitto(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def daemon(broker, tmp_path_factory):
    """The default limits (max_batch, max_in_flight: the burst tests need exactly those)."""
    d = tmp_path_factory.mktemp("daemon")
    fw = d / "fw"  # the daemon's chips publish their firmware tree here
    daemon = Daemon(
        d,
        "--broker",
        broker.url,
        "--device-id",
        DEVICE,
        "--telemetry-interval-s",
        "0.5",
        "--fw-root",
        str(fw),
        "--max-tokens-limit",
        "512",
    ).start()
    daemon.fw_root = fw
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def fleet(broker, daemon):
    with FleetClient(broker.url) as f:
        yield f


@pytest.fixture
def rec(broker, daemon):
    r = Recorder(broker.url, f"edgebox/v1/{DEVICE}/reply/#", f"edgebox/v1/{DEVICE}/event")
    yield r
    r.close()


def reply_topic(name: str = "t") -> str:
    return f"edgebox/v1/{DEVICE}/reply/{name}"


def test_idle_daemon_uses_almost_no_cpu(daemon):
    """Idle (telemetry every 0.5 s meanwhile): below 2% of one core over 3 s."""
    p = psutil.Process(daemon.proc.pid)
    time.sleep(0.5)  # let the warm-up settle
    t0, cpu0 = time.monotonic(), p.cpu_times()
    time.sleep(3.0)
    cpu1, t1 = p.cpu_times(), time.monotonic()
    used = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
    assert used < 0.02, f"idle daemon used {used:.1%} of a core"


def test_generate_streams_ordered_chunks_then_one_final(rec, broker):
    rid = "stream-1"
    rec.publish(
        f"edgebox/v1/{DEVICE}/cmd/generate",
        {"request_id": rid, "params": {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}},
        response_topic=reply_topic(),
        correlation=b"corr-1",
    )
    rec.wait_for(is_final(rid), timeout=60)
    time.sleep(0.2)
    msgs = [(d, p) for t, d, p in rec.messages if t == reply_topic() and isinstance(d, dict) and d.get("request_id") == rid]
    body = [d for d, _ in msgs]
    assert [d["seq"] for d in body] == list(range(len(body))), "chunks then the final, in seq order"
    assert all(d["done"] is False for d in body[:-1]) and body[-1]["done"] is True
    assert all(p.CorrelationData == b"corr-1" for _, p in msgs), "Correlation Data copied on every message"
    final = body[-1]
    assert final["status"] == "ok" and final["code"] == 200 and final["done_reason"] == "length", final
    assert final["usage"]["completion_tokens"] == 12 and final["usage"]["prompt_tokens"] > 0
    assert set(final["timings"]) >= {"ttft_ms", "decode_ms", "total_ms", "decode_tokens_per_s"}
    energy = final["energy"]
    assert energy["joules"] > 0 and energy["joules_per_token"] == pytest.approx(energy["joules"] / 12, rel=1e-3, abs=2e-6)
    assert energy["prefill_j"] + energy["decode_j"] == pytest.approx(energy["joules"], abs=2e-6) and energy["avg_w"] > 0
    # the daemon's greedy text is the library's greedy text
    expected = "".join(edgebox.load(TEST_MODEL).generate(PROMPT, max_tokens=12, temperature=0.0))
    assert "".join(d["delta"] for d in body[:-1]) == expected


def test_five_clients_fifty_requests_each_answered_exactly_once(broker, daemon):
    results: dict[str, list] = {}
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with FleetClient(broker.url, client_id=f"load-{n}") as f:
                handles = []
                for i in range(10):
                    rid = f"c{n}-r{i}"
                    got: list[dict] = []
                    final = f.call_raw(
                        DEVICE,
                        "generate",
                        {"prompt": f"# task {n}.{i}\n", "max_tokens": 3, "seed": i},
                        request_id=rid,
                        on_chunk=got.append,
                        timeout=90,
                    )
                    handles.append((rid, got, final))
                for rid, got, final in handles:
                    results.setdefault(rid, []).append((got, final))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    # each client sends its 10 requests one after another; the 5 clients run at once
    threads = [threading.Thread(target=client, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 50 and all(len(v) == 1 for v in results.values())
    for rid, [(got, final)] in results.items():
        assert final["request_id"] == rid and final["status"] == "ok", final
        assert [c["seq"] for c in got] == list(range(final["seq"])) and all(c["request_id"] == rid for c in got)


def test_fifty_concurrent_requests_from_one_client_all_answered(fleet):
    """All in flight at once (more than max_batch): the engine queues, every one gets its final."""
    out: dict[str, dict] = {}
    threads = []
    for i in range(50):

        def one(i=i):
            out[f"p{i}"] = fleet.call_raw(
                DEVICE, "generate", {"prompt": f"x{i}", "max_tokens": 2}, request_id=f"p{i}", timeout=120
            )

        threads.append(threading.Thread(target=one))
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert len(out) == 50 and all(f["status"] == "ok" and f["request_id"] == r for r, f in out.items())


def test_default_config_serves_a_burst_of_fifty_from_five_controllers(broker, daemon):
    """Issue #15: with the default config, 5 controllers sending 50 short generates at once got
    16 ok and 34 x 429 (max_in_flight 16 counted queued work). Now the requests beyond the batch
    wait in the queue (max_batch + 512): every one is answered ok, exactly once."""
    recs = [Recorder(broker.url, reply_topic(f"burst{n}")) for n in range(5)]
    go = threading.Event()

    def controller(n: int) -> None:
        go.wait(10)
        for i in range(10):
            recs[n].publish(
                f"edgebox/v1/{DEVICE}/cmd/generate",
                {"request_id": f"b{n}-{i}", "params": {"prompt": f"# task {n}.{i}\n", "max_tokens": 3, "seed": i}},
                response_topic=reply_topic(f"burst{n}"),
            )

    threads = [threading.Thread(target=controller, args=(n,)) for n in range(5)]
    try:
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(30)
        for r in recs:
            r.wait_for(lambda m: isinstance(m[1], dict) and m[1].get("done") is True, count=10, timeout=120)
        time.sleep(0.5)  # a second final would show up now
        for n, r in enumerate(recs):
            got = finals(r)
            assert sorted(f["request_id"] for f in got) == sorted(f"b{n}-{i}" for i in range(10)), "each answered exactly once"
            assert [f for f in got if f["status"] != "ok"] == []
    finally:
        for r in recs:
            r.close()


def _bad(rec: Recorder, payload, *, topic: str = "generate", **kw) -> dict:
    correlation = uuid.uuid4().bytes
    rec.publish(f"edgebox/v1/{DEVICE}/cmd/{topic}", payload, response_topic=reply_topic("bad"), correlation=correlation, **kw)
    [(_, reply, _)] = rec.wait_for(
        lambda m: (
            m[0] == reply_topic("bad")
            and getattr(m[2], "CorrelationData", None) == correlation
            and isinstance(m[1], dict)
            and m[1].get("done")
        ),
        timeout=30,
    )
    return reply


LONG = "word " * 3000  # ~3000 tokens: over the bundled model's 2048-token context


@pytest.mark.parametrize(
    "case, payload, topic, code, says",
    [
        ("malformed JSON", b'{"request_id": "x", "params": {', "generate", 400, "not JSON"),
        ("not an object", b"[1, 2]", "generate", 400, "JSON object"),
        ("not UTF-8", b"\xff\xfe\x00", "generate", 400, "not JSON"),
        ("wrong type", {"request_id": "w1", "params": {"prompt": "hi", "max_tokens": "ten"}}, "generate", 400, "max_tokens"),
        ("bool as int", {"request_id": "w2", "params": {"prompt": "hi", "max_tokens": True}}, "generate", 400, "max_tokens"),
        ("unknown param", {"request_id": "w3", "params": {"prompt": "hi", "max_token": 5}}, "generate", 400, "max_token"),
        ("no prompt", {"request_id": "w4", "params": {"max_tokens": 5}}, "generate", 400, "exactly one"),
        ("request_id type", {"request_id": 7, "params": {"prompt": "hi"}}, "generate", 400, "request_id"),
        ("unknown method", {"request_id": "m1", "params": {}}, "reboot", 404, "unknown method"),
        (
            "max_tokens over the limit",
            {"request_id": "l1", "params": {"prompt": "hi", "max_tokens": 100000}},
            "generate",
            400,
            "limit",
        ),
        (
            "prompt over the context",
            {"request_id": "ctx1", "params": {"prompt": LONG, "max_tokens": 4}},
            "generate",
            413,
            "context",
        ),
        ("oversize payload", {"request_id": "big1", "params": {"prompt": "x" * 300_000}}, "generate", 413, "max_payload_bytes"),
        ("expired (expires_at)", {"request_id": "e1", "expires_at": 1.0, "params": {"prompt": "hi"}}, "generate", 408, "expired"),
        ("cancel unknown", {"request_id": "k1", "params": {"target": "nope"}}, "cancel", 404, "nope"),
        ("bad budget", {"request_id": "b1", "params": {"watts": -3}}, "set_power_budget", 400, "watts"),
        ("load outside models_dir", {"request_id": "lm1", "params": {"path": "/etc/passwd"}}, "load_model", 400, "models_dir"),
        ("load missing file", {"request_id": "lm2", "params": {"path": "nope.gguf"}}, "load_model", 404, "not found"),
        # issue #15's small gaps: a 500 each (a lone surrogate reached the tokenizer, a NUL the file
        # system), and an expires_at of NaN that never expired
        ("lone surrogate", b'{"request_id": "u1", "params": {"prompt": "a\\ud800b"}}', "generate", 400, "Unicode"),
        (
            "lone surrogate in chat",
            b'{"request_id": "u2", "params": {"messages": [{"role": "user", "content": "\\udc00"}]}}',
            "generate",
            400,
            "Unicode",
        ),
        ("NUL in a path", b'{"request_id": "u3", "params": {"path": "m\\u0000.gguf"}}', "load_model", 400, "NUL"),
        ("expires_at NaN", b'{"request_id": "u4", "expires_at": NaN, "params": {"prompt": "hi"}}', "generate", 400, "expires_at"),
    ],
)
def test_bad_input_gets_an_error_reply_and_the_daemon_carries_on(rec, fleet, case, payload, topic, code, says):
    reply = _bad(rec, payload, topic=topic)
    assert reply["status"] == "error" and reply["code"] == code, reply
    assert says in reply["message"] and "\n" not in reply["message"], reply
    rec.wait_for(lambda m: m[0].endswith("/event") and m[1].get("event") == "bad_request" and m[1].get("code") == code)
    # and the box still serves
    assert fleet.call(DEVICE, "get_status", timeout=20)["result"]["state"] == "ready"


def test_retained_command_is_refused_and_cleared(rec, broker):
    topic = f"edgebox/v1/{DEVICE}/cmd/get_status"
    other = Recorder(broker.url)
    other.publish(topic, {"request_id": "ret1", "params": {}, "reply_to": reply_topic("ret")}, retain=True)
    other.close()
    [(_, reply, _)] = rec.wait_for(lambda m: m[0] == reply_topic("ret"), timeout=20)
    assert reply["code"] == 400 and "retained" in reply["message"]
    time.sleep(0.3)
    late = Recorder(broker.url, topic)  # a new subscriber sees no retained command any more
    time.sleep(0.3)
    assert not late.messages
    late.close()


def test_duplicate_request_id_is_answered_once(rec):
    cmd = {"request_id": "dup-1", "params": {"prompt": "hello", "max_tokens": 4}}
    for _ in range(3):  # e.g. a client retrying, or the broker redelivering
        rec.publish(f"edgebox/v1/{DEVICE}/cmd/generate", cmd, response_topic=reply_topic("dup"), correlation=b"d")
    rec.wait_for(is_final("dup-1"), timeout=60)
    rec.wait_for(lambda m: m[0].endswith("/event") and m[1].get("event") == "duplicate_request", count=2)
    time.sleep(1.0)
    assert len(finals(rec, "dup-1")) == 1
    seqs = [c["seq"] for c in chunks(rec, "dup-1")]
    assert seqs == list(range(len(seqs))), "one stream, not three interleaved"


def test_mqtt311_caller_gets_replies_on_reply_to(broker, daemon):
    rec = Recorder(broker.url, "legacy/replies/#", protocol=mqtt.MQTTv311)
    rec.publish(
        f"edgebox/v1/{DEVICE}/cmd/generate",
        {"request_id": "v311", "reply_to": "legacy/replies/me", "params": {"prompt": "hi", "max_tokens": 3}},
    )
    [(_, final, _)] = rec.wait_for(is_final("v311"), timeout=60)
    assert final["status"] == "ok" and final["usage"]["completion_tokens"] <= 3
    rec.close()


def test_reply_topics_inside_the_device_tree_are_refused(rec):
    """A reply published to our own cmd topic would come back as a command: refused (event only)."""
    rec.publish(
        f"edgebox/v1/{DEVICE}/cmd/get_status",
        {"request_id": "loop1", "params": {}, "reply_to": f"edgebox/v1/{DEVICE}/cmd/generate"},
    )
    [(_, event, _)] = rec.wait_for(lambda m: m[0].endswith("/event") and m[1].get("request_id") == "loop1")
    assert event["code"] == 400 and "reply" in event["message"]


def test_cancel_ends_the_stream_with_a_final_reply(rec, fleet):
    rec.publish(
        f"edgebox/v1/{DEVICE}/cmd/generate",
        {"request_id": "long-1", "params": {"prompt": "once upon", "max_tokens": 500, "temperature": 0}},
        response_topic=reply_topic(),
        correlation=b"c",
    )
    rec.wait_for(lambda m: isinstance(m[1], dict) and m[1].get("request_id") == "long-1" and m[1].get("done") is False)
    reply = fleet.call(DEVICE, "cancel", {"target": "long-1"}, timeout=20)
    assert reply["result"]["cancelled"] == 1
    [(_, final, _)] = rec.wait_for(is_final("long-1"), timeout=20)
    assert final["done_reason"] == "cancelled" and final["status"] == "ok"
    assert final["usage"]["completion_tokens"] < 500


def test_stream_false_returns_the_text_in_the_final(fleet):
    final = fleet.call(
        DEVICE,
        "generate",
        {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": False},
        timeout=60,
        on_chunk=lambda c: pytest.fail(f"no chunks with stream=false: {c}"),
    )
    assert final["text"] == "".join(edgebox.load(TEST_MODEL).generate(PROMPT, max_tokens=5, temperature=0.0))


def test_chat_messages_go_through_the_model_template(fleet):
    final = fleet.call(DEVICE, "generate", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, timeout=60)
    assert final["usage"]["prompt_tokens"] > 3  # the template wrapped the message


def test_structured_output_and_sampler_fields_over_mqtt(fleet):
    """The same fields as the HTTP API: ollama's format, OpenAI's response_format, llama.cpp's samplers."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    stopped = 0
    for seed in range(3):
        final = fleet.call(
            DEVICE,
            "generate",
            {"prompt": "{", "format": schema, "max_tokens": 30, "seed": seed, "stream": False, "typical_p": 0.9},
            timeout=60,
        )
        if final["done_reason"] == "stop":
            assert 0 <= json.loads(final["text"])["n"] <= 9
            stopped += 1
    assert stopped >= 1
    final = fleet.call(DEVICE, "generate", {"prompt": "x", "max_tokens": 3, "temperature": 0, "logprobs": 2}, timeout=60)
    assert len(final["logprobs"]) == final["usage"]["completion_tokens"] and all(len(e["top"]) == 2 for e in final["logprobs"])
    final = fleet.call(
        DEVICE,
        "generate",
        {"prompt": "x", "max_tokens": 4, "top_k": 3, "top_p": 1.0, "min_p": 0.0, "temperature": 1, "n_probs": 3},
        timeout=60,
    )
    for e in final["probs"]:  # after top-k 3: three candidates whose probabilities sum to 1, the drawn one among them
        assert len(e["top"]) == 3 and sum(p for _, p in e["top"]) == pytest.approx(1.0, abs=1e-5)
        assert e["token"] in [t for t, _ in e["top"]]
    with pytest.raises(CommandFailed, match="400"):
        fleet.call(DEVICE, "generate", {"prompt": "x", "response_format": {"type": "regex", "regex": "("}}, timeout=30)
    with pytest.raises(CommandFailed, match="400.*tools are not supported"):
        fleet.call(
            DEVICE,
            "generate",
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
            timeout=30,
        )


def test_status_state_telemetry_and_throttle_events(broker, daemon, fleet):
    rec = Recorder(broker.url, f"edgebox/v1/{DEVICE}/#")
    [(_, status, _)] = rec.wait_for(lambda m: m[0].endswith("/status"))
    assert status["state"] == "online"
    [(_, state, _)] = rec.wait_for(lambda m: m[0].endswith("/state"))
    assert state["model"]["name"] == TEST_MODEL.name and state["chips"] == 4 and "budget_w" in state
    assert state["budget_enforced"] is True and {"version", "sha256"} <= set(state["config"])
    [(_, tel, _)] = rec.wait_for(lambda m: m[0].endswith("/telemetry"))
    assert [c["chip"] for c in tel["chips"]] == ["chip0", "chip1", "chip2", "chip3"]
    assert {"power_w", "freq_mhz", "max_freq_mhz", "temp_c", "throttle_reasons"} <= set(tel["chips"][0])
    assert {"batch", "queue", "tokens_per_s", "in_flight", "budget_w"} <= set(tel) and tel["host"]["rss_bytes"] > 0
    assert tel["engine"]["batch_limit"] >= 1 and tel["engine"]["kv_budget_bytes"] > 0
    assert tel["engine"]["energy"]["total_j"] > tel["engine"]["energy"]["idle_j"] >= 0  # the warm-up's steps at least
    assert tel["power"]["enforced"] is True and tel["power"]["budget_w"] == tel["budget_w"]
    # the same tree `edgebox power status` reads
    assert sorted(p.name for p in daemon.fw_root.glob("chip*")) == ["chip0", "chip1", "chip2", "chip3"]
    result = fleet.call(DEVICE, "get_status", timeout=20)["result"]
    assert result["engine"] is not None and result["counters"]["received"] > 0 and "password" not in result["settings"]
    rec.close()


def test_budget_is_enforced_by_the_governor_and_reported(broker, daemon, fleet):
    """A budget below what the chips draw at full clock: the governor lowers their clocks and the
    batch limit while requests run (telemetry says "budget"), and parks the clocks when idle."""
    rec = Recorder(broker.url, f"edgebox/v1/{DEVICE}/#")
    try:
        result = fleet.call(DEVICE, "set_power_budget", {"watts": 2.0}, timeout=20)["result"]
        assert result == {"budget_w": 2.0, "enforced": True}
        rec.wait_for(lambda m: m[0].endswith("/state") and m[1].get("budget_w") == 2.0)
        # four requests that the governor runs one at a time (batch limit 1 at 2 W): seconds of work
        ids = [f"capped-{i}" for i in range(4)]
        for rid in ids:
            rec.publish(
                f"edgebox/v1/{DEVICE}/cmd/generate",
                {"request_id": rid, "params": {"prompt": PROMPT, "max_tokens": 500, "temperature": 0}},
                response_topic=reply_topic(),
            )
        [(_, tel, _)] = rec.wait_for(
            lambda m: (
                m[0].endswith("/telemetry")
                and m[1]["batch"] >= 1
                and m[1]["power"]["budget_w"] == 2.0
                and not m[1]["power"]["idle"]
            ),
            timeout=30,
        )[:1]
        assert all(c["freq_mhz"] < c["top_mhz"] and "budget" in c["throttle_reasons"] for c in tel["chips"]), tel["chips"]
        assert tel["power"]["freq_mhz"] == tel["chips"][0]["max_freq_mhz"] and tel["engine"]["batch_limit"] == 1
        assert any(e["kind"] == "budget" and e["new_w"] == 2.0 for e in tel["power"]["recent_events"])
        for rid in ids:
            rec.publish(
                f"edgebox/v1/{DEVICE}/cmd/cancel",
                {"request_id": f"k-{rid}", "params": {"target": rid}},
                response_topic=reply_topic(),
            )
        for rid in ids:
            rec.wait_for(is_final(rid), timeout=60)
        # idle: the governor parks the clocks, and says so as "idle", not as a budget cap
        rec.wait_for(
            lambda m: (
                m[0].endswith("/telemetry")
                and m[1]["batch"] == 0
                and all(c["throttle_reasons"] == ["idle"] for c in m[1]["chips"])
            ),
            timeout=30,
        )
    finally:
        fleet.call(DEVICE, "set_power_budget", {"watts": 10.0}, timeout=20)
        rec.close()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgebox.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_operator_cli(broker, daemon):
    b = ["client", "--broker", broker.url]
    gen = _cli(*b, "generate", "--device", DEVICE, "-p", PROMPT, "-n", "6", "--temp", "0")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.rstrip("\n") == "".join(edgebox.load(TEST_MODEL).generate(PROMPT, max_tokens=6, temperature=0.0)).rstrip(
        "\n"
    )
    assert "generated 6 tokens" in gen.stderr
    devices = _cli(*b, "devices")
    assert devices.returncode == 0 and any(line.split()[:2] == [DEVICE, "online"] for line in devices.stdout.splitlines()), (
        devices.stdout
    )
    budget = _cli(*b, "budget", "8", "--device", DEVICE)
    assert budget.returncode == 0 and f"{DEVICE}: budget 8.0 W" in budget.stdout
    status = _cli(*b, "status", "--device", DEVICE)
    assert status.returncode == 0 and json.loads(status.stdout)["budget_w"] == 8.0
    # errors: one line on stderr, exit 2
    nobody = _cli("client", "--broker", broker.url, "--timeout", "1", "status", "--device", "nobody")
    assert nobody.returncode == 2 and nobody.stderr.count("\n") == 1 and "no reply from nobody" in nobody.stderr
    down = _cli("client", "--broker", f"mqtt://127.0.0.1:{free_port()}", "devices")
    assert down.returncode == 2 and down.stderr.startswith("edgebox: error: cannot reach broker")


def test_unload_then_load_model(fleet, tmp_path):
    assert fleet.call(DEVICE, "unload_model", timeout=30)["result"]["state"] == "unloaded"
    gen = fleet.call_raw(DEVICE, "generate", {"prompt": "hi", "max_tokens": 2}, timeout=20)
    assert gen["code"] == 503 and "load_model" in gen["message"]
    loaded = fleet.call(DEVICE, "load_model", {"path": TEST_MODEL.name}, timeout=60)["result"]
    assert loaded["name"] == TEST_MODEL.name and loaded["warmup_s"] >= 0
    assert fleet.call(DEVICE, "generate", {"prompt": "hi", "max_tokens": 2}, timeout=60)["status"] == "ok"


# -- lifecycle: systemd notify, limits, expiry in the queue, SIGHUP, SIGTERM drain ---------------------


class NotifySocket:
    """A fake systemd: an abstract AF_UNIX datagram socket collecting sd_notify messages."""

    def __init__(self):
        self.name = f"edgebox-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def env(self) -> str:
        return "@" + self.name

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[str]:
        return [line for _, m in list(self.messages) for line in m.splitlines()]

    def wait_for(self, line: str, timeout: float = 30.0, after: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.lines()
            if line in lines[after:]:
                return lines.index(line, after)
            time.sleep(0.05)
        raise AssertionError(f"no {line!r} from sd_notify in {timeout} s; got {self.lines()}")

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def test_lifecycle_notify_limits_expiry_reload_and_drain(tmp_path, stopper):
    port = free_port()
    broker = Mosquitto(tmp_path / "broker", port=port)  # not started yet: READY must wait for it
    stopper(broker)
    config = tmp_path / "edgebox.toml"
    config.write_text(
        'config_version = "v1"\n[mqtt]\ndevice_id = "box-life"\n'
        f'broker = "mqtt://127.0.0.1:{port}"\nreconnect_min_s = 0.1\nreconnect_max_s = 0.3\n'
        "[serve]\nmax_in_flight = 2\nmax_batch = 1\ndrain_timeout_s = 2.0\nmax_payload_bytes = 4096\n"
    )
    notify = NotifySocket()
    stopper(notify)
    daemon = Daemon(
        tmp_path / "d",
        "--config",
        str(config),
        "--telemetry-interval-s",
        "60",
        "--no-governor",
        env={"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "600000"},
    )
    stopper(daemon)
    daemon.start(wait_ready=False)
    daemon.wait_log("connecting to")
    time.sleep(1.0)
    assert "READY=1" not in notify.lines(), "READY=1 before the broker was reachable"
    assert any(line.startswith("STATUS=loading model") for line in notify.lines())
    broker.start()
    notify.wait_for("READY=1", timeout=15)
    daemon.wait_log("ready: serving")
    n = len(notify.lines())
    time.sleep(1.0)
    assert notify.lines()[n:].count("WATCHDOG=1") >= 2, "WATCHDOG=1 every WATCHDOG_USEC/2"

    rec = Recorder(broker.url, "edgebox/v1/box-life/reply/#", "edgebox/v1/box-life/event", "edgebox/v1/box-life/state")
    gen = "edgebox/v1/box-life/cmd/generate"
    reply = "edgebox/v1/box-life/reply/t"
    # the payload limit is a setting (4096 bytes here)
    rec.publish(gen, {"request_id": "big-1", "params": {"prompt": "y" * 5000}}, response_topic=reply, correlation=b"big")
    [(_, big, _)] = rec.wait_for(lambda m: getattr(m[2], "CorrelationData", None) == b"big")
    assert big["code"] == 413 and "4096" in big["message"] and big["request_id"] is None  # never parsed
    # max_batch 1: a long one runs, a second waits with a 1 s expiry and expires in the queue
    rec.publish(
        gen, {"request_id": "run-1", "params": {"prompt": "a", "max_tokens": 2000, "temperature": 0}}, response_topic=reply
    )
    rec.wait_for(lambda m: isinstance(m[1], dict) and m[1].get("request_id") == "run-1")
    rec.publish(gen, {"request_id": "exp-1", "params": {"prompt": "b", "max_tokens": 3}}, response_topic=reply, expiry=1)
    # max_in_flight 2: a third is refused with 429
    rec.publish(gen, {"request_id": "over-1", "params": {"prompt": "c", "max_tokens": 3}}, response_topic=reply)
    [(_, over, _)] = rec.wait_for(is_final("over-1"))
    assert over["code"] == 429 and "max_in_flight" in over["message"]
    [(_, expired, _)] = rec.wait_for(is_final("exp-1"), timeout=10)
    assert expired["code"] == 408 and expired["done_reason"] == "cancelled"
    # a deadline the one slot cannot meet (run-1 holds it, interactive): 429 with the predicted wait
    rec.publish(
        gen,
        {"request_id": "dl-1", "params": {"prompt": "d", "max_tokens": 3, "priority": "batch", "deadline_s": 0.01}},
        response_topic=reply,
    )
    [(_, late, _)] = rec.wait_for(is_final("dl-1"))
    assert late["code"] == 429 and "deadline_s 0.01" in late["message"] and late["retry_after_s"] > 0.01
    rec.publish("edgebox/v1/box-life/cmd/cancel", {"request_id": "k", "params": {"target": "run-1"}}, response_topic=reply)
    rec.wait_for(is_final("run-1"))
    # the client retries the 429'd request with the same request_id (an idempotency key): it is
    # answered (issue #15: the id had been recorded as seen before the in-flight check, and the
    # retry was taken for a duplicate and never answered)
    rec.publish(gen, {"request_id": "over-1", "params": {"prompt": "c", "max_tokens": 3}}, response_topic=reply)
    [_, (_, retried, _)] = rec.wait_for(is_final("over-1"), count=2)
    assert retried["status"] == "ok", retried

    # SIGHUP: live settings apply, the others are reported
    config.write_text(
        config.read_text()
        .replace('"v1"', '"v2"')
        .replace("max_in_flight = 2", "max_in_flight = 4")
        .replace("[mqtt]", "budget = 6.5\n[mqtt]")
        .replace("reconnect_max_s = 0.3", "reconnect_max_s = 0.4")
    )
    mark = len(notify.lines())
    daemon.signal(signal.SIGHUP)
    notify.wait_for("RELOADING=1", after=mark)
    notify.wait_for("READY=1", after=notify.lines().index("RELOADING=1", mark))
    [(_, ev, _)] = rec.wait_for(lambda m: m[0].endswith("/event") and m[1].get("event") == "config_reloaded")
    assert set(ev["applied"]) == {"config_version", "max_in_flight", "budget"} and ev["restart_required"] == ["reconnect_max_s"]
    rec.wait_for(
        lambda m: (
            m[0].endswith("/state")
            and m[1]["config"]["version"] == "v2"
            and m[1]["budget_w"] == 6.5
            and m[1]["limits"]["max_in_flight"] == 4
            and m[1]["budget_enforced"] is False
        )
    )
    # --no-governor: a budget is recorded, and the reply says it is not enforced
    rec.publish(
        "edgebox/v1/box-life/cmd/set_power_budget",
        {"request_id": "b-1", "params": {"watts": 7.5}},
        response_topic=reply,
        correlation=b"budget",
    )
    [(_, budget, _)] = rec.wait_for(lambda m: getattr(m[2], "CorrelationData", None) == b"budget")
    assert budget["result"]["enforced"] is False and "not enforced" in budget["result"]["note"]

    # SIGTERM: one request finishes within drain_timeout_s, one is cancelled with a final 503;
    # a command arriving during the drain is left to the broker for the next run
    rec.publish(gen, {"request_id": "fin-1", "params": {"prompt": "d", "max_tokens": 4}}, response_topic=reply)
    rec.publish(
        gen, {"request_id": "cut-1", "params": {"prompt": "e", "max_tokens": 2000, "temperature": 0}}, response_topic=reply
    )
    rec.wait_for(lambda m: isinstance(m[1], dict) and m[1].get("request_id") == "fin-1")
    daemon.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", timeout=5)
    rec.publish(gen, {"request_id": "late-1", "params": {"prompt": "f", "max_tokens": 2}}, response_topic=reply)
    assert daemon.wait(30) == 0
    [(_, fin, _)] = rec.wait_for(is_final("fin-1"), timeout=5)
    [(_, cut, _)] = rec.wait_for(is_final("cut-1"), timeout=5)
    assert fin["status"] == "ok" and cut["code"] == 503 and "shutting down" in cut["message"]
    assert not finals(rec, "late-1")
    status = Recorder(broker.url, "edgebox/v1/box-life/status")
    [(_, st, _)] = status.wait_for(lambda m: True)
    assert st["state"] == "offline" and st["reason"] == "shutdown"
    status.close()

    # the next run gets the command sent during the drain (persistent session, not acknowledged)
    daemon.env.pop("NOTIFY_SOCKET")
    daemon.start()
    [(_, late, _)] = rec.wait_for(is_final("late-1"), timeout=30)
    assert late["status"] == "ok"
    rec.close()


# -- the control lane under a flood -------------------------------------------------------------------

FLOOD = 300  # generates with a 200 kB prompt each: every one is a 413 (over the context)
CONTROL_LATENCY_S = 0.100
FLOOD_SENDER = """
import json, sys
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

url, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
host, port = url.removeprefix("mqtt://").split(":")
c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
c.connect(host, int(port))
c.loop_start()
props = Properties(PacketTypes.PUBLISH)
props.ResponseTopic = prefix + "/reply/flood"
prompt = "word " * 40_000  # 200 kB
for i in range(n):
    body = json.dumps({"request_id": f"big-{i}", "params": {"prompt": prompt, "max_tokens": 4}})
    c.publish(prefix + "/cmd/generate", body, qos=1, properties=props).wait_for_publish(30)
c.disconnect()
c.loop_stop()
"""


def test_control_commands_and_the_watchdog_are_never_behind_a_flood_of_large_prompts(tmp_path, stopper):
    """Issue #15: 300 generates with 200 kB prompts delayed a get_status sent after them by ~98 s
    (QoS 1 and QoS 0 alike: one dispatcher thread tokenized every prompt first; 29 s here before
    the fix). Now get_status and cancel, at QoS 1 and 0, are answered within 100 ms all through
    the flood (from their arrival to the reply handed to the MQTT client, as the box measures it;
    the broker, on these same two cores, adds its round trip), and WATCHDOG=1 keeps its pace."""
    broker = Mosquitto(tmp_path / "broker")
    stopper(broker)
    broker.start()
    notify = NotifySocket()
    stopper(notify)
    daemon = Daemon(
        tmp_path / "d",
        "--broker",
        broker.url,
        "--device-id",
        "box-flood",
        "--max-in-flight",  # every generate of the flood reaches the work lane
        "600",
        "--telemetry-interval-s",
        "60",
        env={"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "2000000"},
    )
    stopper(daemon)
    daemon.start()
    prefix = "edgebox/v1/box-flood"
    flood = Recorder(broker.url, f"{prefix}/reply/flood")
    stopper(flood)
    probe = Recorder(broker.url, f"{prefix}/reply/probe")
    stopper(probe)
    # the flood comes from another process, as from other controllers: the probes' timing here
    # must not wait for this process's own GIL
    sender = subprocess.Popen(
        [sys.executable, "-c", FLOOD_SENDER, broker.url, prefix, str(FLOOD)], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    t_flood = time.monotonic()
    latencies: list[tuple[str, float]] = []
    n = 0
    while len(finals(flood)) < FLOOD:
        assert time.monotonic() - t_flood < 600, f"the flood is not answered after 600 s ({len(finals(flood))} finals)"
        method, params, qos = [
            ("get_status", {}, 1),
            ("get_status", {}, 0),
            ("cancel", {"target": "nothing-1"}, 1),
            ("cancel", {"target": "nothing-2"}, 0),
        ][n % 4]
        correlation = f"probe-{n}".encode()
        t0 = time.monotonic()
        probe.publish(
            f"{prefix}/cmd/{method}",
            {"request_id": f"p{n}", "params": params},
            response_topic=f"{prefix}/reply/probe",
            correlation=correlation,
            qos=qos,
        )
        [(_, reply, _)] = probe.wait_for(lambda m, c=correlation: getattr(m[2], "CorrelationData", None) == c, timeout=300)
        latencies.append((f"{method}/QoS{qos}", time.monotonic() - t0))
        assert reply["code"] == (200 if method == "get_status" else 404), reply
        n += 1
        time.sleep(0.02)
    t_end = time.monotonic()
    assert sender.wait(30) == 0, sender.stderr.read()
    assert {f["code"] for f in finals(flood)} == {413} and len(finals(flood)) == FLOOD
    worst = max(latencies, key=lambda x: x[1])
    ordered = sorted(x[1] for x in latencies)
    summary = (
        f"flood of {FLOOD} x 200 kB generates answered in {t_end - t_flood:.1f} s; {len(latencies)} control probes "
        f"(get_status and cancel, QoS 1 and 0) end to end: median {ordered[len(ordered) // 2] * 1000:.1f} ms, "
        f"worst {worst[1] * 1000:.1f} ms ({worst[0]})"
    )
    # end to end adds the broker and the client, which share this machine's cores with the flood
    assert worst[1] < 1.0, summary
    pings = [t for t, m in list(notify.messages) if "WATCHDOG=1" in m.splitlines() and t_flood <= t <= t_end]
    gaps = [b - a for a, b in zip([t_flood, *pings], [*pings, t_end])]
    assert max(gaps) < 2.0, f"WATCHDOG=1 stopped for {max(gaps):.1f} s during the flood (WatchdogSec 2 s)"
    # the box's share, as the daemon measured it
    probe.publish(
        f"{prefix}/cmd/get_status",
        {"request_id": "last", "params": {}},
        response_topic=f"{prefix}/reply/probe",
        correlation=b"last",
    )
    [(_, last, _)] = probe.wait_for(lambda m: getattr(m[2], "CorrelationData", None) == b"last", timeout=30)
    in_box = last["result"]["control_latency"]
    print(f"\n{summary}; in the box: {in_box}")
    answered = in_box["answered"]
    assert answered["count"] >= len(latencies) and answered["max_ms"] < CONTROL_LATENCY_S * 1000, in_box


def test_sigkill_last_will_queued_commands_served_and_the_one_in_progress_not_run_again(tmp_path, stopper):
    """A command in progress when the daemon died is redelivered by the broker after the restart;
    it may be what killed it (issue #15: a chat-template bomb wedged every restart for as long as
    the session lived). The journal in the state directory recognises it: it is answered with an
    error saying the box restarted while serving it, and not run again; the box goes on serving."""
    broker = Mosquitto(tmp_path / "broker")
    stopper(broker)
    broker.start()
    args = ("--broker", broker.url, "--device-id", "box-crash", "--keepalive-s", "5", "--telemetry-interval-s", "60")
    daemon = Daemon(tmp_path / "d", *args)
    stopper(daemon)
    daemon.start()
    rec = Recorder(
        broker.url, "edgebox/v1/box-crash/reply/#", "edgebox/v1/box-crash/status", client_id="crash-watch", session_expiry=300
    )
    stopper(rec)
    gen, reply = "edgebox/v1/box-crash/cmd/generate", "edgebox/v1/box-crash/reply/t"
    rec.wait_for(lambda m: m[0].endswith("/status") and m[1]["state"] == "online")
    # a request in flight when the daemon dies is redelivered (it was never acknowledged)
    rec.publish(
        gen, {"request_id": "inflight", "params": {"prompt": "x", "max_tokens": 200, "temperature": 0}}, response_topic=reply
    )
    rec.wait_for(lambda m: isinstance(m[1], dict) and m[1].get("request_id") == "inflight")
    daemon.proc.kill()
    daemon.wait(10)
    rec.wait_for(
        lambda m: m[0].endswith("/status") and m[1]["state"] == "offline" and m[1]["reason"] == "connection lost", timeout=10
    )
    for i in range(5):
        rec.publish(gen, {"request_id": f"queued-{i}", "params": {"prompt": f"q{i}", "max_tokens": 3}}, response_topic=reply)
    rec.publish(gen, {"request_id": "stale", "params": {"prompt": "s", "max_tokens": 3}}, response_topic=reply, expiry=1)
    time.sleep(1.5)  # the broker drops "stale" once its Message Expiry Interval passes
    daemon.start()
    for i in range(5):
        [(_, f, _)] = rec.wait_for(is_final(f"queued-{i}"), timeout=60)
        assert f["status"] == "ok"
    [(_, f, _)] = rec.wait_for(is_final("inflight"), timeout=60)
    assert f["status"] == "error" and f["code"] == 500 and f["redelivered"] is True, f
    assert "restarted while serving" in f["message"] and "\n" not in f["message"]
    seqs = [c["seq"] for c in chunks(rec, "inflight")]
    assert len(seqs) == len(set(seqs)), "the redelivered request was run again"
    rec.wait_for(lambda m: m[0].endswith("/status") and m[1]["state"] == "online", count=2)
    with FleetClient(broker.url) as fleet:
        status = fleet.call("box-crash", "get_status", timeout=20)["result"]
    assert status["state"] == "ready" and status["counters"]["restarted_while_serving"] == 1
    assert "the last run died serving it" in daemon.log()
    time.sleep(0.5)
    assert not finals(rec, "stale")
    assert all(len(finals(rec, f"queued-{i}")) == 1 for i in range(5))
    assert len(finals(rec, "inflight")) == 1


def test_broker_restart_under_load(tmp_path, stopper):
    broker = Mosquitto(tmp_path / "broker")
    stopper(broker)
    broker.start()
    daemon = Daemon(
        tmp_path / "d",
        "--broker",
        broker.url,
        "--device-id",
        "box-net",
        "--reconnect-min-s",
        "0.1",
        "--reconnect-max-s",
        "0.5",
        "--telemetry-interval-s",
        "60",
    )
    stopper(daemon)
    daemon.start()
    out: dict[str, tuple[list, dict | BaseException]] = {}
    received: dict[str, list] = {}
    with FleetClient(broker.url, client_id="net-client") as fleet:
        started = threading.Event()

        def one(rid: str) -> None:
            got: list[dict] = received.setdefault(rid, [])
            try:
                final = fleet.call_raw(
                    "box-net",
                    "generate",
                    {"prompt": rid, "max_tokens": 300, "temperature": 0},
                    request_id=rid,
                    on_chunk=lambda c: (got.append(c), started.set()),
                    timeout=90,
                )
                out[rid] = (got, final)
            except BaseException as e:  # noqa: BLE001 - asserted below
                out[rid] = (got, e)

        threads = [threading.Thread(target=one, args=(f"net-{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        assert started.wait(30)
        at_restart = {rid: len(got) for rid, got in received.items()}
        broker.restart()  # streams are mid-way
        for t in threads:
            t.join(120)
    assert any(0 < at_restart.get(rid, 0) < len(got) for rid, got in received.items()), "no stream straddled the restart"
    daemon.wait_log("reconnected to")
    for rid, (got, final) in out.items():
        assert isinstance(final, dict), f"{rid}: {final!r}"
        if final["status"] == "ok":
            # every chunk arrived, in order (QoS 1 may repeat one across the restart, never skip one)
            first_seen = list(dict.fromkeys(c["seq"] for c in got))
            assert first_seen == list(range(final["seq"])), f"{rid}: {first_seen}"
            assert final["usage"]["completion_tokens"] == 300
        else:
            assert final["code"] in (500, 503) and final["message"], final
    status = Recorder(broker.url, "edgebox/v1/box-net/status")
    stopper(status)
    status.wait_for(lambda m: m[1]["state"] == "online")


# -- the deployed broker configuration: TLS, passwords, the per-device ACL ---------------------------


def _make_certs(d: Path) -> tuple[Path, Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, crt = d / "ca.key", d / "ca.crt", d / "broker.key", d / "broker.csr", d / "broker.crt"
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=edgebox-test-ca",
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(crt),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return ca, crt, key


def test_deployed_broker_config_tls_passwords_and_acl(tmp_path, stopper):
    """deploy/mosquitto.conf (paths and ports swapped for the test's) with deploy/mosquitto.acl as is."""
    assert shutil.which("openssl") and shutil.which("mosquitto_passwd"), (
        "needs openssl and mosquitto_passwd (.ci/run installs them)"
    )
    ca, crt, key = _make_certs(tmp_path / "certs")
    passwd = tmp_path / "passwd"
    for user, pw in (("controller", "c-secret"), ("box-a", "a-secret"), ("box-b", "b-secret")):
        subprocess.run(["mosquitto_passwd", *([] if passwd.exists() else ["-c"]), "-b", str(passwd), user, pw], check=True)
    passwd.chmod(0o600)
    acl = tmp_path / "edgebox.acl"
    shutil.copy(REPO / "deploy" / "mosquitto.acl", acl)
    acl.chmod(0o600)
    tls_port, plain_port = free_port(), free_port()
    conf = (REPO / "deploy" / "mosquitto.conf").read_text()
    conf = (
        conf.replace("listener 8883", f"listener {tls_port} 127.0.0.1")
        .replace("listener 1883 127.0.0.1", f"listener {plain_port} 127.0.0.1")
        .replace("/etc/mosquitto/certs/ca.crt", str(ca))
        .replace("/etc/mosquitto/certs/broker.crt", str(crt))
        .replace("/etc/mosquitto/certs/broker.key", str(key))
        .replace("/etc/mosquitto/edgebox.passwd", str(passwd))
        .replace("/etc/mosquitto/edgebox.acl", str(acl))
        .replace("/var/lib/mosquitto/", f"{tmp_path}/")
    )
    import getpass

    (tmp_path / "m.conf").write_text(conf + f"\nuser {getpass.getuser()}\nlog_dest stderr\n")
    broker = Mosquitto(tmp_path, port=tls_port)  # for its start/stop only: the config is the deployed one
    broker.conf = tmp_path / "m.conf"
    stopper(broker)
    broker.start()
    daemon = Daemon(
        tmp_path / "d",
        "--broker",
        f"mqtts://127.0.0.1:{tls_port}",
        "--ca-file",
        str(ca),
        "--device-id",
        "box-a",
        "--username",
        "box-a",
        "--telemetry-interval-s",
        "60",
        env={"EDGEBOX_MQTT_PASSWORD": "a-secret"},
    )
    stopper(daemon)
    daemon.start()
    assert "a-secret" not in " ".join(psutil.Process(daemon.proc.pid).cmdline())
    with FleetClient(f"mqtts://127.0.0.1:{tls_port}", username="controller", password="c-secret", ca_file=ca) as fleet:
        assert fleet.call("box-a", "generate", {"prompt": "hi", "max_tokens": 2}, timeout=60)["status"] == "ok"
        # the ACL lets every box take from the fleet's shared queue and answer under fleet/reply/
        assert fleet.call("fleet", "generate", {"prompt": "hi", "max_tokens": 2}, timeout=60)["status"] == "ok"
        assert "refused the fleet subscription" not in daemon.log()
        assert [d["device_id"] for d in fleet.devices(0.3)] == ["box-a"]
        # another box may not command box-a: the broker refuses the publish (PUBACK 135)
        other = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        other.username_pw_set("box-b", "b-secret")
        acked = []
        other.on_publish = lambda c, u, mid, rc, p: acked.append(rc)
        other.connect("127.0.0.1", plain_port)
        other.loop_start()
        other.publish(
            "edgebox/v1/box-a/cmd/generate",
            json.dumps({"request_id": "evil", "reply_to": "edgebox/v1/box-b/reply/x", "params": {"prompt": "x"}}),
            qos=1,
        ).wait_for_publish(5)
        other.disconnect()
        other.loop_stop()
        assert acked and acked[0].is_failure and "authorized" in str(acked[0]).lower()
        time.sleep(0.3)
        assert "evil" not in daemon.log()
    with pytest.raises(ClientError, match="refused the connection"):
        FleetClient(f"mqtt://127.0.0.1:{plain_port}", username="controller", password="wrong", connect_timeout=5).connect()
    # a wrong password: one clear line, exit 2 (no retry loop)
    bad = Daemon(
        tmp_path / "bad",
        "--broker",
        f"mqtt://127.0.0.1:{plain_port}",
        "--device-id",
        "box-b",
        "--username",
        "box-b",
        env={"EDGEBOX_MQTT_PASSWORD": "wrong"},
    )
    stopper(bad)
    bad.start(wait_ready=False)
    assert bad.wait(60) == 2
    last = bad.log().strip().splitlines()[-1]
    assert last.startswith("edgebox: error: broker") and "refused" in last


def test_a_model_with_a_template_bomb_is_refused_and_the_box_stays_responsive(broker, stopper, micro_gguf):
    """load_model of a file whose chat template never ends answers 400 in one line (the template
    is test-rendered at load in the bounded worker), the served model stays, and the control
    commands are answered meanwhile."""
    bomb = micro_gguf(
        "bomb.gguf",
        extra_kv={"tokenizer.chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"},
    )
    daemon = Daemon(
        bomb.parent / "d", "--broker", broker.url, "--device-id", "box-bomb", "--models-dir", str(bomb.parent),
        "--telemetry-interval-s", "60",
    )  # fmt: skip
    stopper(daemon)
    daemon.start()
    with FleetClient(broker.url) as fleet:
        result: dict = {}
        loader = threading.Thread(
            target=lambda: result.update(fleet.call_raw("box-bomb", "load_model", {"path": bomb.name}, timeout=60))
        )
        loader.start()
        t0 = time.monotonic()
        status = fleet.call("box-bomb", "get_status", timeout=10)  # while the load renders the template
        assert status["status"] == "ok" and time.monotonic() - t0 < 5
        loader.join(60)
        assert result["code"] == 400 and "tokenizer.chat_template" in result["message"], result
        assert "\n" not in result["message"] and "ran longer than" in result["message"]
        gen = fleet.call("box-bomb", "generate", {"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert gen["status"] == "ok"  # the model served before is still loaded
