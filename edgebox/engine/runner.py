"""A step plan carried out: the requests in flight, and what each step does to them.

The runner owns the engine's queue, running sequences and prompt cache (the engine reads them
under its lock; the runner changes them under it, on the scheduler thread). Per step:

1. ``admit`` (under the lock): the plan's queue changes: cancelled and expired requests leave,
   cached prompts are evicted, sequences pause or resume, the admitted join with a KV cache of
   their reservation (a cached prefix copied in: a copy costs far less than its prefill);
2. ``step``: cancelled sequences end, full contexts shift; the grammar masks of the sequences
   that sample after the step start on their helper thread (``engine.masks``); the chips are
   charged the step's device time (``Box.account_step``, a dry run alike) and its energy is
   split among the sequences (``engine.energy``); the forward pass runs (a dry run only moves
   the caches on); every sequence that has read its prompt samples (one token, or 1..k + 1 with
   a draft), streams and may end (the rules are ``text.generation.Completion``'s); then the next
   step's drafts (``engine.speculative``).

One sequence's bad logits or grammar end it with an error; the others go on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from edgebox.api import Model
from edgebox.engine.energy import EnergyBook
from edgebox.engine.masks import MaskWorker
from edgebox.engine.queued import Queued
from edgebox.engine.scheduler import PromptCache, StepPlan
from edgebox.engine.sequence import Sequence
from edgebox.engine.speculative import Speculative, drafter, propose_drafts
from edgebox.model.kv_cache import step_cost
from edgebox.text.grammar import GrammarError
from edgebox.text.sampler import NonFiniteLogitsError

RATE_WINDOW_S = 5.0  # EngineStats.tokens_per_s looks back this far


class TokenRate:
    """Generated tokens per second over the last ``window_s`` seconds of steps."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps

    def add(self, tokens: int) -> None:
        now = time.perf_counter()
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()

    def per_s(self) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in self._recent if now - t < self.window_s]
        span = now - recent[0][0] if recent else 0.0
        return sum(n for _, n in recent) / span if span > 0.5 else 0.0

    def clear(self) -> None:
        self._recent.clear()


