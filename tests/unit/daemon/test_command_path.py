"""The daemon's command path in process: validation (``commands``), prompts refused before
tokenizing, the lanes and their bounds, the watchdog's health check, the in-progress journal.
The daemon end to end, with a real Mosquitto, is tests/integration/test_daemon.py."""

from __future__ import annotations

import json
import time

import pytest

import edgebox
from edgebox.daemon.commands import Rejected, build_request, parse_command, peek
from edgebox.daemon.config import DaemonConfig
from edgebox.daemon.engine_host import certainly_too_long, longest_token_bytes
from edgebox.daemon.handlers import WORK_STALL_S, CommandHandler
from edgebox.daemon.journal import Journal, default_state_dir, journal_path, key_of
from edgebox.daemon.lanes import CONTROL_SLOTS, EXTRA_WORK_SLOTS, Lanes
from edgebox.daemon.schemas import Topics, encode, error_reply
from edgebox.daemon.transport import Inbound
from tests.fixtures.paths import TEST_MODEL

TOPICS = Topics("box-1")
REPLY = "edgebox/v1/box-1/reply/me"


def _parse(method: str, payload: bytes | str | dict, **kw):
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return parse_command(method, payload, topics=TOPICS, response_topic=kw.pop("response_topic", REPLY), correlation=b"c", **kw)


def _rejected(method: str, payload, **kw) -> Rejected:
    with pytest.raises(Rejected) as e:
        _parse(method, payload, **kw)
    assert "\n" not in e.value.message
    return e.value


# -- validation: the small gaps of issue #15 (each was a 500, or never expired) -------------------------


@pytest.mark.parametrize(
    "method, payload, says",
    [
        ("generate", r'{"request_id": "s1", "params": {"prompt": "a\ud800b"}}', "params.prompt: must be valid Unicode"),
        ("generate", r'{"request_id": "s2", "params": {"messages": [{"role": "user", "content": "\udfff"}]}}', "Unicode"),
        ("generate", r'{"request_id": "s3", "params": {"prompt": "x", "stop": ["\ud83d"]}}', "Unicode"),
        ("load_model", r'{"request_id": "n1", "params": {"path": "model\u0000.gguf"}}', "params.path: must not contain a NUL"),
        ("load_model", r'{"request_id": "n2", "params": {"path": "\udc80.gguf"}}', "params.path"),
        ("cancel", r'{"request_id": "c1", "params": {"target": "\ud800"}}', "params.target"),
        ("generate", '{"request_id": "e1", "expires_at": NaN, "params": {"prompt": "x"}}', "expires_at"),
        ("generate", '{"request_id": "e2", "expires_at": Infinity, "params": {"prompt": "x"}}', "expires_at"),
        ("generate", '{"request_id": "t1", "params": {"prompt": "x", "temperature": NaN}}', "temperature"),
        ("set_power_budget", '{"request_id": "w1", "params": {"watts": Infinity}}', "watts"),
    ],
)
def test_lone_surrogates_nul_paths_and_non_finite_numbers_are_400(method, payload, says):
    r = _rejected(method, payload)
    assert r.code == 400 and says in r.message, r.message
    assert r.route is not None  # answered on the reply topic, with the request id when it is usable
    assert r.request_id == json.loads(payload)["request_id"]


def test_a_reply_topic_with_a_lone_surrogate_is_refused_not_published():
    r = _rejected("get_status", r'{"request_id": "r1", "params": {}, "reply_to": "a/\ud800"}', response_topic=None)
    assert r.code == 400 and r.route is None  # nowhere to answer: an event only


def test_an_unusable_request_id_is_not_echoed():
    r = _rejected("generate", r'{"request_id": "\ud800", "params": {"prompt": "x"}}')
    assert r.code == 400 and r.request_id is None
    encode(error_reply(r.request_id, r.code, r.message))  # the reply encodes


def test_encode_never_raises_on_a_lone_surrogate():
    assert b'"a?b"' in encode({"x": "a\ud800b"})


