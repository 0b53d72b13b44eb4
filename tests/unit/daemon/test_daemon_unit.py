"""The daemon's parts in process: config, payload schemas, sd_notify, power and telemetry.
The deploy/ files are checked in tests/integration/test_deploy.py."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from edgebox.daemon.config import FLAG_SETTINGS, LIVE_SETTINGS, ConfigError, DaemonConfig, live_differences, load_config
from edgebox.daemon.notify import Notifier
from edgebox.daemon.power import BoxPower
from edgebox.daemon.schemas import (
    CommandEnvelope,
    GenerateParams,
    SetPowerBudgetParams,
    Topics,
    describe_validation_error,
    reply_topic_problem,
)
from edgebox.daemon.telemetry import TelemetrySampler

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"


# -- config ---------------------------------------------------------------------------------------


def test_config_precedence_file_then_environment_then_flags(tmp_path):
    f = tmp_path / "edgebox.toml"
    f.write_text(
        'budget = 9.0\n[mqtt]\ndevice_id = "box-file"\nusername = "file-user"\npassword = "file-pw"\n[serve]\nmax_in_flight = 3\n'
    )
    cfg = load_config(f, {"max_in_flight": 5, "chips": None}, env={})
    assert (cfg.device_id, cfg.budget, cfg.max_in_flight, cfg.username) == ("box-file", 9.0, 5, "file-user")
    assert cfg.resolved_password({}) == "file-pw"
    env = {"EDGEBOX_MQTT_PASSWORD": "env-pw", "EDGEBOX_MQTT_USERNAME": "env-user"}
    cfg = load_config(f, {"username": "flag-user"}, env=env)
    assert cfg.resolved_password(env) == "env-pw" and cfg.username == "flag-user"
    assert "env-pw" not in repr(cfg) and "password" not in cfg.public()


def test_password_comes_from_a_file_or_systemd_credential(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    assert load_config(None, {"password_file": tmp_path / "pw"}, env={}).resolved_password({}) == "s3cret"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd\n")
    assert load_config(None, {}, env={}).resolved_password({"CREDENTIALS_DIRECTORY": str(creds)}) == "from-systemd"
    (creds / "mqtt-password").write_text("\n")  # install.sh writes an empty file for anonymous brokers
    assert load_config(None, {}, env={}).resolved_password({"CREDENTIALS_DIRECTORY": str(creds)}) is None


def test_password_is_never_a_flag():
    with pytest.raises(ConfigError, match="never a flag"):
        load_config(None, {"password": "x"}, env={})
    from typer.main import get_command

    from edgebox.cli import app

    serve = get_command(app).commands["serve"]
    flags = {p.name for p in serve.params}
    assert "password" not in flags
    assert set(FLAG_SETTINGS) <= flags, f"settings without a serve flag: {set(FLAG_SETTINGS) - flags}"
    r = subprocess.run(
        [sys.executable, "-m", "edgebox.cli", "serve", "--password", "x"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert r.returncode == 2 and "No such option" in r.stderr


@pytest.mark.parametrize(
    "text, says",
    [
        ("nonsense = 1\n", "unknown setting 'nonsense'"),
        ('[mqtt]\nbroker = "http://x"\n', "broker"),
        ('[mqtt]\nbroker = "mqtt://user:pw@host:1883"\n', "credentials"),
        ('device_id = "a/b"\n', "device_id"),
        ('chips = "four"\n', "chips"),
        ("budget = 1\n[power]\nbudget = 2\n", "set twice"),
        ("max_in_flight = \n", "not valid TOML"),
        ('[mqtt]\nca_file = "/ca.pem"\n', "mqtts://"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, text, says):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    assert says in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(Path("/nonexistent/edgebox.toml"), env={})


def test_broker_url_and_derived_settings():
    cfg = DaemonConfig(broker="mqtts://broker.example:8884", device_id="b1")
    assert (cfg.broker_tls, cfg.broker_host, cfg.broker_port, cfg.mqtt_client_id) == (True, "broker.example", 8884, "edgebox-b1")
    assert DaemonConfig(broker="mqtt://h", device_id="b1").broker_port == 1883
    assert DaemonConfig(broker="mqtts://h", device_id="b1").broker_port == 8883


def test_reload_splits_live_settings_from_restart_ones():
    old = DaemonConfig(device_id="a")
    new = DaemonConfig(device_id="a", budget=5.0, broker="mqtt://other:1883", max_in_flight=4)
    live, restart = live_differences(old, new)
    assert set(live) == {"budget", "max_in_flight"} and restart == ["broker"]
    assert LIVE_SETTINGS <= set(DaemonConfig.model_fields)


def test_example_config_is_valid_and_sets_every_documented_key():
    cfg = load_config(DEPLOY / "edgebox.toml", env={})
    assert cfg.device_id == "box-001" and cfg.broker_tls and cfg.models_dir == Path("/opt/edgebox/models")


# -- schemas --------------------------------------------------------------------------------------


def test_generate_params_validation():
    assert GenerateParams.model_validate({"prompt": "hi"}).max_tokens == 128
    ok = GenerateParams.model_validate({"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "stop": ["\n"]})
    assert ok.temperature == 0.0 and ok.messages[0].role == "user"
    for bad, where in [
        ({}, "exactly one"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
        ({"prompt": "a", "max_tokens": "3"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "top_p": 2}, "top_p"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "messages": None, "stop": [""]}, "stop"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"prompt": 5}, "prompt"),
    ]:
        with pytest.raises(ValidationError) as e:
            GenerateParams.model_validate(bad)
        assert where in describe_validation_error(e.value, "params"), (bad, describe_validation_error(e.value))
    with pytest.raises(ValidationError):
        SetPowerBudgetParams.model_validate({"watts": True})
    with pytest.raises(ValidationError):
        CommandEnvelope.model_validate({"request_id": "bad\nid"})


def test_reply_topics():
    t = Topics("box-1")
    assert reply_topic_problem("edgebox/v1/box-1/reply/me", t) is None
    assert reply_topic_problem("clients/me/replies", t) is None
    for bad in ("", "a/+/b", "a/#", "$SYS/x", "edgebox/v1/box-1/cmd/generate", "edgebox/v1/box-1/status", "x" * 600):
        assert reply_topic_problem(bad, t), bad
    assert t.method_of("edgebox/v1/box-1/cmd/generate") == "generate" and t.method_of("edgebox/v1/box-2/cmd/x") is None


# -- sd_notify --------------------------------------------------------------------------------------


def _receiver(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(2)
    return s


def test_notify_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    rx = _receiver(path)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
    assert n.enabled and n.watchdog_interval_s == 1.5
    assert n.ready("serving")
    assert rx.recv(1024) == b"READY=1\nSTATUS=serving"
    n.watchdog()
    assert rx.recv(1024) == b"WATCHDOG=1"
    n.reloading()
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", rx.recv(1024))
    n.stopping()
    assert rx.recv(1024) == b"STOPPING=1"
    n.close()
    rx.close()


def test_notify_abstract_socket():
    name = f"edgebox-unit-{uuid.uuid4().hex}"
    rx = _receiver("\0" + name)
    n = Notifier({"NOTIFY_SOCKET": "@" + name})
    assert n.watchdog_interval_s is None
    n.status("loading")
    assert rx.recv(1024) == b"STATUS=loading"
    rx.close()
    assert n.send("WATCHDOG=1") is False  # systemd went away: reported, not raised
    n.close()


def test_notify_without_systemd_is_a_no_op():
    n = Notifier({})
    assert not n.enabled and n.ready() is False and n.watchdog_interval_s is None
    # the watchdog is someone else's when WATCHDOG_PID names another process
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert (
        Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 0.5
    )


# -- power and telemetry ----------------------------------------------------------------------------


def test_telemetry_reports_throttle_changes_as_events(tmp_path):
    from firmware_stub.firmware import Firmware

    with Firmware("r100-edge", 2, root=tmp_path) as fw:
        fw.publish()
        sampler = TelemetrySampler(tmp_path)
        sample, events = sampler.sample()
        assert [c["chip"] for c in sample["chips"]] == ["chip0", "chip1"] and events == []
        reasons = tmp_path / "chip0" / "hwmon" / "hwmon0" / "throttle_reasons"
        reasons.write_text("thermal\n")
        sample, events = sampler.sample()
        assert events == [("throttled", {"chip": "chip0", "reasons": ["thermal"]})]
        assert sampler.sample()[1] == []  # no change, no event
        reasons.write_text("none\n")
        assert sampler.sample()[1] == [("unthrottled", {"chip": "chip0", "reasons": []})]
        # a clock capped by the idle governor is "idle", not a budget cap
        (tmp_path / "chip1" / "cpufreq" / "scaling_max_freq").write_text("400000\n")
        fw.publish()
        sample, events = sampler.sample(idle=True)
        assert sample["chips"][1]["throttle_reasons"] == ["idle"]
        assert sampler.sample(idle=False)[0]["chips"][1]["throttle_reasons"] == ["budget"]
    assert TelemetrySampler(tmp_path / "absent").sample()[0]["chips"] == []


def test_box_power_keeps_the_budget_and_one_tree(tmp_path):
    import edgebox
    from tests.fixtures.paths import TEST_MODEL

    stale = tmp_path / "fw" / "chip7" / "hwmon"
    stale.mkdir(parents=True)
    power = BoxPower(10.0, tmp_path / "fw", governor=True, max_batch=4)
    with pytest.raises(ValueError, match="positive"):
        power.set_budget(-1)
    power.set_budget(6.0)  # no model yet: kept for the next load
    assert power.status() == {"enforced": True, "budget_w": 6.0, "short_ceiling_w": 7.2, "reason": "no model is loaded"}
    model = edgebox.load(TEST_MODEL, chips=2)
    power.install(model)
    assert model.box.firmware.root == tmp_path / "fw"
    assert sorted(p.name for p in (tmp_path / "fw").glob("chip*")) == ["chip0", "chip1"]  # chip7 was stale
    assert power.status()["budget_w"] == 6.0 and power.status()["enforced"] is True
    power.close()
    assert power.status()["reason"] == "no model is loaded"
    # governor off: the tree is published, the budget only recorded; RUNTIME_DIRECTORY is the default home
    off = BoxPower(10.0, None, governor=False, env={"RUNTIME_DIRECTORY": str(tmp_path / "run")})
    assert off.fw_root == tmp_path / "run" / "fw"
    off.install(edgebox.load(TEST_MODEL, chips=2))
    assert (tmp_path / "run" / "fw" / "chip1" / "hwmon").is_dir()
    assert off.status()["enforced"] is False and "governor is off" in off.status()["reason"]
    off.close()
