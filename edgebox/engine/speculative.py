"""Speculative decoding: draft a few tokens cheaply, let one step of the model check them all.

A decoding sequence with a draft ``d1..dk`` feeds ``[pending, d1..dk]`` as one segment with the
logits of every row; it samples row 0 as always, and row i + 1 only while the token it took at
row i was the draft's ``d(i+1)`` (``Sequence.next_tokens``): 1 to k + 1 tokens per step.

Invariants (why the output does not change):

- every row is sampled through the sequence's own chain, the draft kept with probability
  p(draft), else a token drawn from p without it (``Sampler.pick_draft``, Leviathan et al.
  2023): the output is distributed as without drafts. Greedy gives the same tokens up to the
  kernels' numerics: verify rows run the batched kernels, so a near tie (~1e-3) can flip, as in
  llama.cpp and vLLM (docs/performance.md);
- the end rules (EOG, stop strings, max_tokens, a full context) apply token by token;
- rejected rows are dropped by moving ``kv.length`` back; a draft never needs more room than
  the request reserved (``Sequence.draft_room``).

Draft length (``draft_length``): from draft_max, 2 more after a draft kept whole, 1 fewer after
one cut short (Hugging Face's "heuristic"). Drafters: ``ngram`` (llama.cpp ``--spec-type
ngram``: the last n tokens looked up earlier in prompt + output, the tokens that followed) and
``draft`` (``--model-draft``: a smaller model with the same vocabulary drafts greedily from its
own KV caches; host work, not charged to the chips nor in the KV budget). Constrained, mirostat
and dry-run sequences run without drafts (``Sequence.can_draft``).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from edgebox.api import Model
from edgebox.errors import EdgeboxError
from edgebox.model.kv_cache import KVCache, Segment

KINDS = ("none", "ngram", "draft")
MAX_DRAFT = 64  # a bound on k: more rows than this per sequence is a prompt chunk, not a draft


@dataclass(frozen=True)
class Speculative:
    """How the engine drafts: ``kind`` none | ngram | draft; ``draft_max`` (llama.cpp's
    ``--draft-max``) the most tokens drafted per step; ``ngram_max`` / ``ngram_min`` the n-gram
    sizes looked up (vLLM's prompt_lookup_max / _min); ``model_draft`` the draft model's file
    (kind draft; the CLI and the daemon load it, ``Engine`` takes the loaded ``Model``)."""

    kind: str = "none"
    draft_max: int = 8
    ngram_max: int = 3
    ngram_min: int = 1
    model_draft: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EdgeboxError(f"spec kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name, value, lo, hi in (
            ("draft_max", self.draft_max, 1, MAX_DRAFT),
            ("ngram_min", self.ngram_min, 1, 16),
            ("ngram_max", self.ngram_max, self.ngram_min, 16),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise EdgeboxError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")

    @property
    def on(self) -> bool:
        return self.kind != "none"


def ngram_draft(history: Seq[int], k: int, n_max: int = 3, n_min: int = 1) -> list[int]:
    """Prompt lookup: the up to ``k`` tokens that followed the most recent earlier occurrence of
    the last n tokens of ``history`` (the longest n in [n_min, n_max] that occurs); [] if none."""
    if k <= 0 or len(history) < n_min + 1:
        return []
    h = np.asarray(history, np.int64)
    for n in range(min(n_max, len(h) - 1), n_min - 1, -1):
        tail = h[-n:]
        # windows starting at 0 .. len - n - 1: each has at least one token after it
        windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return h[start : start + k].tolist()
    return []


def draft_length(current: int, fed: int, kept: int, k_max: int) -> int:
    """The next draft's length after a step that fed ``fed`` draft tokens and kept ``kept``
    (see the module docstring); ``current`` 0 means none drafted yet: ``k_max``."""
    if current == 0:
        return k_max
    if fed == 0:
        return current
    return min(k_max, current + 2) if kept == fed else max(1, current - 1)


def _room(s, k_max: int) -> int:
    """The next draft's length for sequence ``s``, within its room."""
    s.draft_len = draft_length(s.draft_len, *s.last_draft, k_max)
    return s.draft_room(s.draft_len)


class NgramDrafter:
    """``ngram`` drafts (see the module docstring)."""

    def __init__(self, spec: Speculative):
        self.spec = spec

    def propose(self, sequences: list) -> None:
        for s in sequences:
            s.draft = ngram_draft(s.completion.history, _room(s, self.spec.draft_max), self.spec.ngram_max, self.spec.ngram_min)

    def forget(self, s) -> None:
        pass


def check_draft_vocab(target: Model, draft: Model) -> None:
    """The draft model must share the target's tokenizer: same size, same pieces, same ends of
    generation; otherwise its token ids mean other text. One line names the difference."""
    a, b = target.tokenizer, draft.tokenizer
    where = f"the draft model {draft.path.name} cannot draft for {target.path.name}"
    if a.n_vocab != b.n_vocab or target.args.n_vocab != draft.args.n_vocab:
        raise EdgeboxError(
            f"{where}: its vocabulary has {b.n_vocab} tokens, the target's {a.n_vocab}; use a draft model with the same tokenizer"
        )
    if a.eog_ids != b.eog_ids or a.bos_id != b.bos_id:
        raise EdgeboxError(f"{where}: its BOS/end-of-generation tokens differ; use a draft model with the same tokenizer")
    bad = next((i for i in range(a.n_vocab) if a.token_to_piece(i) != b.token_to_piece(i)), None)
    if bad is not None:
        raise EdgeboxError(
            f"{where}: token {bad} is {b.token_to_piece(bad)!r} there, {a.token_to_piece(bad)!r} here; use a draft model with the same tokenizer"
        )


class _DraftState:
    __slots__ = ("kv", "ids")

    def __init__(self, kv: KVCache):
        self.kv = kv
        self.ids: list[int] = []  # the tokens in kv, in order (kv.length of them)


class ModelDrafter:
    """``draft`` drafts: a second model, greedy, batched over the sequences (one forward pass
    to catch every sequence up, then one per drafted token)."""

    def __init__(self, spec: Speculative, model: Model, target: Model):
        check_draft_vocab(target, model)
        model.prepare()  # its kernels' weights packed now, not in the first request's step
        self.spec, self.model = spec, model
        self._state: dict[object, _DraftState] = {}

    def forget(self, s) -> None:
        self._state.pop(s, None)

    def propose(self, sequences: list) -> None:
        want, states = [], []
        for s in sequences:
            s.draft = []
            st = self._state.get(s)
            if st is None:
                st = self._state[s] = _DraftState(self.model.new_cache(min(s.kv.n_ctx, self.model.n_ctx)))
            # its cache holds the history and all drafts but the last
            k = min(_room(s, self.spec.draft_max), st.kv.n_ctx - len(s.completion.history))
            if k > 0:
                want.append((s, k))
                states.append(st)
        if not want:
            return
        # catch up: roll each draft cache back to what it shares with the history, feed the rest
        segments = []
        for (s, _), st in zip(want, states):
            history = s.completion.history
            keep = _common_prefix(st.ids, history, len(history) - 1)  # the last token is always fed
            st.kv.length, st.ids = keep, list(history)
            segments.append(_segment(history[keep:], keep, st.kv))
        out = self.model.transformer.forward_segments(segments)
        rows = {i: out[i][-1] for i in range(len(want))}
        active = list(range(len(want)))
        while True:
            for i in active:
                want[i][0].draft.append(int(np.argmax(rows[i])))  # greedy; ties to the lower id
            active = [i for i in active if len(want[i][0].draft) < want[i][1]]
            if not active:
                return
            segments = []
            for i in active:
                st, t = states[i], want[i][0].draft[-1]
                segments.append(_segment([t], st.kv.length, st.kv))
                st.ids.append(t)
            out = self.model.transformer.forward_segments(segments)
            rows = {i: out[j][-1] for j, i in enumerate(active)}


def _segment(tokens: Seq[int], start: int, kv: KVCache) -> Segment:
    return Segment(np.asarray(tokens, np.int32), np.arange(start, start + len(tokens), dtype=np.int32), kv)


def _common_prefix(a: Seq[int], b: Seq[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n


def drafter(spec: Speculative, target: Model, draft_model: Model | None):
    """The drafter ``spec`` asks for (None for kind none)."""
    if spec.kind == "ngram":
        return NgramDrafter(spec)
    if spec.kind == "draft":
        if draft_model is None:
            raise EdgeboxError(
                "spec kind 'draft' needs a draft model: give --model-draft FILE (a model with the target's tokenizer)"
            )
        return ModelDrafter(spec, draft_model, target)
    return None


def propose_drafts(drafter, running: Seq) -> None:
    """After a step, before the plan that prices them: drafts for the running sequences that
    decode and may draft (``Sequence.can_draft``). A draft is only a guess: if the drafter
    fails, the sequences go without one and decode as usual."""
    if drafter is None:
        return
    drafting = [s for s in running if s.pending is not None and not s.prefilling and not s.paused and s.can_draft]
    try:
        drafter.propose(drafting)
    except Exception:
        for s in drafting:
            s.draft = []
            drafter.forget(s)
