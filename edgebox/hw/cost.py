"""The chip cost model's per-interval formulas: how long an op takes and what an interval costs.

Every function takes a clock ``freq_mhz`` that may be a number or a numpy array (one value per
chip and/or DVFS level); numbers in give numbers out.  Time is a roofline plus a launch cost::

    op_time = max(ops / (ops_per_cycle * f), bytes / bandwidth(f)) + launch_overhead
    bandwidth(f) = min(dram_bytes_per_s, fabric_bytes_per_cycle * f)

(the fabric term is why DVFS is not free for memory-bound decode).  Energy of ``t`` busy seconds
at level (f, V) doing ``ops`` and moving ``nbytes`` from DRAM and ``link_bytes`` over the link::

    E = P_static(V) t + C_eff V² f (a_busy t + (1 - a_busy) ops / peak_ops_per_s)
      + nbytes e_dram + link_bytes e_link
    idle: P_static(V) + a_idle C_eff V² f

It is linear in ``t`` and ``ops``, so a step reported as one interval or as many ops costs the
same energy: the firmware integrates these very functions over what the chips report, and
``edgebox.hw.step`` prices whole steps with them.
"""

from __future__ import annotations

import functools

import numpy as np

from edgebox.hw.profile import ChipProfile


def _per_clocks(fn):
    """For an array of clocks, remember ``fn(profile, clocks)``: steps are priced at the same few
    clocks over and over (the result is read-only)."""
    cache: dict[tuple, tuple] = {}

    @functools.wraps(fn)
    def at(profile: ChipProfile, freq_mhz):
        if not isinstance(freq_mhz, np.ndarray):
            return fn(profile, freq_mhz)
        key = (id(profile), freq_mhz.dtype.str, freq_mhz.shape, freq_mhz.tobytes())
        hit = cache.get(key)
        if hit is None or hit[0] is not profile:
            if len(cache) > 1024:
                cache.clear()
            out = np.asarray(fn(profile, freq_mhz), float)
            out.setflags(write=False)
            hit = cache[key] = (profile, out)
        return hit[1]

    return at


@_per_clocks
def voltage_mv(profile: ChipProfile, freq_mhz):
    """Supply voltage of the level each clock runs at (the highest level at or below it)."""
    if not isinstance(freq_mhz, np.ndarray):
        return profile.voltage_mv(freq_mhz)
    freqs = np.array(profile.freqs_mhz, float)
    volts = np.array([lv.voltage_mv for lv in profile.levels], float)
    return volts[np.maximum(np.searchsorted(freqs, freq_mhz, side="right") - 1, 0)]


# --- time ---------------------------------------------------------------------------------------


def peak_ops_per_s(profile: ChipProfile, freq_mhz, int8=True):
    """int8: a bool, or an array of them (one per op)."""
    if isinstance(int8, np.ndarray):
        per_cycle = np.where(int8, profile.int8_ops_per_cycle, profile.fp16_ops_per_cycle)
    else:
        per_cycle = profile.int8_ops_per_cycle if int8 else profile.fp16_ops_per_cycle
    return per_cycle * freq_mhz * 1e6


@_per_clocks
def bandwidth_bytes_per_s(profile: ChipProfile, freq_mhz):
    """Achievable DRAM read rate at a clock: the fabric caps it below DRAM's own rate."""
    fabric = profile.fabric_bytes_per_cycle * freq_mhz * 1e6
    return (
        np.minimum(profile.dram_bytes_per_s, fabric) if isinstance(fabric, np.ndarray) else min(profile.dram_bytes_per_s, fabric)
    )


def roofline_s(profile: ChipProfile, freq_mhz, ops, nbytes, int8=True):
    """(compute seconds, DRAM seconds) of an op: the two terms of its roofline."""
    return ops / peak_ops_per_s(profile, freq_mhz, int8), nbytes / bandwidth_bytes_per_s(profile, freq_mhz)


def op_seconds(profile: ChipProfile, compute_s, memory_s):
    """An op's device seconds from its roofline terms: the larger, plus the launch overhead."""
    if isinstance(compute_s, np.ndarray) or isinstance(memory_s, np.ndarray):
        return np.maximum(compute_s, memory_s) + profile.launch_overhead_s
    return max(compute_s, memory_s) + profile.launch_overhead_s


