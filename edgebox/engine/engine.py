"""The engine: many concurrent requests over one model, with continuous batching.

One scheduler thread owns the model. Each step it
1. drops cancelled sequences and admits queued requests while the batch limit (a live knob the
   power governor turns) and the KV-cache budget allow;
2. builds one forward pass of segments: one decode token for every running sequence plus at most
   one prompt chunk (``prefill_chunk`` tokens) of a sequence still reading its prompt, so a long
   prompt never freezes the streams already running;
3. samples, streams text, and finishes sequences on EOS, stop strings, max tokens, context full,
   cancel or error.

Requests join and leave the batch at token granularity; the weights are read once per step for all
sequences (the matrix x matrix kernels), which is where batching earns its throughput.

Handles are thread-safe: ``submit`` from any thread, iterate the handle (or pass ``on_event``),
``handle.cancel()`` at any time. No thread busy-waits: the scheduler sleeps on a condition when
there is no work.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from edgebox.text.chat import ReasoningStream, split_reasoning, THINK_OPEN
from edgebox.errors import ContextOverflowError, EdgeboxError
from edgebox.api import Model
from edgebox.model import KVCache, Segment
from edgebox.text.sampler import Sampler, SamplingParams, StopMatcher


class QueueFullError(EdgeboxError):
    """Too many requests are waiting; try again later (HTTP/MQTT code 429)."""


class KVBudgetError(EdgeboxError):
    """A request needs more KV cache than the whole budget (code 413)."""


@dataclass(frozen=True)
class Request:
    prompt: str | None = None  # raw prompt text, or
    messages: tuple[dict, ...] | list[dict] | None = None  # chat messages through the GGUF chat template
    max_tokens: int = 128
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    context_shift: bool = False  # when the context fills: drop old tokens (keeping n_keep) instead of stopping
    n_keep: int = 0

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise EdgeboxError("a request needs exactly one of 'prompt' or 'messages'")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise EdgeboxError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.n_keep < 0:
            raise EdgeboxError(f"n_keep must be >= 0, got {self.n_keep}")


@dataclass(frozen=True)
class Chunk:
    request_id: str
    seq: int  # 0, 1, 2, ... per request
    text: str
    reasoning: bool = False  # DeepSeek-R1 <think> text (llama.cpp --reasoning-format deepseek)


@dataclass(frozen=True)
class Summary:
    """The final word on a request, like ollama's final response."""

    request_id: str
    done_reason: str  # stop | length | cancelled | error
    text: str  # everything generated (reasoning tags removed)
    content: str
    reasoning: str
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens reused from the prompt cache
    generated_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float = 0.0  # submit -> first token
    prompt_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    error: str | None = None
    prompt_truncated: int = 0  # tokens dropped from an over-long prompt (context_shift)

    @property
    def ok(self) -> bool:
        return self.done_reason != "error"

    @property
    def decode_tok_per_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.generated_tokens > 1 and self.decode_s > 0 else 0.0


Event = Chunk | Summary


