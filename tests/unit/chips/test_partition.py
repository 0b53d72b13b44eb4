"""Tensor parallelism: the plan's split rules, and N chips giving one chip's logits."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

import edgebox
from edgebox.chips.partition import PartitionPlan, _deal
from edgebox.chips.tp import col_slice
from tests.fixtures.floats import assert_same_product
from tests.fixtures.paths import REPO

CODER_Q4_K_M = REPO / "tests" / "data" / "models" / "tiny-deepseek-coder-Q4_K_M.gguf"
CODER_Q4_0 = REPO / "tests" / "data" / "models" / "tiny-deepseek-coder-Q4_0.gguf"
CODER_Q8_0 = REPO / "tests" / "data" / "models" / "tiny-deepseek-coder-Q8_0.gguf"


def test_deal_is_even_and_contiguous():
    assert [len(r) for r in _deal(43, 4)] == [11, 11, 11, 10]  # DeepSeek-7B FFN in Q4_K super-blocks
    assert [len(r) for r in _deal(2, 4)] == [1, 1, 0, 0]
    assert [(r.start, r.stop) for r in _deal(5, 2)] == [(0, 3), (3, 5)]


def logits_on(path, chips: int, ids):
    m = edgebox.load(path, chips=chips)
    try:
        return m.logits(ids), m.box.plan
    finally:
        m.box.close()


CASES = [
    ("tiny-deepseek-llm", None, 4),  # llama F32: one head and 40 FFN rows per chip
    ("tiny-qwen2", None, 4),  # qwen2 F32: GQA with each KV head replicated on 2 chips, biases
    ("tiny-qwen2", None, 3),  # uneven: heads 2/1/1, FFN rows 54/53/53
    ("coder-Q8_0", None, 4),  # Q8_0: 32-value blocks
    ("coder-Q4_0", None, 4),
    ("coder-Q4_K_M", None, 4),  # 256-value super-blocks: chips 2 and 3 get no FFN block
]


@pytest.mark.parametrize("name,_,chips", CASES)
def test_n_chips_give_one_chips_logits(name, _, chips, tiny_f32):
    path = {"coder-Q8_0": CODER_Q8_0, "coder-Q4_0": CODER_Q4_0, "coder-Q4_K_M": CODER_Q4_K_M}.get(name) or tiny_f32(name)
    ids = [1, 50, 900, 7, 7, 31, 2000, 15, 400, 3][:10]
    one, _ = logits_on(path, 1, ids)
    many, plan = logits_on(path, chips, ids)
    # float re-association only: partial sums added in another order (measured up to 6e-5 of the
    # logits' spread: an f32 ulp of difference can flip the f16 rounding of a cached key). With
    # quantized weights the kernels quantize activations to int8, where an ulp can also flip one
    # int8 step of one value: a rare row then moves by ~1/127 of a block's scale (measured 0.0074,
    # and 0.025 on coder-Q4_0 once the scale became amax / 127 exactly, as llama.cpp computes it).
    row_err = np.abs(many - one).max(axis=1) / float(one.std())
    assert np.median(row_err) < 2e-5, row_err
    assert row_err.max() < (2e-4 if name.startswith("tiny-") else 0.04), row_err
    assert plan.n_chips == chips


def test_q4_k_split_leaves_chips_without_ffn_and_attention():
    m = edgebox.load(CODER_Q4_K_M, chips=4)
    plan = m.box.plan
    # attn_output rows of 4 heads x 64 = one 256-value super-block: all heads stay on chip 0
    assert plan.heads_per_unit == 4 and [len(s.heads) for s in plan.shards] == [4, 0, 0, 0]
    assert [len(s.ffn) for s in plan.shards] == [256, 256, 0, 0]
    assert m.box.chips[3].layers[0].w_gate_up is None and m.box.chips[3].layers[0].wqkv is None
    # shards are views into the file's mmap, never copies
    chip0 = m.box.chips[0].layers[0]
    assert chip0.w_down.matrix.data.base is not None and not chip0.w_down.matrix.data.flags.owndata
    m.box.close()


def test_kv_heads_replicated_when_fewer_than_chips(tiny_f32):
    m = edgebox.load(tiny_f32("tiny-qwen2"), chips=4)  # 4 query heads, 2 KV heads
    assert [tuple(s.kv_heads) for s in m.box.plan.shards] == [(0,), (0,), (1,), (1,)]
    kv = m.new_cache(16)
    assert [k.shape[2] for k in kv.k] == [1, 1, 1, 1]
    m.box.close()


def test_column_cut_must_be_on_block_boundaries():
    m = edgebox.load(CODER_Q4_K_M)
    wd = m.weights.layers[0].w_down
    with pytest.raises(edgebox.EdgeboxError, match="block boundaries of 256"):
        col_slice(wd, range(0, 100))
    part = col_slice(wd, range(256, 512))
    assert part.n_in == 256 and part.data.shape[1] == wd.data.shape[1] // 2


def test_model_that_does_not_fit_is_refused(tmp_path):
    text = (REPO / "edgebox" / "hw" / "profiles" / "r100-edge.toml").read_text()
    small = re.sub(r"(?m)^capacity_gib = .*$", "capacity_gib = 0.002", text)
    profile = tmp_path / "tiny-chip.toml"
    profile.write_text(small)
    with pytest.raises(edgebox.ModelError, match=r"needs 0\.\d+ GiB per chip on 4 chip\(s\), the chip .* has 0\.00 GiB"):
        edgebox.load(CODER_Q8_0, chips=4, profile=str(profile))


def test_plan_for_the_7b_shape():
    """DeepSeek-LLM-7B's real hyper-parameters on Q4_K (256-value super-blocks), without the file."""
    from types import SimpleNamespace

    from edgebox.gguf.quant_types import QType
    from edgebox.power.shapes import DEEPSEEK_7B as args

    layer = SimpleNamespace(wo=SimpleNamespace(qtype=QType.Q4_K), w_down=SimpleNamespace(qtype=QType.Q6_K))
    plan = PartitionPlan.build(args, SimpleNamespace(layers=[layer] * 30), 4)
    assert [len(s.heads) for s in plan.shards] == [8, 8, 8, 8]
    assert [len(s.ffn) for s in plan.shards] == [11 * 256, 11 * 256, 11 * 256, 10 * 256 + 11008 - 43 * 256]
    assert sum(len(s.ffn) for s in plan.shards) == 11008


