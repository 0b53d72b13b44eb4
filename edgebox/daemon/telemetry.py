"""What the box reports: per-chip power/frequency/temperature, host CPU and memory; and the
``PowerControl`` protocol through which the budget governor plugs into the daemon.

Without a governor (``power=None``) the daemon still validates and records budgets, and reads
the chips through ``edgebox.power.sensors`` (the firmware's hwmon tree under ``fw_root``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..power.sensors import HostSensor, Reading, firmware_sensors


@runtime_checkable
class PowerControl(Protocol):
    """The power governor as the daemon sees it (the governor's owner implements it)."""

    def set_budget(self, watts: float) -> None:
        """Hold average power at or below ``watts``; raise ValueError for a budget it cannot hold."""

    def status(self) -> dict:
        """JSON-ready state for telemetry and get_status: budget, measured power, limits, ..."""


class TelemetrySampler:
    def __init__(self, fw_root: Path | None):
        self.fw_root = fw_root
        self.host = HostSensor()
        self.chips = firmware_sensors(fw_root) if fw_root is not None else []
        self._reasons: dict[str, tuple[str, ...]] = {}

    def sample(self) -> tuple[dict, list[tuple[str, dict]]]:
        """-> (the chips/host part of a telemetry message, events to publish: throttled/unthrottled)."""
        import psutil

        if self.fw_root is not None and not self.chips:  # the firmware may start after us
            self.chips = firmware_sensors(self.fw_root)
        chips = [_chip(r) for r in (s.read() for s in self.chips)]
        events = []
        for c in chips:
            reasons = tuple(c["throttle_reasons"])
            if reasons != self._reasons.get(c["chip"], ()):
                kind = "throttled" if reasons else "unthrottled"
                events.append((kind, {"chip": c["chip"], "reasons": list(reasons)}))
            self._reasons[c["chip"]] = reasons
        host = self.host.read()
        vm = psutil.virtual_memory()
        return {
            "ts": time.time(),
            "chips": chips,
            "power_w": round(sum(c["power_w"] or 0.0 for c in chips), 4) if chips else None,
            "host": {"cpu_percent": host.cpu_percent, "rss_bytes": host.rss_bytes,
                     "mem_available_bytes": vm.available, "mem_total_bytes": vm.total},
        }, events


def _chip(r: Reading) -> dict:
    return {
        "chip": r.source, "valid": r.valid, "power_w": _round(r.power_w), "average_power_w": _round(r.average_power_w),
        "freq_mhz": r.freq_mhz, "max_freq_mhz": r.max_freq_mhz, "temp_c": _round(r.temp_c, 2),
        "throttle_reasons": list(r.throttle_reasons), "problems": list(r.problems),
    }


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)
