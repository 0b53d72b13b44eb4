"""The box with the persistent packed-weight cache (kernels.packcache, Box.prepare): a hit, a miss,
the key following the file and the split, corrupt / torn entries rebuilt, a full disk and a
read-only directory degrading to packing in memory, eviction, logits from a cached entry
bit-identical to packing in memory (1 and 4 chips, Q4_0, Q8_0, Q4_K_M), and a cold start's write
held back until the first forward pass (or the process's end)."""

from __future__ import annotations

import gc
import io
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import edgebox
from edgebox.gguf.file import GGUFFile, resident_fraction
from edgebox.gguf.page_cache import read_ahead
from edgebox.kernels import entry_hint, packcache
from tests.fixtures.page_cache import read_in_small_pages
from tests.fixtures.paths import DATA, REPO

MODELS = DATA / "models"
PROMPT = [1, 100, 2000, 300, 4000, 50]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("EDGEBOX_CACHE_DIR", str(d))
    monkeypatch.delenv("EDGEBOX_WEIGHT_CACHE", raising=False)
    monkeypatch.delenv("EDGEBOX_WEIGHT_CACHE_GIB", raising=False)
    monkeypatch.setattr(packcache, "_warned", set())
    return d / "packed"


def run(path, chips: int) -> tuple[np.ndarray, packcache.PackCache | None]:
    m = edgebox.load(path, chips=chips, backend="numba")
    try:
        m.prepare()
        logits = m.logits(PROMPT)  # (while a cold start writes its entry)
        if m.box.pack_cache is not None:
            m.box.pack_cache.wait()
        return logits, m.box.pack_cache
    finally:
        m.box.close()


def entries(d) -> list:
    return sorted(p for p in d.iterdir() if p.suffix == ".ebx") if d.exists() else []


@pytest.mark.parametrize("chips", [1, 4])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K_M"])
def test_a_cached_entry_gives_the_logits_of_packing_in_memory(cache_dir, monkeypatch, qtype, chips):
    path = MODELS / f"tiny-deepseek-coder-{qtype}.gguf"
    monkeypatch.setenv("EDGEBOX_WEIGHT_CACHE", "0")
    in_memory, none = run(path, chips)
    assert none is None and not cache_dir.exists()
    monkeypatch.delenv("EDGEBOX_WEIGHT_CACHE")
    cold, c = run(path, chips)  # miss: packed in memory, written, then read from the file's pages
    assert c.status == "written" and c.misses > 0 and c.hits == 0 and len(entries(cache_dir)) == 1
    warm, c = run(path, chips)  # hit: nothing packed
    assert c.status == "hit" and c.misses == 0 and c.hits > 0
    np.testing.assert_array_equal(cold, in_memory)
    np.testing.assert_array_equal(warm, in_memory)


