"""What a JSON Schema constraint costs: 8 constrained streams against 8 free ones, and the grammar
mask's time per token on the model's vocabulary (102,400 tokens on the DeepSeek-LLM-7B shape).

    python tools/bench_constrained.py [MODEL] [--streams 8] [--tokens 12] [--rounds 5] [--chips 1] [--json]

One engine serves both kinds, in turns: free, constrained, free, ..., free bursts of
``--streams`` requests each, all submitted at once with the same short prompt and ``--tokens``
tokens each (the schema, an array of at least 100 records,
cannot end sooner, so every stream decodes the same number of steps). A burst's decode rate is
streams / its median decode step (a step listener times them; the others' jobs on these shared
cores only ever add time, and the median ignores the steps they hit hardest); a round's figure
is a constrained burst's rate over the mean of the free bursts either side of it, and the report
gives the median of the rounds and their range, beside the ratio of neighbouring free bursts
(what the VM's drift alone does to a ratio; it drifts by tens of percent within seconds).
Beside it, the cost that is the constraint's own, immune to that noise: the scheduler thread's
time in the constraint code per step (starting the masks, waiting for them after the forward
pass, unpacking them, following the tokens), and, on the same vocabulary outside the engine, one
matcher's mask fill per token along a document the schema allows, 8 matchers filled at once on
llguidance's pool, and a draw among the allowed tokens against a free draw.

Progress goes to stderr; the summary (or ``--json``) to stdout. Holds /tmp/edgebox-bench.lock
while it runs, so the other engineers' heavy jobs pause.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import edgebox  # noqa: E402
from edgebox.engine import Engine, Request  # noqa: E402
from edgebox.engine import masks as engine_masks  # noqa: E402
from edgebox.text import generation  # noqa: E402
from edgebox.text.grammar import (  # noqa: E402
    Constraint,
    Matcher,
    allowed_from_bitmask,
    compile_constraint,
    fill_bitmasks,
)
from edgebox.text.sampler import Sampler, SamplingParams  # noqa: E402

MODEL = "/work/bench-models/deepseek-llm-7b-shape-Q4_0.gguf"
LOCK = Path("/tmp/edgebox-bench.lock")
PROMPT = "Return the people in the records below as a JSON array.\n"
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "format": "email", "maxLength": 24},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
SCHEMA = {"type": "array", "items": RECORD, "minItems": 100}
# the first 100 records of a document the schema allows (it needs at least 100)
SAMPLE_DOC = json.dumps(
    [{"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "role": "admin", "active": True}] * 50
    + [{"name": "Bob", "age": 7, "role": "guest", "active": False}] * 50,
    separators=(",", ":"),
)[:-1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class StepClock:
    """Step listener: (time, generated tokens so far) after every step."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def __call__(self, engine: Engine) -> None:
        self.marks.append((time.perf_counter(), engine.stats().generated_tokens))


class HostClock:
    """Scheduler-thread time spent in the constraint's own code: starting and collecting a step's
    masks (``wait`` = mask work the forward pass did not hide), unpacking them, following the
    chosen tokens. (Drawing among the allowed tokens replaces the free draw and costs less, so it
    is not counted.) Wraps the functions in place; only this process is affected."""

    def __init__(self):
        self.total = 0.0
        self.wait = 0.0
        self._wrap(engine_masks.MaskWorker, "start")
        self._wrap(engine_masks.StepMasks, "wait", waits=True)
        self._wrap(generation, "allowed_from_bitmask")
        self._wrap(Matcher, "consume")
        self._wrap(Matcher, "check")

    def _wrap(self, owner, name: str, waits: bool = False) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.total += dt
                if waits:
                    self.wait += dt

        setattr(owner, name, timed)


