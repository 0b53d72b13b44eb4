"""A spin barrier and an all-reduce between host threads, inside compiled code.

Why: a lone sequence's decode step runs every layer in one hand-off per chip thread
(``chips.decode``); the chips' partial sums must still meet twice per layer. A lock round trip
through Python costs tens of µs and needs the GIL; here the threads meet on two int64 counters
with atomic operations, in nopython code that never holds the GIL.

``sync`` is int64 [3]: arrivals, generation, abort. A thread arrives (atomic add); the last one
resets the arrivals and bumps the generation, the others spin (``pause``, then ``sched_yield``
after a while, so a descheduled partner gets its core) until the generation moves or ``abort``
is set, which a thread that fails outside compiled code sets so that the others return False
instead of waiting for ever. The symbols are resolved by name (``llvmlite.binding.add_symbol``),
so the functions that use them stay cacheable on disk.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

ARRIVALS, GENERATION, ABORT = 0, 1, 2
SPINS_BEFORE_YIELD = 2000

_libc = ctypes.CDLL(None)
llvm.add_symbol("sched_yield", ctypes.cast(_libc.sched_yield, ctypes.c_void_p).value)


def new_sync() -> np.ndarray:
    """A barrier's state, all zero: int64 [3] (arrivals, generation, abort)."""
    return np.zeros(3, np.int64)


def _item_pointer(context, builder, aty, arr, idx):
    ary = context.make_array(aty)(context, builder, arr)
    return cgutils.get_item_pointer(context, builder, aty, ary, [idx])


@intrinsic
def _atomic_add(typingctx, a, i, v):
    """a[i] += v atomically (sequentially consistent); returns the old value. a: int64 [n]."""
    sig = types.int64(a, i, v)

    def codegen(context, builder, signature, args):
        ptr = _item_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def _atomic_load(typingctx, a, i):
    """a[i], an atomic (acquire) load the compiler may not hoist out of a loop."""
    sig = types.int64(a, i)

    def codegen(context, builder, signature, args):
        ptr = _item_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def _atomic_store(typingctx, a, i, v):
    """a[i] = v, an atomic (release) store."""
    sig = types.void(a, i, v)

    def codegen(context, builder, signature, args):
        ptr = _item_pointer(context, builder, signature.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


def _call_no_args(name: str, returns: ir.Type):
    """(signature, codegen) of a statement that calls the argument-less function ``name``."""

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(returns, []), name)
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _pause(typingctx):
    """The x86 ``pause`` hint (a spin-wait loop's courtesy to the sibling hyperthread)."""
    return _call_no_args("llvm.x86.sse2.pause", ir.VoidType())


@intrinsic
def _sched_yield(typingctx):
    """``sched_yield()``: the core to another thread while a long wait spins."""
    return _call_no_args("sched_yield", ir.IntType(32))


@njit(nogil=True, cache=True)
def wait(sync, n):
    """Block until ``n`` threads have called wait on ``sync``; False if the barrier was aborted."""
    gen = _atomic_load(sync, GENERATION)
    if _atomic_add(sync, ARRIVALS, 1) == n - 1:
        _atomic_store(sync, ARRIVALS, 0)
        _atomic_add(sync, GENERATION, 1)
        return _atomic_load(sync, ABORT) == 0
    spins = 0
    while _atomic_load(sync, GENERATION) == gen:
        if _atomic_load(sync, ABORT) != 0:
            return False
        spins += 1
        if spins < SPINS_BEFORE_YIELD:
            _pause()
        else:
            _sched_yield()
    return _atomic_load(sync, ABORT) == 0


def abort(sync: np.ndarray) -> None:
    """Release every thread waiting on ``sync`` (each gets False); reset with ``sync[:] = 0``."""
    sync[ABORT] = 1


@njit(nogil=True, cache=True)
def all_reduce(part, bufs, sync, me, k):
    """Sum ``part`` float32 [D] over the threads in place: thread ``me`` of bufs.shape[1] writes
    its part to bufs [2, n, D], all meet, each sums the parts in thread order (so every thread
    gets the same bits). ``k``: this reduction's count; its parity picks the buffer, so a thread
    may write the next one while a slower one still reads this. False if aborted."""
    n = bufs.shape[1]
    if n == 1:
        return True
    p = k & 1
    bufs[p, me, :] = part
    if not wait(sync, n):
        return False
    part[:] = bufs[p, 0]
    for t in range(1, n):
        part += bufs[p, t]
    return True
