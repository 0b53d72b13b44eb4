"""Weight handles: a matrix prepared once for one backend; calling one computes ``x @ W.T``.

``RefLinear`` (the numpy reference), ``NumbaLinear`` (the numba kernels), ``OrtLinear``
(onnxruntime, from ``kernels.ort``) and ``AutoLinear`` (numba or onnxruntime per batch bucket, as
``backend.AutoOps`` planned it).  Each has ``matrix``, ``n_out``, ``n_in``, ``nbytes``,
``prepare()`` and ``__call__(x [T, n_in]) -> [T, n_out]``; nothing is built at construction, so
mapping a model stays instant and costs no memory until it runs.

``prepare(cache=...)`` takes a packed-weight cache (``kernels.packcache.PackCache``: ``lookup(m)``
-> PackedWeight or None, ``add(m, packed)``); ``prepare_linear(lin, cache)`` passes it to a handle
that packs for the numba kernels and prepares any other handle as it is.
"""

from __future__ import annotations

import numpy as np

from edgebox.gguf.file import release_view_pages, unmap_view_pages
from edgebox.gguf.loader import Matrix
from edgebox.kernels import matmul, ref
from edgebox.kernels.ort import OrtLinear

__all__ = ["RefLinear", "NumbaLinear", "OrtLinear", "AutoLinear", "prepare_linear"]


class RefLinear:
    """x @ W.T through the numpy reference (dequantizes row chunks per call: slow, exact)."""

    def __init__(self, m: Matrix):
        self.matrix = m
        self.n_out, self.n_in = m.n_out, m.n_in
        self.nbytes = m.nbytes

    def prepare(self, cache=None) -> None:
        """Nothing to prepare: the reference reads the file's rows as they are."""

    def __call__(self, x: np.ndarray) -> np.ndarray:  # [T, n_in] -> [T, n_out]
        return ref.matmul(np.ascontiguousarray(x, dtype=np.float32), self.matrix.data, self.matrix.qtype)


class NumbaLinear:
    """x @ W.T through the numba kernels. The weight is repacked once, by ``prepare()`` (the
    engine's warm-up and the CLI call it with a progress line) or else at its first use, never at
    ``edgebox.load``: mapping a model stays instant and costs no memory until it runs."""

    def __init__(self, m: Matrix):
        self.matrix = m
        self.n_out, self.n_in = m.n_out, m.n_in
        self.nbytes = m.nbytes
        self.packed = None
        self.from_cache = False  # the packed arrays are a cache entry's pages (the rows were not read)

    def prepare(self, release: bool = True, cache=None) -> None:
        """Repack once (or take the packed arrays from ``cache``); then drop the pages under the
        rows (``release=False`` keeps them, for a caller that builds a second copy from the same
        rows).  The rows are not read at all when the cache has the weight.  Either way the rows
        leave this process's mapping run by run as they are repacked (``unmap_view_pages``: RSS
        only, the page cache keeps them for a second copy)."""
        if self.packed is None:
            m = self.matrix
            packed = cache.lookup(m) if cache is not None else None
            if packed is not None:
                self.packed, self.from_cache = packed, True
                return
            self.packed = matmul.pack_rows(m.row_blocks, m.qtype, trim=unmap_view_pages)
            if cache is not None:
                cache.add(m, self.packed)
            if release and self.packed.path != "float":  # float weights are read in place: keep their pages
                release_rows(m)

    def __call__(self, x: np.ndarray) -> np.ndarray:  # [T, n_in] -> [T, n_out]
        if self.packed is None:
            self.prepare()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == 1:
            return matmul.matvec(self.packed, x[0])[None]
        return matmul.matmul(self.packed, x)


class AutoLinear:
    """A weight on the backend(s) its planner chose for its shape, chosen per call by the batch
    bucket of ``len(x)``.  Nothing is built until ``prepare()`` (or the first call).

    ``planner`` (``backend.AutoOps``) gives ``choice(linear)`` (an ``autotune.Choice``: backend
    name per bucket), ``bucket_of(T)`` and ``threads`` (each ORT session's intra-op threads)."""

    def __init__(self, m: Matrix, planner):
        self.matrix = m
        self.n_out, self.n_in = m.n_out, m.n_in
        self.nbytes = m.nbytes
        self._planner = planner
        self.by_bucket: dict[str, object] | None = None  # bucket -> NumbaLinear | OrtLinear

    @property
    def backends(self) -> dict[str, str]:
        """bucket -> backend name (after prepare)."""
        return {b: ("onnxruntime" if isinstance(lin, OrtLinear) else "numba") for b, lin in (self.by_bucket or {}).items()}

    def prepare(self, cache=None) -> None:
        if self.by_bucket is not None:
            return
        choice = self._planner.choice(self)
        built = {}
        for name in sorted(choice.backends):
            if name == "onnxruntime":
                lin = OrtLinear(self.matrix, threads=self._planner.threads)
                lin.prepare(release=False)  # both copies of a dual shape are built from the rows
            else:
                lin = NumbaLinear(self.matrix)
                lin.prepare(release=False, cache=cache)
            built[name] = lin
        numba = built.get("numba")
        if numba is None or (numba.packed.path != "float" and (not numba.from_cache or len(built) > 1)):
            release_rows(self.matrix)  # as each backend's own prepare() does (rows read)
        self.by_bucket = {b: built[name] for b, name in choice.by_bucket.items()}

    def for_tokens(self, T: int):
        """The backend linear that serves a call of T tokens (prepared)."""
        if self.by_bucket is None:
            self.prepare()
        return self.by_bucket[self._planner.bucket_of(T)]

    def __call__(self, x: np.ndarray) -> np.ndarray:  # [T, n_in] -> [T, n_out]
        return self.for_tokens(len(x))(x)


def release_rows(m) -> None:
    """Drop the file pages under a weight's rows (``release_view_pages``), block by block: a
    stacked weight's rows are never concatenated just to be released."""
    for rows in m.row_blocks:
        release_view_pages(rows)


def prepare_linear(lin, cache=None) -> None:
    """``lin.prepare()``, with the packed-weight cache for the handles that pack for numba."""
    if cache is not None and isinstance(lin, (NumbaLinear, AutoLinear)):
        lin.prepare(cache=cache)
    else:
        lin.prepare()