# -- merged column-parallel weights and the fused linear that runs them ----------------------------


def _fused_vs_separate(ops, parts, x):
    from edgebox.chips.chip import FusedLinear

    fused = FusedLinear(ops, parts)
    separate = np.concatenate([ops.linear(p)(x) for p in parts], axis=1)
    return fused, fused(x), separate


@pytest.mark.parametrize("backend", ["numba", "ref"])
@pytest.mark.parametrize("layer", [0, 1])  # layer 1: attn_v and ffn_down are Q6_K, the rest Q4_K
@pytest.mark.parametrize("rows", [1, 5])  # decode (matvec) and prefill (matmul)
def test_fused_linear_equals_the_separate_ones(backend, layer, rows):
    from edgebox.kernels import ref
    from edgebox.kernels.backend import get_ops

    m = edgebox.load(CODER_Q4_K_M)
    lw, ops = m.weights.layers[layer], get_ops(backend)
    x = np.random.default_rng(layer).standard_normal((rows, m.args.n_embd)).astype(np.float32)
    for parts in ([lw.wq, lw.wk, lw.wv], [lw.w_gate, lw.w_up]):
        fused, y, expected = _fused_vs_separate(ops, parts, x)
        assert y.shape == (rows, sum(p.n_out for p in parts)) == (rows, fused.n_out)
        assert fused.nbytes == sum(p.nbytes for p in parts)
        if backend == "numba":
            # row by row the same kernel on the same (quantized) activations: bit for bit equal
            np.testing.assert_array_equal(y, expected)
        else:
            # numpy's BLAS blocks a stacked matrix's sums unlike the separate ones' (by CPU and shape)
            w = np.concatenate([ref.dequantize(p.data, p.qtype) for p in parts])
            assert_same_product(y, expected, x, w)
    # one matmul per run of one type: q+k stacked, v (Q6_K in layer 1) on its own
    fused, _, _ = _fused_vs_separate(ops, [lw.wq, lw.wk, lw.wv], x)
    assert [lin.n_out for lin in fused._runs] == ([768] if layer == 0 else [512, 256])
    # numba repacks the stacked rows block by block (matmul.pack_rows): they are never copied
    if backend == "numba":
        stacked = [lin.matrix for lin in fused._runs if hasattr(lin.matrix, "rows_read")]
        assert stacked and not any(m.rows_read for m in stacked)


