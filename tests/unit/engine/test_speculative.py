"""Speculative decoding (engine.speculative): n-gram and draft-model drafts verified in the batch.

Greedy output is the same tokens as without drafts (tiny models and the bundled one), ends (EOG,
stop strings, max_tokens, a full context) land where they would, the KV rows of rejected drafts
do not leak into the prompt cache or a context shift, and sampled output keeps its distribution
(chi-square against the exact distribution of the sampler chain, alpha = 0.001).
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

import edgebox
from edgebox.engine import Engine, Request
from edgebox.engine.queued import Queued, reservation
from edgebox.engine.request import Handle
from edgebox.engine.scheduler import schedule
from edgebox.engine.sequence import Sequence
from edgebox.engine.speculative import Speculative, draft_length, ngram_draft
from edgebox.errors import EdgeboxError
from edgebox.text.sampler import Sampler, SamplingParams
from tests.fixtures.paths import DATA, TEST_MODEL

GREEDY = SamplingParams(temperature=0.0)
NGRAM = Speculative("ngram", draft_max=4)
DRAFT_MODEL = DATA / "models" / "tiny-deepseek-coder-Q4_0.gguf"  # the test model's weights in Q4_0: a close draft


@pytest.fixture(scope="module")
def model():
    return edgebox.load(TEST_MODEL)


@pytest.fixture(scope="module")
def draft():
    return edgebox.load(DRAFT_MODEL)


@pytest.fixture(scope="module")
def plain(model):
    e = Engine(model, max_batch=4, max_queue=4096)
    yield e
    e.close(drain=False)


@pytest.fixture(scope="module")
def ngram(model):
    e = Engine(model, max_batch=4, max_queue=4096, speculative=NGRAM)
    yield e
    e.close(drain=False)


@pytest.fixture(scope="module")
def drafted(model, draft):
    e = Engine(model, max_batch=4, max_queue=4096, speculative=Speculative("draft", draft_max=3), draft_model=draft)
    yield e
    e.close(drain=False)


PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):",
    "import numpy as np\n" * 3,
    "class Stack:\n    def push(self, x):",
    "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2",
]


# --- drafting ----------------------------------------------------------------------------------


def test_ngram_draft_takes_what_followed_the_longest_most_recent_match():
    h = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert ngram_draft(h, 3, n_max=3) == [7, 8, 5]  # "2 3" last seen before "7 8 5" (3-gram "5 2 3" never was)
    assert ngram_draft(h, 1, n_max=3) == [7]
    assert ngram_draft([4, 1, 2, 4], 5, n_max=3) == [1, 2, 4]  # runs to the end of the history
    assert ngram_draft([1, 2, 3], 4) == []  # the last token never occurred before
    assert ngram_draft([5, 5], 2) == [5]
    assert ngram_draft([5], 2) == [] and ngram_draft([1, 1, 1], 0) == []
    assert ngram_draft(h, 3, n_max=3, n_min=3) == []  # no 3-gram match, and 2 is below n_min


def test_draft_length_grows_after_whole_drafts_and_shrinks_after_cut_ones():
    assert draft_length(0, 0, 0, 8) == 8  # the first draft: draft_max
    assert draft_length(8, 8, 3, 8) == 7 and draft_length(1, 4, 0, 8) == 1
    assert draft_length(5, 5, 5, 8) == 7 and draft_length(7, 7, 7, 8) == 8
    assert draft_length(4, 0, 0, 8) == 4  # no draft fed (no n-gram found): unchanged


def test_settings_are_checked_with_the_field_named():
    for bad, field in (
        (dict(kind="eagle"), "spec kind"),
        (dict(kind="ngram", draft_max=0), "draft_max"),
        (dict(kind="ngram", draft_max=65), "draft_max"),
        (dict(kind="ngram", ngram_min=3, ngram_max=2), "ngram_max"),
    ):
        with pytest.raises(EdgeboxError, match=field):
            Speculative(**bad)


def test_draft_kind_needs_a_draft_model_with_the_same_vocabulary(model, tiny_f32):
    with pytest.raises(EdgeboxError, match="needs a draft model"):
        Engine(model, speculative=Speculative("draft"), warmup=False)
    other = edgebox.load(tiny_f32("tiny-qwen2"))
    with pytest.raises(EdgeboxError) as e:
        Engine(model, speculative=Speculative("draft"), draft_model=other, warmup=False)
    assert "cannot draft" in str(e.value) and "same tokenizer" in str(e.value) and "\n" not in str(e.value)


# --- the plan ------------------------------------------------------------------------------------


def test_the_plan_carries_each_decoding_sequence_s_draft_rows(model):
    def running(ids, draft):
        r = Request(prompt_ids=tuple(ids), max_tokens=16)
        q = Queued(Handle(r, None), list(ids), reservation(r, len(ids), model.n_ctx), False, 0)
        kv = model.new_cache(q.reserved)
        kv.length = len(ids)
        s = Sequence(q, kv, model.tokenizer)
        s.n_done, s.pending, s.draft = len(ids), 5, draft
        return s

    a, b = running([1, 2, 3], [7, 8, 9]), running([1, 2, 3, 4, 5], [])
    p = schedule([a, b], [], [], batch_limit=4, prefill_chunk=16, kv_budget_bytes=1 << 40, kv_bytes_per_token=1)
    assert p.decode == (a, b) and p.decode_rows == (4, 1)
    assert p.cost == ((4, 3 + 4), (1, 5 + 1))  # the chips are charged for every verified row
    assert p.n_logits == 5


# --- greedy: the same tokens ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_greedy_output_is_identical_and_drafts_are_kept(kind, plain, ngram, drafted):
    spec = ngram if kind == "ngram" else drafted
    want = [plain.generate(Request(prompt=p, max_tokens=40, params=GREEDY)) for p in PROMPTS]
    # batched together, and with a sequence decoding without drafts (a constrained one) among them
    handles = spec.submit_many([Request(prompt=p, max_tokens=40, params=GREEDY) for p in PROMPTS])
    handles.append(
        spec.submit(Request(prompt="n = ", max_tokens=8, params=GREEDY, response_format={"type": "regex", "regex": "[0-9]+"}))
    )
    got = [h.result(timeout=120) for h in handles]
    for w, g in zip(want, got):
        assert g.ok and g.text == w.text and g.generated_tokens == w.generated_tokens and g.done_reason == w.done_reason
    assert got[-1].draft_tokens == 0 and got[-1].text.isdigit()
    assert sum(g.draft_accepted for g in got) > 20
    assert all(0 <= g.draft_accepted <= g.draft_tokens for g in got)
    assert any(g.draft_accepted < g.draft_tokens for g in got)  # rejections happened too


def test_greedy_output_is_identical_on_the_bundled_model_editing_cpython():
    m = edgebox.load()
    source = (DATA / "heldout_sample.txt").read_text()
    func = source[source.index("def _aix_tag") : source.index("def _aix_vrtl")]
    prompt = f"# before\n{func}\n# after: renamed vrtl to version\n{func.replace('vrtl', 'version')[:40]}"
    with Engine(m, max_batch=2) as plain_engine:
        want = plain_engine.generate(Request(prompt=prompt, max_tokens=96, params=GREEDY))
    with Engine(m, max_batch=2, speculative=Speculative("ngram", draft_max=8)) as e:
        got = e.generate(Request(prompt=prompt, max_tokens=96, params=GREEDY))
    assert got.text == want.text and got.generated_tokens == 96
    assert got.draft_accepted >= 30, (got.draft_tokens, got.draft_accepted)


# --- ends land where they would ----------------------------------------------------------------


def test_max_tokens_and_stop_strings_end_exactly_where_they_would(plain, ngram):
    prompt = PROMPTS[1]
    full = plain.generate(Request(prompt=prompt, max_tokens=40, params=GREEDY))
    spec_full = ngram.generate(Request(prompt=prompt, max_tokens=40, params=GREEDY))
    assert spec_full.draft_accepted > 10  # the ends below fall inside accepted runs
    for n in (1, 2, 3, 5, 8, 13, 21, 34):
        a = plain.generate(Request(prompt=prompt, max_tokens=n, params=GREEDY))
        b = ngram.generate(Request(prompt=prompt, max_tokens=n, params=GREEDY))
        assert (b.text, b.generated_tokens, b.done_reason) == (a.text, a.generated_tokens, a.done_reason) == (a.text, n, "length")
    text = full.text
    stops = {text[i : i + w] for i, w in ((3, 4), (len(text) // 3, 5), (len(text) // 2, 3), (len(text) - 6, 4))}
    for stop in stops:
        a = plain.generate(Request(prompt=prompt, max_tokens=40, params=GREEDY, stop=(stop,)))
        b = ngram.generate(Request(prompt=prompt, max_tokens=40, params=GREEDY, stop=(stop,)))
        assert a.done_reason == "stop" and stop not in a.text
        assert (b.text, b.generated_tokens, b.done_reason) == (a.text, a.generated_tokens, a.done_reason)


def test_an_end_of_generation_token_inside_an_accepted_run_ends_it_there(model, plain, ngram):
    """A logit_bias on EOS makes it the greedy choice first at a position j well into a run: the
    bias sits between EOS's margin there and its smallest margin before."""
    prompt = model.tokenize(PROMPTS[1])
    ref = plain.generate(Request(prompt_ids=tuple(prompt), max_tokens=30, params=GREEDY, logprobs=0))
    gen = [lp.token for lp in ref.logprobs]
    rows = model.logits(prompt + gen[:-1])[len(prompt) - 1 :]  # row i: the logits token i was drawn from
    eos = model.tokenizer.eos_id
    margin = rows.max(axis=1) - rows[:, eos]
    j = next(j for j in range(6, len(gen)) if margin[j] < margin[:j].min() - 1e-3)
    params = SamplingParams(temperature=0.0, logit_bias=((eos, float((margin[j] + margin[:j].min()) / 2)),))
    a = plain.generate(Request(prompt_ids=tuple(prompt), max_tokens=30, params=params))
    b = ngram.generate(Request(prompt_ids=tuple(prompt), max_tokens=30, params=params))
    assert a.done_reason == "stop" and a.generated_tokens == j
    assert (b.text, b.generated_tokens, b.done_reason) == (a.text, a.generated_tokens, a.done_reason)
    assert b.draft_accepted > 0


