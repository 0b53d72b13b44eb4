"""Simulated management firmware of the R100 chips: the only code that knows their physics.

It integrates energy and temperature over the activity the chips report (in device time),
enforces the hardware protections (thermal trip, over-current), and publishes a Linux
hwmon/cpufreq-style tree that ``edgebox.power.sensors`` reads exactly as it would read a real
board.  In-process: ``Firmware``; as its own process: ``python -m firmware_stub`` (edgebox-fw).
"""

from firmware_stub.firmware import Firmware
from firmware_stub.hwmon import DEFAULT_ROOT, chip_dir, cpufreq_dir, hwmon_dir, scratch_root
from firmware_stub.physics import ChipState, thermal_step

__all__ = ["DEFAULT_ROOT", "ChipState", "Firmware", "chip_dir", "cpufreq_dir", "hwmon_dir", "scratch_root", "thermal_step"]
