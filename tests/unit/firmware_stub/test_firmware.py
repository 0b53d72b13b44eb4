"""firmware_stub: units, energy integration, wrap-around, thermal RC, protections, the knob,
and the separate-process mode."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from edgebox.hw import cost
from edgebox.hw.profile import PROFILE_DIR, load_profile, parse_profile
from edgebox.power.sensors import firmware_sensors
from firmware_stub import Firmware, cpufreq_dir, hwmon_dir
from firmware_stub.physics import thermal_step

REPO = Path(__file__).resolve().parents[3]
INT_FILES = (
    "power1_input",
    "power1_average",
    "power1_average_interval",
    "power1_crit",
    "energy1_input",
    "energy1_max_range_uj",
    "in0_input",
    "curr1_input",
    "temp1_input",
    "temp1_max",
    "temp1_max_hyst",
    "temp1_crit",
    "temp1_max_alarm",
    "temp1_crit_alarm",
    "oc1_event_cnt",
)


@pytest.fixture(scope="module")
def r100():
    return load_profile("r100-edge")


def _profile_with(**changes):
    """r100-edge with some fields changed, e.g. thermal={"capacitance_j_per_c": 0.1}."""
    data = tomllib.loads((PROFILE_DIR / "r100-edge.toml").read_text())
    for table, fields in changes.items():
        data[table].update(fields)
    return parse_profile(data, source="test")


def _decode_op(fw, chip, ops=3.5e9, nbytes=1.0e9):
    """Report one decode-step-sized op at the chip's current clock; returns its seconds."""
    t = cost.op_time(fw.profile, fw.freq_mhz(chip), ops, nbytes)
    fw.activity(chip, t, ops, nbytes)
    return t


def _read(path: Path) -> str:
    return path.read_text()


# --- units and layout --------------------------------------------------------------------------


def test_files_are_integers_in_hwmon_units(tmp_path, r100):
    fw = Firmware(r100, 2, root=tmp_path)
    for _ in range(10):
        _decode_op(fw, 0)
    fw.publish()
    hw = hwmon_dir(tmp_path, 0)
    for name in INT_FILES:
        text = _read(hw / name)
        assert text.endswith("\n") and text.strip().isdigit(), f"{name}: {text!r}"
    assert _read(hw / "name").strip() == r100.hwmon_name
    s = fw.state(0)
    assert int(_read(hw / "power1_input")) == round(s.power_w * 1e6)  # µW
    assert int(_read(hw / "in0_input")) == s.voltage_mv == 925  # mV
    assert int(_read(hw / "curr1_input")) == round(s.power_w / 0.925 * 1e3)  # mA
    assert int(_read(hw / "temp1_input")) == round(s.temp_c * 1e3)  # m°C
    assert int(_read(hw / "energy1_input")) == s.energy_counter_uj  # µJ
    assert int(_read(hw / "temp1_max")) == 85000 and int(_read(hw / "temp1_max_hyst")) == 75000
    assert _read(hw / "throttle_reasons").strip() == "none"
    cf = cpufreq_dir(tmp_path, 0)
    avail = [int(x) for x in _read(cf / "scaling_available_frequencies").split()]
    assert avail == [f * 1000 for f in r100.freqs_mhz]  # kHz
    assert int(_read(cf / "scaling_cur_freq")) == 1_500_000
    assert int(_read(cf / "scaling_max_freq")) == 1_500_000
    assert "chips=2" in _read(tmp_path / "firmware")
    fw.close()


def test_in_memory_mode_needs_no_directory(r100):
    fw = Firmware(r100, 4)
    _decode_op(fw, 3)
    fw.publish()
    assert fw.state(3).energy_j > 0 and fw.state(0).energy_j == 0


# --- energy ------------------------------------------------------------------------------------


