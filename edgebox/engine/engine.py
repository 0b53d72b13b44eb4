"""The engine: many concurrent requests over one model, with continuous batching.

One scheduler thread owns the model. Each step it asks ``scheduler.schedule`` for a plan, then
carries it out: cancelled requests leave, queued ones join, the step's forward pass is charged to
the chips (``Box.account_step``, real or dry run alike) and, unless this is a dry run, computed;
then every sequence that got logits samples, streams its text and may finish (the rules of its
end are ``text.generation.Completion``'s). Constrained and free sequences share steps; the
constrained ones' grammar masks are computed while the forward pass runs (``engine.masks``). Requests join and leave at token granularity; the
weights are read once per step for all sequences, which is where batching earns its throughput.
With ``speculative`` on, each decoding sequence gets a draft after every step and the next step
verifies it in the same batch (``engine.speculative``).

``submit`` from any thread; no thread busy-waits (the scheduler sleeps on a condition when there
is no work).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from edgebox.api import Model
from edgebox.engine.energy import EnergyBook
from edgebox.engine.masks import MaskWorker
from edgebox.engine.request import (
    PRIORITIES,
    DeadlineError,
    EngineStats,
    Event,
    Handle,
    Queued,
    QueueFullError,
    Request,
    Summary,
    TokenRate,
)
from edgebox.engine.scheduler import PromptCache, StepPlan, schedule, steps_until_start
from edgebox.engine.sequence import Sequence
from edgebox.engine.speculative import Speculative, drafter
from edgebox.errors import EdgeboxError
from edgebox.hw.step import Step
from edgebox.model.kv_cache import step_cost
from edgebox.text.grammar import GrammarError
from edgebox.text.sampler import NonFiniteLogitsError, SamplingParams

RATE_WINDOW_S = 5.0  # EngineStats.tokens_per_s looks back this far
PACE_GAIN = 0.2  # how fast the measured/priced step-time ratio follows the steps


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
        self._drafter = drafter(self.speculative, model, draft_model)
        # dry run: the scheduler, chips, firmware and governor run, the math does not (power
        # experiments in device time); every sequence "generates" one fixed ordinary token
        self.dry_run = dry_run
        self._dry_token = next(i for i in range(model.args.n_vocab) if i not in model.tokenizer.eog_ids)
        self._step_listeners: list[Callable[[Engine], None]] = []
        self.kv_bytes_per_token = model.box.kv_bytes_per_token
        self.kv_budget_bytes = (
            kv_budget_bytes if kv_budget_bytes is not None else max_batch * model.n_ctx * self.kv_bytes_per_token
        )
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._batch_limit = max_batch
        self._queue: deque[Queued] = deque()
        self._running: list[Sequence] = []
        self._prompt_cache = PromptCache(prompt_cache_entries)
        self._cond = threading.Condition()
        self._stopping = False
        self._drain = True
        self._steps = 0
        self._generated = 0
        self._rate = TokenRate(RATE_WINDOW_S)
        self._energy = EnergyBook(model.box.accounting)
        self.warmup_s = 0.0
        self._quiet = threading.Event()  # set while idle with the listeners told so
        self._quiet.set()
        self._masks = MaskWorker()
        # the engine's clock: wall time, or in a dry run the chips' device time (what a power
        # experiment measures); timings, deadlines and the idle gaps the chips are charged for
        self.clock = (lambda: model.box.clock_s) if dry_run else time.perf_counter
        self._pace = self._last_pace = 1.0  # engine-clock seconds per priced device second of a step (1 in a dry run)
        self._idle_since: float | None = None  # wall time the engine went idle (chips idle meanwhile)
        self._thread = threading.Thread(target=self._run, name="edgebox-engine", daemon=True)
        self._thread.start()
        if warmup and not dry_run:
            self._warm_up()

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
            for i, q in enumerate(entries):  # a deadline no slot can meet is refused now, not queued (engine.scheduler)
                deadline = q.handle.request.deadline_s
                if deadline is None:
                    continue
                wait = self._predicted_wait_s(q.rank, list(self._queue) + entries[:i])
                if wait > deadline:
                    raise DeadlineError(
                        f"request {q.handle.request_id} cannot start within deadline_s {deadline:g}: "
                        f"the box predicts room for it in {wait:.1f} s; retry then or raise the deadline",
                        retry_after_s=round(wait, 3),
                    )
            now = self.clock()
            for q in entries:
                q.t_submit = now
                self._queue.append(q)
            self._cond.notify_all()
        return [q.handle for q in entries]

    def predicted_wait_s(self, priority: str = "interactive") -> float:
        """Seconds (engine clock) before a request of ``priority`` submitted now would start, by
        the cost model: ``scheduler.steps_until_start`` x the price of a decode step at the
        chips' current clocks, scaled by the measured ratio of step time to price."""
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
                tokens_per_s=self._rate.per_s(),
                steps=self._steps,
                generated_tokens=self._generated,
                energy_j=self._energy.accounting.step_j,
                idle_energy_j=self._energy.accounting.idle_j,
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
            self._masks.close()

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

    def _predicted_wait_s(self, rank: int, queue: list[Queued]) -> float:
        """(under the lock) See ``predicted_wait_s``."""
        steps = steps_until_start(self._running, queue, rank, batch_limit=self._batch_limit, prefill_chunk=self.prefill_chunk)
        if steps == 0:
            return 0.0
        active = [s for s in self._running if not s.paused] or [None]
        batch = min(max(len(active), 1), self._batch_limit)
        context = max(1, int(sum(s.kv.length for s in active if s is not None) / len(active)))
        box = self.model.box
        priced = float(box.accounting.cost(Step.decode(batch, context), box.firmware).step_s[0])
        return steps * priced * self._pace

    def _run(self) -> None:
        while True:
            with self._cond:
                idle = not self._stopping and not self._queue and not self._running
            if idle and not self._quiet.is_set():
                # the last work ended (finished or cancelled): one more call lets the governor
                # see an idle engine and park the clocks, as no step will call it until new work
                self._tell_listeners()
                self._quiet.set()
                self._idle_since = time.perf_counter()
                continue
            with self._cond:
                while not self._stopping and not self._queue and not self._running:
                    self._cond.wait()
                self._quiet.clear()
                self._charge_idle()
                if self._stopping and not self._drain:
                    self._abort_all()
                    return
                if self._stopping and not self._queue and not self._running:
                    return
                plan = self._plan()
                joined = self._admit(plan)
                batch = list(self._running)
            try:
                self._step(plan, joined)
            except Exception as e:  # a failed step fails its sequences, never the engine
                for s in batch:
                    if s in self._running:
                        self._finish(s, "error", error=f"{type(e).__name__}: {e}")

    def _charge_idle(self) -> None:
        """The chips idled (clock-gated) while the engine had no work: charge them that wall time
        as idle device time, booked to no request (a dry run's clock is device time: nothing to do)."""
        since, self._idle_since = self._idle_since, None
        if since is not None and not self.dry_run:
            box = self.model.box
            box.idle_until(box.clock_s + (time.perf_counter() - since))

    def _abort_all(self) -> None:
        for s in list(self._running):
            self._finish(s, "cancelled")
        while self._queue:
            q = self._queue.popleft()
            q.handle._emit(q.cancelled_summary(self.clock()))

    def _admit(self, plan: StepPlan) -> list[tuple[Sequence, int]]:
        """The plan's queue changes (under the lock): cancelled requests leave, cached prompts are
        evicted, the admitted join the batch. Returns the joined sequences' prompt chunks."""
        now = self.clock()
        for q in plan.dropped:
            self._queue.remove(q)
            q.handle._emit(q.cancelled_summary(now))
        for q in plan.expired:
            self._queue.remove(q)
            retry = self._predicted_wait_s(q.rank, list(self._queue))
            q.handle._emit(q.refused_summary(now, round(retry, 3)))
        for _ in range(plan.evicted):
            self._prompt_cache.popleft()
        for s in plan.paused:
            s.paused = True
        for s in plan.resumed:
            s.paused = False
        joined = []
        for a in plan.admitted:
            self._queue.remove(a.queued)
            kv = self.model.new_cache(a.queued.reserved)
            if a.prefix_from is not None:
                kv.copy_prefix(a.prefix_from, a.cached)  # a copy costs far less than its prefill
            s = Sequence(a.queued, kv, self.model.tokenizer, self.dry_run, self.clock)
            self._running.append(s)
            if a.rows:
                joined.append((s, a.rows))
        return joined

    def _step(self, plan: StepPlan, joined: list[tuple[Sequence, int]]) -> None:
        for s in plan.cancelled:
            self._finish(s, "cancelled")
        for s in plan.shift:
            s.shift_context(self.model.args)
        # (sequence, rows) in the step's order; a decode's rows are its pending token and draft
        work = list(zip(plan.decode, plan.decode_rows)) + list(plan.prefill) + joined
        segments = [s.segment(n) for s, n in work]
        if not segments:
            return
        # grammar masks of the sequences that sample after this step, computed during the math
        masks = self._masks.start(s for s, n in work if s.samples_after(n))
        # the chips' device time, then the math (a dry run only moves the caches on)
        t0 = self.clock()
        priced = self.model.box.account_step(*step_cost(segments))
        self._energy.charge([s for s, _ in work], segments)
        if self.dry_run:
            for seg in segments:
                seg.kv.length += len(seg.tokens)
            logits = [None] * len(segments)
        else:
            logits = self.model.transformer.forward_segments(segments)
        bitmasks = masks.wait()

        # every sequence with a next token samples it, shows its text and may end
        produced = 0
        for (s, n), rows in zip(work, logits):
            s.advance(n)
            if not s.prefilling:
                before = len(s.completion.tokens)
                try:
                    reason = s.next_tokens(rows, self._dry_token, bitmasks.get(s))
                except (NonFiniteLogitsError, GrammarError) as e:  # this sequence's logits or grammar: the others go on
                    self._finish(s, "error", error=str(e))
                    continue
                if reason is not None:
                    self._finish(s, reason)
                produced += max(1, len(s.completion.tokens) - before)
        if self._drafter is not None:  # the next step's drafts, before the plan that prices them
            drafting = [s for s in self._running if s.pending is not None and not s.prefilling and not s.paused and s.can_draft]
            try:
                self._drafter.propose(drafting)
            except Exception:  # a draft is only a guess: without one the sequences decode as usual
                for s in drafting:
                    s.draft = []
                    self._drafter.forget(s)
        with self._cond:
            self._steps += 1
            self._generated += produced
            self._rate.add(produced)
            if priced > 0:  # the engine's clock against the cost model's, for deadline predictions
                self._last_pace = (self.clock() - t0) / priced
                self._pace += PACE_GAIN * (self._last_pace - self._pace)
        self._tell_listeners()

    def _tell_listeners(self) -> None:
        for fn in self._step_listeners:
            fn(self)

    def _finish(self, s: Sequence, reason: str, error: str | None = None) -> None:
        if s not in self._running:
            return
        s.end(reason, error)
        if self._drafter is not None:
            self._drafter.forget(s)
        with self._cond:
            self._running.remove(s)
            if reason in ("stop", "length") and not s.shifted:
                self._prompt_cache.remember(s.ids + s.completion.tokens, s.kv)
            self._cond.notify_all()
        s.handle._emit(self._energy.finish(s, s.summary(reason, error)))

    def _warm_up(self) -> None:
        """Hot standby: repack the weights, compile and touch every code path once (prefill chunk,
        batched decode, a lone sequence's decode)."""
        t0 = time.perf_counter()
        self.model.prepare()
        greedy = SamplingParams(temperature=0.0)
        ids = self.model.tokenize(" warm up the engine " * 4, add_bos=False)[: max(1, self.model.n_ctx // 4)]
        prompt = self.model.detokenize(ids)
        limit, self.max_queue = self.max_queue, max(self.max_queue, 2)  # a queue of 1 must not refuse the warm-up's pair
        try:
            handles = [self.submit(Request(prompt=prompt, max_tokens=3, params=greedy)) for _ in range(2)]
            for h in handles:
                h.result()
            # and one alone: a lone sequence's decode runs the one-call blocks (kernels.fused)
            self.submit(Request(prompt=prompt, max_tokens=3, params=greedy)).result()
        finally:
            self.max_queue = limit
        # the scheduler is quiet when this returns: a listener added next never races its idle call
        self._quiet.wait(5.0)
        with self._cond:
            self._prompt_cache.clear()
            self._rate.clear()
            self._pace = self._last_pace  # the warm-up's first steps compiled kernels: forget them
            self._steps = self._generated = 0
        self.warmup_s = time.perf_counter() - t0
