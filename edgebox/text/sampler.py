"""Token sampling: logits -> one token id.

The sampler is separate from the model and owns its random generator (as in llama2.c), so the
same seed and the same logits give the same tokens whatever else runs in the process.

Semantics follow llama.cpp's default sampler chain (``common/sampling.cpp``,
``src/llama-sampler.cpp``)::

    penalties -> top-k -> top-p -> min-p -> temperature -> draw

- repetition penalty: each distinct token among the last ``repeat_last_n`` of the history has
  its logit divided by the penalty when positive and multiplied when <= 0 (dividing a negative
  logit would make the token *more* likely);
- top-k keeps the k highest logits (ties broken towards the lower token id);
- top-p keeps the smallest high-to-low prefix whose softmax mass (over what top-k left) reaches p;
- min-p keeps the tokens whose probability is at least ``min_p`` times the top one's, i.e.
  ``logit >= max_logit + log(min_p)``; it runs before temperature, so it does not depend on it;
- temperature divides what is left; temperature <= 0 is greedy: the argmax of the penalized
  logits, lowest id on ties.

Every call draws exactly one uniform number, greedy or not, like llama.cpp's ``dist`` sampler: the
random stream then stays aligned whatever the parameters or the number of candidates.

Logits with a NaN or +inf (or all -inf) come from corrupt weights: ``NonFiniteLogitsError``, a
``ModelError``, from the row maximum the sampler takes anyway (CLI exit 2, an engine error summary).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgebox.errors import ModelError

# top-p over a whole vocabulary without top-k: sort only this many best candidates first and
# fall back to a full sort when their mass does not reach p (llama.cpp does the same with 256).
_TOP_P_FIRST_GUESS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; every value is checked here, once, not per token.

    ``top_k <= 0`` disables top-k, ``top_p = 1`` and ``min_p = 0`` disable those filters,
    ``repeat_penalty = 1`` or ``repeat_last_n = 0`` disable the penalty and ``repeat_last_n = -1``
    penalizes the whole history (llama.cpp's "-1 = context size"). ``seed=None`` draws fresh
    entropy from the OS.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        # Normalize numbers to their declared types (frozen, so through object.__setattr__) and
        # refuse bools, NaN and out-of-range values with the field's name and its allowed range.
        set_ = object.__setattr__
        set_(self, "temperature", _real("temperature", self.temperature, "any finite number (<= 0 means greedy)"))
        set_(self, "top_k", _integer("top_k", self.top_k, "an integer (<= 0 disables top-k)"))
        set_(self, "top_p", _real("top_p", self.top_p, "0.0 <= top_p <= 1.0 (1.0 disables top-p)", 0.0, 1.0))
        set_(self, "min_p", _real("min_p", self.min_p, "0.0 <= min_p <= 1.0 (0.0 disables min-p)", 0.0, 1.0))
        penalty = _real("repeat_penalty", self.repeat_penalty, "a finite number > 0 (1.0 disables it)")
        if penalty <= 0.0:
            raise ValueError(f"repeat_penalty must be a finite number > 0 (1.0 disables it), got {penalty!r}")
        set_(self, "repeat_penalty", penalty)
        last_n = _integer("repeat_last_n", self.repeat_last_n, "an integer >= -1 (0 disables, -1 = whole history)")
        if last_n < -1:
            raise ValueError(f"repeat_last_n must be an integer >= -1 (0 disables, -1 = whole history), got {last_n!r}")
        set_(self, "repeat_last_n", last_n)
        if self.seed is not None:
            seed = _integer("seed", self.seed, "None or an integer >= 0")
            if seed < 0:
                raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
            set_(self, "seed", seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalizes(self) -> bool:
        return self.repeat_penalty != 1.0 and self.repeat_last_n != 0


class NonFiniteLogitsError(ModelError, ValueError):
    """The model produced NaN or +inf logits: its weights are corrupt. Also a ValueError, as the
    sampler's other refusals of its input."""


