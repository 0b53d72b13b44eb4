"""``edgebox bench``: prompt processing, decode, time to first token and memory, side by side with
llama.cpp on the same file and threads in the same run, and the engine at several concurrency levels.

Each runner (edgebox, llama.cpp) is measured in a process of its own, so its peak RSS is its own
and neither inherits the other's page cache state or threads; with ``rounds`` > 1 the runners
alternate and each figure is the best round (the machine is shared and noisy: the ratios, taken
within one run, mean more than the absolute figures).  Progress goes to stderr.

    python -m edgebox.bench --child '{"runner": "edgebox", ...}'   # one runner; JSON on stdout
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

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
    total_tok_s: float      # generated tokens / wall time, prompt processing included
    decode_tok_s: float     # while all streams decode: streams / per-token latency (p50)
    ttft_p50_s: float
    ttft_p95_s: float
    per_token_p50_s: float
    per_token_p95_s: float


def _prompt(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    """Random ordinary token ids: both runtimes see the same tokens."""
    return np.random.RandomState(seed).randint(100, min(n_vocab, 30000), size=n).tolist()


def _best(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


# -- the runners (each in its own process) --------------------------------------------------------

def bench_edgebox(model_path, threads: int, prompt_lens: tuple[int, ...], n_decode: int, chips: int = 1,
                  backend: str | None = None, concurrency: tuple[int, ...] = (), repeats: int = 2) -> dict:
    import numba

    import edgebox

    numba.set_num_threads(threads)
    t0 = time.perf_counter()
    n_ctx = max(*prompt_lens, 64) + n_decode + 8  # the TTFT prompt is 64 tokens
    kwargs = {"backend": backend} if backend else {}
    m = edgebox.load(model_path, chips=chips, n_ctx=max(n_ctx, 160) if concurrency else n_ctx, **kwargs)
    m.prepare(progress=True)
    res = RunnerResult("edgebox", load_s=time.perf_counter() - t0)
    _say(f"edgebox: loaded and packed in {res.load_s:.1f} s; warming up the kernels")
    fwd = m.transformer.forward
    fwd(np.array(_prompt(m.args.n_vocab, 8), np.int32), np.arange(8, dtype=np.int32), m.new_cache(16), all_logits=False)

    for n in prompt_lens:
        ids = np.array(_prompt(m.args.n_vocab, n), np.int32)

        def once() -> float:
            kv = m.new_cache(n + 1)
            t = time.perf_counter()
            fwd(ids, np.arange(n, dtype=np.int32), kv, all_logits=False)
            return time.perf_counter() - t

        res.pp_tok_s[n] = n / _best(once, repeats)
        _say(f"edgebox: prompt processing {n} tokens: {res.pp_tok_s[n]:.2f} tok/s")

    ids = _prompt(m.args.n_vocab, 64)
    kv = m.new_cache(n_ctx)
    res.kv_gib = n_ctx * m.box.kv_bytes_per_token / 2**30
    t = time.perf_counter()
    logits = fwd(np.array(ids, np.int32), np.arange(64, dtype=np.int32), kv, all_logits=False)
    int(np.argmax(logits[0]))
    res.ttft_s = time.perf_counter() - t
    steps = []
    token = 100
    for i in range(n_decode):
        t = time.perf_counter()
        logits = fwd(np.array([token], np.int32), np.array([64 + i], np.int32), kv, all_logits=False)
        token = int(np.argmax(logits[0]))
        steps.append(time.perf_counter() - t)
    res.tg_tok_s = 1.0 / statistics.median(steps)
    del kv
    res.peak_rss_gib = _peak_rss_bytes() / 2**30
    _say(f"edgebox: decode {res.tg_tok_s:.2f} tok/s, TTFT {res.ttft_s * 1000:.0f} ms, peak RSS {res.peak_rss_gib:.2f} GiB")
    out = {"result": asdict(res)}
    if concurrency:
        out["concurrency"] = [asdict(p) for p in bench_concurrency(m, concurrency)]
        out["hot_standby"] = bench_first_request(m)
    return out


def bench_llama_cpp(model_path, threads: int, prompt_lens: tuple[int, ...], n_decode: int,
                    repeats: int = 2) -> dict:
    try:
        import llama_cpp
    except ImportError:
        from .errors import EdgeboxError

        raise EdgeboxError("--vs-llama-cpp needs llama-cpp-python: pip install llama-cpp-python (it builds llama.cpp, ~10 min)") from None
    t0 = time.perf_counter()
    n_ctx = max(*prompt_lens, 64) + n_decode + 8  # the TTFT prompt is 64 tokens
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()
    res = RunnerResult("llama.cpp", load_s=time.perf_counter() - t0)
    llm.eval(_prompt(n_vocab, 8))
    for n in prompt_lens:
        ids = _prompt(n_vocab, n)

        def once() -> float:
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            return time.perf_counter() - t

        res.pp_tok_s[n] = n / _best(once, repeats)
        _say(f"llama.cpp: prompt processing {n} tokens: {res.pp_tok_s[n]:.2f} tok/s")
    llm.reset()
    t = time.perf_counter()
    llm.eval(_prompt(n_vocab, 64))
    int(np.argmax(llm.scores[llm.n_tokens - 1]))
    res.ttft_s = time.perf_counter() - t
    steps, token = [], 100
    for _ in range(n_decode):
        t = time.perf_counter()
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        steps.append(time.perf_counter() - t)
    res.tg_tok_s = 1.0 / statistics.median(steps)
    res.peak_rss_gib = _peak_rss_bytes() / 2**30
    _say(f"llama.cpp: decode {res.tg_tok_s:.2f} tok/s, TTFT {res.ttft_s * 1000:.0f} ms, peak RSS {res.peak_rss_gib:.2f} GiB")
    return {"result": asdict(res)}


def bench_concurrency(m, levels: tuple[int, ...], prompt_len: int = 64, gen: int = 48) -> list[ConcurrencyPoint]:
    """N streams submitted at once to an engine whose batch limit is N: generated tokens per second
    of wall time (prompt processing included), the decode rate while all N decode together (each
    batched step yields N tokens: N / per-token latency; the prompts are all read in the first
    steps, so per-token latency is pure decode), TTFT and per-token latency percentiles."""
    from .engine import Engine, Request
    from .sampler import SamplingParams

    out = []
    greedy = SamplingParams(temperature=0.0)
    for c in levels:
        with Engine(m, max_batch=c, max_queue=4 * c, prefill_chunk=512) as e:
            prompts = [m.detokenize(_prompt(m.args.n_vocab, prompt_len, seed=i)) for i in range(c)]
            t = time.perf_counter()
            handles = [e.submit(Request(prompt=p, max_tokens=gen, params=greedy)) for p in prompts]
            sums = [h.result() for h in handles]
            wall = time.perf_counter() - t
            e.close(drain=False)
        ttft = sorted(s.ttft_s for s in sums)
        per_tok = sorted(s.decode_s / max(1, s.generated_tokens - 1) for s in sums)
        point = ConcurrencyPoint(c, sum(s.generated_tokens for s in sums) / wall, c / _pct(per_tok, 50),
                                 _pct(ttft, 50), _pct(ttft, 95), _pct(per_tok, 50), _pct(per_tok, 95))
        _say(f"concurrency {c}: decode {point.decode_tok_s:.2f} tok/s, {point.total_tok_s:.2f} tok/s with prompts, "
             f"TTFT p50 {point.ttft_p50_s:.2f} s p95 {point.ttft_p95_s:.2f} s, per token p50 {point.per_token_p50_s * 1000:.0f} ms")
        out.append(point)
    return out


def bench_first_request(m, prompt_len: int = 64, steady: int = 4) -> dict:
    """Hot standby: a new engine (warm-up included in its start) answers its first request, then
    ``steady`` more one at a time; TTFT of the first vs the median of the rest."""
    from .engine import Engine, Request
    from .sampler import SamplingParams

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
    _say(f"hot standby: engine start {start_s:.1f} s, first request TTFT {ttfts[0] * 1000:.0f} ms, "
         f"steady {out['steady_ttft_s'] * 1000:.0f} ms ({out['first_vs_steady']:.2f}x)")
    return out


def _pct(sorted_values: list[float], p: float) -> float:
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


# -- process start: what the numba cache saves ----------------------------------------------------

def bench_startup(model_path, chips: int = 1) -> dict:
    """Process start -> first generated token (``edgebox run -n 1``), twice over an empty numba
    cache: the first start compiles every kernel, the second loads them from the cache."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="edgebox-numba-") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("first_start_s", "second_start_s"):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "edgebox.cli", "run", str(model_path), "-p", "hello", "-n", "1",
                                "--temp", "0", "--chips", str(chips)], env=env, capture_output=True, text=True)
            out[label] = time.perf_counter() - t
            if p.returncode != 0:
                raise RuntimeError(f"edgebox run failed: {p.stderr.strip()[-500:]}")
            _say(f"startup: {label.replace('_', ' ')[:-2]}: process start -> first token {out[label]:.1f} s")
    out["compile_s"] = out["first_start_s"] - out["second_start_s"]
    return out


