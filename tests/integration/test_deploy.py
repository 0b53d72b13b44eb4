"""deploy/: the systemd unit checked by a real systemd-analyze, the install script run into a
scratch root, the Mosquitto config and ACL."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from edgebox.daemon.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def needs_systemd_analyze(test):
    """systemd-analyze is part of the test environment (.ci/run installs it): its absence fails."""

    def run(*args, **kwargs):
        assert shutil.which("systemd-analyze"), "systemd-analyze missing: apt-get install systemd (.ci/run does)"
        return test(*args, **kwargs)

    return functools.wraps(test)(run)


def _unit_with_real_exec(tmp_path: Path) -> Path:
    """`systemd-analyze verify` fails when ExecStart's binary is missing, so the test points it at
    this environment's `edgebox` script (or this Python) instead of /opt/edgebox/venv/bin/edgebox."""
    exe = shutil.which("edgebox") or sys.executable
    text = (DEPLOY / "edgebox.service").read_text()
    assert "ExecStart=/opt/edgebox/venv/bin/edgebox serve --config /etc/edgebox/edgebox.toml" in text
    unit = tmp_path / "edgebox.service"
    unit.write_text(text.replace("/opt/edgebox/venv/bin/edgebox", exe))
    return unit


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify_without_a_word(tmp_path):
    unit = _unit_with_real_exec(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.stderr == "" and r.returncode == 0, r.stderr


@needs_systemd_analyze
def test_unit_is_hardened(tmp_path):
    unit = _unit_with_real_exec(tmp_path)
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for edgebox\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= 3.0, r.stdout
    text = unit.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "StateDirectory=edgebox",
        "ConfigurationDirectory=edgebox",
        "CacheDirectory=edgebox",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
        "NUMBA_CACHE_DIR=/var/cache/edgebox",
    ):
        assert line in text, line
    assert not re.search(r"^MemoryDenyWriteExecute=yes", text, re.M)  # numba's JIT needs W+X pages


def test_install_script_stages_config_and_unit(tmp_path):
    root = tmp_path / "root"
    env = {**os.environ, "EDGEBOX_MQTT_PASSWORD": "pw-1"}

    def run():
        cmd = [
            "bash",
            str(DEPLOY / "install.sh"),
            "--root",
            str(root),
            "--no-venv",
            "--device-id",
            "box-7",
            "--broker",
            "mqtt://10.0.0.2:1883",
        ]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)

    r = run()
    assert r.returncode == 0, r.stderr
    config = root / "etc/edgebox/edgebox.toml"
    cfg = load_config(config, env={})
    assert (cfg.device_id, cfg.username, cfg.broker, cfg.model) == ("box-7", "box-7", "mqtt://10.0.0.2:1883", None)
    pw = root / "etc/edgebox/mqtt-password"
    assert pw.read_text() == "pw-1\n" and (pw.stat().st_mode & 0o777) == 0o600
    key = root / "etc/edgebox/api-key"  # a random HTTP API key, read as the unit's credential would be
    assert re.fullmatch(r"[0-9a-f]{48}\n", key.read_text()) and (key.stat().st_mode & 0o777) == 0o600
    assert cfg.http == "127.0.0.1:8080"
    assert (
        load_config(config, env={"CREDENTIALS_DIRECTORY": str(key.parent)}).resolved_api_key(
            {"CREDENTIALS_DIRECTORY": str(key.parent)}
        )
        == key.read_text().strip()
    )
    unit = (root / "etc/systemd/system/edgebox.service").read_text()
    exe = re.search(r"^ExecStart=(\S+) serve --config /etc/edgebox/edgebox.toml$", unit, re.M).group(1)
    assert os.access(exe, os.X_OK)
    assert (root / "opt/edgebox/models").is_dir()
    config.write_text(config.read_text() + "\n# operator's edit\n")
    first_key = key.read_text()
    r = run()  # idempotent: the config, the password and the key are never overwritten
    assert r.returncode == 0 and "kept existing" in r.stdout and "operator's edit" in config.read_text()
    assert key.read_text() == first_key
    bad = subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--root", str(root), "--no-venv", "--device-id", "a/b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "device id" in bad.stderr


def test_mosquitto_acl_confines_each_device_to_its_tree():
    acl = (DEPLOY / "mosquitto.acl").read_text()
    rules = [line.strip() for line in acl.splitlines() if line.strip() and not line.startswith("#")]
    assert rules == [
        "pattern readwrite edgebox/v1/%u/#",
        "pattern read edgebox/v1/fleet/cmd/generate",  # the fleet's shared queue, for every box
        "pattern write edgebox/v1/fleet/reply/#",
        "user controller",
        "topic readwrite edgebox/v1/#",
    ]
    conf = (DEPLOY / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "persistence true" in conf
