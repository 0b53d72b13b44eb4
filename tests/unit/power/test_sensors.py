"""edgebox.power.sensors on fake sysfs trees (hwmon, powercap) and on the firmware stub."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgebox.hw import cost
from edgebox.hw.profile import load_profile
from edgebox.power.sensors import (
    HostSensor,
    HwmonSensor,
    PowercapSensor,
    WrappingCounter,
    firmware_sensors,
    hwmon_sensors,
    rapl_sensors,
)
from firmware_stub import Firmware, cpufreq_dir


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _write(d: Path, **files) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (d / name).write_text(f"{value}\n")
    return d


@pytest.fixture
def board(tmp_path):
    """A real-board-like hwmon device: an INA-style power monitor with all the usual files."""
    return _write(
        tmp_path / "hwmon" / "hwmon3",
        name="ina3221",
        power1_input=2_500_000,
        power1_average=2_400_000,
        energy1_input=1_000_000,
        in0_input=5020,
        curr1_input=498,
        temp1_input=47_250,
        temp1_max=85_000,
        temp1_crit=100_000,
        oc1_event_cnt=0,
    )


def test_hwmon_units_become_si(board):
    clock = FakeClock()
    r = HwmonSensor(board, clock=clock).read()
    assert r.valid and not r.problems and r.t_s == 100.0
    assert r.power_w == pytest.approx(2.5) and r.average_power_w == pytest.approx(2.4)
    assert r.voltage_v == pytest.approx(5.02) and r.current_a == pytest.approx(0.498)
    assert r.temp_c == pytest.approx(47.25) and r.temp_max_c == 85.0 and r.temp_crit_c == 100.0
    assert r.oc_events == 0 and r.throttle_reasons == () and r.energy_j == 0.0
    assert r.freq_mhz is None  # no cpufreq directory given


def test_energy_counter_wrap_is_corrected(board):
    clock = FakeClock()
    s = HwmonSensor(board, clock=clock, energy_range_uj=2_000_000, stale_after_s=10)
    _write(board, energy1_input=1_800_000)
    s.read()
    clock.t += 1.0
    _write(board, energy1_input=300_000)  # wrapped: +0.2 J to the top, +0.3 J after
    r = s.read()
    assert r.valid, r.problems
    assert r.energy_j == pytest.approx(0.5)
    clock.t += 1.0
    _write(board, energy1_input=1_300_000)
    assert s.read().energy_j == pytest.approx(1.5)


def test_wrapping_counter_alone():
    c = WrappingCounter(1000)
    assert c.update(900) == (0, False)
    assert c.update(950) == (50, False)
    assert c.update(20) == (70, True)
    assert c.total == 120


def test_energy_only_source_gives_power_from_the_counter(tmp_path):
    d = _write(tmp_path / "hwmon0", name="meter", energy1_input=5_000_000)
    clock = FakeClock()
    s = HwmonSensor(d, clock=clock)
    first = s.read()
    assert first.valid and first.power_w is None  # nothing to difference yet
    clock.t += 0.5
    _write(d, energy1_input=6_000_000)
    r = s.read()
    assert r.valid and r.power_w == pytest.approx(2.0) and r.energy_j == pytest.approx(1.0)


def test_a_counter_reset_is_flagged_not_hidden(board):
    clock = FakeClock()
    s = HwmonSensor(board, clock=clock)  # no range: 64-bit kernel accumulator
    s.read()
    clock.t += 0.1
    _write(board, energy1_input=10)  # went down: a reset, not a wrap
    r = s.read()
    assert not r.valid and any("energy1_input" in p for p in r.problems)
    clock.t += 0.1
    _write(board, energy1_input=110, power1_input=2_500_001)
    r = s.read()
    assert r.valid and r.energy_j == pytest.approx(100e-6)  # re-based after the reset


def test_stale_readings_are_flagged(board):
    clock = FakeClock()
    s = HwmonSensor(board, clock=clock, stale_after_s=0.5)
    assert s.read().valid
    clock.t += 0.4
    assert s.read().valid
    clock.t += 0.2  # 0.6 s without a change
    r = s.read()
    assert r.stale and not r.valid and "stale" in r.problems[0]
    _write(board, energy1_input=1_000_123)
    clock.t += 0.1
    r = s.read()
    assert r.valid and not r.stale


@pytest.mark.parametrize(
    "file,content,needle",
    [
        ("power1_input", "abc", "power1_input"),
        ("power1_input", "", "power1_input"),
        ("power1_input", "-5", "power1_input"),
        ("power1_input", "99999999999999", "power1_input"),  # 100 MW: absurd
        ("temp1_input", "512000", "temp1_input"),  # 512 °C: a broken sensor
        ("energy1_input", "1e6", "energy1_input"),
        ("energy1_input", "-1", "energy1_input"),
        ("in0_input", "-3", "in0_input"),
        ("curr1_input", "-20", "curr1_input"),
        ("oc1_event_cnt", "x", "oc1_event_cnt"),
    ],
)
def test_garbage_gives_an_invalid_reading_not_an_exception(board, file, content, needle):
    (board / file).write_text(content)
    r = HwmonSensor(board, clock=FakeClock()).read()
    assert not r.valid and any(needle in p for p in r.problems), r.problems


def test_missing_files_and_directories(tmp_path, board):
    for name in ("power1_average", "temp1_input", "in0_input", "curr1_input", "oc1_event_cnt"):
        (board / name).unlink()
    r = HwmonSensor(board, clock=FakeClock()).read()
    assert r.valid and r.temp_c is None and r.voltage_v is None and r.power_w == pytest.approx(2.5)
    (board / "power1_input").unlink()
    (board / "energy1_input").unlink()
    r = HwmonSensor(board, clock=FakeClock()).read()
    assert not r.valid and "no power1_input or energy1_input" in r.problems
    temp_only = _write(tmp_path / "hwmon9", name="k10temp", temp1_input=41_000)
    assert HwmonSensor(temp_only, clock=FakeClock(), require_power=False).read().valid
    assert not HwmonSensor(temp_only, clock=FakeClock()).read().valid
    r = HwmonSensor(tmp_path / "gone", clock=FakeClock()).read()
    assert not r.valid and r.problems[0].startswith("missing")


def test_hwmon_discovery_by_name(tmp_path, board):
    _write(tmp_path / "hwmon" / "hwmon0", name="k10temp", temp1_input=40_000)
    found = hwmon_sensors(tmp_path / "hwmon", name="ina3221")
    assert [s.dir for s in found] == [board]
    assert len(hwmon_sensors(tmp_path / "hwmon")) == 2
    assert hwmon_sensors(tmp_path / "nothing") == []


# --- RAPL --------------------------------------------------------------------------------------


@pytest.fixture
def powercap(tmp_path):
    root = tmp_path / "powercap"
    _write(root / "intel-rapl:0", name="package-0", energy_uj=262_000_000_000, max_energy_range_uj=262_143_328_850)
    _write(root / "intel-rapl:0:0", name="core", energy_uj=5, max_energy_range_uj=262_143_328_850)
    (root / "intel-rapl").mkdir()  # the control type dir has no energy_uj
    return root


def test_rapl_power_from_energy_with_wrap(powercap):
    clock = FakeClock()
    sensors = rapl_sensors(powercap, clock=clock)
    assert [s.name for s in sensors] == ["intel-rapl:0:package-0", "intel-rapl:0:0:core"]
    pkg = sensors[0]
    assert pkg.read().power_w is None
    clock.t += 2.0
    # 143_328_850 µJ to the top of the range, then 56_671_150 µJ: 200 J in 2 s = 100 W
    _write(powercap / "intel-rapl:0", energy_uj=56_671_150)
    r = pkg.read()
    assert r.valid, r.problems
    assert r.power_w == pytest.approx(100.0) and r.energy_j == pytest.approx(200.0)


def test_rapl_garbage_and_stale(powercap):
    clock = FakeClock()
    zone = PowercapSensor(powercap / "intel-rapl:0", clock=clock, stale_after_s=0.2)
    zone.read()
    clock.t += 0.3
    r = zone.read()
    assert r.stale and not r.valid
    (powercap / "intel-rapl:0" / "energy_uj").write_text("n/a\n")
    r = zone.read()
    assert not r.valid and any("energy_uj" in p for p in r.problems)
    (powercap / "intel-rapl:0" / "max_energy_range_uj").unlink()
    (powercap / "intel-rapl:0" / "energy_uj").write_text("123\n")
    r = PowercapSensor(powercap / "intel-rapl:0", clock=clock).read()
    assert not r.valid and any("max_energy_range_uj" in p for p in r.problems)


# --- host --------------------------------------------------------------------------------------


def test_host_sensor():
    clock = FakeClock()
    s = HostSensor(clock=clock)
    first = s.read()
    assert first.valid and first.cpu_percent is None and first.rss_bytes > 10 * 2**20
    second = s.read()
    assert 0.0 <= second.cpu_percent <= 100.0 * 64


# --- on the firmware stub ------------------------------------------------------------------------


def test_reads_the_firmware_stub_like_a_board(tmp_path):
    p = load_profile("r100-edge")
    fw = Firmware(p, 4, root=tmp_path, publish_interval_s=0.02)
    sensors = firmware_sensors(tmp_path, clock=lambda: fw.time_s(0), stale_after_s=0.2)
    assert [s.name for s in sensors] == ["chip0", "chip1", "chip2", "chip3"]
    fw.set_max_freq(2, 800)
    for _ in range(20):
        for chip in range(4):
            t = cost.op_time(p, fw.freq_mhz(chip), 3.5e9, 0.975e9)
            fw.activity(chip, t, 3.5e9, 0.975e9)
    fw.publish()
    readings = [s.read() for s in sensors]
    assert all(r.valid for r in readings), [r.problems for r in readings]
    for chip, r in enumerate(readings):
        st = fw.state(chip)
        assert r.power_w == pytest.approx(st.power_w, abs=1e-6)
        assert r.average_power_w == pytest.approx(st.average_power_w, abs=1e-6)
        assert r.temp_c == pytest.approx(st.temp_c, abs=1e-3)
        assert r.voltage_v * 1000 == st.voltage_mv and r.freq_mhz == st.freq_mhz
        assert r.temp_max_c == p.throttle_c and r.oc_events == 0
    assert readings[2].freq_mhz == 800 and readings[2].max_freq_mhz == 800
    assert readings[2].power_w < readings[0].power_w  # DVFS saves power ...
    # a firmware that stops publishing goes stale in the reader's (device) time
    clock_t = [fw.time_s(0)]
    frozen = firmware_sensors(tmp_path, clock=lambda: clock_t[0], stale_after_s=0.2)[0]
    assert frozen.read().valid
    clock_t[0] += 0.5
    assert frozen.read().stale
    (cpufreq_dir(tmp_path, 0) / "scaling_cur_freq").write_text("garbage\n")
    assert not frozen.read().valid
