"""The packed-weight entry's early read (kernels.entry_hint): a load remembers the entry it mapped
or wrote, per model file and chip count; the next start reads that entry (or, with none known,
the GGUF) into the page cache before anything heavy is imported; a stale or hostile index is only a
missed hint (an unwritable one: tests/unit/chips/test_pack_cache.py)."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import edgebox
from edgebox.gguf.file import resident_fraction
from edgebox.kernels import entry_hint
from tests.fixtures.paths import DATA, REPO

MODEL = DATA / "models" / "tiny-deepseek-coder-Q4_0.gguf"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEBOX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEBOX_WEIGHT_CACHE", raising=False)
    return tmp_path / "cache" / "packed"


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(MODEL, path)
    return path


def start(path, chips: int) -> str:
    """One load as the CLI does it (prepare, a forward pass, the entry written): its cache status."""
    m = edgebox.load(path, chips=chips, backend="numba")
    try:
        m.prepare()
        m.logits([1, 100, 2000])
        m.box.pack_cache.wait()
        return m.box.pack_cache.status
    finally:
        m.box.close()


def drop(path) -> None:
    gc.collect()  # (the last load's mapping gone: a page still mapped anywhere is not dropped)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_ahead(model, chips: int, **kwargs):
    """``read_ahead_model`` as a new process's start calls it (this process's earlier loads
    read the same files ahead within ``AGAIN_S``)."""
    entry_hint._started.clear()
    return entry_hint.read_ahead_model(model, chips, **kwargs)


def resident_soon(path) -> float:
    deadline = time.monotonic() + 30
    while resident_fraction(path) < 0.99 and time.monotonic() < deadline:
        time.sleep(0.05)
    return resident_fraction(path)


def test_the_next_start_reads_the_entry_a_load_mapped(cache, model):
    assert entry_hint.lookup(model, 1) is None
    assert start(model, 1) == "written" and start(model, 4) == "written"
    one, four = entry_hint.lookup(model, 1), entry_hint.lookup(model, 4)
    assert one.parent == cache and four.parent == cache and one != four
    assert entry_hint.lookup(model, 2) is None  # (another split: no guess)
    (cache / entry_hint.INDEX).unlink()
    assert start(model, 4) == "hit" and entry_hint.lookup(model, 4) == four  # a hit remembers too
    drop(four)
    assert resident_fraction(four) < 0.5
    read_ahead(model, 4).join(timeout=60)
    assert resident_soon(four) >= 0.99


def test_with_no_entry_known_the_gguf_is_read_ahead(cache, model, monkeypatch):
    assert start(model, 1) == "written"
    os.utime(model, ns=(time.time_ns(), time.time_ns() + 10**9))  # a rewritten file: its old entry is no guess
    assert entry_hint.lookup(model, 1) is None
    drop(model)
    assert resident_fraction(model) < 0.5
    read_ahead(model, 1).join(timeout=60)
    assert resident_soon(model) >= 0.99
    os.utime(model, ns=(time.time_ns(), time.time_ns() - 10**9))
    assert start(model, 1) == "written"  # (an entry known again; with the cache off the GGUF is read:)
    for setting, kwargs in (("1", {"weight_cache": False}), ("0", {})):  # (--no-weight-cache; the variable)
        monkeypatch.setenv("EDGEBOX_WEIGHT_CACHE", setting)
        drop(model)
        read_ahead(model, 1, **kwargs).join(timeout=60)
        assert resident_soon(model) >= 0.99
    for bad in (model.parent / "gone.gguf", str(model) + "\x00x", str(model.parent / "a\ud800.gguf")):
        assert read_ahead(bad, 1) is None  # (the load then says what is wrong)


@pytest.mark.parametrize(
    "index",
    [b"", b"\x00\xff not json", b"[1, 2]", b'{"a": 1}', b"{" * 100000],
    ids=["empty", "binary", "a list", "not names", "deep"],
)
def test_a_damaged_index_is_no_hint_and_is_rewritten(cache, model, index):
    cache.mkdir(parents=True)
    (cache / entry_hint.INDEX).write_bytes(index)
    assert entry_hint.lookup(model, 1) is None
    assert start(model, 1) == "written"
    assert entry_hint.lookup(model, 1) is not None


def test_an_index_naming_a_file_outside_the_cache_is_ignored(cache, model, tmp_path):
    outside = tmp_path / "outside.ebx"
    outside.write_bytes(b"x" * 4096)
    cache.mkdir(parents=True)
    key = f"{os.path.realpath(model)}|{model.stat().st_size}|{model.stat().st_mtime_ns}|1"
    for name in ("../outside.ebx", str(outside), "", "."):
        (cache / entry_hint.INDEX).write_text(json.dumps({key: name}))
        assert entry_hint.lookup(model, 1) is None, name


def test_the_index_keeps_the_most_recent_models(cache, tmp_path):
    cache.mkdir(parents=True)
    entry = cache / "packed-0.ebx"
    entry.write_bytes(b"x")
    models = []
    for i in range(entry_hint.KEEP + 5):
        p = tmp_path / f"m{i}.gguf"
        p.write_bytes(b"GGUF")
        entry_hint.remember(p, 1, entry)
        models.append(p)
    assert len(json.loads((cache / entry_hint.INDEX).read_text())) == entry_hint.KEEP
    assert entry_hint.lookup(models[-1], 1) == entry and entry_hint.lookup(models[0], 1) is None
    entry_hint.remember(models[5], 1, entry)  # (the oldest kept, used again: now the newest)
    entry_hint.remember(tmp_path / "new.gguf", 1, entry)  # (no such file: nothing recorded)
    assert list(json.loads((cache / entry_hint.INDEX).read_text()))[-1].startswith(str(models[5].resolve()))


def test_the_cli_starts_the_read_before_numpy_is_imported(tmp_path):
    """The read (the JIT's LLVM library first, then the weights) starts with nothing heavy imported."""
    code = (
        "import sys; import edgebox.cli; from edgebox.kernels import entry_hint; "
        f"entry_hint.read_ahead_model({str(MODEL)!r}, 1).join(); "
        "print(entry_hint.jit_library()); "
        "print(sorted(m for m in ('numpy', 'numba', 'llvmlite', 'tokenizers') if m in sys.modules))"
    )
    env = dict(os.environ, EDGEBOX_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    library, imported = out.splitlines()
    assert imported == "[]"
    (path,) = eval(library)
    assert os.path.isfile(path) and path.endswith("libllvmlite.so")


def test_a_start_reads_each_file_ahead_once(tmp_path):
    """The CLI, the load and the cache of one start ask for the same file: one pass, not three."""
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 4096)
    entry_hint._started.clear()
    entry_hint.read_ahead_once(path).join(timeout=10)  # (done: a later ask is still the same start's)
    assert entry_hint.read_ahead_once(path) is None and entry_hint.read_ahead_once(str(path)) is None
    assert entry_hint.read_ahead_once(tmp_path / "other.bin") is not None  # (another file: its own pass)
