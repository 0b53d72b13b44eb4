"""The sampler against llama.cpp's: candidates and probabilities recorded from llama.cpp's own
sampler chain (tools/make_sampler_golden.py) on the same logits, histories and parameters.

Deterministic samplers match exactly: the same candidate set, probabilities within 1e-5.
Random parts are compared with llama.cpp's statistics by chi-square tests at significance 0.001:
the draw, XTC's coin, mirostat v2's pick; mirostat's mu is compared step by step given
llama.cpp's picks.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest

from edgebox.gguf.file import read_fields
from edgebox.text.sampler import Sampler, SamplingParams
from edgebox.text.tokenizer import Tokenizer
from tests.fixtures.paths import DATA, vocab_path

pytestmark = pytest.mark.golden

GOLDEN = DATA / "sampler"
Z_0001 = 3.0902  # the standard normal's 0.999 quantile: significance 0.001, one-sided


@functools.cache
def golden() -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((GOLDEN / "llama_cpp.json").read_text())
    with np.load(GOLDEN / "llama_cpp.npz") as z:
        return meta, dict(z)


@functools.cache
def deepseek_coder() -> Tokenizer:
    """edgebox's tokenizer of the vocabulary llama.cpp's DRY got (its pieces: the breakers)."""
    path = vocab_path("deepseek-coder")
    return Tokenizer.from_gguf_fields(read_fields(path), path.name)


def params(kw: dict, **more) -> SamplingParams:
    bias = {int(t): float(b) for t, b in kw.get("logit_bias", [])}
    breakers = tuple(kw.get("dry_sequence_breakers", SamplingParams.dry_sequence_breakers))
    return SamplingParams(**{**kw, "logit_bias": bias, "dry_sequence_breakers": breakers, **more})


def sampler_for(kw: dict, n_vocab: int, seed: int = 1) -> Sampler:
    meta, _ = golden()
    tokenizer = deepseek_coder() if n_vocab == meta["n_vocab"] else None
    eog = [t for t in meta["eog_ids"] if t < n_vocab]  # llama.cpp's is_eog ids
    return Sampler(params(kw, seed=seed), vocab=tokenizer, eog_ids=eog)


def chi2_critical(df: int) -> float:
    """The chi-square distribution's 0.999 quantile (Wilson-Hilferty; within 1 % for df >= 2)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + Z_0001 * math.sqrt(a)) ** 3


def homogeneity_chi2(a: dict[int, int], b: dict[int, int]) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom for "two samples of counts over the same
    categories come from one distribution"; categories expected below 5 are pooled."""
    keys = sorted(set(a) | set(b))
    table = np.array([[a.get(k, 0) for k in keys], [b.get(k, 0) for k in keys]], np.float64)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    small = expected.min(0) < 5
    if small.any():
        table = np.column_stack([table[:, ~small], table[:, small].sum(1)])
        expected = np.column_stack([expected[:, ~small], expected[:, small].sum(1)])
    return float(((table - expected) ** 2 / expected).sum()), table.shape[1] - 1


# --- deterministic: each sampler alone and in chains ------------------------------------------------


def _case_ids():
    return [c["name"] for c in golden()[0]["cases"]]


@pytest.mark.parametrize("i", range(len(_case_ids())), ids=_case_ids())
def test_candidates_match_llama_cpp(i):
    meta, z = golden()
    case = meta["cases"][i]
    x = z[f"row/{case['row']}"]
    s = sampler_for(case["params"], x.size)
    ids, probs = s.candidates(x, meta["histories"][case["history"]])
    want_ids, want_p = z[f"case{i}/id"].astype(np.int64), z[f"case{i}/p"]
    ours, theirs = set(ids.tolist()), set(want_ids.tolist())
    if ours != theirs:
        # Only a tie at a cut may differ: llama.cpp's partial sort leaves it unspecified, edgebox
        # keeps the lower ids. The tokens swapped hold one and the same logit, so the sorted
        # probabilities still match.
        mine, other = sorted(ours - theirs), sorted(theirs - ours)
        assert case["row"] == "ties3k" and len(mine) == len(other)
        assert len({*x[mine].tolist(), *x[other].tolist()}) == 1
        assert np.abs(np.sort(probs) - np.sort(want_p)).max() <= 1e-5
        return
    got = dict(zip(ids.tolist(), probs.tolist()))
    assert np.abs(np.array([got[t] for t in want_ids.tolist()]) - want_p).max() <= 1e-5


def test_the_golden_cases_cover_every_sampler_alone_and_the_default_chain():
    names = {c["name"].split("/")[0].split("=")[0] for c in golden()[0]["cases"]}
    for need in ("logit_bias", "ignore_eos", "penalties", "presence", "frequency", "dry-alone", "top_k", "top_p", "min_p",
                 "typ_p", "top_n_sigma", "temperature", "xtc", "default", "all-on", "all-on-dry", "greedy"):  # fmt: skip
        assert need in names


