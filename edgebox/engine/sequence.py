"""A request being served: its prompt's progress through the cache, the token the next decode
step feeds, its ``Completion`` (the text rules) and its reasoning split, timings.

Invariants: ``n_done`` prompt tokens are in the cache (``kv.length == n_done`` while the prompt
is read); afterwards every step feeds ``pending`` at ``next_pos`` (== ``kv.length``), followed by
its speculative ``draft`` when it has one (``engine.speculative``). Only the scheduler thread
touches a sequence.
"""

from __future__ import annotations

import time

import numpy as np

from edgebox.engine.queued import Queued
from edgebox.engine.request import Chunk, Summary
from edgebox.model.kv_cache import KVCache, Segment
from edgebox.text.chat import ReasoningStream, split_reasoning
from edgebox.text.generation import Completion


def context_shift(length: int, n_keep: int) -> tuple[int, int]:
    """llama.cpp's context shift of a full cache holding ``length`` slots: (slots kept at the
    start, slots dropped after them): half of what follows the first ``n_keep``."""
    n_keep = min(n_keep, length // 2)
    return n_keep, (length - n_keep) // 2


class Sequence:
    """One running request (see the module docstring)."""

    def __init__(self, queued: Queued, kv: KVCache, tokenizer, dry_run: bool = False, clock=time.perf_counter):
        r = queued.handle.request
        self.handle, self.request, self.ids, self.kv = queued.handle, r, queued.ids, kv
        self.n_done = kv.length  # prompt tokens already in the cache (prompt cache hit)
        self.cached = kv.length
        self.next_pos = kv.length
        # a dry run's fixed token would break any grammar: it runs unconstrained
        constraint = None if dry_run else queued.constraint
        self.completion = Completion(tokenizer, queued.ids, r.params, r.max_tokens, r.stop, constraint, r.logprobs, r.n_probs)
        self._logprobs_sent = 0  # of completion.logprobs, those already on a chunk
        self.thinking_open = queued.thinking_open
        self.reasoning = ReasoningStream(queued.thinking_open)
        plan = queued.handle.tool_plan  # requests with tools: the reply's content is parsed for calls
        self.tools = plan.parser() if plan is not None and not dry_run else None
        self.calls = None  # text.tool_calls.ToolCallResult once ended
        self.pending: int | None = None  # the sampled token to feed in the next decode step
        self.draft: list[int] = []  # speculative tokens to feed after ``pending`` (engine.speculative)
        self.fed: tuple[int, ...] = ()  # the draft this step feeds
        self.drafted = self.accepted = 0  # draft tokens fed, and of those kept
        self.draft_len = 0  # how many to draft next (engine.speculative.draft_length; 0: not yet set)
        self.last_draft = (0, 0)  # the last step's (fed, kept)
        self.text: list[str] = []
        self.seq = 0
        self.shifted = False
        self.dry_run = dry_run  # its tokens are a dry run's fixed one: no text
        self.truncated = queued.truncated
        self.paused = False  # a batch sequence whose slot an interactive request holds (engine.scheduler)
        self.clock = clock  # the engine's: wall time, or device time in a dry run
        self.t_submit, self.t_start, self.t_first = queued.t_submit, clock(), 0.0

    @property
    def prefilling(self) -> bool:
        return self.n_done < len(self.ids)

    @property
    def context_full(self) -> bool:
        """The next decode token has no slot (it ends the sequence unless it shifts the context)."""
        return self.kv.length + 1 > self.kv.n_ctx

    @property
    def can_draft(self) -> bool:
        """Whether speculative drafts may be verified for it (``engine.speculative``): not when
        constrained (the grammar would have to follow every draft), under mirostat (its mu follows
        each distribution drawn from) or in a dry run (no logits)."""
        return not self.dry_run and self.completion.matcher is None and self.request.params.mirostat == 0

    def draft_room(self, k: int) -> int:
        """How many draft tokens (at most ``k``) the next step may feed: the step yields up to one
        more than it drafts, within max_tokens, and its rows must fit in the reserved cache."""
        c = self.completion
        return max(0, min(k, c.max_tokens - len(c.tokens) - 1, self.kv.n_ctx - self.kv.length - 1))

    # -- the forward pass ----------------------------------------------------------------------
    def segment(self, n: int) -> Segment:
        """Its part of the step: the next ``n`` prompt tokens, or the pending token and the first
        n - 1 tokens of its draft (all of whose rows' logits the verification reads)."""
        if not self.prefilling:
            self.fed = tuple(self.draft[: n - 1])
            return Segment(
                np.array([self.pending, *self.fed], np.int32),
                np.arange(self.next_pos, self.next_pos + n, dtype=np.int32),
                self.kv,
                all_logits=n > 1,
            )
        return Segment(
            np.array(self.ids[self.n_done : self.n_done + n], np.int32),
            np.arange(self.next_pos, self.next_pos + n, dtype=np.int32),
            self.kv,
        )

    def advance(self, n: int) -> None:
        """The step put its ``n`` tokens in the cache."""
        if self.prefilling:
            self.n_done += n
        self.next_pos += n

    def shift_context(self, args) -> None:
        """Make room for the next token (only sequences with ``context_shift`` get here: the
        others ended at a full context)."""
        n_keep, n_discard = context_shift(self.kv.length, self.request.n_keep)
        self.kv.shift(n_keep, n_discard, args)
        self.next_pos -= n_discard
        self.shifted = True

    def samples_after(self, n: int) -> bool:
        """Whether this step (feeding ``n`` tokens) ends with a token to sample."""
        return self.n_done + n >= len(self.ids)

    @property
    def matcher(self):
        """Its grammar's matcher (``text.grammar.Matcher``) or None when unconstrained."""
        return self.completion.matcher

    # -- output --------------------------------------------------------------------------------
    def next_tokens(self, rows: np.ndarray | None, dry_token: int, bitmask: np.ndarray | None = None) -> str | None:
        """Sample the next token from ``rows`` [1 + len(fed), V] (a dry run's are None:
        ``dry_token``, and no text), within ``bitmask`` when constrained (computed during the
        forward pass; None: computed now), show its text; then, while the token taken is the fed
        draft's, the next row's. Returns why the sequence ends here (stop | length), or None.

        Each row is sampled with ``kv.length`` as decoding without drafts would have it then (the
        pending token and the drafts before the row), so the end rules see the same state; the
        rows of drafts not kept are dropped by leaving ``kv.length`` (and ``next_pos``) there."""
        if self.t_first == 0.0:
            self.t_first = self.clock()
        c, fed, self.fed = self.completion, self.fed, ()
        base, pos = self.kv.length - len(fed), self.next_pos - len(fed)
        self.drafted += len(fed)
        kept = self.accepted
        self.last_draft = (len(fed), 0)
        for i in range(len(fed) + 1):
            self.kv.length, self.next_pos = base + i, pos + i
            draft = fed[i] if i < len(fed) else None
            token = dry_token if rows is None else c.sample(rows[i], bitmask if i == 0 else None, draft)
            if token == draft:
                self.accepted += 1
                self.last_draft = (len(fed), self.accepted - kept)
            text = c.push(token)
            if not self.dry_run:
                self.emit(text)
            if c.done_reason is not None:
                return c.done_reason
            if self.context_full and not self.request.context_shift:
                return "length"
            self.pending = token
            if token != draft:
                return None
        return None

    def end(self, reason: str, error: str | None) -> None:
        """Show what is still held back: at a stop or length the text the completion held, then
        the reasoning split's tail, then the tool-call parser's."""
        if reason in ("length", "stop") and error is None and not self.dry_run:
            self.emit(self.completion.finish(reason))
        for reasoning, piece in self.reasoning.flush():
            self._show(piece, reasoning)
        if self.tools is not None:
            self.calls = self.tools.finish()
            for delta in self.calls.deltas:
                self._chunk(delta)

    def emit(self, text: str) -> None:
        if not text:
            return
        self.text.append(text)
        for reasoning, piece in self.reasoning.push(text):
            self._show(piece, reasoning)

    def _show(self, piece: str, reasoning: bool) -> None:
        """One piece of reasoning or content; content goes through the tool-call parser, if any."""
        if reasoning or self.tools is None:
            self.handle._emit(Chunk(self.request.request_id, self.seq, piece, reasoning, logprobs=self._new_logprobs()))
            self.seq += 1
            return
        for delta in self.tools.feed(piece):
            self._chunk(delta)

    def _chunk(self, delta: dict) -> None:
        """A tool-call parser's delta (OpenAI's shape) as a Chunk."""
        self.handle._emit(
            Chunk(
                self.request.request_id,
                self.seq,
                delta.get("content") or "",
                tool_calls=tuple(delta.get("tool_calls") or ()),
                logprobs=self._new_logprobs(),
            )
        )
        self.seq += 1

    def _new_logprobs(self) -> tuple:
        """The generated tokens' logprobs not yet on a chunk (they ride on the next one)."""
        new = self.completion.logprobs[self._logprobs_sent :]
        self._logprobs_sent += len(new)
        return tuple(new)

    def summary(self, reason: str, error: str | None) -> Summary:
        now = self.clock()
        full = "".join(self.text)
        reasoning_text, content = split_reasoning(full, thinking_open=self.thinking_open)
        calls = ()
        if self.calls is not None:  # the reply parsed for tool calls: its content is what is not a call
            content, calls = self.calls.content, tuple(self.calls.tool_calls)
            reason = self.calls.finish_reason or reason
        first = self.t_first or now
        return Summary(
            request_id=self.request.request_id,
            done_reason=reason,
            text=full,
            content=content,
            reasoning=reasoning_text,
            prompt_tokens=len(self.ids),
            cached_prompt_tokens=self.cached,
            generated_tokens=len(self.completion.tokens),
            queue_s=self.t_start - self.t_submit,
            ttft_s=first - self.t_submit,
            prompt_s=first - self.t_start,
            decode_s=now - first,
            total_s=now - self.t_submit,
            error=error,
            prompt_truncated=self.truncated,
            tool_calls=calls,
            logprobs=tuple(self.completion.logprobs),
            chain_probs=tuple(self.completion.chain_probs),
            draft_tokens=self.drafted,
            draft_accepted=self.accepted,
        )