def test_energy_is_the_integral_of_power(r100):
    fw = Firmware(r100, 1)
    expected_j = 0.0
    for i in range(200):
        f = fw.freq_mhz(0)
        if i % 3 == 0:
            fw.idle(0, 0.004)
            expected_j += cost.idle_power_w(r100, f) * 0.004
        else:
            t = cost.op_time(r100, f, 1e9, 2e8)
            fw.activity(0, t, 1e9, 2e8)
            expected_j += cost.busy_energy_j(r100, f, t, 1e9, 2e8)
        if i == 100:
            fw.set_max_freq(0, 800)
    s = fw.state(0)
    assert s.energy_j == pytest.approx(expected_j, rel=1e-9)
    assert s.energy_counter_uj == int(s.energy_j * 1e6) % 2**32


def test_power_average_and_input_follow_a_load_step(r100):
    fw = Firmware(r100, 1, publish_interval_s=0.01, average_interval_s=0.1)
    fw.idle(0, 1.0)
    idle_w = cost.idle_power_w(r100, r100.max_mhz)
    assert fw.state(0).average_power_w == pytest.approx(idle_w)
    busy_w = None
    while fw.time_s(0) < 1.05:  # half the averaging window busy
        t = _decode_op(fw, 0)
        busy_w = cost.busy_energy_j(r100, r100.max_mhz, t, 3.5e9, 1e9) / t
    fw.publish()
    s = fw.state(0)
    assert s.power_w == pytest.approx(busy_w, rel=1e-6)
    assert idle_w < s.average_power_w < busy_w


def test_energy_counter_wraps_and_the_reader_corrects(tmp_path, r100):
    wrap_uj = 1_000_000  # 1 J: wraps every ~0.25 s at 4 W
    fw = Firmware(r100, 1, root=tmp_path, energy_wrap_uj=wrap_uj, publish_interval_s=0.02)
    sensor = firmware_sensors(tmp_path, clock=lambda: fw.time_s(0))[0]
    first = sensor.read()
    raw_seen = []
    while fw.time_s(0) < 3.0:
        _decode_op(fw, 0)
        r = sensor.read()
        assert r.valid, r.problems
        raw_seen.append(int(_read(hwmon_dir(tmp_path, 0) / "energy1_input")))
    fw.publish()
    last = sensor.read()
    total_j = fw.state(0).energy_j
    assert total_j > 5 * wrap_uj * 1e-6  # it did wrap, several times
    assert any(b < a for a, b in zip(raw_seen, raw_seen[1:], strict=False))
    assert max(raw_seen) < wrap_uj
    assert last.energy_j - first.energy_j == pytest.approx(total_j, abs=1e-5)


# --- thermal -----------------------------------------------------------------------------------


def test_thermal_rc_time_constant_and_steady_state(r100):
    p = r100
    fw = Firmware(p, 1)
    op_s = 0.5
    ops, nbytes = 1e9, 0.5 * op_s * cost.bandwidth_bytes_per_s(p, p.max_mhz)
    power_w = cost.busy_energy_j(p, p.max_mhz, op_s, ops, nbytes) / op_s
    steady_c = p.ambient_c + p.thermal_resistance_c_per_w * power_w
    assert steady_c < p.throttle_c  # no trip in this test
    tau = p.thermal_tau_s
    while fw.time_s(0) < tau - 1e-9:
        fw.activity(0, op_s, ops, nbytes)
    assert fw.state(0).temp_c == pytest.approx(p.ambient_c + (steady_c - p.ambient_c) * (1 - math.exp(-1)), abs=0.05)
    while fw.time_s(0) < 8 * tau:
        fw.activity(0, op_s, ops, nbytes)
    assert fw.state(0).temp_c == pytest.approx(steady_c, abs=0.05)
    # the exact step: many small steps equal one big one
    t_many = p.ambient_c
    for _ in range(1000):
        t_many = thermal_step(p, t_many, 3.0, 0.01)
    assert t_many == pytest.approx(thermal_step(p, p.ambient_c, 3.0, 10.0), abs=1e-9)


