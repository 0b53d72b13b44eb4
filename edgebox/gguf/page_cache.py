"""Reading a file into the page cache ahead of its use, with the standard library alone.

Standard library only, so that the CLI can start a model's read before numpy and numba are
imported (``kernels.entry_hint``): after a page-cache drop, the imports are what the disk would
otherwise wait behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import threading
from collections.abc import Collection

READ_AHEAD_CHUNK = 8 << 20
HUGE_CHUNK = 64 << 20  # one mapping's populate call in the 2 MiB-folio read
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # (Linux >= 5.14; 3.11's mmap lacks the name)


def read_ahead(*paths: str | os.PathLike, huge: Collection[str | os.PathLike] = ()) -> threading.Thread | None:
    """Have the kernel read the whole files into the page cache, one after the other, each in
    file order, in the background (a daemon thread; a missing file is skipped); None where there
    is no fadvise.  Files in ``huge`` are faulted in through a ``MADV_HUGEPAGE`` mapping (64 MiB
    per ``MADV_POPULATE_READ``), which makes the page cache hold them in 2 MiB folios that a later
    mapping maps with one TLB entry each; the others get ``POSIX_FADV_WILLNEED`` per 8 MiB, whose
    reads land in 4 KiB pages.  Why: the packed-weight entries are what decode streams at every
    token, and 7B Q4_0 decode steps ran 4-7 % faster from 2 MiB pages (docs/performance.md,
    "Huge pages"); the populate read of a dropped 3.65 GB entry took 1.3-1.8 s, fadvise 1.7-2.1 s.
    Why chunks for fadvise: one call over a whole file reads only ~8 MiB ahead on Linux 6.x."""
    if not hasattr(os, "posix_fadvise"):
        return None
    in_huge = {os.fspath(p) for p in huge}

    def run() -> None:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                done = _populate_huge(fd, size) if os.fspath(path) in in_huge else 0
                for off in range(done, size, READ_AHEAD_CHUNK):
                    os.posix_fadvise(fd, off, min(READ_AHEAD_CHUNK, size - off), os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    t = threading.Thread(target=run, name="edgebox-read-ahead", daemon=True)
    t.start()
    return t


def _populate_huge(fd: int, size: int) -> int:
    """Fault bytes [0, size) of ``fd`` in through a ``MADV_HUGEPAGE`` mapping, a 64 MiB window at a
    time (mapped, populated, unmapped: this process's RSS holds one window at most); returns how
    far it got, where the fadvise read takes over (an old kernel's EINVAL, a file cut short).  A
    window already in the page cache is left as it is (mincore): faulting in 4 KiB pages read
    earlier costs a core 0.43 s per 3.65 GB and changes nothing, 2 MiB folios cost ~0; where
    mincore is refused every window is populated, ~0 s where its folios are 2 MiB already.  The calls
    go through ctypes, which lets go of the GIL (``mmap.madvise`` holds it: the imports a start
    runs beside the read would wait 20-50 ms per window)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    done = 0
    while done < size:
        length = min(HUGE_CHUNK, size - done)
        try:
            with mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=done) as window:
                view = ctypes.c_char.from_buffer(window)  # (ACCESS_COPY: writable, so it has an address)
                address = ctypes.addressof(view)
                del view  # (the mapping closes only with no buffer exported)
                at, n = ctypes.c_void_p(address), ctypes.c_size_t(length)
                if resident_pages(address, length) < -(-length // mmap.PAGESIZE) and (
                    libc().madvise(at, n, mmap.MADV_HUGEPAGE) != 0 or libc().madvise(at, n, MADV_POPULATE_READ) != 0
                ):
                    return done
        except (OSError, ValueError):
            return done
        done += length
    return done


def resident_pages(address: int, length: int) -> int:
    """How many pages of the mapped bytes [address, address + length) are in the page cache
    (mincore: bit 0 of each page's byte); -1 where mincore is refused (the systemd unit's
    ``@system-service`` filter) or fails."""
    vec = (ctypes.c_ubyte * -(-length // mmap.PAGESIZE))()
    if libc().mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) != 0:
        return -1
    return bytes(vec).translate(_BIT0).count(1)


_BIT0 = bytes(b & 1 for b in range(256))


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, for the calls Python's os and mmap lack (mincore, madvise without the GIL)."""
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
