"""edgebox.kernels.autotune: the on-disk cache (written, keyed, reused without timing, corrupt
files ignored), the memory rule, and the "auto" backend end to end against the reference.

Timing is proven absent with a counting timer (every timing reads ``Tuner.timer``), not with
sleeps; the weights are tiny so a tune takes well under a second.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import quants as gq

from edgebox.gguf import quant_types as qt
from edgebox.gguf.loader import Matrix
from edgebox.gguf.quant_types import QType
from edgebox.kernels import autotune, ort, ref
from edgebox.kernels.autotune import BUCKETS, NUMBA, ORT, Tuner, plan_shapes
from edgebox.kernels.backend import AutoLinear, AutoOps, NumbaLinear, get_ops

REPS = 2
CALLS_PER_SHAPE = len(BUCKETS) * REPS * 2 * 2  # buckets x reps x backends x (start, stop)


class CountingTimer:
    def __init__(self):
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        import time

        return time.perf_counter()


def weight(qtype, n_out, n_in, seed=0, name="w") -> Matrix:
    rng = np.random.default_rng(seed)
    if qtype == QType.Q5_K:  # gguf cannot quantize it: random bytes with sane scales
        raw = rng.integers(0, 256, (n_out, n_in // 256, 176), dtype=np.uint8)
        raw[..., 0:4] = np.array([0.01, 0.01], np.float16).view(np.uint8)  # d, dmin
        raw = raw.reshape(n_out, -1)
    else:
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        raw = np.ascontiguousarray(gq.quantize(w, qtype)).view(np.uint8).reshape(n_out, -1)
    return Matrix(name, qtype, n_out, n_in, raw)


@pytest.fixture
def model():
    """Two Q4_0 weights of one shape, a Q8_0 one, and a Q5_K one (no onnxruntime mapping)."""
    return [
        weight(QType.Q4_0, 64, 256, 1),
        weight(QType.Q4_0, 64, 256, 2),
        weight(QType.Q8_0, 33, 96, 3),
        weight(QType.Q5_K, 16, 256, 4),
    ]


def test_cache_written_keyed_and_reused_without_timing(tmp_path, model, monkeypatch):
    t1 = CountingTimer()
    tuner = Tuner(threads=1, cache_dir=tmp_path, timer=t1, reps=REPS)
    plan = tuner.plan(model)
    assert t1.calls == 2 * CALLS_PER_SHAPE  # two timed shapes; Q5_K is numba only, untimed
    assert set(plan) == {"Q4_0:64x256", "Q8_0:33x96", "Q5_K:16x256"}
    assert plan["Q4_0:64x256"].count == 2
    assert plan["Q5_K:16x256"].by_bucket == {b: NUMBA for b in BUCKETS}
    # one file, named by a key over what changes the timings
    files = list(tmp_path.glob("autotune-*.json"))
    assert files == [tuner.path]
    data = json.loads(tuner.path.read_text())
    import numba
    import onnxruntime

    assert data["key"] == {
        "format": autotune.FORMAT,
        "cpu": autotune.cpu_model(),
        "threads": 1,
        "numba": numba.__version__,
        "onnxruntime": onnxruntime.__version__,
        "accuracy_level": 4,
        "kernels": autotune.kernels_digest(),
    }
    entry = data["shapes"]["Q4_0:64x256"]
    assert set(entry["seconds"]) == {NUMBA, ORT} and set(entry["seconds"][ORT]) == set(BUCKETS)
    assert data["shapes"]["Q5_K:16x256"]["ort"] is False
    # a new process (new Tuner) reads the table and measures nothing: no timer call, no build
    monkeypatch.setattr(Tuner, "_measure_one", lambda self, m: pytest.fail("measured a cached shape"))
    t2 = CountingTimer()
    again = Tuner(threads=1, cache_dir=tmp_path, timer=t2, reps=REPS)
    assert again.path == tuner.path
    assert again.plan(model) == plan
    assert t2.calls == 0 and again.tune_seconds == 0
    # another thread count is another key, another file
    assert Tuner(threads=2, cache_dir=tmp_path).path != tuner.path


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEBOX_CACHE_DIR", str(tmp_path / "c"))
    assert Tuner(threads=1).path.parent == tmp_path / "c"
    monkeypatch.delenv("EDGEBOX_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Tuner(threads=1).path.parent == tmp_path / "home" / ".cache" / "edgebox"


def test_edited_kernels_get_a_cache_of_their_own(tmp_path, monkeypatch):
    """Timings of the old kernels must not choose backends for new ones."""
    before = Tuner(threads=1, cache_dir=tmp_path).path
    monkeypatch.setattr(autotune, "kernels_digest", lambda: "edited")
    assert Tuner(threads=1, cache_dir=tmp_path).path != before


def test_only_missing_shapes_are_measured(tmp_path, model):
    Tuner(threads=1, cache_dir=tmp_path, reps=REPS).plan(model[:2])
    t = CountingTimer()
    Tuner(threads=1, cache_dir=tmp_path, timer=t, reps=REPS).plan(model)
    assert t.calls == CALLS_PER_SHAPE  # only Q8_0:33x96 was new
    t = CountingTimer()
    Tuner(threads=1, cache_dir=tmp_path, timer=t, reps=REPS).plan(model)
    assert t.calls == 0


@pytest.mark.parametrize("content", ["{not json", '{"key": 1, "shapes": []}', "[]", "BROKEN_ENTRY"])
def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, model, content):
    tuner = Tuner(threads=1, cache_dir=tmp_path, reps=REPS)
    if content == "BROKEN_ENTRY":  # right key, an entry missing its timings
        content = json.dumps({"key": tuner.fields, "shapes": {"Q4_0:64x256": {"ort": True, "fastest": {}}}})
    tuner.path.parent.mkdir(parents=True, exist_ok=True)
    tuner.path.write_text(content)
    t = CountingTimer()
    fresh = Tuner(threads=1, cache_dir=tmp_path, timer=t, reps=REPS)
    fresh.plan(model)
    assert t.calls == 2 * CALLS_PER_SHAPE
    data = json.loads(fresh.path.read_text())
    assert data["key"] == fresh.fields and "Q4_0:64x256" in data["shapes"]
    t = CountingTimer()
    Tuner(threads=1, cache_dir=tmp_path, timer=t, reps=REPS).plan(model)
    assert t.calls == 0


# -- the memory rule ---------------------------------------------------------------------------


def entry(numba_s, ort_s, numba_bytes, ort_bytes) -> dict:
    """A measured entry: per-bucket seconds given as 4-tuples in BUCKETS order."""
    return {
        "ort": True,
        "fastest": {},
        "seconds": {NUMBA: dict(zip(BUCKETS, numba_s)), ORT: dict(zip(BUCKETS, ort_s))},
        "bytes": {NUMBA: numba_bytes, ORT: ort_bytes},
    }


def extra(plan) -> int:
    return sum(c.extra_bytes for c in plan.values())


def test_memory_rule_one_copy_and_budget():
    slow, fast = (1.0, 2.0, 8.0, 30.0), (0.5, 1.0, 4.0, 15.0)
    entries = {
        "big": entry(slow, fast, 100, 160),  # ORT 2x faster, +60 bytes per weight
        "small": entry(slow, fast, 10, 16),  # same speed-up, +6 per weight
        "free": entry(slow, fast, 50, 40),
    }  # ORT faster and smaller: no cost
    counts = {"big": 10, "small": 10, "free": 1}
    # budget for the small shape only: best time saved per byte goes first
    plan = plan_shapes(entries, counts, budget=100)
    assert plan["small"].by_bucket == {b: ORT for b in BUCKETS} and plan["small"].extra_bytes == 60
    assert plan["big"].by_bucket == {b: NUMBA for b in BUCKETS}
    assert plan["free"].by_bucket == {b: ORT for b in BUCKETS} and plan["free"].extra_bytes == 0
    assert extra(plan) <= 100
    # no budget: only the free upgrade
    plan = plan_shapes(entries, counts, budget=0)
    assert [k for k, c in plan.items() if ORT in c.backends] == ["free"]
    # room for all
    plan = plan_shapes(entries, counts, budget=10_000)
    assert all(c.backends == {ORT} for c in plan.values()) and extra(plan) == 660
    # every linear holds one copy unless dual was chosen
    assert all(len(c.backends) == 1 for c in plan.values())


def test_memory_rule_margin_and_dual():
    # ORT 1% faster everywhere: noise, numba stays
    plan = plan_shapes({"a": entry((1.0,) * 4, (0.99,) * 4, 10, 10)}, {"a": 3}, budget=1e9)
    assert plan["a"].backends == {NUMBA}
    # numba wins decode, ORT wins prefill by far: both copies only if the second copy fits
    e = {"a": entry((1.0, 1.0, 8.0, 40.0), (2.0, 2.0, 2.0, 4.0), 100, 150)}
    plan = plan_shapes(e, {"a": 2}, budget=2 * 150)
    assert plan["a"].by_bucket == {"1": NUMBA, "2-8": NUMBA, "9-64": ORT, ">64": ORT}
    assert plan["a"].extra_bytes == 300
    plan = plan_shapes(e, {"a": 2}, budget=299)
    assert len(plan["a"].backends) == 1 and plan["a"].extra_bytes <= 299


def test_plan_spends_five_percent_of_the_model(tmp_path, model, monkeypatch):
    """Tuner.plan's budget is BUDGET_FRACTION of the linears' file bytes (here: ORT made to look
    twice as fast, so only the budget decides)."""
    seen = {}

    def fake_plan(entries, counts, budget):
        seen["budget"] = budget
        return {k: autotune.Choice(k, {b: NUMBA for b in BUCKETS}, counts[k]) for k in entries}

    monkeypatch.setattr(autotune, "plan_shapes", fake_plan)
    Tuner(threads=1, cache_dir=tmp_path, reps=REPS).plan(model)
    assert seen["budget"] == pytest.approx(0.05 * sum(m.nbytes for m in model))


# -- the auto backend end to end ----------------------------------------------------------------


@pytest.mark.slow
def test_auto_backend_matches_reference(tmp_path):
    ops = get_ops("auto", threads=1)
    assert isinstance(ops, AutoOps) and ops.name == "auto"
    ops.tuner = Tuner(threads=1, cache_dir=tmp_path, reps=REPS)
    ms = [
        weight(QType.Q4_0, 40, 128, 1),
        weight(QType.Q4_0, 40, 128, 2),
        weight(QType.Q8_0, 24, 64, 3),
        weight(QType.Q5_K, 8, 256, 4),
    ]
    rng = np.random.default_rng(9)
    xs = {T: rng.standard_normal((T, 256)).astype(np.float32) for T in (1, 3, 20, 70)}
    # the reference first: NumbaLinear.prepare drops the pages under its rows (which zeroes
    # anonymous test memory)
    want = [{T: ref.matmul(x[:, : m.n_in], m.data, m.qtype) for T, x in xs.items()} for m in ms]
    linears = [ops.linear(m) for m in ms]
    assert isinstance(linears[3], NumbaLinear)  # Q5_K: numba, never tuned
    assert all(isinstance(lin, AutoLinear) for lin in linears[:3])
    done = []
    plan = ops.tune(linears, progress=lambda i, n: done.append((i, n)))
    assert set(plan) == {"Q4_0:40x128", "Q8_0:24x64", "Q5_K:8x256"} and done[-1] == (3, 3)
    assert plan["Q5_K:8x256"].backends == {NUMBA}
    assert any(ln.startswith("Q4_0:40x128") for ln in ops.report())
    # whatever the timings said, the ORT picks fit in 5% of the model's bytes
    assert extra(plan) <= 0.05 * sum(m.nbytes for m in ms[:3])
    for lin, m, w in zip(linears, ms, want):
        lin.prepare()
        if isinstance(lin, AutoLinear):
            assert lin.backends == plan[autotune.shape_key(m.qtype, m.n_out, m.n_in)].by_bucket
        for T, x in xs.items():
            y = lin(x[:, : m.n_in])
            assert y.shape == (T, m.n_out)
            assert np.abs(y - w[T]).max() / np.abs(w[T]).std() < 0.05


def test_auto_linear_dispatches_by_bucket_and_lazy_plan(tmp_path, monkeypatch):
    """A dual plan builds both backends (ORT first) and routes each call by len(x); a linear
    prepared without tune() is planned alone at its prepare()."""
    ops = AutoOps(threads=1, cache_dir=tmp_path)
    ops.tuner.reps = REPS
    m = weight(QType.Q4_0, 16, 64, 5)
    want = {T: ref.matmul(np.ones((T, 64), np.float32), m.data, m.qtype) for T in (1, 9)}
    ops.plan["Q4_0:16x64"] = autotune.Choice("Q4_0:16x64", {"1": NUMBA, "2-8": NUMBA, "9-64": ORT, ">64": ORT}, 1)
    lin = ops.linear(m)
    lin.prepare()
    assert lin.backends == {"1": NUMBA, "2-8": NUMBA, "9-64": ORT, ">64": ORT}
    assert isinstance(lin.by_bucket["1"], NumbaLinear) and isinstance(lin.by_bucket["9-64"], ort.OrtLinear)
    for T, w in want.items():
        np.testing.assert_allclose(lin(np.ones((T, 64), np.float32)), w, rtol=0.03, atol=0.03 * np.abs(w).max())
    lazy = ops.linear(weight(QType.Q8_0, 8, 64, 6))
    lazy(np.ones((2, 64), np.float32))  # first use: planned, cached, built
    assert "Q8_0:8x64" in ops.plan and "Q8_0:8x64" in json.loads(ops.tuner.path.read_text())["shapes"]


def test_big_weights_are_timed_on_a_row_slice(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "TUNE_BYTES", 8 * qt.row_bytes(QType.Q4_0, 128))
    e = Tuner(threads=1, cache_dir=tmp_path, reps=REPS).measure([weight(QType.Q4_0, 40, 128)])["Q4_0:40x128"]
    assert e["rows_timed"] == 8
    assert e["bytes"][ORT] == ort.resident_bytes(QType.Q4_0, 40, 128)


def test_fused_linears_are_planned_as_their_stacked_runs(tmp_path):
    """A fused linear (chips.chip.FusedLinear: parts stacked per run of one type at prepare())
    is tuned as the matrices it will build, and timed on a stacked copy of its rows."""
    q, k, v = weight(QType.Q4_0, 32, 64, 1, "q"), weight(QType.Q4_0, 8, 64, 2, "k"), weight(QType.Q8_0, 8, 64, 3, "v")
    fused = SimpleNamespace(parts=(q, k, v))
    ms = autotune.matrices_of(fused)
    assert [(m.qtype, m.n_out, m.n_in) for m in ms] == [(QType.Q4_0, 40, 64), (QType.Q8_0, 8, 64)]
    assert ms[0].nbytes == q.nbytes + k.nbytes and ms[1] is v
    np.testing.assert_array_equal(ms[0].rows(36), np.concatenate([q.data, k.data[:4]]))
    assert autotune.matrices_of(SimpleNamespace(matrix=q)) == [q]
    ops = AutoOps(threads=1, cache_dir=tmp_path)
    ops.tuner.reps = REPS
    plan = ops.tune([fused, ops.linear(weight(QType.Q4_0, 40, 64, 4))])
    assert set(plan) == {"Q4_0:40x64", "Q8_0:8x64"} and plan["Q4_0:40x64"].count == 2
    # the fused linear's stacked matrix, built at its prepare(), finds its plan
    stacked = ops.linear(Matrix("q+k", QType.Q4_0, 40, 64, ms[0].rows(40)))
    stacked.prepare()
    assert stacked.backends == plan["Q4_0:40x64"].by_bucket


def test_a_weight_ort_cannot_build_stays_on_numba(tmp_path, monkeypatch):
    def broken(self, release=True):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : no kernel")

    monkeypatch.setattr(ort.OrtLinear, "prepare", broken)
    tuner = Tuner(threads=1, cache_dir=tmp_path, reps=REPS)
    plan = tuner.plan([weight(QType.Q4_0, 16, 64)])
    assert plan["Q4_0:16x64"].backends == {NUMBA}
    assert "no kernel" in tuner.table["Q4_0:16x64"]["error"]
