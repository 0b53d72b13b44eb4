"""Which backend runs each matmul: numba or onnxruntime, measured on this CPU, cached on disk.

Measured: one weight per distinct (qtype, n_out, n_in) shape, at one T per bucket of call rows
(``BUCKETS``, timed at ``BUCKET_T``), numba and onnxruntime alternating call by call (``REPS``
each, median) so a neighbour's burst hits both; weights over ``TUNE_BYTES`` are timed on their
first rows. Types ORT cannot compute exactly or runs only unpacked (``ort.runs_well``) stay on
numba, untimed.

The table is cached as ``autotune-<key>.json`` in ``$EDGEBOX_CACHE_DIR`` or ``~/.cache/edgebox``;
the key hashes everything that changes the timings (``cache_fields``: CPU, threads, library
versions, ORT accuracy level, the kernels' source). Only shapes missing from it are measured; a
file that does not parse or match its key is rewritten. Each entry records its load average (a
loaded machine favours ORT); delete the file to measure again.

The memory rule: peak RSS stays under file + KV + 15%, and ORT's prepacked copy is larger than
numba's (``ort.resident_bytes``), so:
1. every linear holds ONE backend's copy, chosen per shape by decode-weighted cost (``SHARE`` of
   seconds per token over the buckets), switching from numba only on a ``MARGIN`` win;
2. ORT's extra bytes, summed over the shapes that choose it, fit ``BUDGET_FRACTION`` of the
   model's linear-weight bytes; shapes are admitted by time saved per extra byte, best first;
3. both copies of a shape (each bucket to its fastest) only when that beats rule 1's pick and the
   second copy fits what is left of the budget.
``AutoOps.tune(linears)`` (Box.prepare) spends the budget over the whole model; a linear prepared
without it is tuned alone against 5% of its own bytes. Details: docs/performance.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from edgebox.gguf import quant_types as qt
from edgebox.gguf.loader import Matrix
from edgebox.gguf.quant_types import QType
from edgebox.kernels import ort
from edgebox.kernels.linear import NumbaLinear

NUMBA, ORT = "numba", "onnxruntime"
BUCKETS = ("1", "2-8", "9-64", ">64")
BUCKET_T = {"1": 1, "2-8": 4, "9-64": 32, ">64": 128}  # T timed for each bucket
SHARE = {"1": 0.5, "2-8": 0.3, "9-64": 0.1, ">64": 0.1}  # token mix of the cost, decode first
MARGIN = 0.03
BUDGET_FRACTION = 0.05
TUNE_BYTES = 32 * 2**20
REPS = 5
FORMAT = 1


def bucket_of(T: int) -> str:
    return "1" if T <= 1 else "2-8" if T <= 8 else "9-64" if T <= 64 else ">64"


def shape_key(qtype, n_out: int, n_in: int) -> str:
    return f"{QType(qtype).name}:{n_out}x{n_in}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernels_digest() -> str:
    """A hash of the matmul kernels' sources (the shared ones and every type's module):
    timings taken with other kernels are stale."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("matmul.py", "matmul_kernels.py", "matmul_pack.py", "matmul_simd.py", "ort.py"):
        h.update((here / name).read_bytes())
    for path in sorted((here / "quants").glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_fields(threads: int, accuracy_level: int = 4) -> dict:
    # the installed version from the package metadata, not ``import onnxruntime`` (0.36 s, and its
    # libraries read from disk after a reboot): a start whose plan is all numba never loads it
    from importlib.metadata import version

    return {
        "format": FORMAT,
        "cpu": cpu_model(),
        "threads": threads,
        "numba": numba.__version__,
        "onnxruntime": version("onnxruntime"),
        "accuracy_level": accuracy_level,
        "kernels": kernels_digest(),
    }


def cache_path(fields: dict, cache_dir: str | os.PathLike | None = None) -> Path:
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    base = Path(cache_dir or os.environ.get("EDGEBOX_CACHE_DIR") or Path.home() / ".cache" / "edgebox")
    return base / f"autotune-{key}.json"


@dataclass
class Choice:
    """The plan for one shape: which backend serves each bucket, and what it costs."""

    key: str
    by_bucket: dict[str, str]
    count: int
    extra_bytes: int = 0

    @property
    def backends(self) -> set[str]:
        return set(self.by_bucket.values())


class Tuner:
    """Measures (or reads from the cache) and plans. ``timer`` is the clock every timing reads
    (tests pass a counting one to prove a cached load times nothing)."""

    def __init__(
        self,
        threads: int | None = None,
        cache_dir=None,
        timer=time.perf_counter,
        reps: int = REPS,
        budget_fraction: float = BUDGET_FRACTION,
        accuracy_level: int = 4,
    ):
        self.threads = threads or ort.default_threads()
        self.timer = timer
        self.reps = reps
        self.budget_fraction = budget_fraction
        self.accuracy_level = accuracy_level
        self.fields = cache_fields(self.threads, accuracy_level)
        self.path = cache_path(self.fields, cache_dir)
        self.table: dict[str, dict] | None = None
        self.tune_seconds = 0.0  # wall time spent measuring in this process
        self._lock = threading.Lock()

    # -- the cache ---------------------------------------------------------------------------------
    def load(self) -> dict[str, dict]:
        if self.table is None:
            self.table = {}
            try:
                data = json.loads(self.path.read_text())
                if (
                    data.get("key") == self.fields
                    and isinstance(data.get("shapes"), dict)
                    and all(_valid_entry(e) for e in data["shapes"].values())
                ):
                    self.table = data["shapes"]
            except (OSError, ValueError, AttributeError, TypeError):
                pass  # missing or corrupt: measured again and rewritten
        return self.table

    def save(self) -> None:
        """Write the table (atomically: a concurrent reader sees the old file or the new one).
        An unwritable cache directory only costs the next load a new tune."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"key": self.fields, "shapes": self.table}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass

    # -- measuring ---------------------------------------------------------------------------------
    def measure(self, matrices, progress=None) -> dict[str, dict]:
        """The table entry of every distinct shape among ``matrices`` (measuring the missing
        ones on their first matrix, then rewriting the cache)."""
        with self._lock:
            table = self.load()
            todo: dict[str, Matrix] = {}
            for m in matrices:
                k = shape_key(m.qtype, m.n_out, m.n_in)
                if k not in table and k not in todo:
                    todo[k] = m
            if not todo:
                return table
            t0 = time.perf_counter()
            for i, (k, m) in enumerate(todo.items(), 1):
                table[k] = self._measure_one(m)
                if progress is not None:
                    progress(i, len(todo))
            self.tune_seconds += time.perf_counter() - t0
            self.save()
            return table

    def _measure_one(self, m: Matrix) -> dict:
        qtype = QType(m.qtype)
        entry = {"qtype": qtype.name, "n_out": m.n_out, "n_in": m.n_in, "file_bytes": int(m.nbytes)}
        if not ort.runs_well(qtype):
            entry.update(ort=False, fastest={b: NUMBA for b in BUCKETS})
            return entry
        rows = min(m.n_out, max(1, TUNE_BYTES // max(1, qt.row_bytes(qtype, m.n_in))))
        part = Matrix(m.name, m.qtype, rows, m.n_in, m.rows(rows) if isinstance(m, StackedMatrix) else m.data[:rows])
        numba_lin = NumbaLinear(part)
        ort_lin = ort.OrtLinear(part, threads=self.threads, accuracy_level=self.accuracy_level)
        numba_lin.prepare(release=False)  # the rows are the real weight's: its own prepare() drops them
        try:
            ort_lin.prepare(release=False)
        except Exception as e:  # an ORT that cannot build it (version, shape): numba only
            entry.update(ort=False, error=f"{type(e).__name__}: {e}"[:300], fastest={b: NUMBA for b in BUCKETS})
            return entry
        cands = {NUMBA: numba_lin, ORT: ort_lin}
        seconds = {NUMBA: {}, ORT: {}}
        saved = numba.get_num_threads()
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        try:
            rng = np.random.default_rng(0)
            for b in BUCKETS:
                x = rng.standard_normal((BUCKET_T[b], m.n_in)).astype(np.float32)
                times = {NUMBA: [], ORT: []}
                for lin in cands.values():
                    lin(x)  # warm-up (and JIT, first time)
                for r in range(self.reps):
                    for name in (NUMBA, ORT) if r % 2 == 0 else (ORT, NUMBA):
                        lin = cands[name]
                        t = self.timer()
                        lin(x)
                        times[name].append(self.timer() - t)
                for name in cands:
                    seconds[name][b] = statistics.median(times[name]) * m.n_out / rows
        finally:
            numba.set_num_threads(saved)
        entry.update(
            ort=True,
            rows_timed=rows,
            seconds=seconds,
            loadavg=os.getloadavg()[0],
            fastest={b: ORT if seconds[ORT][b] < seconds[NUMBA][b] else NUMBA for b in BUCKETS},
            bytes={
                NUMBA: int(numba_lin.packed.nbytes * m.n_out / rows),
                ORT: ort.resident_bytes(qtype, m.n_out, m.n_in, self.accuracy_level),
            },
        )
        return entry

    # -- planning ----------------------------------------------------------------------------------
    def plan(self, matrices, progress=None, model_bytes: int | None = None) -> dict[str, Choice]:
        """Shape key -> Choice for ``matrices`` under the memory rule (module docstring); the
        budget is BUDGET_FRACTION of ``model_bytes`` (default: the matrices' bytes)."""
        matrices = list(matrices)
        table = self.measure(matrices, progress)
        counts: dict[str, int] = {}
        for m in matrices:
            k = shape_key(m.qtype, m.n_out, m.n_in)
            counts[k] = counts.get(k, 0) + 1
        total = sum(int(m.nbytes) for m in matrices) if model_bytes is None else model_bytes
        return plan_shapes({k: table[k] for k in counts}, counts, self.budget_fraction * total)


@dataclass(frozen=True)
class StackedMatrix:
    """A run of same-type weights that a fused linear stacks into one matrix when it is prepared
    (``chips.chip.FusedLinear``): the shape the backend will see.  Its rows are only copied
    when the tuner times it."""

    parts: tuple

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    @property
    def qtype(self):
        return self.parts[0].qtype

    @property
    def n_out(self) -> int:
        return sum(p.n_out for p in self.parts)

    @property
    def n_in(self) -> int:
        return self.parts[0].n_in

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def rows(self, n: int) -> np.ndarray:
        """uint8 [n, row_bytes]: the first n rows of the stack (a copy)."""
        out, left = [], n
        for p in self.parts:
            if left <= 0:
                break
            out.append(p.data[:left])
            left -= len(out[-1])
        return np.concatenate(out)


def matrices_of(lin) -> list:
    """The weight matrices a linear hands to its backend: its ``matrix``, or, for a fused linear
    (``parts`` stacked per run of one type at prepare(), as chips.chip.FusedLinear does), one
    ``StackedMatrix`` per run (a run of one part is that part)."""
    if getattr(lin, "matrix", None) is not None:
        return [lin.matrix]
    out = []
    for _, group in itertools.groupby(getattr(lin, "parts", ()), key=lambda p: p.qtype):
        group = tuple(group)
        out.append(group[0] if len(group) == 1 else StackedMatrix(group))
    return out


def cost(seconds: dict[str, float], buckets=BUCKETS) -> float:
    """Decode-weighted seconds per token of one weight, over ``buckets``."""
    return sum(SHARE[b] * seconds[b] / BUCKET_T[b] for b in buckets)


def plan_shapes(entries: dict[str, dict], counts: dict[str, int], budget: float) -> dict[str, Choice]:
    """The memory rule as a pure function of the measured entries (tested on its own)."""
    plan = {k: Choice(k, {b: NUMBA for b in BUCKETS}, counts[k]) for k in entries}
    options = []  # (seconds per token saved over the model, extra bytes, key, by_bucket)
    for k, e in entries.items():
        if not e.get("ort"):
            continue
        s, nb, ob, c = e["seconds"], e["bytes"][NUMBA], e["bytes"][ORT], counts[k]
        base = cost(s[NUMBA])
        single = cost(s[ORT])
        if single < base * (1 - MARGIN):
            extra = c * max(0, ob - nb)
            options.append((c * (base - single), extra, k, {b: ORT for b in BUCKETS}))
        fastest = {b: ORT if s[ORT][b] < s[NUMBA][b] * (1 - MARGIN) else NUMBA for b in BUCKETS}
        if len(set(fastest.values())) == 2:
            dual = sum(SHARE[b] * s[fastest[b]][b] / BUCKET_T[b] for b in BUCKETS)
            if dual < min(base, single) * (1 - MARGIN):
                options.append((c * (base - dual), c * ob, k, fastest))
    # best time saved per extra byte first (free upgrades first of all)
    options.sort(key=lambda o: -(o[0] / o[1]) if o[1] else -float("inf"))
    left = budget
    gained: dict[str, float] = {}
    for gain, extra, k, by_bucket in options:
        prev = plan[k].extra_bytes
        if gain <= gained.get(k, 0.0) or extra - prev > left:
            continue
        left -= extra - prev
        gained[k] = gain
        plan[k] = Choice(k, by_bucket, counts[k], extra)
    return plan


def _valid_entry(e) -> bool:
    if not isinstance(e, dict) or not isinstance(e.get("fastest"), dict):
        return False
    if not e.get("ort"):
        return True
    try:
        return all(float(e["seconds"][n][b]) >= 0 for n in (NUMBA, ORT) for b in BUCKETS) and all(
            int(e["bytes"][n]) >= 0 for n in (NUMBA, ORT)
        )
    except (KeyError, TypeError, ValueError):
        return False


def describe(plan: dict[str, Choice], table: dict[str, dict]) -> list[str]:
    """One line per shape: per-bucket ms of both backends and the choice (for logs and reports)."""
    lines = []
    for k, ch in sorted(plan.items()):
        e = table.get(k, {})
        if not e.get("ort"):
            why = f"no prepacked onnxruntime kernel for {e.get('qtype', '?')}"
            lines.append(f"{k:22s} x{ch.count:<3d} numba only ({why})")
            continue
        s = e["seconds"]
        cells = " ".join(f"{b}:{s[NUMBA][b] * 1e3:.2f}/{s[ORT][b] * 1e3:.2f}" for b in BUCKETS)
        pick = "/".join(ch.by_bucket[b] for b in BUCKETS) if len(ch.backends) > 1 else ch.by_bucket["1"]
        lines.append(f"{k:22s} x{ch.count:<3d} ms numba/ort {cells} -> {pick} (+{ch.extra_bytes / 2**20:.0f} MB)")
    return lines
