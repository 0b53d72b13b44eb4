"""gguf.page_cache.read_ahead: a file dropped from the page cache is read back into it in the
background (measured with ``resident_fraction``: mincore, as ``edgebox bench --startup`` measures it)."""

from __future__ import annotations

import os
import time

from edgebox.gguf.file import resident_fraction
from edgebox.gguf.page_cache import READ_AHEAD_CHUNK, read_ahead


def test_read_ahead_brings_a_dropped_file_back_into_the_page_cache(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(5 * READ_AHEAD_CHUNK + 12345))  # several chunks and a ragged end
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # (clean pages: no privilege needed)
    assert resident_fraction(path) < 0.5
    read_ahead(path).join(timeout=60)
    deadline = time.monotonic() + 30
    while resident_fraction(path) < 0.99 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resident_fraction(path) >= 0.99


def test_read_ahead_of_a_missing_file_is_quiet(tmp_path):
    read_ahead(tmp_path / "gone.bin").join(timeout=10)  # (the thread ends; nothing is raised)


def test_read_ahead_reads_several_files_in_turn(tmp_path):
    paths = [tmp_path / "first.bin", tmp_path / "second.bin"]
    for p in paths:
        p.write_bytes(os.urandom(2 * READ_AHEAD_CHUNK + 7))
        with open(p, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert max(resident_fraction(p) for p in paths) < 0.5
    read_ahead(paths[0], tmp_path / "gone.bin", paths[1]).join(timeout=60)  # (a missing one is skipped)
    deadline = time.monotonic() + 30
    while min(resident_fraction(p) for p in paths) < 0.99 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert min(resident_fraction(p) for p in paths) >= 0.99
