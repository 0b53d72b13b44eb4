"""KV caches cost memory only as they fill, and give it all back: a long-running daemon or a
sweep of simulations must not grow."""

from __future__ import annotations

import gc

import numpy as np

from edgebox.model.kv_cache import lazy_zeros
from edgebox.power.shapes import shape_model
from edgebox.power.simulate import SimOptions, simulate


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def test_lazy_zeros_are_zeros_and_cost_only_what_is_touched():
    before = rss_mb()
    z = lazy_zeros((30, 512, 8, 128), np.float16)  # 31 MB, the 7B shape's K for 512 slots on one chip
    assert z.shape == (30, 512, 8, 128) and z.dtype == np.float16 and z.flags.writeable and z.flags.c_contiguous
    assert rss_mb() - before < 2
    z[0, :4] = 1.0
    assert rss_mb() - before < 2
    assert not z[1:].any() and float(z[0].astype(np.float32).sum()) == 4 * 8 * 128
    assert lazy_zeros((0, 3), np.float32).shape == (0, 3)


def test_repeated_dry_runs_do_not_grow():
    """Eight streams of 7B-shaped requests over 8 device seconds, three times: each run's KV
    caches are returned (with calloc'd caches this grew ~340 MB a run: glibc kept them)."""
    sizes = []
    for _ in range(3):
        simulate(lambda: shape_model(chips=4), SimOptions(streams=8, seconds=8))
        gc.collect()
        sizes.append(rss_mb())
    assert sizes[2] - sizes[0] < 60, sizes
