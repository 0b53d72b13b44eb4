"""The engine: many concurrent requests over one model, with continuous batching.

One scheduler thread owns the model. Each step it asks ``scheduler.schedule`` for a plan and
``engine.runner`` carries it out: cancelled requests leave, queued ones join, the step is priced
on the chips (real or dry run alike) and computed, and every sequence that got logits samples,
streams and may end. Requests join and leave at token granularity; the weights are read once per
step for all sequences, which is where batching earns its throughput. ``engine.forecast``
predicts when a queued request would start (deadlines); ``engine.warmup`` warms the engine up.

``submit`` from any thread; no thread busy-waits (the scheduler sleeps on a condition when there
is no work).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edgebox.api import Model
from edgebox.engine.forecast import Forecast
from edgebox.engine.queued import Queued
from edgebox.engine.request import PRIORITIES, EngineStats, Event, Handle, QueueFullError, Request, Summary
from edgebox.engine.runner import Runner
from edgebox.engine.scheduler import StepPlan, schedule
from edgebox.engine.speculative import Speculative
from edgebox.engine.warmup import warm_up
from edgebox.errors import EdgeboxError


class Engine:
    """Serve many requests on one model. ``Engine(model)`` starts its scheduler thread and, unless
    ``warmup=False``, runs a warm-up request first (hot standby: the first real request then costs
    what any other does)."""

    def __init__(
        self,
        model: Model,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        kv_budget_bytes: int | None = None,
        prefill_chunk: int = 128,
        prompt_cache_entries: int = 4,
        warmup: bool = True,
        dry_run: bool = False,
        speculative: Speculative | None = None,
        draft_model: Model | None = None,
    ):
        """``speculative``: drafts to verify (``engine.speculative``; None: none); ``draft_model``
        the loaded model its kind "draft" drafts with (same tokenizer, else refused)."""
        self.model = model
        self.speculative = speculative or Speculative()
        # dry run: the scheduler, chips, firmware and governor run, the math does not (power
        # experiments in device time)
        self.dry_run = dry_run
        self._step_listeners: list[Callable[[Engine], None]] = []
        self.kv_bytes_per_token = model.box.kv_bytes_per_token
        self.kv_budget_bytes = (
            kv_budget_bytes if kv_budget_bytes is not None else max_batch * model.n_ctx * self.kv_bytes_per_token
        )
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._batch_limit = max_batch
        self._cond = threading.Condition()
        self._stopping, self._drain = False, True
        self.warmup_s = 0.0
        self._quiet = threading.Event()  # set while idle with the listeners told so
        self._quiet.set()
        # the engine's clock: wall time, or in a dry run the chips' device time (what a power
        # experiment measures); timings, deadlines and the idle gaps the chips are charged for
        self.clock = (lambda: model.box.clock_s) if dry_run else time.perf_counter
        r = self._runner = Runner(model, self._cond, prompt_cache_entries, dry_run, self.clock, self.speculative, draft_model)
        self._queue, self._running, self._prompt_cache = r.queue, r.running, r.prompt_cache  # the runner's; read under the lock
        self._forecast = Forecast(model.box)
        self._thread = threading.Thread(target=self._run, name="edgebox-engine", daemon=True)
        self._thread.start()
        if warmup and not dry_run:
            self.warmup_s = warm_up(self)

    # -- public ---------------------------------------------------------------------------------
    @property
    def batch_limit(self) -> int:
        return self._batch_limit

    @batch_limit.setter
    def batch_limit(self, n: int) -> None:
        """How many sequences decode per step; lowering it lets running sequences finish first."""
        with self._cond:
            self._batch_limit = max(1, int(n))
            self._cond.notify_all()

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue a request. Raises (before queueing) ``ContextOverflowError`` for a prompt that
        cannot fit, ``KVBudgetError`` if it can never fit in the KV budget, ``QueueFullError``."""
        return self.submit_many([request], on_event)[0]

    def submit_many(self, requests: list[Request], on_event: Callable[[Event], None] | None = None) -> list[Handle]:
        """Queue several requests at once: the scheduler sees all of them at its next step (a
        burst arriving together is admitted together, not split by the moment the scheduler
        wakes). Raises as ``submit`` before queueing any of them."""
        entries = [
            Queued.prepare(self.model, Handle(r, on_event, self._wake), self.kv_budget_bytes, self.kv_bytes_per_token)
            for r in requests
        ]
        with self._cond:
            if self._stopping:
                raise EdgeboxError("the engine is shutting down")
            if len(self._queue) + len(entries) > self.max_queue:
                raise QueueFullError(
                    f"{len(self._queue)} requests are already waiting (max_queue {self.max_queue}); try again later"
                )
            # a deadline no slot can meet is refused now, not queued (engine.forecast)
            self._forecast.refuse(entries, self._running, list(self._queue), **self._limits())
            now = self.clock()
            for q in entries:
                q.t_submit = now
                self._queue.append(q)
            self._cond.notify_all()
        return [q.handle for q in entries]

    def predicted_wait_s(self, priority: str = "interactive") -> float:
        """Seconds (engine clock) before a request of ``priority`` submitted now would start, by
        the cost model scaled by the measured pace of the steps (``engine.forecast``)."""
        with self._cond:
            return self._predicted_wait_s(PRIORITIES.index(priority), list(self._queue))

    @property
    def work_class(self) -> str | None:
        """What the engine serves now: "interactive" if any interactive request is running or
        queued, "batch" if only batch work is, None when idle (the governor's mode: batch-only
        work runs at the most energy-efficient clock and batch)."""
        with self._cond:
            work = [q.handle.request.priority for q in self._queue] + [s.request.priority for s in self._running]
        return None if not work else "interactive" if "interactive" in work else "batch"

    def add_step_listener(self, fn: Callable[[Engine], None]) -> None:
        """Call ``fn(engine)`` on the scheduler thread after every step, and once more when the
        last request ends and the engine goes idle (the governor's hook: it reads sensors in
        device time and turns the knobs between steps; idle, it parks the clocks)."""
        self._step_listeners.append(fn)

    def generate(self, request: Request) -> Summary:
        """Submit and wait (convenience for scripts and tests)."""
        return self.submit(request).result()

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                running=len(self._running),
                queued=len(self._queue),
                batch_limit=self._batch_limit,
                kv_used_bytes=sum(s.kv.nbytes for s in self._running) + self._prompt_cache.nbytes,
                kv_budget_bytes=self.kv_budget_bytes,
                tokens_per_s=self._runner.rate.per_s(),
                steps=self._runner.steps,
                generated_tokens=self._runner.generated,
                energy_j=self.model.box.accounting.step_j,
                idle_energy_j=self.model.box.accounting.idle_j,
            )

    def load(self) -> tuple[int, int, list[tuple[int, int]]]:
        """(running, queued, the next step's cost: (rows, context after the step) per segment, []
        when it will not step) from the very plan the next step carries out, so exact between
        steps (a step listener) unless something is submitted or cancelled before it starts."""
        with self._cond:
            return len(self._running), len(self._queue), list(self._plan().cost)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the scheduler. ``drain``: finish running and queued requests first; otherwise
        cancel them (each still gets its final summary)."""
        with self._cond:
            self._stopping, self._drain = True, drain
            self._cond.notify_all()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=False)

    # -- scheduler thread ---------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _plan(self) -> StepPlan:
        return schedule(
            self._running,
            self._queue,
            self._prompt_cache,
            batch_limit=self._batch_limit,
            prefill_chunk=self.prefill_chunk,
            kv_budget_bytes=self.kv_budget_bytes,
            kv_bytes_per_token=self.kv_bytes_per_token,
            now=self.clock(),
        )

    def _limits(self) -> dict:
        return {"batch_limit": self._batch_limit, "prefill_chunk": self.prefill_chunk}

    def _predicted_wait_s(self, rank: int, queue: list[Queued]) -> float:
        """(under the lock) See ``predicted_wait_s``."""
        return self._forecast.wait_s(self._running, queue, rank, **self._limits())

    def _run(self) -> None:
        while True:
            with self._cond:
                idle = not self._stopping and not self._queue and not self._running
            if idle and not self._quiet.is_set():
                # the last work ended (finished or cancelled): one more call lets the governor
                # see an idle engine and park the clocks, as no step will call it until new work
                self._tell_listeners()
                self._quiet.set()
                self._runner.idle_since = time.perf_counter()
                continue
            with self._cond:
                while not self._stopping and not self._queue and not self._running:
                    self._cond.wait()
                self._quiet.clear()
                self._runner.charge_idle()
                if self._stopping and not self._drain:
                    self._runner.abort_all()
                    return
                if self._stopping and not self._queue and not self._running:
                    return
                plan = self._plan()
                joined = self._runner.admit(plan, lambda q: self._predicted_wait_s(q.rank, list(self._queue)))
                batch = list(self._running)
            try:
                self._step(plan, joined)
            except Exception as e:  # a failed step fails its sequences, never the engine
                for s in batch:
                    if s in self._running:
                        self._runner.finish(s, "error", error=f"{type(e).__name__}: {e}")

    def _step(self, plan: StepPlan, joined: list) -> None:
        ran = self._runner.step(plan, joined)
        if ran is None:
            return
        with self._cond:
            self._forecast.observe(*ran)  # the engine's clock against the cost model's
        self._tell_listeners()

    def _tell_listeners(self) -> None:
        for fn in self._step_listeners:  # (scheduler thread)
            fn(self)

    def forget_warm_up(self) -> None:
        """(``engine.warmup``, its requests done) The engine as if they had never run."""
        # the scheduler is quiet when this returns: a listener added next never races its idle call
        self._quiet.wait(5.0)
        with self._cond:
            self._runner.forget()
            self._forecast.restart()  # the warm-up's first steps compiled kernels: forget them
