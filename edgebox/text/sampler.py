"""Token sampling: logits -> one token id, llama.cpp's sampler chain.

The sampler is separate from the model and owns its random generators (as in llama2.c), so the
same seed and the same logits give the same tokens whatever else runs in the process.

Semantics follow llama.cpp (``common/sampling.cpp``, ``src/llama-sampler.cpp``); a test replays
golden data recorded from llama.cpp itself. The chain::

    allowed (grammar mask) -> logit_bias (+ ignore_eos bans) -> samplers, in params.samplers order -> draw

default order ``penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature``; with
``mirostat`` 1 or 2: logit_bias -> temperature -> mirostat. Each sampler's rule: ``Sampler``.

Ties at a cut go to the lower token id; tokens at -inf are never candidates. Softmaxes run in
float64, logit arithmetic in float32, as llama.cpp's. One deliberate difference: llama.cpp's
typical sampler gets a NaN entropy when a candidate's float32 probability is 0 and keeps an
unspecified set; edgebox drops such tokens first.

``sample`` is ``candidates`` (the chain) then ``pick`` (the draw, then ``accept``: mirostat's
update). ``Sampler.logprobs`` gives OpenAI's log-probabilities, ``chain_logprobs`` those of the
distribution drawn from (llama.cpp's ``n_probs``). Nothing sorts the whole vocabulary where a
cheaper exact path exists. Every call draws exactly one uniform number for the final draw, like
llama.cpp's ``dist`` sampler, so the stream stays aligned whatever the parameters.

Logits with a NaN or +inf (or all -inf): ``NonFiniteLogitsError``, a ``ModelError`` (corrupt weights).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgebox.errors import ModelError

# llama.cpp's sampler names (common_sampler_type_to_str) and its default order; top_n_sigma is
# in the default order but disabled by its default value.
SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
DEFAULT_SAMPLERS = SAMPLERS
# llama.cpp's aliases (common_sampler_types_from_names): kebab-case, no dash, and these three.
_ALIASES = {
    **{n.replace("_", "-"): n for n in SAMPLERS},
    **{n.replace("_", ""): n for n in SAMPLERS},
    "nucleus": "top_p",
    "temp": "temperature",
    "typ": "typ_p",
}
# Filters that never drop the best token: greedy can skip them (see Sampler.candidates).
_KEEP_THE_BEST = frozenset({"penalties", "dry", "top_n_sigma", "top_k", "top_p", "min_p"})

# top-p over a whole vocabulary without top-k: sort only this many best candidates first and
# fall back to a full sort when their mass does not reach p (llama.cpp does the same with 256).
_TOP_P_FIRST_GUESS = 256
# DRY: llama.cpp truncates a sequence breaker to 40 bytes and its token tail to 20 tokens.
_DRY_MAX_CHARS = 40
_DRY_MAX_TAIL = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; every value is checked here, once, not per token.

    Names and defaults are llama.cpp's (``common_params_sampling``); the defaults reproduce its
    default chain. ``top_k <= 0`` disables top-k, ``top_p = 1``, ``typical_p = 1`` and
    ``min_p = 0`` disable those filters, ``repeat_penalty = 1`` with both OpenAI penalties 0 (or
    ``repeat_last_n = 0``) disables the penalties, and ``repeat_last_n = -1`` penalizes the whole
    history (llama.cpp's "-1 = context size"; the same for ``dry_penalty_last_n``).
    ``dry_multiplier = 0``, ``xtc_probability = 0`` (or ``xtc_threshold > 0.5``),
    ``top_n_sigma <= 0`` and ``mirostat = 0`` disable those. ``logit_bias`` maps token ids to
    what is added to their logits (-inf bans the token); it is stored as sorted (id, bias) pairs.
    ``seed=None`` draws fresh entropy from the OS.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", '"', "*")
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    ignore_eos: bool = False
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS

    def __post_init__(self) -> None:
        # Normalize numbers to their declared types (frozen, so through object.__setattr__) and
        # refuse bools, NaN and out-of-range values with the field's name and its allowed range.
        set_ = object.__setattr__
        set_(self, "temperature", _real("temperature", self.temperature, "any finite number (<= 0 means greedy)"))
        set_(self, "top_k", _integer("top_k", self.top_k, "an integer (<= 0 disables top-k)"))
        set_(self, "top_p", _real("top_p", self.top_p, "0.0 <= top_p <= 1.0 (1.0 disables top-p)", 0.0, 1.0))
        set_(self, "min_p", _real("min_p", self.min_p, "0.0 <= min_p <= 1.0 (0.0 disables min-p)", 0.0, 1.0))
        # below 1e-6 a float32 logit divided by it overflows to inf: refused, not NaN logits later
        penalty = _real("repeat_penalty", self.repeat_penalty, "a finite number >= 1e-6 (1.0 disables it)")
        if penalty < 1e-6:
            raise ValueError(f"repeat_penalty must be a finite number >= 1e-6 (1.0 disables it), got {penalty!r}")
        set_(self, "repeat_penalty", penalty)
        set_(self, "repeat_last_n", _integer("repeat_last_n", self.repeat_last_n, _LAST_N, -1))
        if self.seed is not None:
            set_(self, "seed", _integer("seed", self.seed, "None or an integer >= 0", 0))
        set_(self, "logit_bias", _logit_bias(self.logit_bias))
        for name in ("presence_penalty", "frequency_penalty"):
            set_(self, name, _real(name, getattr(self, name), "a finite number (0.0 disables it)"))
        set_(self, "typical_p", _real("typical_p", self.typical_p, "0.0 <= typical_p <= 1.0 (1.0 disables it)", 0.0, 1.0))
        set_(self, "top_n_sigma", _real("top_n_sigma", self.top_n_sigma, "a finite number (<= 0 disables it)"))
        mirostat = _integer("mirostat", self.mirostat, "0 (off), 1 (mirostat) or 2 (mirostat v2)", 0)
        if mirostat > 2:
            raise ValueError(f"mirostat must be 0 (off), 1 (mirostat) or 2 (mirostat v2), got {mirostat!r}")
        set_(self, "mirostat", mirostat)
        set_(self, "mirostat_tau", _real("mirostat_tau", self.mirostat_tau, "a finite number >= 0 (target surprise, bits)", 0.0))
        set_(self, "mirostat_eta", _real("mirostat_eta", self.mirostat_eta, "a finite number >= 0 (learning rate)", 0.0))
        set_(self, "dry_multiplier", _real("dry_multiplier", self.dry_multiplier, "a finite number >= 0 (0.0 disables DRY)", 0.0))
        set_(self, "dry_base", _real("dry_base", self.dry_base, "a finite number >= 1.0", 1.0))
        set_(self, "dry_allowed_length", _integer("dry_allowed_length", self.dry_allowed_length, "an integer >= 0", 0))
        set_(self, "dry_penalty_last_n", _integer("dry_penalty_last_n", self.dry_penalty_last_n, _LAST_N, -1))
        set_(self, "dry_sequence_breakers", _strings("dry_sequence_breakers", self.dry_sequence_breakers))
        xtc_p = _real("xtc_probability", self.xtc_probability, "0.0 <= xtc_probability <= 1.0 (0.0 disables XTC)", 0.0, 1.0)
        set_(self, "xtc_probability", xtc_p)
        set_(
            self,
            "xtc_threshold",
            _real("xtc_threshold", self.xtc_threshold, "0.0 <= xtc_threshold <= 1.0 (> 0.5 disables XTC)", 0.0, 1.0),
        )
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        set_(self, "ignore_eos", bool(self.ignore_eos))
        set_(self, "samplers", _sampler_names(self.samplers))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 and (self.mirostat != 0 or "temperature" in self.samplers)

    @property
    def penalizes(self) -> bool:
        """llama.cpp's penalties sampler is on (it is a no-op otherwise)."""
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        )

    @property
    def dry(self) -> bool:
        return self.dry_multiplier != 0.0 and self.dry_penalty_last_n != 0

    def check(self, n_vocab: int) -> None:
        """Refuse logit_bias ids outside a vocabulary of ``n_vocab`` tokens (the sampler calls
        this at the first token; a caller who knows the model can call it up front)."""
        if self.logit_bias and self.logit_bias[-1][0] >= n_vocab:
            bad = [t for t, _ in self.logit_bias if t >= n_vocab][0]
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary of {n_vocab} tokens (0..{n_vocab - 1})")