def test_rejected_rows_do_not_reach_the_prompt_cache(model, plain):
    """A second request extending the first one's prompt copies its cache (up to kv.length): the
    rows of rejected drafts were dropped, so the copy gives the same tokens as computing it."""
    with Engine(model, max_batch=2, speculative=NGRAM) as e:
        first = e.generate(Request(prompt=PROMPTS[0], max_tokens=30, params=GREEDY))
        assert first.draft_accepted < first.draft_tokens  # some rows were rejected
        follow = PROMPTS[0] + first.text + "\n"
        got = e.generate(Request(prompt=follow, max_tokens=24, params=GREEDY))
    assert got.cached_prompt_tokens > 10
    want = plain.generate(Request(prompt=follow, max_tokens=24, params=GREEDY))
    assert got.text == want.text


def test_a_full_context_shifts_and_stops_as_without_drafts():
    m = edgebox.load(TEST_MODEL, n_ctx=48)
    request = dict(prompt=PROMPTS[1], max_tokens=90, params=GREEDY)
    with Engine(m, max_batch=2) as a, Engine(m, max_batch=2, speculative=NGRAM) as b:
        for extra in (dict(context_shift=True, n_keep=4), {}):
            want, got = a.generate(Request(**request, **extra)), b.generate(Request(**request, **extra))
            assert (got.text, got.generated_tokens, got.done_reason) == (want.text, want.generated_tokens, want.done_reason)
            assert got.draft_accepted > 0
            assert want.generated_tokens == (90 if extra else 48 - len(m.tokenize(PROMPTS[1])) + 1)