def test_thermal_trip_forces_lowest_clock_and_recovers_with_hysteresis(tmp_path):
    p = _profile_with(thermal={"capacitance_j_per_c": 0.05}, power={"over_current_w": 100.0})
    fw = Firmware(p, 1, root=tmp_path, publish_interval_s=0.01)
    ops = 1e9  # compute-bound: ~5 W at 1500 MHz -> ~95 °C steady
    seen_trip_at = None
    for _ in range(20000):  # tau = 0.6 s; the trip comes after ~1.2 s
        t = cost.op_time(p, fw.freq_mhz(0), ops, 1e7)
        fw.activity(0, t, ops, 1e7)
        if fw.state(0).temp_c >= p.throttle_c:
            seen_trip_at = fw.state(0).temp_c
            break
    assert seen_trip_at is not None
    assert fw.freq_mhz(0) == p.min_mhz
    fw.publish()
    assert "thermal" in _read(hwmon_dir(tmp_path, 0) / "throttle_reasons").split()
    assert _read(hwmon_dir(tmp_path, 0) / "temp1_max_alarm").strip() == "1"
    assert int(_read(cpufreq_dir(tmp_path, 0) / "scaling_cur_freq")) == p.min_mhz * 1000
    assert fw.state(0).thermal_events == 1
    # cooling: still forced low between the release point and the trip point
    release_c = p.throttle_c - p.throttle_hysteresis_c
    saw_hysteresis_band = False
    while fw.state(0).temp_c >= release_c:
        if fw.state(0).temp_c < p.throttle_c - 1:
            saw_hysteresis_band = True
            assert fw.freq_mhz(0) == p.min_mhz
        fw.idle(0, 0.005)
    assert saw_hysteresis_band
    assert fw.freq_mhz(0) == p.max_mhz  # released: back to scaling_max_freq
    assert "thermal" not in fw.state(0).throttle_reasons


def test_over_current_counts_events_and_drops_the_clock(r100):
    fw = Firmware(r100, 1)
    f = fw.freq_mhz(0)
    ops, nbytes = 1e10, 1.5e8  # at the roofline ridge: MACs and DRAM both busy
    t = cost.op_time(r100, f, ops, nbytes)
    assert cost.busy_energy_j(r100, f, t, ops, nbytes) / t > r100.over_current_w
    fw.activity(0, t, ops, nbytes)
    s = fw.state(0)
    assert s.oc_events == 1 and "over_current" in s.throttle_reasons
    dropped = r100.freqs_mhz[len(r100.freqs_mhz) - 1 - r100.over_current_drop_levels]
    assert fw.freq_mhz(0) == dropped
    # at the lower clock the same work is under the limit; the hold then expires
    t2 = cost.op_time(r100, fw.freq_mhz(0), ops, nbytes)
    fw.activity(0, t2, ops, nbytes)
    assert fw.state(0).oc_events == 1 and fw.freq_mhz(0) == dropped
    fw.idle(0, r100.over_current_hold_s + 0.01)
    assert fw.freq_mhz(0) == r100.max_mhz and "over_current" not in fw.state(0).throttle_reasons
    fw.activity(0, t, ops, nbytes)  # a new rising edge: a new event
    assert fw.state(0).oc_events == 2


def test_a_sustained_over_current_is_one_event():
    p = _profile_with(power={"over_current_drop_levels": 0})  # the alarm without the clock drop
    fw = Firmware(p, 1)
    ops, nbytes = 1e10, 1.5e8
    for _ in range(5):
        fw.activity(0, cost.op_time(p, fw.freq_mhz(0), ops, nbytes), ops, nbytes)
    assert fw.state(0).oc_events == 1 and fw.freq_mhz(0) == p.max_mhz
    fw.idle(0, 0.001)  # back under the limit ...
    fw.activity(0, cost.op_time(p, fw.freq_mhz(0), ops, nbytes), ops, nbytes)
    assert fw.state(0).oc_events == 2  # ... so the next crossing counts


def test_decode_at_full_clock_does_not_trip_over_current(r100):
    fw = Firmware(r100, 1)
    for _ in range(50):
        _decode_op(fw, 0)
    assert fw.state(0).oc_events == 0 and fw.freq_mhz(0) == r100.max_mhz


# --- the scaling_max_freq knob -----------------------------------------------------------------


