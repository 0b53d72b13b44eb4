"""One sequence's generation after its prompt: pick tokens, decide the end, stream the text.

``Completion`` is the one place these rules live, for ``Model.generate`` (one sequence) and the
engine (many at once), so the two give the same text for the same logits:

- the sampler sees the prompt and every generated token (its repeat-penalty window);
- an end-of-generation token ends it with "stop" and is not part of the output;
- a stop string ends it with "stop": the text before it is shown, the stop string is not;
- ``max_tokens`` generated tokens end it with "length"; so does ``finish("length")`` from the
  caller (a full context);
- with a ``Constraint`` (``text.grammar``) the tokens the grammar does not allow get -inf logits
  before the sampler draws; once the grammar is complete (only an end-of-generation token may
  follow) it ends with "stop" without another draw. ``max_tokens`` still cuts it with "length",
  and the text is then an incomplete match (an unfinished JSON), as OpenAI and llama.cpp do;
- the text streams: the detokenizer holds an incomplete UTF-8 character and the stop matcher
  what could begin a stop string. ``finish`` releases what is held: at "length" both, at an
  end-of-generation token what the stop matcher held (it can no longer become a stop string);
  after a stop string nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgebox.text.grammar import Constraint, allowed_from_bitmask, compile_constraint
from edgebox.text.sampler import Sampler, SamplingParams, chain_logprobs


class Completion:
    """The generated part of one sequence: ``push`` each next token (``sample`` picks it from
    logits), show the text it returns, and once ``done_reason`` is set show ``finish()``."""

    def __init__(
        self,
        tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        max_tokens: int,
        stop: Sequence[str] = (),
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        n_probs: int | None = None,
    ):
        self.sampler = Sampler(params, vocab=tokenizer, eog_ids=tokenizer.eog_ids)  # DRY's pieces, ignore_eos
        self.matcher = None if constraint is None else compile_constraint(tokenizer, constraint).matcher()
        self.logprobs_top = logprobs  # None: off; N: each generated token's logprob and its N best rivals
        self.logprobs: list = []  # TokenLogprobs of the generated tokens (end-of-generation excluded)
        self.n_probs = n_probs  # llama.cpp's n_probs: the N best of the distribution the draw used
        self.chain_probs: list = []  # TokenLogprobs over the sampler chain's candidates, per generated token
        self.eog_ids = tokenizer.eog_ids
        self.detok = tokenizer.stream_decoder()
        self.stops = StopMatcher(stop)
        self.max_tokens = max_tokens
        self.history: list[int] = list(prompt_ids)  # what the sampler's repeat penalty looks back on
        self.tokens: list[int] = []  # generated, end-of-generation excluded
        self.done_reason: str | None = None  # stop | length once it has ended

    def sample(self, logits: np.ndarray, bitmask: np.ndarray | None = None, draft: int | None = None) -> int:
        """The next token for ``logits`` (float32 [n_vocab]) after everything so far (and, when
        asked, its logprobs: OpenAI's, before the chain, see ``Sampler.logprobs``). With a
        constraint, ``bitmask`` is its next token bitmask when the caller computed it already
        (the engine does, during the forward pass); otherwise it is computed here. ``draft``: a
        speculative draft's token for this position, kept or replaced by ``Sampler.pick_draft``
        (the result is distributed as without it)."""
        token = self._sample(logits, bitmask, draft)
        if self.logprobs_top is not None and token not in self.eog_ids:
            self.logprobs.append(self.sampler.logprobs(logits, token, self.logprobs_top))
        return token

    def _sample(self, logits: np.ndarray, bitmask: np.ndarray | None, draft: int | None = None) -> int:
        if self.matcher is not None:
            if bitmask is None:
                bitmask = self.matcher.bitmask()
            else:
                self.matcher.check()
            # the sampler works on the allowed tokens only: a 102k row of -inf would cost its top-k 15 ms
            allowed = allowed_from_bitmask(bitmask, len(logits))
        else:
            allowed = None
        if self.n_probs is None and draft is None:
            return self.sampler.sample(logits, self.history, allowed=allowed)
        ids, probs = self.sampler.candidates(logits, self.history, allowed=allowed)
        token = self.sampler.pick(ids, probs) if draft is None else self.sampler.pick_draft(ids, probs, draft)
        if self.n_probs is None:
            return token
        if token not in self.eog_ids:
            self.chain_probs.append(chain_logprobs(ids, probs, token, self.n_probs))
        return token

    def push(self, token: int) -> str:
        """Take the next token; returns the text it makes safe to show (often "", never part of a
        stop string). Sets ``done_reason`` when this token ends the generation."""
        if token in self.eog_ids:
            self.done_reason = "stop"
            return ""
        if self.matcher is not None:
            self.matcher.consume(token)
        self.tokens.append(token)
        self.history.append(token)
        text, stopped = self.stops.push(self.detok.feed(token))
        if stopped or (self.matcher is not None and self.matcher.is_stopped):
            self.done_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.done_reason = "length"
        return text

    def finish(self, reason: str | None = None) -> str:
        """End the generation (with ``reason`` when the caller ends it, e.g. "length" at a full
        context) and return the text still held back."""
        if reason is not None:
            self.done_reason = reason
        if self.stops.stopped:
            return ""
        if self.done_reason == "length":
            return self.stops.push(self.detok.flush())[0] + self.stops.flush()
        return self.stops.flush()


class StopMatcher:
    """Finds stop strings in streamed text without emitting any part of them.

    ``push(text)`` returns ``(emit, stopped)``: the text safe to show now. Text that could be
    the start of a stop string is held back until it is known; when a stop string completes,
    the text before it is emitted, ``stopped`` is True and the stop string itself is dropped.
    ``flush()`` returns what is still held back once the stream has ended without a stop.

    The match is the stop string that *completes* first (on a tie, the longest), which is what
    a character-by-character stream would see, so the result does not depend on how the text
    was split into pushes.
    """

    def __init__(self, stops: Sequence[str] = ()):
        if isinstance(stops, str):
            stops = (stops,)  # a lone string is one stop string, not a set of characters
        stops = tuple(stops)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text

        best_end, best = -1, None
        for stop in self.stops:
            start = buf.find(stop)
            if start < 0:
                continue
            end = start + len(stop)
            if best is None or end < best_end or (end == best_end and len(stop) > len(best)):
                best_end, best = end, stop
        if best is not None:
            self.stopped, self.matched, self._held = True, best, ""
            return buf[: best_end - len(best)], True

        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:n]):
                    longest = n
                    break
        return longest