# -- the run --------------------------------------------------------------------------------------

def _child(spec: dict) -> dict:
    """Run one runner in a fresh process; its stderr (progress) passes through."""
    p = subprocess.run([sys.executable, "-m", "edgebox.bench", "--child", json.dumps(spec)],
                       stdout=subprocess.PIPE, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if p.returncode != 0 or not lines:
        from .errors import EdgeboxError

        raise EdgeboxError(f"the {spec['runner']} benchmark process failed (exit {p.returncode}); see its messages above")
    return json.loads(lines[-1][len(RESULT_TAG):])


def _best_of(rounds: list[dict]) -> dict:
    """The best figure of each metric over the rounds (noise only ever slows a run down)."""
    best = dict(rounds[0])
    for r in rounds[1:]:
        best["load_s"] = min(best["load_s"], r["load_s"])
        best["pp_tok_s"] = {n: max(v, r["pp_tok_s"][n]) for n, v in best["pp_tok_s"].items()}
        best["tg_tok_s"] = max(best["tg_tok_s"], r["tg_tok_s"])
        best["ttft_s"] = min(best["ttft_s"], r["ttft_s"])
        best["peak_rss_gib"] = max(best["peak_rss_gib"], r["peak_rss_gib"])
    return best


def run_bench(model_path, threads: int = 2, prompt_lens=(64, 512), n_decode: int = 32, vs_llama_cpp: bool = False,
              chips: int = 1, concurrency: tuple[int, ...] = (), backend: str | None = None, rounds: int = 1,
              startup: bool = False) -> dict:
    model_path = str(Path(model_path).resolve())
    base = {"model": model_path, "threads": threads, "prompt_lens": list(prompt_lens), "n_decode": n_decode}
    ours, theirs, extra = [], [], {}
    for i in range(rounds):
        if rounds > 1:
            _say(f"round {i + 1} of {rounds}")
        spec = {**base, "runner": "edgebox", "chips": chips, "backend": backend,
                "concurrency": list(concurrency) if i == 0 else []}
        got = _child(spec)
        ours.append(got["result"])
        extra.update({k: v for k, v in got.items() if k != "result"})
        if vs_llama_cpp:
            theirs.append(_child({**base, "runner": "llama.cpp"})["result"])
    report: dict = {"model": model_path, "file_gib": os.path.getsize(model_path) / 2**30, "threads": threads,
                    "chips": chips, "backend": backend or "default", "rounds": rounds, "edgebox": _best_of(ours)}
    e = report["edgebox"]
    report["memory_ratio"] = e["peak_rss_gib"] / (report["file_gib"] + e["kv_gib"])
    if "concurrency" in extra:
        report["concurrency"] = extra["concurrency"]
        report["hot_standby"] = extra["hot_standby"]
        by_c = {p["concurrency"]: p["decode_tok_s"] for p in extra["concurrency"]}
        if 1 in by_c:
            report["batching_gain"] = {str(c): v / by_c[1] for c, v in by_c.items()}
        pp64 = e["pp_tok_s"].get("64") or e["pp_tok_s"].get(64)
        if pp64:
            report["vs_pp64"] = {str(c): v / pp64 for c, v in by_c.items()}
    if vs_llama_cpp:
        t = report["llama_cpp"] = _best_of(theirs)
        report["ratio"] = {
            **{f"pp{n}": e["pp_tok_s"][n] / t["pp_tok_s"][n] for n in e["pp_tok_s"]},
            "tg": e["tg_tok_s"] / t["tg_tok_s"],
            "ttft": t["ttft_s"] / e["ttft_s"],
        }
    if startup:
        report["startup"] = bench_startup(model_path, chips)
    return report


def format_report(r: dict) -> str:
    e = r["edgebox"]
    lines = [f"model {r['model']} ({r['file_gib']:.2f} GiB), {r['threads']} threads, {r['chips']} chip(s), "
             f"backend {r['backend']}, best of {r['rounds']} round(s)"]
    header = f"{'':<22}{'edgebox':>12}"
    t = r.get("llama_cpp")
    if t:
        header += f"{'llama.cpp':>12}{'ratio':>8}"
    lines.append(header)

    def row(label: str, ours: float, theirs: float | None, ratio: float | None, fmt: str = "{:.2f}") -> str:
        s = f"{label:<22}{fmt.format(ours):>12}"
        if theirs is not None:
            s += f"{fmt.format(theirs):>12}{ratio:>8.2f}"
        return s

    for n, v in e["pp_tok_s"].items():
        lines.append(row(f"pp{n} tok/s", v, t["pp_tok_s"][n] if t else None, r["ratio"][f"pp{n}"] if t else None))
    lines.append(row("decode tok/s", e["tg_tok_s"], t["tg_tok_s"] if t else None, r["ratio"]["tg"] if t else None))
    lines.append(row("TTFT (64 tok) ms", e["ttft_s"] * 1000, t["ttft_s"] * 1000 if t else None,
                     r["ratio"]["ttft"] if t else None, "{:.0f}"))
    lines.append(f"{'load s':<22}{e['load_s']:>12.1f}" + (f"{t['load_s']:>12.1f}" if t else ""))
    lines.append(f"{'peak RSS GiB':<22}{e['peak_rss_gib']:>12.2f}" + (f"{t['peak_rss_gib']:>12.2f}" if t else ""))
    lines.append(f"peak RSS / (file + KV {e['kv_gib']:.2f} GiB): {r['memory_ratio']:.3f}")
    for p in r.get("concurrency", []):
        gain = r.get("batching_gain", {}).get(str(p["concurrency"]))
        share = r.get("vs_pp64", {}).get(str(p["concurrency"]))
        lines.append(f"concurrency {p['concurrency']:>3}: decode {p['decode_tok_s']:7.2f} tok/s"
                     + (f" ({gain:.2f}x one stream" if gain else " (")
                     + (f", {share:.0%} of pp64)" if share else ")")
                     + f" | {p['total_tok_s']:.2f} tok/s with prompts | TTFT p50 {p['ttft_p50_s']:.2f} s p95 {p['ttft_p95_s']:.2f} s"
                     f" | per token p50 {p['per_token_p50_s'] * 1000:.0f} ms p95 {p['per_token_p95_s'] * 1000:.0f} ms")
    if "hot_standby" in r:
        h = r["hot_standby"]
        lines.append(f"hot standby: engine start {h['engine_start_s']:.1f} s; first request TTFT {h['first_ttft_s'] * 1000:.0f} ms "
                     f"vs steady {h['steady_ttft_s'] * 1000:.0f} ms ({h['first_vs_steady']:.2f}x)")
    if "startup" in r:
        s = r["startup"]
        lines.append(f"process start -> first token: {s['first_start_s']:.1f} s over an empty numba cache, "
                     f"{s['second_start_s']:.1f} s from the cache (compiling costs {s['compile_s']:.1f} s)")
    return "\n".join(lines)


def _child_main(spec: dict) -> None:
    common = (spec["model"], spec["threads"], tuple(spec["prompt_lens"]), spec["n_decode"])
    if spec["runner"] == "edgebox":
        out = bench_edgebox(*common, chips=spec["chips"], backend=spec.get("backend"),
                            concurrency=tuple(spec.get("concurrency", ())))
    else:
        out = bench_llama_cpp(*common)
    print(RESULT_TAG + json.dumps(out), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        from .errors import EdgeboxError

        try:
            _child_main(json.loads(sys.argv[2]))
        except EdgeboxError as err:
            _say(f"edgebox: error: {err}")
            sys.exit(2)
    else:
        sys.exit("usage: python -m edgebox.bench --child SPEC_JSON (edgebox bench is the command)")