def test_parse_accepts_a_good_command_and_names_its_key():
    cmd = _parse("generate", {"request_id": "g1", "params": {"prompt": "hi", "max_tokens": 4}, "expires_at": 2e9})
    assert cmd.key == ("generate", REPLY, b"c", "g1") and cmd.params.max_tokens == 4 and cmd.expires_at == 2e9
    legacy = _parse("get_status", {"request_id": "g2", "reply_to": "legacy/me"}, response_topic=None)
    assert legacy.route.topic == "legacy/me" and legacy.route.correlation is None
    assert _rejected("reboot", {"request_id": "m1"}).code == 404
    assert _rejected("get_status", b"[1]").request_id is None
    assert "retained" in _rejected("get_status", {"request_id": "x"}, retained=True).message


def test_build_request_checks_the_box_limit_and_the_sampler():
    cmd = _parse("generate", {"request_id": "b1", "params": {"prompt": "hi", "max_tokens": 100}})
    assert build_request(cmd.params, 100, "e1").request_id == "e1"
    with pytest.raises(Rejected, match="limit of 99"):
        build_request(cmd.params, 99, "e1")


def test_peek_reads_a_field_from_the_head_of_a_payload_only():
    assert peek(b'{"request_id": "a\\"b", "params": {}}', "request_id") == 'a"b'
    assert peek(b'{"params": {"prompt": "x"}, "reply_to": "r/t"}', "reply_to") == "r/t"
    assert peek(b'{"params": {"prompt": "' + b"x" * 5000 + b'"}, "request_id": "late"}', "request_id") is None
    assert peek(b'{"request_id": 5}', "request_id") is None
    assert peek(b'{"request_id": "bad\\nid"}', "request_id") is None  # not printable: not echoed
    assert peek(None, "request_id") is None and peek(b"\xff\xfe", "request_id") is None


# -- the lanes ------------------------------------------------------------------------------------------


def _inbound(method: str, payload: bytes = b"{}", *, qos: int = 1, dup: bool = False) -> Inbound:
    return Inbound(
        topic=TOPICS.cmd(method),
        payload=payload,
        size=len(payload),
        mid=1,
        qos=qos,
        dup=dup,
        retain=False,
        response_topic=REPLY,
        correlation=None,
        expiry_remaining_s=None,
        received=time.monotonic(),
        generation=1,
    )


def test_control_commands_never_wait_behind_work():
    lanes = Lanes(TOPICS)
    for i in range(100):
        assert lanes.offer(_inbound("generate", b'{"request_id": "g%d"}' % i), accepted_generates=0, limit=1000) is None
    assert lanes.offer(_inbound("get_status"), accepted_generates=0, limit=1000) is None
    assert lanes.take_control(0.0).topic == TOPICS.cmd("get_status")
    assert lanes.depths() == {"control": 0, "work": 100}
    assert lanes.waiting("g7") and not lanes.waiting("g100")


def test_generates_past_the_in_flight_limit_are_turned_away_with_429():
    lanes = Lanes(TOPICS)
    assert lanes.offer(_inbound("generate"), accepted_generates=2, limit=4) is None
    assert lanes.offer(_inbound("generate"), accepted_generates=2, limit=4) is None
    turned = lanes.offer(_inbound("generate"), accepted_generates=2, limit=4)
    assert turned.code == 429 and "max_in_flight 4" in turned.message
    assert lanes.offer(_inbound("generate", dup=True), accepted_generates=2, limit=4) is None  # a redelivery gets in
    taken = lanes.take_work(0.0)
    lanes.work_done(taken)
    assert lanes.offer(_inbound("load_model"), accepted_generates=2, limit=4) is None  # other work has its own slots


def test_the_lanes_are_bounded_for_qos_0_too():
    lanes = Lanes(TOPICS)
    for _ in range(CONTROL_SLOTS):
        assert lanes.offer(_inbound("get_status", qos=0), accepted_generates=0, limit=1) is None
    assert lanes.offer(_inbound("get_status", qos=0), accepted_generates=0, limit=1).code == 503
    for _ in range(EXTRA_WORK_SLOTS):
        assert lanes.offer(_inbound("unload_model", qos=0), accepted_generates=0, limit=1) is None
    assert lanes.offer(_inbound("unload_model", qos=0), accepted_generates=0, limit=1).code == 503
    assert lanes.offer(_inbound("generate", qos=0), accepted_generates=1, limit=1).code == 429


