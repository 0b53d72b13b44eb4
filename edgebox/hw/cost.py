"""The chip cost model: how long an op takes and how much energy it costs.  Pure functions.

Time (device time, seconds) is a roofline plus a fixed launch cost::

    op_time = max(ops / (ops_per_cycle * f), bytes / bandwidth(f)) + launch_overhead
    bandwidth(f) = min(dram_bytes_per_s, fabric_bytes_per_cycle * f)

The fabric term is why DVFS is not free for memory-bound decode: below the clock where the
on-chip fabric saturates DRAM, bytes per second fall with the clock.

Energy of an interval of ``t`` seconds at level (f, V) in which the chip does ``ops`` and
moves ``nbytes`` from DRAM and ``link_bytes`` over the chip-to-chip link::

    E = P_static(V) * t                                  leakage, ∝ V² (see the profile)
      + C_eff V² f * (a_busy * t + (1 - a_busy) * ops / peak_ops_per_s)   switching
      + nbytes * e_dram + link_bytes * e_link            data movement
    idle: P_static(V) + a_idle * C_eff V² f

The switching term is C_eff V² f times an activity factor: ``a_busy`` of the chip toggles
whenever it is busy at all (fabric, SRAM, control), the MAC array adds in proportion to its
utilization ``ops / (peak * t)``.  It is linear in ``t`` and ``ops``, so reporting a step as one
interval or as many ops gives the same energy (the firmware relies on that).

``predict_decode`` combines these for one batched decode step over N tensor-parallel chips;
the firmware integrates the same functions over the activity the chips report.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgebox.hw.profile import ChipProfile

# --- time ---------------------------------------------------------------------------------------


def peak_ops_per_s(profile: ChipProfile, freq_mhz: float, int8: bool = True) -> float:
    per_cycle = profile.int8_ops_per_cycle if int8 else profile.fp16_ops_per_cycle
    return per_cycle * freq_mhz * 1e6


def bandwidth_bytes_per_s(profile: ChipProfile, freq_mhz: float) -> float:
    """Achievable DRAM read rate at a clock: the fabric caps it below DRAM's own rate."""
    return min(profile.dram_bytes_per_s, profile.fabric_bytes_per_cycle * freq_mhz * 1e6)


def op_time(profile: ChipProfile, freq_mhz: float, ops: float, nbytes: float, int8: bool = True) -> float:
    """Device seconds for one op: roofline over compute and DRAM traffic, plus launch overhead."""
    if ops < 0 or nbytes < 0 or freq_mhz <= 0:
        raise ValueError(f"op_time: ops={ops}, nbytes={nbytes}, freq_mhz={freq_mhz} must be >= 0 (freq > 0)")
    compute_s = ops / peak_ops_per_s(profile, freq_mhz, int8)
    memory_s = nbytes / bandwidth_bytes_per_s(profile, freq_mhz)
    return max(compute_s, memory_s) + profile.launch_overhead_s


def link_bytes_sent(nbytes: float, n_chips: int, kind: str = "allreduce") -> float:
    """Bytes each chip sends for a ring collective over a buffer of nbytes (full size)."""
    if n_chips <= 1:
        return 0.0
    steps = 2 * (n_chips - 1) if kind == "allreduce" else n_chips - 1
    return steps * nbytes / n_chips


def link_time(profile: ChipProfile, nbytes: float, n_chips: int, kind: str = "allreduce") -> float:
    """Device seconds for a ring collective over a buffer of ``nbytes`` on every chip.

    allreduce: reduce-scatter then all-gather, 2(N-1) steps each moving nbytes/N per link.
    allgather: each chip holds nbytes/N, everyone ends with all nbytes: N-1 such steps.
    One chip: no link traffic, zero time.
    """
    if kind not in ("allreduce", "allgather"):
        raise ValueError(f"link_time: kind must be 'allreduce' or 'allgather', got {kind!r}")
    if n_chips <= 1:
        return 0.0
    steps = 2 * (n_chips - 1) if kind == "allreduce" else n_chips - 1
    return steps * (profile.link_latency_s + nbytes / n_chips / profile.link_bytes_per_s)


# --- power and energy ---------------------------------------------------------------------------


def static_power_w(profile: ChipProfile, freq_mhz: float) -> float:
    """Leakage + always-on power at the voltage of the level freq_mhz runs at."""
    v_ratio = profile.voltage_mv(freq_mhz) / profile.reference_mv
    return profile.static_w_at_reference * v_ratio * v_ratio


def switching_power_full_w(profile: ChipProfile, freq_mhz: float) -> float:
    """C_eff · V² · f: switching power with the whole chip toggling (activity factor 1)."""
    v = profile.voltage_mv(freq_mhz) * 1e-3
    return profile.c_eff_f * v * v * freq_mhz * 1e6


def idle_power_w(profile: ChipProfile, freq_mhz: float) -> float:
    """Power of an idle (clock-gated) chip at a level."""
    return static_power_w(profile, freq_mhz) + profile.idle_activity * switching_power_full_w(profile, freq_mhz)


def mac_utilization(profile: ChipProfile, freq_mhz: float, seconds: float, ops: float, int8: bool = True) -> float:
    """ops / (peak ops in `seconds`), clamped to [0, 1]."""
    if seconds <= 0:
        return 0.0
    return min(1.0, max(0.0, ops / (peak_ops_per_s(profile, freq_mhz, int8) * seconds)))


