"""edgebox.power: the governor's pure control law on hand-made readings, its model of a step,
the budget windows, and the loop on a real (dry-run) engine: files, idle, faults, status."""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import numpy as np
import pytest

from edgebox.hw.step import step_cost
from edgebox.power.budget import Budget, EnergyLog, Timeline, check
from edgebox.power.governor import (
    Decision,
    EnergyCounters,
    GovernorConfig,
    GovernorState,
    PowerGovernor,
    Readings,
    Sample,
    decide,
    modulate,
)
from edgebox.power.sensors import Reading
from edgebox.power.shapes import DEEPSEEK_7B, shape_model
from edgebox.power.status import chip_status, format_status
from edgebox.power.table import PREFILL, Step, StepPricer


@pytest.fixture(scope="module")
def model():
    """The full DeepSeek-LLM-7B shape (Q4_0) on 4 r100-edge chips, without a file."""
    m = shape_model(DEEPSEEK_7B, "Q4_0", chips=4)
    yield m
    m.close()


@pytest.fixture(scope="module")
def config(model):
    return GovernorConfig.for_box(model.box, max_batch=16)


def chips(t: float, energy_j: float, n: int = 4, **fields) -> tuple[Reading, ...]:
    """Hand-made readings of n chips sharing ``energy_j``."""
    base = dict(
        valid=True,
        power_w=energy_j / max(t, 1e-9) / n,
        energy_j=energy_j / n,
        temp_c=50.0,
        oc_events=0,
        freq_mhz=1000,
        max_freq_mhz=1000,
    )
    base.update(fields)
    return tuple(Reading(f"chip{i}", t, **base) for i in range(n))


class Plant:
    """A box that runs steady decode steps exactly as the table prices them (no engine)."""

    def __init__(self, config: GovernorConfig, batch: int = 16, context: int = 500):
        self.cfg, self.step = config, Step.decode(batch, context)
        self.priced = config.table.pricer.price(self.step)
        self.t = self.e = 0.0
        self.batch = batch
        self.trace = [(0.0, 0.0)]
        self.levels: list[int] = []

    def run(self, state: GovernorState, budget: Budget, seconds: float, *, tick_s: float = 0.1) -> GovernorState:
        end = self.t + seconds
        last_tick = -math.inf
        while self.t < end:
            lv = state.level
            self.t += float(self.priced.step_s[lv])
            self.e += float(self.priced.step_s[lv] * self.priced.power_w[lv])
            self.trace.append((self.t, self.e))
            self.levels.append(lv)
            if self.t - last_tick >= tick_s:
                last_tick = self.t
                d = decide(Readings(self.t, chips(self.t, self.e), self.batch, 0, self.e, (self.step,)), state, budget)
            else:
                d = modulate(Sample(self.t, self.e, self.batch, 0, (self.step,)), state, budget)
            state = d.state
        return state

    def log(self) -> EnergyLog:
        return EnergyLog(t=[x[0] for x in self.trace], e=[x[1] for x in self.trace])


# --- the step model ---------------------------------------------------------------------------------


def test_the_chips_are_charged_the_one_step_cost(model):
    """Box.account_step charges ``step_cost`` at the chips' clocks: the seconds it returns and the
    energy the firmware integrates from what the chips report."""
    box = model.box
    fw = box.firmware
    for segments, n_logits in (([(1, 300)] * 16, 16), ([(68, 368)] + [(1, 500)] * 3, 4), ([(128, 256)], 1)):
        for lv in (0, 3, 5):
            f = box.profile.levels[lv].freq_mhz
            for c in range(box.n_chips):
                fw.set_max_freq(c, f)
            expected = step_cost(box.accounting.work, Step.of(segments, n_logits), np.full((box.n_chips, 1), float(f)))
            e0 = [fw.state(c).energy_j for c in range(box.n_chips)]
            seconds = box.account_step(segments, n_logits)
            e1 = [fw.state(c).energy_j for c in range(box.n_chips)]
            assert seconds == pytest.approx(float(expected.step_s[0]), rel=1e-12)
            assert [b - a for a, b in zip(e0, e1)] == pytest.approx(list(expected.energy_j[:, 0]), rel=1e-9)


