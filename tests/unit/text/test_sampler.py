"""Sampler (llama.cpp's default chain)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgebox.errors import ModelError
from edgebox.text.sampler import NonFiniteLogitsError, Sampler, SamplingParams

# Only the filters under test: every other one disabled.
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def sampler(seed: int = 1234, **kw) -> Sampler:
    return Sampler(SamplingParams(seed=seed, **kw))


def draws(s: Sampler, logits, n: int, history=()) -> np.ndarray:
    return np.array([s.sample(logits, history) for _ in range(n)])


def logits_for(probs) -> np.ndarray:
    return np.log(np.asarray(probs, np.float64)).astype(np.float32)


# --- SamplingParams -----------------------------------------------------------------------------


def test_defaults_are_llama_cpp_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.repeat_last_n, p.seed) == (
        0.8,
        40,
        0.95,
        0.05,
        1.0,
        64,
        None,
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "hot"),
        ("temperature", True),
        ("top_k", 2.5),
        ("top_k", True),
        ("top_p", -0.1),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("repeat_penalty", 0.0),
        ("repeat_penalty", -1.0),
        ("repeat_penalty", math.inf),
        ("repeat_last_n", -2),
        ("repeat_last_n", 1.0),
        ("seed", -1),
        ("seed", 1.5),
        ("seed", False),
    ],
)
def test_bad_values_name_the_field_and_the_range(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field} must be ")
    assert repr(value) in message


def test_numbers_are_normalized_to_their_types():
    p = SamplingParams(temperature=1, top_p=1, top_k=np.int64(5), seed=np.uint32(7))
    assert type(p.temperature) is float and type(p.top_p) is float
    assert type(p.top_k) is int and type(p.seed) is int


# --- greedy ---------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    s = sampler(temperature=0.0)
    for _ in range(50):
        x = rng.standard_normal(1000).astype(np.float32)
        assert s.sample(x) == int(np.argmax(x))


def test_greedy_ties_go_to_the_lowest_id_and_negative_temperature_is_greedy():
    x = np.array([0.0, 3.0, 1.0, 3.0, 3.0], np.float32)
    assert sampler(temperature=0.0).sample(x) == 1
    assert sampler(temperature=-1.0).sample(x) == 1


def test_top_k_1_is_greedy():
    rng = np.random.default_rng(1)
    for temperature in (0.5, 1.0, 3.0):
        s = sampler(temperature=temperature, top_k=1, top_p=1.0, min_p=0.0)
        for _ in range(30):
            x = rng.standard_normal(5000).astype(np.float32)
            assert s.sample(x) == int(np.argmax(x))


# --- seeds ------------------------------------------------------------------------------------------


def test_same_seed_same_logits_sequence_gives_same_tokens():
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((200, 3000)).astype(np.float32) * 2
    a, b, c = sampler(seed=42), sampler(seed=42), sampler(seed=43)
    ta = [a.sample(r) for r in rows]
    assert ta == [b.sample(r) for r in rows]
    assert ta != [c.sample(r) for r in rows]


def test_one_random_draw_per_call_whatever_the_parameters():
    # The stream stays aligned with llama.cpp's dist sampler: greedy calls consume a draw too.
    x = np.arange(10, dtype=np.float32)
    s = sampler(seed=5, temperature=0.0)
    for _ in range(3):
        s.sample(x)
    ref = np.random.default_rng(5)
    ref.random(3)
    assert s.rng.random() == ref.random()


# --- filters ---------------------------------------------------------------------------------------


def test_top_k_keeps_the_k_best_with_ties_at_the_cut_to_the_lowest_ids():
    x = np.array([5.0, 1.0, 4.0, 4.0, 0.0, 4.0], np.float32)
    ids, probs = sampler(**{**PLAIN, "top_k": 3}).candidates(x)
    assert ids.tolist() == [0, 2, 3]
    assert probs.sum() == pytest.approx(1.0)


def test_top_p_excludes_the_tail():
    x = logits_for([0.50, 0.30, 0.15, 0.05])
    s = sampler(**{**PLAIN, "top_p": 0.75})  # 0.5 < 0.75 <= 0.8: keeps tokens 0 and 1
    assert s.candidates(x)[0].tolist() == [0, 1]
    got = draws(s, x, 4000)
    assert set(got.tolist()) == {0, 1}
    assert abs((got == 0).mean() - 0.5 / 0.8) < 0.03  # renormalized over the survivors


def test_min_p_excludes_tokens_below_a_fraction_of_the_best():
    x = logits_for([0.50, 0.30, 0.15, 0.05])
    s = sampler(**{**PLAIN, "min_p": 0.2})  # threshold 0.1: keeps 0, 1, 2
    assert s.candidates(x)[0].tolist() == [0, 1, 2]
    got = draws(s, x, 4000)
    assert set(got.tolist()) == {0, 1, 2}


def test_min_p_does_not_depend_on_temperature():
    x = logits_for([0.50, 0.30, 0.15, 0.05])
    for temperature in (0.3, 1.0, 5.0):
        ids, _ = sampler(**{**PLAIN, "min_p": 0.2, "temperature": temperature}).candidates(x)
        assert ids.tolist() == [0, 1, 2]


def test_temperature_draws_follow_softmax_of_logits_over_t():
    x = np.array([2.0, 1.2, 0.5, 0.0, -0.7, -1.5], np.float32)
    n = 20000
    for temperature in (0.7, 1.6):
        got = draws(sampler(seed=7, **{**PLAIN, "temperature": temperature}), x, n)
        z = np.exp((x - x.max()) / temperature)
        expected = n * z / z.sum()
        observed = np.bincount(got, minlength=x.size)
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001


def test_draws_never_pick_masked_tokens():
    x = np.full(50, -np.inf, np.float32)
    x[[3, 17]] = [0.0, 0.5]
    assert set(draws(sampler(**PLAIN), x, 500).tolist()) == {3, 17}


def _reference_chain(x: np.ndarray, history, p: SamplingParams) -> dict[int, float]:
    """llama.cpp's chain the slow, obvious way: full sorts, every step on its own."""
    x = x.astype(np.float32).copy()
    if p.repeat_penalty != 1.0 and p.repeat_last_n != 0:
        recent = list(history) if p.repeat_last_n < 0 else list(history)[-p.repeat_last_n :]
        for t in set(recent):
            x[t] = x[t] * np.float32(p.repeat_penalty) if x[t] <= 0 else x[t] / np.float32(p.repeat_penalty)
    if p.temperature <= 0:
        return {int(np.argmax(x)): 1.0}
    order = np.lexsort((np.arange(x.size), -x))
    if p.top_k > 0:
        order = order[: p.top_k]
    if p.top_p < 1.0:
        e = np.exp(x[order].astype(np.float64) - x[order[0]])
        mass = np.cumsum(e / e.sum())
        order = order[: int(np.argmax(mass >= p.top_p)) + 1]
    if p.min_p > 0.0:
        order = order[x[order] >= x[order[0]] + np.float32(math.log(p.min_p))]
    z = np.exp((x[order].astype(np.float64) - x[order[0]]) / p.temperature)
    return dict(zip(order.tolist(), (z / z.sum()).tolist()))


