"""``edgebox bench``: prompt processing, decode, time to first token and memory, side by side with
llama.cpp on the same file and threads in the same run (the machine is noisy: ratios mean more
than absolute figures), and the engine's throughput at several concurrency levels.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np


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


def _prompt(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    """Random ordinary token ids: both runtimes see the same tokens."""
    return np.random.RandomState(seed).randint(100, min(n_vocab, 30000), size=n).tolist()


def _best(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def bench_edgebox(model_path, threads: int, prompt_lens: tuple[int, ...], n_decode: int, chips: int = 1,
                  repeats: int = 2) -> tuple[RunnerResult, object]:
    import numba

    import edgebox

    numba.set_num_threads(threads)
    t0 = time.perf_counter()
    m = edgebox.load(model_path, chips=chips, n_ctx=max(prompt_lens) + n_decode + 8)
    m.prepare(progress=True)
    res = RunnerResult("edgebox", load_s=time.perf_counter() - t0)
    _say(f"edgebox: loaded in {res.load_s:.1f} s; warming up the kernels")
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
    kv = m.new_cache(64 + n_decode + 1)
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
    res.peak_rss_gib = _peak_rss_bytes() / 2**30
    _say(f"edgebox: decode {res.tg_tok_s:.2f} tok/s, TTFT {res.ttft_s * 1000:.0f} ms, peak RSS {res.peak_rss_gib:.2f} GiB")
    return res, m


def bench_llama_cpp(model_path, threads: int, prompt_lens: tuple[int, ...], n_decode: int, n_vocab: int,
                    repeats: int = 2) -> RunnerResult:
    try:
        import llama_cpp
    except ImportError:
        from .errors import EdgeboxError

        raise EdgeboxError("--vs-llama-cpp needs llama-cpp-python: pip install llama-cpp-python (it builds llama.cpp, ~10 min)") from None
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=max(prompt_lens) + n_decode + 8, n_batch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
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
    _say(f"llama.cpp: decode {res.tg_tok_s:.2f} tok/s, TTFT {res.ttft_s * 1000:.0f} ms")
    return res


@dataclass
class ConcurrencyPoint:
    concurrency: int
    total_tok_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    per_token_p50_s: float
    per_token_p95_s: float


def bench_concurrency(m, levels: tuple[int, ...], prompt_len: int = 64, gen: int = 32) -> list[ConcurrencyPoint]:
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
        ttft = sorted(s.ttft_s for s in sums)
        per_tok = sorted(s.decode_s / max(1, s.generated_tokens - 1) for s in sums)
        point = ConcurrencyPoint(c, sum(s.generated_tokens for s in sums) / wall, _pct(ttft, 50), _pct(ttft, 95),
                                 _pct(per_tok, 50), _pct(per_tok, 95))
        _say(f"concurrency {c}: {point.total_tok_s:.2f} tok/s total, TTFT p50 {point.ttft_p50_s:.2f} s p95 {point.ttft_p95_s:.2f} s, "
             f"per token p50 {point.per_token_p50_s * 1000:.0f} ms")
        out.append(point)
    return out


def _pct(sorted_values: list[float], p: float) -> float:
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def run_bench(model_path, threads: int = 2, prompt_lens=(64, 512), n_decode: int = 32, vs_llama_cpp: bool = False,
              chips: int = 1, concurrency: tuple[int, ...] = ()) -> dict:
    ours, m = bench_edgebox(model_path, threads, prompt_lens, n_decode, chips)
    report: dict = {"model": str(model_path), "threads": threads, "chips": chips, "edgebox": asdict(ours)}
    if concurrency:
        report["concurrency"] = [asdict(p) for p in bench_concurrency(m, concurrency)]
    if vs_llama_cpp:
        n_vocab = m.args.n_vocab
        m.box.close()
        del m
        theirs = bench_llama_cpp(model_path, threads, prompt_lens, n_decode, n_vocab)
        report["llama_cpp"] = asdict(theirs)
        report["ratio"] = {
            **{f"pp{n}": ours.pp_tok_s[n] / theirs.pp_tok_s[n] for n in prompt_lens},
            "tg": ours.tg_tok_s / theirs.tg_tok_s,
            "ttft": theirs.ttft_s / ours.ttft_s,
        }
    return report


def format_report(r: dict) -> str:
    e = r["edgebox"]
    lines = [f"model {r['model']}, {r['threads']} threads, {r['chips']} chip(s)"]
    header = f"{'':<22}{'edgebox':>12}"
    if "llama_cpp" in r:
        header += f"{'llama.cpp':>12}{'ratio':>8}"
    lines.append(header)

    def row(label: str, ours: float, theirs: float | None, ratio: float | None, fmt: str = "{:.2f}") -> str:
        s = f"{label:<22}{fmt.format(ours):>12}"
        if theirs is not None:
            s += f"{fmt.format(theirs):>12}{ratio:>8.2f}"
        return s

    l_ = r.get("llama_cpp")
    for n, v in e["pp_tok_s"].items():
        lines.append(row(f"pp{n} tok/s", v, l_["pp_tok_s"][n] if l_ else None, r["ratio"][f"pp{n}"] if l_ else None))
    lines.append(row("decode tok/s", e["tg_tok_s"], l_["tg_tok_s"] if l_ else None, r["ratio"]["tg"] if l_ else None))
    lines.append(row("TTFT (64 tok) ms", e["ttft_s"] * 1000, l_["ttft_s"] * 1000 if l_ else None,
                     r["ratio"]["ttft"] if l_ else None, "{:.0f}"))
    lines.append(f"{'load s':<22}{e['load_s']:>12.1f}" + (f"{l_['load_s']:>12.1f}" if l_ else ""))
    lines.append(f"{'peak RSS GiB':<22}{e['peak_rss_gib']:>12.2f}")
    for p in r.get("concurrency", []):
        lines.append(f"concurrency {p['concurrency']:>3}: {p['total_tok_s']:8.2f} tok/s total | TTFT p50 {p['ttft_p50_s']:.2f} s "
                     f"p95 {p['ttft_p95_s']:.2f} s | per token p50 {p['per_token_p50_s'] * 1000:.0f} ms p95 {p['per_token_p95_s'] * 1000:.0f} ms")
    return "\n".join(lines)
