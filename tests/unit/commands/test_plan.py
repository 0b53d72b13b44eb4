"""``edgebox plan``: capacity planning from the partition plan and the cost model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import edgebox
from edgebox.commands.plan import make_plan
from edgebox.hw.step import steady_decode
from edgebox.power.shapes import DEEPSEEK_7B, shape_model


def test_plan_best_setting_is_within_budget_and_fastest():
    m = edgebox.load(chips=4)
    plan = make_plan(m, budget_w=6.0)
    assert plan.best is not None and plan.best.power_w <= 6.0
    assert all(pt.tokens_per_s <= plan.best.tokens_per_s for pt in plan.points if pt.power_w <= 6.0)
    assert any(pt.power_w > 6.0 for pt in plan.points)  # the budget binds
    # per-chip memory is the real split: every chip holds the replicated embedding at least
    assert len(plan.weights_gib_per_chip) == 4 and min(plan.weights_gib_per_chip) > 0
    # faster clocks are faster and hungrier at a fixed batch
    batch1 = sorted((pt for pt in plan.points if pt.batch == 1), key=lambda pt: pt.freq_mhz)
    assert all(a.tokens_per_s < b.tokens_per_s and a.power_w < b.power_w for a, b in zip(batch1, batch1[1:]))


def test_plan_cli_json():
    proc = subprocess.run(
        [sys.executable, "-m", "edgebox.cli", "plan", "--chips", "4", "--budget", "10", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n_chips"] == 4 and out["profile"] == "r100-edge" and out["best"]["power_w"] <= 10


def test_plan_cli_table():
    proc = subprocess.run(
        [sys.executable, "-m", "edgebox.cli", "plan", "--chips", "4"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "best within 10 W" in proc.stdout and "MHz" in proc.stdout


def test_plan_prices_the_real_shards_with_the_step_cost_model():
    """The plan of the 7B shape is steady decode priced by the one step-cost model on the box's shards."""
    m = shape_model(DEEPSEEK_7B, "Q4_0", chips=4)
    try:
        plan = make_plan(m, budget_w=10.0, batches=(1, 16), context=256)
        freqs = np.array(m.box.profile.freqs_mhz, float)
        for batch in (1, 16):
            d = steady_decode(m.box.accounting.work, batch, 256, freqs)
            pts = sorted((pt for pt in plan.points if pt.batch == batch), key=lambda pt: pt.freq_mhz)
            assert [pt.tokens_per_s for pt in pts] == pytest.approx(list(d.tokens_per_s), rel=1e-12)
            assert [pt.power_w for pt in pts] == pytest.approx(list(d.power_w), rel=1e-12)
            assert all(pt.bound == "memory" for pt in pts)
    finally:
        m.close()
    assert plan.best is not None and plan.best.freq_mhz == 800 and plan.best.batch == 16
    one = [pt for pt in plan.points if pt.batch == 1 and pt.power_w <= 10.0]
    assert 27.0 <= max(pt.tokens_per_s for pt in one) <= 33.0  # the seed headline, as `edgebox plan` prints it
