"""``edgebox bench --startup``: process start -> first token, one process per start (the clock,
the page-cache states, the weight cache cold and warm, the table), and the weight-cache flags of
``edgebox run`` as a user meets them.  Not timed: benchmarks report, tests do not race the clock."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgebox.commands import bench
from edgebox.errors import EdgeboxError
from tests.fixtures.paths import REPO, TEST_MODEL


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBOX_WEIGHT_CACHE")}
    env["EDGEBOX_CACHE_DIR"] = str(tmp_path / "cache")
    argv = [sys.executable, "-m", "edgebox.cli", "run", str(TEST_MODEL), "-p", "hi", "-n", "1", "--temp", "0", *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def _entries(tmp_path) -> list:
    d = tmp_path / "cache" / "packed"
    return sorted(d.glob("*.ebx")) if d.exists() else []


def test_run_writes_an_entry_by_default_and_none_with_no_weight_cache(tmp_path):
    p = _run(tmp_path, "--chips", "1", "--no-weight-cache")
    assert p.returncode == 0, p.stderr
    assert _entries(tmp_path) == []
    p = _run(tmp_path, "--chips", "1", "--weight-cache-gib", "2")
    assert p.returncode == 0, p.stderr
    assert len(_entries(tmp_path)) == 1


def test_run_refuses_a_bad_cache_size_in_one_line(tmp_path):
    p = _run(tmp_path, "--weight-cache-gib", "0")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "--weight-cache-gib must be a positive number of GiB" in p.stderr and _entries(tmp_path) == []


def test_the_clock_stops_at_the_first_byte_and_peak_rss_is_the_childs(tmp_path):
    code = (
        "import sys, time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); print('tok', flush=True); time.sleep(1)"
    )
    got = bench.time_first_token([sys.executable, "-c", code], dict(os.environ))
    assert got.first_token_s < got.exit_s and got.exit_s - got.first_token_s >= 0.9  # the sleep came after the first byte
    assert got.peak_rss_gib > 0.29  # the child's 300 MiB, not this process's
    with pytest.raises(EdgeboxError, match="exited 3 before a first token: boom"):
        bench.time_first_token(
            [sys.executable, "-c", "import sys; sys.exit('boom' and 3) if print('boom', file=sys.stderr) is None else 0"],
            dict(os.environ),
        )


def test_fadvise_drops_a_files_pages_and_reading_brings_them_back(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(os.urandom(8 << 20))
    bench.read_into_page_cache([f])
    assert bench.resident_fraction(f) == 1.0
    assert bench.drop_page_cache([f], whole=False) == "fadvise"
    assert bench.resident_fraction(f) < 0.1
    bench.read_into_page_cache([f])
    assert bench.resident_fraction(f) == 1.0


@pytest.mark.slow
def test_startup_bench_times_every_state(tmp_path, monkeypatch):
    """Every edgebox state, one process each. (llama.cpp beside it needs llama-cpp-python, the
    oracle, which the test environment does not install: the benchmark runs it, not the tests.)"""
    monkeypatch.setenv("EDGEBOX_CACHE_DIR", str(tmp_path / "home"))
    r = bench.run_startup_bench(TEST_MODEL, threads=2, vs_llama_cpp=False, rounds=1, drop_whole_cache=False)
    assert r["page_cache_drop"] == "fadvise" and r["ctx"] == 2048
    rows = {(x["runner"], x["chips"], x["weight_cache"], x["page_cache"]): x for x in r["rows"]}
    states = [(c, st) for c in (1, 4) for st in ("cold", "warm")]
    assert set(rows) == {("edgebox", c, st, p) for c, st in states for p in ("cached", "dropped")}
    for x in rows.values():
        assert 0 < x["first_token_s"] <= x["exit_s"] and 0.02 < x["peak_rss_gib"] < 2
    assert set(r["entry_gib"]) == {"1", "4"} and all(g > 0 for g in r["entry_gib"].values())  # the cold starts wrote
    assert not list((tmp_path / "home").glob("bench-startup-*"))  # the bench's own cache is gone
    table = bench.format_startup(r)
    assert "edgebox 4 chips, cache warm" in table and "page cache dropped with fadvise" in table
