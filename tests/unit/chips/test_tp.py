"""The parallel linear types' split rules (chips.tp): which rows or columns each chip holds, and
that the chips' outputs joined (concatenated, all-reduced, gathered) are the full product."""

from __future__ import annotations

import numpy as np
import pytest

import edgebox
from edgebox.chips.partition import ChipShard, PartitionPlan
from edgebox.chips.tp import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelLinear,
)
from edgebox.gguf.loader import Matrix
from edgebox.gguf.quant_types import QType
from edgebox.kernels.backend import get_ops
from tests.fixtures.paths import REPO

CODER_Q8_0 = REPO / "tests" / "data" / "models" / "tiny-deepseek-coder-Q8_0.gguf"


def f32(name: str, values: np.ndarray) -> Matrix:
    values = np.ascontiguousarray(values, np.float32)
    return Matrix(name, QType.F32, values.shape[0], values.shape[1], values.view(np.uint8))


def rows_of(m: Matrix | None) -> np.ndarray | None:
    return None if m is None else m.data.view(np.float32)


def shards(heads, kv_heads, ffn=(), vocab=()):
    """ChipShards from per-chip (start, stop) pairs."""
    n = len(heads)
    ffn, vocab = ffn or [(0, 0)] * n, vocab or [(0, 0)] * n
    return [ChipShard(i, range(*heads[i]), range(*kv_heads[i]), range(*ffn[i]), range(*vocab[i])) for i in range(n)]


def test_qkv_splits_q_by_head_and_replicates_kv_heads_with_their_biases():
    # 4 query heads, 2 KV heads, hd 2, on 4 chips: chip i has head i and KV head i // 2
    hd, D = 2, 4
    rng = np.random.default_rng(0)
    wq, wk, wv = (f32(n, rng.standard_normal((r, D))) for n, r in (("q", 4 * hd), ("k", 2 * hd), ("v", 2 * hd)))
    bq, bk, bv = (np.arange(r, dtype=np.float32) + o for r, o in ((4 * hd, 0), (2 * hd, 100), (2 * hd, 200)))
    s = shards([(i, i + 1) for i in range(4)], [(i // 2, i // 2 + 1) for i in range(4)])
    qkv = QKVParallelLinear.of(wq, wk, wv, bq, bk, bv, s, hd)
    for i in range(4):
        q, k, v = qkv.shard(i)
        np.testing.assert_array_equal(rows_of(q), rows_of(wq)[i * hd : (i + 1) * hd])
        kv = i // 2
        np.testing.assert_array_equal(rows_of(k), rows_of(wk)[kv * hd : (kv + 1) * hd])
        np.testing.assert_array_equal(rows_of(v), rows_of(wv)[kv * hd : (kv + 1) * hd])
        np.testing.assert_array_equal(
            qkv.biases[i], np.concatenate([bq[i * hd : (i + 1) * hd], bk[kv * hd : (kv + 1) * hd], bv[kv * hd : (kv + 1) * hd]])
        )
        assert not q.data.flags.owndata  # views, never copies
    # a chip without heads holds nothing of the block, and no bias; no biases at all (llama)
    s2 = shards([(0, 4), (4, 4)], [(0, 2), (0, 0)])
    qkv2 = QKVParallelLinear.of(wq, wk, wv, bq, bk, bv, s2, hd)
    assert qkv2.shard(1) is None and qkv2.biases[1] is None and qkv2.biases[0].shape == (8 * hd,)
    assert QKVParallelLinear.of(wq, wk, wv, None, None, None, s2, hd).biases == (None, None)


def test_gate_up_split_by_ffn_rows_uneven():
    rng = np.random.default_rng(1)
    gate, up = f32("gate", rng.standard_normal((5, 4))), f32("up", rng.standard_normal((5, 4)))
    s = shards([(0, 0)] * 3, [(0, 0)] * 3, ffn=[(0, 2), (2, 4), (4, 5)])
    merged = MergedColumnParallelLinear.gate_up(gate, up, s)
    assert [[p.n_out for p in merged.shard(i)] for i in range(3)] == [[2, 2], [2, 2], [1, 1]]
    g, u = merged.shard(2)
    np.testing.assert_array_equal(rows_of(g), rows_of(gate)[4:5])
    np.testing.assert_array_equal(rows_of(u), rows_of(up)[4:5])


def test_row_parallel_partials_all_reduce_to_the_full_product():
    """ffn_down of a Q8_0 model cut on 32-value blocks over 3 chips (uneven): the chips' partial
    products of their input features sum to the full product."""
    m = edgebox.load(CODER_Q8_0)
    wd = m.weights.layers[0].w_down
    plan = PartitionPlan.build(m.args, m.weights, 3)
    down = RowParallelLinear.ffn_down(wd, plan.shards)
    assert [r for r in down.ranges] == [s.ffn for s in plan.shards] and all(r.start % 32 == 0 for r in down.ranges)
    ops = get_ops("ref")
    x = np.random.default_rng(2).standard_normal((3, wd.n_in)).astype(np.float32)
    full = ops.linear(wd)(x)
    partials = sum(ops.linear(s)(x[:, r.start : r.stop]) for s, r in zip(down.shards, down.ranges) if s is not None)
    np.testing.assert_allclose(partials, full, rtol=0, atol=1e-5 * float(np.abs(full).max()))


def test_row_parallel_cuts_only_on_quant_blocks():
    m = edgebox.load(CODER_Q8_0)
    wo = m.weights.layers[0].wo
    with pytest.raises(edgebox.EdgeboxError, match="block boundaries of 32"):
        RowParallelLinear.split(wo, [range(0, 16), range(16, wo.n_in)])
    o = RowParallelLinear.attn_output(wo, shards([(0, 1), (1, wo.n_in // m.args.head_dim)], [(0, 1), (0, 1)]), m.args.head_dim)
    assert [s.n_in for s in o.shards] == [m.args.head_dim, wo.n_in - m.args.head_dim]


def test_vocab_parallel_slices_gather_to_the_full_logits():
    rng = np.random.default_rng(3)
    head = f32("output", rng.standard_normal((7, 4)))
    s = shards([(0, 0)] * 3, [(0, 0)] * 3, vocab=[(0, 3), (3, 5), (5, 7)])
    vocab = VocabParallelLinear.of(head, s)
    assert isinstance(vocab, VocabParallelLinear) and [m.n_out for m in vocab.shards] == [3, 2, 2]
    ops, x = get_ops("ref"), rng.standard_normal((2, 4)).astype(np.float32)
    gathered = np.concatenate([ops.linear(m)(x) for m in vocab.shards], axis=1)
    np.testing.assert_allclose(gathered, ops.linear(head)(x), rtol=1e-6)


def test_column_parallel_empty_range_holds_nothing():
    col = ColumnParallelLinear.split(f32("w", np.zeros((4, 2))), [range(0, 4), range(4, 4)])
    assert col.shards[1] is None and col.shards[0].n_out == 4