def _real(name: str, value: object, allowed: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    out = float(value)
    if not (math.isfinite(out) and lo <= out <= hi):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return out


def _integer(name: str, value: object, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


class Sampler:
    """Picks one token id from a row of logits; keeps its own ``np.random.Generator``."""

    def __init__(self, params: SamplingParams):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"Sampler needs a SamplingParams, got {type(params).__name__}")
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token for ``logits`` (float32 [n_vocab]) given the tokens so far."""
        ids, probs = self.candidates(logits, history)
        # One uniform per call, always (see the module docstring). Inverse CDF: the first
        # candidate whose running mass passes u * total, as llama.cpp's dist sampler does
        # ("right" so that a zero-probability candidate can never be picked).
        u = self.rng.random()
        if ids.size == 1:
            return int(ids[0])
        cdf = np.cumsum(probs)
        i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])

    def candidates(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The distribution the next draw uses: (token ids, probabilities summing to 1).

        Deterministic (no randomness used); ids are in the order the draw walks them.
        """
        p = self.params
        x = _checked_logits(logits, len(history))
        if p.penalizes:
            x = _penalize(x, history, p.repeat_penalty, p.repeat_last_n)
        if p.greedy:
            return np.array([int(np.argmax(x))]), np.ones(1)  # np.argmax: first max = lowest id

        if 0 < p.top_k < x.size:
            ids = _top_k(x, p.top_k)
            vals = x[ids]
        else:
            ids, vals = np.arange(x.size), x
        if p.top_p < 1.0 or p.min_p > 0.0:
            ids, vals = _nucleus_and_min_p(ids, vals, p.top_p, p.min_p)

        # Temperature, then softmax in float64 over the survivors. Shifting by the maximum before
        # dividing keeps a tiny temperature from overflowing to inf - inf = NaN.
        z = (vals.astype(np.float64) - float(vals.max())) / p.temperature
        probs = np.exp(z)
        probs /= probs.sum()
        return ids, probs


def _checked_logits(logits: np.ndarray, position: int) -> np.ndarray:
    """``logits`` as float32 [n_vocab]; ``position`` (the tokens before the one being sampled)
    names the token in the error."""
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array [n_vocab], got shape {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    top = x.max()  # NaN propagates through max, so this one pass checks for NaN too
    if not np.isfinite(top):
        raise NonFiniteLogitsError(
            f"the model produced non-finite logits (largest {top}) at token {position}; "
            "the file's weights are corrupt (NaN or inf), re-download or re-convert it"
        )
    return x


def _penalize(x: np.ndarray, history: Sequence[int], penalty: float, last_n: int) -> np.ndarray:
    # Slice before converting: the engine passes its whole growing history every token.
    recent = history if last_n < 0 else history[-last_n:] if len(history) > last_n else history
    if len(recent) == 0:
        return x
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    if seen[0] < 0 or seen[-1] >= x.size:
        raise ValueError(f"history token ids must be in [0, {x.size}), got {seen[0]}..{seen[-1]}")
    x = x.copy()  # never modify the caller's logits
    v = x[seen]
    # Once per distinct token, not per occurrence, as llama.cpp's repeat penalty.
    x[seen] = np.where(v <= 0, v * np.float32(penalty), v / np.float32(penalty))
    return x


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest values of ``x`` (0 < k < x.size), high to low, ties towards the
    lower position."""
    n = x.size
    # argpartition is O(n) where a sort is O(n log n); then take every position strictly above
    # the k-th value and fill the remaining places with the lowest positions equal to it, so
    # ties at the cut do not depend on argpartition's internal order.
    kth = x[np.argpartition(x, n - k)[n - k]]
    above = np.flatnonzero(x > kth)
    at = np.flatnonzero(x == kth)[: k - above.size]
    ids = np.concatenate([above, at])
    return ids[np.lexsort((ids, -x[ids]))]  # last key is primary: value descending, then position


def _nucleus_and_min_p(ids: np.ndarray, vals: np.ndarray, top_p: float, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Apply top-p then min-p to the candidates (ids, logits) that top-k left.

    Both filters keep a high-to-low prefix, and min-p's threshold depends only on the top logit
    (which top-p always keeps), so the result is the shorter of the two prefixes. That lets us
    sort only the min-p survivors, or a first guess of 256, instead of a 150k vocabulary.
    """
    vmax = vals.max()
    # top-p measures mass against everything top-k left (before min-p and temperature).
    total = float(np.exp(vals.astype(np.float64) - vmax).sum()) if top_p < 1.0 else 0.0
    if min_p > 0.0:
        keep = vals >= vmax + np.float32(math.log(min_p))  # p_i >= min_p * p_max, in logits
        ids, vals = ids[keep], vals[keep]
    if top_p >= 1.0:
        return ids, vals

    if ids.size > _TOP_P_FIRST_GUESS:
        best = _top_k(vals, _TOP_P_FIRST_GUESS)  # positions in ids/vals, sorted high to low
        cut = _top_p_cut(vals[best], total, vmax, top_p)
        if cut > 0:
            best = best[:cut]
            return ids[best], vals[best]
    order = np.lexsort((ids, -vals))  # logit descending, then id ascending
    ids, vals = ids[order], vals[order]
    cut = _top_p_cut(vals, total, vmax, top_p)
    return (ids[:cut], vals[:cut]) if cut > 0 else (ids, vals)


def _top_p_cut(sorted_vals: np.ndarray, total: float, vmax: float, top_p: float) -> int:
    """How many of the high-to-low logits top-p keeps, or -1 if their mass never reaches p."""
    mass = np.cumsum(np.exp(sorted_vals.astype(np.float64) - vmax)) / total
    reach = np.flatnonzero(mass >= top_p)
    return int(reach[0]) + 1 if reach.size else -1