def test_the_watchdog_follows_the_control_lane_and_a_stuck_work_lane():
    """WATCHDOG=1 goes on while the work lane is busy, even for long; a command stuck on it past
    WORK_STALL_S stops it: systemd restarts the box and the journal keeps the culprit from running again."""
    h = CommandHandler(None, None, None, TOPICS, Journal(None))
    now = time.monotonic()
    h.heartbeat, h.work_busy_since = now, now - 60.0  # a minute on one command: slow, not stuck
    assert h.healthy()
    h.work_busy_since = now - WORK_STALL_S - 1
    assert not h.healthy()
    h.work_busy_since, h.heartbeat = None, now - 11.0  # the control lane stopped turning
    assert not h.healthy()


def test_default_limits_queue_a_burst_like_ollama():
    cfg = DaemonConfig(device_id="b")
    assert cfg.in_flight_limit == cfg.max_batch + 512
    assert DaemonConfig(device_id="b", max_in_flight=3).in_flight_limit == 3


# -- the in-progress journal -------------------------------------------------------------------------------


def test_journal_survives_a_restart_as_suspects(tmp_path):
    path = journal_path(tmp_path / "state", "edgebox-box/1")
    assert path.name == "in-progress-edgebox-box_1.jsonl"
    j = Journal(path)
    a, b = key_of(("generate", REPLY, b"c", "a")), key_of(("generate", REPLY, None, "b"))
    j.add(a, "generate", "a")
    j.add(b, "generate", "b")
    j.remove(b)
    assert len(j) == 1 and not j.suspects
    # the process dies here (no close); the next run finds "a" only
    again = Journal(path)
    assert set(again.suspects) == {a} and again.suspect(a)["request_id"] == "a" and again.suspect(b) is None
    again.remove(a)  # answered: forgotten for good
    assert not Journal(path).suspects


def test_journal_skips_a_torn_line_and_stays_bounded(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path, max_entries=10)
    for i in range(1000):
        j.add(f"k{i}", "generate", f"r{i}")
        if i >= 3:
            j.remove(f"k{i - 3}")
    assert len(j) == 3 and len(path.read_text().splitlines()) <= 2 * 3 + 64 + 1
    with open(path, "a") as f:
        f.write('{"op": "+", "key": "torn", "t": 1')  # a power cut mid-line
    assert set(Journal(path).suspects) == {"k997", "k998", "k999"}
    full = Journal(tmp_path / "full.jsonl", max_entries=10)
    for i in range(25):
        full.add(f"k{i}", "generate", f"r{i}")
    assert len(full) == 10 and set(Journal(tmp_path / "full.jsonl", max_entries=10).suspects) == {f"k{i}" for i in range(15, 25)}


def test_journal_forgets_what_the_session_would_have_forgotten(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"op": "+", "key": "old", "t": time.time() - 100, "method": "generate", "request_id": "o"}) + "\n")
    assert Journal(path, max_age_s=1000).suspects and not Journal(path, max_age_s=10).suspects


def test_an_unwritable_journal_goes_on_in_memory(tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    j = Journal(tmp_path / "a-file" / "j.jsonl")  # its directory cannot be made, even by root
    j.add("k", "generate", "r")
    assert len(j) == 1 and "going on without it" in caplog.text


def test_state_dir_is_systemds_or_the_xdg_state_home(tmp_path):
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/edgebox:/x"}) == default_state_dir(
        {"STATE_DIRECTORY": "/var/lib/edgebox"}
    )
    assert str(default_state_dir({"STATE_DIRECTORY": "/var/lib/edgebox"})) == "/var/lib/edgebox"
    assert default_state_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "edgebox"


# -- prompts that cannot fit are refused before the tokenizer holds the GIL for them -----------------------


def test_a_prompt_that_cannot_fit_is_known_without_tokenizing():
    m = edgebox.load(TEST_MODEL, chips=1)
    longest = longest_token_bytes(m.tokenizer)
    assert longest == max(len(m.tokenizer.token_to_piece(i)) for i in range(m.tokenizer.n_vocab))
    flood = "word " * 40_000  # issue #15's 200 kB prompts
    assert certainly_too_long(flood, m.n_ctx, longest) >= m.n_ctx
    for prompt in (flood, "x" * 200_000, "é" * 70_000, "<|EOT|>" * 30_000, " " * 150_000, "word " * 3_000):
        bound = certainly_too_long(prompt, m.n_ctx, longest)
        assert bound <= len(m.tokenize(prompt, add_bos=False)), prompt[:10]  # a true lower bound
    assert certainly_too_long("word " * 3_000, m.n_ctx, longest) == 0  # too long too, but the tokenizer says so