_LAST_N = "an integer >= -1 (0 disables, -1 = whole history)"


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


def _integer(name: str, value: object, allowed: str, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (lo is not None and value < lo):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    allowed = "a mapping of token id (an integer >= 0) to a bias (a finite number, or -inf to ban the token)"
    pairs: Iterable = value.items() if isinstance(value, Mapping) else value  # type: ignore[assignment]
    try:
        pairs = list(pairs)
    except TypeError:
        raise ValueError(f"logit_bias must be {allowed}, got {value!r}") from None
    out: dict[int, float] = {}
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"logit_bias must be {allowed}, got {value!r}")
        token = _integer("logit_bias token id", pair[0], "an integer >= 0", 0)
        bias = pair[1]
        if (
            isinstance(bias, bool)
            or not isinstance(bias, (int, float, np.integer, np.floating))
            or not (math.isfinite(bias) or bias == -math.inf)
        ):
            raise ValueError(f"logit_bias for token {token} must be a finite number or -inf (bans it), got {bias!r}")
        out[token] = out.get(token, 0.0) + float(bias)
    return tuple(sorted(out.items()))


def _strings(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"{name} must be a list of strings, got {value!r}")
    return tuple(value)


def _sampler_names(value: object) -> tuple[str, ...]:
    allowed = f"a list of sampler names from {', '.join(SAMPLERS)}"
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"samplers must be {allowed}, got {value!r}")
    out = []
    for name in value:
        canonical = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else None
        if canonical not in SAMPLERS:
            raise ValueError(f"samplers must be {allowed}, got {name!r}")
        out.append(canonical)
    return tuple(out)