# --- sampling: the same distribution ---------------------------------------------------------------


def chi2_critical(dof: int, z: float = 3.0902) -> float:
    """The chi-square quantile for alpha = 0.001 (z: the normal's), Wilson-Hilferty (within 1 % for dof >= 3)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def goodness_of_fit(counts: collections.Counter, expected: dict, n: int) -> tuple[float, float]:
    """(chi-square, its alpha = 0.001 critical value); cells expecting fewer than 5 are pooled."""
    big = {k: p * n for k, p in expected.items() if p * n >= 5}
    observed = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    want = list(big.values()) + [n - sum(big.values())]
    if want[-1] < 5:
        observed, want = observed[:-1], want[:-1]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, want))
    return chi2, chi2_critical(len(want) - 1)


def test_pick_draft_draws_from_the_target_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    ids = np.array([10, 11, 12, 13])
    n = 20000
    for draft in (10, 12, 99):  # a likely draft, an unlikely one, one that is no candidate
        s = Sampler(SamplingParams(seed=draft))
        got = collections.Counter(s.pick_draft(ids, probs, draft) for _ in range(n))
        chi2, critical = goodness_of_fit(got, dict(zip(ids.tolist(), probs.tolist())), n)
        assert chi2 < critical, (draft, got)
    greedy = Sampler(GREEDY)
    assert greedy.pick_draft(np.array([7]), np.array([1.0]), 7) == 7
    assert greedy.pick_draft(np.array([7]), np.array([1.0]), 8) == 7


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_sampled_output_keeps_the_distribution(kind, model, ngram, drafted):
    """The first three tokens of 1500 seeded requests against the exact distribution of the chain
    (top-k 3, temperature 2, repeat penalty 1.1: the drafts are often rejected)."""
    e = ngram if kind == "ngram" else drafted
    prompt = model.tokenize(PROMPTS[1])
    prompt = prompt + prompt[1:]  # the n-gram drafts find the likely tokens in the prompt
    params = dict(temperature=2.0, top_k=3, repeat_penalty=1.1)
    chain = Sampler(SamplingParams(**params))
    eog = model.tokenizer.eog_ids
    expected: dict[tuple[int, ...], float] = {}

    def walk(ids: list[int], p: float, depth: int) -> None:
        if depth == 3:
            expected[tuple(ids[len(prompt) :])] = p
            return
        cand, probs = chain.candidates(model.logits(ids)[-1], ids)
        for t, q in zip(cand.tolist(), probs.tolist()):
            if t in eog:
                expected[tuple(ids[len(prompt) :])] = expected.get(tuple(ids[len(prompt) :]), 0.0) + p * q
            else:
                walk(ids + [t], p * q, depth + 1)

    walk(prompt, 1.0, 0)
    n = 1500
    handles = e.submit_many(
        [Request(prompt_ids=tuple(prompt), max_tokens=4, params=SamplingParams(seed=i, **params), logprobs=0) for i in range(n)]
    )
    got = collections.Counter()
    drafted_n = accepted = 0
    for h in handles:
        s = h.result(timeout=300)
        got[tuple(lp.token for lp in s.logprobs[:3])] += 1
        drafted_n, accepted = drafted_n + s.draft_tokens, accepted + s.draft_accepted
    assert drafted_n > n / 4 and 0.2 < accepted / drafted_n < 0.9, (drafted_n, accepted)  # both branches, often
    chi2, critical = goodness_of_fit(got, expected, n)
    assert chi2 < critical, (chi2, critical)


# --- the replies' timings and the options -------------------------------------------------------


def test_the_mqtt_final_reply_carries_the_draft_counts(ngram):
    import json

    from edgebox.daemon.openai_responses import timings
    from edgebox.daemon.schemas import FinalReply, Timings, encode

    s = ngram.generate(Request(prompt=PROMPTS[1], max_tokens=24, params=GREEDY))
    assert 0 < s.draft_accepted <= s.draft_tokens
    assert (timings(s)["draft_n"], timings(s)["draft_n_accepted"]) == (s.draft_tokens, s.draft_accepted)
    t = Timings(queue_ms=0, ttft_ms=0, prompt_ms=0, decode_ms=0, total_ms=0, decode_tokens_per_s=0, draft_n=7, draft_n_accepted=5)
    sent = json.loads(encode(FinalReply(request_id="r", seq=0, status="ok", code=200, timings=t)))
    assert sent["timings"]["draft_n"] == 7 and sent["timings"]["draft_n_accepted"] == 5


@pytest.mark.slow
def test_serve_with_ngram_drafts_reports_them_over_http(tmp_path):
    from tests.fixtures.daemon import HttpDaemon

    d = HttpDaemon(tmp_path, "--spec", "ngram", "--draft-max", "4").start()
    try:
        body = {"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0}
        status, _, raw = d.request("POST", "/v1/completions", body)
        assert status == 200, raw
        t = __import__("json").loads(raw)["timings"]
        assert 0 < t["draft_n_accepted"] <= t["draft_n"]
    finally:
        d.stop_ok()


def test_run_refuses_draft_without_a_draft_model_in_one_line():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "edgebox.cli", "run", str(TEST_MODEL), "-p", "x", "-n", "2", "--spec", "draft", "--chips", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "--model-draft" in out.stderr, out.stderr


def test_run_with_ngram_drafts_prints_the_same_text_and_the_draft_counts():
    import subprocess
    import sys

    def run(*extra: str) -> subprocess.CompletedProcess:
        argv = [
            sys.executable,
            "-m",
            "edgebox.cli",
            "run",
            str(TEST_MODEL),
            "-p",
            PROMPTS[1],
            "-n",
            "24",
            "--temp",
            "0",
            "--chips",
            "1",
        ]
        return subprocess.run(argv + list(extra), capture_output=True, text=True, timeout=300)

    plain, spec = run(), run("--spec", "ngram", "--draft-max", "4")
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and plain.stdout.strip()
    line = spec.stderr.strip().splitlines()[-1]
    assert "draft:" in line and "accepted" in line and "stop: length" in line, line