def test_the_pricer_is_the_one_step_cost_at_every_level(model):
    """StepPricer is ``step_cost`` with every chip at each level; every level at once equals one at a time."""
    box = model.box
    pricer = StepPricer(box)
    for step in (Step.decode(16, 300), Step.of([(68, 368)] + [(1, 500)] * 3, 4), Step.of([(128, 256)], 1)):
        priced = pricer.price(step)
        for lv, f in enumerate(box.profile.freqs_mhz):
            one = step_cost(box.accounting.work, step, np.array([float(f)]))
            assert priced.step_s[lv] == pytest.approx(float(one.step_s[0]), rel=1e-12)
            assert priced.power_w[lv] == pytest.approx(float(one.energy_j.sum() / one.step_s[0]), rel=1e-12)
            busy_w = one.busy_j[:, 0] / one.busy_s[:, 0]
            assert (priced.busy_w[lv], priced.chip_peak_w[lv]) == pytest.approx((busy_w.sum(), busy_w.max()), rel=1e-12)


def test_the_table_and_the_clock_cap(config):
    tab = config.table
    # a prompt chunk is compute-bound: lower power, much longer than a decode step
    assert tab.power(3, 16, PREFILL) < tab.power(3, 16) and tab.step(3, 16, PREFILL) > 3 * tab.step(3, 16)
    # power and tokens/s rise with the clock; batching is cheaper per token
    assert all(tab.power(lv, 4) < tab.power(lv + 1, 4) for lv in range(tab.n_levels - 1))
    assert tab.power(2, 16) / tab.tokens(2, 16) < tab.power(2, 1) / tab.tokens(2, 1)
    # the "N W mode": the highest clock whose full-load (batch 16) power fits
    assert [tab.clock_cap(w) for w in (6, 8, 10, 12)] == [600, 800, 1000, 1000]
    assert tab.mix_tokens(3.0, 16, 6) is None  # even 400 MHz draws more
    mid = tab.mix_tokens((tab.power(3, 16) + tab.power(4, 16)) / 2, 16, 6)
    assert tab.tokens(3, 16) < mid < tab.tokens(4, 16)


# --- the control law on hand-made numbers -----------------------------------------------------------


def test_decide_is_pure(config):
    state = GovernorState.initial(config)
    before = repr(state)
    d = decide(Readings(0.1, chips(0.1, 0.9), 4, 0, 0.9), state, 10.0)
    assert repr(state) == before and isinstance(d, Decision) and d.state is not state
    assert decide(Readings(0.1, chips(0.1, 0.9), 4, 0, 0.9), state, 10.0) == d  # same in, same out


