"""Which packed-weight entry a model's next start maps, known before anything heavy is imported.

After a page-cache drop (a reboot), a warm start waits mostly for its entry's bytes: 3.65 GB for
the 7B Q4_0 on 4 chips, 1.1-2.5 s from this VM's disk. The entry's name is a hash of the GGUF's
header and the chip split, known only once numba is imported and the GGUF parsed (~0.9 s in).
So every load that maps or writes an entry records it here (``remember``: the model file by real
path, size and mtime, and the chip count, in ``recent.json`` beside the entries), and the CLI
starts reading it at its first step (``read_ahead_model``; the GGUF when no entry is known). A
hint is only a guess: a wrong or stale one costs one wasted read, never a wrong weight (the
entry is still found by its key and verified). Standard library only, so importing this costs
nothing. (The cache's on/off setting and directory are defined here for the same reason.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from edgebox.gguf.page_cache import read_ahead

ENABLED_ENV = "EDGEBOX_WEIGHT_CACHE"  # 0/off/no/false: off
INDEX = "recent.json"
KEEP = 32  # models remembered, the most recently used

AGAIN_S = 30.0  # a file read ahead this recently by this process is not read ahead again
_started: dict[str, float] = {}  # each file's last read-ahead (time.monotonic), by real path
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get(ENABLED_ENV, "1").strip().lower() not in ("0", "off", "no", "false")


def cache_dir() -> Path:
    """The directory of the entries: $EDGEBOX_CACHE_DIR, else $XDG_CACHE_HOME/edgebox, else
    ~/.cache/edgebox; then ``packed``."""
    base = os.environ.get("EDGEBOX_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = str(Path(xdg) / "edgebox") if xdg else str(Path.home() / ".cache" / "edgebox")
    return Path(base) / "packed"


def _model_key(model: str | os.PathLike, chips: int) -> str | None:
    try:
        st = os.stat(model)
    except (OSError, ValueError):  # (no such file; a NUL or a lone surrogate in the name)
        return None
    return f"{os.path.realpath(model)}|{st.st_size}|{st.st_mtime_ns}|{chips}"


def _index(directory: Path) -> dict[str, str]:
    try:
        data = json.loads((directory / INDEX).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def lookup(model: str | os.PathLike, chips: int) -> Path | None:
    """The entry a load of ``model`` on ``chips`` chips last mapped or wrote, if it still exists."""
    key = _model_key(model, chips)
    name = _index(cache_dir()).get(key) if key else None
    if not name or Path(name).name != name:  # (a bare file name in the directory, nothing else)
        return None
    path = cache_dir() / name
    return path if path.is_file() else None


def remember(model: str | os.PathLike, chips: int, entry: Path) -> None:
    """Record that a load of ``model`` on ``chips`` chips maps ``entry`` (a file of the cache
    directory). Quiet on any failure: the hint is an optimization."""
    key = _model_key(model, chips)
    if key is None:
        return
    index = _index(entry.parent)
    if list(index)[-1:] == [key] and index[key] == entry.name:
        return  # (the usual warm start: nothing to write)
    index.pop(key, None)
    index[key] = entry.name
    index = dict(list(index.items())[-KEEP:])
    try:
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".recent-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(index, f)
            os.replace(tmp, entry.parent / INDEX)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def read_ahead_once(path: str | os.PathLike, first: Sequence[str] = (), entry: bool = False) -> threading.Thread | None:
    """``page_cache.read_ahead(*first, path)`` (``path`` in 2 MiB folios if it is a packed-weight
    ``entry``, which decode streams at every token) unless this process started one of ``path`` in
    the last ``AGAIN_S``: a start's CLI, load and cache ask for the same file within a second or
    two, and each further pass over a 3.6 GB entry costs ~0.06 s of a core even with every page
    resident (a concurrent one slows the first). A model loaded again within AGAIN_S (a daemon
    swapping back) goes without."""
    key = os.path.realpath(path)
    with _lock:
        now = time.monotonic()
        if now - _started.get(key, -AGAIN_S) < AGAIN_S:
            return None
        _started[key] = now
    return read_ahead(*first, path, huge=(path,) if entry else ())


def read_ahead_model(model: str | os.PathLike, chips: int, weight_cache: bool = True) -> threading.Thread | None:
    """Start reading what a load of ``model`` on ``chips`` chips will read whole into the page
    cache: the entry it last mapped (``lookup``), else the GGUF file (packed from it on a miss or
    with the cache off: ``weight_cache`` False or ``enabled()`` false), after the JIT's LLVM
    library (``jit_library``). None when that was started already, or ``model`` is no file.
    (A model moved since its entry was written reads its GGUF for nothing, once.)"""
    entry = lookup(model, chips) if weight_cache and enabled() else None
    if entry is None and not os.path.isfile(model):
        return None
    return read_ahead_once(entry or model, first=jit_library(), entry=entry is not None)


def jit_library() -> list[str]:
    """llvmlite's LLVM library, found without importing it: 178 MB, the largest file a start
    reads after the weights. The first kernel loaded from numba's cache links with it, and after
    a page-cache drop its pages came in one fault at a time behind the weights' reads: 1-chip
    7B warm starts, two in turns, first token 3.39 / 3.51 s -> 3.14 / 2.98 s read first."""
    try:
        spec = importlib.util.find_spec("llvmlite")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [os.path.join(spec.submodule_search_locations[0], "binding", "libllvmlite.so")]
