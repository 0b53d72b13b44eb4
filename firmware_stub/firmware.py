"""The chips' management firmware: takes activity, integrates physics, publishes hwmon files.

Usage (in-process; the chips call it as they advance their device clocks)::

    fw = Firmware("r100-edge", n_chips=4, root=tmp_dir)    # root=None: no files, state() only
    f = fw.freq_mhz(0)                                      # the clock chip 0 runs at now
    t = cost.op_time(fw.profile, f, ops, nbytes)            # the caller prices the op ...
    fw.activity(0, t, ops, nbytes)                          # ... and reports it
    fw.idle(1, 0.010)                                       # a chip waiting
    fw.set_max_freq(2, 800)                                 # = writing scaling_max_freq
    fw.state(0).average_power_w

Device time is per chip: each call advances that chip's clock.  Every ``publish_interval_s`` of
a chip's device time the firmware closes a sensor interval (power1_input), updates the running
average, reads back a runtime write to that chip's scaling_max_freq, and rewrites its changed
files.  ``publish()`` forces that for every chip (for example before a reader looks).

Thread safety: each chip has a lock, so chips on different host threads may report at once.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

from edgebox.hw import cost
from edgebox.hw.profile import ChipProfile, load_profile
from firmware_stub.hwmon import ValueFiles, cpufreq_dir, hwmon_dir, parse_khz
from firmware_stub.physics import ChipPhysics, ChipState


class Firmware:
    def __init__(
        self,
        profile: ChipProfile | str,
        n_chips: int,
        root: Path | str | None = None,
        energy_wrap_uj: int = 2**32,
        publish_interval_s: float = 0.05,
        average_interval_s: float = 0.1,
        start_max_mhz: int | None = None,
    ):
        """profile: a ChipProfile or a shipped profile's name/path.
        root: directory to publish the hwmon/cpufreq tree in (None: in-memory only).
        energy_wrap_uj: energy1_input wraps to 0 at this value (µJ).
        publish_interval_s: device seconds between sensor updates (10-100 ms is sensible).
        average_interval_s: power1_average window (device seconds).
        start_max_mhz: initial scaling_max_freq (default: the top level)."""
        self.profile = profile if isinstance(profile, ChipProfile) else load_profile(profile)
        if n_chips < 1:
            raise ValueError(f"Firmware: n_chips={n_chips} must be >= 1")
        if energy_wrap_uj < 1000 or publish_interval_s <= 0 or average_interval_s <= 0:
            raise ValueError("Firmware: energy_wrap_uj >= 1000 and positive intervals required")
        self.n_chips = n_chips
        self.energy_wrap_uj = int(energy_wrap_uj)
        self.publish_interval_s = publish_interval_s
        self.average_interval_s = average_interval_s
        start = self.profile.max_mhz if start_max_mhz is None else start_max_mhz
        self._chips = [ChipPhysics(self.profile, i, publish_interval_s, average_interval_s, start) for i in range(n_chips)]
        self._locks = [threading.Lock() for _ in range(n_chips)]
        self._tickers = [functools.partial(self._on_tick, i) for i in range(n_chips)]
        self.root = Path(root) if root is not None else None
        self._hwmon: list[ValueFiles] = []
        self._cpufreq: list[ValueFiles] = []
        self.refused_writes = [0] * n_chips  # scaling_max_freq writes refused (garbage)
        if self.root is not None:
            self._create_tree()

    # --- what the chips call ----------------------------------------------------------------
    def activity(
        self, chip: int, seconds: float, ops: float = 0.0, nbytes: float = 0.0, *, int8: bool = True, link_bytes: float = 0.0
    ) -> None:
        """The chip was busy for ``seconds`` of device time at its current clock, doing ``ops``
        operations and moving ``nbytes`` from DRAM (and ``link_bytes`` over the link)."""
        if seconds < 0 or ops < 0 or nbytes < 0 or link_bytes < 0:
            raise ValueError(f"activity: negative quantity (seconds={seconds}, ops={ops}, nbytes={nbytes})")
        if seconds == 0 and (ops or nbytes or link_bytes):
            raise ValueError("activity: work in zero seconds (price it with cost.op_time first)")
        with self._locks[chip]:
            c = self._chips[chip]
            e = cost.busy_energy_j(self.profile, c.freq_mhz(), seconds, ops, nbytes, int8, link_bytes)
            c.run(seconds, e, self._tickers[chip])

    def idle(self, chip: int, seconds: float) -> None:
        """The chip idled (clock-gated) for ``seconds`` of device time."""
        if seconds < 0:
            raise ValueError(f"idle: seconds={seconds} < 0")
        with self._locks[chip]:
            c = self._chips[chip]
            e = cost.idle_power_w(self.profile, c.freq_mhz()) * seconds
            c.run(seconds, e, self._tickers[chip])

    def idle_until(self, chip: int, time_s: float) -> None:
        """Idle until the chip's device clock reads ``time_s`` (no-op if already past)."""
        dt = time_s - self.time_s(chip)
        if dt > 0:
            self.idle(chip, dt)

    def freq_mhz(self, chip: int) -> int:
        """The clock the chip runs at: scaling_max_freq's level, capped by the protections."""
        return self._chips[chip].freq_mhz()

    def time_s(self, chip: int) -> float:
        return self._chips[chip].time_s

    # --- the runtime's knob -----------------------------------------------------------------
    def set_max_freq(self, chip: int, mhz: int) -> int:
        """Same effect as writing scaling_max_freq (kHz = mhz × 1000): out-of-range values are
        clamped to [min, max] level, a value between levels selects the level below it.
        Returns the cap now in force (MHz).  A non-integer or negative value is refused."""
        if isinstance(mhz, bool) or not isinstance(mhz, int) or mhz < 0:
            raise ValueError(f"set_max_freq: {mhz!r} is not a frequency in MHz")
        with self._locks[chip]:
            capped = self._apply_max_khz(chip, mhz * 1000)
            if self._cpufreq:
                self._cpufreq[chip].write("scaling_max_freq", capped * 1000)
            return capped

    def max_freq_mhz(self, chip: int) -> int:
        c = self._chips[chip]
        return self.profile.levels[c.max_level].freq_mhz

    # --- what readers see -------------------------------------------------------------------
    def state(self, chip: int) -> ChipState:
        with self._locks[chip]:
            return self._chips[chip].state(self.energy_wrap_uj)

    def publish(self) -> None:
        """Close every chip's sensor interval now and write its files."""
        for i in range(self.n_chips):
            with self._locks[i]:
                c = self._chips[i]
                if c.time_s > c.tick_start_s:
                    c.close_interval()
                self._on_tick(i)

    def close(self) -> None:
        for files in self._hwmon + self._cpufreq:
            files.close()

    def __enter__(self) -> Firmware:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------
    def _apply_max_khz(self, chip: int, khz: int) -> int:
        p = self.profile
        mhz = min(max(khz / 1000, p.min_mhz), p.max_mhz)
        c = self._chips[chip]
        c.max_level = p.level_index(mhz)
        return p.levels[c.max_level].freq_mhz

    def _on_tick(self, chip: int) -> None:
        """Called with the chip's lock held, at each publish boundary of its device time."""
        if self.root is None:
            return
        self._read_back_max_freq(chip)
        self._write_dynamic(chip)

    def _read_back_max_freq(self, chip: int) -> None:
        files = self._cpufreq[chip]
        text = files.read("scaling_max_freq")
        if text is None or text.strip() == "" or text.strip() == files.cached("scaling_max_freq"):
            return  # unchanged, or caught mid-write: look again next tick
        khz = parse_khz(text)
        files.forget("scaling_max_freq")
        if khz is None:  # refused, like -EINVAL: the previous value stays
            self.refused_writes[chip] += 1
            files.write("scaling_max_freq", self.max_freq_mhz(chip) * 1000)
            return
        capped = self._apply_max_khz(chip, khz)
        files.write("scaling_max_freq", capped * 1000)

    def _create_tree(self) -> None:
        p = self.profile
        for i in range(self.n_chips):
            hw = ValueFiles(hwmon_dir(self.root, i))
            cf = ValueFiles(cpufreq_dir(self.root, i))
            self._hwmon.append(hw)
            self._cpufreq.append(cf)
            hw.write("name", p.hwmon_name)
            hw.write("in0_label", "vdd_core")
            hw.write("power1_average_interval", round(self.average_interval_s * 1000))
            hw.write("power1_crit", round(p.over_current_w * 1e6))
            hw.write("energy1_max_range_uj", self.energy_wrap_uj)
            hw.write("temp1_max", round(p.throttle_c * 1000))
            hw.write("temp1_max_hyst", round((p.throttle_c - p.throttle_hysteresis_c) * 1000))
            hw.write("temp1_crit", round(p.critical_c * 1000))
            cf.write("scaling_available_frequencies", " ".join(str(f * 1000) for f in p.freqs_mhz))
            cf.write("cpuinfo_min_freq", p.min_mhz * 1000)
            cf.write("cpuinfo_max_freq", p.max_mhz * 1000)
            cf.write("scaling_min_freq", p.min_mhz * 1000)
            cf.write("scaling_max_freq", self.max_freq_mhz(i) * 1000)
            self._write_dynamic(i)
        (self.root / "firmware").write_text(f"profile={p.name} chips={self.n_chips} pid={os.getpid()}\n")

    def _write_dynamic(self, chip: int) -> None:
        s = self._chips[chip].state(self.energy_wrap_uj)
        hw, cf = self._hwmon[chip], self._cpufreq[chip]
        hw.write("power1_input", round(s.power_w * 1e6))
        hw.write("power1_average", round(s.average_power_w * 1e6))
        hw.write("energy1_input", s.energy_counter_uj)
        hw.write("in0_input", s.voltage_mv)
        hw.write("curr1_input", round(s.power_w / (s.voltage_mv * 1e-3) * 1000))
        hw.write("temp1_input", round(s.temp_c * 1000))
        hw.write("temp1_max_alarm", int("thermal" in s.throttle_reasons))
        hw.write("temp1_crit_alarm", int("critical" in s.throttle_reasons))
        hw.write("oc1_event_cnt", s.oc_events)
        hw.write("throttle_reasons", " ".join(s.throttle_reasons) or "none")
        cf.write("scaling_cur_freq", s.freq_mhz * 1000)