def test_the_key_follows_the_file_and_the_split(cache_dir, tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(MODELS / "tiny-deepseek-coder-Q4_0.gguf", path)
    _, c1 = run(path, 1)
    _, c4 = run(path, 4)
    assert c1.status == c4.status == "written" and c1.path != c4.path  # another split, another entry
    assert run(path, 1)[1].status == "hit"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the file changed (its mtime)
    _, c = run(path, 1)
    assert c.status == "written" and c.path != c1.path
    moved = tmp_path / "moved.gguf"
    os.rename(path, moved)  # same file, another name: still a hit
    assert run(moved, 1)[1].status == "hit"
    other = tmp_path / "other.gguf"  # another model of the same shape and size (another type)
    shutil.copyfile(MODELS / "tiny-deepseek-coder-Q8_0.gguf", other)
    assert run(other, 1)[1].status == "written"
    assert len(entries(cache_dir)) == 4


@pytest.mark.parametrize("damage", ["corrupt", "torn"])
def test_a_damaged_entry_is_discarded_and_rebuilt(cache_dir, damage):
    path = MODELS / "tiny-deepseek-coder-Q4_K_M.gguf"
    good, c = run(path, 4)
    (entry,) = entries(cache_dir)
    if damage == "corrupt":
        with open(entry, "r+b") as f:  # a byte of the first array's first page
            f.seek(packcache.HEADER + 100)
            b = f.read(1)
            f.seek(packcache.HEADER + 100)
            f.write(bytes([b[0] ^ 0xFF]))
    else:
        os.truncate(entry, entry.stat().st_size * 2 // 3)  # a write cut short
    logits, c = run(path, 4)
    assert c.status == "written" and c.hits == 0  # nothing read from the damaged file
    np.testing.assert_array_equal(logits, good)
    assert run(path, 4)[1].status == "hit"


def test_eviction_keeps_the_cache_under_its_bound(cache_dir, monkeypatch):
    q4, q8 = MODELS / "tiny-deepseek-coder-Q4_0.gguf", MODELS / "tiny-deepseek-coder-Q8_0.gguf"
    _, c = run(q4, 1)
    size = c.path.stat().st_size
    monkeypatch.setenv("EDGEBOX_WEIGHT_CACHE_GIB", str(1.5 * size / 2**30))  # room for one entry
    _, c8 = run(q8, 1)
    assert entries(cache_dir) == [c8.path]  # the older was evicted to make room
    _, c = run(q4, 1)
    assert entries(cache_dir) == [c.path]


def _read_only(d):
    """Make directory d read-only for this process, root included (chattr +i); returns the undo."""
    if os.geteuid() != 0:
        d.chmod(0o555)
        return lambda: d.chmod(0o755)
    subprocess.run(["chattr", "+i", str(d)], check=True)
    return lambda: subprocess.run(["chattr", "-i", str(d)], check=True)


@pytest.mark.slow
def test_a_read_only_directory_packs_in_memory_with_one_warning_and_still_reads_an_entry(cache_dir, capsys):
    q4, q8 = MODELS / "tiny-deepseek-coder-Q4_0.gguf", MODELS / "tiny-deepseek-coder-Q8_0.gguf"
    good8, c8 = run(q8, 1)
    (cache_dir / entry_hint.INDEX).unlink()  # (so the hit below tries to write it: quietly)
    undo = _read_only(cache_dir)
    try:
        with pytest.raises(OSError):  # (it really is read-only for us)
            (cache_dir / "probe").write_bytes(b"")
        capsys.readouterr()
        for _ in range(2):
            logits, c = run(q4, 4)
            assert c.status.startswith("unwritable")
        logits8, c = run(q8, 1)  # the entry already there is still used
        assert c.status == "hit" and not (cache_dir / entry_hint.INDEX).exists()
    finally:
        undo()
    err = capsys.readouterr().err
    assert err.count("edgebox: warning:") == 1 and err.count("\n") == 1, err
    np.testing.assert_array_equal(logits8, good8)
    assert entries(cache_dir) == [c8.path]


@pytest.mark.slow
def test_a_full_disk_packs_in_memory_with_one_warning(cache_dir, tmp_path):
    # ENOSPC without root: the child may write files of at most 1 MiB (RLIMIT_FSIZE, SIGXFSZ
    # ignored so writes fail with EFBIG, as a full disk fails them with ENOSPC)
    code = textwrap.dedent(
        """
        import resource, signal, sys
        import numpy as np
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        import edgebox
        m = edgebox.load(sys.argv[1], chips=4, backend="numba")
        m.prepare()
        np.save(sys.stdout.buffer, m.logits([int(t) for t in sys.argv[2:]]))
        m.box.pack_cache.wait()
        print(m.box.pack_cache.status, file=sys.stderr)
        """
    )
    path = MODELS / "tiny-deepseek-coder-Q4_0.gguf"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", code, str(path), *map(str, PROMPT)], capture_output=True, env=env, timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert err.count("edgebox: warning: weight cache: cannot write") == 1 and "unwritable (File too large)" in err, err
    logits = np.load(io.BytesIO(p.stdout))
    np.testing.assert_array_equal(logits, run(path, 4)[0])  # (this run writes the entry)
    assert not [q for q in cache_dir.iterdir() if q.suffix == ".tmp"]  # the partial temp file was removed


def test_a_second_prepare_reuses_the_cache_and_writes_nothing(cache_dir):
    m = edgebox.load(MODELS / "tiny-deepseek-coder-Q4_0.gguf", chips=2, backend="numba")
    try:
        m.prepare()
        c = m.box.pack_cache
        c.wait()
        m.prepare()
        assert m.box.pack_cache is c and c.status == "written" and len(entries(cache_dir)) == 1
    finally:
        m.box.close()


def test_the_reference_backend_uses_no_cache(cache_dir):
    m = edgebox.load(MODELS / "tiny-deepseek-coder-Q4_0.gguf", chips=1, backend="ref")
    try:
        m.prepare()
        assert m.box.pack_cache is None and not cache_dir.exists()
    finally:
        m.box.close()


def test_a_cold_start_writes_its_entry_after_the_first_forward_pass(cache_dir):
    m = edgebox.load(MODELS / "tiny-deepseek-coder-Q4_0.gguf", chips=2, backend="numba")
    try:
        m.prepare()
        c = m.box.pack_cache
        time.sleep(1.0)  # (the tiny model's entry is written in well under a second once started)
        assert c.status == "writing" and not entries(cache_dir)
        m.logits(PROMPT)
        c._writer.join(timeout=60)
        assert c.status == "written" and len(entries(cache_dir)) == 1
    finally:
        m.box.close()


def test_a_process_that_ends_before_a_forward_pass_still_writes_its_entry(cache_dir):
    code = "import sys, edgebox; edgebox.load(sys.argv[1], chips=1, backend='numba').prepare()"
    path = MODELS / "tiny-deepseek-coder-Q4_0.gguf"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert time.monotonic() - t < packcache.AFTER_WAIT_S  # written at exit, not after the wait runs out
    assert len(entries(cache_dir)) == 1


@pytest.mark.parametrize("chips", [1, 4])
def test_a_cold_start_drops_the_packed_tensors_from_the_page_cache(cache_dir, tmp_path, monkeypatch, chips):
    """What a cold start packs (and its entry will keep) leaves the page cache as it is packed,
    a strided shard with its tensor's last chip (``gguf.file.evict_when_released``); what is
    read in place (the norms, the token embeddings, here also the tied lm head) stays; with the
    cache off, all stays."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(MODELS / "tiny-deepseek-coder-Q4_0.gguf", path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # (dirty pages are written back, not dropped)
    g = GGUFFile(path)
    packed = [t for n, t in g.tensors.items() if n.startswith("blk.") and t.qtype.name == "Q4_0"]
    assert {t.name.split(".")[-2] for t in packed} >= {"attn_q", "attn_output", "ffn_down"}
    in_place = [t for n, t in g.tensors.items() if n.endswith("norm.weight") or n == "token_embd.weight"]
    # the load's read-ahead queued at once, as on a real model (90 ms for 7B, before the first
    # weight is packed): on this tiny file the packer could otherwise evict pages before the
    # read-ahead thread asked for them, and see them read in again
    monkeypatch.setattr(entry_hint, "read_ahead_once", lambda p, first=(), entry=False: read_ahead(*first, p).join())

    def cached(t) -> float:  # the tensor's pages, less its first and last (shared with neighbours)
        return resident_fraction(path, t.offset + 4096, t.nbytes - 8192)

    for weight_cache in ("0", "1"):
        monkeypatch.setenv("EDGEBOX_WEIGHT_CACHE", weight_cache)
        gc.collect()  # the last load's mapping gone: a page still mapped anywhere is not dropped
        read_in_small_pages(path)
        assert min(cached(t) for t in packed) == 1.0
        run(path, chips)
        assert min(resident_fraction(path, t.offset, t.nbytes) for t in in_place) == 1.0
        if weight_cache == "0":
            assert min(cached(t) for t in packed) == 1.0  # every start packs from the file: keep it
        else:
            assert max(cached(t) for t in packed) == 0.0, [(t.name, cached(t)) for t in packed if cached(t)]
