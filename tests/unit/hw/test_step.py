"""The one step-cost model (edgebox.hw.step) on hand-made shards: per op, lock step, links,
energy, and the vectorised clocks equal one clock at a time."""

from __future__ import annotations

import numpy as np
import pytest

from edgebox.hw import cost
from edgebox.hw.profile import load_profile
from edgebox.hw.step import ACT_BYTES, KV_BYTES, ChipWork, Step, StepWork, step_cost
from firmware_stub import Firmware

D, HD, VOCAB = 64, 16, 1000


def _chip(heads: int, kv: int, ffn: int, vocab: int, layers: int = 3) -> ChipWork:
    """One chip's shard of a small llama: q/k/v/o for its heads, gate/up/down for its FFN rows."""
    q, k = heads * HD, kv * HD
    attn = ((q, D, q * D // 2, True), (k, D, k * D // 2, True), (k, D, k * D // 2, True), (D, q, D * q // 2, True))
    ffn_ = ((ffn, D, ffn * D // 2, True), (ffn, D, ffn * D // 2, True), (D, ffn, D * ffn * 2, False))
    return ChipWork(attn=(attn,) * layers, ffn=(ffn_,) * layers, head=((vocab, D, vocab * D // 2, True),), n_heads=heads, n_kv=kv)


@pytest.fixture(scope="module")
def r100():
    return load_profile("r100-edge")


@pytest.fixture(scope="module")
def uneven(r100) -> StepWork:
    """Two chips with uneven shards (3 + 1 heads, 96 + 32 FFN rows), three layers."""
    return StepWork(r100, [_chip(3, 1, 96, 600), _chip(1, 1, 32, 400)], D, VOCAB, HD)


def _ops(chip: ChipWork, step: Step, layer_half: str) -> list[tuple[float, float, bool]]:
    """(ops, bytes, int8) of each op of one half-layer of a chip, written out from the model."""
    R, P, C, _ = step
    out = [
        (2 * R * n_out * n_in, w + R * (n_in + n_out) * ACT_BYTES, int8)
        for n_out, n_in, w, int8 in (chip.attn[0] if layer_half == "attn" else chip.ffn[0])
    ]
    out.append((2 * R * D, 2 * R * D * 4, False))
    if layer_half == "attn":
        out.append((4 * P * chip.n_heads * HD, 2 * C * chip.n_kv * HD * KV_BYTES, False))
    return out


def test_a_step_is_the_roofline_of_each_op_lock_stepped_plus_the_ring(r100, uneven):
    step = Step.of([(1, 40), (5, 12)], n_logits=2)
    f = 800.0
    chips = [_chip(3, 1, 96, 600), _chip(1, 1, 32, 400)]
    halves = [[sum(cost.op_time(r100, f, o, b, i8) for o, b, i8 in _ops(c, step, h)) for c in chips] for h in ("attn", "ffn")]
    head = [sum(cost.op_time(r100, f, 2 * 2 * n_out * n_in, w, i8) for n_out, n_in, w, i8 in c.head) for c in chips]
    link_s = 6 * cost.link_time(r100, 6 * D * ACT_BYTES, 2, "allreduce") + cost.link_time(r100, 2 * VOCAB * 4, 2, "allgather")
    c = step_cost(uneven, step, np.array([f]))
    busy = [3 * (halves[0][i] + halves[1][i]) + head[i] for i in range(2)]
    assert c.busy_s[:, 0] == pytest.approx(busy, rel=1e-12)
    wall = 3 * (max(halves[0]) + max(halves[1])) + max(head)
    assert c.step_s[0] == pytest.approx(wall + link_s, rel=1e-12)
    assert c.link_s == pytest.approx(link_s)
    assert c.idle_s[:, 0] == pytest.approx([wall - b for b in busy], abs=1e-15)
    assert c.idle_s[1, 0] > 0 and c.idle_s[0, 0] == pytest.approx(0.0, abs=1e-15)  # the small chip waits
    ops0 = 3 * sum(o for h in ("attn", "ffn") for o, _, _ in _ops(chips[0], step, h)) + 2 * 2 * 600 * D
    assert c.ops[0] == ops0


def test_every_level_at_once_equals_one_level_at_a_time(r100, uneven):
    step = Step.with_prompt(3, 50, 16, 20)
    levels = np.array(r100.freqs_mhz, float)
    every = step_cost(uneven, step, levels)
    for lv, f in enumerate(levels):
        one = step_cost(uneven, step, np.array([f]))
        for name in ("step_s", "busy_s", "idle_s", "busy_j", "energy_j", "compute_s", "memory_s"):
            assert getattr(every, name)[..., lv] == pytest.approx(getattr(one, name)[..., 0], rel=1e-12), (name, f)
    assert list(every.step_s) == sorted(every.step_s, reverse=True)  # faster clocks, shorter steps


def test_each_chip_at_its_own_clock(r100, uneven):
    """[n, 1] clocks: a chip's busy time depends only on its own clock; the box waits for the slowest."""
    step = Step.decode(4, 100)
    mixed = step_cost(uneven, step, np.array([[1500.0], [400.0]]))
    fast = step_cost(uneven, step, np.array([1500.0]))
    slow = step_cost(uneven, step, np.array([400.0]))
    assert mixed.busy_s[0, 0] == pytest.approx(fast.busy_s[0, 0], rel=1e-12)
    assert mixed.busy_s[1, 0] == pytest.approx(slow.busy_s[1, 0], rel=1e-12)
    assert fast.step_s[0] < mixed.step_s[0] <= slow.step_s[0]
    assert mixed.energy_j[0, 0] > 0 and mixed.idle_s[0, 0] > 0  # the fast chip now waits


def test_the_energy_is_what_the_firmware_integrates(r100, uneven):
    """Reported as busy, idle and link intervals, the firmware's energy is the model's."""
    step = Step.with_prompt(2, 300, 32, 0)
    f = 1000
    fw = Firmware(r100, 2, start_max_mhz=f)
    c = step_cost(uneven, step, np.array([float(f)]))
    for i in range(2):
        fw.activity(i, float(c.busy_s[i, 0]), float(c.ops[i]), float(c.dram_bytes[i]))
        fw.idle(i, float(c.idle_s[i, 0]))
        fw.activity(i, c.link_s, link_bytes=c.link_bytes)
    for i in range(2):
        assert fw.state(i).energy_j == pytest.approx(float(c.energy_j[i, 0]), rel=1e-12)
        assert fw.time_s(i) == pytest.approx(float(c.step_s[0]), rel=1e-12)
    assert c.busy_j[0, 0] == pytest.approx(
        cost.busy_energy_j(r100, f, float(c.busy_s[0, 0]), float(c.ops[0]), float(c.dram_bytes[0])), rel=1e-12
    )


def test_one_chip_has_no_link(r100):
    work = StepWork(r100, [_chip(4, 2, 128, VOCAB)], D, VOCAB, HD)
    c = step_cost(work, Step.decode(1, 10), np.array([1000.0]))
    assert c.link_s == 0.0 and c.link_bytes == 0.0 and c.idle_s[0, 0] == 0.0
    assert c.step_s[0] == pytest.approx(c.busy_s[0, 0])


def test_steps_from_segments():
    assert Step.of([(1, 300)] * 4, 4) == Step.decode(4, 300) == Step(4, 1200, 1200, 4)
    # 2 decoding at 100, 8 prompt rows at positions 20..27 (the last chunk: its last row's logits)
    assert Step.with_prompt(2, 100, 8, 20) == Step.of([(1, 100), (1, 100), (8, 28)], 3)
    assert Step.with_prompt(2, 100, 8, 20, last_chunk=False).n_logits == 2