def test_fused_linear_f32_and_ragged_row_counts(tiny_f32):
    """Float weights, and parts whose row counts are not multiples of the kernels' 8-row groups."""
    from edgebox.chips.tp import row_slice
    from edgebox.kernels.backend import get_ops

    m = edgebox.load(tiny_f32("tiny-qwen2"))
    lw = m.weights.layers[0]
    parts = [row_slice(lw.wq, range(3, 16)), row_slice(lw.wk, range(0, 5)), row_slice(lw.wv, range(2, 13))]
    x = np.random.default_rng(0).standard_normal((3, m.args.n_embd)).astype(np.float32)
    for backend in ("numba", "ref"):
        _, y, expected = _fused_vs_separate(get_ops(backend), parts, x)
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6 * float(np.abs(expected).max()))


def test_merged_shards_stack_each_chips_rows():
    m = edgebox.load(CODER_Q4_K_M, chips=4)
    try:
        chips = m.box.chips
        # chip 0 holds all 4 heads: its q, k and v rows stacked, 3 x 256; chips 1-3 hold no head
        assert chips[0].layers[0].wqkv.n_out == 3 * 256 and [p.n_out for p in chips[0].layers[0].wqkv.parts] == [256] * 3
        assert all(c.layers[0].wqkv is None for c in chips[1:])
        # FFN rows 256 / 256 / 0 / 0: gate rows then up rows
        assert [c.layers[0].w_gate_up.n_out if c.layers[0].w_gate_up else 0 for c in chips] == [512, 512, 0, 0]
        gate, up = chips[1].layers[0].w_gate_up.parts
        assert gate.name.endswith("[rows 256:512]") and "ffn_gate" in gate.name and "ffn_up" in up.name
        # the merged parts are views into the mmap until prepared
        assert not gate.data.flags.owndata
        # device time still prices each tensor on its own: q, k, v, o / gate, up, down
        assert len(chips[0].attn_matmuls[0]) == 4 and len(chips[1].ffn_matmuls[0]) == 3
        assert chips[2].attn_matmuls[0] == [] and chips[2].ffn_matmuls[0] == []
    finally:
        m.box.close()


def test_merged_split_rules():
    from edgebox.chips.tp import MergedColumnParallelLinear
    from edgebox.gguf.loader import Matrix
    from edgebox.gguf.quant_types import QType

    def mat(name, n_out, n_in=32):
        return Matrix(name, QType.F32, n_out, n_in, np.zeros((n_out, n_in * 4), np.uint8))

    merged = MergedColumnParallelLinear.split(
        [mat("q", 8), mat("k", 4)], [[range(0, 6), range(6, 8)], [range(0, 2), range(2, 4)]]
    )
    assert [p.n_out for p in merged.shard(0)] == [6, 2] and [p.n_out for p in merged.shard(1)] == [2, 2]
    none = MergedColumnParallelLinear.split([mat("q", 8), mat("k", 4)], [[range(0, 8), range(8, 8)], [range(0, 4), range(4, 4)]])
    assert none.shard(1) is None
    with pytest.raises(edgebox.EdgeboxError, match="some of the merged weights"):
        MergedColumnParallelLinear.split(
            [mat("q", 8), mat("k", 4)], [[range(0, 8), range(8, 8)], [range(0, 2), range(2, 4)]]
        ).shard(1)
    with pytest.raises(edgebox.EdgeboxError, match="same input size"):
        MergedColumnParallelLinear.split([mat("q", 8), mat("k", 4, 64)], [[range(0, 8)], [range(0, 4)]])


# -- the host threads the chips run on --------------------------------------------------------------


def test_chip_threads_run_every_chip_concurrently_in_order():
    import time

    import numba

    from edgebox.chips.threads import ChipThreads

    threads = ChipThreads(list(range(5)), n_cores=2)
    try:
        assert [len(g) for g in threads.groups] == [3, 2] and threads.kernel_threads == 1
        seen = {}

        def fn(c):
            seen[c] = (threading.current_thread().name, numba.get_num_threads())
            time.sleep(0.05)
            return c * 10

        before = numba.get_num_threads()
        t = time.perf_counter()
        assert threads.run(fn) == [0, 10, 20, 30, 40]
        assert time.perf_counter() - t < 0.2  # 3 x 50 ms on one thread beside 2 x 50 ms on the other
        assert len({seen[c][0] for c in (0, 1, 2)}) == 1 and len({seen[c][0] for c in (3, 4)}) == 1
        # the caller runs the last, smaller group (it also does the serial work between runs)
        assert seen[3][0] == threading.current_thread().name != seen[0][0]
        assert {n for _, n in seen.values()} == {1}  # one kernel thread each: two host threads on two cores
        assert numba.get_num_threads() == before  # the caller's count is restored
        assert threads.run(lambda c: c) == [0, 1, 2, 3, 4]  # again, on the same threads
    finally:
        threads.close()


