"""Chip profiles: every physical assumption about a chip kind, loaded from a commented TOML file.

A profile is data only (frozen, validated once at load); the formulas that use it live in
``edgebox.hw.cost`` (per interval) and ``edgebox.hw.step`` (per step), the state that integrates
them over time in ``firmware_stub``.  The TOML files in ``edgebox/hw/profiles/`` carry the
reasoning behind each number as comments;
``load_profile("r100-edge")`` finds a shipped one by name, ``load_profile(path)`` reads any file.

File layout (all keys required unless marked optional; units are in the key names)::

    [chip]     name, hwmon_name, description (optional)
    [dvfs]     levels = [[mhz, mv], ...] ascending; reference_mv (static power is given at it)
    [compute]  int8_ops_per_cycle, fp16_ops_per_cycle, launch_overhead_us
    [memory]   capacity_gib, dram_gbps, fabric_bytes_per_cycle, dram_pj_per_byte
    [power]    static_w_at_reference, c_eff_nf, busy_activity, idle_activity,
               over_current_w, over_current_drop_levels, over_current_hold_s
    [link]     gbps, latency_us, pj_per_byte
    [thermal]  resistance_c_per_w, capacitance_j_per_c, ambient_c, throttle_c,
               throttle_hysteresis_c, critical_c

A bad file raises ``EdgeboxError`` with one line naming the file and the field.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgebox.errors import EdgeboxError

PROFILE_DIR = Path(__file__).parent / "profiles"  # shipped profiles (package data)
DEFAULT_PROFILE = "r100-edge"


class ProfileError(EdgeboxError):
    """A chip profile that cannot be used: missing, unreadable, or a field out of range."""


@dataclass(frozen=True)
class DvfsLevel:
    freq_mhz: int
    voltage_mv: int


@dataclass(frozen=True)
class ChipProfile:
    """One chip kind.  Quantities are per chip; units are in the field names."""

    name: str
    hwmon_name: str  # hwmon `name` attribute: no '-', no whitespace
    description: str
    source: str  # the file it came from (for messages)
    levels: tuple[DvfsLevel, ...]  # ascending frequency, non-decreasing voltage
    reference_mv: int  # voltage static_w_at_reference is quoted at
    int8_ops_per_cycle: float  # ops (a multiply-add is 2) per clock, int8 x int8
    fp16_ops_per_cycle: float
    launch_overhead_s: float  # fixed cost of starting one op
    capacity_bytes: int  # device memory
    dram_bytes_per_s: float  # sustained DRAM read rate, clock-independent
    fabric_bytes_per_cycle: float  # on-chip fabric limit: bandwidth(f) = min(dram, this x f)
    dram_j_per_byte: float  # DRAM + PHY + controller energy per byte moved
    static_w_at_reference: float  # leakage + always-on logic at reference_mv
    c_eff_f: float  # switched capacitance at full MAC utilization (farads)
    busy_activity: float  # fraction of c_eff switching whenever busy (fabric, SRAM, control)
    idle_activity: float  # fraction switching when idle (clock tree behind clock gating)
    over_current_w: float  # instantaneous power that trips the over-current guard
    over_current_drop_levels: int  # DVFS levels the guard drops the clock by
    over_current_hold_s: float  # how long the guard holds the lower clock after the last trip
    link_bytes_per_s: float  # chip-to-chip link, per direction
    link_latency_s: float  # per message hop
    link_j_per_byte: float
    thermal_resistance_c_per_w: float  # junction to ambient
    thermal_capacitance_j_per_c: float
    ambient_c: float
    throttle_c: float  # thermal trip: forced lowest clock (hwmon temp1_max)
    throttle_hysteresis_c: float  # released below throttle_c - this (temp1_max_hyst)
    critical_c: float  # hwmon temp1_crit; reported as a critical throttle reason

    # --- derived ------------------------------------------------------------------------------
    @property
    def freqs_mhz(self) -> tuple[int, ...]:
        return tuple(lv.freq_mhz for lv in self.levels)

    @property
    def min_mhz(self) -> int:
        return self.levels[0].freq_mhz

    @property
    def max_mhz(self) -> int:
        return self.levels[-1].freq_mhz

    def level_index(self, freq_mhz: float) -> int:
        """Index of the highest level at or below freq_mhz (the lowest if below all), as
        cpufreq picks a frequency under scaling_max_freq."""
        idx = 0
        for i, lv in enumerate(self.levels):
            if lv.freq_mhz <= freq_mhz:
                idx = i
        return idx

    def voltage_mv(self, freq_mhz: float) -> int:
        """Supply voltage of the level a frequency runs at."""
        return self.levels[self.level_index(freq_mhz)].voltage_mv

    @property
    def thermal_tau_s(self) -> float:
        return self.thermal_resistance_c_per_w * self.thermal_capacitance_j_per_c


def profile_path(name_or_path: str | Path) -> Path:
    """A shipped profile's name ("r100-edge") or a path to a .toml file -> its path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.parent != Path("."):
        return p
    return PROFILE_DIR / f"{name_or_path}.toml"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> ChipProfile:
    path = profile_path(name_or_path)
    if not path.is_file():
        known = ", ".join(available_profiles())
        raise ProfileError(f"chip profile {str(name_or_path)!r}: no file {path} (shipped profiles: {known})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"chip profile {path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"chip profile {path}: not valid TOML: {e}") from None
    return parse_profile(data, source=str(path))


def parse_profile(data: dict, source: str = "<dict>") -> ChipProfile:
    """Validate a parsed TOML document into a ChipProfile (ProfileError on the first bad field)."""
    f = _Fields(data, source)
    levels = f.levels()
    ref_mv = f.number("dvfs", "reference_mv", lo=1, hi=5000)
    hwmon_name = f.string("chip", "hwmon_name")
    if any(c in hwmon_name for c in "-* \t\n") or not hwmon_name:
        raise f.bad("chip", "hwmon_name", "must not contain '-', '*' or whitespace (hwmon rule)")
    throttle_c = f.number("thermal", "throttle_c", lo=-50, hi=300)
    critical_c = f.number("thermal", "critical_c", lo=-50, hi=300)
    ambient_c = f.number("thermal", "ambient_c", lo=-50, hi=150)
    if not ambient_c < throttle_c <= critical_c:
        raise f.bad("thermal", "throttle_c", "need ambient_c < throttle_c <= critical_c")
    hyst = f.number("thermal", "throttle_hysteresis_c", lo=0, hi=100)
    if throttle_c - hyst <= ambient_c:
        raise f.bad("thermal", "throttle_hysteresis_c", "the release point must stay above ambient_c")
    return ChipProfile(
        name=f.string("chip", "name"),
        hwmon_name=hwmon_name,
        description=f.string("chip", "description", required=False),
        source=source,
        levels=levels,
        reference_mv=int(ref_mv),
        int8_ops_per_cycle=f.number("compute", "int8_ops_per_cycle", lo=0, strict=True),
        fp16_ops_per_cycle=f.number("compute", "fp16_ops_per_cycle", lo=0, strict=True),
        launch_overhead_s=f.number("compute", "launch_overhead_us", lo=0, hi=1e6) * 1e-6,
        capacity_bytes=int(f.number("memory", "capacity_gib", lo=0, strict=True) * 2**30),
        dram_bytes_per_s=f.number("memory", "dram_gbps", lo=0, strict=True) * 1e9,
        fabric_bytes_per_cycle=f.number("memory", "fabric_bytes_per_cycle", lo=0, strict=True),
        dram_j_per_byte=f.number("memory", "dram_pj_per_byte", lo=0, hi=1e4) * 1e-12,
        static_w_at_reference=f.number("power", "static_w_at_reference", lo=0, hi=1e4),
        c_eff_f=f.number("power", "c_eff_nf", lo=0, hi=1e6) * 1e-9,
        busy_activity=f.number("power", "busy_activity", lo=0, hi=1),
        idle_activity=f.number("power", "idle_activity", lo=0, hi=1),
        over_current_w=f.number("power", "over_current_w", lo=0, strict=True),
        over_current_drop_levels=int(f.number("power", "over_current_drop_levels", lo=0, hi=len(levels), integer=True)),
        over_current_hold_s=f.number("power", "over_current_hold_s", lo=0, hi=3600),
        link_bytes_per_s=f.number("link", "gbps", lo=0, strict=True) * 1e9,
        link_latency_s=f.number("link", "latency_us", lo=0, hi=1e6) * 1e-6,
        link_j_per_byte=f.number("link", "pj_per_byte", lo=0, hi=1e4) * 1e-12,
        thermal_resistance_c_per_w=f.number("thermal", "resistance_c_per_w", lo=0, strict=True),
        thermal_capacitance_j_per_c=f.number("thermal", "capacitance_j_per_c", lo=0, strict=True),
        ambient_c=ambient_c,
        throttle_c=throttle_c,
        throttle_hysteresis_c=hyst,
        critical_c=critical_c,
    )


class _Fields:
    """Typed access to the TOML tables with one-line errors naming file and field."""

    def __init__(self, data: dict, source: str):
        self.data, self.source = data, source

    def bad(self, table: str, key: str, why: str) -> ProfileError:
        return ProfileError(f"chip profile {self.source}: [{table}] {key}: {why}")

    def _get(self, table: str, key: str, required: bool = True):
        t = self.data.get(table)
        if not isinstance(t, dict):
            raise self.bad(table, key, f"missing table [{table}]")
        if key not in t:
            if required:
                raise self.bad(table, key, "missing")
            return None
        return t[key]

    def string(self, table: str, key: str, required: bool = True) -> str:
        v = self._get(table, key, required)
        if v is None:
            return ""
        if not isinstance(v, str):
            raise self.bad(table, key, f"expected a string, got {v!r}")
        return v

    def number(
        self, table: str, key: str, lo: float = -math.inf, hi: float = math.inf, strict: bool = False, integer: bool = False
    ) -> float:
        v = self._get(table, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.bad(table, key, f"expected a finite number, got {v!r}")
        if integer and v != int(v):
            raise self.bad(table, key, f"expected an integer, got {v!r}")
        if (v <= lo if strict else v < lo) or v > hi:
            rel = ">" if strict else ">="
            raise self.bad(table, key, f"{v!r} out of range (must be {rel} {lo:g} and <= {hi:g})")
        return float(v)

    def levels(self) -> tuple[DvfsLevel, ...]:
        raw = self._get("dvfs", "levels")
        if not isinstance(raw, list) or not raw:
            raise self.bad("dvfs", "levels", "expected a non-empty list of [mhz, mv] pairs")
        out: list[DvfsLevel] = []
        for i, pair in enumerate(raw):
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
            ):
                raise self.bad("dvfs", "levels", f"entry {i} is {pair!r}, expected [mhz, mv] integers")
            mhz, mv = pair
            if not (1 <= mhz <= 100_000 and 1 <= mv <= 5000):
                raise self.bad("dvfs", "levels", f"entry {i} {pair!r} out of range")
            if out and (mhz <= out[-1].freq_mhz or mv < out[-1].voltage_mv):
                raise self.bad("dvfs", "levels", f"entry {i} {pair!r}: frequencies must ascend and voltages not fall")
            out.append(DvfsLevel(mhz, mv))
        return tuple(out)
