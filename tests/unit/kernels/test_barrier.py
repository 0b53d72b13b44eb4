"""The spin barrier and all-reduce between host threads (kernels.barrier), and the one-hand-off
decode that meets on them (chips.decode): sums right, every thread the same bits, and a thread
that fails never leaves the others waiting."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from numba import njit

import edgebox
from edgebox.kernels import barrier
from tests.fixtures.paths import DATA


@njit(nogil=True)
def _reduce_many(sync, bufs, me, n, parts, out):
    """Reduction k sums parts[k, t] over the threads t; out[k] gets this thread's result."""
    part = np.empty(parts.shape[2], np.float32)
    for k in range(n):
        part[:] = parts[k, me]
        if not barrier.all_reduce(part, bufs, sync, me, k):
            return k
        out[k] = part
    return n


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_all_reduce_sums_in_thread_order_and_every_thread_gets_the_same_bits(n_threads):
    rng = np.random.default_rng(n_threads)
    n, d = 3000, 37  # many rounds: a thread racing ahead into the next buffer would corrupt sums
    parts = rng.standard_normal((n, n_threads, d)).astype(np.float32)
    sync, bufs = barrier.new_sync(), np.zeros((2, n_threads, d), np.float32)
    outs = [np.zeros((n, d), np.float32) for _ in range(n_threads)]
    done = [0] * n_threads

    def run(t):
        done[t] = _reduce_many(sync, bufs, t, n, parts, outs[t])

    threads = [threading.Thread(target=run, args=(t,)) for t in range(1, n_threads)]
    for th in threads:
        th.start()
    run(0)
    for th in threads:
        th.join(timeout=60)
    want = parts[:, 0].copy()
    for t in range(1, n_threads):
        want += parts[:, t]
    assert done == [n] * n_threads
    for out in outs:
        np.testing.assert_array_equal(out, want)


def test_abort_releases_a_waiting_thread():
    sync, bufs = barrier.new_sync(), np.zeros((2, 2, 4), np.float32)
    parts = np.ones((5, 2, 4), np.float32)
    got = []
    th = threading.Thread(target=lambda: got.append(_reduce_many(sync, bufs, 1, 5, parts, np.zeros((5, 4), np.float32))))
    th.start()
    th.join(timeout=0.3)
    assert th.is_alive()  # waiting for thread 0, which never comes
    barrier.abort(sync)
    th.join(timeout=10)
    assert got == [0]  # released at its first reduction, False


def test_a_chip_thread_that_fails_mid_token_raises_and_leaves_no_thread_waiting(monkeypatch):
    """Four chips on two host threads; the helper thread's layer call fails at layer 1: the
    caller's thread is released from the barrier, the error reaches the caller, and the next
    token runs normally."""
    from edgebox.chips import decode

    m = edgebox.load(DATA / "models" / "tiny-deepseek-coder-Q4_0.gguf", chips=4, backend="numba")
    if m.box.threads.n_threads < 2:
        pytest.fail("needs two host cores: this machine's CI has them")
    kv = m.transformer.new_cache(8)
    m.transformer.forward(np.array([1, 50], np.int32), np.arange(2, dtype=np.int32), kv)
    real = decode.decode_layer

    def failing(x, attn_norm, ffn_norm, eps, attn, ffn, caches, layer, *rest):
        if layer == 1 and rest[-2] == 0:  # thread 0 (a helper)
            raise RuntimeError("chip thread failed")
        return real(x, attn_norm, ffn_norm, eps, attn, ffn, caches, layer, *rest)

    monkeypatch.setattr(decode, "decode_layer", failing)
    errors = []

    def step():
        try:
            m.transformer.forward(np.array([7], np.int32), np.array([2], np.int32), kv)
        except RuntimeError as e:
            errors.append(str(e))

    th = threading.Thread(target=step, daemon=True)  # a hang fails the test instead of hanging it
    th.start()
    th.join(timeout=60)
    assert not th.is_alive() and errors == ["chip thread failed"]
    monkeypatch.setattr(decode, "decode_layer", real)
    assert kv.length == 2  # the failed step did not count its token
    logits = m.transformer.forward(np.array([7], np.int32), np.array([2], np.int32), kv)
    assert np.isfinite(logits).all()
    m.box.close()
