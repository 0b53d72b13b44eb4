"""Energy per request: each step's energy split among its sequences (``engine.energy``), idle
booked apart, and the books agree with the firmware's energy counters."""

from __future__ import annotations

import threading
import time

import pytest

import edgebox
from edgebox.chips.accounting import StepEnergy
from edgebox.engine import Chunk, Engine, Request
from edgebox.engine.energy import Energy, split
from edgebox.hw.step import Step
from edgebox.power.shapes import DEEPSEEK_7B, shape_model
from edgebox.power.status import chip_status
from tests.fixtures.paths import TEST_MODEL

GREEDY = edgebox.SamplingParams(temperature=0.0)


def counters_j(fw, root) -> float:
    """The chips' energy1_input files (hwmon µJ), summed, in joules."""
    fw.publish()
    return sum(c["energy_counter_j"] for c in chip_status(root))


def test_split_follows_the_stated_rule():
    """Rows share the rows pool (a 50-token prompt chunk pays 50 decode rows), attention goes by
    rows x context, KV reads by context, logits by logit rows; the shares sum to the step."""
    shape = [(50, 50, 1), (1, 30, 1), (1, 10, 1)]  # (rows, context after, logit rows)
    step = Step.of([(n, c) for n, c, _ in shape], 3)
    rows_only = split(StepEnergy(1.0, 0.0, 0.0, 0.0, step, 1e-3), shape)
    assert rows_only[0] == pytest.approx(50 * rows_only[1]) and rows_only[1] == pytest.approx(rows_only[2])
    kv_only = split(StepEnergy(0.0, 0.0, 1.0, 0.0, step, 1e-3), shape)
    assert kv_only[1] == pytest.approx(3 * kv_only[2])
    pairs_only = split(StepEnergy(0.0, 1.0, 0.0, 0.0, step, 1e-3), shape)
    assert pairs_only[0] == pytest.approx(50 * 50 / (2500 + 30 + 10))
    mixed = StepEnergy(0.4, 0.1, 0.2, 0.3, step, 1e-3)
    assert sum(split(mixed, shape)) == pytest.approx(mixed.joules)
    # no logit rows in the step (a prompt chunk that is not the last): the rows take that part
    no_logits = StepEnergy(0.4, 0.1, 0.2, 0.3, Step.of([(16, 16)], 0), 1e-3)
    assert split(no_logits, [(16, 16, 0)]) == [pytest.approx(1.0)]


@pytest.mark.parametrize("chips", [1, 2, 4, "7b-q4_k-3"])
def test_books_match_the_firmware_per_step(chips, tmp_path):
    """Every step's four parts add up to what the firmware integrated for it, on 1, 2 and 4 chips
    (link energy) and on DeepSeek-7B's shape cut unevenly over 3 chips (its chips wait for the
    slowest at every all-reduce), and idle is booked apart."""
    if chips == "7b-q4_k-3":
        m, chips = shape_model(DEEPSEEK_7B, "Q4_K", chips=3), 3
        assert m.box.accounting.cost(Step.of([(1, 100)], 1), None).idle_s.max() > 0  # the case it is here for
    else:
        m = edgebox.load(TEST_MODEL, chips=chips, n_ctx=128)
    box, fw = m.box, m.box.publish_firmware(tmp_path)
    acc = box.accounting
    try:
        for segments, n_logits in [([(1, 10)], 1), ([(50, 50), (1, 30), (1, 5)], 3), ([(1, 100)] * 8, 8), ([(16, 16)], 0)]:
            before = counters_j(fw, tmp_path)
            box.account_step(segments, n_logits)
            step = acc.last
            assert step.step == Step.of(segments, n_logits) and min(step[:4]) >= 0
            assert step.joules == pytest.approx(counters_j(fw, tmp_path) - before, rel=1e-3, abs=4e-6)
        idle0, before = acc.idle_j, counters_j(fw, tmp_path)
        box.idle_until(box.clock_s + 0.02)
        assert acc.idle_j - idle0 == pytest.approx(counters_j(fw, tmp_path) - before, rel=1e-3)
        assert acc.idle_j - idle0 > 0.02 * 0.05 * chips  # a clock-gated chip still leaks
    finally:
        m.box.close()


@pytest.fixture(scope="module")
def model():
    m = edgebox.load(TEST_MODEL, chips=4, n_ctx=256)
    yield m
    m.box.close()


