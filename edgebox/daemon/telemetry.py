"""What the box reports: per-chip power/frequency/temperature/throttle reasons, host CPU and
memory; and the ``PowerControl`` protocol through which the budget governor plugs into the daemon.

The chips are read from the firmware's hwmon/cpufreq tree with ``edgebox.power.status.chip_status``,
the same reader and fields as ``edgebox power status --json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol, runtime_checkable

from edgebox.daemon.fleet import box_curve, marginal, predicted_tokens
from edgebox.errors import EdgeboxError
from edgebox.power.sensors import HostSensor
from edgebox.power.status import chip_status


@runtime_checkable
class PowerControl(Protocol):
    """The power governor as the daemon sees it (``daemon.power.BoxPower`` implements it)."""

    def set_budget(self, watts: float) -> None:
        """Hold average power at or below ``watts``; raise ValueError for a budget it cannot hold."""

    def status(self) -> dict:
        """JSON-ready state for telemetry and get_status: budget, measured power, limits, ..."""


class TelemetrySampler:
    def __init__(self, fw_root: Path | None):
        self.fw_root = fw_root
        self.host = HostSensor()
        self._reasons: dict[str, tuple[str, ...]] = {}

    def sample(self, idle: bool = False) -> tuple[dict, list[tuple[str, dict]]]:
        """-> (the chips/host part of a telemetry message, events to publish: throttled/unthrottled).

        ``idle``: the governor parked the clocks because nothing runs; a clock below the top is
        then reported as ``idle``, not as a ``budget`` cap (nvidia-smi's "Idle" reason)."""
        import psutil

        chips = self._chips()
        events = []
        for c in chips:
            if idle and "budget" in c["throttle_reasons"]:
                c["throttle_reasons"] = ["idle" if r == "budget" else r for r in c["throttle_reasons"]]
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
            "host": {
                "cpu_percent": host.cpu_percent,
                "rss_bytes": host.rss_bytes,
                "mem_available_bytes": vm.available,
                "mem_total_bytes": vm.total,
            },
        }, events

    def _chips(self) -> list[dict]:
        if self.fw_root is None:
            return []
        try:
            return chip_status(self.fw_root)
        except EdgeboxError:  # no tree yet (the firmware starts with the model)
            return []


def fleet_fields(table, budget_w: float) -> dict | None:
    """The telemetry's ``fleet`` part, what the fleet controller allocates by: the box's price
    curve (``edgebox.daemon.fleet.box_curve`` of its governor's table: [[watts, tokens/s], ...]),
    its floor, the predicted tokens/s and the marginal tokens/s per watt at ``budget_w``.
    None without a table (no model, or the governor off)."""
    if table is None:
        return None
    curve = box_curve(table)
    if not curve:
        return None
    return {
        "curve": [[round(w, 5), round(t, 4)] for w, t in curve],
        "floor_w": round(curve[0][0], 5),
        "predicted_tokens_per_s": round(predicted_tokens(curve, budget_w), 4),
        "marginal_tps_per_w": round(marginal(curve, budget_w), 5),
    }
