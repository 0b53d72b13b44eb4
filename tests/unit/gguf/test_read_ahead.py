"""gguf.page_cache.read_ahead: a file dropped from the page cache is read back into it in the
background (measured with ``resident_fraction``: mincore, as ``edgebox bench --startup`` measures it)."""

from __future__ import annotations

import mmap
import os
import resource
import time
from pathlib import Path

import numpy as np

from edgebox.gguf.file import resident_fraction
from edgebox.gguf.page_cache import HUGE_CHUNK, READ_AHEAD_CHUNK, read_ahead


def _written_and_dropped(path: Path, size: int) -> None:
    path.write_bytes(os.urandom(size))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # (clean pages: no privilege needed)


def _least_resident_after_waiting(*paths: Path, share: float = 0.99) -> float:
    """The least resident share of ``paths`` once all reach ``share``, or 30 s have passed."""
    deadline = time.monotonic() + 30
    while min(resident_fraction(p) for p in paths) < share and time.monotonic() < deadline:
        time.sleep(0.05)
    return min(resident_fraction(p) for p in paths)


def _pmd_mapped_fraction(path: Path) -> float:
    """The share of the file a fresh mapping of it maps with 2 MiB page-table entries once read
    (``FilePmdMapped`` of its smaps lines): what a page cache of 2 MiB folios allows."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        view = np.frombuffer(mm, dtype=np.uint8)
        int(view[:: mmap.PAGESIZE].sum())  # (every page touched)
        start = view.__array_interface__["data"][0]
        lines = iter(Path("/proc/self/smaps").read_text().splitlines())
        for line in lines:
            if line.split("-")[0] == f"{start:x}":
                for field in lines:
                    if field.startswith("FilePmdMapped:"):
                        return int(field.split()[1]) * 1024 / size
        return 0.0
    finally:
        del view
        mm.close()


def test_read_ahead_brings_a_dropped_file_back_into_the_page_cache(tmp_path):
    path = tmp_path / "weights.bin"
    _written_and_dropped(path, 5 * READ_AHEAD_CHUNK + 12345)  # several chunks and a ragged end
    assert resident_fraction(path) < 0.5
    read_ahead(path).join(timeout=60)
    assert _least_resident_after_waiting(path) >= 0.99


def test_read_ahead_of_a_missing_file_is_quiet(tmp_path):
    read_ahead(tmp_path / "gone.bin").join(timeout=10)  # (the thread ends; nothing is raised)


def test_read_ahead_reads_several_files_in_turn(tmp_path):
    paths = [tmp_path / "first.bin", tmp_path / "second.bin"]
    for p in paths:
        _written_and_dropped(p, 2 * READ_AHEAD_CHUNK + 7)
    assert max(resident_fraction(p) for p in paths) < 0.5
    read_ahead(paths[0], tmp_path / "gone.bin", paths[1]).join(timeout=60)  # (a missing one is skipped)
    assert _least_resident_after_waiting(*paths) >= 0.99


def test_a_packed_entry_is_read_ahead_in_2_mib_folios(tmp_path):
    """A file in ``huge`` (a packed-weight entry, streamed by decode at every token) is read into
    2 MiB page-cache folios, which a mapping maps with one TLB entry each (7B Q4_0 decode steps
    4-7 % faster, docs/performance.md "Huge pages"); the fadvise read leaves 4 KiB pages (0 %
    PMD-mapped on this project's CI, Linux 6.18 on ext4). The bar is what the kernel gives a file
    written in one call (~100 % there): no more can be asked of a kernel or filesystem without
    large page-cache folios (ext4 before Linux 6.16), where both are 0."""
    written = tmp_path / "written.bin"
    written.write_bytes(os.urandom(16 << 20))
    path = tmp_path / "entry.bin"
    _written_and_dropped(path, 3 * HUGE_CHUNK + 5 * (2 << 20) + 12345)  # windows, a ragged last one
    read_ahead(path, huge=[path]).join(timeout=60)
    assert _least_resident_after_waiting(path, share=1.0) == 1.0
    assert _pmd_mapped_fraction(path) >= 0.95 * _pmd_mapped_fraction(written)


def test_a_huge_read_ahead_leaves_pages_already_cached_alone(tmp_path):
    """A window already in the page cache is not faulted in again: its pages stay the size they
    are, and faulting in 4 KiB ones cost a core 0.43 s per 3.65 GB. So the read of a resident
    file is a mincore pass, with no page faults (a populate counts one per page or fault-around)."""
    path = tmp_path / "entry.bin"
    _written_and_dropped(path, 2 * HUGE_CHUNK)
    read_ahead(path).join(timeout=60)
    assert _least_resident_after_waiting(path, share=1.0) == 1.0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    read_ahead(path, huge=[path]).join(timeout=60)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 200