@pytest.mark.parametrize(
    "kw, spread",
    [
        (dict(), 2.5),  # llama.cpp defaults
        (dict(top_k=0), 2.5),  # top-p + min-p over the whole vocabulary
        (dict(top_k=0, min_p=0.0), 5.0),  # top-p alone: the 256 first guess holds p
        (dict(top_k=0, min_p=0.0), 2.5),  # ... it does not: full sort
        (dict(top_k=0, min_p=0.0, top_p=0.999), 2.5),
        (dict(top_k=500, top_p=0.9, min_p=0.0), 2.5),
        (dict(top_k=0, top_p=1.0, min_p=0.02, temperature=1.3), 2.5),
        (dict(top_k=7, top_p=1.0, min_p=0.0, repeat_penalty=1.3, repeat_last_n=16), 2.5),
        (dict(repeat_penalty=0.8, repeat_last_n=-1), 2.5),
    ],
)
def test_candidates_match_a_plain_implementation_of_the_chain_on_a_large_vocab(kw, spread):
    rng = np.random.default_rng(3)
    s = Sampler(SamplingParams(seed=0, **kw))
    for _ in range(3):
        x = (rng.standard_normal(20000) * spread).astype(np.float32)
        history = rng.integers(0, x.size, 100).tolist()
        ids, probs = s.candidates(x, history)
        ref = _reference_chain(x, history, s.params)
        assert sorted(ids.tolist()) == sorted(ref)
        assert np.allclose(probs, [ref[i] for i in ids.tolist()], rtol=1e-9, atol=1e-12)