def op_time(profile: ChipProfile, freq_mhz, ops, nbytes, int8=True):
    """Device seconds for one op: roofline over compute and DRAM traffic, plus launch overhead."""
    if np.any(np.less(ops, 0)) or np.any(np.less(nbytes, 0)) or np.any(np.less_equal(freq_mhz, 0)):
        raise ValueError(f"op_time: ops={ops}, nbytes={nbytes}, freq_mhz={freq_mhz} must be >= 0 (freq > 0)")
    return op_seconds(profile, *roofline_s(profile, freq_mhz, ops, nbytes, int8))


def link_bytes_sent(nbytes: float, n_chips: int, kind: str = "allreduce") -> float:
    """Bytes each chip sends for a ring collective over a buffer of nbytes (full size)."""
    if n_chips <= 1:
        return 0.0
    return _ring_steps(n_chips, kind) * nbytes / n_chips


def link_time(profile: ChipProfile, nbytes: float, n_chips: int, kind: str = "allreduce") -> float:
    """Device seconds of a ring collective over a buffer of ``nbytes`` on every chip.

    allreduce: reduce-scatter then all-gather, 2(N-1) steps each moving nbytes/N per link;
    allgather: N-1 such steps.  One chip: no link traffic, zero time.
    """
    if kind not in ("allreduce", "allgather"):
        raise ValueError(f"link_time: kind must be 'allreduce' or 'allgather', got {kind!r}")
    if n_chips <= 1:
        return 0.0
    return _ring_steps(n_chips, kind) * (profile.link_latency_s + nbytes / n_chips / profile.link_bytes_per_s)


def _ring_steps(n_chips: int, kind: str) -> int:
    return 2 * (n_chips - 1) if kind == "allreduce" else n_chips - 1


# --- power and energy ---------------------------------------------------------------------------


@_per_clocks
def static_power_w(profile: ChipProfile, freq_mhz):
    """Leakage + always-on power at the voltage of the level freq_mhz runs at (∝ V²)."""
    v_ratio = voltage_mv(profile, freq_mhz) / profile.reference_mv
    return profile.static_w_at_reference * v_ratio * v_ratio


@_per_clocks
def switching_power_full_w(profile: ChipProfile, freq_mhz):
    """C_eff · V² · f: switching power with the whole chip toggling (activity factor 1)."""
    v = voltage_mv(profile, freq_mhz) * 1e-3
    return profile.c_eff_f * v * v * freq_mhz * 1e6


@_per_clocks
def idle_power_w(profile: ChipProfile, freq_mhz):
    """Power of an idle (clock-gated) chip at a level."""
    return static_power_w(profile, freq_mhz) + profile.idle_activity * switching_power_full_w(profile, freq_mhz)


def mac_utilization(profile: ChipProfile, freq_mhz, seconds, ops, int8: bool = True):
    """ops / (peak ops in ``seconds``), clamped to [0, 1]; 0 for an empty interval."""
    if not isinstance(ops, np.ndarray) and ops == 0:
        return 0.0
    capacity = peak_ops_per_s(profile, freq_mhz, int8) * seconds
    if not isinstance(capacity, np.ndarray) and not isinstance(ops, np.ndarray):
        return 0.0 if capacity <= 0 else min(1.0, max(0.0, ops / capacity))
    busy = capacity > 0
    return np.where(busy, np.minimum(1.0, np.maximum(0.0, ops / np.where(busy, capacity, 1.0))), 0.0)


def busy_energy_j(profile: ChipProfile, freq_mhz, seconds, ops, nbytes, int8: bool = True, link_bytes=0.0):
    """Energy of a busy interval (see the module docstring for the formula)."""
    util = mac_utilization(profile, freq_mhz, seconds, ops, int8)
    activity = profile.busy_activity + (1.0 - profile.busy_activity) * util
    return (
        static_power_w(profile, freq_mhz) * seconds
        + switching_power_full_w(profile, freq_mhz) * activity * seconds
        + nbytes * profile.dram_j_per_byte
        + link_bytes * profile.link_j_per_byte
    )
