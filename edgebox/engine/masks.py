"""Grammar masks computed while the chips run the forward pass.

A constrained sequence's next-token mask depends only on the tokens it has taken, all known when
a step starts, so the engine starts the step's masks (``StepMasks.start``) before the forward pass
and collects them (``wait``) when the logits are there. The work runs on one helper thread that
calls llguidance's parallel mask fill, which drops the GIL throughout; the forward pass runs numba
kernels that drop it too (``nogil``), on the chip threads, so the two overlap on separate cores.
One ``MaskWorker`` per engine: its thread and llguidance's pool start once.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from llguidance import LLExecutor

from edgebox.text.grammar import fill_bitmasks


class MaskWorker:
    """The helper thread (and llguidance's thread pool of ``threads``) that fills masks."""

    def __init__(self, threads: int = 1):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgebox-masks")
        self._llexec = LLExecutor(num_threads=threads)

    def start(self, sequences: Iterable) -> StepMasks:
        """Begin the masks of ``sequences`` (those with a matcher); returns at once."""
        constrained = [s for s in sequences if s.matcher is not None]
        if not constrained:
            return StepMasks([], None)
        matchers = [s.matcher for s in constrained]
        return StepMasks(constrained, self._pool.submit(fill_bitmasks, self._llexec, matchers))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class StepMasks:
    """One step's masks in the making: ``wait()`` -> {sequence: int32 bitmask row}."""

    def __init__(self, sequences: list, future: Future | None):
        self._sequences, self._future = sequences, future

    def wait(self) -> dict:
        if self._future is None:
            return {}
        rows: np.ndarray = self._future.result()
        return dict(zip(self._sequences, rows))