class Handle:
    """One submitted request: iterate it for ``Chunk``s; ``summary`` once done."""

    def __init__(self, request: Request, on_event: Callable[[Event], None] | None):
        self.request = request
        self.request_id = request.request_id
        self.summary: Summary | None = None
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._on_event = on_event
        self._cancelled = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next scheduler step (milliseconds)."""
        self._cancelled.set()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            event = self._events.get()
            if isinstance(event, Summary):
                return
            yield event

    def text(self) -> str:
        """Wait for the end and return the whole generated text."""
        return self.result().text

    def result(self, timeout: float | None = None) -> Summary:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        return self.summary

    def _emit(self, event: Event) -> None:
        if isinstance(event, Summary):
            self.summary = event
        self._events.put(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a consumer's bug must not stop the scheduler
                pass
        if isinstance(event, Summary):
            self._done.set()


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


class _Sequence:
    """A request being served: its tokens, cache, sampler and output state."""

    def __init__(self, handle: Handle, ids: list[int], kv: KVCache, reserved: int, thinking_open: bool,
                 tokenizer, submitted: float, truncated: int):
        r = handle.request
        self.handle, self.request, self.ids, self.kv, self.reserved = handle, r, ids, kv, reserved
        self.n_done = kv.length  # prompt tokens already in the cache (prompt cache hit)
        self.cached = kv.length
        self.next_pos = kv.length
        self.sampler = Sampler(r.params)
        self.detok = tokenizer.stream_decoder()
        self.stops = StopMatcher(r.stop)
        self.reasoning = ReasoningStream(thinking_open)
        self.thinking_open = thinking_open
        self.generated: list[int] = []
        self.history: list[int] = list(ids)
        self.pending: int | None = None  # the sampled token to feed in the next decode step
        self.text: list[str] = []
        self.seq = 0
        self.shifted = False
        self.truncated = truncated
        self.t_submit, self.t_start, self.t_first = submitted, time.perf_counter(), 0.0

    @property
    def prefilling(self) -> bool:
        return self.n_done < len(self.ids)


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
        self._queue: deque[tuple[Handle, list[int], float, bool, int]] = deque()
        self._running: list[_Sequence] = []
        self._prompt_cache: deque[tuple[list[int], KVCache]] = deque()  # most recent last
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
            ids, thinking_open, truncated = self._prompt_ids(request)
            need = self._reservation(request, len(ids)) * self.kv_bytes_per_token
            if need > self.kv_budget_bytes:
                raise KVBudgetError(f"request needs {need / 2**20:.0f} MiB of KV cache, the budget is {self.kv_budget_bytes / 2**20:.0f} MiB; lower max_tokens or raise the KV budget")
            handle = Handle(request, on_event)
            handle._engine = self
            entries.append((handle, ids, thinking_open, truncated))
        with self._cond:
            if self._stopping:
                raise EdgeboxError("the engine is shutting down")
            if len(self._queue) + len(entries) > self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting (max_queue {self.max_queue}); try again later")
            now = time.perf_counter()
            for handle, ids, thinking_open, truncated in entries:
                self._queue.append((handle, ids, now, thinking_open, truncated))
            self._cond.notify_all()
        return [e[0] for e in entries]

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
            recent = [(t, n) for t, n in self._recent if now - t < 5.0]
            span = now - recent[0][0] if recent else 0.0
            return EngineStats(
                running=len(self._running), queued=len(self._queue), batch_limit=self._batch_limit,
                kv_used_bytes=self._kv_used(), kv_budget_bytes=self.kv_budget_bytes,
                tokens_per_s=sum(n for _, n in recent) / span if span > 0.5 else 0.0,
                steps=self._steps, generated_tokens=self._generated)

    def load(self) -> tuple[int, int, list[tuple[int, int]]]:
        """(running, queued, the next step's segments): what the scheduler holds now and what it
        will run next, as ``Box.account_step`` is charged for it: one (rows, context after the
        step) per sequence (decode rows first, then prompt chunks, oldest first; the step's
        logits are one per segment), [] when it will not step.  Cheap enough to call after every
        step (the power governor's feed-forward does).

        Exact when called between steps (a step listener) and nothing is submitted or cancelled
        before the next step starts: it replays ``_admit`` (FIFO while a slot and KV room last,
        cached prompts evicted oldest first, a cached prefix reused) and ``_step`` (cancelled
        sequences leave, context shifts, ``prefill_chunk`` rows of prompts per step)."""
        with self._cond:
            running = list(self._running)
            queue = list(self._queue)
            cache = [(ids, kv) for ids, kv in self._prompt_cache]
            limit, chunk = self._batch_limit, self.prefill_chunk
        n_running, n_queued = len(running), len(queue)
        # _admit: cancelled requests leave the queue; admit in order while a slot and KV room last
        used = sum(s.kv.nbytes for s in running)
        cache_bytes = sum(kv.nbytes for _, kv in cache)
        slots = limit - len(running)
        admitted: list[tuple[int, int]] = []            # (prompt tokens, cached prefix)
        for handle, ids, *_ in queue:
            if handle.cancelled:
                continue
            if slots <= 0:
                break
            need = self._reservation(handle.request, len(ids)) * self.kv_bytes_per_token
            while cache and used + cache_bytes + need > self.kv_budget_bytes:
                cache_bytes -= cache.pop(0)[1].nbytes
            if used + cache_bytes + need > self.kv_budget_bytes:
                break
            used += need
            slots -= 1
            reserved = self._reservation(handle.request, len(ids))
            best_n = 0
            for cached_ids, cached_kv in cache:
                best_n = max(best_n, _common_prefix(cached_ids, ids, min(cached_kv.length, len(ids) - 1, reserved)))
            admitted.append((len(ids), best_n if best_n >= 4 else 0))
        # _step: decode rows of the running (not cancelled) sequences, then prompt chunks
        decode: list[tuple[int, int]] = []
        reading: list[tuple[int, int]] = []             # (prompt tokens left, context before)
        for s in running:
            if s.handle.cancelled:
                continue
            if s.prefilling:
                reading.append((len(s.ids) - s.n_done, s.kv.length))
            elif s.pending is not None:
                length = s.kv.length
                if length + 1 > s.kv.n_ctx:             # _shift_context
                    length -= (length - min(s.request.n_keep, length // 2)) // 2
                decode.append((1, length + 1))
        reading += [(n - cached, cached) for n, cached in admitted]
        segments = decode
        budget = chunk
        for left, at in reading:
            if budget <= 0:
                break
            n = min(budget, left)
            segments.append((n, at + n))
            budget -= n
        return n_running, n_queued, segments

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

    # -- prompt preparation (caller's thread) -------------------------------------------------------
    def _prompt_ids(self, r: Request) -> tuple[list[int], bool, int]:
        m = self.model
        if r.messages is not None:
            text = m.render_chat(list(r.messages))
            thinking_open = text.rstrip().endswith(THINK_OPEN)
        else:
            text, thinking_open = r.prompt, False
        ids = m.tokenize_prompt(text)
        if not ids:
            raise EdgeboxError("the prompt is empty and the model adds no BOS token; give a prompt")
        n_ctx, truncated = m.n_ctx, 0
        if len(ids) >= n_ctx:
            if not r.context_shift:
                raise ContextOverflowError(f"the prompt has {len(ids)} tokens but the context holds {n_ctx} (and at least one must be generated); shorten it or enable context_shift")
            # llama.cpp's prompt truncation: keep n_keep tokens, drop whole blocks after them
            n_keep = min(r.n_keep, n_ctx // 2)
            block = (n_ctx - n_keep) // 2
            erased = (len(ids) - n_keep - block) // block
            kept = ids[:n_keep] + ids[n_keep + erased * block:]
            truncated, ids = len(ids) - len(kept), kept
        return ids, thinking_open, truncated

    def _reservation(self, r: Request, n_prompt: int) -> int:
        """KV slots a request holds while it runs: its prompt plus max_tokens, within the context."""
        return self.model.n_ctx if r.context_shift else min(self.model.n_ctx, n_prompt + r.max_tokens)

    # -- scheduler thread ---------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _kv_used(self) -> int:
        return sum(s.kv.nbytes for s in self._running) + sum(kv.nbytes for _, kv in self._prompt_cache)

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
                self._admit()
                batch = list(self._running)
            try:
                self._step(batch)
            except Exception as e:  # a failed step fails its sequences, never the engine
                for s in batch:
                    if s in self._running:
                        self._finish(s, "error", error=f"{type(e).__name__}: {e}")

    def _abort_all(self) -> None:
        for s in list(self._running):
            self._finish(s, "cancelled")
        while self._queue:
            handle, ids, t, _, _ = self._queue.popleft()
            handle._emit(Summary(handle.request_id, "cancelled", "", "", "", prompt_tokens=len(ids),
                                 queue_s=time.perf_counter() - t, total_s=time.perf_counter() - t))

    def _admit(self) -> None:
        """Move queued requests into the batch while the limit and the KV budget allow (FIFO)."""
        for entry in [e for e in self._queue if e[0].cancelled]:  # a cancelled request leaves the queue at once
            self._queue.remove(entry)
            handle, ids, t_submit = entry[:3]
            handle._emit(Summary(handle.request_id, "cancelled", "", "", "", prompt_tokens=len(ids),
                                 queue_s=time.perf_counter() - t_submit, total_s=time.perf_counter() - t_submit))
        while self._queue and len(self._running) < self._batch_limit:
            handle, ids, t_submit, thinking_open, truncated = self._queue[0]
            reserved = self._reservation(handle.request, len(ids))
            need = reserved * self.kv_bytes_per_token
            while self._prompt_cache and self._kv_used() + need > self.kv_budget_bytes:
                self._prompt_cache.popleft()  # cached prefixes go before live requests wait
            if self._kv_used() + need > self.kv_budget_bytes:
                return  # waits for a running sequence to finish
            self._queue.popleft()
            kv = self.model.new_cache(reserved)
            self._reuse_prefix(ids, kv)
            self._running.append(_Sequence(handle, ids, kv, reserved, thinking_open, self.model.tokenizer,
                                           t_submit, truncated))

    def _reuse_prefix(self, ids: list[int], kv: KVCache) -> None:
        """Copy the longest cached common prefix into ``kv`` (a copy costs far less than its prefill)."""
        best, best_n = None, 0
        for cached_ids, cached_kv in self._prompt_cache:
            n = _common_prefix(cached_ids, ids, min(cached_kv.length, len(ids) - 1, kv.n_ctx))
            if n > best_n:
                best, best_n = cached_kv, n
        if best is not None and best_n >= 4:
            kv.copy_prefix(best, best_n)

    def _step(self, batch: list[_Sequence]) -> None:
        for s in batch:
            if s.handle.cancelled:
                self._finish(s, "cancelled")
        batch = [s for s in batch if s in self._running]
        if not batch:
            return
        decoding = [s for s in batch if not s.prefilling and s.pending is not None]
        # prompt chunks share a budget of prefill_chunk tokens per step, oldest request first
        prefills: list[tuple[_Sequence, int]] = []
        budget = self.prefill_chunk
        for s in batch:
            if s.prefilling and budget > 0:
                n = min(budget, len(s.ids) - s.n_done)
                prefills.append((s, n))
                budget -= n

        segments: list[Segment] = []
        for s in decoding:
            if s.kv.length + 1 > s.kv.n_ctx:
                self._shift_context(s)
            segments.append(Segment(np.array([s.pending], np.int32), np.array([s.next_pos], np.int32), s.kv))
        for s, n in prefills:
            segments.append(Segment(np.array(s.ids[s.n_done:s.n_done + n], np.int32),
                                    np.arange(s.next_pos, s.next_pos + n, dtype=np.int32), s.kv))
        logits = self.model.transformer.forward_segments(segments, dry_run=self.dry_run)
        if logits is None:
            logits = [None] * len(segments)

        produced = 0
        for s, row in zip(decoding, logits):
            s.next_pos += 1
            s.history.append(s.pending)
            self._sample(s, None if row is None else row[0])
            produced += 1
        for (s, n), row in zip(prefills, logits[len(decoding):]):
            s.n_done += n
            s.next_pos += n
            if not s.prefilling:
                self._sample(s, None if row is None else row[0])
                produced += 1
        with self._cond:
            self._steps += 1
            self._generated += produced
            now = time.perf_counter()
            self._recent.append((now, produced))
            while self._recent and now - self._recent[0][0] > 5.0:
                self._recent.popleft()
        self._tell_listeners()

    def _tell_listeners(self) -> None:
        for fn in self._step_listeners:
            fn(self)

    def _shift_context(self, s: _Sequence) -> None:
        """llama.cpp's context shift: drop half of what follows the first n_keep tokens. Only
        sequences with context_shift get here: the others finished at a full context."""
        n_keep = min(s.request.n_keep, s.kv.length // 2)
        n_discard = (s.kv.length - n_keep) // 2
        s.kv.shift(n_keep, n_discard, self.model.args)
        s.next_pos -= n_discard
        s.shifted = True

    def _sample(self, s: _Sequence, logits: np.ndarray | None) -> None:
        if s.t_first == 0.0:
            s.t_first = time.perf_counter()
        if logits is None:  # dry run
            s.generated.append(self._dry_token)
            if len(s.generated) >= s.request.max_tokens or (s.kv.length + 1 > s.kv.n_ctx and not s.request.context_shift):
                return self._finish(s, "length")
            s.pending = self._dry_token
            return
        token = s.sampler.sample(logits, s.history)
        tok = self.model.tokenizer
        if token in tok.eog_ids:
            return self._finish(s, "stop")
        s.generated.append(token)
        text, stopped = s.stops.push(s.detok.feed(token))
        self._emit_text(s, text)
        if stopped:
            return self._finish(s, "stop")
        if len(s.generated) >= s.request.max_tokens:
            return self._finish(s, "length")
        if s.kv.length + 1 > s.kv.n_ctx and not s.request.context_shift:
            return self._finish(s, "length")
        s.pending = token

    def _emit_text(self, s: _Sequence, text: str) -> None:
        if not text:
            return
        s.text.append(text)
        for reasoning, piece in s.reasoning.push(text):
            s.handle._emit(Chunk(s.request.request_id, s.seq, piece, reasoning))
            s.seq += 1

    def _finish(self, s: _Sequence, reason: str, error: str | None = None) -> None:
        if s not in self._running:
            return
        if reason in ("length", "stop") and error is None:
            tail = s.stops.flush() if not s.stops.stopped else ""
            if reason == "length":
                tail = s.stops.push(s.detok.flush())[0] + s.stops.flush() if not s.stops.stopped else ""
            self._emit_text(s, tail)
        for reasoning, piece in s.reasoning.flush():
            s.handle._emit(Chunk(s.request.request_id, s.seq, piece, reasoning))
            s.seq += 1
        with self._cond:
            self._running.remove(s)
            if reason in ("stop", "length") and not s.shifted and s.kv.length >= 4 and self.prompt_cache_entries:
                self._prompt_cache.append((s.ids + s.generated, s.kv))
                while len(self._prompt_cache) > self.prompt_cache_entries:
                    self._prompt_cache.popleft()
            self._cond.notify_all()
        now = time.perf_counter()
        full = "".join(s.text)
        reasoning_text, content = split_reasoning(full, thinking_open=s.thinking_open)
        first = s.t_first or now
        s.handle._emit(Summary(
            request_id=s.request.request_id, done_reason=reason, text=full, content=content,
            reasoning=reasoning_text, prompt_tokens=len(s.ids), cached_prompt_tokens=s.cached,
            generated_tokens=len(s.generated), queue_s=s.t_start - s.t_submit, ttft_s=first - s.t_submit,
            prompt_s=first - s.t_start, decode_s=now - first, total_s=now - s.t_submit, error=error,
            prompt_truncated=s.truncated))

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


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(itertools.islice(a, limit), b):
        if x != y:
            break
        n += 1
    return n