def test_a_150k_vocabulary_with_default_params_keeps_at_most_top_k():
    x = (np.random.default_rng(4).standard_normal(151_936) * 3).astype(np.float32)
    s = sampler()
    ids, _ = s.candidates(x, list(range(2000)))
    assert 1 <= ids.size <= 40
    assert s.sample(x, list(range(2000))) in set(ids.tolist())


# --- repetition penalty -----------------------------------------------------------------------------


def _penalized(x, history, **kw) -> np.ndarray:
    """The logits after the penalty, up to a constant: log-probabilities at T = 1, no filters."""
    ids, probs = sampler(**{**PLAIN, **kw}).candidates(np.asarray(x, np.float32), history)
    out = np.empty(len(x))
    out[ids] = np.log(probs)
    return out


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    x = [2.0, -1.0, 0.0, 3.0, 0.5]
    got = _penalized(x, [0, 1, 2, 0, 0], repeat_penalty=2.0)
    # token 0: 2 / 2 = 1; token 1: -1 * 2 = -2; token 2: 0 stays 0; 3 and 4 untouched; once per
    # distinct token however often it repeats
    want = np.array([1.0, -2.0, 0.0, 3.0, 0.5])
    assert np.allclose(got - got[3], want - want[3], atol=1e-6)


def test_repeat_penalty_window_is_the_last_n_tokens():
    x = [1.0, 1.0, 1.0]
    history = [0, 1, 1, 2]
    last2 = _penalized(x, history, repeat_penalty=2.0, repeat_last_n=2)
    assert np.allclose(last2 - last2[0], [0.0, -0.5, -0.5], atol=1e-6)
    everything = _penalized(x, history, repeat_penalty=2.0, repeat_last_n=-1)
    assert np.allclose(everything - everything[0], [0.0, 0.0, 0.0], atol=1e-6)
    disabled = _penalized(x, history, repeat_penalty=2.0, repeat_last_n=0)
    assert np.allclose(disabled, disabled[0])


def test_greedy_sees_the_penalty():
    x = np.array([2.0, 1.5, -3.0], np.float32)
    assert sampler(temperature=0.0, repeat_penalty=2.0).sample(x, [0]) == 1
    assert sampler(temperature=0.0, repeat_penalty=2.0).sample(x, [2]) == 0


def test_callers_logits_are_not_modified():
    x = np.array([2.0, -1.0, 0.5], np.float32)
    before = x.copy()
    sampler(repeat_penalty=1.5).sample(x, [0, 1])
    assert np.array_equal(x, before)


@pytest.mark.parametrize(
    "logits",
    [
        np.zeros((2, 3), np.float32),
        np.zeros(0, np.float32),
        np.array([0.0, np.nan], np.float32),
        np.array([np.inf, 0.0], np.float32),
    ],
)
def test_bad_logits_are_refused(logits):
    with pytest.raises(ValueError, match="logits"):
        sampler().sample(logits)


def test_history_ids_out_of_range_are_refused():
    with pytest.raises(ValueError, match="history token ids"):
        sampler(repeat_penalty=1.1).sample(np.zeros(4, np.float32), [1, 4])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logits_are_a_model_error_naming_the_token(bad):
    """Corrupt weights: a ModelError (one line, exit 2 at the CLI) that is also the ValueError the
    sampler raises for its other refusals; the position is the history's length."""
    logits = np.array([0.0, bad, 1.0], np.float32)
    with pytest.raises(NonFiniteLogitsError) as err:
        sampler().sample(logits, [0, 2, 1])
    assert isinstance(err.value, ModelError) and isinstance(err.value, ValueError)
    assert "non-finite logits" in str(err.value) and "at token 3" in str(err.value)


def test_masked_tokens_at_minus_inf_are_still_sampled():
    logits = np.array([-np.inf, 2.0, -np.inf], np.float32)
    assert sampler(temperature=0.0).sample(logits) == 1
    assert sampler(temperature=1.0, seed=1).sample(logits) == 1