def test_requests_and_idle_add_up_to_the_energy_counters(model, tmp_path):
    """A mixed run: requests of different prompt lengths and max_tokens overlapping, one
    cancelled mid-stream, one cancelled while queued, an idle gap between bursts.  The requests'
    joules plus the idle joules equal what the chips' energy counters say (within 1 %)."""
    fw = model.box.publish_firmware(tmp_path)
    start = counters_j(fw, tmp_path)
    idle0 = model.box.accounting.idle_j
    e = Engine(model, max_batch=3, prefill_chunk=16, warmup=False)
    summaries = []
    try:
        words = "def parse(path):\n    with open(path) as f:\n        return f.read()\n" * 6
        ids = model.tokenize(words, add_bos=False)

        def request(i: int, n_prompt: int, max_tokens: int) -> Request:
            return Request(prompt_ids=tuple([ids[i]] + ids[: n_prompt - 1]), max_tokens=max_tokens, params=GREEDY)

        burst = [request(0, 5, 12), request(1, 40, 6), request(2, 70, 20), request(3, 3, 30)]
        seen, chunks = threading.Event(), []

        def cancel_after_two(ev):
            if isinstance(ev, Chunk):
                chunks.append(ev)
                if len(chunks) == 2:
                    seen.set()

        handles = e.submit_many(burst[:3])
        doomed = e.submit(burst[3], on_event=cancel_after_two)
        waiting = e.submit(request(4, 20, 10))  # behind a full batch
        waiting.cancel()
        assert seen.wait(60)
        doomed.cancel()
        summaries += [h.result(timeout=60) for h in (*handles, doomed, waiting)]
        assert doomed.summary.done_reason == "cancelled" and waiting.summary.done_reason == "cancelled"

        # the engine is quiet for 0.3 s: the chips idle that long (charged when work comes back)
        gap0, clock0 = model.box.accounting.idle_j, model.box.clock_s
        time.sleep(0.3)
        second = e.submit_many([request(5, 33, 9), request(6, 8, 15)])
        summaries += [h.result(timeout=60) for h in second]
        assert model.box.clock_s - clock0 >= 0.3 and model.box.accounting.idle_j > gap0
        stats = e.stats()
    finally:
        e.close(drain=False)
    measured = counters_j(fw, tmp_path) - start
    requests_j = sum(s.energy.joules for s in summaries)
    idle_j = model.box.accounting.idle_j - idle0
    assert measured > 0 and requests_j + idle_j == pytest.approx(measured, rel=0.01)
    assert stats.energy_j + stats.idle_energy_j - idle0 == pytest.approx(measured, rel=0.01)
    for s in summaries:
        en = s.energy
        assert en.joules == pytest.approx(en.prefill_j + en.decode_j)
        if s.done_reason == "length":
            assert en.prefill_j > 0 and en.decode_j > 0 and en.avg_w > 0
            assert en.joules_per_token == pytest.approx(en.joules / s.generated_tokens)
    # a longer prompt costs more to read: 70 tokens over 5
    assert summaries[2].energy.prefill_j > summaries[0].energy.prefill_j
    queued = summaries[4]
    assert queued.energy == Energy() or queued.energy.joules > 0  # cancelled before or after it ran


def test_batching_lowers_each_requests_joules(model):
    """The same requests alone, one after another, then together: batched, each shares the
    weights' streaming with the others and pays less (device time, dry run: every request
    generates exactly max_tokens)."""

    def run(batched: bool) -> list:
        e = Engine(model, max_batch=4, prefill_chunk=32, dry_run=True)
        try:
            rs = [Request(prompt_ids=tuple(range(10 + i, 30 + 3 * i)), max_tokens=24) for i in range(4)]
            if batched:
                return [h.result(timeout=60) for h in e.submit_many(rs)]
            return [e.generate(r) for r in rs]
        finally:
            e.close()

    alone, together = run(False), run(True)
    for a, b in zip(alone, together):
        assert a.generated_tokens == b.generated_tokens == 24
        assert b.energy.joules < 0.8 * a.energy.joules
        assert b.energy.decode_j < 0.5 * a.energy.decode_j  # decode is weight streaming: shared by 4
        assert b.energy.avg_w < a.energy.avg_w


def test_model_stream_stats_carry_energy(model):
    gen = model.stream("def add(a, b):", max_tokens=8, params=GREEDY)
    j0 = model.box.accounting.step_j
    text = "".join(gen)
    assert text and gen.stats.prefill_j > 0 and gen.stats.decode_j > 0
    assert gen.stats.joules == pytest.approx(model.box.accounting.step_j - j0)


def test_energy_as_dict_has_the_reply_fields():
    d = Energy(0.5, 0.05, 0.1, 0.4, 2.5).as_dict()
    assert d == {"joules": 0.5, "joules_per_token": 0.05, "prefill_j": 0.1, "decode_j": 0.4, "avg_w": 2.5}
    assert Energy().as_dict()["joules_per_token"] is None
