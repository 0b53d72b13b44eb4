"""``edgebox power simulate`` on the full DeepSeek-LLM-7B shape (4 r100-edge chips, no file):
the issue's targets on shortened runs, the JSON, determinism, and the 60 s wall-time claim.

The budget test (the issue's): >= 99 % of rolling 1 s windows within the budget after the first
2 s, the worst <= 105 %, every 100 ms window <= 120 %.  ``tools/bench_power.py`` prints the whole
table (every budget x streams against every static setting) on 60 s runs.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgebox.cli import app
from edgebox.errors import EdgeboxError
from edgebox.power.budget import Budget, Timeline, check
from edgebox.power.shapes import shape_model
from edgebox.power.simulate import WARMUP_S, SimOptions, parse_budget_steps, simulate
from edgebox.power.table import PowerTable


def sim(**kw):
    return simulate(shape_model, SimOptions(**kw))


def static_within(result, watts: float) -> bool:
    rep = check(result.log, Timeline(((0.0, watts),)), WARMUP_S, result.device_s, budget=Budget(watts))
    return rep.ok()


@pytest.fixture(scope="module")
def cap_table():
    m = shape_model()
    yield PowerTable.from_box(m.box)
    m.close()


@pytest.mark.slow
def test_a_minute_of_the_7b_shape_in_well_under_a_minute():
    r = sim(streams=16, seconds=60.0, budget_w=10.0)
    assert r.wall_s < 30.0, f"60 s of device time took {r.wall_s:.1f} s of wall time"
    assert r.device_s >= 60.0 and len(r.windows_w) == 60 and len(r.short_windows_w) == 600
    assert r.report["ok"], r.report
    assert r.tokens_per_s > 100 and r.freq_levels_mhz == [400, 600, 800, 1000, 1200, 1400, 1500]
    assert sum(r.protections["over_current_events"]) == 0 and sum(r.protections["thermal_events"]) == 0


@pytest.mark.parametrize("budget_w,streams", [(6, 1), (8, 4), (10, 16), (12, 4), (6, 16)])
def test_the_budget_holds(budget_w, streams):
    r = sim(streams=streams, seconds=8.0, budget_w=budget_w)
    rep = r.report
    assert rep["long_within_fraction"] >= 0.99, rep
    assert rep["worst_long_ratio"] <= 1.05, rep
    assert rep["worst_short_ratio"] <= 1.2, rep
    # and it is used: the mean is near the budget unless the ceiling or the top clock stops it
    assert r.mean_power_w > 0.8 * budget_w or max(int(f) for f in r.freq_time_s) == 1500 or streams == 16


def test_better_than_static_settings_and_the_clock_cap(cap_table):
    """4 streams at 10 W: >= 90 % of the best static (clock, batch) within the budget (energy per
    token >= 95 % as good), and more tokens/s than the "10 W mode" clock cap."""
    budget, streams, seconds = 10.0, 4, 10.0
    gov = sim(streams=streams, seconds=seconds, budget_w=budget)
    assert gov.report["ok"]
    # the sweep, shortened to the settings that can be best: clocks whose batch-4 decode draws
    # 70-130 % of the budget, at batch 4 and 3 (tools/bench_power.py sweeps them all)
    levels = [f for lv, f in enumerate(cap_table.levels_mhz) if 0.7 * budget <= cap_table.power(lv, streams) <= 1.3 * budget]
    assert 1000 in levels
    static = {}
    for f in levels:
        for b in (streams, streams - 1):
            r = sim(streams=streams, seconds=seconds, governor=False, freq_mhz=f, batch=b)
            if static_within(r, budget):
                static[(f, b)] = r
    best = max(static.values(), key=lambda r: r.tokens_per_s)
    # on the same work: each run's first n tokens (same batch limit: the very same steps)
    n = min(gov.tokens, best.tokens)
    (tg, ng, eg), (tb, nb, eb) = gov.at_tokens(n), best.at_tokens(n)
    assert ng == nb and tg < tb
    assert ng / tg >= 0.9 * nb / tb
    assert (eb / nb) / (eg / ng) >= 0.95
    cap = cap_table.clock_cap(budget)
    assert cap == 1000
    cap_run = static.get((cap, streams)) or sim(streams=streams, seconds=seconds, governor=False, freq_mhz=cap)
    assert gov.tokens_per_s > cap_run.tokens_per_s


def test_no_clock_schedule_beats_the_clock_cap_on_both_counts():
    """The "10 W mode" clock (1000 MHz, every stream batched) is on the frontier of its steps'
    (time, energy): any schedule of clocks over the same steps that is faster spends more per
    token.  The governor is faster, so it spends more; the guard keeps that within 3 %.  (Both
    run the engine's 128-row prompt chunks here, so they run the same steps.)"""
    from edgebox.power.frontier import Frontier
    from edgebox.power.table import Step, StepPricer

    steps = []

    def recording():
        m = shape_model()
        real = m.box.account_step

        def account_step(segments, n_logits):
            steps.append(
                Step(sum(r for r, _ in segments), sum(r * c for r, c in segments), sum(c for _, c in segments), n_logits)
            )
            return real(segments, n_logits)

        m.box.account_step = account_step
        return m

    streams, seconds = 4, 12.0
    cap = simulate(recording, SimOptions(streams=streams, seconds=seconds, governor=False, freq_mhz=1000, batch=streams))
    gov = sim(streams=streams, seconds=seconds, budget_w=10.0, prompt_chunk=128)  # the cap's own steps
    n = min(cap.tokens, gov.tokens)
    (tc, nc, ec), (tg, ng, eg) = cap.at_tokens(n), gov.at_tokens(n)
    pricer = StepPricer(shape_model().box)
    used = steps[: cap.token_log[1].index(nc) + 1]
    priced = [pricer.price(s) for s in used]
    f = Frontier.of([p.step_s for p in priced], [p.step_s * p.power_w for p in priced])
    assert sum(p.step_s[3] for p in priced) == pytest.approx(tc)  # the cap's own run, priced
    assert f.least_energy_j(tc) == pytest.approx(ec, rel=1e-6)  # nothing as fast is cheaper
    assert f.least_energy_j(tc * 0.99) > ec * 1.003  # 1 % faster costs > 0.3 % more
    assert ng == nc and tg < tc and eg > f.least_energy_j(tg) * (1 - 1e-9)  # the governor: faster, dearer
    assert (eg / ng) / (ec / nc) <= 1.03 + 10.0 * 0.5 / ec


@pytest.mark.slow
def test_energy_per_token_at_12w_with_16_streams():
    """Where the budget would buy the most speed at the dearest energy (12 W, 16 streams: 1200 MHz
    decode draws 12.5 W): on the same work, >= 95 % of the best static setting's energy per token
    (1000 MHz, batch 16) and more tokens/s.  (A full minute: the guard's start allowance, B x
    0.5 s, weighs 2 % on half a minute's energy.)"""
    gov = sim(streams=16, seconds=60.0, budget_w=12.0)
    best = sim(streams=16, seconds=60.0, governor=False, freq_mhz=1000, batch=16)
    assert gov.report["ok"] and static_within(best, 12.0)
    n = min(gov.tokens, best.tokens)
    (tg, ng, eg), (tb, nb, eb) = gov.at_tokens(n), best.at_tokens(n)
    assert tg / ng < tb / nb  # faster (32-row prompt chunks: step ends differ a little)
    assert (eb / nb) / (eg / ng) >= 0.95


def test_short_prompt_chunks_settle_within_2_percent():
    """With the governor capping the engine's prompt chunk at 32 rows, every step is short enough
    for the 1 s window to be back within the budget and +-2 % of the new level, and stay there for
    a second, within 2 s of each budget step (4 streams; 128-row chunks miss this)."""
    r = sim(streams=4, seconds=15.0, budget_w=10.0, budget_steps=parse_budget_steps("5:7,10:10"), prompt_chunk=32)
    assert r.report["ok"], r.report
    for s in r.settle:
        assert s["settle_s"] is not None and s["settle_s"] <= 2.0, s


def test_budget_steps_are_met_within_two_seconds():
    r = sim(streams=4, seconds=15.0, budget_w=10.0, budget_steps=parse_budget_steps("5:7,10:10"))
    assert [e["new_w"] for e in r.events if e["kind"] == "budget"] == [7.0, 10.0]
    assert r.report["ok"], r.report  # windows after each step's 2 s and all 100 ms ones
    assert len(r.settle) == 2
    for s in r.settle:
        assert s["reach_s"] is not None and s["reach_s"] <= 2.0, s
        assert s["steady_w"] <= s["budget_w"]
    # the windows of the 7 W phase after it settled are within 7 W
    assert max(r.windows_w[7:10]) <= 7.0


def test_the_same_options_give_the_same_result():
    a, b = sim(streams=4, seconds=4.0, budget_w=8.0).to_dict(), sim(streams=4, seconds=4.0, budget_w=8.0).to_dict()
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b


def test_cli_json_and_static_settings():
    runner = CliRunner()
    r = runner.invoke(
        app, ["power", "simulate", "--streams", "2", "--seconds", "3", "--budget", "8", "--budget-steps", "2:6", "--json"]
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    for key in ("windows_w", "short_windows_w", "tokens_per_s", "freq_levels_mhz", "events", "settle", "report"):
        assert key in d
    assert len(d["windows_w"]) == 3 and d["events"][0]["kind"] == "budget"
    r = runner.invoke(
        app,
        ["power", "simulate", "--streams", "2", "--seconds", "3", "--governor", "off", "--freq", "800", "--batch", "1", "--json"],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert list(d["freq_time_s"]) == ["800"] and list(d["batch_time_s"]) == ["1"] and d["events"] == []
    r = runner.invoke(app, ["power", "simulate", "--seconds", "3", "--freq", "800"])
    assert isinstance(r.exception, EdgeboxError) and "governor off" in str(r.exception)
    r = runner.invoke(app, ["power", "simulate", "--seconds", "3", "--budget-steps", "x"])
    assert isinstance(r.exception, EdgeboxError) and "SECONDS:WATTS" in str(r.exception)
