"""numba attention kernels against ref.attention (the spec), test-backend-ops style.

The caches are float16; the reference gets the same float16 values widened to float32, so only
float re-association (and expf vs numpy's exp, both ~1 ulp) separates the two. Scores are made
large on purpose in some cases (|q.k|/sqrt(hd) up to ~50) so that the softmax is peaked and the
online-softmax rescaling in the tiled prefill is exercised.

Tolerance: |got - ref| <= ATOL + RTOL * |ref| with ATOL = 2e-5, RTOL = 1e-4. Measured max abs
error over these cases (outputs of magnitude ~0.1..3, scores up to ~+-40): decode 1.7e-6,
prefill 5.9e-6, position-masked prefill 1.8e-6. The error grows with the size of the scores:
a different summation order of q.k moves a score by a few ulps of its magnitude, which moves its
softmax weight by that much relatively. A wrong GQA mapping, mask or scale gives errors of order
0.1..1.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgebox.kernels import attention as A
from edgebox.kernels import ref

ATOL, RTOL = 2e-5, 1e-4
RNG = np.random.default_rng(4321)


def cache(S: int, Hkv: int, hd: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal((S, Hkv, hd)) * scale).astype(np.float16)


def queries(T: int, H: int, hd: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal((T, H, hd)) * scale).astype(np.float32)


def ref_attention(q, k, v, q_pos, k_pos):
    return ref.attention(q, k.astype(np.float32), v.astype(np.float32), np.asarray(q_pos), np.asarray(k_pos))


def close(got, want):
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# (H, Hkv, hd): no GQA, GQA 2, GQA 7 (qwen2-7B: 28 / 4), odd head counts, hd 16 / 64 / 128
SHAPES = [(1, 1, 16), (4, 2, 64), (28, 4, 128), (7, 1, 64), (3, 3, 16), (6, 3, 128)]


# -- decode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("H,Hkv,hd", SHAPES)
@pytest.mark.parametrize("S,n", [(1, 1), (17, 17), (300, 300), (300, 123)])
def test_decode(H, Hkv, hd, S, n):
    k, v = cache(S, Hkv, hd), cache(S, Hkv, hd)
    q = queries(1, H, hd, scale=2.0)
    got = A.attention_decode(q[0], k, v, n)
    want = ref_attention(q, k[:n], v[:n], [n - 1], np.arange(n))[0]
    close(got, want)


def test_decode_peaked_scores_and_parallel_variant():
    H, Hkv, hd, S = 8, 2, 64, 300
    k, v = cache(S, Hkv, hd, 3.0), cache(S, Hkv, hd)
    q = queries(1, H, hd, 3.0)  # scores up to ~50: a very peaked softmax
    want = ref_attention(q, k, v, [S - 1], np.arange(S))[0]
    got = A.attention_decode(q[0], k, v, S)
    close(got, want)
    # same per-head arithmetic, heads split over threads: bit-equal to the serial kernel
    np.testing.assert_array_equal(A.attention_decode(q[0], k, v, S, parallel=True), got)


def test_decode_positions_masked():
    H, Hkv, hd, S = 4, 2, 64, 40
    k, v = cache(S, Hkv, hd), cache(S, Hkv, hd)
    q = queries(1, H, hd)
    k_pos = RNG.permutation(S)  # slots hold positions in any order
    got = A.attention_decode(q[0], k, v, S, q_pos=[20], k_pos=k_pos)
    close(got, ref_attention(q, k, v, [20], k_pos)[0])


def test_decode_leaves_the_cache_alone_and_rejects_bad_input():
    k, v = cache(20, 2, 16), cache(20, 2, 16)
    before = k.copy(), v.copy()
    A.attention_decode(queries(1, 4, 16)[0], k, v, 20)
    assert np.array_equal(k, before[0]) and np.array_equal(v, before[1])
    with pytest.raises(ValueError):
        A.attention_decode(queries(1, 4, 16)[0], k, v, 21)  # beyond the cache
    with pytest.raises(ValueError):
        A.attention_decode(queries(1, 4, 16)[0], k, v, 0)
    with pytest.raises(ValueError):
        A.attention_decode(queries(1, 3, 16)[0], k, v, 5)  # 3 heads over 2 KV heads
    with pytest.raises(ValueError):
        A.attention_decode(queries(1, 4, 16)[0], k.astype(np.float32), v, 5)  # not float16
    with pytest.raises(ValueError):
        A.attention_decode(queries(1, 4, 8)[0], k, v, 5)  # head size


# -- batched decode ----------------------------------------------------------------------------


@pytest.mark.parametrize("H,Hkv,hd", [(4, 2, 64), (28, 4, 128), (3, 3, 16)])
@pytest.mark.parametrize("parallel", [False, True])
def test_decode_batch_engine_layout(H, Hkv, hd, parallel):
    n_slots, n_layer, n_ctx = 5, 3, 70
    kc = (RNG.standard_normal((n_slots, n_layer, n_ctx, Hkv, hd))).astype(np.float16)
    vc = (RNG.standard_normal((n_slots, n_layer, n_ctx, Hkv, hd))).astype(np.float16)
    slots = np.array([3, 0, 4], np.int32)  # rows of q are not slots 0..B-1
    lengths = np.array([70, 1, 33], np.int32)
    q = queries(3, H, hd, 2.0)
    for layer in (0, 2):
        got = A.attention_decode_batch(q, kc, vc, lengths, layer=layer, slots=slots, parallel=parallel)
        assert got.shape == (3, H * hd)
        for b in range(3):
            n, s = lengths[b], slots[b]
            want = ref_attention(q[b : b + 1], kc[s, layer, :n], vc[s, layer, :n], [n - 1], np.arange(n))[0]
            close(got[b], want)
            # one sequence of the batch = the single-sequence kernel, bit for bit
            np.testing.assert_array_equal(got[b], A.attention_decode(q[b], kc[s, layer], vc[s, layer], n))


def test_decode_batch_4d_layout():
    H, Hkv, hd, S_max = 6, 3, 64, 300
    kc, vc = (RNG.standard_normal((4, S_max, Hkv, hd)).astype(np.float16) for _ in range(2))
    lengths = [300, 17, 1, 150]
    q = queries(4, H, hd)
    got = A.attention_decode_batch(q, kc, vc, lengths)
    for b, n in enumerate(lengths):
        close(got[b], ref_attention(q[b : b + 1], kc[b, :n], vc[b, :n], [n - 1], np.arange(n))[0])
    with pytest.raises(ValueError):
        A.attention_decode_batch(q, kc, vc, [300, 17, 1, 301])
    with pytest.raises(ValueError):
        A.attention_decode_batch(q, kc, vc, [300, 17, 1])
    with pytest.raises(ValueError):
        A.attention_decode_batch(q, kc[:, None], vc[:, None], lengths, layer=1)


@pytest.mark.parametrize(
    "H,Hkv,hd,kv_of_head", [(4, 2, 64, None), (28, 4, 128, None), (3, 3, 16, None), (10, 2, 32, [0] * 7 + [1] * 3)]
)  # a chip straddling KV heads
@pytest.mark.parametrize("parallel", [False, True])
def test_decode_append(H, Hkv, hd, kv_of_head, parallel):
    """Each sequence its own cache (ragged sizes), the new keys and values written by the kernel."""
    n_layer, sizes, starts = 3, [70, 5, 300, 33], np.array([69, 0, 151, 20])
    kc = [RNG.standard_normal((n_layer, n, Hkv, hd)).astype(np.float16) for n in sizes]
    vc = [RNG.standard_normal((n_layer, n, Hkv, hd)).astype(np.float16) for n in sizes]
    before = [c.copy() for c in kc + vc]
    q = queries(4, H, hd, 2.0)
    k_new = RNG.standard_normal((4, Hkv, hd)).astype(np.float32) * 3
    v_new = RNG.standard_normal((4, Hkv, hd)).astype(np.float32)
    caches = A.kv_lists(kc, vc)
    got = A.attention_decode_append(q, k_new, v_new, caches, 1, starts, kv_of_head=kv_of_head, parallel=parallel)
    assert got.shape == (4, H * hd)
    m = np.asarray(kv_of_head) if kv_of_head is not None else np.arange(H) // (H // Hkv)
    for b, s in enumerate(starts):
        # the new key and value sit at slot s of layer 1 exactly as numpy rounds them to float16;
        # nothing else in the caches moved
        np.testing.assert_array_equal(kc[b][1, s], k_new[b].astype(np.float16))
        np.testing.assert_array_equal(vc[b][1, s], v_new[b].astype(np.float16))
        for new, old in ((kc[b], before[b]), (vc[b], before[4 + b])):
            changed = np.argwhere((new.view(np.uint16) != old.view(np.uint16)).any(axis=(2, 3)))
            assert set(map(tuple, changed)) <= {(1, s)}
        keys, values = kc[b][1, : s + 1][:, m], vc[b][1, : s + 1][:, m]  # [s+1, H, hd] per query head
        want = ref.attention(q[b : b + 1], keys.astype(np.float32), values.astype(np.float32), np.array([s]), np.arange(s + 1))[0]
        close(got[b], want)
        np.testing.assert_array_equal(got[b], A.attention_decode(q[b], kc[b][1], vc[b][1], s + 1, kv_of_head=kv_of_head))


def test_decode_append_rejects_bad_input():
    kc = [np.zeros((2, 10, 2, 16), np.float16), np.zeros((2, 6, 2, 16), np.float16)]
    caches = A.kv_lists(kc, [c.copy() for c in kc])
    q, k = queries(2, 4, 16), np.zeros((2, 2, 16), np.float32)
    for bad in (
        dict(starts=[9, 6]),  # slot 6 is past the second cache
        dict(starts=[0, -1]),
        dict(starts=[0]),
        dict(layer=2),
        dict(k=k[:1]),
        dict(q=q[:, :3]),
    ):
        args = dict(q=q, k=k, starts=[0, 0], layer=0) | bad
        with pytest.raises(ValueError):
            A.attention_decode_append(args["q"], args["k"], args["k"], caches, args["layer"], args["starts"])
    with pytest.raises(ValueError):  # caches that differ in heads
        A.kv_lists([kc[0], np.zeros((2, 6, 1, 16), np.float16)], kc)
    with pytest.raises(ValueError):
        A.kv_lists([kc[0].astype(np.float32)], [kc[0]])
    with pytest.raises(ValueError):  # a strided view
        A.kv_lists([kc[0][:, ::2]], [kc[0][:, ::2]])


# -- prefill -----------------------------------------------------------------------------------


@pytest.mark.parametrize("H,Hkv,hd", SHAPES)
@pytest.mark.parametrize("T,start", [(1, 0), (5, 0), (5, 12), (64, 0), (64, 236), (37, 263)])
def test_prefill(H, Hkv, hd, T, start):
    S = start + T
    k, v = cache(S + 3, Hkv, hd, 1.5), cache(S + 3, Hkv, hd)  # slots past start+T are ignored
    q = queries(T, H, hd, 1.5)
    got = A.attention_prefill(q, k, v, start)
    want = ref_attention(q, k[:S], v[:S], np.arange(start, S), np.arange(S))
    close(got, want)


def test_prefill_online_softmax_rescaling():
    # Scores that grow along the keys: every new key block holds a larger max than the last,
    # so the running max/sum/accumulator is rescaled at every block.
    T, H, Hkv, hd, S = 40, 4, 2, 64, 260
    direction = RNG.standard_normal(hd).astype(np.float32)
    k = np.linspace(0.0, 4.0, S)[:, None, None] * direction + 0.3 * RNG.standard_normal((S, Hkv, hd))
    k = k.astype(np.float16)
    v = cache(S, Hkv, hd)
    q = np.repeat(direction[None, None, :], T * H, axis=0).reshape(T, H, hd) + queries(T, H, hd, 0.1)
    start = S - T
    got = A.attention_prefill(q, k, v, start)
    close(got, ref_attention(q, k, v, np.arange(start, S), np.arange(S)))
    np.testing.assert_array_equal(A.attention_prefill(q, k, v, start, parallel=True), got)


def test_prefill_equals_decode_for_one_token():
    H, Hkv, hd, S = 28, 4, 128, 77
    k, v = cache(S, Hkv, hd), cache(S, Hkv, hd)
    q = queries(1, H, hd)
    a = A.attention_prefill(q, k, v, S - 1)[0]
    b = A.attention_decode(q[0], k, v, S)
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def test_prefill_general_positions():
    # Slots hold positions in any order, some keys are in the future of some queries, queries
    # are not in order either: the reference's general mask k_pos[j] <= q_pos[i].
    H, Hkv, hd, n_keys, T = 7, 1, 64, 150, 45
    k, v = cache(n_keys + 10, Hkv, hd), cache(n_keys + 10, Hkv, hd)
    k_pos = RNG.permutation(n_keys) + 5
    q_pos = RNG.integers(5, n_keys + 5, T)
    q = queries(T, H, hd, 1.5)
    got = A.attention_prefill(q, k, v, 0, q_pos=q_pos, k_pos=k_pos)
    close(got, ref_attention(q, k[:n_keys], v[:n_keys], q_pos, k_pos))
    with pytest.raises(ValueError, match="no visible key"):
        A.attention_prefill(q, k, v, 0, q_pos=np.full(T, 4), k_pos=k_pos)
    with pytest.raises(ValueError):
        A.attention_prefill(q, k, v, 0, q_pos=q_pos)  # one without the other


def test_prefill_rejects_bad_input():
    k, v = cache(10, 2, 16), cache(10, 2, 16)
    with pytest.raises(ValueError):
        A.attention_prefill(queries(5, 4, 16), k, v, 6)  # 6 + 5 > 10 slots
    with pytest.raises(ValueError):
        A.attention_prefill(queries(5, 4, 16), k, v[:9], 0)  # k / v differ
    with pytest.raises(ValueError):
        A.attention_prefill(queries(5, 4, 16)[0], k, v, 0)  # not [T, H, hd]


# -- explicit query head -> KV head map (a chip whose heads straddle KV heads) ----------------


def ref_mapped(q, k, v, q_pos, k_pos, kv_of_head):
    """ref.attention with one KV head per query head (keys gathered as model.py does)."""
    return ref_attention(q, k[:, kv_of_head], v[:, kv_of_head], q_pos, k_pos)


@pytest.mark.parametrize(
    "kv_of_head,Hkv",
    [
        ([0] * 7 + [1] * 3, 2),  # heads 0..9 of qwen2-7B (7 per KV head) on one chip
        ([1, 0, 1, 0, 2], 3),  # any order
        ([0, 0, 2, 2], 3),  # a KV head nobody reads
    ],
)
def test_kv_of_head_map(kv_of_head, Hkv):
    H, hd, S, T = len(kv_of_head), 64, 150, 37
    kv_map = np.array(kv_of_head)
    k, v = cache(S, Hkv, hd, 1.5), cache(S, Hkv, hd)
    q = queries(T, H, hd, 1.5)
    start = S - T
    got = A.attention_prefill(q, k, v, start, kv_of_head=kv_map)
    close(got, ref_mapped(q, k, v, np.arange(start, S), np.arange(S), kv_map))
    np.testing.assert_array_equal(A.attention_prefill(q, k, v, start, kv_of_head=kv_map, parallel=True), got)
    for n in (S, 9):
        got = A.attention_decode(q[-1], k, v, n, kv_of_head=kv_map)
        close(got, ref_mapped(q[-1:], k[:n], v[:n], [n - 1], np.arange(n), kv_map)[0])
        np.testing.assert_array_equal(A.attention_decode(q[-1], k, v, n, kv_of_head=kv_map, parallel=True), got)
    kc = np.stack([k, k[::-1].copy()])  # [2 sequences, S, Hkv, hd]
    vc = np.stack([v, v[::-1].copy()])
    got = A.attention_decode_batch(q[:2], kc, vc, [S, 40], kv_of_head=kv_map)
    close(got[1], ref_mapped(q[1:2], kc[1, :40], vc[1, :40], [39], np.arange(40), kv_map)[0])


def test_kv_of_head_errors():
    k, v = cache(10, 2, 16), cache(10, 2, 16)
    q = queries(1, 3, 16)[0]
    with pytest.raises(ValueError, match="kv_of_head"):
        A.attention_decode(q, k, v, 5)  # 3 over 2: needs a map
    close(
        A.attention_decode(q, k, v, 5, kv_of_head=[0, 0, 1]),
        ref_mapped(q[None], k[:5], v[:5], [4], np.arange(5), np.array([0, 0, 1]))[0],
    )
    with pytest.raises(ValueError):
        A.attention_decode(q, k, v, 5, kv_of_head=[0, 0, 2])  # no KV head 2
    with pytest.raises(ValueError):
        A.attention_decode(q, k, v, 5, kv_of_head=[0, 1])  # one per query head


# -- threads -----------------------------------------------------------------------------------


def test_concurrent_calls_from_host_threads():
    """One host thread per simulated chip, each with its own data: same results as one by one."""
    H, Hkv, hd, S, T = 8, 2, 64, 200, 24
    jobs = [(cache(S, Hkv, hd), cache(S, Hkv, hd), queries(T, H, hd)) for _ in range(4)]
    serial = [(A.attention_prefill(q, k, v, S - T), A.attention_decode(q[-1], k, v, S)) for k, v, q in jobs]
    results: list = [None] * len(jobs)
    errors: list = []

    def work(i):
        try:
            k, v, q = jobs[i]
            out = None
            for _ in range(5):
                out = (A.attention_prefill(q, k, v, S - T, parallel=True), A.attention_decode(q[-1], k, v, S))
            results[i] = out
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (p, d), (ps, ds) in zip(results, serial):
        np.testing.assert_array_equal(p, ps)
        np.testing.assert_array_equal(d, ds)


def test_backend_prompt_attention_uses_every_thread(monkeypatch):
    """A prompt chunk's attention runs the parallel kernel when the calling thread has several
    numba threads and the threading layer is thread-safe (a 512-token prompt on the 7B spent 13 %
    in it with one core idle), and gives the serial kernel's result bit for bit."""
    import numba

    from edgebox.kernels.backend import NumbaOps

    H, Hkv, hd, T = 8, 2, 64, 12
    q = RNG.standard_normal((T, H, hd)).astype(np.float32)
    k, v = cache(T, Hkv, hd), cache(T, Hkv, hd)
    kv_of_head = np.arange(H) // (H // Hkv)
    serial = A.attention_prefill(q, k, v, 0, kv_of_head=kv_of_head, parallel=False)
    calls = []
    parallel_kernel = A.prefill_kernel_parallel
    monkeypatch.setattr(A, "prefill_kernel_parallel", lambda *a: calls.append(1) or parallel_kernel(*a))
    before = numba.get_num_threads()
    numba.set_num_threads(2)  # the box has 2 cores
    try:
        got = NumbaOps().attention(q, k, v, 0, np.arange(T), np.arange(T), kv_of_head)
    finally:
        numba.set_num_threads(before)
    assert calls == ([1] if A.threading_layer_is_threadsafe() else [])  # omp/tbb here and in CI: [1]
    np.testing.assert_array_equal(got, serial)
