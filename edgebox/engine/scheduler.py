"""The scheduler: what the next step does, decided from the engine's state without changing it.

``schedule`` is the only place these rules live; the engine carries its ``StepPlan`` out, and
``Engine.load()`` shows the same plan to the power governor before the step runs (so what the
governor prices is what the chips are then charged for).

1. Cancelled requests leave: queued ones before admission, running ones during the step (they
   hold their slot and KV room while this step's admissions are decided). A queued request whose
   ``deadline_s`` has passed leaves too (refused, with when to retry).
2. Admission, by priority (``admission_order``): queued interactive requests first, then paused
   batch sequences (they resume), then queued batch requests, each class FIFO. One joins while
   the batch limit leaves a slot and the KV budget room for its reservation (cached prompts are
   evicted, oldest first, before a live request waits); an interactive request finding no slot
   pauses the most recently started running batch sequence instead (it keeps its KV cache, so
   resuming costs nothing). A joining request copies the longest common prefix (>= 4 tokens) of
   a cached prompt instead of computing it.
3. The step: one decode row for every running, unpaused sequence that has read its prompt (a
   full context is shifted first), plus one row per token of its speculative draft (``draft``,
   set after the last step: ``engine.speculative``), then prompt chunks sharing
   ``prefill_chunk`` rows, interactive prompts first, then oldest first, so a long prompt never
   freezes the streams already running.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from edgebox.engine.queued import Queued
from edgebox.engine.request import PRIORITIES
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
    expired: tuple[Queued, ...]  # deadline passed while queued: leave, refused
    cancelled: tuple[Sequence, ...]  # cancelled while running: leave the batch
    evicted: int  # prompt cache entries dropped, oldest first, to make KV room
    paused: tuple[Sequence, ...]  # batch sequences giving their slot to an interactive request
    resumed: tuple[Sequence, ...]  # paused sequences taking a slot again
    admitted: tuple[Admission, ...]  # in admission order
    shift: tuple[Sequence, ...]  # decoding sequences whose full context shifts before the step
    decode: tuple[Sequence, ...]  # the pending token each (and its draft: decode_rows), in this order
    prefill: tuple[tuple[Sequence, int], ...]  # running sequences' prompt chunks (rows)
    cost: tuple[tuple[int, int], ...]  # (rows, context after the step) per segment, as Box.account_step takes it
    n_logits: int  # one per segment (the last row's), and one per draft row
    decode_rows: tuple[int, ...] = ()  # per decode sequence: 1 + the draft tokens it feeds


def admission_order(queue: Iterable[Queued]) -> list[Queued]:
    """The queue in the order requests are admitted: by priority class, FIFO within one."""
    return sorted(queue, key=lambda q: q.rank)  # stable


def schedule(
    running: Seq[Sequence],
    queue: Iterable[Queued],
    prompt_cache: Seq[tuple[list[int], KVCache]],
    *,
    batch_limit: int,
    prefill_chunk: int,
    kv_budget_bytes: int,
    kv_bytes_per_token: int,
    now: float | None = None,
) -> StepPlan:
    """The next step's plan (see the module docstring); reads, never writes. ``now``: the
    engine's clock, for deadlines (None: none expire)."""
    # 1. cancelled requests leave
    queue = admission_order(queue)
    dropped = tuple(q for q in queue if q.handle.cancelled)
    cancelled = tuple(s for s in running if s.handle.cancelled)
    live = [s for s in running if not s.handle.cancelled]
    active = [s for s in live if not s.paused]
    paused_before = [s for s in live if s.paused]

    # 2. admission: interactive, then paused batch sequences, then batch, while a slot and KV room last
    used = sum(s.kv.nbytes for s in running)
    cache_bytes = sum(kv.nbytes for _, kv in prompt_cache)
    evicted, slots = 0, batch_limit - len(active)
    preemptible = [s for s in active if s.request.priority == "batch"]  # the newest is paused first
    pausing: list[Sequence] = []
    resumed: list[Sequence] = []
    joining: list[tuple[Queued, KVCache | None, int]] = []
    waiting = [q for q in queue if not q.handle.cancelled]
    blocked = False
    for q in [q for q in waiting if q.rank == 0] + paused_before + [q for q in waiting if q.rank > 0]:
        if isinstance(q, Sequence):  # a paused sequence: its KV is already held
            if slots <= 0 or blocked:
                break
            resumed.append(q)
            slots -= 1
            continue
        paused_for_it = slots <= 0 and q.rank == 0 and bool(preemptible)
        if paused_for_it:
            pausing.append(preemptible.pop())
            slots += 1
        if slots <= 0:
            break
        need = q.reserved * kv_bytes_per_token
        while evicted < len(prompt_cache) and used + cache_bytes + need > kv_budget_bytes:
            cache_bytes -= prompt_cache[evicted][1].nbytes
            evicted += 1
        if used + cache_bytes + need > kv_budget_bytes:
            if paused_for_it:  # no KV room for it after all: nothing to pause for
                preemptible.append(pausing.pop())
            blocked = True
            break  # waits for a running sequence to finish
        used += need
        slots -= 1
        joining.append((q, *_cached_prefix(q, itertools.islice(prompt_cache, evicted, None))))
    joined = {id(q) for q, _, _ in joining}
    expired = tuple(
        q
        for q in waiting
        if now is not None
        and q.handle.request.deadline_s is not None
        and id(q) not in joined
        and now - q.t_submit > q.handle.request.deadline_s
    )

    # 3. the step: decode rows of the running sequences, then prompt chunks, interactive first
    stepping = [s for s in active if s not in pausing] + resumed
    shift, decode, decode_rows, cost = [], [], [], []
    reading = []
    for s in stepping:
        if s.prefilling:
            reading.append(s)
        elif s.pending is not None:
            length = s.kv.length
            if s.context_full:
                shift.append(s)
                length -= context_shift(length, s.request.n_keep)[1]
            n = 1 + len(s.draft)
            decode.append(s)
            decode_rows.append(n)
            cost.append((n, length + n))
    budget = prefill_chunk
    prefill, rows = [], {}
    readers = sorted(
        [(PRIORITIES.index(s.request.priority), s) for s in reading] + [(q.rank, q) for q, _, _ in joining], key=lambda x: x[0]
    )
    for _, r in readers:
        if budget <= 0:
            break
        if isinstance(r, Sequence):
            n = min(budget, len(r.ids) - r.n_done)
            prefill.append((r, n))
            cost.append((n, r.kv.length + n))
        else:
            cached = next(c for q, _, c in joining if q is r)
            n = min(budget, len(r.ids) - cached)
            rows[id(r)] = n
            cost.append((n, cached + n))
        budget -= n
    admitted = tuple(Admission(q, source, cached, rows.get(id(q), 0)) for q, source, cached in joining)
    n_logits = len(cost) + sum(decode_rows) - len(decode_rows)
    return StepPlan(
        dropped,
        expired,
        cancelled,
        evicted,
        tuple(pausing),
        tuple(resumed),
        admitted,
        tuple(shift),
        tuple(decode),
        tuple(prefill),
        tuple(cost),
        n_logits,
        tuple(decode_rows),
    )


