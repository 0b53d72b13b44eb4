"""Speculative decoding, measured: acceptance and speed-up of n-gram drafts, and the cost of a
verify step on the 7B shape (docs/performance.md, "Speculative decoding").

Two parts, each its own process (they load different models):

``accept``: the bundled model (edgebox/data/default.gguf) completes functions of the held-out
CPython files (edgebox/data/default.json lists them; read from this machine's stdlib) with
edit-style prompts: the function, then "the same function with X renamed to Y" and the renamed
header; greedy, one stream, with and without n-gram drafts in turns. Reports acceptance
(accepted / drafted), tokens per step, decode tok/s of both and their ratio, checks the texts are
identical, and records each decode step's rows (the plan the engine ran: ``Engine.load``).
``--mode continue`` instead completes the files' openings (no repeated code to look up).

``verify``: the 7B-shaped file on 4 chips: one forward step of one sequence feeding n = 1..9 rows
(a verify of k = n - 1 drafts) at a fixed context, host wall time (median of rounds, the n taking
turns) and the chips' device time (the cost model at the top clock); with ``--accept FILE`` (the
JSON of an ``accept`` run) the speed-up those steps imply: generated tokens / sum over the
measured steps of cost(rows) / cost(1).

    python tools/bench_speculative.py accept --files 12 --json /tmp/spec_accept.json
    NUMBA_NUM_THREADS=2 python tools/bench_speculative.py verify /work/bench-models/deepseek-llm-7b-shape-Q4_0.gguf \
        --chips 4 --json /tmp/spec_verify.json
    python tools/bench_speculative.py implied /tmp/spec_verify.json /tmp/spec_accept.json
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import edgebox  # noqa: E402
from edgebox.engine import Engine, Request  # noqa: E402
from edgebox.engine.speculative import Speculative  # noqa: E402
from edgebox.hw import step as hw_step  # noqa: E402
from edgebox.model.kv_cache import Segment  # noqa: E402

GREEDY = edgebox.SamplingParams(temperature=0.0)


# --- accept ------------------------------------------------------------------------------------


def heldout_files(n: int) -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = json.loads((REPO / "edgebox" / "data" / "default.json").read_text())["heldout_files"]
    return [stdlib / name for name in names if (stdlib / name).exists()][:n]


def edit_prompt(path: Path, tokenizer, max_new: int) -> tuple[str, int] | None:
    """The function of ``path`` (15-60 lines, longest first) renamed: (prompt, tokens to generate)."""
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    lines = source.splitlines(keepends=True)
    funcs = [
        f
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef) and 15 <= f.end_lineno - f.lineno + 1 <= 60 and f.col_offset == 0
    ]
    for f in sorted(funcs, key=lambda f: -(f.end_lineno - f.lineno)):
        names = [a.arg for a in f.args.args if a.arg not in ("self", "cls")]
        body = "".join(lines[f.lineno - 1 : f.end_lineno])
        count = {x: len(re.findall(rf"\b{x}\b", body)) for x in names if len(x) >= 3}
        used = [x for x, c in count.items() if c >= 3]
        if not used:
            continue
        x = max(used, key=count.get)
        y = f"{x}_value"
        renamed = re.sub(rf"\b{x}\b", y, body)
        head, rest = renamed.split("\n", 1)
        prompt = f"# {path.name}: {f.name}\n{body}\n\n# The same function with `{x}` renamed to `{y}`:\n{head}\n"
        n = min(max_new, len(tokenizer.encode(rest, add_bos=False)))
        return prompt, n
    return None


def continue_prompt(path: Path, tokenizer, max_new: int) -> tuple[str, int] | None:
    ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_bos=False)
    return (tokenizer.decode(ids[:512]), max_new) if len(ids) > 512 + max_new else None


def run_one(engine: Engine, prompt: str, n: int) -> dict:
    """One greedy request alone; its decode steps' rows from the plan the engine ran."""
    rows, produced = [], []
    state = {"generated": engine.stats().generated_tokens}

    def listen(e: Engine) -> None:
        _, _, cost = e.load()
        st = e.stats()
        produced.append(st.generated_tokens - state["generated"])
        state["generated"] = st.generated_tokens
        decoding = bool(cost) and not e._running[0].prefilling
        rows.append(cost[0][0] if decoding else 0)

    engine._step_listeners.append(listen)
    try:
        s = engine.generate(Request(prompt=prompt, max_tokens=n, params=GREEDY))
    finally:
        engine._step_listeners.remove(listen)
    # rows[i]: what step i + 1 feeds when it decodes (0: a prompt chunk); produced[i + 1]: what it yields
    steps = [(r, p) for r, p in zip(rows[:-1], produced[1:]) if r > 0]
    return {
        "text": s.text,
        "generated": s.generated_tokens,
        "decode_s": s.decode_s,
        "draft_n": s.draft_tokens,
        "draft_n_accepted": s.draft_accepted,
        "steps": steps,
    }


