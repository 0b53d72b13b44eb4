"""Decode speed at a long context with each KV cache type, paired: edgebox (and llama.cpp).

    python tools/bench_kv_types.py /work/bench-models/deepseek-llm-7b-shape-Q4_0.gguf \\
        --context 2048 --types f16,q8_0 --bursts 6 --steps 8 [--llama-cpp]

Each cache type runs in a process of its own (same file, same threads, 1 chip, the numba
backend), which fills ``--context`` slots of its cache and then decodes bursts of ``--steps``
tokens at positions context .. context+steps-1 (the cache is cut back to ``context`` after every
burst, so every step attends over ~context keys). The processes take turns burst by burst and
the first of each round alternates: the machine's memory bandwidth drifts within seconds, so
the figure that counts is the median of the back-to-back ratios.

edgebox's cache is filled with random keys and values (N(0, 1), through the cache's own store,
so quantization and rotation run as in a real prompt): decode reads every slot whatever its
value, and it saves running a 2048-token prompt on a 7B model per type. llama.cpp's (with
``--llama-cpp``, llama-cpp-python, flash attention on, type_k = type_v) is filled by evaluating a
real ``context``-token prompt, as it has no other way in; its bursts are then rolled back the
same way (kv cache seq_rm).

Prints KV bytes per token of every type on the file and one line per type; ``--json`` for the
figures. ``--attention-only``: instead, the decode attention kernel alone over every layer's
cache (random values, ``--bursts`` rounds, the types taking turns) in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TAG = "@@KVBENCH "
GGML = {"f16": 1, "q8_0": 8, "q4_0": 2}


# -- a runner process ------------------------------------------------------------------------------


class EdgeboxDecoder:
    def __init__(self, path: str, cache_type: str, context: int, steps: int, threads: int, serial_attention: bool = False):
        import numba
        import numpy as np

        import edgebox

        numba.set_num_threads(threads)
        if serial_attention:  # attention on one thread at any context (the matmuls keep theirs)
            from edgebox.kernels import backend

            backend.PARALLEL_DECODE_CONTEXT = 1 << 62
        self.np = np
        self.m = m = edgebox.load(
            path, chips=1, n_ctx=context + steps + 1, backend="numba", cache_type_k=cache_type, cache_type_v=cache_type
        )
        m.prepare()
        self.kv = kv = m.new_cache()
        rng = np.random.default_rng(0)
        a = m.args
        for layer in range(a.n_layer):
            for s0 in range(0, context, 512):
                n = min(512, context - s0)
                k = rng.standard_normal((n, a.n_head_kv, a.head_dim), dtype=np.float32)
                v = rng.standard_normal((n, a.n_head_kv, a.head_dim), dtype=np.float32)
                kv.store(0, layer, s0, k, v)
        kv.pos[:context] = np.arange(context)
        kv.length = context
        self.context = context
        self.kv_bytes_per_token = m.box.kv_bytes_per_token
        self.decode(2)  # compile and warm

    def decode(self, steps: int) -> list[float]:
        np, m, kv = self.np, self.m, self.kv
        out, token = [], 100
        for _ in range(steps):
            t = time.perf_counter()
            logits = m.forward(np.array([token], np.int32), np.array([kv.length], np.int32), kv, all_logits=False)
            out.append(time.perf_counter() - t)
            token = int(np.argmax(logits[0]))
        kv.length = self.context
        return out


class LlamaCppDecoder:
    def __init__(self, path: str, cache_type: str, context: int, steps: int, threads: int, serial_attention: bool = False):
        import llama_cpp
        import numpy as np

        self.np = np
        t = GGML[cache_type]
        self.llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=context + steps + 16,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            type_k=t,
            type_v=t,
            flash_attn=True,
            verbose=False,
        )
        rng = np.random.default_rng(0)
        ids = [int(i) for i in rng.integers(100, self.llm.n_vocab() - 100, context)]
        self.llm.eval(ids)
        self.context = context
        self.kv_bytes_per_token = 0
        self.decode(2)

    def decode(self, steps: int) -> list[float]:
        import llama_cpp

        llm = self.llm
        out, token = [], 100
        for _ in range(steps):
            t = time.perf_counter()
            llm.eval([token])
            out.append(time.perf_counter() - t)
            token = 100 + (token * 7 + 13) % 20000  # any token: decode reads the whole cache whatever it is
        mem = llama_cpp.llama_get_memory(llm.ctx)
        llama_cpp.llama_memory_seq_rm(mem, 0, self.context, -1)
        llm.n_tokens = self.context
        return out


def child(spec: dict) -> None:
    cls = EdgeboxDecoder if spec["runner"] == "edgebox" else LlamaCppDecoder
    r = cls(spec["model"], spec["type"], spec["context"], spec["steps"], spec["threads"], spec.get("serial_attention", False))
    print(TAG + json.dumps({"kv_bytes_per_token": r.kv_bytes_per_token}), flush=True)
    for line in sys.stdin:
        print(TAG + json.dumps(r.decode(json.loads(line))), flush=True)


# -- the parent --------------------------------------------------------------------------------------


class Child:
    def __init__(self, spec: dict):
        env = dict(os.environ)
        for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # benchmarks only (NOTES.md)
            env.pop(k, None)
        self.name = f"{spec['runner']} {spec['type']}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        self.ready = self._reply()

    def _reply(self):
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG) :])
        raise RuntimeError(f"{self.name} exited with {self.proc.wait()}")

    def decode(self, steps: int) -> list[float]:
        self.proc.stdin.write(json.dumps(steps) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def attention_only(path: str, context: int, types: list[str], rounds: int) -> dict:
    """The decode attention of one token over every layer of the file's shape (the kernel the
    one-call block runs, on this thread), caches of random values, ``context`` keys: each type's
    median seconds per token over ``rounds`` rounds, the types taking turns. The caches (one per
    layer, 1 GB in f16 for the 7B at 2048) stream from DRAM as in a real step."""
    import numpy as np

    from edgebox.gguf.loader import load_gguf
    from edgebox.kernels import attention, kv_quant

    a = load_gguf(path).args
    rng = np.random.default_rng(0)
    k = rng.standard_normal((context, a.n_head_kv, a.head_dim), dtype=np.float32)
    q = rng.standard_normal((a.n_head, a.head_dim), dtype=np.float32)
    caches = {t: [(kv_quant.quantize(k, t), kv_quant.quantize(k, t)) for _ in range(a.n_layer)] for t in types}
    times: dict[str, list[float]] = {t: [] for t in types}
    for r in range(rounds + 1):
        for t in types if r % 2 else types[::-1]:
            t0 = time.perf_counter()
            for kc, vc in caches[t]:
                attention.attention_decode(q, kc, vc, context)
            if r:  # the first round compiles and warms
                times[t].append(time.perf_counter() - t0)
    return {t: {"s_median": statistics.median(v), "s_rounds": v} for t, v in times.items()}


def kv_bytes_table(path: str) -> dict[str, int]:
    from edgebox.gguf.loader import load_gguf
    from edgebox.kernels.kv_quant import CACHE_TYPES, kv_row_bytes

    a = load_gguf(path).args
    return {t: a.n_layer * a.n_head_kv * 2 * kv_row_bytes(t, a.head_dim) for t in CACHE_TYPES}


def paired(children: list[Child], bursts: int, steps: int) -> list[list[float]]:
    """Per child, the median step time of each burst; the children take turns."""
    out: list[list[float]] = [[] for _ in children]
    for b in range(bursts):
        order = list(range(len(children)))
        if b % 2:
            order.reverse()
        for i in order:
            out[i].append(statistics.median(children[i].decode(steps)))
            print(f"  burst {b + 1}/{bursts} {children[i].name}: {1 / out[i][-1]:.3f} tok/s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--types", default="f16,q8_0", help="cache types; TYPE:serial runs that one's attention on one thread")
    p.add_argument("--bursts", type=int, default=6)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-cpp", action="store_true")
    p.add_argument("--serial-attention", action="store_true", help="edgebox: attention on one thread at any context")
    p.add_argument(
        "--attention-only", action="store_true", help="time only the decode attention kernel, every layer, in this process"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    types = args.types.split(",")
    if args.attention_only:
        res = attention_only(args.model, args.context, types, args.bursts)
        if args.json:
            print(json.dumps(res, indent=1))
        for t, v in res.items():
            print(f"attention of one token, all layers, {args.context} keys, {t}: {v['s_median'] * 1000:.1f} ms")
        return
    report: dict = {
        "model": args.model,
        "context": args.context,
        "threads": args.threads,
        "kv_bytes_per_token": kv_bytes_table(args.model),
    }
    for runner in ["edgebox"] + (["llama.cpp"] if args.llama_cpp else []):
        spec = {
            "runner": runner,
            "model": args.model,
            "context": args.context,
            "steps": args.steps,
            "threads": args.threads,
            "serial_attention": args.serial_attention,
        }
        children = []
        try:
            for t in types:  # one at a time: each fills its cache alone
                print(f"{runner} {t}: loading and filling {args.context} slots", file=sys.stderr, flush=True)
                name, _, how = t.partition(":")  # "f16:serial": that type with attention on one thread
                children.append(Child({**spec, "type": name, "serial_attention": spec["serial_attention"] or how == "serial"}))
                children[-1].name = f"{runner} {t}"
            times = paired(children, args.bursts, args.steps)
        finally:
            for c in children:
                c.close()
        tok_s = {t: [1 / s for s in v] for t, v in zip(types, times)}
        report[runner] = {t: {"tok_s_median": statistics.median(v), "tok_s_bursts": v} for t, v in tok_s.items()}
        base = tok_s[types[0]]
        report[runner]["ratio_vs_" + types[0]] = {
            t: {
                "median": statistics.median(a / b for a, b in zip(v, base)),
                "range": [min(a / b for a, b in zip(v, base)), max(a / b for a, b in zip(v, base))],
            }
            for t, v in tok_s.items()
            if t != types[0]
        }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{args.model}: context {args.context}, {args.threads} threads, 1 chip")
    print("KV bytes per token: " + ", ".join(f"{t} {b / 1024:.0f} KiB" for t, b in report["kv_bytes_per_token"].items()))
    for runner in ["edgebox"] + (["llama.cpp"] if args.llama_cpp else []):
        r = report[runner]
        for t in types:
            line = f"{runner:>9} {t:>5}: decode {r[t]['tok_s_median']:.3f} tok/s (median of {len(r[t]['tok_s_bursts'])} bursts)"
            ratio = r["ratio_vs_" + types[0]].get(t)
            if ratio:
                line += f", {ratio['median']:.3f}x {types[0]} [{ratio['range'][0]:.3f}-{ratio['range'][1]:.3f}]"
            print(line)


if __name__ == "__main__":
    main()