def test_chip_threads_raise_a_helpers_error_after_all_finished():
    from edgebox.chips.threads import ChipThreads

    threads = ChipThreads([0, 1, 2, 3], n_cores=2)
    finished = []

    def fn(c):
        if c == 3:
            raise ValueError("chip 3 failed")
        finished.append(c)
        return c

    try:
        with pytest.raises(ValueError, match="chip 3 failed"):
            threads.run(fn)
        assert sorted(finished) == [0, 1, 2]
        assert threads.run(lambda c: c + 1) == [1, 2, 3, 4]  # still usable
    finally:
        threads.close()


def test_chip_threads_restart_in_a_forked_child():
    import os
    import select

    from edgebox.chips.threads import ChipThreads

    threads = ChipThreads([0, 1, 2], n_cores=2)
    try:
        assert threads.run(lambda c: c) == [0, 1, 2]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: the helper thread did not survive the fork; run must start a new one
            ok = False
            try:
                ok = threads.run(lambda c: c * 2) == [0, 2, 4]
            finally:
                os.write(w, b"1" if ok else b"0")
                os._exit(0)
        os.close(w)
        ready, _, _ = select.select([r], [], [], 20)
        if not ready:  # a child stuck waiting for a helper that is gone
            os.kill(pid, 9)
        assert ready and os.read(r, 1) == b"1"
        os.waitpid(pid, 0)
    finally:
        threads.close()


def test_chip_threads_stop_at_close_and_when_dropped():
    import gc
    import time

    from edgebox.chips.threads import ChipThreads

    def helpers() -> set:
        return {t for t in threading.enumerate() if t.name.startswith("chip-thread")}

    def gone(threads: set) -> bool:
        deadline = time.time() + 5
        while any(t.is_alive() for t in threads) and time.time() < deadline:
            time.sleep(0.01)
        return not any(t.is_alive() for t in threads)

    before = helpers()
    closed = ChipThreads([0, 1], n_cores=2)
    assert helpers() == before  # none until the first run
    closed.run(lambda c: c)
    started = helpers() - before
    assert len(started) == 1
    closed.close()
    assert gone(started)

    dropped = ChipThreads([0, 1], n_cores=2)
    dropped.run(lambda c: c)
    started = helpers() - before
    assert len(started) == 1
    del dropped
    gc.collect()
    assert gone(started)


def test_one_chip_after_four_keeps_its_kernel_threads():
    """The caller runs its chips' kernels single-threaded; a one-chip model used afterwards on the
    same thread must get every core again."""
    import numba

    before = numba.get_num_threads()
    m4 = edgebox.load(CODER_Q8_0, chips=4)
    m4.logits([1, 2, 3])
    m4.box.close()
    assert numba.get_num_threads() == before


def test_chip_threads_wait_for_helpers_when_the_callers_own_chip_fails():
    import time

    from edgebox.chips.threads import ChipThreads

    threads = ChipThreads([0, 1], n_cores=2)
    finished = []

    def fn(c):
        if c == 1:  # the caller's chip
            raise KeyError("chip 1 failed")
        time.sleep(0.05)
        finished.append(c)

    try:
        with pytest.raises(KeyError, match="chip 1 failed"):
            threads.run(fn)
        assert finished == [0]  # the helper's chip was done before the error was raised
    finally:
        threads.close()


def test_chip_threads_pass_a_blocks_arguments_to_every_chip():
    """``run(fn, *args)``: fn(chip, *args) on every chip (the box passes a block and its inputs,
    no closure per call), on the helper's chips and the caller's alike."""
    from edgebox.chips.threads import ChipThreads

    for n_cores in (1, 2):
        threads = ChipThreads([0, 1, 2], n_cores=n_cores)
        try:
            assert threads.run(lambda c, a, b: (c, a, b), "x", 5) == [(0, "x", 5), (1, "x", 5), (2, "x", 5)]
        finally:
            threads.close()