def test_sigma_delta_holds_the_mean_at_the_target_between_two_levels(config):
    budget = Budget(9.0)  # between 800 MHz (7.6 W) and 1000 MHz (9.7 W) at batch 16
    plant = Plant(config, batch=16)
    state = plant.run(GovernorState.initial(config), budget, 12.0)
    log = plant.log()
    mean = log.average_w(2.0, plant.t)
    assert mean == pytest.approx(9.0 * (1 - config.margin), rel=0.01)
    # it dithers between the two levels around the target
    used = set(plant.levels[len(plant.levels) // 2 :])
    assert used == {2, 3}
    rep = check(log, Timeline(((0.0, 9.0),)), 2.0, plant.t, budget=budget)
    assert rep.ok() and rep.worst_long_ratio <= 1.0 and rep.worst_short_ratio <= 1.2
    assert state.power_1s_w == pytest.approx(mean, rel=0.03)


def test_a_budget_step_is_met_by_the_next_step(config):
    plant = Plant(config, batch=16)
    state = plant.run(GovernorState.initial(config), Budget(10.0), 5.0)
    high = state.level
    d = decide(Readings(plant.t, chips(plant.t, plant.e), 16, 0, plant.e, (plant.step,)), state, Budget(7.0))
    assert {"kind": "budget", "old_w": 10.0, "new_w": 7.0}.items() <= d.events[0].items()
    tab = config.table
    assert d.state.level < high and tab.power(d.state.level, 16) <= 7.0 * 1.2
    assert d.state.credit_j == 0.0
    # then the mean settles at the new target within ~1 s of the step
    step_t = plant.t
    plant.run(d.state, Budget(7.0), 4.0)
    log = plant.log()
    assert log.average_w(step_t + 1.5, plant.t) == pytest.approx(7.0 * (1 - config.margin), rel=0.02)
    assert log.average_w(step_t + 1.0, step_t + 2.0) <= 7.0


def test_the_100ms_ceiling_refuses_a_level_after_hot_steps(config):
    """After 100 ms at a level's worth of power near the ceiling, the next step may not add a
    hotter one, even if the 1 s average has room."""
    tab = config.table
    step = Step.decode(16, 500)
    priced = tab.pricer.price(step)
    budget = Budget(10.0)
    # a log: 0.9 s idle-ish at 3 W, then 0.1 s at 11.5 W (under the 12 W ceiling)
    log = ((0.0, 0.0), (0.9, 2.7), (1.0, 2.7 + 1.15))
    state = replace(GovernorState.initial(config), log=log, level=4, target_w=9.75, batch=16, credit_j=0.2)
    d = modulate(Sample(1.0, 2.7 + 1.15, 16, 0, (step,)), state, budget)
    lv = d.state.level
    # whatever it picked keeps every 100 ms window ending in the next step under 12 W x guard
    s, w = float(priced.step_s[lv]), float(priced.power_w[lv])
    assert (1.15 * (0.1 - min(s, 0.1)) / 0.1 + w * min(s, 0.1)) / 0.1 <= 12.0 or lv == 0


def test_a_sensor_that_reads_nonsense_or_goes_stale_means_the_lowest_clock(config):
    state = GovernorState.initial(config)
    good = chips(1.0, 9.0)
    d = decide(Readings(1.0, good, 16, 0, 9.0), state, 10.0)
    assert not d.state.fault
    bad = list(chips(1.1, 10.0))
    bad[2] = replace(bad[2], valid=False, stale=True, problems=("stale: unchanged for 0.600 s",))
    d = decide(Readings(1.1, tuple(bad), 16, 0, 10.0), d.state, 10.0)
    assert d.state.fault and d.freqs_mhz == (400,) * 4
    assert d.events[0]["kind"] == "sensor_fault" and "chip2" in d.events[0]["chips"]
    tab = config.table
    assert max(tab.power(0, d.batch_limit), tab.power(0, d.batch_limit, PREFILL)) <= 10.0
    # no energy counter at all is a fault too (the budget is energy)
    no_energy = tuple(replace(r, energy_j=None) for r in chips(1.2, 10.0))
    d2 = decide(Readings(1.2, no_energy, 16, 0, None), state, 10.0)
    assert d2.state.fault
    # recovery: two good ticks, then an event and control again
    d = decide(Readings(1.2, chips(1.2, 10.5), 16, 0, 10.5), d.state, 10.0)
    assert d.state.fault and not d.events
    d = decide(Readings(1.3, chips(1.3, 11.0), 16, 0, 11.0), d.state, 10.0)
    assert not d.state.fault and [e["kind"] for e in d.events] == ["sensor_ok"]


def test_protections_are_reported_and_respected(config):
    state = decide(Readings(1.0, chips(1.0, 9.0), 16, 0, 9.0), replace(GovernorState.initial(config), level=5), 12.0).state
    state = replace(state, level=5)
    hot = chips(1.1, 10.0, throttle_reasons=("over_current",), oc_events=1)
    d = decide(Readings(1.1, hot, 16, 0, 10.0), state, 12.0)
    kinds = [e["kind"] for e in d.events]
    assert "throttled" in kinds and "over_current" in kinds
    assert d.state.oc_cap_level == 4 and d.state.level <= 4
    # near the thermal trip the target is derated, with an event
    warm = chips(1.2, 11.0, temp_c=config.throttle_c - 2.0, oc_events=1)
    d2 = decide(Readings(1.2, warm, 16, 0, 11.0), d.state, 12.0)
    assert "thermal_derate" in [e["kind"] for e in d2.events]
    assert d2.state.target_w < 12.0 * (1 - config.margin)
    assert "unthrottled" in [e["kind"] for e in d2.events]


def test_idle_is_the_lowest_clock_and_active_again_on_work(config):
    state = decide(Readings(1.0, chips(1.0, 9.0), 4, 0, 9.0), GovernorState.initial(config), 10.0).state
    d = decide(Readings(1.1, chips(1.1, 9.9), 0, 0, 9.9), state, 10.0)
    assert d.freqs_mhz == (400,) * 4 and d.state.idle and [e["kind"] for e in d.events] == ["idle"]
    assert modulate(Sample(1.2, 9.95, 0, 0), d.state, 10.0).freqs_mhz == (400,) * 4
    d = decide(Readings(5.0, chips(5.0, 12.0), 1, 0, 12.0), d.state, 10.0)
    assert not d.state.idle and [e["kind"] for e in d.events] == ["active"]


def test_the_batch_loop_lowers_the_limit_only_when_the_clock_cannot(config):
    tab = config.table
    state = GovernorState.initial(config)
    # 10 W: every batch fits at some clock, and batch 16 gives the most tokens: stay at the max
    d = decide(Readings(1.0, chips(1.0, 9.0), 16, 4, 9.0), state, 10.0)
    assert d.batch_limit == 16
    # under what even the lowest clock at batch 16 draws: the limit comes down at once
    low = tab.power(0, 16) * 0.97
    d = decide(Readings(1.0, chips(1.0, 9.0), 16, 4, 9.0), state, low)
    assert d.batch_limit < 16 and tab.power(0, d.batch_limit) <= low
    assert "batch" in [e["kind"] for e in d.events]


def test_the_energy_guard_keeps_energy_per_token_near_the_reference_clock(config):
    """At 12 W, batch 16, the reference clock is 1000 MHz (1200 MHz decode draws 12.5 W).  Spending
    the whole budget mixes in 1200 MHz steps at ~10 % more energy each; the guard holds energy per
    step within its 3 % slack (plus the start allowance) of 1000 MHz, and is still faster."""
    from edgebox.power.governor import reference_level

    budget = Budget(12.0)
    tab = config.table
    assert reference_level(tab, budget, 16) == 3 and reference_level(tab, budget, 4) == 4
    runs = {}
    for slack in (0.03, None):
        cfg = replace(config, energy_slack=slack)
        plant = Plant(cfg, batch=16)
        plant.run(GovernorState.initial(cfg), budget, 20.0)
        ref_s, ref_w = float(plant.priced.step_s[3]), float(plant.priced.power_w[3])
        n = len(plant.levels)
        runs[slack] = (plant.e / (n * ref_s * ref_w), n * ref_s / plant.t)  # energy and speed vs 1000 MHz
        allowance = 12.0 * config.energy_start_s / (n * ref_s * ref_w)
        rep = check(plant.log(), Timeline(((0.0, 12.0),)), 2.0, plant.t, budget=budget)
        assert rep.ok()
        if slack is not None:
            energy, speed = runs[slack]
            assert energy <= 1 + slack + allowance + 0.002 and speed > 1.02  # + one step's overshoot
    energy_free, speed_free = runs[None]
    assert energy_free > 1.05 and speed_free > speed


# --- the frontier of clock schedules ------------------------------------------------------------------


def test_the_frontier_is_the_least_energy_of_any_schedule():
    from edgebox.power.frontier import Frontier

    # two steps at three levels: (seconds, joules); each step's prices rise with the level
    t = [[3.0, 2.0, 1.5], [3.0, 2.0, 1.5]]
    e = [[3.0, 3.2, 4.0], [2.8, 3.6, 4.5]]
    f = Frontier.of(t, e)
    assert (f.t0_s, f.e0_j) == (6.0, 5.8) and f.fastest_s == 3.0
    # every static level is on it: nothing is both faster and cheaper than a fixed clock here
    for lv in range(3):
        T, E = sum(x[lv] for x in t), sum(x[lv] for x in e)
        assert f.least_energy_j(T) == pytest.approx(E)
        assert f.least_time_s(E) == pytest.approx(T)
    assert f.least_energy_j(4.5) == pytest.approx(6.4)  # A at level 1, B half-way to it
    assert f.least_energy_j(10.0) == 5.8 and f.least_energy_j(2.9) == math.inf
    # the prices cross: then a fixed clock is beaten on both counts by a per-step mix
    t = [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]
    e = [[3.0, 3.2, 6.2], [3.0, 5.0, 5.5]]  # step B's middle level is off its hull
    f = Frontier.of(t, e)
    assert f.least_energy_j(4.0) == pytest.approx(7.45)
    assert f.least_time_s(8.2) < 4.0


# --- budget windows ---------------------------------------------------------------------------------


def test_energy_log_windows_and_the_check():
    log = EnergyLog()
    for i in range(101):  # 10 W for 10 s, then the last 0.05 s at 20 W
        log.add(i * 0.1, i * 1.0)
    log.add(10.05, 101.0)
    assert log.average_w(0, 10) == pytest.approx(10.0)
    assert log.windows(1.0) == pytest.approx([10.0] * 10)
    assert log.energy_at(0.05) == pytest.approx(0.5)
    rep = check(log, Timeline(((0.0, 10.0),)), 2.0, 10.05)
    assert rep.long_within_fraction < 1.0 and rep.worst_long_ratio == pytest.approx(1.05, rel=1e-6)
    assert rep.worst_short_ratio == pytest.approx(1.5, rel=1e-6) and not rep.ok()
    # a window that began under a higher budget is held to it
    assert Timeline(((0.0, 10.0), (5.0, 7.0))).most_in(4.95, 5.05) == 10.0
    with pytest.raises(ValueError):
        Budget(0)


def test_energy_counters_unwrap(tmp_path):
    d = tmp_path / "hwmon0"
    d.mkdir()
    (d / "energy1_max_range_uj").write_text("1000000\n")
    (d / "energy1_input").write_text("900000\n")
    c = EnergyCounters([d])
    assert c.read() == 0.0
    (d / "energy1_input").write_text("100000\n")  # wrapped: +0.1 J to the top, +0.1 J after
    assert c.read() == pytest.approx(0.2)
    (d / "energy1_input").write_text("garbage\n")
    assert c.read() is None
    c.close()


# --- the loop on a real engine ----------------------------------------------------------------------


def test_the_loop_turns_the_files_and_idles_at_the_bottom(tmp_path):
    from edgebox.engine import Engine, Request

    m = shape_model(chips=4)
    gov = PowerGovernor(m.box, 8.0, fw_root=tmp_path / "fw", max_batch=8)
    e = Engine(m, max_batch=8, dry_run=True)
    gov.attach(e)
    try:
        handles = [e.submit(Request(prompt=f"q{i} " + "w " * 150, max_tokens=60)) for i in range(6)]
        for h in handles:
            assert h.result(timeout=120).done_reason == "length"
        # the work is done: the last step's listener (it runs just after the last request's
        # summary) puts every chip at the lowest clock
        for _ in range(500):
            if gov.status()["idle"]:
                break
            threading.Event().wait(0.01)
        for c in range(4):
            assert (tmp_path / "fw" / f"chip{c}" / "cpufreq" / "scaling_max_freq").read_text().strip() == "400000"
            assert m.box.firmware.freq_mhz(c) == 400
        assert gov.status()["idle"] and gov.events[-1]["kind"] == "idle"
        # nothing polls while idle: device time stands still and no thread of ours runs
        t = m.box.clock_s
        threading.Event().wait(0.2)
        assert m.box.clock_s == t
        assert not [th for th in threading.enumerate() if "governor" in th.name.lower()]
        status = gov.status()
        assert status["budget_w"] == 8.0 and status["freq_mhz"] == 400 and not status["sensor_fault"]
        # a budget change from another thread applies at the next step
        gov.set_budget(6.0)
        e.submit(Request(prompt="again " + "w " * 50, max_tokens=20)).result(timeout=60)
        assert any(ev["kind"] == "budget" and ev["new_w"] == 6.0 for ev in gov.events)
        with pytest.raises(ValueError):
            gov.set_budget(-1)
    finally:
        e.close(drain=False)
        gov.close()
        m.close()


def test_status_shows_power_clocks_and_throttle_reasons(tmp_path):
    from typer.testing import CliRunner

    from edgebox.cli import app
    from firmware_stub import Firmware

    fw = Firmware("r100-edge", 2, root=tmp_path)
    for c in range(2):
        fw.activity(c, 0.3, 1e9, 3e8)
    fw.set_max_freq(1, 800)
    fw.publish()
    chips_ = chip_status(tmp_path)
    assert [c["chip"] for c in chips_] == ["chip0", "chip1"]
    assert chips_[0]["throttle_reasons"] == [] and chips_[1]["throttle_reasons"] == ["budget"]
    assert chips_[1]["freq_mhz"] == 800 and chips_[0]["power_w"] > 0 and chips_[0]["temp_c"] > 30
    text = format_status(chips_, tmp_path)
    assert "Clocks Throttle Reasons" in text and "SW Power Cap (budget)     : Active" in text
    r = CliRunner().invoke(app, ["power", "status", "--fw-root", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    import json

    assert json.loads(r.output)["chips"][1]["max_freq_mhz"] == 800
    fw.close()


def test_the_next_step_is_foreseen_exactly():
    """What the governor expects the engine to run next is what the chips are then charged for
    (this test breaks if the engine's scheduling changes under the governor's reading of it)."""
    from edgebox.engine import Engine, Request
    from edgebox.power.governor import _step_of

    m = shape_model(chips=4)
    charged, foreseen = [], []
    real = m.box.account_step

    def account_step(segments, n_logits):
        charged.append(Step(*_step_of(segments)[:3], n_logits))
        return real(segments, n_logits)

    m.box.account_step = account_step
    e = Engine(m, max_batch=4, dry_run=True, prefill_chunk=64)

    hs = []

    def request(i: int) -> Request:
        return Request(prompt=f"r{i} " + "w " * (40 + 30 * i), max_tokens=5 + i)

    def listener(engine):
        if len(hs) == 1:  # the rest join on the scheduler thread: no race
            hs.extend(engine.submit(request(i)) for i in range(1, 6))
        running, queued, segments = engine.load()
        if running + queued:
            foreseen.append(_step_of(segments))

    e.add_step_listener(listener)
    try:
        hs.append(e.submit(request(0)))
        for i in range(6):
            while len(hs) <= i:
                threading.Event().wait(0.01)
            hs[i].result(timeout=60)
    finally:
        e.close()
        m.close()
    # every step after the first was foreseen by the listener after the step before it
    assert len(charged) > 10 and foreseen[: len(charged) - 1] == charged[1 : len(foreseen) + 1]


def test_engine_load_predicts_the_next_step_on_a_real_model():
    """``Engine.load()`` (what the governor prices) names exactly the segments the chips are then
    charged for, on a real model doing the math: prompt chunks sharing the step, a full batch,
    a request waiting for KV room (a cached prompt evicted for it), a cached prefix reused, a
    cancelled queued request and a cancelled running one, a context shift, a batch limit change."""
    import edgebox
    from edgebox.engine import Engine, Request
    from edgebox.text.sampler import SamplingParams
    from tests.fixtures.paths import TEST_MODEL

    m = edgebox.load(TEST_MODEL, chips=2, n_ctx=64)
    charged: list[list[tuple[int, int]]] = []
    logits: list[int] = []
    real = m.box.account_step

    def account_step(segments, n_logits):
        charged.append(list(segments))
        logits.append(n_logits)
        return real(segments, n_logits)

    m.box.account_step = account_step
    per_token = sum(c.kv_bytes_per_token for c in m.box.chips)
    e = Engine(m, max_batch=2, kv_budget_bytes=128 * per_token, prefill_chunk=16, warmup=False)
    greedy = SamplingParams(temperature=0.0)
    prefix = "def parse(path):\n    with open(path) as f:\n        return f.read()\n"
    h: dict[str, object] = {}
    predicted: dict[int, tuple[int, int, list]] = {}  # step index -> load() after the step before
    seen = {"waited_for_kv": False}

    def listener(engine):
        k = len(charged)  # steps run so far
        if k == 1:
            h["B"] = engine.submit(Request(prompt="x " * 40, max_tokens=5, params=greedy))
            h["E"] = engine.submit(Request(prompt="y " * 8, max_tokens=3, params=greedy))
        if k == 2:
            h["E"].cancel()  # cancelled while queued
            h["F"] = engine.submit(Request(prompt="z " * 6, max_tokens=4, params=greedy))
        if h["A"].done and "D" not in h:  # A's cache now holds the prefix: D reuses it
            h["D"] = engine.submit(Request(prompt=prefix + "def save(path):", max_tokens=4, params=greedy))
            engine.batch_limit = 3
        if "D" in h and "C" not in h:  # C holds the whole context (shifts): waits for KV room
            h["C"] = engine.submit(Request(prompt="w " * 10, max_tokens=70, params=greedy, context_shift=True, n_keep=4))
        if "C" in h and "G" not in h and h["D"].done:
            h["G"] = engine.submit(Request(prompt="v " * 5, max_tokens=3, params=greedy))
            h["B"].cancel()  # cancelled while running (or already done)
        running, queued, segments = engine.load()
        if queued and running < engine.batch_limit:
            seen["waited_for_kv"] = True
        predicted[k] = (running, queued, segments)

    e.add_step_listener(listener)
    try:
        h["A"] = e.submit(Request(prompt=prefix, max_tokens=6, params=greedy))
        for _ in range(3000):
            if "G" in h and all(x.done for x in h.values()):
                break
            threading.Event().wait(0.01)
        summaries = {name: x.result(timeout=60) for name, x in h.items()}
    finally:
        e.close()
        m.box.close()
    # the step after each listener call is the one load() described (the last call saw none)
    assert len(charged) > 20
    for k in range(1, len(charged)):
        assert predicted[k][2] == charged[k], f"step {k}: load() said {predicted[k]}, the chips ran {charged[k]}"
        assert logits[k] == len(charged[k])
    assert predicted[len(charged)][:2] == (0, 0) and predicted[len(charged)][2] == []
    # the cases were met
    assert summaries["E"].done_reason == "cancelled" and summaries["D"].cached_prompt_tokens >= 4
    assert summaries["C"].generated_tokens + summaries["C"].prompt_tokens > 64 or summaries["C"].done_reason == "stop"
    assert seen["waited_for_kv"] and any(len(s) == 3 for s in charged)