def burst(engine: Engine, clock: StepClock, n: int, tokens: int, constrained: bool, seed: int) -> list[float]:
    """The decode steps' wall times of ``n`` streams of ``tokens`` tokens, submitted at once."""
    reqs = [
        Request(
            prompt=PROMPT,
            max_tokens=tokens,
            params=edgebox.SamplingParams(seed=seed + i),
            response_format=SCHEMA if constrained else None,
        )
        for i in range(n)
    ]
    g_start = engine.stats().generated_tokens
    clock.marks.clear()
    handles = engine.submit_many(reqs)
    summaries = [h.result() for h in handles]
    assert all(s.done_reason == "length" and s.generated_tokens == tokens for s in summaries), [
        (s.done_reason, s.generated_tokens, s.error) for s in summaries
    ]
    # the first step reads every prompt and samples every first token; the rest are decode steps
    # (a previous burst's idle call may come first, the idle call of this one last: both left out)
    marks = [m for m in clock.marks if m[1] > g_start][:tokens]
    assert len(marks) == tokens and all(m[1] - g_start == n * (i + 1) for i, m in enumerate(marks)), marks
    return [b[0] - a[0] for a, b in zip(marks, marks[1:])]


def mask_costs(model) -> dict:
    """Per-token mask figures on the model's vocabulary, outside the engine."""
    tok = model.tokenizer
    grammar = compile_constraint(tok, Constraint.json_schema(SCHEMA))
    ids = tok.encode(SAMPLE_DOC, add_bos=False)[:-2]  # short of the end: "}]"-like merges are not the schema's
    m = grammar.matcher()
    fill, within, free = [], [], []
    sampler = Sampler(SamplingParams(seed=0))
    row = np.random.default_rng(0).standard_normal(model.args.n_vocab).astype(np.float32)
    out = np.zeros_like(m.bitmask())
    for t in ids:
        t0 = time.perf_counter()
        m.fill_bitmask(out)
        t1 = time.perf_counter()
        sampler.sample(row, ids, allowed=allowed_from_bitmask(out, model.args.n_vocab))
        t2 = time.perf_counter()
        sampler.sample(row, ids)
        t3 = time.perf_counter()
        fill.append(t1 - t0)
        within.append(t2 - t1)
        free.append(t3 - t2)
        m.consume(t)
    # eight matchers at different places in the document, filled at once on llguidance's pool
    from llguidance import LLExecutor

    executor = LLExecutor(num_threads=1)
    matchers = []
    for k in range(8):
        mk = grammar.matcher()
        for t in ids[: 7 * k + 3]:
            mk.consume(t)
        matchers.append(mk)
    par = []
    for _ in range(50):
        t0 = time.perf_counter()
        fill_bitmasks(executor, matchers)
        par.append(time.perf_counter() - t0)

    def us(xs, q):
        return float(np.quantile(np.array(xs) * 1e6, q))

    return {
        "vocab": model.args.n_vocab,
        "doc_tokens": len(ids),
        "fill_us": {"median": us(fill, 0.5), "p90": us(fill, 0.9), "max": us(fill, 1.0)},
        "draw_within_mask_us": {"median": us(within, 0.5), "p90": us(within, 0.9)},
        "draw_free_us": {"median": us(free, 0.5), "p90": us(free, 0.9)},
        "fill8_par_us": {"median": us(par, 0.5), "p90": us(par, 0.9)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=MODEL)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chips", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    LOCK.write_text(f"bench_constrained {time.time():.0f}\n")
    try:
        t = time.perf_counter()
        model = edgebox.load(a.model, chips=a.chips, n_ctx=512)
        engine = Engine(model, max_batch=a.streams, max_queue=4 * a.streams)
        log(f"loaded {Path(a.model).name} and warmed the engine in {time.perf_counter() - t:.1f} s")
        clock, host = StepClock(), HostClock()
        engine.add_step_listener(clock)
        compile_constraint(model.tokenizer, Constraint.json_schema(SCHEMA))  # the LLTokenizer, once
        # free, constrained, free, ..., free: each constrained burst against the mean of the free
        # bursts either side of it, which cancels the machine's drift over the ~30 s they span
        free, rounds = [], []
        free.append(a.streams / statistics.median(burst(engine, clock, a.streams, a.tokens, False, seed=0)))
        for r in range(a.rounds):
            h0, w0 = host.total, host.wait
            steps = burst(engine, clock, a.streams, a.tokens, True, seed=100 * r + 50)
            host_s, wait_s = host.total - h0, host.wait - w0
            free.append(a.streams / statistics.median(burst(engine, clock, a.streams, a.tokens, False, seed=100 * r + 100)))
            # a burst's rate: streams / its median decode step (others' jobs on this machine only
            # ever add time, and a median ignores the steps they hit hardest)
            rate, around = a.streams / statistics.median(steps), (free[-2] + free[-1]) / 2
            rounds.append(
                {
                    "constrained_tok_s": rate,
                    "free_tok_s": around,
                    "ratio": rate / around,
                    "free_drift": free[-1] / free[-2],  # the noise: two free bursts, one apart
                    "constraint_host_ms_per_step": 1e3 * host_s / len(steps),
                    "mask_wait_ms_per_step": 1e3 * wait_s / len(steps),
                    "free_step_ms": 1e3 * a.streams / around,
                }
            )
            x = rounds[-1]
            log(
                f"round {r + 1}: constrained {x['constrained_tok_s']:.2f} tok/s, free around it {x['free_tok_s']:.2f} tok/s, "
                f"ratio {x['ratio']:.3f} (free/free {x['free_drift']:.3f}); constraint code "
                f"{x['constraint_host_ms_per_step']:.2f} ms/step (waiting for masks {x['mask_wait_ms_per_step']:.2f})"
            )
        engine.close(drain=False)
        costs = mask_costs(model)
    finally:
        LOCK.unlink(missing_ok=True)

    ratios = sorted(x["ratio"] for x in rounds)
    report = {
        "model": Path(a.model).name,
        "streams": a.streams,
        "tokens": a.tokens,
        "chips": a.chips,
        "rounds": rounds,
        "median_ratio": statistics.median(ratios),
        "ratio_range": [ratios[0], ratios[-1]],
        "free_drift_range": [min(x["free_drift"] for x in rounds), max(x["free_drift"] for x in rounds)],
        "constraint_host_ms_per_step": statistics.median(x["constraint_host_ms_per_step"] for x in rounds),
        "constraint_host_share": statistics.median(x["constraint_host_ms_per_step"] / x["free_step_ms"] for x in rounds),
        "mask_wait_ms_per_step": statistics.median(x["mask_wait_ms_per_step"] for x in rounds),
        "mask": costs,
    }
    if a.json:
        print(json.dumps(report, indent=2))
        return
    c = costs
    print(
        f"{report['model']}, {a.streams} streams x {a.tokens} tokens, {a.chips} chip(s), {a.rounds} rounds\n"
        f"constrained / free decode tok/s: median {report['median_ratio']:.3f} [{ratios[0]:.3f}-{ratios[-1]:.3f}] "
        f"(loss {100 * (1 - report['median_ratio']):.1f} %); free/free between neighbouring free bursts "
        f"{report['free_drift_range'][0]:.3f}-{report['free_drift_range'][1]:.3f}\n"
        + "".join(f"  round {i + 1}: {x['constrained_tok_s']:.2f} vs {x['free_tok_s']:.2f} tok/s\n" for i, x in enumerate(rounds))
        + f"constraint code on the scheduler thread: {report['constraint_host_ms_per_step']:.2f} ms per step "
        f"({100 * report['constraint_host_share']:.2f} % of a free step), of which waiting for masks after the forward pass "
        f"{report['mask_wait_ms_per_step']:.2f} ms\n"
        f"mask on the {c['vocab']}-token vocabulary ({c['doc_tokens']} tokens of a valid document): "
        f"fill median {c['fill_us']['median']:.0f} us, p90 {c['fill_us']['p90']:.0f} us, max {c['fill_us']['max']:.0f} us; "
        f"unpack + draw among the allowed tokens median {c['draw_within_mask_us']['median']:.0f} us "
        f"(a free draw {c['draw_free_us']['median']:.0f} us); "
        f"8 matchers on llguidance's pool median {c['fill8_par_us']['median']:.0f} us"
    )


if __name__ == "__main__":
    main()
