"""Sampler (llama.cpp's default chain)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from edgebox.errors import ModelError
from edgebox.gguf.file import read_fields
from edgebox.text.sampler import (
    DEFAULT_SAMPLERS,
    NonFiniteLogitsError,
    Sampler,
    SamplingParams,
    _z_array,
    chain_logprobs,
    dry_breakers,
    dry_repeats,
)
from edgebox.text.tokenizer import Tokenizer
from tests.fixtures.paths import vocab_path

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
        ("presence_penalty", math.nan),
        ("frequency_penalty", math.inf),
        ("frequency_penalty", "1"),
        ("typical_p", 1.5),
        ("typical_p", -0.5),
        ("top_n_sigma", math.nan),
        ("mirostat", 3),
        ("mirostat", -1),
        ("mirostat", 2.0),
        ("mirostat_tau", -1.0),
        ("mirostat_eta", math.inf),
        ("dry_multiplier", -0.5),
        ("dry_base", 0.5),
        ("dry_allowed_length", -1),
        ("dry_penalty_last_n", -2),
        ("dry_sequence_breakers", "\n"),
        ("dry_sequence_breakers", ["\n", 3]),
        ("xtc_probability", 1.5),
        ("xtc_threshold", -0.1),
        ("ignore_eos", "yes"),
        ("samplers", "top_k;top_p"),
        ("logit_bias", 5),
    ],
)
def test_bad_values_name_the_field_and_the_range(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field} must be ")
    assert repr(value) in message


def test_new_defaults_are_llama_cpps_common_params_sampling():
    p = SamplingParams()
    assert (p.presence_penalty, p.frequency_penalty, p.typical_p, p.top_n_sigma) == (0.0, 0.0, 1.0, -1.0)
    assert (p.mirostat, p.mirostat_tau, p.mirostat_eta) == (0, 5.0, 0.1)
    assert (p.dry_multiplier, p.dry_base, p.dry_allowed_length, p.dry_penalty_last_n) == (0.0, 1.75, 2, 64)
    assert p.dry_sequence_breakers == ("\n", ":", '"', "*")
    assert (p.xtc_probability, p.xtc_threshold, p.ignore_eos, p.logit_bias) == (0.0, 0.1, False, ())
    assert p.samplers == DEFAULT_SAMPLERS == (
        "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature",
    )  # fmt: skip


def test_sampler_names_take_llama_cpps_aliases_and_refuse_others():
    p = SamplingParams(samplers=["Top-K", "nucleus", "minp", "typ", "temp", "top_n_sigma"])
    assert p.samplers == ("top_k", "top_p", "min_p", "typ_p", "temperature", "top_n_sigma")
    with pytest.raises(ValueError, match=r"^samplers must be a list of sampler names from penalties, .*got 'infill'"):
        SamplingParams(samplers=["top_k", "infill"])
    assert SamplingParams(samplers=[]).samplers == ()


def test_logit_bias_is_checked_and_stored_as_sorted_pairs():
    assert SamplingParams(logit_bias={7: 1, 2: -math.inf}).logit_bias == ((2, -math.inf), (7, 1.0))
    with pytest.raises(ValueError, match=r"^logit_bias token id must be an integer >= 0, got -1"):
        SamplingParams(logit_bias={-1: 1.0})
    for bad in (math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match=r"^logit_bias for token 3 must be a finite number or -inf"):
            SamplingParams(logit_bias={3: bad})


def test_logit_bias_ids_outside_the_vocabulary_name_the_id_and_the_size():
    p = SamplingParams(logit_bias={5: 1.0, 40: 2.0})
    p.check(41)
    with pytest.raises(ValueError, match=r"^logit_bias token id 40 is outside the vocabulary of 10 tokens \(0\.\.9\)$"):
        p.check(10)
    with pytest.raises(ValueError, match="logit_bias token id 40"):
        Sampler(p).sample(np.zeros(10, np.float32))


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


# --- logit bias, ignore_eos, the grammar mask -----------------------------------------------------


def test_logit_bias_adds_to_the_logits_and_minus_inf_bans():
    x = np.zeros(6, np.float32)
    ids, probs = sampler(**PLAIN, logit_bias={1: math.log(3.0), 4: -math.inf}).candidates(x)
    got = dict(zip(ids.tolist(), probs.tolist()))
    assert 4 not in got and got[1] == pytest.approx(3 * got[0]) and got[0] == pytest.approx(got[5])
    assert sampler(temperature=0.0, logit_bias={0: -math.inf}).sample(np.array([5.0, 1.0, 2.0], np.float32)) == 2


def test_ignore_eos_bans_the_eog_ids_the_sampler_is_given():
    x = np.array([0.0, 9.0, 0.5, 9.0], np.float32)
    banned = Sampler(SamplingParams(temperature=0.0, ignore_eos=True), eog_ids=[1, 3])
    assert banned.sample(x) == 2
    assert Sampler(SamplingParams(temperature=0.0), eog_ids=[1, 3]).sample(x) == 1  # only with ignore_eos
    s = Sampler(SamplingParams(seed=3, ignore_eos=True, **PLAIN), eog_ids=[1, 3])
    assert not {1, 3} & set(draws(s, x, 300).tolist())
    with pytest.raises(ValueError, match="eog id 7 is outside the vocabulary of 4 tokens"):
        Sampler(SamplingParams(ignore_eos=True), eog_ids=[7]).sample(x)


def test_allowed_mask_comes_first_and_is_never_left():
    rng = np.random.default_rng(9)
    x = (rng.standard_normal(5000) * 3).astype(np.float32)
    allowed = np.zeros(x.size, bool)
    allowed[rng.choice(x.size, 25, replace=False)] = True
    for kw in ({}, {"temperature": 0.0}, {"top_k": 3}, {"mirostat": 2}, {"repeat_penalty": 1.5, "typical_p": 0.5}):
        s = sampler(seed=2, **kw)
        got = [s.sample(x, [0, 1, 2], allowed=allowed) for _ in range(50)]
        assert all(allowed[got])
    assert sampler(temperature=0.0).sample(x, allowed=allowed) == int(np.flatnonzero(allowed)[np.argmax(x[allowed])])


def test_allowed_mask_refuses_nothing_allowed_and_wrong_shapes():
    x = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="allows no token"):
        sampler().sample(x, allowed=np.zeros(4, bool))
    with pytest.raises(ValueError, match=r"allowed must be a boolean array \[n_vocab\] = \[4\]"):
        sampler().sample(x, allowed=np.ones(5, bool))
    with pytest.raises(ValueError, match="nothing is left to sample"):
        sampler(logit_bias={2: -math.inf}).sample(x, allowed=np.array([False, False, True, False]))


# --- presence and frequency penalties ---------------------------------------------------------------


def test_presence_and_frequency_penalties_are_openais_over_the_window():
    x = [1.0, 1.0, 1.0, 1.0]
    got = _penalized(x, [3, 0, 0, 1], frequency_penalty=0.5, presence_penalty=1.0, repeat_last_n=3)
    # window [0, 0, 1]: token 0 seen twice, token 1 once, token 3 fell out of the window
    want = np.array([1 - (2 * 0.5 + 1.0), 1 - (0.5 + 1.0), 1.0, 1.0])
    assert np.allclose(got - got[2], want - want[2], atol=1e-6)


def test_penalties_run_with_repeat_penalty_one_when_an_openai_penalty_is_set():
    assert SamplingParams(presence_penalty=0.5).penalizes and not SamplingParams().penalizes
    assert not SamplingParams(presence_penalty=0.5, repeat_last_n=0).penalizes


# --- sampler order, typical, top-n-sigma, XTC, mirostat --------------------------------------------


def test_order_matters_temperature_before_min_p_changes_what_min_p_keeps():
    x = logits_for([0.50, 0.30, 0.15, 0.05])
    after = sampler(min_p=0.2, top_k=0, top_p=1.0, temperature=3.0)  # llama.cpp's order: min-p first
    before = sampler(min_p=0.2, top_k=0, top_p=1.0, temperature=3.0, samplers=["temperature", "min_p"])
    assert after.candidates(x)[0].tolist() == [0, 1, 2]
    assert before.candidates(x)[0].tolist() == [0, 1, 2, 3]  # flattened by T = 3 first


def test_greedy_after_typical_is_the_best_typical_token_not_the_argmax():
    # entropy 1.50 nats: the 0.15 tokens (surprise 1.90) are more typical than the 0.4 one (0.92)
    x = logits_for([0.40, 0.15, 0.15, 0.15, 0.15])
    s = sampler(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=0.2)
    assert s.candidates(x)[0].tolist() == [1]
    assert sampler(temperature=0.0).candidates(x)[0].tolist() == [0]


def test_top_n_sigma_keeps_logits_within_n_standard_deviations_of_the_max():
    x = np.array([4.0, 3.0, 0.0, -1.0, -2.0, 2.9], np.float32)
    n = 1.0
    keep = x >= x.max() - n * x.std()
    ids, _ = sampler(**PLAIN, top_n_sigma=n).candidates(x)
    assert sorted(ids.tolist()) == np.flatnonzero(keep).tolist()


def test_xtc_removes_every_token_above_the_threshold_but_the_least_likely():
    x = logits_for([0.4, 0.3, 0.2, 0.06, 0.04])
    ids, _ = sampler(**PLAIN, xtc_probability=1.0, xtc_threshold=0.15).candidates(x)
    assert sorted(ids.tolist()) == [2, 3, 4]
    assert sampler(**PLAIN, xtc_probability=1.0, xtc_threshold=0.6).candidates(x)[0].size == 5  # 0.5 < t: off


def test_xtc_coin_has_its_own_stream_so_the_draws_stay_aligned():
    x = np.arange(10, dtype=np.float32)
    a = sampler(seed=5, **PLAIN)
    b = sampler(seed=5, **PLAIN, xtc_probability=0.5, xtc_threshold=0.5)  # 0.5: the coin runs, never cuts
    for _ in range(20):
        assert a.sample(x) == b.sample(x)


def test_mirostat_v2_adapts_mu_and_keeps_surprise_near_tau():
    rng = np.random.default_rng(12)
    s = sampler(seed=1, mirostat=2, mirostat_tau=3.0, mirostat_eta=0.1, temperature=1.0)
    assert s.mu == 6.0
    surprises = []
    for _ in range(400):
        x = (rng.standard_normal(3000) * 2).astype(np.float32)
        mu = s.mu
        ids, probs = s.candidates(x)
        token = s.pick(ids, probs)
        full = np.exp(x.astype(np.float64) - x.max())
        surprises.append(-math.log2(probs[ids.tolist().index(token)]))
        kept = full[ids] / full.sum()  # before renormalizing: every kept token has surprise <= mu
        assert ids.size == 1 or np.all(-np.log2(kept) <= mu + 1e-9)
    assert abs(np.mean(surprises[100:]) - 3.0) < 0.5


def test_accept_refuses_a_token_that_was_not_a_candidate():
    s = sampler(mirostat=2)
    ids, probs = s.candidates(np.array([3.0, 0.0, -9.0], np.float32))
    with pytest.raises(ValueError, match="token 2 is not one of the candidates"):
        s.accept(2, ids, probs)


# --- DRY --------------------------------------------------------------------------------------------


def test_dry_repeats_follow_llama_cpps_worked_example():
    # llama.cpp's comment: "a b c c b c y a b c" -> c extends "a b c" (3), y extends "b c" (2),
    # b extends "c" (1, below the allowed length 2)
    a, b, c, y = 1, 2, 3, 4
    assert dry_repeats([a, b, c, c, b, c, y, a, b, c], {}, 2) == {c: 3, y: 2}
    assert dry_repeats([a, b, c, c, b, c, y, a, b, c], {}, 1) == {c: 3, y: 2, b: 1}
    # a breaker two tokens back limits every repeat to 2 (a single-token breaker has tail ())
    assert dry_repeats([a, b, c, c, b, c, y, a, b, c], {a: ((),)}, 2) == {c: 2, y: 2}
    assert dry_repeats([a, b, c, c, b, c, y, a, b, c], {b: ((),)}, 2) == {}


def test_z_array_matches_a_brute_force():
    rng = np.random.default_rng(13)
    for _ in range(200):
        s = rng.integers(0, 3, rng.integers(1, 40)).tolist()
        want = [0] + [next((m for m in range(len(s) - k) if s[m] != s[k + m]), len(s) - k) for k in range(1, len(s))]
        assert _z_array(s) == want


def test_dry_penalizes_the_token_that_extends_a_repeat_by_multiplier_times_base_to_the_excess():
    history = [5, 6, 7, 8, 9, 5, 6, 7, 8]  # "5 6 7 8" again: 9 would extend a repeat of 4
    x = np.zeros(12, np.float32)
    got = _penalized(x, history, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, dry_sequence_breakers=[])
    assert got[9] - got[0] == pytest.approx(-0.8 * 1.75 ** (4 - 2), rel=1e-6)
    assert np.allclose(np.delete(got, 9), got[0])


@functools.cache
def deepseek_coder() -> Tokenizer:
    path = vocab_path("deepseek-coder")
    return Tokenizer.from_gguf_fields(read_fields(path), path.name)


def test_dry_breakers_come_from_the_tokenizers_pieces():
    tok = deepseek_coder()
    table = dry_breakers(tok, [":", "my friend"])
    colon = [t for t in range(tok.n_vocab) if b":" in tok.token_to_piece(t)]
    assert colon and all(() in table[t] for t in colon)
    # " my" ends with the head of "my friend"? no: "my friend" starts inside " my": tail " friend"
    head = tok.encode(" my", add_bos=False, parse_special=False)
    assert len(head) == 1 and tuple(tok.encode(" friend", add_bos=False, parse_special=False)) in table[head[0]]
    assert dry_breakers(tok, [":", "my friend"]) is table  # cached per tokenizer


def test_dry_with_breakers_needs_the_vocabulary():
    with pytest.raises(ValueError, match="dry_sequence_breakers need the tokenizer"):
        Sampler(SamplingParams(dry_multiplier=0.8))
    Sampler(SamplingParams(dry_multiplier=0.8, dry_sequence_breakers=[]))
    Sampler(SamplingParams())  # DRY off: no vocabulary needed


# --- logprobs -----------------------------------------------------------------------------------------


def test_logprobs_are_the_log_softmax_of_the_biased_logits_over_the_whole_vocabulary():
    rng = np.random.default_rng(14)
    x = (rng.standard_normal(3000) * 2).astype(np.float32)
    s = sampler(top_k=5, temperature=0.3, logit_bias={11: 4.0})
    lp = s.logprobs(x, 11, top_n=4)
    y = x.astype(np.float64)
    y[11] += 4.0
    ref = y - y.max() - math.log(np.exp(y - y.max()).sum())
    assert lp.token == 11 and lp.logprob == pytest.approx(ref[11], abs=1e-6)
    order = np.argsort(-ref, kind="stable")[:4]
    assert [t for t, _ in lp.top] == order.tolist()
    assert np.allclose([v for _, v in lp.top], ref[order], atol=1e-6)
    assert s.logprobs(x, 11).top == ()


def test_chain_logprobs_are_the_distribution_the_draw_used():
    x = logits_for([0.5, 0.3, 0.15, 0.05])
    s = sampler(**{**PLAIN, "top_k": 2})
    ids, probs = s.candidates(x)
    lp = chain_logprobs(ids, probs, 1, top_n=3)
    assert lp.logprob == pytest.approx(math.log(0.3 / 0.8)) and [t for t, _ in lp.top] == [0, 1]
    assert chain_logprobs(ids, probs, 3).logprob == -math.inf
    with pytest.raises(ValueError, match="top_logprobs must be an integer >= 0"):
        chain_logprobs(ids, probs, 1, top_n=-1)


# --- the fast top-k path -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        np.arange(102_400, dtype=np.float32),  # sorted: the strided sample sees a biased slice
        np.arange(102_400, dtype=np.float32)[::-1].copy(),
        np.repeat(np.arange(100, dtype=np.float32), 1024),  # ties everywhere
        np.where(np.arange(102_400) % 7 == 0, 1.0, -np.inf).astype(np.float32),  # masked out
    ],
)
def test_top_k_on_a_large_vocabulary_matches_a_full_sort(row):
    for k in (1, 40, 1000):
        ids, _ = sampler(**{**PLAIN, "top_k": k}).candidates(row)
        finite = np.flatnonzero(row > -np.inf)
        want = finite[np.lexsort((finite, -row[finite]))][:k]
        assert ids.tolist() == want.tolist()


def test_a_min_p_below_float32_keeps_everything_as_llama_cpp_does():
    """min_p = 7.6e-49 rounds to 0 in float32: log is -inf (llama.cpp's logf), not an error
    (found by schemathesis through the HTTP API)."""
    logits = np.linspace(-5, 5, 50, dtype=np.float32)
    tiny = Sampler(SamplingParams(min_p=7.570724447523824e-49, top_k=0, top_p=1.0, seed=1))
    ids, _ = tiny.candidates(logits)
    assert ids.size == 50