def test_dry_changes_the_distribution_in_the_golden_cases():
    """The DRY cases are not vacuous: without DRY the candidates' probabilities differ."""
    meta, z = golden()
    moved = 0
    for i, case in enumerate(meta["cases"]):
        if not case["name"].startswith("dry"):
            continue
        x = z[f"row/{case['row']}"]
        kw = {**case["params"], "dry_multiplier": 0.0}
        ids, probs = sampler_for(kw, x.size).candidates(x, meta["histories"][case["history"]])
        got = dict(zip(ids.tolist(), probs.tolist()))
        want = dict(zip(z[f"case{i}/id"].tolist(), z[f"case{i}/p"].tolist()))
        moved += max(abs(got.get(t, 0.0) - want.get(t, 0.0)) for t in got.keys() | want.keys()) > 1e-3
    assert moved >= 20  # of 29: where a breaker ends the history, DRY rightly does nothing


# --- mirostat: mu given llama.cpp's picks ----------------------------------------------------------


@pytest.mark.parametrize("j", range(3))
def test_mirostat_truncation_and_mu_follow_llama_cpp_given_its_picks(j):
    meta, z = golden()
    run = meta["mirostat"][j]
    s = sampler_for(run["params"], 1000)
    assert s.mu == pytest.approx(2.0 * s.params.mirostat_tau)
    for step, (row, pick, mu) in enumerate(zip(z["mirostat/logits"], run["picks"], run["mu"])):
        ids, probs = s.candidates(row)
        want_ids = z[f"mirostat{j}/step{step}/id"].astype(np.int64)
        assert sorted(ids.tolist()) == sorted(want_ids.tolist()), f"step {step}"
        got = dict(zip(ids.tolist(), probs.tolist()))
        assert np.allclose([got[t] for t in want_ids.tolist()], z[f"mirostat{j}/step{step}/p"], atol=1e-5)
        s.accept(pick, ids, probs)
        assert s.mu == pytest.approx(mu, abs=1e-4), f"step {step}"


# --- random: llama.cpp's statistics ----------------------------------------------------------------


def test_draws_follow_the_same_distribution_as_llama_cpps_dist():
    meta, z = golden()
    d = meta["draws"]["dist"]
    theirs = {int(k): v for k, v in d["counts"].items()}
    s = sampler_for(d["params"], 2000, seed=3)
    ids, probs = s.candidates(z[f"row/{d['row']}"])
    assert set(theirs) <= set(ids.tolist())
    ours: dict[int, int] = {}
    for _ in range(sum(theirs.values())):
        t = s.pick(ids, probs)
        ours[t] = ours.get(t, 0) + 1
    chi2, df = homogeneity_chi2(ours, theirs)
    assert chi2 < chi2_critical(df)
    # and llama.cpp's draws fit edgebox's probabilities (goodness of fit, same significance)
    n = sum(theirs.values())
    expected = n * probs
    observed = np.array([theirs.get(t, 0) for t in ids.tolist()])
    assert float(((observed - expected) ** 2 / expected).sum()) < chi2_critical(ids.size - 1)


def test_xtc_fires_as_often_as_llama_cpps_and_removes_the_same_tokens():
    meta, z = golden()
    d = meta["draws"]["xtc"]
    x = z[f"row/{d['row']}"]
    s = sampler_for(d["params"], x.size, seed=4)
    always = sampler_for({**d["params"], "xtc_probability": 1.0}, x.size).candidates(x)[0]
    fired = 0
    for _ in range(d["calls"]):
        ids, _ = s.candidates(x)
        if ids.size < x.size:
            fired += 1
            assert np.array_equal(np.sort(ids), np.sort(always))
    # two proportions, pooled: |z| below the two-sided 0.001 critical value 3.29
    n = d["calls"]
    pooled = (fired + d["fired"]) / (2 * n)
    zscore = (fired - d["fired"]) / n / math.sqrt(pooled * (1 - pooled) * 2 / n)
    assert abs(zscore) < 3.2905
    assert abs(fired / n - s.params.xtc_probability) < 3.2905 * math.sqrt(0.3 * 0.7 / n)


def test_mirostat_v2_first_pick_follows_llama_cpps_distribution():
    meta, z = golden()
    d = meta["draws"]["mirostat2"]
    theirs = {int(k): v for k, v in d["counts"].items()}
    s = sampler_for(d["params"], 2000, seed=8)
    ids, probs = s.candidates(z[f"row/{d['row']}"])  # the first step: mu = 2 tau
    ours: dict[int, int] = {}
    for _ in range(sum(theirs.values())):
        t = s.pick(ids, probs)
        ours[t] = ours.get(t, 0) + 1
    chi2, df = homogeneity_chi2(ours, theirs)
    assert df >= 1 and chi2 < chi2_critical(max(df, 2))