class Runner:
    """The scheduler thread's hands: one engine's requests in flight and its steps' math."""

    def __init__(
        self,
        model: Model,
        cond: threading.Condition,
        prompt_cache_entries: int,
        dry_run: bool,
        clock: Callable[[], float],
        speculative: Speculative,
        draft_model: Model | None,
    ):
        """``cond``: the engine's lock; ``clock``: the engine's clock; the rest as ``Engine``'s."""
        self.model, self.dry_run, self.clock = model, dry_run, clock
        self._cond = cond
        self.queue: deque[Queued] = deque()
        self.running: list[Sequence] = []
        self.prompt_cache = PromptCache(prompt_cache_entries)
        self.energy = EnergyBook(model.box.accounting)
        self.drafter = drafter(speculative, model, draft_model)
        # a dry run's sequences "generate" one fixed ordinary token
        self._dry_token = next(i for i in range(model.args.n_vocab) if i not in model.tokenizer.eog_ids)
        self._masks = MaskWorker()
        self.steps = self.generated = 0  # steps run and tokens produced (changed under the lock)
        self.rate = TokenRate(RATE_WINDOW_S)
        self.idle_since: float | None = None  # wall time the engine went idle (the chips idle meanwhile)

    def admit(self, plan: StepPlan, retry_s: Callable[[Queued], float]) -> list[tuple[Sequence, int]]:
        """The plan's queue changes (under the lock); ``retry_s(q)``: when an expired request may
        retry. Returns the joined sequences' prompt chunks."""
        now = self.clock()
        for q in plan.dropped:
            self.queue.remove(q)
            q.handle._emit(q.cancelled_summary(now))
        for q in plan.expired:
            self.queue.remove(q)
            q.handle._emit(q.refused_summary(now, round(retry_s(q), 3)))
        for _ in range(plan.evicted):
            self.prompt_cache.popleft()
        for s in plan.paused:
            s.paused = True
        for s in plan.resumed:
            s.paused = False
        joined = []
        for a in plan.admitted:
            self.queue.remove(a.queued)
            kv = self.model.new_cache(a.queued.reserved)
            if a.prefix_from is not None:
                kv.copy_prefix(a.prefix_from, a.cached)
            s = Sequence(a.queued, kv, self.model.tokenizer, self.dry_run, self.clock)
            self.running.append(s)
            if a.rows:
                joined.append((s, a.rows))
        return joined

    def step(self, plan: StepPlan, joined: list[tuple[Sequence, int]]) -> tuple[float, float] | None:
        """Run the plan's step. Returns (its seconds on the engine's clock, its priced device
        seconds), or None when it had no rows."""
        for s in plan.cancelled:
            self.finish(s, "cancelled")
        for s in plan.shift:
            s.shift_context(self.model.args)
        # (sequence, rows) in the step's order; a decode's rows are its pending token and draft
        work = list(zip(plan.decode, plan.decode_rows)) + list(plan.prefill) + joined
        segments = [s.segment(n) for s, n in work]
        if not segments:
            return None
        masks = self._masks.start(s for s, n in work if s.samples_after(n))
        t0 = self.clock()
        priced = self.model.box.account_step(*step_cost(segments))
        self.energy.charge([s for s, _ in work], segments)
        if self.dry_run:
            for seg in segments:
                seg.kv.length += len(seg.tokens)
            logits = [None] * len(segments)
        else:
            logits = self.model.transformer.forward_segments(segments)
        bitmasks = masks.wait()

        produced = 0
        for (s, n), rows in zip(work, logits):
            s.advance(n)
            if not s.prefilling:
                before = len(s.completion.tokens)
                try:
                    reason = s.next_tokens(rows, self._dry_token, bitmasks.get(s))
                except (NonFiniteLogitsError, GrammarError) as e:
                    self.finish(s, "error", error=str(e))
                    continue
                if reason is not None:
                    self.finish(s, reason)
                produced += max(1, len(s.completion.tokens) - before)
        propose_drafts(self.drafter, self.running)  # the next step's, before the plan that prices them
        elapsed = self.clock() - t0
        with self._cond:
            self.steps += 1
            self.generated += produced
            self.rate.add(produced)
        return elapsed, priced

    def finish(self, s: Sequence, reason: str, error: str | None = None) -> None:
        """``s`` leaves with its summary; a whole answer's cache is kept for prompts that share it."""
        if s not in self.running:
            return
        s.end(reason, error)
        if self.drafter is not None:
            self.drafter.forget(s)
        with self._cond:
            self.running.remove(s)
            if reason in ("stop", "length") and not s.shifted:
                self.prompt_cache.remember(s.ids + s.completion.tokens, s.kv)
            self._cond.notify_all()
        s.handle._emit(self.energy.finish(s, s.summary(reason, error)))

    def abort_all(self) -> None:
        """Every running and queued request ends cancelled (each with its summary)."""
        for s in list(self.running):
            self.finish(s, "cancelled")
        while self.queue:
            q = self.queue.popleft()
            q.handle._emit(q.cancelled_summary(self.clock()))

    def charge_idle(self) -> None:
        """The chips idled (clock-gated) since ``idle_since`` with no work: charge them that wall
        time as idle device time, booked to no request (a dry run's clock is device time: nothing to do)."""
        since, self.idle_since = self.idle_since, None
        if since is not None and not self.dry_run:
            box = self.model.box
            box.idle_until(box.clock_s + (time.perf_counter() - since))

    def forget(self) -> None:
        """(under the lock, nothing running) Forget the steps so far: counters, rate, cached prompts."""
        self.prompt_cache.clear()
        self.rate.clear()
        self.steps = self.generated = 0

    def close(self) -> None:
        self._masks.close()
