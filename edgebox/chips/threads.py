"""The host threads the chips run on (``ChipThreads``) and how many cores each may use."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

from edgebox.chips.partition import _deal


def host_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _kernel_threads(n_host_threads: int, n_cores: int) -> int:
    """Kernel threads for each host thread that runs chips: the cores left to it (capped by
    NUMBA_NUM_THREADS, read from the environment so that a dry run need not import numba)."""
    cap = int(os.environ.get("NUMBA_NUM_THREADS") or n_cores)
    return max(1, min(cap, n_cores // n_host_threads))


class _Helper:
    """What a helper thread shares with the caller: a job, its result, and two locks used as
    binary semaphores (``go`` released by the caller to start a job, ``done`` by the helper when
    it is finished). The thread holds only this, never the Box, so a dropped Box is collected."""

    def __init__(self):
        self.go = threading.Lock()
        self.done = threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.job: tuple | None = None  # (fn, args, index, chips): run fn(index, chips, *args)
        self.result: list | None = None
        self.error: BaseException | None = None
        self.stop = False


def _helper_loop(h: _Helper, kernel_threads: int) -> None:
    import numba

    numba.set_num_threads(kernel_threads)  # per thread: this thread's kernels only
    while True:
        h.go.acquire()
        if h.stop:
            return
        try:
            fn, args, index, chips = h.job
            h.result = fn(index, chips, *args)
        except BaseException as e:  # noqa: BLE001 -- handed to the caller, which raises it
            h.error = e
        h.job = None
        h.done.release()


def _each(index: int, chips: list, fn: Callable, *args) -> list:
    """A group's part of ``ChipThreads.run``: fn(chip, *args) for each of its chips."""
    return [fn(chip, *args) for chip in chips]


def _stop_helpers(helpers: list[_Helper]) -> None:
    for h in helpers:
        h.stop = True
        h.go.release()


class ChipThreads:
    """The host threads the chips run on: at most one per core, each with a fixed, contiguous
    group of chips; the calling thread runs the last (never larger) group itself, beside the
    serial work between runs (norms, all-reduces), and helper threads run the others.

    ``run(fn, *args)`` starts every helper on its group (one lock release each), runs the caller's
    group, then waits for each helper (one lock acquire each): per call two hand-offs per helper
    (each a lock round trip between threads, tens of µs, paid ~60 times a decode token), no task
    queue, no futures, no closure. The kernels release the GIL, so the groups compute at the same
    time. More threads than cores would only add stalls at every all-reduce, so the kernels
    inside each thread use the cores left to it (numba's thread count is per calling thread; the
    caller's is set for its group and restored after). Helpers start at the first run (a dry run
    starts none), again in a forked child, and stop at ``close()`` or when this object is
    collected.
    """

    def __init__(self, chips: list, n_cores: int | None = None):
        n_cores = n_cores or host_cores()
        n_threads = max(1, min(len(chips), n_cores))
        self.groups = [chips[r.start : r.stop] for r in _deal(len(chips), n_threads)]  # [thread][chip]
        self.kernel_threads = _kernel_threads(n_threads, n_cores) if n_threads > 1 else None
        self._helpers: list[_Helper] = []  # one per group but the last
        self._pid = 0  # the process the helpers run in
        self._stopper = None
        self._lock = threading.Lock()

    @property
    def n_threads(self) -> int:
        return len(self.groups)

    def _start(self) -> None:
        self._helpers = [_Helper() for _ in self.groups[:-1]]
        for i, h in enumerate(self._helpers):
            threading.Thread(target=_helper_loop, args=(h, self.kernel_threads), name=f"chip-thread-{i}", daemon=True).start()
        self._pid = os.getpid()
        self._stopper = weakref.finalize(self, _stop_helpers, self._helpers)

    def run(self, fn: Callable, *args) -> list:
        """[fn(chip, *args) for every chip], the groups concurrently; results in chip order."""
        return [r for group in self.run_groups(_each, fn, *args) for r in group]

    def run_groups(self, fn: Callable, *args) -> list:
        """[fn(i, group i's chips, *args) for every group i], concurrently; results in group order."""
        if len(self.groups) == 1:
            return [fn(0, self.groups[0], *args)]
        import numba

        with self._lock:  # one run at a time: the helpers have one job slot each
            if self._pid != os.getpid():  # first run, or a fork left the helpers behind
                self._start()
            for i, (h, group) in enumerate(zip(self._helpers, self.groups)):
                h.job = (fn, args, i, group)
                h.go.release()
            prev = numba.get_num_threads()
            numba.set_num_threads(self.kernel_threads)
            try:
                mine = fn(len(self.groups) - 1, self.groups[-1], *args)
            finally:
                numba.set_num_threads(prev)
                theirs, error = [], None
                for h in self._helpers:  # wait for every helper, even after an error: they share the arrays
                    h.done.acquire()
                    theirs.append(h.result)
                    error = error or h.error
                    h.result = h.error = None
            if error is not None:
                raise error
            return theirs + [mine]

    def close(self) -> None:
        if self._stopper is not None:
            self._stopper()
