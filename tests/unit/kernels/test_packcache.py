"""The packed-weight cache's entry file (kernels.packcache): written atomically, every check on
open catches what it claims to catch, LRU eviction, and the degrade-to-memory path."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from edgebox.gguf.quant_types import QType
from edgebox.kernels import matmul, packcache
from edgebox.kernels.packcache import HEADER, CorruptEntry, Entry, PackCache

KEY = bytes(range(32))


def packed_weights(seed: int = 0) -> list[tuple[str, matmul.PackedWeight]]:
    """Two real Q8_0 weights packed by the kernels (one large enough for three samples)."""
    rng = np.random.default_rng(seed)
    out = []
    for name, n_out, n_in in (("a", 64, 256), ("b", 16, 64)):
        blocks = rng.integers(0, 256, size=(n_out, n_in // 32, 34), dtype=np.uint8)
        blocks[..., 1] &= 0x3B  # finite f16 scales
        out.append((name, matmul.pack(blocks.reshape(n_out, -1), QType.Q8_0)))
    return out


def written(tmp_path, weights=None) -> tuple:
    weights = weights or packed_weights()
    path = packcache.entry_path(tmp_path, KEY)
    packcache.write_entry(path, KEY, weights)
    return path, weights


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_entry_round_trip_maps_the_same_arrays_writable(tmp_path):
    path, weights = written(tmp_path)
    entry = Entry.open(path, KEY, full=True)
    for name, pw in weights:
        got = entry.get(name, pw.qtype, pw.n_out, pw.n_in)
        assert (got.path, got.nbytes) == (pw.path, pw.nbytes)
        for k, a in pw.arrays.items():
            assert got.arrays[k].dtype == a.dtype and got.arrays[k].flags.writeable  # the kernels' array types
            assert got.arrays[k].ctypes.data % 64 == 0
            np.testing.assert_array_equal(got.arrays[k], a)
    assert entry.get("a", QType.Q4_0, 64, 256) is None  # another type or shape is not this weight
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # the temp file was renamed


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p, n: os.truncate(p, n // 2), "truncated"),
        (lambda p, n: os.truncate(p, 100), "shorter than the header"),
        (lambda p, n: open(p, "ab").write(b"x"), "truncated or torn"),
        (lambda p, n: flip(p, 0), "bad magic"),
        (lambda p, n: flip(p, 20), "header checksum"),
        (lambda p, n: flip(p, n - 3), "table checksum"),
        (lambda p, n: flip(p, HEADER + 5), "sample checksum"),  # first page of the first array
    ],
)
def test_a_damaged_entry_is_refused(tmp_path, damage, reason):
    path, _ = written(tmp_path)
    damage(path, path.stat().st_size)
    with pytest.raises(CorruptEntry, match=reason):
        Entry.open(path, KEY)


def test_the_key_is_checked(tmp_path):
    path, _ = written(tmp_path)
    with pytest.raises(CorruptEntry, match="key mismatch"):
        Entry.open(path, bytes(32))


def test_a_flip_outside_the_samples_needs_the_full_check(tmp_path):
    # array "a" (Q8_0 64 x 256: 16 KiB of values) is sampled at its first, middle and last 4 KiB:
    # a byte at 5 KiB is only caught by the whole-array CRC (EDGEBOX_WEIGHT_CACHE_VERIFY=full)
    path, weights = written(tmp_path)
    assert weights[0][1].arrays["q"].nbytes > 3 * packcache.SAMPLE
    entry = Entry.open(path, KEY)
    (q,) = [a for a in entry.weights["a"]["arrays"] if a["name"] == "q"]
    del entry
    flip(path, q["offset"] + 5 * 1024)
    Entry.open(path, KEY)  # the sample check passes
    with pytest.raises(CorruptEntry, match="checksum mismatch"):
        Entry.open(path, KEY, full=True)


def test_eviction_drops_the_least_recently_used_and_stale_temp_files(tmp_path):
    now = 1_800_000_000
    for i, name in enumerate(("packed-old.ebx", "packed-mid.ebx", "packed-new.ebx")):
        p = tmp_path / name
        p.write_bytes(b"\0" * 1000)
        os.utime(p, (now + i, now + i))
    (tmp_path / "other.json").write_bytes(b"{}" * 1000)  # not ours: never counted or deleted
    stale, fresh = tmp_path / ".packed-a.tmp", tmp_path / ".packed-b.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (0, 0))
    removed = packcache.evict(tmp_path, limit=2500, incoming=500)
    assert sorted(p.name for p in removed) == [".packed-a.tmp", "packed-old.ebx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".packed-b.tmp", "other.json", "packed-mid.ebx", "packed-new.ebx"]
    packcache.evict(tmp_path, limit=1500, incoming=500)
    assert (tmp_path / "packed-new.ebx").exists() and not (tmp_path / "packed-mid.ebx").exists()


def test_a_hit_refreshes_the_entry_for_lru(tmp_path):
    path, _ = written(tmp_path)
    os.utime(path, (1, 1))
    PackCache(tmp_path, KEY)
    assert path.stat().st_mtime > 1e9


class _M:
    def __init__(self, name, pw):
        self.name, self.qtype, self.n_out, self.n_in = name, pw.qtype, pw.n_out, pw.n_in


def test_pack_cache_writes_what_was_packed_then_serves_it(tmp_path):
    weights = packed_weights()
    c = PackCache(tmp_path, KEY)
    assert c.status == "miss" and c.lookup(_M("a", weights[0][1])) is None
    before = {n: {k: a.copy() for k, a in pw.arrays.items()} for n, pw in weights}
    for name, pw in weights:
        c.add(_M(name, pw), pw)
    c.finish()
    assert c.status == "written"
    for name, pw in weights:  # now the entry's pages, same values
        for k, a in pw.arrays.items():
            assert not a.flags.owndata
            np.testing.assert_array_equal(a, before[name][k])
    c2 = PackCache(tmp_path, KEY)
    assert c2.status == "hit"
    got = c2.lookup(_M("b", weights[1][1]))
    np.testing.assert_array_equal(got.arrays["q"], before["b"]["q"])
    c2.finish()  # nothing packed: nothing written
    assert c2.status == "hit"


def test_a_background_write_keeps_the_arrays_in_memory(tmp_path):
    weights = packed_weights()
    arrays = [a for _, pw in weights for a in pw.arrays.values()]
    c = PackCache(tmp_path, KEY)
    for name, pw in weights:
        c.add(_M(name, pw), pw)
    c.finish(background=True)
    c.wait()
    assert c.status == "written" and c.entry is None  # the entry is for the next start
    assert all(a is b for a, b in zip([a for _, pw in weights for a in pw.arrays.values()], arrays))  # not rebound
    assert PackCache(tmp_path, KEY).status == "hit"


def test_a_corrupt_entry_is_discarded(tmp_path):
    path, _ = written(tmp_path)
    flip(path, HEADER + 5)
    c = PackCache(tmp_path, KEY)
    assert c.entry is None and c.status.startswith("discarded (") and "sample checksum" in c.status
    assert not path.exists()


def test_unwritable_directory_warns_once_and_keeps_the_packed_arrays(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(packcache, "_warned", set())
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    for _ in range(2):
        weights = packed_weights()
        c = PackCache(blocker / "packed", KEY)  # a directory that cannot be created
        for name, pw in weights:
            c.add(_M(name, pw), pw)
        c.finish()
        assert c.status.startswith("unwritable") and c.entry is None
        assert all(not isinstance(a.base, np.ndarray) or a.base.flags.owndata for _, pw in weights for a in pw.arrays.values())
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "edgebox: warning: weight cache: cannot write" in err


def test_entry_key_depends_on_every_part():
    ident = packcache.FileIdentity("/m.gguf", 100, 5, "ab")
    base = packcache.entry_key(ident, b"split1")
    assert packcache.entry_key(packcache.FileIdentity("/elsewhere.gguf", 100, 5, "ab"), b"split1") == base
    for other in (
        packcache.entry_key(packcache.FileIdentity("/m.gguf", 101, 5, "ab"), b"split1"),
        packcache.entry_key(packcache.FileIdentity("/m.gguf", 100, 6, "ab"), b"split1"),
        packcache.entry_key(packcache.FileIdentity("/m.gguf", 100, 5, "ac"), b"split1"),
        packcache.entry_key(ident, b"split2"),
    ):
        assert other != base and len(other) == 32


def test_header_layout_is_what_the_reader_expects():
    assert packcache._HEAD.size + 4 <= HEADER and struct.calcsize("<I") == 4
