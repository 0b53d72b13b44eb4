"""When a queued request would start: the deadline forecast, and the pace that scales it.

The forecast is ``scheduler.steps_until_start`` (the steps before the scheduler would admit the
request if every running and earlier queued one ran to its end) x the cost model's price of a
decode step at the chips' current clocks x the *pace*: the engine clock's seconds per priced
device second, measured on every step and followed with gain ``PACE_GAIN`` (a dry run's clock
is device time: its pace stays 1). Prices follow the governor's clocks at once; the pace absorbs
what the cost model does not know (the host's speed, Python between kernels).

A request with ``deadline_s`` that no slot can meet is refused at submit, not queued, so its
client can go elsewhere now rather than learn it at the deadline (``Forecast.refuse``). The
warm-up's first steps compile kernels: after it the pace restarts from its last step.
"""

from __future__ import annotations

from edgebox.engine.queued import Queued
from edgebox.engine.request import DeadlineError
from edgebox.engine.scheduler import steps_until_start
from edgebox.engine.sequence import Sequence
from edgebox.hw.step import Step

PACE_GAIN = 0.2  # how fast the measured/priced step-time ratio follows the steps


class Forecast:
    """The pace of one engine's steps (update under the engine's lock) and the waits it implies."""

    def __init__(self, box):
        self.box = box
        self.pace = self.last_pace = 1.0  # engine-clock seconds per priced device second of a step

    def observe(self, elapsed_s: float, priced_s: float) -> None:
        """A step took ``elapsed_s`` on the engine's clock for ``priced_s`` of device time."""
        if priced_s > 0:
            self.last_pace = elapsed_s / priced_s
            self.pace += PACE_GAIN * (self.last_pace - self.pace)

    def restart(self) -> None:
        """Forget every step but the last (the warm-up's first steps compiled kernels)."""
        self.pace = self.last_pace

    def wait_s(self, running: list[Sequence], queue: list[Queued], rank: int, *, batch_limit: int, prefill_chunk: int) -> float:
        """Seconds (engine clock) before a request of class ``rank`` submitted now would start."""
        steps = steps_until_start(running, queue, rank, batch_limit=batch_limit, prefill_chunk=prefill_chunk)
        if steps == 0:
            return 0.0
        active = [s for s in running if not s.paused] or [None]
        batch = min(max(len(active), 1), batch_limit)
        context = max(1, int(sum(s.kv.length for s in active if s is not None) / len(active)))
        priced = float(self.box.accounting.cost(Step.decode(batch, context), self.box.firmware).step_s[0])
        return steps * priced * self.pace

    def refuse(self, entries: list[Queued], running: list[Sequence], queue: list[Queued], **limits) -> None:
        """Raise ``DeadlineError`` for the first of ``entries`` (joining ``queue`` in this order)
        whose ``deadline_s`` the forecast says cannot be met; ``limits``: as ``wait_s``."""
        for i, q in enumerate(entries):
            deadline = q.handle.request.deadline_s
            if deadline is None:
                continue
            wait = self.wait_s(running, queue + entries[:i], q.rank, **limits)
            if wait > deadline:
                raise DeadlineError(
                    f"request {q.handle.request_id} cannot start within deadline_s {deadline:g}: "
                    f"the box predicts room for it in {wait:.1f} s; retry then or raise the deadline",
                    retry_after_s=round(wait, 3),
                )