def busy_energy_j(profile: ChipProfile, freq_mhz: float, seconds: float, ops: float, nbytes: float,
                  int8: bool = True, link_bytes: float = 0.0) -> float:
    """Energy of a busy interval (see the module docstring for the formula)."""
    util = mac_utilization(profile, freq_mhz, seconds, ops, int8)
    activity = profile.busy_activity + (1.0 - profile.busy_activity) * util
    return (static_power_w(profile, freq_mhz) * seconds
            + switching_power_full_w(profile, freq_mhz) * activity * seconds
            + nbytes * profile.dram_j_per_byte
            + link_bytes * profile.link_j_per_byte)


# --- decode prediction --------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeEstimate:
    """One batched decode step on N tensor-parallel chips at one clock."""

    tokens_per_s: float      # batch / step_s: tokens of all sequences together
    power_w: float           # all chips together, average over the step
    step_s: float            # device seconds per decode step
    chip_power_w: float      # one chip
    joules_per_token: float
    compute_s: float         # roofline terms of the step's ops on one chip (before max)
    memory_s: float
    launch_s: float
    link_s: float
    bound: str               # "memory" | "compute"


def predict_decode(profile: ChipProfile, n_chips: int, freq_mhz: float, batch: int,
                   weight_bytes: float, flops_per_token: float, kv_bytes_per_token: float = 0.0, *,
                   launches_per_step: int = 0, allreduce_bytes_per_token: float = 0.0,
                   allreduces_per_step: int = 0, gather_bytes_per_token: float = 0.0) -> DecodeEstimate:
    """Tokens/s and watts of steady batched decode, all chips at ``freq_mhz``.

    weight_bytes:       B, the whole model's weights, read once per step, split evenly over chips
    flops_per_token:    ops per token per sequence (≈ 2 × parameters), split evenly
    kv_bytes_per_token: B of KV cache read per token per sequence (at the assumed context), split
    launches_per_step:  ops launched per chip per step (each pays the launch overhead)
    allreduce_bytes_per_token, allreduces_per_step: the row-parallel all-reduces (B per sequence)
    gather_bytes_per_token: the vocab-parallel logits gather (B per sequence)

    The chips run in lock step (every all-reduce waits for all), so one chip's step time is the
    box's; the link time is spent busy-waiting at the busy activity factor.
    """
    if n_chips < 1 or batch < 1:
        raise ValueError(f"predict_decode: n_chips={n_chips} and batch={batch} must be >= 1")
    ops = flops_per_token * batch / n_chips                                  # per chip per step
    nbytes = (weight_bytes + kv_bytes_per_token * batch) / n_chips
    compute_s = ops / peak_ops_per_s(profile, freq_mhz, int8=True)
    memory_s = nbytes / bandwidth_bytes_per_s(profile, freq_mhz)
    launch_s = launches_per_step * profile.launch_overhead_s
    work_s = max(compute_s, memory_s) + launch_s
    ar_bytes = allreduce_bytes_per_token * batch
    gather_bytes = gather_bytes_per_token * batch
    link_s = (allreduces_per_step * link_time(profile, ar_bytes, n_chips, "allreduce")
              + (link_time(profile, gather_bytes, n_chips, "allgather") if gather_bytes else 0.0))
    sent = (allreduces_per_step * link_bytes_sent(ar_bytes, n_chips, "allreduce")
            + link_bytes_sent(gather_bytes, n_chips, "allgather"))
    step_s = work_s + link_s
    energy_j = (busy_energy_j(profile, freq_mhz, work_s, ops, nbytes)
                + busy_energy_j(profile, freq_mhz, link_s, 0.0, 0.0, link_bytes=sent))
    chip_w = energy_j / step_s
    return DecodeEstimate(
        tokens_per_s=batch / step_s,
        power_w=chip_w * n_chips,
        step_s=step_s,
        chip_power_w=chip_w,
        joules_per_token=chip_w * n_chips * step_s / batch,
        compute_s=compute_s,
        memory_s=memory_s,
        launch_s=launch_s,
        link_s=link_s,
        bound="compute" if compute_s > memory_s else "memory",
    )


def decode_workload(*, n_layer: int, n_embd: int, n_vocab: int, kv_dim: int, n_params: float,
                    weight_bytes: float, context: int, kv_elt_bytes: int = 2,
                    launches_per_layer: int = 12, activation_bytes: int = 2) -> dict:
    """predict_decode's model arguments for a llama-shaped decoder (a dict to ** into it).

    kv_dim: n_head_kv × head_dim (K and V each).  context: positions attended per token.
    launches_per_layer: norm, q/k/v, rope, attention, output, add, norm, gate/up, silu·mul,
    down, add ≈ 12 ops.  Activations cross the link as fp16 (activation_bytes) for the two
    all-reduces per layer (attention output, FFN down); the logits gather is float32.
    """
    return dict(
        weight_bytes=weight_bytes,
        flops_per_token=2.0 * n_params,
        kv_bytes_per_token=2.0 * n_layer * kv_dim * kv_elt_bytes * context,
        launches_per_step=n_layer * launches_per_layer + 2,
        allreduce_bytes_per_token=n_embd * activation_bytes,
        allreduces_per_step=2 * n_layer,
        gather_bytes_per_token=n_vocab * 4,
    )
