"""Capacity planning (``edgebox plan``): what a box of N chips does with a model, before buying it.

Per-chip memory comes from the real partition plan of the file (uneven splits included) and the KV
cache's types (``--cache-type-k/-v``: its bytes per token, and the KV bytes each decode step reads); speed
and power per (DVFS level, batch) from steady decode priced by the one step-cost model
(``edgebox.hw.step.step_cost``) on the box's own shards: what the chips would be charged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgebox.api import Model
from edgebox.hw.step import steady_decode


@dataclass(frozen=True)
class PlanPoint:
    freq_mhz: int
    batch: int
    tokens_per_s: float
    power_w: float
    joules_per_token: float
    bound: str


@dataclass(frozen=True)
class Plan:
    profile: str
    n_chips: int
    context: int
    weights_gib_per_chip: list[float]
    kv_mib_per_token_per_chip: list[float]  # in the cache's types
    cache_type_k: str
    cache_type_v: str
    capacity_gib: float
    max_batch_that_fits: int
    points: list[PlanPoint]
    budget_w: float
    best: PlanPoint | None

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(m: Model, budget_w: float, batches: tuple[int, ...] = (1, 2, 4, 8, 16), context: int = 512) -> Plan:
    """``m``: anything with a ``box`` (a loaded model, or a dry-run shape); ``context``: the
    positions each sequence attends to."""
    box = m.box
    p = box.profile
    kv_per_seq = [chip.kv_bytes_per_token * context for chip in box.chips]
    free = [p.capacity_bytes - chip.weight_bytes for chip in box.chips]
    fits = min(int(f // kv) if kv else 10**6 for f, kv in zip(free, kv_per_seq))
    freqs = np.array(p.freqs_mhz, float)
    decode = {b: steady_decode(box.accounting.work, b, context, freqs) for b in batches if b <= max(fits, 1)}
    points = [
        PlanPoint(
            level.freq_mhz,
            b,
            float(d.tokens_per_s[lv]),
            float(d.power_w[lv]),
            float(d.joules_per_token[lv]),
            "compute" if d.compute_bound[lv] else "memory",
        )
        for lv, level in enumerate(p.levels)
        for b, d in decode.items()
    ]
    within = [pt for pt in points if pt.power_w <= budget_w]
    best = max(within, key=lambda pt: pt.tokens_per_s) if within else None
    return Plan(
        p.name,
        box.n_chips,
        context,
        [c.weight_bytes / 2**30 for c in box.chips],
        [c.kv_bytes_per_token / 2**20 for c in box.chips],
        *box.cache_types,
        p.capacity_bytes / 2**30,
        fits,
        points,
        budget_w,
        best,
    )


def format_plan(plan: Plan) -> str:
    lines = [
        f"profile {plan.profile}, {plan.n_chips} chip(s), context {plan.context} tokens, budget {plan.budget_w:g} W",
        "per chip: weights "
        + ", ".join(f"{g:.2f}" for g in plan.weights_gib_per_chip)
        + f" GiB of {plan.capacity_gib:g} GiB; KV cache ({plan.cache_type_k}/{plan.cache_type_v}) "
        + ", ".join(f"{k * 1024:.1f}" for k in plan.kv_mib_per_token_per_chip)
        + f" KiB per token; room for {plan.max_batch_that_fits} sequences of {plan.context} tokens",
        "",
    ]
    batches = sorted({pt.batch for pt in plan.points})
    lines.append("   MHz | " + " | ".join(f"batch {b:>2}: tok/s     W" for b in batches))
    for f in sorted({pt.freq_mhz for pt in plan.points}):
        cells = []
        for b in batches:
            pt = next((x for x in plan.points if x.freq_mhz == f and x.batch == b), None)
            mark = "*" if pt is plan.best else " "
            cells.append(f"{pt.tokens_per_s:>15.1f} {pt.power_w:>5.1f}{mark}" if pt else " " * 22)
        lines.append(f"{f:>6} | " + " | ".join(cells))
    lines.append("")
    if plan.best:
        b = plan.best
        lines.append(
            f"best within {plan.budget_w:g} W: {b.freq_mhz} MHz, batch {b.batch}: {b.tokens_per_s:.1f} tok/s "
            f"at {b.power_w:.2f} W ({b.joules_per_token:.3f} J/token, {b.bound}-bound)"
        )
    else:
        lines.append(f"nothing fits in {plan.budget_w:g} W, even at the lowest clock")
    return "\n".join(lines)
