"""Who pays for a step's energy: the rule that splits it among the sequences in the step.

The chips book each step's energy as the firmware integrates it, split by what drives it
(``chips.accounting.StepEnergy``: rows, rows x context, context, logit rows).  Sequence i, with
``n_i`` rows in the step, ``c_i`` positions of context after it and ``l_i`` logit rows, pays::

    J_i = rows_j n_i / R  +  pairs_j n_i c_i / P  +  ctx_j c_i / C  +  logits_j l_i / L

(R, P, C, L: the step's totals of the same).  So weight streaming, launches and the all-reduces
are shared by the step's rows (a 50-token prompt chunk pays 50 decode rows' share; a batch of 8
decodes pays an eighth each, which is where batching saves energy), attention by each sequence's
own query-key pairs, KV reads by its own context.  The shares add up to the step's energy; idle
between steps is booked apart (``Accounting.idle_j``) and charged to no one.

The price of speed: when interactive and batch sequences share a step, the step's energy above
its cheapest clock's (``Accounting.least_energy_j``) is there because someone is waiting: the
interactive sequences pay it, by their rows, and everyone's share above is scaled to the rest.
Batch work alone runs at that clock anyway (``power.governor``, rule 8), so batch work pays what
it would cost on its own, whoever else shares its steps.  A request's steps
are ``prefill_j`` while it reads its prompt (the step that yields its first token included),
``decode_j`` after.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgebox.chips.accounting import Accounting, StepEnergy
from edgebox.model.kv_cache import Segment, step_cost


@dataclass(frozen=True)
class Energy:
    """A request's energy (``Summary.energy``): what every final reply carries."""

    joules: float = 0.0
    joules_per_token: float | None = None  # per generated token; None when none was generated
    prefill_j: float = 0.0
    decode_j: float = 0.0
    avg_w: float = 0.0  # joules / device seconds of the steps it was in: its share of the box's power

    def as_dict(self) -> dict:
        """JSON-ready, in the counters' resolution (µJ, mW)."""
        return {
            "joules": round(self.joules, 6),
            "joules_per_token": None if self.joules_per_token is None else round(self.joules_per_token, 6),
            "prefill_j": round(self.prefill_j, 6),
            "decode_j": round(self.decode_j, 6),
            "avg_w": round(self.avg_w, 3),
        }


def split(step: StepEnergy, shape: list[tuple[int, int, int]]) -> list[float]:
    """Each sequence's joules of ``step`` from its (rows, context after the step, logit rows)."""
    R, P, C, L = step.step
    # a driver the step has none of (no logit rows) cannot share its energy: the rows take it
    rows_j = step.rows_j + sum(j for j, total in ((step.pairs_j, P), (step.ctx_j, C), (step.logits_j, L)) if total <= 0)
    per = (
        rows_j / R,
        step.pairs_j / P if P > 0 else 0.0,
        step.ctx_j / C if C > 0 else 0.0,
        step.logits_j / L if L > 0 else 0.0,
    )
    return [per[0] * n + per[1] * n * c + per[2] * c + per[3] * lg for n, c, lg in shape]


class _Meter:
    __slots__ = ("prefill_j", "decode_j", "device_s")

    def __init__(self) -> None:
        self.prefill_j = self.decode_j = self.device_s = 0.0


class EnergyBook:
    """The engine's meters: one per running sequence, charged after every step (scheduler thread only)."""

    def __init__(self, accounting: Accounting):
        self.accounting = accounting
        self._meters: dict[object, _Meter] = {}

    def charge(self, sequences: list, segments: list[Segment]) -> None:
        """The step just charged to the chips (``Accounting.last``) ran ``segments`` [i] of
        ``sequences`` [i]; call before the forward pass moves the caches on."""
        step = self.accounting.last
        shape = []
        for seg in segments:
            ((rows, ctx),), n_logits = step_cost([seg])
            shape.append((rows, ctx, n_logits))
        shares = split(step, shape)
        urgent = [s.request.priority == "interactive" for s in sequences]
        if any(urgent) and not all(urgent):  # the price of speed (module docstring)
            extra = max(0.0, step.joules - self.accounting.least_energy_j(step.step))
            rows = sum(n for (n, _, _), u in zip(shape, urgent) if u)
            keep = 1.0 - extra / step.joules if step.joules > 0 else 1.0
            shares = [j * keep + (extra * n / rows if u else 0.0) for j, (n, _, _), u in zip(shares, shape, urgent)]
        for s, joules in zip(sequences, shares):
            m = self._meters.get(s)
            if m is None:
                m = self._meters[s] = _Meter()
            if s.prefilling:
                m.prefill_j += joules
            else:
                m.decode_j += joules
            m.device_s += step.seconds

    def finish(self, s, summary):
        """``summary`` (a ``Summary`` of sequence ``s``, which leaves) with its energy."""
        m = self._meters.pop(s, None) or _Meter()
        joules = m.prefill_j + m.decode_j
        n = summary.generated_tokens
        energy = Energy(joules, joules / n if n else None, m.prefill_j, m.decode_j, joules / m.device_s if m.device_s else 0.0)
        return replace(summary, energy=energy)
