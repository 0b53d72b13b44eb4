"""``edgebox bench``: prompt processing, decode, time to first token and memory, side by side with
llama.cpp on the same file and threads in the same run, and the engine at several concurrency levels.

Each runner (edgebox, llama.cpp) lives in a process of its own, so its peak RSS is its own and
neither inherits the other's threads; both stay loaded and take turns at every measurement, so
each ratio compares the two back to back (see ``run_bench``).  Progress goes to stderr.
``--startup`` instead times process start -> first token, one process per start
(``run_startup_bench``).

    python -m edgebox.commands.bench --child '{"runner": "edgebox", ...}'   # one runner, serving JSON lines
"""

from __future__ import annotations

import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgebox.gguf.file import resident_fraction

RESULT_TAG = "EDGEBOX_BENCH_RESULT "


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class RunnerResult:
    name: str
    load_s: float = 0.0
    pp_tok_s: dict[int, float] = field(default_factory=dict)  # prompt length -> tokens/s
    tg_tok_s: float = 0.0
    ttft_s: float = 0.0  # 64-token prompt -> first token
    peak_rss_gib: float = 0.0
    kv_gib: float = 0.0  # the KV cache the run allocates (its context)


@dataclass
class ConcurrencyPoint:
    concurrency: int
    total_tok_s: float  # generated tokens / wall time, prompt processing included
    decode_tok_s: float  # while all streams decode: streams / per-token latency (p50)
    ttft_p50_s: float
    ttft_p95_s: float
    per_token_p50_s: float
    per_token_p95_s: float
    pp64_tok_s: float  # 64-token prompt processing taken just before and after this level (mean)
    vs_pp64_range: tuple = ()  # decode_tok_s / pp64_tok_s of every round of this level (this point: the median)


