"""A load whose packed copies are kept elsewhere drops the GGUF's pages from the page cache as
they are packed (``evict_when_released``): a contiguous view's pages at once, a strided shard's
with its tensor's last shard, the other tensors' never; without the call, releasing a view
only unmaps it and the pages stay cached (``release_view_pages``)."""

from __future__ import annotations

import os

import gguf
import numpy as np

from edgebox.gguf.file import GGUFFile, evict_when_released, release_view_pages, resident_fraction, unmap_view_pages
from tests.fixtures.page_cache import read_in_small_pages

ROWS, ROW_BYTES = 64, 4096  # 256 KiB per tensor


def _file(path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for name in ("a.weight", "b.weight", "c.weight"):
        w.add_tensor(name, np.ones((ROWS, ROW_BYTES // 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # (dirty pages are written back, not dropped)
    read_in_small_pages(path)


def _cached(path, t) -> float:
    return resident_fraction(path, t.offset, t.nbytes)


def _read(view) -> None:
    assert int(view.sum()) >= 0  # fault every page in


def test_released_views_leave_the_page_cache_only_when_asked(tmp_path):
    path = tmp_path / "m.gguf"
    _file(path)
    g = GGUFFile(path)
    a, b, c = (g.tensors[n] for n in ("a.weight", "b.weight", "c.weight"))
    for t in (a, b, c):
        _read(t.data)
    assert min(_cached(path, t) for t in (a, b, c)) == 1.0

    release_view_pages(a.data)  # not asked: unmapped, still cached
    assert _cached(path, a) == 1.0

    assert evict_when_released(a.data)
    release_view_pages(b.data[: ROWS // 2])  # a contiguous view: its pages go at once
    assert resident_fraction(path, b.offset + 4096, b.nbytes // 2 - 8192) == 0.0
    assert resident_fraction(path, b.offset + b.nbytes // 2 + 4096, b.nbytes // 2 - 8192) == 1.0

    left, right = c.data[:, : ROW_BYTES // 2], c.data[:, ROW_BYTES // 2 :]  # two chips' strided shards
    release_view_pages(left)
    release_view_pages(left)  # a second release of the same view counts once
    assert _cached(path, c) == 1.0
    release_view_pages(right)  # the tensor's last shard: all its pages go
    assert resident_fraction(path, c.offset + 4096, c.nbytes - 8192) == 0.0
    assert _cached(path, a) == 1.0  # released before the call: kept
    assert float(c.data.view(np.float32)[0, 0]) == 1.0  # an evicted page reads back from the file


def test_a_replaced_file_is_not_evicted(tmp_path):
    path = tmp_path / "m.gguf"
    _file(path)
    g = GGUFFile(path)
    os.utime(path, ns=(0, 0))  # the path now names "another" file
    assert not evict_when_released(g.tensors["a.weight"].data)
    assert not evict_when_released(np.zeros((4, 4), np.uint8))  # not a GGUF file's view


def test_unmapping_a_view_as_it_is_packed_keeps_its_pages_and_its_release(tmp_path):
    """``unmap_view_pages`` (the kernels' trim, run by run) drops only this process's mapping: the
    pages stay cached and read back, the view's release still evicts them, and a view of any
    other memory is left alone (MADV_DONTNEED would zero it)."""
    path = tmp_path / "m.gguf"
    _file(path)
    g = GGUFFile(path)
    a = g.tensors["a.weight"]
    _read(a.data)
    assert evict_when_released(a.data)
    unmap_view_pages(a.data[: ROWS // 2])
    unmap_view_pages(a.data[: ROWS // 2])  # (a trim is no release: twice is nothing)
    assert _cached(path, a) == 1.0 and float(a.data.view(np.float32)[0, 0]) == 1.0
    release_view_pages(a.data)
    assert resident_fraction(path, a.offset + 4096, a.nbytes - 8192) == 0.0
    anonymous = np.ones(1 << 18, np.float32)  # 1 MiB: whole pages
    unmap_view_pages(anonymous.view(np.uint8))
    assert anonymous.min() == 1.0
