"""``edgebox plan``: capacity planning from the partition plan and the cost model."""

from __future__ import annotations

import json
import subprocess
import sys

import edgebox
from edgebox.commands.plan import make_plan


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
    proc = subprocess.run([sys.executable, "-m", "edgebox.cli", "plan", "--chips", "4", "--budget", "10", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n_chips"] == 4 and out["profile"] == "r100-edge" and out["best"]["power_w"] <= 10


def test_plan_cli_table():
    proc = subprocess.run([sys.executable, "-m", "edgebox.cli", "plan", "--chips", "4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "best within 10 W" in proc.stdout and "MHz" in proc.stdout