def accept(args) -> dict:
    m = edgebox.load(args.model, chips=args.chips)
    make = edit_prompt if args.mode == "edit" else continue_prompt
    plain = Engine(m, max_batch=1)
    spec = Engine(m, max_batch=1, speculative=Speculative("ngram", draft_max=args.draft_max))
    files = []
    for path in heldout_files(args.files):
        p = make(path, m.tokenizer, args.max_new)
        if p is None:
            continue
        prompt, n = p
        runs = {"none": [], "ngram": []}
        for r in range(args.rounds):
            order = (("none", plain), ("ngram", spec)) if r % 2 == 0 else (("ngram", spec), ("none", plain))
            for name, engine in order:
                runs[name].append(run_one(engine, prompt, n))
        a, b = runs["none"][0], runs["ngram"][0]
        # greedy output is the same unless a near tie falls differently in the verify step's kernels
        same = next((i for i, (x, y) in enumerate(zip(a["text"], b["text"])) if x != y), None)
        if same is None and len(a["text"]) != len(b["text"]):
            same = min(len(a["text"]), len(b["text"]))
        best = {k: min(v, key=lambda x: x["decode_s"]) for k, v in runs.items()}
        rate = {k: (v["generated"] - 1) / v["decode_s"] for k, v in best.items()}
        files.append(
            {
                "file": str(path.relative_to(Path(sysconfig.get_paths()["stdlib"]))),
                "generated": b["generated"],
                "draft_n": b["draft_n"],
                "draft_n_accepted": b["draft_n_accepted"],
                "tok_s_none": rate["none"],
                "tok_s_ngram": rate["ngram"],
                "steps": b["steps"],
                "identical": same is None,
                "first_difference_at_char": same,
            }
        )
        f = files[-1]
        print(
            f"{f['file']:<40} {f['generated']:4d} tokens, accepted {f['draft_n_accepted']:4d}/{f['draft_n']:4d}, "
            f"{f['generated'] / max(1, len(f['steps']) + 1):.2f} tok/step, {rate['none']:.0f} -> {rate['ngram']:.0f} tok/s"
            + ("" if same is None else f", text differs from char {same} of {len(a['text'])}"),
            flush=True,
        )
    plain.close()
    spec.close()
    drafted = sum(f["draft_n"] for f in files)
    accepted = sum(f["draft_n_accepted"] for f in files)
    steps = [s for f in files for s in f["steps"]]
    ratios = [f["tok_s_ngram"] / f["tok_s_none"] for f in files]
    out = {
        "mode": args.mode,
        "model": str(args.model or "default.gguf"),
        "draft_max": args.draft_max,
        "files": files,
        "acceptance": accepted / drafted if drafted else 0.0,
        "tokens_per_step": sum(p for _, p in steps) / len(steps) if steps else 0.0,
        "speedup_median": statistics.median(ratios) if ratios else 0.0,
        "speedup_total": sum(f["generated"] for f in files)
        / sum(f["generated"] / f["tok_s_ngram"] for f in files)
        / (sum(f["generated"] for f in files) / sum(f["generated"] / f["tok_s_none"] for f in files)),
    }
    print(
        f"{args.mode}: {len(files)} files, acceptance {out['acceptance']:.1%} ({accepted}/{drafted}), "
        f"{out['tokens_per_step']:.2f} tokens per decode step, decode speed-up median {out['speedup_median']:.2f}x "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}), all tokens {out['speedup_total']:.2f}x; "
        f"identical text {sum(f['identical'] for f in files)}/{len(files)}"
    )
    return out


# --- verify ------------------------------------------------------------------------------------