def test_scaling_max_freq_writes_take_effect_and_bad_ones_are_refused(tmp_path, r100):
    fw = Firmware(r100, 2, root=tmp_path, publish_interval_s=0.01)
    knob = cpufreq_dir(tmp_path, 1) / "scaling_max_freq"

    def write_and_step(text: str) -> None:
        knob.write_text(text)
        fw.idle(1, 0.011)  # the firmware reads it back at its next tick

    write_and_step("800000\n")
    assert fw.freq_mhz(1) == 800 and fw.freq_mhz(0) == 1500
    assert int(_read(cpufreq_dir(tmp_path, 1) / "scaling_cur_freq")) == 800_000
    write_and_step("1100000\n")  # between levels: the level below
    assert fw.freq_mhz(1) == 1000
    write_and_step("99999999\n")  # above range: clamped
    assert fw.freq_mhz(1) == 1500 and int(_read(knob)) == 1_500_000
    write_and_step("100\n")  # below range: clamped to the lowest
    assert fw.freq_mhz(1) == 400 and int(_read(knob)) == 400_000
    write_and_step("fast please\n")  # garbage: refused, previous value kept
    assert fw.freq_mhz(1) == 400 and int(_read(knob)) == 400_000
    write_and_step("-5\n")
    assert fw.freq_mhz(1) == 400 and fw.refused_writes[1] == 2
    write_and_step("")  # caught mid-write: ignored until next tick
    assert fw.freq_mhz(1) == 400
    assert fw.set_max_freq(1, 1234) == 1200 and int(_read(knob)) == 1_200_000
    assert fw.set_max_freq(1, 10**6) == 1500
    with pytest.raises(ValueError):
        fw.set_max_freq(1, -1)
    with pytest.raises(ValueError):
        fw.set_max_freq(1, 1.5e3)  # type: ignore[arg-type]


def test_runtime_cap_and_protection_combine(r100):
    fw = Firmware(r100, 1)
    fw.set_max_freq(0, 1000)
    assert fw.freq_mhz(0) == 1000 and fw.max_freq_mhz(0) == 1000
    ops, nbytes = 1e10, 1e8  # ridge work: under the limit at 1000 MHz
    t = cost.op_time(r100, 1000, ops, nbytes)
    fw.activity(0, t, ops, nbytes)
    assert fw.state(0).oc_events == 0


# --- cost of publishing ------------------------------------------------------------------------


def test_a_60s_dry_run_publishes_cheaply(tmp_path, r100):
    fw = Firmware(r100, 4, root=tmp_path, publish_interval_s=0.02)
    t0 = time.perf_counter()
    step_s = cost.op_time(r100, r100.max_mhz, 3.5e9, 0.975e9)  # about a 7B decode step
    while fw.time_s(0) < 60.0:
        for chip in range(4):
            fw.activity(chip, step_s, 3.5e9, 0.975e9)
    wall_s = time.perf_counter() - t0
    assert wall_s < 10.0, f"60 s of device time took {wall_s:.1f} s of wall time"
    assert int(_read(hwmon_dir(tmp_path, 3) / "energy1_input")) > 0


# --- separate process --------------------------------------------------------------------------


def test_separate_process_starts_publishes_and_stops_on_sigterm(tmp_path):
    root = tmp_path / "fw"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_stub", "--root", str(root), "--chips", "2", "--tick-s", "0.05"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        energy = hwmon_dir(root, 1) / "energy1_input"
        deadline = time.monotonic() + 15
        while not (root / "firmware").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        assert (root / "firmware").exists()
        e0 = int(energy.read_text())
        (cpufreq_dir(root, 1) / "scaling_max_freq").write_text("600000\n")
        cur = cpufreq_dir(root, 1) / "scaling_cur_freq"
        while int(cur.read_text()) != 600_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(cur.read_text()) == 600_000
        assert int(energy.read_text()) > e0  # idle chips still draw static power
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0, proc.stderr.read().decode()
        assert not (root / "firmware").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_separate_process_reports_a_bad_profile_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-m", "firmware_stub", "--root", str(tmp_path), "--profile", "nope"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope" in r.stderr
