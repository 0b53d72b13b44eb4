"""Power, energy, voltage, current and temperature readings behind one interface.

Sources (each a ``Sensor``: ``.name`` and ``.read() -> Reading``):

* ``HwmonSensor``: a Linux hwmon directory (``power1_input`` µW, ``power1_average`` µW,
  ``energy1_input`` µJ, ``in0_input`` mV, ``curr1_input`` mA, ``temp1_input``/``_max``/``_crit``
  m°C, Jetson-style ``oc1_event_cnt``), optionally with a cpufreq directory beside it
  (``scaling_cur_freq``/``scaling_max_freq`` kHz).  Reads a real board's /sys/class/hwmon and
  the firmware stub's tree alike (``firmware_sensors(root)``).
* ``PowercapSensor``: an x86 RAPL zone (/sys/class/powercap/intel-rapl:N): ``energy_uj`` wraps at
  ``max_energy_range_uj``; power = Δenergy / Δt between reads.
* ``HostSensor``: psutil figures for this process and machine (CPU %, RSS).

Readings are in SI units (W, J, V, A, °C, MHz) with the unit in the field name, stamped with
the injected clock (device time for the simulator, ``time.monotonic`` otherwise).  Nothing is
hidden: a missing directory, an unreadable or non-numeric file, a negative or absurd value, or
a reading that stopped changing (stale) gives ``valid=False`` and says why in ``problems``;
``read()`` itself does not raise for bad data.

Energy counters wrap (RAPL at max_energy_range_uj, the stub at energy1_max_range_uj, 32-bit
hardware registers at 2^32): the reader keeps the last raw value and adds the range when the
counter goes down.  ``energy_j`` is the corrected energy since the sensor's first read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

Clock = Callable[[], float]

HWMON_ROOT = Path("/sys/class/hwmon")
POWERCAP_ROOT = Path("/sys/class/powercap")
DEFAULT_HWMON_ENERGY_RANGE_UJ = 2**64  # hwmon energy inputs are 64-bit accumulators in the kernel
TEMP_RANGE_C = (-55.0, 200.0)  # outside: a broken sensor, not a temperature
VOLTAGE_MAX_V = 20.0


@dataclass(frozen=True)
class Reading:
    """One sample of one source.  Fields the source does not have are None."""

    source: str
    t_s: float  # the injected clock at the read
    valid: bool  # every reported field is trustworthy
    stale: bool = False  # the values stopped changing
    problems: tuple[str, ...] = ()  # why not valid (or notes)
    power_w: float | None = None  # power1_input, or Δenergy/Δt for energy-only sources
    average_power_w: float | None = None  # power1_average (the sensor's own averaging)
    energy_j: float | None = None  # wrap-corrected, since this sensor's first read
    voltage_v: float | None = None
    current_a: float | None = None
    temp_c: float | None = None
    temp_max_c: float | None = None  # throttle trip
    temp_crit_c: float | None = None
    freq_mhz: int | None = None  # scaling_cur_freq
    max_freq_mhz: int | None = None  # scaling_max_freq
    oc_events: int | None = None
    throttle_reasons: tuple[str, ...] = ()
    cpu_percent: float | None = None
    rss_bytes: int | None = None


class Sensor(Protocol):
    name: str

    def read(self) -> Reading: ...


class WrappingCounter:
    """Turns a wrapping raw counter into a monotonic total (same unit as the raw counter)."""

    def __init__(self, range_: int):
        self.range = int(range_)
        self.last_raw: int | None = None
        self.total = 0

    def update(self, raw: int) -> tuple[int, bool]:
        """Feed a raw value -> (increase since the previous raw value, wrapped?)."""
        if self.last_raw is None:
            self.last_raw = raw
            return 0, False
        wrapped = raw < self.last_raw
        delta = raw - self.last_raw + (self.range if wrapped else 0)
        self.last_raw = raw
        self.total += delta
        return delta, wrapped


@dataclass
class _Parsed:
    """Values read from a directory in one pass, with the problems met."""

    values: dict[str, int | str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _read_files(directory: Path, ints: tuple[str, ...], words: tuple[str, ...] = ()) -> _Parsed:
    out = _Parsed()
    for name in ints + words:
        try:
            text = (directory / name).read_bytes()[:256].decode("ascii", "replace").strip()
        except FileNotFoundError:
            continue
        except OSError as e:  # sysfs attributes can fail to read (EIO, ENODATA)
            out.problems.append(f"{name}: unreadable ({e.strerror or e})")
            continue
        if name in words:
            out.values[name] = text
            continue
        try:
            out.values[name] = int(text)
        except ValueError:
            out.problems.append(f"{name}: not an integer: {text[:20]!r}")
    return out


class _Staleness:
    """Flags a source whose raw values have not changed for longer than ``after_s``."""

    def __init__(self, after_s: float):
        self.after_s = after_s
        self.signature: object = None
        self.changed_t: float | None = None

    def check(self, signature: object, t: float) -> float | None:
        """-> seconds unchanged when stale, else None."""
        if signature != self.signature or self.changed_t is None:
            self.signature, self.changed_t = signature, t
            return None
        unchanged = t - self.changed_t
        return unchanged if unchanged > self.after_s else None


class HwmonSensor:
    """A hwmon directory (plus an optional cpufreq directory) as a Sensor."""

    _INTS = (
        "power1_input",
        "power1_average",
        "energy1_input",
        "energy1_max_range_uj",
        "in0_input",
        "curr1_input",
        "temp1_input",
        "temp1_max",
        "temp1_crit",
        "oc1_event_cnt",
    )

    def __init__(
        self,
        hwmon_dir: Path | str,
        *,
        clock: Clock = time.monotonic,
        name: str | None = None,
        cpufreq_dir: Path | str | None = None,
        stale_after_s: float = 0.5,
        energy_range_uj: int | None = None,
        max_power_w: float = 1000.0,
        require_power: bool = True,
    ):
        """stale_after_s: the readings must change within this long (by ``clock``).
        require_power: a device without power1_input and energy1_input is invalid (False for a
        temperature-only device such as k10temp; staleness then watches temp1_input).
        energy_range_uj: energy1_input's wrap range; default: the directory's
        energy1_max_range_uj (stub extension), else 2^64 (kernel accumulators)."""
        self.dir = Path(hwmon_dir)
        self.cpufreq_dir = Path(cpufreq_dir) if cpufreq_dir is not None else None
        self.name = name or self.dir.name
        self.clock = clock
        self.max_power_w = max_power_w
        self._explicit_range = energy_range_uj
        self.require_power = require_power
        self._counter: WrappingCounter | None = None
        self._last_t: float | None = None
        self._staleness = _Staleness(stale_after_s)

    def read(self) -> Reading:
        t = self.clock()
        if not self.dir.is_dir():
            return Reading(self.name, t, valid=False, problems=(f"missing: {self.dir}",))
        parsed = _read_files(self.dir, self._INTS, ("throttle_reasons",))
        v, problems = parsed.values, parsed.problems
        if self.cpufreq_dir is not None:
            cf = _read_files(self.cpufreq_dir, ("scaling_cur_freq", "scaling_max_freq"))
            v.update(cf.values)
            problems += cf.problems

        power_w = _scaled(v, "power1_input", 1e-6)
        average_w = _scaled(v, "power1_average", 1e-6)
        energy_j, energy_power_w = self._energy(v, t, problems)
        if power_w is None:
            power_w = energy_power_w
        for label, value in (("power1_input", power_w), ("power1_average", average_w)):
            if value is not None and not 0.0 <= value <= self.max_power_w:
                problems.append(f"{label}: {value:.3f} W outside 0..{self.max_power_w:g} W")
        if (
            self.require_power
            and "power1_input" not in v
            and "energy1_input" not in v
            and not any(p.startswith(("power1_input", "energy1_input")) for p in problems)
        ):
            problems.append("no power1_input or energy1_input")
        temp_c = _scaled(v, "temp1_input", 1e-3)
        if temp_c is not None and not TEMP_RANGE_C[0] <= temp_c <= TEMP_RANGE_C[1]:
            problems.append(f"temp1_input: {temp_c:.1f} °C is not a temperature")
        voltage_v = _scaled(v, "in0_input", 1e-3)
        if voltage_v is not None and not 0.0 <= voltage_v <= VOLTAGE_MAX_V:
            problems.append(f"in0_input: {voltage_v:.3f} V out of range")
        current_a = _scaled(v, "curr1_input", 1e-3)
        if current_a is not None and current_a < 0:
            problems.append(f"curr1_input: {current_a:.3f} A is negative")
        oc = v.get("oc1_event_cnt")
        if isinstance(oc, int) and oc < 0:
            problems.append(f"oc1_event_cnt: {oc} is negative")

        watched = (
            (v.get("energy1_input"), v.get("power1_input"))
            if self.require_power
            else (v.get("energy1_input"), v.get("power1_input"), v.get("temp1_input"))
        )
        stale_for = self._staleness.check(watched, t)
        if stale_for is not None:
            problems.append(f"stale: unchanged for {stale_for:.3f} s")
        reasons = str(v.get("throttle_reasons", "none")).split()
        return Reading(
            source=self.name,
            t_s=t,
            valid=not problems,
            stale=stale_for is not None,
            problems=tuple(problems),
            power_w=power_w,
            average_power_w=average_w,
            energy_j=energy_j,
            voltage_v=voltage_v,
            current_a=current_a,
            temp_c=temp_c,
            temp_max_c=_scaled(v, "temp1_max", 1e-3),
            temp_crit_c=_scaled(v, "temp1_crit", 1e-3),
            freq_mhz=_khz_to_mhz(v.get("scaling_cur_freq")),
            max_freq_mhz=_khz_to_mhz(v.get("scaling_max_freq")),
            oc_events=oc if isinstance(oc, int) else None,
            throttle_reasons=tuple(r for r in reasons if r != "none"),
        )

    def _energy(self, v: dict, t: float, problems: list[str]) -> tuple[float | None, float | None]:
        """-> (corrected energy J since first read, mean power W since the previous read)."""
        raw = v.get("energy1_input")
        if not isinstance(raw, int):
            return None, None
        if raw < 0:
            problems.append(f"energy1_input: {raw} is negative")
            return None, None
        if self._counter is None:
            range_uj = self._explicit_range or v.get("energy1_max_range_uj") or DEFAULT_HWMON_ENERGY_RANGE_UJ
            self._counter = WrappingCounter(int(range_uj))
        return _counter_step(self._counter, raw, t, self._last_t, self.max_power_w, "energy1_input", problems, self._set_last_t)

    def _set_last_t(self, t: float) -> None:
        self._last_t = t


class PowercapSensor:
    """One RAPL powercap zone (e.g. /sys/class/powercap/intel-rapl:0) as a Sensor."""

    def __init__(
        self,
        zone_dir: Path | str,
        *,
        clock: Clock = time.monotonic,
        name: str | None = None,
        stale_after_s: float = 0.5,
        max_power_w: float = 2000.0,
    ):
        self.dir = Path(zone_dir)
        self.clock = clock
        self.max_power_w = max_power_w
        label = None
        try:
            label = (self.dir / "name").read_text().strip()
        except OSError:
            pass
        self.name = name or (f"{self.dir.name}:{label}" if label else self.dir.name)
        self._counter: WrappingCounter | None = None
        self._last_t: float | None = None
        self._staleness = _Staleness(stale_after_s)

    def read(self) -> Reading:
        t = self.clock()
        if not self.dir.is_dir():
            return Reading(self.name, t, valid=False, problems=(f"missing: {self.dir}",))
        parsed = _read_files(self.dir, ("energy_uj", "max_energy_range_uj"))
        v, problems = parsed.values, parsed.problems
        raw, range_uj = v.get("energy_uj"), v.get("max_energy_range_uj")
        if "energy_uj" not in v and not any(p.startswith("energy_uj") for p in problems):
            problems.append("no energy_uj")
        energy_j = power_w = None
        if isinstance(raw, int) and raw < 0:
            problems.append(f"energy_uj: {raw} is negative")
        elif isinstance(raw, int):
            if not isinstance(range_uj, int) or range_uj <= 0:
                problems.append("max_energy_range_uj: missing or not positive; assuming 2^32")
                range_uj = 2**32
            if self._counter is None:
                self._counter = WrappingCounter(range_uj)
            energy_j, power_w = _counter_step(
                self._counter, raw, t, self._last_t, self.max_power_w, "energy_uj", problems, self._set_last_t
            )
        stale_for = self._staleness.check(raw, t)
        if stale_for is not None:
            problems.append(f"stale: unchanged for {stale_for:.3f} s")
        return Reading(
            self.name,
            t,
            valid=not problems,
            stale=stale_for is not None,
            problems=tuple(problems),
            power_w=power_w,
            energy_j=energy_j,
        )

    def _set_last_t(self, t: float) -> None:
        self._last_t = t


class HostSensor:
    """This machine's CPU use and this process's resident memory (psutil)."""

    def __init__(self, *, clock: Clock = time.monotonic, name: str = "host", pid: int | None = None):
        import psutil

        self._psutil = psutil
        self.name = name
        self.clock = clock
        self._process = psutil.Process(pid)
        psutil.cpu_percent(interval=None)  # the first call only starts psutil's interval
        self._primed = False

    def read(self) -> Reading:
        t = self.clock()
        problems: list[str] = []
        cpu = self._psutil.cpu_percent(interval=None)
        try:
            rss = int(self._process.memory_info().rss)
        except self._psutil.Error as e:
            rss = None
            problems.append(f"process: {e}")
        cpu_percent = cpu if self._primed else None  # meaningless before an interval exists
        self._primed = True
        return Reading(self.name, t, valid=not problems, problems=tuple(problems), cpu_percent=cpu_percent, rss_bytes=rss)


# --- discovery ---------------------------------------------------------------------------------


def firmware_sensors(root: Path | str, *, clock: Clock = time.monotonic, **kwargs) -> list[HwmonSensor]:
    """The firmware stub's chips under ``root`` (chip0, chip1, ... in numeric order)."""
    root = Path(root)
    chips = sorted((p for p in root.glob("chip*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    sensors = []
    for chip in chips:
        hw = sorted((chip / "hwmon").glob("hwmon*"))
        hw_dir = hw[0] if hw else chip / "hwmon" / f"hwmon{chip.name[4:]}"
        sensors.append(HwmonSensor(hw_dir, clock=clock, name=chip.name, cpufreq_dir=chip / "cpufreq", **kwargs))
    return sensors


def hwmon_sensors(
    root: Path | str = HWMON_ROOT, *, name: str | None = None, clock: Clock = time.monotonic, **kwargs
) -> list[HwmonSensor]:
    """Every hwmon device under ``root`` (whose ``name`` file equals ``name``, if given)."""
    out = []
    for d in sorted(Path(root).glob("hwmon*")):
        try:
            dev_name = (d / "name").read_text().strip()
        except OSError:
            dev_name = ""
        if name is None or dev_name == name:
            out.append(HwmonSensor(d, clock=clock, name=f"{d.name}:{dev_name}" if dev_name else d.name, **kwargs))
    return out


def rapl_sensors(root: Path | str = POWERCAP_ROOT, *, clock: Clock = time.monotonic, **kwargs) -> list[PowercapSensor]:
    """RAPL zones and subzones (intel-rapl:0, intel-rapl:0:0, ...); empty where there is none."""
    return [
        PowercapSensor(d, clock=clock, **kwargs) for d in sorted(Path(root).glob("intel-rapl:*")) if (d / "energy_uj").exists()
    ]


# --- helpers -------------------------------------------------------------------------------------


def _scaled(v: dict, key: str, scale: float) -> float | None:
    x = v.get(key)
    return x * scale if isinstance(x, int) else None


def _khz_to_mhz(x) -> int | None:
    return round(x / 1000) if isinstance(x, int) and x >= 0 else None


def _counter_step(
    counter: WrappingCounter,
    raw: int,
    t: float,
    last_t: float | None,
    max_power_w: float,
    label: str,
    problems: list[str],
    set_last_t,
) -> tuple[float, float | None]:
    """Advance a µJ counter; flag a jump no real load could cause (a reset or a bad wrap)."""
    delta_uj, wrapped = counter.update(raw)
    power_w = None
    if last_t is not None and t > last_t:
        power_w = delta_uj * 1e-6 / (t - last_t)
        if power_w > max_power_w:
            why = "wrapped past its range or was reset" if wrapped else "jumped"
            problems.append(f"{label}: {why}: {power_w:.0f} W implied")
            counter.total -= delta_uj  # do not let one bad step poison the total
            power_w = None
    set_last_t(t)
    return counter.total * 1e-6, power_w
