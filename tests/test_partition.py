"""Tensor parallelism: the plan's split rules, and N chips giving one chip's logits."""

from __future__ import annotations

import re

import numpy as np
import pytest

import edgebox
from conftest import REPO
from edgebox.chips.partition import PartitionPlan, _deal, col_slice

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
    ("tiny-deepseek-llm", None, 4),     # llama F32: one head and 40 FFN rows per chip
    ("tiny-qwen2", None, 4),            # qwen2 F32: GQA with each KV head replicated on 2 chips, biases
    ("tiny-qwen2", None, 3),            # uneven: heads 2/1/1, FFN rows 54/53/53
    ("coder-Q8_0", None, 4),            # Q8_0: 32-value blocks
    ("coder-Q4_0", None, 4),
    ("coder-Q4_K_M", None, 4),          # 256-value super-blocks: chips 2 and 3 get no FFN block
]


@pytest.mark.parametrize("name,_,chips", CASES)
def test_n_chips_give_one_chips_logits(name, _, chips, tiny_f32):
    path = {"coder-Q8_0": CODER_Q8_0, "coder-Q4_0": CODER_Q4_0,
            "coder-Q4_K_M": CODER_Q4_K_M}.get(name) or tiny_f32(name)
    ids = [1, 50, 900, 7, 7, 31, 2000, 15, 400, 3][: 10]
    one, _ = logits_on(path, 1, ids)
    many, plan = logits_on(path, chips, ids)
    # float re-association only: partial sums added in another order (measured up to 6e-5 of the
    # logits' spread: an f32 ulp of difference can flip the f16 rounding of a cached key). With
    # quantized weights the kernels quantize activations to int8, where an ulp can also flip one
    # int8 step of one value: a rare row then moves by ~1/127 of a block's scale (measured 0.0074).
    row_err = np.abs(many - one).max(axis=1) / float(one.std())
    assert np.median(row_err) < 2e-5, row_err
    assert row_err.max() < (2e-4 if name.startswith("tiny-") else 0.02), row_err
    assert plan.n_chips == chips


def test_q4_k_split_leaves_chips_without_ffn_and_attention():
    m = edgebox.load(CODER_Q4_K_M, chips=4)
    plan = m.box.plan
    # attn_output rows of 4 heads x 64 = one 256-value super-block: all heads stay on chip 0
    assert plan.heads_per_unit == 4 and [len(s.heads) for s in plan.shards] == [4, 0, 0, 0]
    assert [len(s.ffn) for s in plan.shards] == [256, 256, 0, 0]
    assert m.box.chips[3].layers[0].w_gate is None and m.box.chips[3].layers[0].wq is None
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
    text = (REPO / "edgebox" / "chips" / "profiles" / "r100-edge.toml").read_text()
    small = re.sub(r"(?m)^capacity_gib = .*$", "capacity_gib = 0.002", text)
    profile = tmp_path / "tiny-chip.toml"
    profile.write_text(small)
    with pytest.raises(edgebox.ModelError, match=r"needs 0\.\d+ GiB per chip on 4 chip\(s\), the chip .* has 0\.00 GiB"):
        edgebox.load(CODER_Q8_0, chips=4, profile=str(profile))


def test_plan_for_the_7b_shape():
    """DeepSeek-LLM-7B's real hyper-parameters on Q4_K (256-value super-blocks), without the file."""
    from types import SimpleNamespace

    from edgebox.args import LlamaArgs
    from edgebox.quant_types import QType

    args = LlamaArgs(n_vocab=102400, n_embd=4096, n_layer=30, n_head=32, n_head_kv=32, n_ff=11008,
                     n_ctx_train=4096, n_rot=128, rope_freq_base=10000.0, rope_freq_scale=1.0, rms_eps=1e-6)
    layer = SimpleNamespace(wo=SimpleNamespace(qtype=QType.Q4_K), w_down=SimpleNamespace(qtype=QType.Q6_K))
    plan = PartitionPlan.build(args, SimpleNamespace(layers=[layer] * 30), 4)
    assert [len(s.heads) for s in plan.shards] == [8, 8, 8, 8]
    assert [len(s.ffn) for s in plan.shards] == [11 * 256, 11 * 256, 11 * 256, 10 * 256 + 11008 - 43 * 256]
    assert sum(len(s.ffn) for s in plan.shards) == 11008
