"""``edgebox bench`` end to end on the tiny model: each runner in its own process, the report's
figures present and sane (not timed: benchmarks report, tests do not race the clock)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import edgebox
from edgebox.commands import bench
from tests.fixtures.paths import TEST_MODEL

REPO = Path(__file__).resolve().parents[3]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgebox.cli", "bench", *args], capture_output=True, text=True, cwd=REPO, timeout=600
    )


@pytest.mark.slow
def test_bench_reports_speed_memory_concurrency_and_hot_standby():
    p = _bench(str(TEST_MODEL), "--prompt", "16,64", "--n-decode", "4", "--concurrency", "1,2", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    e = r["edgebox"]
    assert set(e["pp_tok_s"]) == {"16", "64"} and all(v > 0 for v in e["pp_tok_s"].values())
    assert e["tg_tok_s"] > 0 and e["ttft_s"] > 0 and e["kv_gib"] > 0
    # the runner ran in its own process: its peak RSS is its own (a few hundred MB for the tiny model)
    assert 0.02 < e["peak_rss_gib"] < 2 and r["memory_ratio"] == e["peak_rss_gib"] / (r["file_gib"] + e["kv_gib"])
    assert [c["concurrency"] for c in r["concurrency"]] == [1, 2]
    assert r["batching_gain"]["1"] == 1.0 and set(r["vs_pp64"]) == {"1", "2"}
    h = r["hot_standby"]
    assert h["first_ttft_s"] > 0 and h["steady_ttft_s"] > 0 and h["first_vs_steady"] == h["first_ttft_s"] / h["steady_ttft_s"]
    assert "edgebox: decode" in p.stderr  # progress on stderr


@pytest.mark.slow
def test_bench_concurrency_rounds_report_the_median_round_and_the_range():
    p = _bench(str(TEST_MODEL), "--prompt", "16", "--n-decode", "2", "--concurrency", "2", "--rounds", "3", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    (point,) = r["concurrency"]
    ratios = point["vs_pp64_range"]
    assert len(ratios) == 3 and ratios == sorted(ratios)
    assert r["vs_pp64"]["2"] == point["decode_tok_s"] / point["pp64_tok_s"] == ratios[1]
    assert p.stderr.count("concurrency 2: decode") == 3  # one progress line per round


def test_a_concurrency_round_reads_every_prompt_in_its_first_step(monkeypatch):
    """The decode rate is N / the per-token latency after the first token, so the round's later
    steps must be pure decode (one row per stream): a prompt chunk left over would be counted as
    decode time. 2 x 256 tokens fill the 512-row chunk budget exactly (as text they re-tokenized
    to 531 and left 19 rows over)."""
    m = edgebox.load(str(TEST_MODEL))
    monkeypatch.setattr(bench, "prompt_seconds", lambda m, n: 1.0)  # only the engine's steps below
    steps = []  # (rows, segments) of every forward pass the engine runs
    forward = m.transformer.forward_segments

    def recorded(segments):
        steps.append((sum(len(s.tokens) for s in segments), len(segments)))
        return forward(segments)

    monkeypatch.setattr(m.transformer, "forward_segments", recorded)
    bench._concurrency_round(m, 2, 256, 3)
    first = steps.index((512, 2))  # after the engine's warm-up passes
    assert all(rows == segments for rows, segments in steps[first + 1 :]), steps


def test_bench_errors_are_one_line():
    for args, text in ((["--prompt", "x"], "comma-separated"), ([str(REPO / "absent.gguf")], "no such model file")):
        p = _bench(*args)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and text in p.stderr, p.stderr
