"""Priorities under the budget (issue 18, item 2): interactive work overtakes batch work without
changing it, deadlines are refused with a predicted retry time, batch-only work runs at the
efficient clock, and the price of speed is paid by the interactive requests.  The workload
figures are the device-time simulator's (``edgebox power simulate --mix``)."""

from __future__ import annotations

import threading
import time

import pytest

import edgebox
from edgebox.engine import Chunk, Engine, Request, Summary
from edgebox.engine.energy import EnergyBook
from edgebox.engine.request import DeadlineError
from edgebox.errors import EdgeboxError
from edgebox.power.governor import GovernorConfig, GovernorState, Readings, decide
from edgebox.power.shapes import DEEPSEEK_7B, shape_model
from edgebox.power.simulate import SimOptions, simulate
from tests.fixtures.paths import TEST_MODEL

GREEDY = edgebox.SamplingParams(temperature=0.0)
LONG = edgebox.SamplingParams(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return edgebox.load(TEST_MODEL)


def test_request_fields_are_checked():
    with pytest.raises(EdgeboxError, match="priority must be one of interactive, batch"):
        Request(prompt="x", priority="urgent")
    with pytest.raises(EdgeboxError, match="deadline_s must be a number of seconds > 0"):
        Request(prompt="x", deadline_s=0)


def test_an_interactive_request_overtakes_batch_work_which_then_goes_on_unchanged(model):
    e = Engine(model, max_batch=1, prefill_chunk=32)
    try:
        order: list[str] = []
        started = threading.Event()

        def on_batch(ev):
            if isinstance(ev, Chunk):
                started.set()
            elif isinstance(ev, Summary):
                order.append("batch")

        batch = e.submit(Request(prompt="def sort(items):", max_tokens=80, params=LONG, priority="batch"), on_event=on_batch)
        assert started.wait(30)
        chat = e.submit(
            Request(prompt="import os\n", max_tokens=6, params=GREEDY),
            on_event=lambda ev: order.append("interactive") if isinstance(ev, Summary) else None,
        )
        sb, sc = batch.result(timeout=60), chat.result(timeout=60)
        assert order == ["interactive", "batch"]  # the one slot was given to it, the batch one paused
        assert sc.ok and sb.ok and sb.generated_tokens == 80
        alone = "".join(model.stream("def sort(items):", max_tokens=80, params=LONG))
        assert sb.text == alone  # pausing kept its KV cache: the same text as if it ran alone
    finally:
        e.close(drain=False)


def test_a_deadline_no_slot_can_meet_is_refused_with_the_predicted_wait(model):
    e = Engine(model, max_batch=1, prefill_chunk=32)
    try:
        started = threading.Event()
        t_done: list[float] = []

        def on_event(ev):
            if isinstance(ev, Chunk):
                started.set()
            elif isinstance(ev, Summary):
                t_done.append(time.perf_counter())

        long = e.submit(Request(prompt="x = 1\n", max_tokens=300, params=LONG), on_event=on_event)
        assert started.wait(30)
        time.sleep(0.05)  # a few steps: the pace of the engine's clock against the cost model
        with pytest.raises(DeadlineError, match="cannot start within deadline_s 0.01") as refused:
            e.submit(Request(prompt="y", max_tokens=4, deadline_s=0.01))
        t_refused = time.perf_counter()
        retry = refused.value.retry_after_s
        assert retry > 0.01
        assert e.predicted_wait_s("batch") > 0.0
        long.result(timeout=60)
        waited = t_done[0] - t_refused
        assert retry / 5 < waited < retry * 5, (retry, waited)  # the cost model's forecast, to a factor
    finally:
        e.close(drain=False)


def test_an_interactive_deadline_is_met_by_pausing_batch_work(model):
    e = Engine(model, max_batch=1, prefill_chunk=32)
    try:
        batch = e.submit(Request(prompt="x = 1\n", max_tokens=200, params=LONG, priority="batch"))
        time.sleep(0.05)
        assert e.predicted_wait_s("interactive") == 0.0
        s = e.submit(Request(prompt="y", max_tokens=4, params=GREEDY, deadline_s=30.0)).result(timeout=60)
        assert s.ok and not batch.done
    finally:
        e.close(drain=False)


def test_a_deadline_that_passes_while_queued_is_refused_then(model):
    """The forecast counts slots; a request waiting on KV room past its deadline leaves then."""
    per_token = model.box.kv_bytes_per_token
    e = Engine(model, max_batch=4, kv_budget_bytes=per_token * 220, warmup=False)
    try:
        hog = e.submit(Request(prompt="a", max_tokens=200, params=LONG))  # 201 of 220 slots
        late = e.submit(Request(prompt="b", max_tokens=30, params=GREEDY, deadline_s=0.02))
        s = late.result(timeout=60)
        assert s.done_reason == "error" and "deadline_s 0.02 passed" in s.error and s.retry_after_s is not None
        assert not hog.result(timeout=60).error
    finally:
        e.close(drain=False)


# -- the governor: batch-only work at the most efficient clock and batch ------------------------


def test_batch_only_work_runs_at_the_least_joules_per_token(config7b):
    from tests.unit.power.test_governor import chips

    tab = config7b.table
    state = GovernorState.initial(config7b)
    speed = decide(Readings(1.0, chips(1.0, 9.0), 8, 0, 9.0), state, 10.0)
    eff = decide(Readings(1.0, chips(1.0, 9.0), 8, 0, 9.0, batch_only=True), state, 10.0)
    assert "efficient" in [x["kind"] for x in eff.events] and eff.state.efficient
    level = tab.efficient_level(eff.batch_limit)
    assert eff.freqs_mhz[0] <= tab.levels_mhz[level] < speed.freqs_mhz[0]
    jpt = [tab.power(lv, 8) / tab.tokens(lv, 8) for lv in range(tab.n_levels)]
    assert jpt[tab.efficient_level(8)] == min(jpt)
    back = decide(Readings(1.05, chips(1.05, 9.5), 9, 0, 9.5), eff.state, 10.0)  # an interactive request
    assert "speed" in [x["kind"] for x in back.events] and not back.state.efficient


@pytest.fixture(scope="module")
def config7b():
    m = shape_model(DEEPSEEK_7B, "Q4_0", chips=4)
    yield GovernorConfig.for_box(m.box, max_batch=16)
    m.close()


# -- the price of speed ---------------------------------------------------------------------------


def test_interactive_sequences_pay_the_price_of_speed():
    """A step shared by batch and interactive rows at a fast clock: the batch rows pay what the
    step costs at its cheapest clock; the interactive ones the rest; the shares still add up."""
    m = shape_model(DEEPSEEK_7B, "Q4_0", chips=4)
    try:
        acc = m.box.accounting
        segs = [(1, 300)] * 4
        acc.charge(segs, 4, None)  # no firmware: every chip at the top clock
        step = acc.last
        least = acc.least_energy_j(step.step)
        assert least < step.joules

        class Seq:
            prefilling = False

            def __init__(self, priority):
                self.request = Request(prompt="x", priority=priority)

        class Seg:
            def __init__(self, ctx):
                import numpy as np

                self.tokens = np.zeros(1, np.int32)
                self.kv = type("KV", (), {"length": ctx - 1})()
                self.all_logits = False

        seqs = [Seq("batch"), Seq("batch"), Seq("interactive"), Seq("interactive")]
        book = EnergyBook(acc)
        book.charge(seqs, [Seg(300)] * 4)
        paid = [book._meters[s].decode_j for s in seqs]
        assert sum(paid) == pytest.approx(step.joules, rel=1e-12)
        assert paid[0] == pytest.approx(least / 4, rel=1e-9)
        assert paid[2] == pytest.approx(least / 4 + (step.joules - least) / 2, rel=1e-9)
    finally:
        m.close()


# -- the workload, in device time -------------------------------------------------------------------


def test_priorities_beat_first_come_first_served_inside_the_budget():
    """At 10 W, 8 batch streams and 2 interactive users (think ~3 s), 40 device seconds: the
    interactive p95 TTFT at least 2x better than FIFO, batch throughput within 10 % of the batch
    streams alone, batch J/token no worse than the best of the static settings tried."""
    make = lambda: shape_model(chips=4)  # noqa: E731
    base = dict(streams=8, interactive=2, batch_priority=True, seconds=40.0, budget_w=10.0, seed=1)
    prio = simulate(make, SimOptions(**base))
    fifo = simulate(make, SimOptions(**base, scheduler="fifo"))
    alone = simulate(make, SimOptions(**{**base, "interactive": 0}))
    assert prio.report["ok"] and fifo.report["ok"] and alone.report["ok"]
    i_prio, i_fifo = prio.classes["interactive"], fifo.classes["interactive"]
    assert i_prio["requests"] >= 8
    assert i_prio["ttft_p95_s"] * 2 <= i_fifo["ttft_p95_s"]
    assert prio.classes["batch"]["tokens_per_s"] >= 0.9 * alone.classes["batch"]["tokens_per_s"]
    statics = [
        simulate(make, SimOptions(**base, governor=False, freq_mhz=f, batch=b, scheduler=s))
        for f, b, s in ((600, 16, "fifo"), (600, 16, "priority"), (800, 16, "fifo"))
    ]
    best = min(r.classes["batch"]["joules_per_token"] for r in statics if max(r.windows_w[2:]) <= 10.0)
    assert prio.classes["batch"]["joules_per_token"] <= best * 1.005
