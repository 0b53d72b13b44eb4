"""The persistent packed-weight cache: the kernels' repacked weights written once, mapped at later starts.

Repacking a 7B model costs 10-20 s at every start. The first start packs in memory (reading the
GGUF once) and writes every packed array of the model, as split over its chips, to ONE file on a
background thread while the model runs (the interpreter waits for it at exit); later starts map
that file copy-on-write (the kernels see the same writable arrays as a fresh pack and compile
nothing new) and nothing is repacked. The pages are the page cache's, shared by every process
that maps the entry.

Invariants: an entry is used only when its key matches (``entry_key``: layout version, a digest
of the layout-defining sources, byte order, the GGUF's identity and the chip split) and its
checks pass (``Entry.open``: header, size, table CRC, bounds, sample CRCs; the whole-array CRCs
with ``EDGEBOX_WEIGHT_CACHE_VERIFY=full``); a failed check deletes the entry and the weights are
packed again. Entries are written atomically (temp file, fallocate, fsync, ``os.replace``) and
kept under ``EDGEBOX_WEIGHT_CACHE_GIB`` by evicting the least recently used. A cache that cannot
be written degrades to packing in memory with one warning line. ``EDGEBOX_WEIGHT_CACHE=0`` turns
it off (the flags ``--no-weight-cache`` / ``--weight-cache-gib`` and the daemon's settings set
these variables: ``configure``). The file format, what each check guarantees and the measurements: docs/weight-cache.md.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import mmap
import os
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgebox.gguf.file import FileIdentity, evict_when_released, identity_of
from edgebox.gguf.quant_types import QType, is_quantized
from edgebox.kernels import entry_hint
from edgebox.kernels.entry_hint import ENABLED_ENV, cache_dir, enabled
from edgebox.kernels.matmul import PackedWeight

LAYOUT_VERSION = 1  # bump when any type's repacked layout (kernels/quants/, matmul_pack.py) changes
FORMAT = 1  # the entry file's own format
MAGIC = b"EBXPACK\x00"
HEADER = 4096
ALIGN = 4096
SAMPLE = 4096
DEFAULT_MAX_GIB = 16.0
STALE_TEMP_S = 3600.0
AFTER_WAIT_S = 30.0  # a background write waits this long at most for the first forward pass
_HEAD = struct.Struct("<8sIIQQQ32sI")  # magic, format, reserved, size, table offset, table len, key, table crc
SUFFIX = ".ebx"

_warned: set[str] = set()


class CorruptEntry(Exception):
    """An entry that failed verification (the message says which check)."""


# -- settings ----------------------------------------------------------------------------------
#
# The environment holds the settings (so a benchmark's or a daemon's child processes inherit
# them); the CLI flags and the daemon's config write it through ``configure``: one mechanism.

MAX_GIB_ENV = "EDGEBOX_WEIGHT_CACHE_GIB"  # the entries' total at most, in GiB


def configure(enabled: bool | None = None, max_gib: float | None = None, gib_name: str = "weight_cache_gib") -> None:
    """Set the cache's settings for this process and the processes it starts, as the environment
    variables do (None leaves a setting as the environment has it).  ValueError naming the
    setting (``gib_name``: as the caller's user spells it) for a size that is not a positive
    number of GiB."""
    if max_gib is not None:
        if isinstance(max_gib, bool) or not isinstance(max_gib, (int, float)) or not 0 < max_gib < 2**40:
            raise ValueError(f"{gib_name} must be a positive number of GiB (e.g. 16), got {max_gib!r}")
        os.environ[MAX_GIB_ENV] = repr(float(max_gib))
    if enabled is not None:
        os.environ[ENABLED_ENV] = "1" if enabled else "0"


def max_bytes() -> int:
    text = os.environ.get(MAX_GIB_ENV, "")
    try:
        gib = float(text) if text else DEFAULT_MAX_GIB
        if not 0 < gib < 2**40:
            raise ValueError
    except ValueError:
        warn_once(f"weight cache size: {MAX_GIB_ENV}={text!r} is not a positive number of GiB; using {DEFAULT_MAX_GIB:g}")
        gib = DEFAULT_MAX_GIB
    return int(gib * 2**30)


def warn_once(what: str) -> None:
    """One line on stderr, once per process for each kind of problem."""
    kind = what.split(":", 1)[0]
    if kind not in _warned:
        _warned.add(kind)
        print(f"edgebox: warning: {what}", file=sys.stderr, flush=True)


# -- the key -----------------------------------------------------------------------------------


def layout_digest() -> str:
    """A hash of the sources that define the packed layouts."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for path in [here / "matmul.py", here / "matmul_pack.py", *sorted((here / "quants").glob("*.py"))]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def entry_key(identity: FileIdentity, split: bytes) -> bytes:
    """The 32-byte key of the entry of one model file on one chip split."""
    file = f"{identity.size}:{identity.mtime_ns}:{identity.header_sha256}".encode()  # not the path: a moved file keeps its entry
    h = hashlib.sha256()
    for part in (f"{FORMAT}:{LAYOUT_VERSION}:{layout_digest()}:{sys.byteorder}".encode(), file, split):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def entry_path(directory: Path, key: bytes) -> Path:
    return directory / f"packed-{key.hex()[:32]}{SUFFIX}"


# -- checksums ---------------------------------------------------------------------------------


def _sample_crc(n: int, read: Callable[[int, int], bytes | memoryview]) -> int:
    """crc32 of an array's first, middle and last SAMPLE bytes (all ``n`` of them when n <= 3
    SAMPLE), each span got by ``read(start, end)``."""
    if n <= 3 * SAMPLE:
        return zlib.crc32(read(0, n))
    mid = (n // 2) // SAMPLE * SAMPLE
    crc = 0
    for start in (0, mid, n - SAMPLE):
        crc = zlib.crc32(read(start, start + SAMPLE), crc)
    return crc


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


# -- reading -----------------------------------------------------------------------------------


class Entry:
    """A verified entry, mapped: ``get(name, qtype, n_out, n_in)`` -> PackedWeight over its pages."""

    def __init__(self, path: Path, mm: mmap.mmap, weights: dict[str, dict]):
        self.path = path
        self._mm = mm
        self._buf = np.frombuffer(mm, dtype=np.uint8)  # writable (copy-on-write): the kernels' array types
        self.weights = weights

    @classmethod
    def open(cls, path: Path, key: bytes, full: bool | None = None) -> Entry:
        """Map and verify the entry at ``path``; FileNotFoundError if there is none, CorruptEntry
        if any check fails (module docstring: what is checked)."""
        if full is None:
            full = os.environ.get("EDGEBOX_WEIGHT_CACHE_VERIFY", "").lower() == "full"
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER:
                raise CorruptEntry(f"{size} bytes, shorter than the header")
            head = f.read(HEADER)
            magic, fmt, _, rec_size, t_off, t_len, rec_key, t_crc = _HEAD.unpack_from(head)
            if magic != MAGIC:
                raise CorruptEntry("bad magic")
            if fmt != FORMAT:
                raise CorruptEntry(f"format {fmt}, expected {FORMAT}")
            (h_crc,) = struct.unpack_from("<I", head, _HEAD.size)
            if zlib.crc32(head[: _HEAD.size]) != h_crc:
                raise CorruptEntry("header checksum mismatch")
            if rec_key != key:
                raise CorruptEntry("key mismatch")
            if rec_size != size:
                raise CorruptEntry(f"{size} bytes, the header says {rec_size} (truncated or torn)")
            if not HEADER <= t_off <= size or t_off + t_len != size:
                raise CorruptEntry("table outside the file")
            table = os.pread(f.fileno(), t_len, t_off)
            if zlib.crc32(table) != t_crc:
                raise CorruptEntry("table checksum mismatch")
            try:
                weights = {w["name"]: w for w in json.loads(table)["weights"]}
            except (ValueError, KeyError, TypeError) as e:
                raise CorruptEntry(f"table does not parse: {e}") from None
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            # (on a failed check the mapping is unmapped when its last view is collected)
            entry = cls(path, mm, weights)
            entry._verify(f.fileno(), t_off, full)
        return entry

    def _verify(self, fd: int, data_end: int, full: bool) -> None:
        """The table's arrays inside the data region, their samples' checksums (and with ``full``
        every byte's).  The samples are read with pread, not through the mapping: a touch maps
        the whole 2 MiB folio around it (Linux 6.x large folios), so the background writer's
        check of a 7B entry mapped 0.3-2 GiB, a peak RSS of its own."""
        try:
            for w in self.weights.values():
                QType(w["qtype"])
                for a in w["arrays"]:
                    off, nbytes = a["offset"], a["nbytes"]
                    if off < HEADER or off % 64 or off + nbytes > data_end or np.dtype(a["dtype"]).itemsize * a["size"] != nbytes:
                        raise CorruptEntry(f"{w['name']}.{a['name']}: array outside the data region")
                    if _sample_crc(nbytes, lambda s, e, off=off: os.pread(fd, e - s, off + s)) != a["sample_crc"]:
                        raise CorruptEntry(f"{w['name']}.{a['name']}: sample checksum mismatch")
                    if full and zlib.crc32(memoryview(self._buf[off : off + nbytes])) != a["crc"]:
                        raise CorruptEntry(f"{w['name']}.{a['name']}: checksum mismatch")
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptEntry(f"table entry malformed: {e!r}") from None

    def get(self, name: str, qtype, n_out: int, n_in: int) -> PackedWeight | None:
        w = self.weights.get(name)
        if w is None or w["qtype"] != int(qtype) or w["n_out"] != n_out or w["n_in"] != n_in:
            return None
        arrays = {a["name"]: self._buf[a["offset"] : a["offset"] + a["nbytes"]].view(np.dtype(a["dtype"])) for a in w["arrays"]}
        return PackedWeight(QType(w["qtype"]), n_out, n_in, w["path"], arrays, w["nbytes"])


# -- writing -----------------------------------------------------------------------------------


def _layout(weights: list[tuple[str, PackedWeight]]) -> tuple[list[dict], int]:
    table, off = [], HEADER
    for name, pw in weights:
        arrays = []
        for an, arr in pw.arrays.items():
            nbytes = int(arr.nbytes)
            arrays.append({"name": an, "dtype": arr.dtype.str, "size": int(arr.size), "offset": off, "nbytes": nbytes})
            off = -(-(off + nbytes) // ALIGN) * ALIGN
        table.append(
            {
                "name": name,
                "qtype": int(pw.qtype),
                "n_out": pw.n_out,
                "n_in": pw.n_in,
                "path": pw.path,
                "nbytes": pw.nbytes,
                "arrays": arrays,
            }
        )
    return table, off


def write_entry(path: Path, key: bytes, weights: list[tuple[str, PackedWeight]]) -> None:
    """Write the entry for ``weights`` atomically at ``path`` (OSError when it cannot be)."""
    table, data_end = _layout(weights)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".packed-", suffix=".tmp")
    try:
        try:
            os.posix_fallocate(fd, 0, data_end)  # a full disk fails here, before anything is written
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(b"\0" * HEADER)
            for (_, pw), entry in zip(weights, table):
                for a in entry["arrays"]:
                    b = _bytes(pw.arrays[a["name"]])
                    pad = a["offset"] - f.tell()
                    if pad:
                        f.write(b"\0" * pad)
                    f.write(b)
                    a["crc"], a["sample_crc"] = zlib.crc32(b), _sample_crc(len(b), lambda s, e, b=b: b[s:e])
            pad = data_end - f.tell()
            if pad:
                f.write(b"\0" * pad)
            blob = json.dumps({"weights": table}, separators=(",", ":")).encode()
            f.write(blob)
            size = data_end + len(blob)
            head = _HEAD.pack(MAGIC, FORMAT, 0, size, data_end, len(blob), key, zlib.crc32(blob))
            f.seek(0)
            f.write(head + struct.pack("<I", zlib.crc32(head)))
            f.flush()
            os.ftruncate(fd, size)
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def evict(directory: Path, limit: int, incoming: int = 0, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used entries until they and ``incoming`` new bytes fit in
    ``limit``; also temp files left by a writer that died an hour ago.  Returns what was deleted."""
    now, entries, removed = time.time(), [], []
    try:
        listing = list(os.scandir(directory))
    except OSError:
        return removed
    for e in listing:
        try:
            st = e.stat()
        except OSError:
            continue
        if e.name.startswith((".packed-", ".recent-")) and e.name.endswith(".tmp"):
            if now - st.st_mtime > STALE_TEMP_S:
                try:
                    os.unlink(e.path)
                    removed.append(Path(e.path))
                except OSError:
                    pass
        elif e.name.startswith("packed-") and e.name.endswith(SUFFIX) and Path(e.path) != keep:
            entries.append((st.st_mtime_ns, st.st_size, Path(e.path)))
    total = sum(s for _, s, _ in entries) + incoming
    for _, size, p in sorted(entries):
        if total <= limit:
            break
        try:
            os.unlink(p)
            removed.append(p)
            total -= size
        except OSError:
            pass
    return removed


# -- one load's use of the cache ---------------------------------------------------------------


class PackCache:
    """One model load's access to its entry: the linears ask ``lookup(matrix)`` before packing
    and report what they packed with ``add(matrix, packed)``; ``finish()`` then writes the entry
    if anything was packed (and maps the new file in place of the packed copies in memory).

    Only quantized weights are cached (float weights are read in place from the GGUF)."""

    def __init__(self, directory: Path, key: bytes, limit: int | None = None, model: tuple[str, int] | None = None):
        self.directory = directory
        self.key = key
        self.path = entry_path(directory, key)
        self.limit = max_bytes() if limit is None else limit
        self.entry: Entry | None = None
        self.served: list[tuple[str, PackedWeight]] = []
        self.hits = self.misses = 0
        self.status = "miss"
        self._writer: threading.Thread | None = None
        self._after: threading.Event | None = None  # what a background write waits for
        self.model = model  # the GGUF's path and the chip count, when known (``for_model``): the hint's key
        if self.path.exists():
            # the whole entry read into the page cache in the background, so the checks' samples
            # and the first forward pass find its pages there: after a reboot they faulted them
            # in one by one (a 4-chip 7B entry: 3 s of checks, then 2.5 s of first forward pass)
            entry_hint.read_ahead_once(self.path, entry=True)  # (unless the CLI's hint started it already)
        try:
            self.entry = Entry.open(self.path, key)
            self.status = "hit"
        except FileNotFoundError:
            pass
        except CorruptEntry as e:
            self.status = f"discarded ({e})"
            try:
                os.unlink(self.path)
            except OSError:
                pass
        except OSError as e:
            self.status = f"unreadable ({e.strerror})"
        if self.entry is not None:
            try:
                os.utime(self.path)  # most recently used
            except OSError:
                pass

    @classmethod
    def for_model(
        cls, views: list[np.ndarray], split: bytes, in_place: Sequence[np.ndarray] = (), chips: int = 1
    ) -> PackCache | None:
        """The cache of the GGUF file the weight views ``views`` were cut from (the parsed file
        tells its identity: ``gguf.file.identity_of``), on the chip split ``split`` over
        ``chips`` chips; None when the cache is off or the views are not all from one GGUF file.
        On a miss the file's pages leave the page cache as they are packed, except those of the
        tensors ``in_place`` (read in place by the model as well).  The entry it maps or writes
        is remembered for the next start's early read (``entry_hint``)."""
        if not enabled():
            return None
        identities = {identity_of(v) for v in views}
        if len(identities) != 1 or None in identities:
            return None
        identity = identities.pop()
        cache = cls(cache_dir(), entry_key(identity, split), model=(identity.path, chips))
        if cache.entry is not None:
            entry_hint.remember(identity.path, chips, cache.path)
        else:  # the weights are packed from the GGUF: have it read ahead of the packer,
            entry_hint.read_ahead_once(identity.path)
            evict_when_released(views[0], keep=in_place)  # and its pages dropped as they are packed (the entry keeps them)
        return cache

    def lookup(self, m) -> PackedWeight | None:
        if not is_quantized(m.qtype):
            return None
        pw = self.entry.get(m.name, m.qtype, m.n_out, m.n_in) if self.entry is not None else None
        if pw is not None:
            self.hits += 1
            self.served.append((m.name, pw))
        return pw

    def add(self, m, packed: PackedWeight) -> None:
        if packed.path != "float":
            self.misses += 1
            self.served.append((m.name, packed))

    def finish(self, background: bool = False, after: threading.Event | None = None) -> None:
        """Write the entry when something was packed now.  In the foreground the packed copies
        in memory are then replaced by the new file's pages; in the ``background`` (a thread the
        interpreter waits for at exit; ``wait()`` joins it) they stay in use, so the first token
        does not wait for the disk.  A background write starts once ``after`` is set (the box's
        first forward pass: copying and checksumming 3+ GB beside that pass made the first token
        ~0.8 s later on 2 cores) or ``AFTER_WAIT_S`` have passed.  A failure to write costs one
        warning line."""
        if not self.misses or self._writer is not None:
            return
        weights = list({name: pw for name, pw in self.served}.items())
        if background:
            self.status = "writing"
            self._writer = threading.Thread(
                target=self._write, args=(weights, False, after), name="edgebox-pack-cache-writer", daemon=True
            )
            self._after = after
            atexit.register(self.wait)  # a process that ends before any forward pass writes it then
            self._writer.start()
        else:
            self._write(weights, True)

    def wait(self) -> None:
        """Start a background write (``finish(background=True)``) now if it still waits, and
        wait for it to end."""
        if self._after is not None:
            self._after.set()
        if self._writer is not None:
            self._writer.join()

    def _write(self, weights: list[tuple[str, PackedWeight]], rebind: bool, after: threading.Event | None = None) -> None:
        if after is not None:
            after.wait(AFTER_WAIT_S)
        try:
            self._write_now(weights, rebind)
        finally:
            if not rebind:  # (atexit would otherwise keep this cache, and every packed array, alive)
                atexit.unregister(self.wait)

    def _write_now(self, weights: list[tuple[str, PackedWeight]], rebind: bool) -> None:
        if not rebind:  # the background writer: at the lowest CPU priority (Linux nice is per thread),
            try:  # so checksumming and copying 3+ GB do not slow the first tokens it runs beside
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (OSError, AttributeError):
                pass
        evict(self.directory, self.limit, _layout(weights)[1])
        try:
            write_entry(self.path, self.key, weights)
            entry = Entry.open(self.path, self.key, full=False)
        except (OSError, CorruptEntry) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            warn_once(f"weight cache: cannot write {self.directory} ({reason}); the weights are packed in memory at every start")
            self.status = f"unwritable ({reason})"
            return
        if rebind:
            for name, pw in self.served:  # (a KV head replicated on two chips: two copies, one name)
                mapped = entry.get(name, pw.qtype, pw.n_out, pw.n_in)
                pw.arrays.update(mapped.arrays)  # the packed copy is freed; the kernels read the file's pages
            self.entry = entry
        self.status = "written"
        if self.model is not None:
            entry_hint.remember(*self.model, self.path)
