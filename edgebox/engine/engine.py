"""The engine: many concurrent requests over one model, with continuous batching.

One scheduler thread owns the model. Each step it asks ``scheduler.schedule`` for a plan, then
carries it out: cancelled requests leave, queued ones join, the step's forward pass is charged to
the chips (``Box.account_step``, real or dry run alike) and, unless this is a dry run, computed;
then every sequence that got logits samples, streams its text and may finish (the rules of its
end are ``text.generation.Completion``'s). Requests join and leave at token granularity; the
weights are read once per step for all sequences, which is where batching earns its throughput.

``submit`` from any thread; no thread busy-waits (the scheduler sleeps on a condition when there
is no work).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from edgebox.api import Model
from edgebox.engine.request import (Event, Handle, KVBudgetError, Queued, QueueFullError, Request, Summary,
                                    prompt_ids, reservation)
from edgebox.engine.scheduler import StepPlan, schedule
from edgebox.engine.sequence import Sequence
from edgebox.errors import EdgeboxError
from edgebox.model.kv_cache import KVCache, step_cost
from edgebox.text.sampler import SamplingParams

RATE_WINDOW_S = 5.0  # EngineStats.tokens_per_s looks back this far


@dataclass
class EngineStats:
    running: int
    queued: int
    batch_limit: int
    kv_used_bytes: int
    kv_budget_bytes: int
    tokens_per_s: float  # generated tokens per second over the last few seconds
    steps: int
    generated_tokens: int


class Engine:
    """Serve many requests on one model. ``Engine(model)`` starts its scheduler thread and, unless
    ``warmup=False``, runs a warm-up request first (hot standby: the first real request then costs
    what any other does)."""

    def __init__(self, model: Model, *, max_batch: int = 8, max_queue: int = 64,
                 kv_budget_bytes: int | None = None, prefill_chunk: int = 128,
                 prompt_cache_entries: int = 4, warmup: bool = True, dry_run: bool = False):
        self.model = model
        # dry run: the scheduler, chips, firmware and governor run, the math does not (power
        # experiments in device time); every sequence "generates" one fixed ordinary token
        self.dry_run = dry_run
        self._dry_token = next(i for i in range(model.args.n_vocab) if i not in model.tokenizer.eog_ids)
        self._step_listeners: list[Callable[["Engine"], None]] = []
        self.kv_bytes_per_token = model.box.kv_bytes_per_token
        self.kv_budget_bytes = kv_budget_bytes if kv_budget_bytes is not None else max_batch * model.n_ctx * self.kv_bytes_per_token
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prompt_cache_entries = prompt_cache_entries
        self._batch_limit = max_batch
        self._queue: deque[Queued] = deque()
        self._running: list[Sequence] = []
        self._prompt_cache: deque[tuple[list[int], KVCache]] = deque()  # finished sequences, most recent last
        self._cond = threading.Condition()
        self._stopping = False
        self._drain = True
        self._steps = 0
        self._generated = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.warmup_s = 0.0
        self._quiet = threading.Event()  # set while idle with the listeners told so
        self._quiet.set()
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
        entries = []
        for request in requests:
            ids, thinking_open, truncated = prompt_ids(self.model, request)
            reserved = reservation(request, len(ids), self.model.n_ctx)
            need = reserved * self.kv_bytes_per_token
            if need > self.kv_budget_bytes:
                raise KVBudgetError(f"request needs {need / 2**20:.0f} MiB of KV cache, the budget is {self.kv_budget_bytes / 2**20:.0f} MiB; lower max_tokens or raise the KV budget")
            entries.append(Queued(Handle(request, on_event, self._wake), ids, reserved, thinking_open, truncated))
        with self._cond:
            if self._stopping:
                raise EdgeboxError("the engine is shutting down")
            if len(self._queue) + len(entries) > self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting (max_queue {self.max_queue}); try again later")
            now = time.perf_counter()
            for q in entries:
                q.t_submit = now
                self._queue.append(q)
            self._cond.notify_all()
        return [q.handle for q in entries]

    def add_step_listener(self, fn: Callable[["Engine"], None]) -> None:
        """Call ``fn(engine)`` on the scheduler thread after every step, and once more when the
        last request ends and the engine goes idle (the governor's hook: it reads sensors in
        device time and turns the knobs between steps; idle, it parks the clocks)."""
        self._step_listeners.append(fn)

    def generate(self, request: Request) -> Summary:
        """Submit and wait (convenience for scripts and tests)."""
        return self.submit(request).result()

    def stats(self) -> EngineStats:
        with self._cond:
            now = time.perf_counter()
            recent = [(t, n) for t, n in self._recent if now - t < RATE_WINDOW_S]
            span = now - recent[0][0] if recent else 0.0
            return EngineStats(
                running=len(self._running), queued=len(self._queue), batch_limit=self._batch_limit,
                kv_used_bytes=self._kv_used(), kv_budget_bytes=self.kv_budget_bytes,
                tokens_per_s=sum(n for _, n in recent) / span if span > 0.5 else 0.0,
                steps=self._steps, generated_tokens=self._generated)

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

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=False)

    # -- scheduler thread ---------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _kv_used(self) -> int:
        return sum(s.kv.nbytes for s in self._running) + sum(kv.nbytes for _, kv in self._prompt_cache)

    def _plan(self) -> StepPlan:
        return schedule(self._running, self._queue, self._prompt_cache, batch_limit=self._batch_limit,
                        prefill_chunk=self.prefill_chunk, kv_budget_bytes=self.kv_budget_bytes,
                        kv_bytes_per_token=self.kv_bytes_per_token)

    def _run(self) -> None:
        while True:
            with self._cond:
                idle = not self._stopping and not self._queue and not self._running
            if idle and not self._quiet.is_set():
                # the last work ended (finished or cancelled): one more call lets the governor
                # see an idle engine and park the clocks, as no step will call it until new work
                self._tell_listeners()
                self._quiet.set()
                continue
            with self._cond:
                while not self._stopping and not self._queue and not self._running:
                    self._cond.wait()
                self._quiet.clear()
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

    def _abort_all(self) -> None:
        for s in list(self._running):
            self._finish(s, "cancelled")
        while self._queue:
            q = self._queue.popleft()
            q.handle._emit(q.cancelled_summary())

    def _admit(self, plan: StepPlan) -> list[tuple[Sequence, int]]:
        """The plan's queue changes (under the lock): cancelled requests leave, cached prompts are
        evicted, the admitted join the batch. Returns the joined sequences' prompt chunks."""
        for q in plan.dropped:
            self._queue.remove(q)
            q.handle._emit(q.cancelled_summary())
        for _ in range(plan.evicted):
            self._prompt_cache.popleft()
        joined = []
        for a in plan.admitted:
            self._queue.popleft()  # the admitted are the head of the queue, in order
            kv = self.model.new_cache(a.queued.reserved)
            if a.prefix_from is not None:
                kv.copy_prefix(a.prefix_from, a.cached)  # a copy costs far less than its prefill
            s = Sequence(a.queued, kv, self.model.tokenizer)
            self._running.append(s)
            if a.rows:
                joined.append((s, a.rows))
        return joined

    def _step(self, plan: StepPlan, joined: list[tuple[Sequence, int]]) -> None:
        for s in plan.cancelled:
            self._finish(s, "cancelled")
        for s in plan.shift:
            s.shift_context(self.model.args)
        prefill = list(plan.prefill) + joined
        segments = [s.decode_segment() for s in plan.decode] + [s.prompt_segment(n) for s, n in prefill]
        if not segments:
            return
        # the chips' device time, then the math (a dry run only moves the caches on)
        self.model.box.account_step(*step_cost(segments))
        if self.dry_run:
            for seg in segments:
                seg.kv.length += len(seg.tokens)
            logits = [None] * len(segments)
        else:
            logits = self.model.transformer.forward_segments(segments)

        produced = 0
        for s, row in zip(plan.decode, logits):
            s.next_pos += 1
            self._sample(s, row)
            produced += 1
        for (s, n), row in zip(prefill, logits[len(plan.decode):]):
            s.n_done += n
            s.next_pos += n
            if not s.prefilling:
                self._sample(s, row)
                produced += 1
        with self._cond:
            self._steps += 1
            self._generated += produced
            now = time.perf_counter()
            self._recent.append((now, produced))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()
        self._tell_listeners()

    def _tell_listeners(self) -> None:
        for fn in self._step_listeners:
            fn(self)

    def _sample(self, s: Sequence, row) -> None:
        """The sequence's next token from its logits row [1, V] (a dry run's fixed token for None)."""
        if s.t_first == 0.0:
            s.t_first = time.perf_counter()
        token = self._dry_token if row is None else s.completion.sample(row[0])
        text = s.completion.push(token)
        if not self.dry_run:  # a dry run makes no text
            s.emit(text)
        if s.completion.done_reason is not None:
            return self._finish(s, s.completion.done_reason)
        if s.context_full and not s.request.context_shift:
            return self._finish(s, "length")
        s.pending = token

    def _finish(self, s: Sequence, reason: str, error: str | None = None) -> None:
        if s not in self._running:
            return
        if reason in ("length", "stop") and error is None and not self.dry_run:
            s.emit(s.completion.finish(reason))  # what the detokenizer and the stop matcher held
        s.flush_reasoning()
        with self._cond:
            self._running.remove(s)
            if reason in ("stop", "length") and not s.shifted and s.kv.length >= 4 and self.prompt_cache_entries:
                self._prompt_cache.append((s.ids + s.completion.tokens, s.kv))
                while len(self._prompt_cache) > self.prompt_cache_entries:
                    self._prompt_cache.popleft()
            self._cond.notify_all()
        s.handle._emit(s.summary(reason, error))

    def _warm_up(self) -> None:
        """Hot standby: repack the weights, compile and touch every code path once (prefill chunk,
        batched decode, a lone sequence's decode)."""
        t0 = time.perf_counter()
        self.model.prepare()
        greedy = SamplingParams(temperature=0.0)
        ids = self.model.tokenize(" warm up the engine " * 4, add_bos=False)[: max(1, self.model.n_ctx // 4)]
        prompt = self.model.detokenize(ids)
        handles = [self.submit(Request(prompt=prompt, max_tokens=3, params=greedy)) for _ in range(2)]
        for h in handles:
            h.result()
        # and one alone: a lone sequence's decode runs the one-call blocks (kernels.fused)
        self.submit(Request(prompt=prompt, max_tokens=3, params=greedy)).result()
        # the scheduler is quiet when this returns: a listener added next never races its idle call
        self._quiet.wait(5.0)
        with self._cond:
            self._prompt_cache.clear()
            self._recent.clear()
            self._steps = self._generated = 0
        self.warmup_s = time.perf_counter() - t0
