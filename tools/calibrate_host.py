"""Measure this machine's roofline numbers for edgebox/hw/profiles/host.toml.

Run:  python tools/calibrate_host.py [--threads 2] [--gib 1.0]
(a benchmark: if OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set on the machine, unset them for this
command only, e.g. ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tools/...``).

Each figure is the best of a few repeats (the cores are shared: the best run is the least
disturbed): read bandwidth (a numba float32 sum far larger than L3, one chunk per host thread),
int8 ops/s (L1-resident int8 dot products, 2 ops per multiply-add), fp32 ops/s (BLAS sgemm),
the launch overhead (a Python call into a trivial ``@njit`` function) and, when edgebox's
kernels import, its Q4_0 matvec in L2 (the compute roof) and streaming from DRAM: the host
profile describes edgebox's own decode on this machine, not the hardware's ideal.  Printed in
the profile's units, with ops per cycle at /proc/cpuinfo's clock.
"""

from __future__ import annotations

import argparse
import os
import re
import threading
import time

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads


@njit(nogil=True, fastmath=True, cache=False)
def _stream_sum(a):  # a: float32 [n] -> float32
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i]
    return s


def _on_threads(fn, parts) -> None:
    """fn(part) for each part on its own host thread (the kernels release the GIL), as the
    simulated chips run."""
    threads = [threading.Thread(target=fn, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@njit(parallel=True, fastmath=True, cache=False)
def _int8_dots(w, x, reps, n_threads):  # w: int8 [rows, n], x: int8 [n]
    out = np.zeros(n_threads, dtype=np.int64)
    for t in prange(n_threads):
        total = 0
        for _ in range(reps):
            for r in range(w.shape[0]):
                acc = np.int32(0)
                for i in range(w.shape[1]):
                    acc += np.int32(np.int16(w[r, i]) * np.int16(x[i]))
                total += acc
        out[t] = total
    return out


@njit(cache=False)
def _nothing(a):
    return a[0]


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _q4_0_weight(n_out: int, n_in: int) -> np.ndarray:
    """Random Q4_0 rows uint8 [n_out, n_in/32*18]: f16 scale 1/64, then 16 bytes of nibbles."""
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (n_out, n_in // 32, 18), dtype=np.uint8)
    blocks[:, :, 0:2] = np.frombuffer(np.float16(1 / 64).tobytes(), np.uint8)
    return blocks.reshape(n_out, -1)


def edgebox_q4_0_probe(repeats: int) -> tuple[float, float, float] | None:
    """(ops/s in cache, weight GB/s from DRAM, µs per call of a tiny matvec) of edgebox's Q4_0
    matvec, or None without it.  The in-cache rate has the per-call overhead taken out, as
    the cost model adds it separately."""
    try:
        from edgebox.gguf.quant_types import QType
        from edgebox.kernels import matmul as mm
    except Exception:  # noqa: BLE001 - the kernels are optional for this script
        return None
    small = mm.pack(_q4_0_weight(2048, 1024), QType.Q4_0)  # 2 x 576 KiB: each L2
    tiny = mm.pack(_q4_0_weight(8, 32), QType.Q4_0)
    big = mm.pack(_q4_0_weight(16384, 8192), QType.Q4_0)  # ~72 MiB: DRAM
    x_small = np.ones(1024, np.float32)
    x_big = np.ones(8192, np.float32)
    qx_small = mm.quantize_activations(x_small)
    x_tiny = np.ones(32, np.float32)
    mm.matvec(small, qx_small)
    mm.matvec(big, x_big)
    mm.matvec(tiny, x_tiny)
    reps = 200

    def many(w, x):
        return lambda: [mm.matvec(w, x) for _ in range(reps)]

    launch_s = _best(many(tiny, x_tiny), repeats) / reps
    cache_s = _best(many(small, qx_small), repeats) / reps - launch_s
    dram_s = _best(lambda: mm.matvec(big, x_big), repeats) - launch_s
    return 2.0 * 2048 * 1024 / cache_s, big.nbytes / dram_s / 1e9, launch_s * 1e6


def nominal_mhz() -> float:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return float("nan")
    values = [float(v) for v in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)]
    return max(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--gib", type=float, default=1.0, help="size of the streamed array")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    set_num_threads(min(args.threads, get_num_threads()))
    n_threads = get_num_threads()

    a = np.ones(int(args.gib * 2**30) // 4, dtype=np.float32)  # float32 [n], touched
    _stream_sum(a[:1024])  # compile
    parts = np.array_split(a, n_threads)
    read_s = _best(lambda: _on_threads(_stream_sum, parts), args.repeats)
    read_gbps = a.nbytes / read_s / 1e9
    del a

    rows, width, reps = 64, 256, 2000  # 16 KiB of weights: L1
    w = np.random.default_rng(0).integers(-8, 8, (rows, width), dtype=np.int8)
    x = np.random.default_rng(1).integers(-128, 128, width, dtype=np.int8)
    _int8_dots(w, x, 1, n_threads)
    int8_s = _best(lambda: _int8_dots(w, x, reps, n_threads), args.repeats)
    int8_ops_s = 2.0 * rows * width * reps * n_threads / int8_s

    m = np.ones((1024, 1024), dtype=np.float32)
    m @ m
    fp32_s = _best(lambda: m @ m, args.repeats)
    fp32_ops_s = 2.0 * 1024**3 / fp32_s

    one = np.zeros(1, dtype=np.float32)
    _nothing(one)
    calls = 20000
    t0 = time.perf_counter()
    for _ in range(calls):
        _nothing(one)
    launch_us = (time.perf_counter() - t0) / calls * 1e6

    kernel = edgebox_q4_0_probe(args.repeats)
    mhz = nominal_mhz()
    print(f"threads                 {n_threads}")
    print(f"nominal clock           {mhz:.0f} MHz (/proc/cpuinfo)")
    print(f"read bandwidth          {read_gbps:.1f} GB/s  ({args.gib:g} GiB float32 stream)")
    print(f"int8 dot (numba)        {int8_ops_s / 1e9:.1f} Gops/s = {int8_ops_s / (mhz * 1e6):.1f} ops/cycle")
    print(f"fp32 sgemm (BLAS)       {fp32_ops_s / 1e9:.1f} Gflop/s = {fp32_ops_s / (mhz * 1e6):.1f} ops/cycle")
    print(f"njit call overhead      {launch_us:.2f} us")
    if kernel is None:
        print("edgebox Q4_0 matvec     (edgebox.kernels.matmul not importable: skipped)")
    else:
        ops_s, gbps, call_us = kernel
        print(f"edgebox matvec call     {call_us:.1f} us (8x32 Q4_0, float32 input)")
        print(f"edgebox Q4_0 in L2      {ops_s / 1e9:.1f} Gops/s = {ops_s / (mhz * 1e6):.1f} ops/cycle")
        print(f"edgebox Q4_0 from DRAM  {gbps:.1f} GB/s of packed weights")


if __name__ == "__main__":
    main()