def _prompt(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    """Random ordinary token ids: both runtimes see the same tokens."""
    return np.random.RandomState(seed).randint(100, min(n_vocab, 30000), size=n).tolist()


# -- the runners (each in its own process, serving the parent's measurements one at a time) --------
#
# A runner maps the model once and then answers: prompt(n) (seconds to process n tokens over an
# empty cache), ttft() (a 64-token prompt to its first token, leaving that sequence in the cache)
# and decode(k) (seconds of each of k greedy steps continuing it).

TTFT_PROMPT = 64
DECODE_BURST = 8  # decode steps one runner takes before the other takes its turn


class EdgeboxRunner:
    name = "edgebox"

    def __init__(
        self, model_path, threads: int, n_ctx: int, chips: int = 1, backend: str | None = None, cache_types=("f16", "f16")
    ):
        import numba

        import edgebox

        numba.set_num_threads(threads)
        t0 = time.perf_counter()
        kwargs = {"backend": backend} if backend else {}
        kwargs.update(cache_type_k=cache_types[0], cache_type_v=cache_types[1])
        self.model = m = edgebox.load(model_path, chips=chips, n_ctx=n_ctx, **kwargs)
        m.prepare(progress=True)
        self.load_s = time.perf_counter() - t0
        self.kv_gib = n_ctx * m.box.kv_bytes_per_token / 2**30
        _say(f"edgebox: loaded and packed in {self.load_s:.1f} s; warming up the kernels")
        self._fwd = m.forward  # charges the chips as a real step does
        self._fwd(np.array(_prompt(m.args.n_vocab, 8), np.int32), np.arange(8, dtype=np.int32), m.new_cache(16), all_logits=False)
        self._kv = None
        self._token = 0

    def prompt(self, n: int) -> float:
        return prompt_seconds(self.model, n)

    def ttft(self) -> float:
        ids = np.array(_prompt(self.model.args.n_vocab, TTFT_PROMPT), np.int32)
        self._kv = self.model.new_cache(self.model.n_ctx)
        t = time.perf_counter()
        logits = self._fwd(ids, np.arange(TTFT_PROMPT, dtype=np.int32), self._kv, all_logits=False)
        self._token = int(np.argmax(logits[0]))
        return time.perf_counter() - t

    def decode(self, steps: int) -> list[float]:
        out = []
        for _ in range(steps):
            t = time.perf_counter()
            logits = self._fwd(
                np.array([self._token], np.int32), np.array([self._kv.length], np.int32), self._kv, all_logits=False
            )
            self._token = int(np.argmax(logits[0]))
            out.append(time.perf_counter() - t)
        return out

    def concurrency(self, levels: list[int], rounds: int = 1) -> list[dict]:
        return [asdict(p) for p in bench_concurrency(self.model, tuple(levels), rounds=rounds)]

    def hot_standby(self) -> dict:
        return bench_first_request(self.model)


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, model_path, threads: int, n_ctx: int, cache_types=("f16", "f16")):
        try:
            import llama_cpp
        except ImportError:
            from edgebox.errors import EdgeboxError

            raise EdgeboxError(
                "--vs-llama-cpp needs llama-cpp-python: pip install llama-cpp-python (it builds llama.cpp, ~10 min)"
            ) from None
        t0 = time.perf_counter()
        # a quantized KV cache as llama.cpp runs it: GGML types, flash attention (which quantized V needs)
        ggml = {"f16": 1, "q8_0": 8, "q4_0": 2}
        kv = (
            {}
            if cache_types == ("f16", "f16")
            else dict(type_k=ggml[cache_types[0]], type_v=ggml[cache_types[1]], flash_attn=True)
        )
        self.llm = llama_cpp.Llama(
            model_path=str(model_path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False, **kv
        )
        self.load_s = time.perf_counter() - t0
        self.kv_gib = 0.0
        self.llm.eval(_prompt(self.llm.n_vocab(), 8))
        self._token = 0

    def prompt(self, n: int) -> float:
        ids = _prompt(self.llm.n_vocab(), n)
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t

    def ttft(self) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(_prompt(self.llm.n_vocab(), TTFT_PROMPT))
        self._token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return time.perf_counter() - t

    def decode(self, steps: int) -> list[float]:
        out = []
        for _ in range(steps):
            t = time.perf_counter()
            self.llm.eval([self._token])
            self._token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(time.perf_counter() - t)
        return out


def prompt_seconds(m, n: int) -> float:
    """Seconds of one forward pass over an ``n``-token prompt and an empty cache."""
    ids = np.array(_prompt(m.args.n_vocab, n), np.int32)
    kv = m.new_cache(n + 1)
    t = time.perf_counter()
    m.forward(ids, np.arange(n, dtype=np.int32), kv, all_logits=False)
    return time.perf_counter() - t


def bench_concurrency(m, levels: tuple[int, ...], prompt_len: int = 64, gen: int = 48, rounds: int = 1) -> list[ConcurrencyPoint]:
    """N streams submitted at once to an engine whose batch limit is N: wall tokens/s (prompts
    included), the decode rate while all N decode (N / per-token latency: the prompts are all read
    in the first steps), TTFT and latency percentiles, and the 64-token prompt rate taken around
    the level, which the decode rate is compared with (memory bandwidth drifts, so the reference
    must be measured in the same minute).  With ``rounds`` > 1 a level's point is its round with
    the median decode / pp64 ratio, since the machine drifts even within a level."""
    out = []
    for c in levels:
        runs = [_concurrency_round(m, c, prompt_len, gen) for _ in range(rounds)]
        ratios = sorted(p.decode_tok_s / p.pp64_tok_s for p in runs)
        point = min(runs, key=lambda p: abs(p.decode_tok_s / p.pp64_tok_s - ratios[len(ratios) // 2]))
        point.vs_pp64_range = tuple(ratios)
        out.append(point)
    return out


def _concurrency_round(m, c: int, prompt_len: int, gen: int) -> ConcurrencyPoint:
    from edgebox.engine import Engine, Request
    from edgebox.text.sampler import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    before = prompt_seconds(m, 64)
    # a chunk budget that reads every prompt in the first step: later steps are pure decode. The
    # prompts go as token ids: as text they re-tokenize to more tokens (BOS, merges), and a prompt
    # chunk left to a later step would count as decode time
    with Engine(m, max_batch=c, max_queue=4 * c, prefill_chunk=max(512, c * prompt_len)) as e:
        prompts = [tuple(_prompt(m.args.n_vocab, prompt_len, seed=i)) for i in range(c)]
        t = time.perf_counter()
        handles = e.submit_many([Request(prompt_ids=p, max_tokens=gen, params=greedy) for p in prompts])
        sums = [h.result() for h in handles]
        wall = time.perf_counter() - t
        e.close(drain=False)
    ttft = sorted(s.ttft_s for s in sums)
    per_tok = sorted(s.decode_s / max(1, s.generated_tokens - 1) for s in sums)
    pp64 = 2 * 64 / (before + prompt_seconds(m, 64))
    point = ConcurrencyPoint(
        c,
        sum(s.generated_tokens for s in sums) / wall,
        c / _pct(per_tok, 50),
        _pct(ttft, 50),
        _pct(ttft, 95),
        _pct(per_tok, 50),
        _pct(per_tok, 95),
        pp64,
    )
    _say(
        f"concurrency {c}: decode {point.decode_tok_s:.2f} tok/s ({point.decode_tok_s / pp64:.0%} of pp64 {pp64:.1f}), "
        f"{point.total_tok_s:.2f} tok/s with prompts, TTFT p50 {point.ttft_p50_s:.2f} s p95 {point.ttft_p95_s:.2f} s, "
        f"per token p50 {point.per_token_p50_s * 1000:.0f} ms"
    )
    return point


def bench_first_request(m, prompt_len: int = 64, steady: int = 4) -> dict:
    """Hot standby: a new engine (warm-up included in its start) answers its first request, then
    ``steady`` more one at a time; TTFT of the first vs the median of the rest."""
    from edgebox.engine import Engine, Request
    from edgebox.text.sampler import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    t = time.perf_counter()
    with Engine(m, max_batch=1) as e:
        start_s = time.perf_counter() - t
        ttfts = []
        for i in range(1 + steady):
            prompt = m.detokenize(_prompt(m.args.n_vocab, prompt_len, seed=100 + i))
            ttfts.append(e.submit(Request(prompt=prompt, max_tokens=2, params=greedy)).result().ttft_s)
        e.close(drain=False)
    out = {"engine_start_s": start_s, "first_ttft_s": ttfts[0], "steady_ttft_s": statistics.median(ttfts[1:])}
    out["first_vs_steady"] = out["first_ttft_s"] / out["steady_ttft_s"]
    _say(
        f"hot standby: engine start {start_s:.1f} s, first request TTFT {ttfts[0] * 1000:.0f} ms, "
        f"steady {out['steady_ttft_s'] * 1000:.0f} ms ({out['first_vs_steady']:.2f}x)"
    )
    return out


def _pct(sorted_values: list[float], p: float) -> float:
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


# -- process start -> first token: as a user meets it, one process per start -----------------------
#
# ``edgebox run FILE -p PROMPT -n 1`` against llama-cpp-python loading the same file and generating
# one token with the same threads and context, one process each; the clock runs from the spawn to
# the first byte of generated text on the child's stdout, peak RSS is the child's own (wait4).
# States: the file (and the weight-cache entry) in the page cache, or dropped from it; the
# packed-weight cache cold (the entry deleted: the first-ever start) or warm.  Within each round
# and page-cache state the runners take turns (who goes first alternates by round); each edgebox
# row's ratio is the median over rounds of its time / llama.cpp's in the same round and state.

STARTUP_PROMPT = "The edge box"
STARTUP_CHIPS = (1, 4)
STARTUP_TIMEOUT_S = 600.0
_DROP_CACHES = "/proc/sys/vm/drop_caches"
_LLAMA_FIRST_TOKEN = """
import sys, llama_cpp
path, threads, n_ctx, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
out = llm.create_completion(prompt, max_tokens=1, temperature=0.0)
sys.stdout.write(out["choices"][0]["text"] or "?")
sys.stdout.flush()
"""


@dataclass
class StartupRun:
    first_token_s: float  # spawn -> first byte of generated text
    exit_s: float  # spawn -> exit (a cold edgebox start writes its cache entry before it exits)
    peak_rss_gib: float


def _startup_env(threads: int, cache_base: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), EDGEBOX_CACHE_DIR=cache_base)
    return env


def time_first_token(argv: list[str], env: dict, name: str = "the process", timeout: float = STARTUP_TIMEOUT_S) -> StartupRun:
    """Run ``argv``; seconds from the spawn to the first byte on its stdout and to its exit, and
    its peak RSS.  EdgeboxError (with the end of its stderr) when it fails."""
    with tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env)
        first = None
        fd = proc.stdout.fileno()
        while True:
            left = timeout - (time.perf_counter() - t0)
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                proc.kill()  # (a hung start: its error names the exit code, -9)
                break
            chunk = os.read(fd, 4096)
            if first is None and chunk:
                first = time.perf_counter() - t0
            if not chunk:
                break
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        exit_s = time.perf_counter() - t0
        if proc.returncode != 0 or first is None:
            from edgebox.errors import EdgeboxError

            err.seek(0)
            tail = err.read().strip().splitlines()[-3:]
            raise EdgeboxError(f"{name} exited {proc.returncode} before a first token: {' | '.join(tail)}")
    return StartupRun(first, exit_s, usage.ru_maxrss * 1024 / 2**30)


def drop_page_cache(paths: list[Path], whole: bool = True) -> str:
    """Drop the files from the page cache: the whole cache when ``whole`` and this process may
    (root: ``/proc/sys/vm/drop_caches``, as a reboot leaves it), else each file's clean pages
    (``posix_fadvise(DONTNEED)``, which needs no privilege; pages another process maps stay).
    Returns the method used."""
    os.sync()
    if whole:
        try:
            with open(_DROP_CACHES, "w") as f:
                f.write("1\n")
            return "drop_caches"
        except OSError:
            pass
    for p in paths:
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return "fadvise"


def read_into_page_cache(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            buf = bytearray(16 << 20)
            while f.readinto(buf):
                pass


def _model_ctx(model_path: Path) -> int:
    """The context ``edgebox run`` uses by default: min(4096, the model's)."""
    from edgebox.gguf.file import read_fields

    fields = read_fields(model_path)
    return min(4096, int(fields.get(f"{fields.get('general.architecture')}.context_length", 4096)))


def run_startup_bench(
    model_path,
    threads: int = 2,
    vs_llama_cpp: bool = True,
    rounds: int = 1,
    backend: str | None = None,
    chips: tuple[int, ...] = STARTUP_CHIPS,
    drop_whole_cache: bool = True,
) -> dict:
    """Process start -> first token (module section above), with the weight cache cold and warm
    (only "off" when the cache is turned off), the file in the page cache and dropped from it."""
    from edgebox.kernels import packcache

    model_path = Path(model_path).resolve()
    n_ctx = _model_ctx(model_path)
    states = ("cold", "warm") if packcache.enabled() else ("off",)
    home = packcache.cache_dir().parent
    home.mkdir(parents=True, exist_ok=True)
    cache_base = Path(tempfile.mkdtemp(prefix="bench-startup-", dir=home))  # a cache of the bench's own
    for tuned in home.glob("autotune-*.json"):  # the kernel choices stay warm: only the packed weights are cold
        (cache_base / tuned.name).write_bytes(tuned.read_bytes())
    packed = cache_base / "packed"
    env = _startup_env(threads, str(cache_base))
    llama_argv = [sys.executable, "-c", _LLAMA_FIRST_TOKEN, str(model_path), str(threads), str(n_ctx), STARTUP_PROMPT]

    def edgebox_argv(c: int) -> list[str]:
        argv = [sys.executable, "-m", "edgebox.cli", "run", str(model_path), "-p", STARTUP_PROMPT, "-n", "1", "--temp", "0"]
        return argv + ["--chips", str(c), "--ctx", str(n_ctx)] + (["--backend", backend] if backend else [])

    runs: dict[tuple, list[StartupRun]] = {}
    method = ""
    entries: dict[int, set[Path]] = {}  # chips -> its entry (found as the file its cold start wrote)
    written: dict[int, int] = {}  # chips -> bytes of that entry
    try:
        for r in range(rounds):
            for page in ("cached", "dropped"):
                jobs: list[tuple] = [("llama.cpp", 1, "-")] if vs_llama_cpp else []
                eb = [("edgebox", c, st) for c in chips for st in states]
                jobs = jobs + eb if r % 2 == 0 else eb + jobs
                for runner, c, st in jobs:
                    if st == "cold":
                        for p in entries.get(c, ()):
                            p.unlink(missing_ok=True)
                    before = set(packed.glob("*.ebx")) if packed.exists() else set()
                    files = [model_path, *(sorted(packed.glob("*.ebx")) if packed.exists() else [])]
                    if page == "dropped":
                        method = drop_page_cache(files, drop_whole_cache)
                    else:
                        os.sync()  # no run pays for the writeback of the entry a cold start before it wrote
                        read_into_page_cache(files)
                    resident = resident_fraction(model_path)
                    argv = llama_argv if runner == "llama.cpp" else edgebox_argv(c)
                    got = time_first_token(argv, env, runner)
                    if st == "cold":
                        entries[c] = (set(packed.glob("*.ebx")) if packed.exists() else set()) - before
                        written[c] = sum(p.stat().st_size for p in entries[c])
                    runs.setdefault((runner, c, st, page), []).append(got)
                    what = "llama.cpp" if runner == "llama.cpp" else f"edgebox {c} chip{'s' if c > 1 else ''}, weight cache {st}"
                    _say(
                        f"startup round {r + 1}/{rounds}, {page} (GGUF {resident:.0%} resident): {what}: "
                        f"first token {got.first_token_s:.1f} s, exit {got.exit_s:.1f} s, peak RSS {got.peak_rss_gib:.2f} GiB"
                    )
    finally:
        import shutil

        shutil.rmtree(cache_base, ignore_errors=True)

    rows = []
    for (runner, c, st, page), got in runs.items():
        row = {
            "runner": runner,
            "chips": c,
            "weight_cache": st,
            "page_cache": page,
            "first_token_s": statistics.median(g.first_token_s for g in got),
            "exit_s": statistics.median(g.exit_s for g in got),
            "peak_rss_gib": max(g.peak_rss_gib for g in got),
            "rounds": [asdict(g) for g in got],
        }
        theirs = runs.get(("llama.cpp", 1, "-", page))
        if theirs and runner == "edgebox":
            ratios = sorted(g.first_token_s / t.first_token_s for g, t in zip(got, theirs))
            row["ratio"], row["ratio_range"] = statistics.median(ratios), [ratios[0], ratios[-1]]
        rows.append(row)
    return {
        "model": str(model_path),
        "file_gib": model_path.stat().st_size / 2**30,
        "threads": threads,
        "ctx": n_ctx,
        "prompt": STARTUP_PROMPT,
        "rounds": rounds,
        "page_cache_drop": method or "none",
        "entry_gib": {str(c): n / 2**30 for c, n in written.items()},
        "rows": rows,
    }


def format_startup(r: dict) -> str:
    lines = [
        f"start -> first token: {r['model']} ({r['file_gib']:.2f} GiB), {r['threads']} threads, ctx {r['ctx']}, "
        f"{r['rounds']} round(s) (medians; ratio = edgebox / llama.cpp in the same round and state); "
        f"page cache dropped with {r['page_cache_drop']}",
        f"{'':<34}{'page cache dropped':>32}{'file in page cache':>32}",
        f"{'':<34}" + f"{'s':>8}{'ratio':>8}{'exit s':>8}{'RSS GiB':>8}" * 2,
    ]
    if r["entry_gib"]:
        lines.insert(1, "weight-cache entries: " + ", ".join(f"{c} chip(s) {g:.2f} GiB" for c, g in r["entry_gib"].items()))
    keyed = {(x["runner"], x["chips"], x["weight_cache"], x["page_cache"]): x for x in r["rows"]}
    for key in dict.fromkeys(k[:3] for k in keyed):
        runner, c, st = key
        label = "llama.cpp" if runner == "llama.cpp" else f"edgebox {c} chip{'s' if c > 1 else ''}, cache {st}"
        line = f"{label:<34}"
        for page in ("dropped", "cached"):
            x = keyed.get((*key, page))
            if x is None:
                line += f"{'-':>32}"
                continue
            ratio = f"{x['ratio']:.2f}" if "ratio" in x else "1.00" if runner == "llama.cpp" else "-"
            line += f"{x['first_token_s']:>8.1f}{ratio:>8}{x['exit_s']:>8.1f}{x['peak_rss_gib']:>8.2f}"
        lines.append(line)
    return "\n".join(lines)


# -- the run: both runners resident, each measurement taken by one and then the other ---------------


class _Child:
    """The parent's handle on a runner process: ``call(op, *args)`` runs one measurement there."""

    def __init__(self, spec: dict):
        self.name = spec["runner"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgebox.commands.bench", "--child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self._reply()  # load_s, kv_gib

    def call(self, op: str, *args):
        self.proc.stdin.write(json.dumps({"op": op, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def _reply(self):
        for line in self.proc.stdout:  # other output (a library's chatter) is skipped
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG) :])
        from edgebox.errors import EdgeboxError

        code = self.proc.wait()
        raise EdgeboxError(f"the {self.name} benchmark process failed (exit {code}); see its messages above")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def _paired(children: list[_Child], rounds: int, measure, first: int = 0, label: str = "") -> list[list]:
    """``measure(child)`` ``rounds`` times per child, the children taking turns (who goes first
    alternates, starting with round ``first``), so that both see the machine in the same state;
    per child its values. ``label``: say each round on stderr (progress)."""
    values: list[list] = [[] for _ in children]
    for r in range(first, first + rounds):
        if label:
            _say(f"{label}: round {r + 1} of {first + rounds}")
        order = list(range(len(children)))
        if r % 2:
            order.reverse()
        for i in order:
            values[i].append(measure(children[i]))
    return values


def run_bench(
    model_path,
    threads: int = 2,
    prompt_lens=(64, 512),
    n_decode: int = 32,
    vs_llama_cpp: bool = False,
    chips: int = 1,
    concurrency: tuple[int, ...] = (),
    backend: str | None = None,
    rounds: int = 1,
    cache_types: tuple[str, str] = ("f16", "f16"),
) -> dict:
    """Each runner in a process of its own (its peak RSS is its own, neither inherits the other's
    threads). Both stay loaded; every measurement is taken ``rounds`` times, the runners taking
    turns, so each ratio is the median over rounds of edgebox vs llama.cpp measured back to back
    (this machine's memory bandwidth drifts by tens of percent within seconds); the absolute figures
    are each runner's best round."""
    model_path = str(Path(model_path).resolve())
    n_ctx = max(*prompt_lens, TTFT_PROMPT) + n_decode + 8
    base = {"model": model_path, "threads": threads, "cache_types": list(cache_types)}
    children = [
        _Child(
            {**base, "runner": "edgebox", "chips": chips, "backend": backend, "n_ctx": max(n_ctx, 160) if concurrency else n_ctx}
        )
    ]
    try:
        if vs_llama_cpp:
            children.append(_Child({**base, "runner": "llama.cpp", "n_ctx": n_ctx}))
        results = [RunnerResult(c.name, load_s=c.ready["load_s"], kv_gib=c.ready["kv_gib"]) for c in children]
        per_round: dict[str, list[list[float]]] = {}  # metric -> per child, per round (higher is better)
        for n in prompt_lens:
            secs = _paired(children, rounds, lambda c: c.call("prompt", n), label=f"prompt processing {n} tokens")
            per_round[f"pp{n}"] = [[n / s for s in v] for v in secs]
            for res, v in zip(results, per_round[f"pp{n}"]):
                res.pp_tok_s[n] = max(v)
                _say(f"{res.name}: prompt processing {n} tokens: {res.pp_tok_s[n]:.2f} tok/s")
        # decode in bursts, the runners taking turns after every burst: the ratio is the median of
        # the bursts' back-to-back ratios; a runner's figure is its best round (all its steps)
        ttfts: list[list[float]] = [[] for _ in children]
        steps: list[list[list[float]]] = [[] for _ in children]
        bursts: list[list[float]] = [[] for _ in children]
        burst = min(DECODE_BURST, n_decode)
        for r in range(rounds):
            _say(f"TTFT and decode: round {r + 1} of {rounds}")
            for i, got in enumerate(_paired(children, 1, lambda c: c.call("ttft"), first=r)):
                ttfts[i] += got  # a fresh 64-token sequence, which the round's decode continues
            for i, got in enumerate(_paired(children, n_decode // burst, lambda c: c.call("decode", burst), first=r)):
                steps[i].append(sum(got, []))
                bursts[i] += [1.0 / statistics.median(b) for b in got]
        per_round["tg"] = bursts
        per_round["ttft"] = [[1.0 / s for s in v] for v in ttfts]
        for res, tt, st in zip(results, ttfts, steps):
            res.tg_tok_s, res.ttft_s = max(1.0 / statistics.median(v) for v in st), min(tt)
            _say(f"{res.name}: decode {res.tg_tok_s:.2f} tok/s, TTFT {res.ttft_s * 1000:.0f} ms")
        extra = {}
        if concurrency:
            extra["concurrency"] = children[0].call("concurrency", list(concurrency), rounds)
            extra["hot_standby"] = children[0].call("hot_standby")
        for res, c in zip(results, children):
            res.peak_rss_gib = c.call("peak_rss") / 2**30
    finally:
        for c in children:
            c.close()

    report: dict = {
        "model": model_path,
        "file_gib": os.path.getsize(model_path) / 2**30,
        "threads": threads,
        "chips": chips,
        "backend": backend or "default",
        "cache_types": list(cache_types),
        "rounds": rounds,
        "edgebox": asdict(results[0]),
    }
    e = report["edgebox"]
    report["memory_ratio"] = e["peak_rss_gib"] / (report["file_gib"] + e["kv_gib"])
    if "concurrency" in extra:
        report["concurrency"] = extra["concurrency"]
        report["hot_standby"] = extra["hot_standby"]
        by_c = {p["concurrency"]: p["decode_tok_s"] for p in extra["concurrency"]}
        if 1 in by_c:
            report["batching_gain"] = {str(c): v / by_c[1] for c, v in by_c.items()}
        report["vs_pp64"] = {str(p["concurrency"]): p["decode_tok_s"] / p["pp64_tok_s"] for p in extra["concurrency"]}
    if vs_llama_cpp:
        report["llama_cpp"] = asdict(results[1])
        paired = {k: sorted(a / b for a, b in zip(*v)) for k, v in per_round.items()}  # edgebox / llama.cpp, per round
        report["ratio"] = {k: statistics.median(v) for k, v in paired.items()}
        report["ratio_range"] = {k: [v[0], v[-1]] for k, v in paired.items()}
    return report


def format_report(r: dict) -> str:
    e = r["edgebox"]
    t = r.get("llama_cpp")
    lines = [
        f"model {r['model']} ({r['file_gib']:.2f} GiB), {r['threads']} threads, {r['chips']} chip(s), "
        f"backend {r['backend']}, {r['rounds']} round(s): figures are each runner's best round"
        + (", ratios the median of the rounds' back-to-back ratios [range]" if t else "")
    ]
    header = f"{'':<22}{'edgebox':>12}"
    if t:
        header += f"{'llama.cpp':>12}{'ratio':>8}"
    lines.append(header)

    def row(label: str, key: str, ours: float, theirs: float | None, fmt: str = "{:.2f}") -> str:
        s = f"{label:<22}{fmt.format(ours):>12}"
        if theirs is not None:
            lo, hi = r["ratio_range"][key]
            s += f"{fmt.format(theirs):>12}{r['ratio'][key]:>8.2f}  [{lo:.2f}-{hi:.2f}]"
        return s

    for n, v in e["pp_tok_s"].items():
        lines.append(row(f"pp{n} tok/s", f"pp{n}", v, t["pp_tok_s"][n] if t else None))
    lines.append(row("decode tok/s", "tg", e["tg_tok_s"], t["tg_tok_s"] if t else None))
    lines.append(row("TTFT (64 tok) ms", "ttft", e["ttft_s"] * 1000, t["ttft_s"] * 1000 if t else None, "{:.0f}"))
    lines.append(f"{'load s':<22}{e['load_s']:>12.1f}" + (f"{t['load_s']:>12.1f}" if t else ""))
    lines.append(f"{'peak RSS GiB':<22}{e['peak_rss_gib']:>12.2f}" + (f"{t['peak_rss_gib']:>12.2f}" if t else ""))
    lines.append(f"peak RSS / (file + KV {e['kv_gib']:.2f} GiB): {r['memory_ratio']:.3f}")
    for p in r.get("concurrency", []):
        gain = r.get("batching_gain", {}).get(str(p["concurrency"]))
        share = r.get("vs_pp64", {}).get(str(p["concurrency"]))
        notes = ([f"{gain:.2f}x one stream"] if gain else []) + (
            [
                f"{share:.0%} of pp64"
                + (
                    f" [{min(p['vs_pp64_range']):.0%}-{max(p['vs_pp64_range']):.0%}]"
                    if len(p.get("vs_pp64_range", ())) > 1
                    else ""
                )
            ]
            if share
            else []
        )
        lines.append(
            f"concurrency {p['concurrency']:>3}: decode {p['decode_tok_s']:7.2f} tok/s"
            + (f" ({', '.join(notes)})" if notes else "")
            + f" | {p['total_tok_s']:.2f} tok/s with prompts | TTFT p50 {p['ttft_p50_s']:.2f} s p95 {p['ttft_p95_s']:.2f} s"
            f" | per token p50 {p['per_token_p50_s'] * 1000:.0f} ms p95 {p['per_token_p95_s'] * 1000:.0f} ms"
        )
    if "hot_standby" in r:
        h = r["hot_standby"]
        lines.append(
            f"hot standby: engine start {h['engine_start_s']:.1f} s; first request TTFT {h['first_ttft_s'] * 1000:.0f} ms "
            f"vs steady {h['steady_ttft_s'] * 1000:.0f} ms ({h['first_vs_steady']:.2f}x)"
        )
    return "\n".join(lines)


def _serve(spec: dict) -> None:
    """A runner process: load, say ready, then answer the parent's calls (one JSON per line on stdin)."""
    if spec["runner"] == "edgebox":
        runner = EdgeboxRunner(
            spec["model"],
            spec["threads"],
            spec["n_ctx"],
            chips=spec["chips"],
            backend=spec.get("backend"),
            cache_types=tuple(spec.get("cache_types", ("f16", "f16"))),
        )
    else:
        runner = LlamaCppRunner(spec["model"], spec["threads"], spec["n_ctx"], tuple(spec.get("cache_types", ("f16", "f16"))))

    def reply(value) -> None:
        print(RESULT_TAG + json.dumps(value), flush=True)

    reply({"load_s": runner.load_s, "kv_gib": runner.kv_gib})
    for line in sys.stdin:
        call = json.loads(line)
        reply(_peak_rss_bytes() if call["op"] == "peak_rss" else getattr(runner, call["op"])(*call["args"]))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        from edgebox.errors import EdgeboxError

        try:
            _serve(json.loads(sys.argv[2]))
        except EdgeboxError as err:
            _say(f"edgebox: error: {err}")
            sys.exit(2)
    else:
        sys.exit("usage: python -m edgebox.commands.bench --child SPEC_JSON (edgebox bench is the command)")
