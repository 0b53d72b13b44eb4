"""``edgebox power status``: every chip's power, clocks, temperature and throttle reasons.

Laid out like ``nvidia-smi -q -d PERFORMANCE`` (its "Clocks Event Reasons" block: each reason
Active / Not Active), read through the same hwmon reader the governor uses, from the firmware's
tree (``/run/edgebox/fw`` by default) or a board's.  ``chip_status`` gives the same data as
JSON-ready dicts (``--json``; the daemon's telemetry carries these fields too).

Throttle reasons:
* ``budget``: the runtime capped the clock (``scaling_max_freq`` below the top level) to hold
  the power budget: a software power cap;
* ``thermal``: the firmware's trip forced the lowest clock (``temp1_max`` reached, released below
  ``temp1_max_hyst``);
* ``over_current``: the power monitor's alarm fired and the firmware dropped the clock;
* ``critical``: the die is at ``temp1_crit``.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgebox.errors import EdgeboxError
from edgebox.power.sensors import firmware_sensors

REASONS = (
    ("budget", "SW Power Cap (budget)"),
    ("thermal", "HW Thermal Slowdown"),
    ("over_current", "HW Over-Current Slowdown"),
    ("critical", "Critical Temperature"),
)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def chip_status(root: Path | str) -> list[dict]:
    """One dict per chip under ``root`` (chip0, chip1, ...): SI units, names with units."""
    root = Path(root)
    if not root.is_dir():
        raise EdgeboxError(
            f"no chip firmware tree at {root}: start the firmware (python -m firmware_stub --root {root}) or pass --fw-root"
        )
    sensors = firmware_sensors(root)
    if not sensors:
        raise EdgeboxError(f"{root} holds no chip<N> directories: not a firmware tree")
    out = []
    for s in sensors:
        r = s.read()
        cf = s.cpufreq_dir
        top_khz = _read_int(cf / "cpuinfo_max_freq") if cf is not None else None
        min_khz = _read_int(cf / "cpuinfo_min_freq") if cf is not None else None
        raw_energy = _read_int(s.dir / "energy1_input")
        hyst = _read_int(s.dir / "temp1_max_hyst")
        reasons = set(r.throttle_reasons)
        if r.max_freq_mhz is not None and top_khz is not None and r.max_freq_mhz * 1000 < top_khz:
            reasons.add("budget")
        out.append(
            {
                "chip": r.source,
                "valid": r.valid,
                "problems": list(r.problems),
                "power_w": _r(r.power_w),
                "average_power_w": _r(r.average_power_w),
                "energy_counter_j": None if raw_energy is None else raw_energy * 1e-6,
                "freq_mhz": r.freq_mhz,
                "max_freq_mhz": r.max_freq_mhz,
                "min_mhz": None if min_khz is None else min_khz // 1000,
                "top_mhz": None if top_khz is None else top_khz // 1000,
                "voltage_v": _r(r.voltage_v),
                "current_a": _r(r.current_a),
                "temp_c": _r(r.temp_c, 2),
                "temp_max_c": r.temp_max_c,
                "temp_release_c": None if hyst is None else hyst / 1000,
                "temp_crit_c": r.temp_crit_c,
                "oc_events": r.oc_events,
                "throttle_reasons": [k for k, _ in REASONS if k in reasons],
            }
        )
    return out


def format_status(chips: list[dict], root: Path | str, governor: dict | None = None) -> str:
    """The nvidia-smi-like text."""
    lines = [
        "==============EDGEBOX POWER==============",
        "",
        f"{'Timestamp':<34}: {time.strftime('%a %b %d %H:%M:%S %Y')}",
        f"{'Firmware tree':<34}: {root}",
        f"{'Attached chips':<34}: {len(chips)}",
    ]
    total = sum(c["power_w"] or 0.0 for c in chips)
    lines.append(f"{'Total Power Draw':<34}: {total:.2f} W")
    if governor:
        lines.append(
            f"{'Power Budget':<34}: {governor.get('budget_w')} W (1 s average; 100 ms ceiling {governor.get('short_ceiling_w')} W)"
        )
    for c in chips:
        lines += [
            "",
            f"{c['chip']}",
            f"    {'Power Draw':<30}: {_w(c['power_w'])}",
            f"    {'Average Power Draw':<30}: {_w(c['average_power_w'])}",
            f"    {'Energy Counter':<30}: {_unit(c['energy_counter_j'], 1, '.3f', 'J')}",
            "    Clocks",
            f"        {'Current':<26}: {_mhz(c['freq_mhz'])}",
            f"        {'Max (scaling_max_freq)':<26}: {_mhz(c['max_freq_mhz'])}",
            f"        {'Range':<26}: {_mhz(c['min_mhz'])} - {_mhz(c['top_mhz'])}",
            f"    {'Voltage':<30}: {_unit(c['voltage_v'], 1000, '.0f', 'mV')}",
            f"    {'Current':<30}: {_unit(c['current_a'], 1, '.3f', 'A')}",
            f"    {'Temperature':<30}: {_temp(c)}",
            "    Clocks Throttle Reasons",
        ]
        for key, label in REASONS:
            active = key in c["throttle_reasons"]
            extra = f"  (events: {c['oc_events']})" if key == "over_current" and c["oc_events"] is not None else ""
            lines.append(f"        {label:<26}: {'Active' if active else 'Not Active'}{extra}")
        lines.append(f"    {'Sensor':<30}: {'ok' if c['valid'] else 'INVALID: ' + '; '.join(c['problems'])}")
    return "\n".join(lines)


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def _w(x: float | None) -> str:
    return _unit(x, 1, ".2f", "W")


def _unit(x: float | None, scale: float, fmt: str, unit: str) -> str:
    return "N/A" if x is None else f"{format(x * scale, fmt)} {unit}"


def _mhz(x: int | None) -> str:
    return "N/A" if x is None else f"{x} MHz"


def _temp(c: dict) -> str:
    if c["temp_c"] is None:
        return "N/A"
    limits = []
    if c["temp_max_c"] is not None:
        limits.append(f"throttle {c['temp_max_c']:g} C")
    if c["temp_release_c"] is not None:
        limits.append(f"release {c['temp_release_c']:g} C")
    if c["temp_crit_c"] is not None:
        limits.append(f"critical {c['temp_crit_c']:g} C")
    return f"{c['temp_c']:.1f} C" + (f"  ({', '.join(limits)})" if limits else "")
