"""Capacity planning (``edgebox plan``): what a box of N chips does with a model, before buying it.

Per-chip memory comes from the real partition plan of the file (uneven splits included); speed
and power per (DVFS level, batch) from the cost model's ``predict_decode``, the same functions the
firmware integrates and the governor's feed-forward table uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgebox.api import Model
from edgebox.hw import cost


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
    kv_mib_per_token_per_chip: list[float]
    capacity_gib: float
    max_batch_that_fits: int
    points: list[PlanPoint]
    budget_w: float
    best: PlanPoint | None

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(m: Model, budget_w: float, batches: tuple[int, ...] = (1, 2, 4, 8, 16), context: int = 512) -> Plan:
    box, a = m.box, m.args
    p = box.profile
    weight_bytes = sum(t.nbytes for t in m.file.tensors.values())
    n_params = sum(t.n_values for t in m.file.tensors.values())
    work = cost.decode_workload(n_layer=a.n_layer, n_embd=a.n_embd, n_vocab=a.n_vocab,
                                kv_dim=a.n_head_kv * a.head_dim, n_params=n_params,
                                weight_bytes=weight_bytes, context=context)
    kv_per_seq = [chip.kv_bytes_per_token * context for chip in box.chips]
    free = [p.capacity_bytes - chip.weight_bytes for chip in box.chips]
    fits = min(int(f // kv) if kv else 10**6 for f, kv in zip(free, kv_per_seq))
    points = [
        PlanPoint(level.freq_mhz, b, e.tokens_per_s, e.power_w, e.joules_per_token, e.bound)
        for level in p.levels for b in batches if b <= max(fits, 1)
        for e in [cost.predict_decode(p, box.n_chips, level.freq_mhz, b, **work)]
    ]
    within = [pt for pt in points if pt.power_w <= budget_w]
    best = max(within, key=lambda pt: pt.tokens_per_s) if within else None
    return Plan(p.name, box.n_chips, context, [c.weight_bytes / 2**30 for c in box.chips],
                [c.kv_bytes_per_token / 2**20 for c in box.chips], p.capacity_bytes / 2**30, fits,
                points, budget_w, best)


def format_plan(plan: Plan) -> str:
    lines = [
        f"profile {plan.profile}, {plan.n_chips} chip(s), context {plan.context} tokens, budget {plan.budget_w:g} W",
        "per chip: weights " + ", ".join(f"{g:.2f}" for g in plan.weights_gib_per_chip)
        + f" GiB of {plan.capacity_gib:g} GiB; KV cache " + ", ".join(f"{k * 1024:.0f}" for k in plan.kv_mib_per_token_per_chip)
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
        lines.append(f"best within {plan.budget_w:g} W: {b.freq_mhz} MHz, batch {b.batch}: {b.tokens_per_s:.1f} tok/s "
                     f"at {b.power_w:.2f} W ({b.joules_per_token:.3f} J/token, {b.bound}-bound)")
    else:
        lines.append(f"nothing fits in {plan.budget_w:g} W, even at the lowest clock")
    return "\n".join(lines)