def steps_until_start(running: Seq[Sequence], queue: Iterable[Queued], rank: int, *, batch_limit: int, prefill_chunk: int) -> int:
    """Engine steps before a request of class ``rank`` submitted now would be admitted, if every
    request ran to its ``max_tokens`` (an upper bound: most stop earlier). The slots it competes
    for: an interactive request waits only for running interactive sequences (batch ones are
    paused for it) and the interactive requests queued ahead; a batch request for everything.
    Each slot frees when its occupant's remaining prompt chunks and tokens are done, and is taken
    in admission order."""
    live = [s for s in running if not s.handle.cancelled]
    occupants = [s for s in live if not s.paused and (rank > 0 or s.request.priority == "interactive")]
    ahead = [_steps_left(s, prefill_chunk) for s in live if s.paused and rank > 0]
    ahead += [_steps_left(q, prefill_chunk) for q in admission_order(queue) if not q.handle.cancelled and q.rank <= rank]
    left = sorted(_steps_left(s, prefill_chunk) for s in occupants)
    limit = max(1, batch_limit)
    free_at = left[len(left) - limit :] if len(left) >= limit else left + [0] * (limit - len(left))
    heapq.heapify(free_at)
    for duration in ahead:  # each one ahead takes the first slot to free and holds it for its run
        heapq.heappush(free_at, heapq.heappop(free_at) + duration)
    return free_at[0]


def _steps_left(x: Sequence | Queued, prefill_chunk: int) -> int:
    """Steps a sequence (or a queued request, from its start) still needs at most: prompt chunks, then tokens."""
    if isinstance(x, Sequence):
        prompt, generated = len(x.ids) - x.n_done, len(x.completion.tokens)
    else:
        prompt, generated = len(x.ids), 0
    return -(-prompt // max(1, prefill_chunk)) + max(0, x.handle.request.max_tokens - generated)


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