class SamplerVocab(Protocol):
    """What DRY needs from a tokenizer (``edgebox.text.tokenizer.Tokenizer`` is one): each
    token's bytes, as llama.cpp's ``token_to_piece(special=True)``, and plain-text encoding."""

    n_vocab: int

    def token_to_piece(self, id: int) -> bytes: ...

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class TokenLogprobs:
    """One token's log-probability and the ``top`` most likely alternatives, high to low, as
    (token id, log-probability) pairs: OpenAI's ``logprobs`` content entry, in token ids."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def _active(stage: str, p: SamplingParams) -> bool:
    """Whether ``stage`` changes anything with these parameters (llama.cpp's empty samplers)."""
    return {
        "penalties": p.penalizes,
        "dry": p.dry,
        "top_n_sigma": p.top_n_sigma > 0.0,
        "top_k": p.top_k > 0,
        "typ_p": p.typical_p < 1.0,
        "top_p": p.top_p < 1.0,
        "min_p": p.min_p > 0.0,
        "xtc": p.xtc_probability > 0.0 and p.xtc_threshold <= 0.5,
        "temperature": True,
    }[stage]


class Sampler:
    """Picks one token id from a row of logits; keeps its own ``np.random.Generator`` (and one
    for XTC's coin), mirostat's ``mu``, and the DRY breakers of ``vocab``.

    ``vocab`` is needed only for DRY with sequence breakers; ``eog_ids`` (end-of-generation
    tokens) only for ``ignore_eos``, which bans them. The samplers, each written once:

    - penalties: each distinct token among the last ``repeat_last_n`` of the history has its logit
      divided by ``repeat_penalty`` when positive and multiplied when <= 0, then lowered by
      ``count * frequency_penalty + presence_penalty`` (OpenAI's penalties, same window);
    - dry: a token that would extend a repeat of at least ``dry_allowed_length`` tokens of the last
      ``dry_penalty_last_n`` loses ``dry_multiplier * dry_base ** (length - dry_allowed_length)``;
      repeats do not reach across a sequence breaker, and a breaker is never penalized;
    - top_n_sigma keeps the logits within ``top_n_sigma`` standard deviations of the maximum;
    - top_k keeps the k highest logits; top_p the smallest high-to-low prefix whose softmax mass
      reaches p; min_p the tokens whose probability is at least ``min_p`` times the top one's;
    - typ_p keeps the tokens whose surprise is closest to the entropy until their mass exceeds p;
    - xtc, with probability ``xtc_probability`` (its own generator), removes every token whose
      probability is at least ``xtc_threshold`` except the least likely of them;
    - temperature divides the logits; temperature <= 0 keeps only the best one (greedy);
    - mirostat (v1, v2) truncates to reach a target surprise ``mirostat_tau`` and adapts ``mu``
      (starting at 2 tau) by ``mirostat_eta`` after every token (``accept``).
    """

    def __init__(self, params: SamplingParams, vocab: SamplerVocab | None = None, eog_ids: Iterable[int] = ()):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"Sampler needs a SamplingParams, got {type(params).__name__}")
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        # XTC's coin comes from its own stream, as in llama.cpp, so the draw's stream stays aligned.
        self.xtc_rng = np.random.default_rng(None if params.seed is None else [params.seed, 1])
        self.mu = 2.0 * params.mirostat_tau  # mirostat's surprise threshold, updated by accept()
        bias = dict(params.logit_bias)
        if params.ignore_eos:
            for t in eog_ids:
                if int(t) < 0:
                    raise ValueError(f"eog id {t} is not a token id (>= 0)")
                bias[int(t)] = -math.inf
        self._bias_ids = np.array(sorted(bias), dtype=np.int64)
        self._bias = np.array([bias[t] for t in sorted(bias)], dtype=np.float32)
        self._checked_n_vocab = -1
        self._stages = tuple(s for s in params.samplers if _active(s, params))
        self._n_vocab = 0  # of the row being sampled
        self._breakers: dict[int, tuple[tuple[int, ...], ...]] = {}
        if params.dry and params.dry_sequence_breakers and params.mirostat == 0 and "dry" in params.samplers:
            if vocab is None:
                raise ValueError("dry_sequence_breakers need the tokenizer: build the Sampler with vocab=<the model's tokenizer>")
            self._breakers = dry_breakers(vocab, params.dry_sequence_breakers)

    # --- the one entry point the engine uses -------------------------------------------------

    def sample(self, logits: np.ndarray, history: Sequence[int] = (), *, allowed: np.ndarray | None = None) -> int:
        """The next token for ``logits`` (float32 [n_vocab]) given the tokens so far; ``allowed``
        (bool [n_vocab], e.g. a grammar's mask) limits it to the True tokens."""
        ids, probs = self.candidates(logits, history, allowed=allowed)
        return self.pick(ids, probs)

    def pick(self, ids: np.ndarray, probs: np.ndarray) -> int:
        """Draw one of ``candidates()``' tokens and ``accept`` it."""
        # One uniform per call, always (see the module docstring). Inverse CDF: the first
        # candidate whose running mass passes u * total, as llama.cpp's dist sampler does
        # ("right" so that a zero-probability candidate can never be picked).
        u = self.rng.random()
        if ids.size == 1:
            i = 0
        else:
            cdf = np.cumsum(probs)
            i = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), ids.size - 1)
        token = int(ids[i])
        self.accept(token, ids, probs)
        return token

    def pick_draft(self, ids: np.ndarray, probs: np.ndarray, draft: int) -> int:
        """Speculative decoding's draw for a deterministic ``draft`` token (Leviathan et al. 2023;
        llama.cpp's ``common_sampler_sample_and_accept_n``): keep ``draft`` with probability
        p(draft) of ``candidates()``' distribution, else ``pick`` from p without it, renormalized.
        P(x) = p(x) for every x: the draft's own p(d), and (1 - p(d)) p(x) / (1 - p(d)) for the
        others. Greedy (one candidate) keeps the draft iff it is the best token. One uniform, two
        on a rejection. Not for mirostat (its mu follows the distribution actually drawn from)."""
        hit = np.flatnonzero(ids == draft)
        p = float(probs[hit[0]]) / float(probs.sum()) if hit.size else 0.0
        if self.rng.random() < p:
            self.accept(int(draft), ids, probs)
            return int(draft)
        if hit.size:
            rest = np.ones(ids.size, bool)
            rest[hit[0]] = False
            if not probs[rest].sum() > 0.0:  # p(draft) rounds to 1: nothing else can be drawn
                return int(draft)
            ids, probs = ids[rest], probs[rest]
        return self.pick(ids, probs)

    def accept(self, token: int, ids: np.ndarray, probs: np.ndarray) -> None:
        """Advance the state after ``token`` was picked from ``candidates()``' (ids, probs):
        mirostat's mu moves by eta times the error of the token's surprise against tau.
        ``pick`` calls it; a caller that picks tokens itself calls it too."""
        p = self.params
        if p.mirostat == 0:
            return
        hit = np.flatnonzero(ids == token)
        if hit.size == 0:
            raise ValueError(f"token {token} is not one of the candidates")
        surprise = -math.log2(float(probs[hit[0]]))
        self.mu -= p.mirostat_eta * (surprise - p.mirostat_tau)

    # --- the chain -----------------------------------------------------------------------------

    def candidates(
        self, logits: np.ndarray, history: Sequence[int] = (), *, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The distribution the next draw uses: (token ids, probabilities summing to 1).

        Deterministic but for XTC's coin when 0 < xtc_probability < 1; mirostat reads ``mu``.
        ``history`` is every token so far (prompt and generated): the penalty and DRY windows.
        """
        p = self.params
        x = _checked_logits(logits, len(history))
        self._n_vocab = n_vocab = x.size
        if n_vocab != self._checked_n_vocab:
            p.check(n_vocab)
            if self._bias_ids.size and self._bias_ids[-1] >= n_vocab:
                raise ValueError(f"eog id {self._bias_ids[-1]} is outside the vocabulary of {n_vocab} tokens")
            self._checked_n_vocab = n_vocab

        ids: np.ndarray | None = None  # None: the whole vocabulary in id order, vals is x
        vals = x
        if allowed is not None:
            ids = np.flatnonzero(_checked_mask(allowed, n_vocab))
            vals = x[ids]
        if self._bias_ids.size:
            vals = _add_at(ids, vals, self._bias_ids, self._bias)
            if vals.max() == -np.inf:
                raise ValueError("logit_bias and ignore_eos ban every token the request allows: nothing is left to sample")

        if p.mirostat:
            ids, vals = _temperature(ids, vals, p.temperature)
            return self._mirostat(ids, vals, n_vocab)

        stages = self._stages
        if p.greedy:
            # Greedy: everything before temperature that can only lower other tokens or keep the
            # best is skipped for an argmax (the common case); otherwise the chain runs as written.
            t = stages.index("temperature")
            if all(s in _KEEP_THE_BEST for s in stages[:t]):
                stages = tuple(s for s in stages[:t] if s in ("penalties", "dry")) + ("temperature",)
        i = 0
        while i < len(stages):
            if stages[i : i + 2] == ("top_p", "min_p"):  # llama.cpp's default order: one pass for both
                ids, vals = _top_p(ids, vals, p.top_p, p.min_p)
                i += 2
                continue
            ids, vals = self._apply(stages[i], ids, vals, history)
            i += 1
        ids, vals = _finite(ids, vals)
        return _as_ids(ids, vals), _softmax(vals)

    def _apply(self, stage: str, ids, vals, history):
        """One active sampler of the chain (see ``_active``) on the candidates (ids, vals)."""
        p = self.params
        if stage == "penalties":
            return ids, self._penalize(ids, vals, history)
        if stage == "dry":
            return ids, self._dry(ids, vals, history)
        if stage == "top_n_sigma":
            return _top_n_sigma(ids, vals, p.top_n_sigma)
        if stage == "top_k":
            return _top_k(ids, vals, p.top_k) if p.top_k < vals.size else (ids, vals)
        if stage == "typ_p":
            return _typical(ids, vals, p.typical_p)
        if stage == "top_p":
            return _top_p(ids, vals, p.top_p)
        if stage == "min_p":
            return _min_p(ids, vals, p.min_p)
        if stage == "xtc":
            return self._xtc(ids, vals)
        return _temperature(ids, vals, p.temperature)

    def _penalize(self, ids, vals, history):
        p = self.params
        recent = _window(history, p.repeat_last_n)
        if len(recent) == 0:
            return vals
        seen, counts = np.unique(_checked_ids(recent, self._n_vocab), return_counts=True)
        where, hit = _positions(ids, seen)
        if where.size == 0:
            return vals
        vals = vals.copy()  # never modify the caller's logits
        v = vals[where]
        rp = np.float32(p.repeat_penalty)
        v = np.where(v <= 0, v * rp, v / rp)  # once per distinct token, not per occurrence
        c = counts[hit].astype(np.float32)
        vals[where] = v - (c * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty))
        return vals

    def _dry(self, ids, vals, history):
        p = self.params
        window = _checked_ids(_window(history, p.dry_penalty_last_n), self._n_vocab).tolist()
        repeats = dry_repeats(window, self._breakers, p.dry_allowed_length)
        if not repeats:
            return vals
        tokens = np.array([t for t in repeats if () not in self._breakers.get(t, ())], dtype=np.int64)
        lengths = np.array([repeats[t] for t in tokens.tolist()], dtype=np.int64)
        where, hit = _positions(ids, tokens)
        if where.size == 0:
            return vals
        exponent = lengths[hit] - p.dry_allowed_length
        if p.dry_base > 1.000001:  # clamp so that base ** exponent stays a finite float32
            exponent = np.minimum(exponent, int(np.float32(88.7228391) / np.float32(math.log(p.dry_base))))
        penalty = (np.float32(p.dry_multiplier) * np.float64(np.float32(p.dry_base)) ** exponent).astype(np.float32)
        vals = vals.copy()
        vals[where] -= penalty
        return vals

    def _xtc(self, ids, vals):
        p = self.params
        if vals.size < 2 or np.float32(self.xtc_rng.random()) > np.float32(p.xtc_probability):
            return ids, vals
        ids, vals = _finite(ids, vals)
        above = np.flatnonzero(_softmax(vals) >= np.float32(p.xtc_threshold))
        if above.size < 2:
            return ids, vals
        # remove them all but the least likely one (ties: the highest id stays)
        ids = _as_ids(ids, vals)
        order = above[np.lexsort((ids[above], -vals[above]))]
        keep = np.ones(vals.size, bool)
        keep[order[:-1]] = False
        return ids[keep], vals[keep]

    def _mirostat(self, ids, vals, n_vocab: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        ids, vals = _finite(ids, vals)
        v = vals.astype(np.float64)
        top = float(v.max())
        if p.mirostat == 2:
            # the high-to-low prefix whose surprise -log2(p) stays <= mu, at least the best token:
            # p_i >= 2^-mu, i.e. v_i >= top + log(sum exp(v - top)) - mu ln 2, with no sort
            log_total = math.log(float(np.exp(v - top).sum()))
            keep = np.flatnonzero(v >= top + log_total - self.mu * math.log(2.0))
            if keep.size == 0:
                keep = _best(ids, vals, 1)
        else:
            # mirostat 1: estimate the Zipf exponent s from the m = 100 best tokens (from the
            # ratios of neighbouring probabilities), then top-k with the k that gives surprise mu
            best = v[_best(ids, vals, min(100, vals.size))]
            i = np.arange(best.size - 1)
            t = np.log((i + 2.0) / (i + 1.0))
            with np.errstate(all="ignore"):
                s_hat = float((t * (best[:-1] - best[1:])).sum() / (t * t).sum())
                eps = s_hat - 1.0
                k = (eps * 2.0**self.mu / (1.0 - float(n_vocab) ** -eps)) ** (1.0 / s_hat)
            k = max(int(k), 1) if math.isfinite(k) else (vals.size if k == math.inf else 1)
            keep = _best(ids, vals, min(k, vals.size))
        ids, vals = _take(ids, vals, keep)
        return ids, _softmax(vals)

    # --- logprobs ------------------------------------------------------------------------------

    def logprobs(self, logits: np.ndarray, token: int, top_n: int = 0) -> TokenLogprobs:
        """OpenAI's ``logprobs``/``top_logprobs`` for ``token``: the log-softmax over the whole
        vocabulary of the raw logits plus ``logit_bias`` (and ignore_eos's bans), before the
        penalties, filters and temperature, as llama-server and vLLM report them. For the
        distribution the draw used (llama.cpp's ``n_probs`` after sampling), see
        ``chain_logprobs``."""
        x = _checked_logits(logits, 0)
        if self._bias_ids.size:
            self.params.check(x.size)
            x = _add_at(None, x, self._bias_ids, self._bias)
        return chain_logprobs(np.arange(x.size), x, token, top_n, are_logits=True)


def chain_logprobs(ids: np.ndarray, probs: np.ndarray, token: int, top_n: int = 0, are_logits: bool = False) -> TokenLogprobs:
    """``token``'s log-probability and the ``top_n`` best alternatives in a distribution over
    ``ids``: ``candidates()``' (ids, probs) gives llama.cpp's post-sampling ``n_probs`` (a token
    the chain removed has -inf). With ``are_logits`` the values are logits, log-softmaxed here."""
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 0:
        raise ValueError(f"top_logprobs must be an integer >= 0, got {top_n!r}")
    ids = np.asarray(ids)
    if are_logits:
        v = np.asarray(probs, dtype=np.float64)
        top = float(v.max())
        logp = v - (top + math.log(float(np.exp(v - top).sum())))
    else:
        with np.errstate(divide="ignore"):
            logp = np.log(np.asarray(probs, dtype=np.float64))
    hit = np.flatnonzero(ids == token)
    own = float(logp[hit[0]]) if hit.size else -math.inf
    best = _best(ids, logp, min(int(top_n), ids.size)) if top_n else np.zeros(0, np.int64)
    return TokenLogprobs(int(token), own, tuple((int(ids[i]), float(logp[i])) for i in best))


# --- DRY: breakers and repeats -------------------------------------------------------------------

_BREAKER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dry_breakers(vocab: SamplerVocab, breakers: Sequence[str]) -> dict[int, tuple[tuple[int, ...], ...]]:
    """DRY's sequence breakers as token sequences: head token -> the token tails that complete a
    breaker after it (``()``: the head holds a whole breaker). As llama.cpp: a token whose text
    contains the breaker is a head with no tail; a token whose text ends with the breaker's first
    bytes is a head whose tail is the encoding of the rest (at most 20 tokens). Cached per vocab."""
    per_vocab = _BREAKER_CACHE.setdefault(vocab, {})
    key = tuple(breakers)
    if key in per_vocab:
        return per_vocab[key]
    out: dict[int, list[tuple[int, ...]]] = {}
    pieces = [vocab.token_to_piece(i) for i in range(vocab.n_vocab)]
    for breaker in breakers:
        b = breaker.encode()[:_DRY_MAX_CHARS]
        if not b:
            continue
        first = b[:1]
        for token, word in enumerate(pieces):
            if b in word:
                tails = out.setdefault(token, [])
                if () not in tails:
                    tails.append(())
                continue
            pos = word.find(first)
            while pos >= 0:
                overlap = len(word) - pos  # the word's tail must be the breaker's head
                if word[pos:] == b[:overlap]:
                    rest = b[overlap:].decode("utf-8", errors="replace")
                    tail = tuple(vocab.encode(rest, add_bos=False, parse_special=False)[:_DRY_MAX_TAIL])
                    tails = out.setdefault(token, [])
                    if tail not in tails:
                        tails.append(tail)
                pos = word.find(first, pos + 1)
    result = {t: tuple(tails) for t, tails in out.items()}
    per_vocab[key] = result
    return result


def dry_repeats(window: list[int], breakers: Mapping[int, Sequence[tuple[int, ...]]], allowed_length: int) -> dict[int, int]:
    """token -> the length of the longest repeat (at least ``allowed_length``) that the token
    would extend if it came next after ``window``; repeats are cut at the last sequence breaker.

    In the reversed window r (r[0] the last token), z[k] = how many tokens r[k:] shares with r
    from its start: the repeat that ends k tokens ago, and r[k - 1] is what followed it.
    """
    n = len(window)
    if n <= allowed_length:
        return {}
    r = window[::-1]
    limit = n
    for i, token in enumerate(r):  # the most recent breaker, longest tail first
        tails = breakers.get(token)
        if not tails:
            continue
        longest = max((len(t) for t in tails if len(t) <= i and all(t[o] == r[i - o - 1] for o in range(len(t)))), default=-1)
        if longest >= 0:
            limit = i - longest
            break
    if limit < allowed_length:
        return {}
    out: dict[int, int] = {}
    for k, length in enumerate(_z_array(r)):
        length = min(length, limit)
        if k > 0 and length >= allowed_length and out.get(r[k - 1], -1) < length:
            out[r[k - 1]] = length
    return out


def _z_array(s: list[int]) -> list[int]:
    """z[k] = the length of the longest common prefix of s and s[k:] (z[0] = 0): the
    Z-algorithm, linear in len(s)."""
    n = len(s)
    z = [0] * n
    lt = rt = 0
    for k in range(1, n):
        m = min(rt - k, z[k - lt]) if k < rt else 0
        while k + m < n and s[m] == s[k + m]:
            m += 1
        z[k] = m
        if k + m > rt:
            lt, rt = k, k + m
    return z


# --- candidate arrays: (ids, vals), ids None = the whole vocabulary in id order ------------------


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


def _checked_mask(allowed: np.ndarray, n_vocab: int) -> np.ndarray:
    mask = np.asarray(allowed)
    if mask.dtype != np.bool_ or mask.shape != (n_vocab,):
        raise ValueError(f"allowed must be a boolean array [n_vocab] = [{n_vocab}], got {mask.dtype} {mask.shape}")
    if not mask.any():
        raise ValueError("allowed (the grammar's mask) allows no token: the constraint cannot continue")
    return mask


def _checked_ids(tokens, n_vocab: int) -> np.ndarray:
    a = np.asarray(tokens, dtype=np.int64)
    if a.size and (a.min() < 0 or a.max() >= n_vocab):
        raise ValueError(f"history token ids must be in [0, {n_vocab}), got {a.min()}..{a.max()}")
    return a


def _window(history: Sequence[int], last_n: int) -> Sequence[int]:
    # Slice before converting: the engine passes its whole growing history every token.
    if last_n < 0 or len(history) <= last_n:
        return history
    return history[len(history) - last_n :]


def _positions(ids: np.ndarray | None, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where ``tokens`` sit among the candidates: (positions, indices into ``tokens`` found)."""
    if ids is None:
        return tokens, np.arange(tokens.size)
    order = np.argsort(ids, kind="stable")
    at = np.searchsorted(ids[order], tokens)
    at = np.minimum(at, ids.size - 1)
    hit = np.flatnonzero(ids[order[at]] == tokens)
    return order[at[hit]], hit


def _add_at(ids, vals, tokens, amounts):
    where, hit = _positions(ids, tokens)
    vals = vals.copy()
    vals[where] += amounts[hit]
    return vals


def _finite(ids, vals):
    """Drop the candidates at -inf (banned, masked): they can never be drawn."""
    if vals.min() > -np.inf:
        return ids, vals
    return _take(ids, vals, np.flatnonzero(vals > -np.inf))


def _take(ids, vals, pos: np.ndarray):
    """The candidates at positions ``pos``."""
    return (pos if ids is None else ids[pos]), vals[pos]


def _as_ids(ids, vals) -> np.ndarray:
    return np.arange(vals.size) if ids is None else ids


def _softmax(vals: np.ndarray) -> np.ndarray:
    z = np.exp(vals.astype(np.float64) - float(vals.max()))
    return z / z.sum()


def _best(ids: np.ndarray | None, vals: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest values (0 < k <= size), high to low, ties to the lower id
    (``ids`` None: the positions are the ids)."""
    n = vals.size
    key = np.arange(n) if ids is None and k >= n else ids
    if k >= n:
        return np.lexsort((key, -vals))
    if n >= 16384 and k <= n // 64:
        # A strided sample's r-th best value t bounds the search: usually a few hundred values
        # are >= t, and whenever at least k are, the k best are among them (exact, not a guess).
        sample = vals[::16]
        r = min(sample.size, 2 * k // 16 + 8)
        t = np.partition(sample, sample.size - r)[sample.size - r]
        pos = np.flatnonzero(vals >= t)
        if k <= pos.size < n // 4:
            return pos[_best(pos if ids is None else ids[pos], vals[pos], k)]
    # argpartition is O(n) where a sort is O(n log n); then take every position strictly above
    # the k-th value and fill the remaining places with the lowest ids equal to it, so ties at
    # the cut do not depend on argpartition's internal order.
    kth = vals[np.argpartition(vals, n - k)[n - k]]
    above = np.flatnonzero(vals > kth)
    at = np.flatnonzero(vals == kth)
    if ids is not None:
        at = at[np.argsort(ids[at], kind="stable")]
    pos = np.concatenate([above, at[: k - above.size]])
    return pos[np.lexsort((pos if ids is None else ids[pos], -vals[pos]))]  # value descending, then id


def _top_k(ids, vals, k: int):
    return _finite(*_take(ids, vals, _best(ids, vals, k)))


def _top_p(ids, vals, top_p: float, min_p: float = 0.0):
    """The smallest high-to-low prefix whose mass reaches p (all of them if rounding never does);
    with ``min_p``, min-p right after it.

    Both keep a high-to-low prefix and min-p's threshold depends only on the best token, which
    top-p always keeps, so the pair keeps the shorter prefix: filtering by min-p first leaves
    fewer tokens to sort (top-p's mass still counts everything before min-p).
    """
    ids, vals = _finite(ids, vals)
    ids = _as_ids(ids, vals)
    p = float(np.float32(top_p))
    vmax = float(vals.max())
    total = float(np.exp(vals.astype(np.float64) - vmax).sum())
    if min_p > 0.0:
        ids, vals = _min_p(ids, vals, min_p)
    if vals.size > _TOP_P_FIRST_GUESS * 4:  # most of the mass sits in the first 256: try those
        best = _best(ids, vals, _TOP_P_FIRST_GUESS)
        cut = _mass_cut(vals[best], total, vmax, p)
        if cut > 0:
            return ids[best[:cut]], vals[best[:cut]]
    order = np.lexsort((ids, -vals))  # logit descending, then id ascending
    cut = _mass_cut(vals[order], total, vmax, p)
    order = order[:cut] if cut > 0 else order
    return ids[order], vals[order]


def _mass_cut(sorted_vals: np.ndarray, total: float, vmax: float, p: float) -> int:
    """How many of the high-to-low logits top-p keeps, or -1 if their mass never reaches p."""
    mass = np.cumsum(np.exp(sorted_vals.astype(np.float64) - vmax)) / total
    reach = np.flatnonzero(mass >= p)
    return int(reach[0]) + 1 if reach.size else -1


def _min_p(ids, vals, min_p: float):
    """p_i >= min_p * p_max, written on logits (float32, as llama.cpp): it needs no softmax."""
    keep = vals >= np.float32(vals.max()) + _log32(min_p)
    return _take(ids, vals, np.flatnonzero(keep))


def _top_n_sigma(ids, vals, n: float):
    ids, vals = _finite(ids, vals)
    if vals.size <= 1:
        return ids, vals
    v = vals.astype(np.float64)
    return _take(ids, vals, np.flatnonzero(v >= v.max() - n * v.std()))


def _typical(ids, vals, typical_p: float):
    """Locally typical sampling: order by |surprise - entropy|, keep until the mass exceeds p."""
    ids, vals = _finite(ids, vals)
    ids = _as_ids(ids, vals)
    probs = _softmax(vals)
    with np.errstate(divide="ignore"):
        logp = np.log(probs)
    entropy = -float((probs * np.where(probs > 0, logp, 0.0)).sum())
    shifted = np.abs(-logp - entropy)
    order = np.lexsort((ids, -vals, shifted))
    mass = np.cumsum(probs[order])
    over = np.flatnonzero(mass > float(np.float32(typical_p)))
    order = order[: int(over[0]) + 1] if over.size else order
    return ids[order], vals[order]


def _temperature(ids, vals, temperature: float):
    if temperature <= 0.0:  # greedy: only the best (the lowest id on ties)
        if ids is None:
            i = int(np.argmax(vals))  # the first maximum: the lowest id
            return np.array([i]), vals[i : i + 1]
        i = np.flatnonzero(vals == vals.max())
        i = i[np.argmin(ids[i])]
        return ids[i : i + 1], vals[i : i + 1]
    return ids, vals.astype(np.float64) / temperature


def _log32(p: float) -> np.float32:
    """log(p) in float32 as llama.cpp's ``logf`` computes it: a p that float32 rounds to 0 (min_p
    = 1e-49) is -inf, which keeps every candidate, not a math domain error."""
    with np.errstate(divide="ignore"):
        return np.log(np.float32(p))
