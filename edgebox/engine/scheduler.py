"""The scheduler: what the next step does, decided from the engine's state without changing it.

``schedule`` is the only place these rules live; the engine carries its ``StepPlan`` out, and
``Engine.load()`` shows the same plan to the power governor before the step runs (so what the
governor prices is what the chips are then charged for).

1. Cancelled requests leave: queued ones before admission, running ones during the step (they
   hold their slot and KV room while this step's admissions are decided).
2. Admission, FIFO: the head of the queue joins while the batch limit leaves a slot and the KV
   budget room for its reservation; cached prompts are evicted, oldest first, before a live
   request waits. A joining request copies the longest common prefix (>= 4 tokens) of a cached
   prompt instead of computing it.
3. The step: one decode row for every running sequence that has read its prompt (a full
   context is shifted first), plus one row per token of its speculative draft (``draft``, set
   after the last step: ``engine.speculative``), then prompt chunks sharing ``prefill_chunk``
   rows, oldest request first, so a long prompt never freezes the streams already running.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from edgebox.engine.request import Queued
from edgebox.engine.sequence import Sequence, context_shift
from edgebox.model.kv_cache import KVCache

MIN_CACHED_PREFIX = 4  # a shorter common prefix is not worth the copy


class PromptCache(deque):
    """Finished sequences' (tokens, KV cache), most recent last, at most ``entries``: a request
    that shares a prefix with one copies it instead of computing it."""

    def __init__(self, entries: int):
        super().__init__()
        self.entries = entries

    def remember(self, ids: list[int], kv: KVCache) -> None:
        if self.entries and kv.length >= MIN_CACHED_PREFIX:
            self.append((ids, kv))
            while len(self) > self.entries:
                self.popleft()

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for _, kv in self)


@dataclass(frozen=True)
class Admission:
    """A queued request that joins the batch this step."""

    queued: Queued
    prefix_from: KVCache | None  # the cached prompt whose first ``cached`` slots it copies
    cached: int
    rows: int  # prompt rows it reads in this step (0: it starts reading next step)


@dataclass(frozen=True)
class StepPlan:
    dropped: tuple[Queued, ...]  # cancelled while queued: leave the queue
    cancelled: tuple[Sequence, ...]  # cancelled while running: leave the batch
    evicted: int  # prompt cache entries dropped, oldest first, to make KV room
    admitted: tuple[Admission, ...]
    shift: tuple[Sequence, ...]  # decoding sequences whose full context shifts before the step
    decode: tuple[Sequence, ...]  # the pending token each, in this order
    prefill: tuple[tuple[Sequence, int], ...]  # running sequences' prompt chunks (rows), then the admitted ones'
    cost: tuple[tuple[int, int], ...]  # (rows, context after the step) per segment, as Box.account_step takes it
    n_logits: int  # one per segment (the last row's), and one per draft row
    decode_rows: tuple[int, ...] = ()  # per decode sequence: 1 + the draft tokens it feeds


def schedule(
    running: Seq[Sequence],
    queue: Iterable[Queued],
    prompt_cache: Seq[tuple[list[int], KVCache]],
    *,
    batch_limit: int,
    prefill_chunk: int,
    kv_budget_bytes: int,
    kv_bytes_per_token: int,
) -> StepPlan:
    """The next step's plan (see the module docstring); reads, never writes."""
    # 1. cancelled requests leave
    dropped = tuple(q for q in queue if q.handle.cancelled)
    cancelled = tuple(s for s in running if s.handle.cancelled)

    # 2. admission: FIFO while a slot and KV room last
    used = sum(s.kv.nbytes for s in running)
    cache_bytes = sum(kv.nbytes for _, kv in prompt_cache)
    evicted, slots = 0, batch_limit - len(running)
    joining: list[tuple[Queued, KVCache | None, int]] = []
    for q in queue:
        if q.handle.cancelled:
            continue
        if slots <= 0:
            break
        need = q.reserved * kv_bytes_per_token
        while evicted < len(prompt_cache) and used + cache_bytes + need > kv_budget_bytes:
            cache_bytes -= prompt_cache[evicted][1].nbytes
            evicted += 1
        if used + cache_bytes + need > kv_budget_bytes:
            break  # waits for a running sequence to finish
        used += need
        slots -= 1
        joining.append((q, *_cached_prefix(q, itertools.islice(prompt_cache, evicted, None))))

    # 3. the step: decode rows of the running sequences, then prompt chunks
    shift, decode, decode_rows, cost = [], [], [], []
    reading = []
    for s in running:
        if s.handle.cancelled:
            continue
        if s.prefilling:
            reading.append(s)
        elif s.pending is not None:
            length = s.kv.length
            if s.context_full:
                shift.append(s)
                length -= context_shift(length, s.request.n_keep)[1]
            rows = 1 + len(s.draft)
            decode.append(s)
            decode_rows.append(rows)
            cost.append((rows, length + rows))
    budget = prefill_chunk
    prefill = []
    for s in reading:
        if budget <= 0:
            break
        n = min(budget, len(s.ids) - s.n_done)
        prefill.append((s, n))
        cost.append((n, s.kv.length + n))
        budget -= n
    admitted = []
    for q, source, cached in joining:
        n = min(budget, len(q.ids) - cached) if budget > 0 else 0
        if n:
            cost.append((n, cached + n))
            budget -= n
        admitted.append(Admission(q, source, cached, n))
    n_logits = len(cost) + sum(decode_rows) - len(decode_rows)
    return StepPlan(
        dropped,
        cancelled,
        evicted,
        tuple(admitted),
        tuple(shift),
        tuple(decode),
        tuple(prefill),
        tuple(cost),
        n_logits,
        tuple(decode_rows),
    )


def _cached_prefix(q: Queued, prompt_cache: Iterable[tuple[list[int], KVCache]]) -> tuple[KVCache | None, int]:
    """The cached prompt sharing the longest prefix with ``q``'s (the first on a tie), and that
    length; at least one prompt token is left to compute (its logits start the generation)."""
    best, best_n = None, 0
    for cached_ids, cached_kv in prompt_cache:
        n = _common_prefix(cached_ids, q.ids, min(cached_kv.length, len(q.ids) - 1, q.reserved))
        if n > best_n:
            best, best_n = cached_kv, n
    return (best, best_n) if best_n >= MIN_CACHED_PREFIX else (None, 0)


def _common_prefix(a: Seq[int], b: Seq[int], limit: int) -> int:
    n = 0
    for x, y in zip(itertools.islice(a, limit), b):
        if x != y:
            break
        n += 1
    return n