def verify(args) -> dict:
    t0 = time.perf_counter()
    m = edgebox.load(args.model, chips=args.chips)
    m.prepare()
    print(f"loaded {Path(args.model).name} on {args.chips} chips in {time.perf_counter() - t0:.1f} s", flush=True)
    kv = m.new_cache(args.ctx + 16)
    ids = np.arange(100, 100 + args.ctx, dtype=np.int32)
    m.transformer.forward_segments([Segment(ids, np.arange(args.ctx, dtype=np.int32), kv)])
    ns = list(range(1, args.max_rows + 1))
    host = {n: [] for n in ns}
    for r in range(args.rounds + 1):  # the first round warms every shape up and is not counted
        for n in ns if r % 2 == 0 else ns[::-1]:
            kv.length = args.ctx
            seg = Segment(np.full(n, 200, np.int32), np.arange(args.ctx, args.ctx + n, dtype=np.int32), kv, all_logits=True)
            t = time.perf_counter()
            m.transformer.forward_segments([seg])
            if r:
                host[n].append(time.perf_counter() - t)
    device = device_costs(m, args.ctx, ns)
    one_h, one_d = statistics.median(host[1]), device[1]
    table = {
        n: {
            "host_ms": 1e3 * statistics.median(host[n]),
            "host_x": statistics.median(host[n]) / one_h,
            "device_x": device[n] / one_d,
        }
        for n in ns
    }
    print(f"verify step at context {args.ctx}, {args.chips} chips, median of {args.rounds} rounds:")
    print("rows (1 + drafts) | host ms | host x one row | device x one row")
    for n, t in table.items():
        print(f"{n} | {t['host_ms']:.1f} | {t['host_x']:.2f} | {t['device_x']:.2f}")
    out = {"model": str(args.model), "chips": args.chips, "ctx": args.ctx, "rows": table}
    if args.accept:
        out.update(implied(table, json.loads(Path(args.accept).read_text())))
    return out


def device_costs(m, ctx: int, ns: list[int]) -> dict[int, float]:
    """Device seconds of a step of one sequence feeding n rows (every row's logits) at context
    ``ctx``, from the chips' cost model (``hw.step``) at the top clock: the clocks the firmware
    moves during a run (temperature) do not enter the ratios."""
    acc = m.box.accounting
    freqs = np.full((len(acc.chips), 1), acc.profile.max_mhz, float)
    return {n: float(hw_step.step_cost(acc.work, hw_step.Step.of([(n, ctx + n)], n), freqs).step_s[0]) for n in ns}


def implied(table: dict, acc: dict) -> dict:
    """The speed-up the verify costs (``table``: rows -> cost relative to one row) imply for the
    decode steps an ``accept`` run recorded: its tokens over the summed relative cost of its steps."""
    table = {int(n): t for n, t in table.items()}
    steps = [tuple(s) for f in acc["files"] for s in f["steps"]]
    tokens = sum(p for _, p in steps)
    out = {}
    for key in ("host_x", "device_x"):
        out[f"implied_speedup_{key[:-2]}"] = tokens / sum(table[min(r, max(table))][key] for r, _ in steps)
    print(
        f"implied by the {len(steps)} decode steps of {acc['mode']} (acceptance {acc['acceptance']:.1%}, "
        f"{tokens / len(steps):.2f} tokens per step, draft_max {acc['draft_max']}): {out['implied_speedup_host']:.2f}x host time, "
        f"{out['implied_speedup_device']:.2f}x device time"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    a = sub.add_parser("accept")
    a.add_argument("--model", default=None)
    a.add_argument("--chips", type=int, default=1)
    a.add_argument("--files", type=int, default=12)
    a.add_argument("--max-new", type=int, default=256)
    a.add_argument("--draft-max", type=int, default=8)
    a.add_argument("--rounds", type=int, default=2)
    a.add_argument("--mode", choices=("edit", "continue"), default="edit")
    v = sub.add_parser("verify")
    v.add_argument("model")
    v.add_argument("--chips", type=int, default=4)
    v.add_argument("--ctx", type=int, default=256)
    v.add_argument("--max-rows", type=int, default=9)
    v.add_argument("--rounds", type=int, default=3)
    v.add_argument("--accept", default=None, help="an accept run's --json: the implied speed-up")
    i = sub.add_parser("implied", help="combine a verify run's --json with an accept run's --json")
    i.add_argument("verify_json")
    i.add_argument("accept_json")
    for p in (a, v, i):
        p.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.part == "implied":
        out = implied(json.loads(Path(args.verify_json).read_text())["rows"], json.loads(Path(args.accept_json).read_text()))
    else:
        out = accept(args) if args.part == "accept" else verify(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
