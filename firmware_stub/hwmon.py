"""The firmware's sysfs-like tree: layout, cheap in-place publishing, and the scaling_max_freq knob.

Layout under the firmware root (default /run/edgebox/fw); every value is an integer (or a word)
and a newline, as sysfs prints them::

    <root>/chip<N>/hwmon/hwmon<N>/   Linux hwmon conventions (Documentation/hwmon/sysfs-interface)
        name                         the profile's hwmon_name, e.g. "r100"
        power1_input                 µW, mean over the last publish interval (the conversion window)
        power1_average, power1_crit  µW, mean over power1_average_interval (ms); over-current limit
        energy1_input                µJ, cumulative, wraps at energy1_max_range_uj (as RAPL's)
        in0_input, in0_label, curr1_input   mV of the DVFS level's core supply, "vdd_core", mA
        temp1_input, temp1_max, temp1_max_hyst, temp1_crit   m°C: die, trip, its release, critical
        temp1_max_alarm, temp1_crit_alarm, oc1_event_cnt     0/1, 0/1, over-current events
        throttle_reasons             "none" or a space-separated subset of: thermal critical over_current
    <root>/chip<N>/cpufreq/          Linux cpufreq policy conventions, kHz
        scaling_available_frequencies (ascending), cpuinfo_min_freq, cpuinfo_max_freq, scaling_min_freq
        scaling_max_freq             WRITABLE: the runtime's clock cap; read back every publish
        scaling_cur_freq             the clock the chip runs at (after hardware protections)
    <root>/firmware                  "profile=<name> chips=<n> pid=<pid>" (written once)

Files are rewritten in place (pwrite + ftruncate on descriptors kept open), not by write-to-temp
+ rename (~1 ms on a journaled filesystem; a dry run publishes tens of thousands of values). A
shorter value is written padded with spaces over the old one before the truncate, so a reader
sees the old value, the new value plus blanks, or the new value, never a mix of digits.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOT = Path("/run/edgebox/fw")


def scratch_root() -> str | None:
    """Where a throwaway firmware tree goes (simulations, dry runs): a RAM filesystem when there
    is one.  The tree is rewritten tens of thousands of times a minute; a truncating write on a
    journaled disk costs milliseconds, on tmpfs a fraction of one."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def chip_dir(root: Path, chip: int) -> Path:
    return Path(root) / f"chip{chip}"


def hwmon_dir(root: Path, chip: int) -> Path:
    return chip_dir(root, chip) / "hwmon" / f"hwmon{chip}"


def cpufreq_dir(root: Path, chip: int) -> Path:
    return chip_dir(root, chip) / "cpufreq"


def parse_khz(text: str) -> int | None:
    """A scaling_max_freq write: a non-negative decimal integer (kHz) or None (refused)."""
    s = text.strip()
    if not s.isdigit() or len(s) > 12:
        return None
    return int(s)


class ValueFiles:
    """A directory of small value files, each written only when its content changes."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}
        self._last: dict[str, bytes] = {}

    def write(self, name: str, value: int | str) -> None:
        data = f"{value}\n".encode()
        old = self._last.get(name)
        if old == data:
            return
        fd = self._fds.get(name)
        if fd is None:
            fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[name] = fd
        # the file may hold more than we last wrote if someone else wrote it (scaling_max_freq)
        size = len(old) if old is not None else os.fstat(fd).st_size
        if size > len(data):
            os.pwrite(fd, data + b" " * (size - len(data)), 0)
            os.ftruncate(fd, len(data))
        else:
            os.pwrite(fd, data, 0)
        self._last[name] = data

    def cached(self, name: str) -> str | None:
        """What this writer last wrote to ``name`` (stripped), or None."""
        data = self._last.get(name)
        return None if data is None else data.decode().strip()

    def forget(self, name: str) -> None:
        """Drop the cached content (the file was changed by someone else)."""
        self._last.pop(name, None)

    def read(self, name: str) -> str | None:
        try:
            with open(self.directory / name, "rb") as f:
                return f.read(64).decode("ascii", "replace")
        except OSError:
            return None

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
