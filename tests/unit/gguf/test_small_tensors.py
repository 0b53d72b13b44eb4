"""GGUFFile reads its small tensors (norms, biases) ahead as it opens, page-exact, and keeps the
mapping's read-around off them: a norm first touched inside a forward pass must not fault in
megabytes of its neighbours (``GGUFFile._read_small_tensors_ahead``)."""

from __future__ import annotations

import os
import time

import gguf
import numpy as np

from edgebox.gguf.file import SMALL_TENSOR_BYTES, GGUFFile, resident_fraction

BIG = 24 << 20  # beyond any read-around window after the header (read_ahead_kb is at most 8 MiB here)


def _file(path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("big.weight", np.ones(BIG // 4, np.float32))
    w.add_tensor("norm.weight", np.full(4096, 2.0, np.float32))  # 16 KiB, after 24 MiB of data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # (clean pages: no privilege needed)


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of this process's mapping that holds ``address`` (/proc/self/smaps)."""
    inside, flags = False, set()
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                flags = set(line.split()[1:])
    return flags


def test_a_small_tensor_is_read_ahead_at_open_and_not_read_around(tmp_path):
    path = tmp_path / "m.gguf"
    _file(path)
    assert resident_fraction(path) < 0.5
    g = GGUFFile(path)
    norm, big = g.tensors["norm.weight"], g.tensors["big.weight"]
    assert 0 < norm.nbytes <= SMALL_TENSOR_BYTES < big.nbytes
    deadline = time.monotonic() + 20
    while resident_fraction(path, norm.offset, norm.nbytes) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert resident_fraction(path, norm.offset, norm.nbytes) == 1.0  # read ahead, nothing touched it
    assert resident_fraction(path, big.offset + (8 << 20), 8 << 20) < 0.5  # the big one was left alone
    assert "rr" in _vm_flags(norm.data.__array_interface__["data"][0])  # MADV_RANDOM: no read-around
    assert "rr" not in _vm_flags(big.data.__array_interface__["data"][0] + (8 << 20))
    assert float(norm.data.view(np.float32)[0, 0]) == 2.0
