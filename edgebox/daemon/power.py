"""The daemon's power side: the chips' firmware tree and the budget governor on the loaded model.

One ``BoxPower`` lives as long as the daemon.  On every model load, before the engine's first
step, it gives the new model's chips a firmware that publishes its hwmon/cpufreq tree under
``fw_root`` (the same directory for every model, so telemetry and ``edgebox power status
--fw-root`` keep reading one place) and, with the governor on, a ``PowerGovernor`` holding the
budget last set; once the engine is warm the governor is attached to it (it turns the chips'
``scaling_max_freq`` and the engine's batch limit).  With no model loaded the budget is kept for
the next one.  Implements the daemon's ``PowerControl``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from edgebox.power.budget import Budget

log = logging.getLogger("edgebox.daemon")


class BoxPower:
    def __init__(
        self, budget_w: float, fw_root: Path | None = None, governor: bool = True, max_batch: int = 8, env: dict | None = None
    ):
        env = os.environ if env is None else env
        self.budget = Budget(budget_w)  # ValueError for a budget no governor can hold
        self.enforced = governor
        self.max_batch = max_batch
        self._tmp = None
        if fw_root is None:
            runtime = env.get("RUNTIME_DIRECTORY")  # systemd's RuntimeDirectory= (/run/edgebox)
            if runtime:
                fw_root = Path(runtime.split(":")[0]) / "fw"
            else:
                self._tmp = tempfile.TemporaryDirectory(prefix="edgebox-fw-")
                fw_root = Path(self._tmp.name)
        self.fw_root = Path(fw_root)
        self._lock = threading.Lock()
        self._governor = None
        self._firmware = None

    # -- the model's life ----------------------------------------------------------------------------
    def install(self, model) -> None:
        """Give ``model``'s chips their publishing firmware (and governor) before any step runs."""
        from edgebox.power.governor import PowerGovernor

        self.detach()
        box = model.box
        self.fw_root.mkdir(parents=True, exist_ok=True)
        _remove_stale_chips(self.fw_root, box.n_chips)
        firmware = box.publish_firmware(self.fw_root)
        governor = PowerGovernor(box, self.budget.watts, max_batch=self.max_batch) if self.enforced else None
        with self._lock:
            self._firmware, self._governor = firmware, governor

    def attach(self, engine) -> None:
        """Start governing ``engine`` (after its warm-up: the warm-up runs at the top clock)."""
        with self._lock:
            governor = self._governor
        if governor is not None:
            governor.attach(engine)
            log.info("power governor attached: budget %.3g W over %d chips", self.budget.watts, governor.box.n_chips)

    def detach(self) -> None:
        """The model is going away: stop governing it and close its files."""
        with self._lock:
            governor, firmware = self._governor, self._firmware
            self._governor = self._firmware = None
        if governor is not None:
            governor.close()
        if firmware is not None:
            firmware.close()

    # -- PowerControl ----------------------------------------------------------------------------------
    def set_budget(self, watts: float) -> None:
        budget = self.budget.with_watts(float(watts))  # ValueError -> the caller's 400
        with self._lock:
            self.budget = budget
            governor = self._governor
        if governor is not None:
            governor.set_budget(budget.watts)

    def status(self) -> dict:
        with self._lock:
            governor, budget = self._governor, self.budget
        if governor is not None:
            return {"enforced": True, **governor.status()}
        return {
            "enforced": self.enforced,
            "budget_w": budget.watts,
            "short_ceiling_w": round(budget.short_watts, 4),
            "reason": "the governor is off (governor = false)" if not self.enforced else "no model is loaded",
        }

    def table(self):
        """The governor's price table (``edgebox.power.table.PowerTable``); None without one."""
        with self._lock:
            governor = self._governor
        return governor.config.table if governor is not None else None

    def close(self) -> None:
        self.detach()
        if self._tmp is not None:
            self._tmp.cleanup()


def _remove_stale_chips(root: Path, n_chips: int) -> None:
    """A previous model on more chips left chip<N> directories that nothing updates any more."""
    for d in root.glob("chip*"):
        m = re.fullmatch(r"chip(\d+)", d.name)
        if m and int(m.group(1)) >= n_chips and (d / "hwmon").is_dir():
            shutil.rmtree(d, ignore_errors=True)
