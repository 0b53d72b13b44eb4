"""Read a GGUF file's header, metadata and tensor table; map the tensor data without copying.

Why not ``gguf.GGUFReader``: it builds a numpy view for every part of every metadata string, which
costs seconds and hundreds of MB on a 100k-token vocabulary. Here string arrays are decoded in one
pass over a ``memoryview`` and numeric arrays in bulk with ``np.frombuffer``. The constants (value
types, tensor types, block sizes) still come from gguf-py.

Every count and length read from the file is checked against the bytes that are left before it is
used, so a truncated or hostile file fails fast with one clear line instead of a hang or a
MemoryError: only a regular file is opened (a FIFO would block), arrays nest at most
``MAX_ARRAY_DEPTH`` deep, a key appears once, every metadata value edgebox reads has the kind
``gguf.metadata.TABLE`` gives it, tensor sizes are computed with Python integers (no int64
wrap-around) and tensor offsets are multiples of ``general.alignment``, as llama.cpp requires.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import math
import mmap
import os
import stat
import struct
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from edgebox.errors import ModelError
from edgebox.gguf import metadata, page_cache

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name is at most 63 bytes
MAX_ARRAY_DEPTH = 8  # llama.cpp reads no nested arrays at all; edgebox reads none either
MAX_ELEMENTS = 2**63  # llama.cpp's limit: a tensor's element count must fit an int64

_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _shown(name: str) -> str:
    """A key or tensor name for a one-line message (a hostile one can be megabytes long)."""
    return repr(name[:80]) + ("..." if len(name) > 80 else "")


# Fixed-size scalar value types: struct format and numpy dtype (GGUF is little-endian).
_SCALARS: dict[GGUFValueType, tuple[str, str]] = {
    GGUFValueType.UINT8: ("<B", "<u1"),
    GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"),
    GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"),
    GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"),
    GGUFValueType.BOOL: ("<?", "<u1"),
    GGUFValueType.UINT64: ("<Q", "<u8"),
    GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}


@dataclass(frozen=True)
class FileIdentity:
    """What identifies a GGUF file's contents without reading its tensors, as of when it was
    opened: its size, its modification time and a SHA-256 of its header and tensor table (the
    bytes before the tensor data).  A rewrite changes the mtime even when the bytes are the same
    (the identity then changes too: it errs on the side of a new identity, never a stale one)."""

    path: str
    size: int
    mtime_ns: int
    header_sha256: str


class _Mapping(mmap.mmap):
    """The file's mapping, which knows whose it is: every tensor view's buffer chain ends here,
    so ``identity_of(view)`` can name the file a view came from (``identity`` is set by
    ``GGUFFile`` once the header is parsed, and hashed on first use)."""

    source: tuple[str, int, int, int] | None = None  # path, size, mtime_ns, end of the tensor table
    spans: tuple[tuple[int, int], ...] = ()  # (offset, nbytes) of each tensor, by offset
    evictor: _Evictor | None = None  # set by ``evict_when_released``
    _identity: FileIdentity | None = None

    @property
    def identity(self) -> FileIdentity | None:
        if self._identity is None and self.source is not None:
            path, size, mtime_ns, header_end = self.source
            digest = hashlib.sha256(memoryview(self)[:header_end]).hexdigest()
            self._identity = FileIdentity(path, size, mtime_ns, digest)
        return self._identity


def identity_of(view: np.ndarray) -> FileIdentity | None:
    """The identity of the GGUF file ``view`` (a tensor's data, or any view cut from it) maps;
    None for an array that is not a view of a ``GGUFFile``."""
    mapping = _mapping_of(view)
    return mapping.identity if mapping is not None else None


def _mapping_of(view: np.ndarray) -> _Mapping | None:
    base = view
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, _Mapping) else None


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table.

    ``shape`` is in numpy (row-major) order: a GGUF matrix stored as ne=[n_in, n_out] has
    shape (n_out, n_in). ``data`` is a uint8 view [n_rows, row_bytes] into the file's mmap.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int
    data: np.ndarray  # uint8 [prod(shape[:-1]), row_bytes], a view into the mmap

    @property
    def n_values(self) -> int:
        return math.prod(self.shape)


class GGUFFile:
    """A parsed GGUF file: ``fields`` (key -> plain Python value) and ``tensors`` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fields: dict[str, object] = {}
        self.field_types: dict[str, GGUFValueType] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ModelError(f"cannot open model file {self.path}: {e.strerror}") from None
        except ValueError as e:  # a NUL byte or a lone surrogate in the path
            raise ModelError(f"cannot open model file {os.fspath(self.path)!r}: {e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
                raise ModelError(f"{self.path} is {kind}, not a GGUF model file; name the .gguf file itself")
            self.file_size = st.st_size
            if self.file_size < 24:
                raise ModelError(f"{self.path.name} is not a GGUF file ({self.file_size} bytes, too short for a header)")
            self._mmap = _Mapping(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._buf = memoryview(self._mmap)
        self._pos = 0
        self._parse()
        self._mmap.source = (os.path.abspath(self.path), st.st_size, st.st_mtime_ns, min(self.data_offset, self.file_size))
        self._mmap.spans = tuple(sorted((t.offset, t.nbytes) for t in self.tensors.values()))
        self._read_small_tensors_ahead()

    def _read_small_tensors_ahead(self) -> None:
        """Queue the reads of the small tensors (norms, biases) now, page-exact, and keep the
        mapping's read-around off their pages.  Why: read in place, each is first touched inside
        a forward pass, and a fault on a mapping reads a read-around window about it (8 MiB on a
        disk with read_ahead_kb 8192): after a reboot a warm 7B start's 61 norms read 0.5 GB and
        took 0.5 s of its first token (docs/performance.md, "Start-up, third pass")."""
        if not hasattr(self._mmap, "madvise"):
            return
        for t in self.tensors.values():
            if 0 < t.nbytes <= SMALL_TENSOR_BYTES:
                start = t.offset // _PAGE * _PAGE
                try:
                    self._mmap.madvise(mmap.MADV_RANDOM, start, t.offset + t.nbytes - start)
                    self._mmap.madvise(mmap.MADV_WILLNEED, start, t.offset + t.nbytes - start)
                except (OSError, AttributeError):  # a kernel or libc without them: only slower
                    return

    @property
    def identity(self) -> FileIdentity:
        """The file's identity (``FileIdentity``), from the stat taken when it was opened."""
        return self._mmap.identity

    # -- cursor over the header -------------------------------------------------------------
    def _fail(self, what: str) -> ModelError:
        return ModelError(
            f"{self.path.name}: {what} (file is {self.file_size} bytes); the file is broken or not a GGUF model, re-download or re-convert it"
        )

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._pos + n > self.file_size:
            raise self._fail(f"truncated header: {what} needs {n} bytes at offset {self._pos}")

    def _scalar(self, vtype: GGUFValueType, what: str):
        fmt, _ = _SCALARS[vtype]
        size = struct.calcsize(fmt)
        self._need(size, what)
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return value

    def _u32(self, what: str) -> int:
        return self._scalar(GGUFValueType.UINT32, what)

    def _u64(self, what: str) -> int:
        return self._scalar(GGUFValueType.UINT64, what)

    def _string(self, what: str) -> str:
        n = self._u64(f"length of {what}")
        self._need(n, what)
        raw = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _value_type(self, key: str) -> GGUFValueType:
        code = self._u32(f"type of {_shown(key)}")
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self._fail(f"metadata {_shown(key)} has unknown value type {code}") from None

    def _value(self, vtype: GGUFValueType, key: str):
        if vtype == GGUFValueType.STRING:
            return self._string(f"value of {_shown(key)}")
        if vtype == GGUFValueType.ARRAY:
            return self._array(key, 1)
        return self._scalar(vtype, f"value of {_shown(key)}")

    def _array(self, key: str, depth: int):
        if depth > MAX_ARRAY_DEPTH:
            raise self._fail(f"metadata {_shown(key)} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        item_type = self._value_type(key)
        count = self._u64(f"array length of {_shown(key)}")
        remaining = self.file_size - self._pos
        if item_type == GGUFValueType.STRING:
            # each string takes at least its 8-byte length
            if count * 8 > remaining:
                raise self._fail(
                    f"truncated or corrupt header: metadata {_shown(key)} claims {count} strings, more than the file can hold"
                )
            return self._string_array(count, key)
        if item_type == GGUFValueType.ARRAY:
            if count * 12 > remaining:
                raise self._fail(
                    f"truncated or corrupt header: metadata {_shown(key)} claims {count} nested arrays, more than the file can hold"
                )
            return [self._array(key, depth + 1) for _ in range(count)]
        _, dtype = _SCALARS[item_type]
        nbytes = count * np.dtype(dtype).itemsize
        self._need(nbytes, f"array {_shown(key)} of {count} items")
        values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
        self._pos += nbytes
        if item_type == GGUFValueType.BOOL:
            return values.astype(bool)
        return values.astype(values.dtype.newbyteorder("="))

    def _string_array(self, count: int, key: str) -> list[str]:
        buf, pos, end = self._buf, self._pos, self.file_size
        unpack = struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > end:
                raise self._fail(f"truncated header: string array {_shown(key)}")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                raise self._fail(f"truncated header: string array {_shown(key)}")
            append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self._pos = pos
        return out

    # -- the three sections ------------------------------------------------------------------
    def _parse(self) -> None:
        magic = bytes(self._buf[0:4])
        if magic != GGUF_MAGIC:
            raise ModelError(
                f"{self.path.name} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); convert it with llama.cpp's convert_hf_to_gguf.py"
            )
        self._pos = 4
        self.version = self._u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            if self.version & 0xFFFF == 0 and (self.version >> 24) in SUPPORTED_VERSIONS:  # 3 written big-endian
                raise ModelError(f"{self.path.name} is a big-endian GGUF; edgebox reads little-endian files only")
            raise ModelError(
                f"{self.path.name} has GGUF version {self.version}; edgebox supports versions {', '.join(map(str, SUPPORTED_VERSIONS))} (re-convert with a current llama.cpp)"
            )
        n_tensors = self._u64("tensor count")
        n_kv = self._u64("metadata count")
        # Smallest possible entries: a KV is 8 (key len) + 4 (type) + 1 byte, a tensor info 8 + 4 + 4 + 8.
        if n_kv * 13 > self.file_size or n_tensors * 24 > self.file_size:
            raise self._fail(
                f"truncated or corrupt header: it claims {n_kv} metadata entries and {n_tensors} tensors, more than the file can hold"
            )

        for _ in range(n_kv):
            key = self._string("metadata key")
            if key in self.fields:
                raise self._fail(f"metadata key {_shown(key)} appears twice")
            vtype = self._value_type(key)
            self.fields[key] = self._value(vtype, key)
            self.field_types[key] = vtype
        metadata.check(self.fields, self.path.name)

        infos = [self._tensor_info() for _ in range(n_tensors)]

        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        data_start = (self._pos + alignment - 1) // alignment * alignment
        self.data_offset = data_start
        file_bytes = np.frombuffer(self._mmap, dtype=np.uint8)
        for name, qtype, shape, rel_offset in infos:
            if rel_offset % alignment:
                raise self._fail(
                    f"tensor {name!r} starts at data offset {rel_offset}, not a multiple of general.alignment {alignment}, as llama.cpp requires"
                )
            self.tensors[name] = self._tensor_view(file_bytes, name, qtype, shape, data_start + rel_offset)

    def _tensor_info(self):
        name = self._string("tensor name")
        if len(name.encode()) >= MAX_NAME:
            raise self._fail(f"tensor name {_shown(name)} is longer than {MAX_NAME - 1} bytes (llama.cpp's limit)")
        n_dims = self._u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS} allowed)")
        ne = [self._u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
        code = self._u32(f"type of tensor {name!r}")
        offset = self._u64(f"offset of tensor {name!r}")
        if any(d == 0 or d > 2**40 for d in ne) or math.prod(ne) >= MAX_ELEMENTS:
            raise self._fail(f"tensor {name!r} has absurd dimensions {ne}")
        try:
            qtype = GGMLQuantizationType(code)
        except ValueError:
            qtype = code  # unknown type: the model validator names it and the tensor
        return name, qtype, tuple(reversed(ne)), offset

    def _tensor_view(self, file_bytes: np.ndarray, name: str, qtype, shape: tuple[int, ...], offset: int):
        if name in self.tensors:
            raise self._fail(f"tensor {name!r} appears twice in the tensor table")
        if not isinstance(qtype, GGMLQuantizationType) or qtype not in GGML_QUANT_SIZES:
            # Kept as an opaque entry so the validator can say which tensor has which type.
            return TensorInfo(name, qtype, shape, offset, 0, np.empty((0, 0), np.uint8))
        block, type_size = GGML_QUANT_SIZES[qtype]
        row_len = shape[-1]
        if row_len % block:
            raise self._fail(f"tensor {name!r} rows of {row_len} values are not whole {qtype.name} blocks of {block}")
        row_bytes = row_len // block * type_size
        n_rows = math.prod(shape[:-1])  # Python integers: a product of four dimensions cannot wrap
        nbytes = n_rows * row_bytes
        if offset + nbytes > self.file_size:
            raise self._fail(f"truncated data: tensor {name!r} ends at byte {offset + nbytes}")
        data = file_bytes[offset : offset + nbytes].reshape(n_rows, row_bytes)
        return TensorInfo(name, qtype, shape, offset, nbytes, data)


_PAGE = mmap.PAGESIZE
SMALL_TENSOR_BYTES = 1 << 20  # read ahead at open and never read around (``_read_small_tensors_ahead``)


def release_view_pages(view: np.ndarray) -> None:
    """Drop the resident pages under a view of a file mapping (after the kernels repacked it).

    The pages stay in the page cache (unless ``evict_when_released`` was called for the file) and
    fault back in if touched, so this only trims RSS: without it, a model repacked at load would
    briefly hold both the file's pages and the packed copy."""
    if view.size == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start, first, last = _view_pages(view)
    _unmap(first, last)
    mapping = _mapping_of(view)
    if mapping is not None and mapping.evictor is not None:
        mapping.evictor.released(view, start, first, last)


def unmap_view_pages(view: np.ndarray) -> None:
    """Drop this process's mapping of the whole pages under a view of a GGUF file's mapping, as
    the kernels repack it run by run (``matmul.Trim``): RSS only; the pages stay in the page
    cache, and ``release_view_pages`` still releases the whole view.  A no-op for a view of any
    other memory (``MADV_DONTNEED`` would zero anonymous pages)."""
    if view.size and hasattr(mmap, "MADV_DONTNEED") and _mapping_of(view) is not None:
        _unmap(*_view_pages(view)[1:])


def _view_pages(view: np.ndarray) -> tuple[int, int, int]:
    """(the view's first byte's address, first, last): the whole pages under the view."""
    start = view.__array_interface__["data"][0]
    end = start + sum((n - 1) * st for n, st in zip(view.shape, view.strides)) + view.itemsize
    return (start, *_whole_pages(start, end))


def _whole_pages(start: int, end: int) -> tuple[int, int]:
    """The addresses first..last of the whole pages inside start..end (last <= first: none)."""
    return -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE


def _unmap(first: int, last: int) -> None:
    """Drop this process's mapping of the pages first..last (``MADV_DONTNEED``); they fault back
    in from the file if touched."""
    if last > first:
        page_cache.libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def evict_when_released(view: np.ndarray, keep: Sequence[np.ndarray] = ()) -> bool:
    """From now on, ``release_view_pages`` on views of the GGUF file ``view`` maps also drops
    their pages from the page cache (``posix_fadvise(DONTNEED)``), except the tensors of the
    views ``keep`` (read in place as well: the token embeddings): for a load whose packed
    copies will be kept elsewhere (the packed-weight cache), so the file's pages are not needed
    again.  Why: the packed arrays are allocated as the file is read, and the pages the file
    frees are the cheapest memory to give them (on a VM whose free memory goes back to the
    host, a page not used lately costs a host fault at first touch: a cold 7B start with the
    file in the page cache reached its first token in 9.6-13.6 s before, 5.0-7.5 s with this;
    docs/performance.md, "Start-up, fifth look").  False when the file at the mapped path is no
    longer the one mapped, or the view is not a GGUF file's."""
    mapping = _mapping_of(view)
    if mapping is None or mapping.source is None or not hasattr(os, "posix_fadvise"):
        return False
    if mapping.evictor is None:
        path, size, mtime_ns, _ = mapping.source
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            os.close(fd)
            return False
        mapping.evictor = _Evictor(fd, np.frombuffer(mapping, np.uint8).__array_interface__["data"][0], mapping.spans)
        weakref.finalize(mapping, os.close, fd)
    for v in keep:
        mapping.evictor.keep(v)
    return True


class _Evictor:
    """Drops a mapped file's pages from the page cache as its views are released: a contiguous
    view's whole pages at once; a tensor's whole span once views covering all its bytes were
    released (a strided shard -- columns of every row -- shares its pages with the other chips'
    shards, so its pages go with the tensor's last shard)."""

    def __init__(self, fd: int, base: int, spans: tuple[tuple[int, int], ...]):
        self.fd, self.base, self.spans = fd, base, spans
        self.starts = [off for off, _ in spans]
        self.left = dict(spans)  # tensor offset -> bytes not released yet
        self.seen: set[tuple] = set()
        self.lock = threading.Lock()

    def _tensor(self, start: int) -> tuple[int, int] | None:
        """(offset, nbytes) of the tensor holding the address ``start``."""
        i = bisect.bisect_right(self.starts, start - self.base) - 1
        if i < 0 or start - self.base >= self.spans[i][0] + self.spans[i][1]:
            return None
        return self.spans[i]

    def keep(self, view: np.ndarray) -> None:
        tensor = self._tensor(view.__array_interface__["data"][0])
        if tensor is not None:
            self.left.pop(tensor[0], None)

    def released(self, view: np.ndarray, start: int, first: int, last: int) -> None:
        with self.lock:
            key = (start, view.shape, view.strides)
            tensor = self._tensor(start)
            if key in self.seen or tensor is None or tensor[0] not in self.left:
                return  # (a view released twice -- a KV head's rows on two chips --, or a kept tensor)
            self.seen.add(key)
            if view.flags.c_contiguous:
                self._drop(first, last)
            off, nbytes = tensor
            self.left[off] -= view.nbytes
            if self.left[off] <= 0:
                first, last = _whole_pages(self.base + off, self.base + off + nbytes)
                _unmap(first, last)  # (the pages two shards share were still mapped: fadvise skips mapped pages)
                self._drop(first, last)

    def _drop(self, first: int, last: int) -> None:
        if last > first:
            try:
                os.posix_fadvise(self.fd, first - self.base, last - first, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass


def resident_fraction(path: str | os.PathLike, offset: int = 0, length: int | None = None) -> float:
    """The share of the file's pages (of bytes offset..offset+length, default all) in the page
    cache (mincore over a mapping of it); nan where mincore fails."""
    size = os.path.getsize(path)
    end = size if length is None else min(size, offset + length)
    first = offset // _PAGE * _PAGE
    if end <= first:
        return 1.0
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mm, dtype=np.uint8)
    try:
        resident = page_cache.resident_pages(view.__array_interface__["data"][0] + first, end - first)
        return float("nan") if resident < 0 else resident / -(-(end - first) // _PAGE)
    finally:
        del view
        mm.close()


def read_fields(path: str | os.PathLike) -> dict[str, object]:
    """Metadata of a GGUF file as plain Python values (strings, numbers, lists/arrays)."""
    return GGUFFile(path).fields
