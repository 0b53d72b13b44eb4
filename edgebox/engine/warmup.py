"""Hot standby: the weights packed and every code path compiled and touched before real work.

The first request after a start or a model swap must cost what any other does (the seed
product's headline is first-inference latency). So before the engine serves, ``warm_up`` packs
the weights (``Model.prepare``) and runs greedy requests through the engine itself, so that each
path a real step takes has run once: a prompt chunk, a batched decode (two sequences) and a lone
sequence's decode (the one-call blocks, ``kernels.fused``). Then it forgets them: the prompt
cache, the token rate, the step counters, and the pace of steps that compiled kernels.
"""

from __future__ import annotations

import time

from edgebox.engine.request import Request
from edgebox.text.sampler import SamplingParams


def warm_up(engine) -> float:
    """Warm ``engine`` up (its scheduler thread running, nothing else submitted); returns the seconds it took."""
    t0 = time.perf_counter()
    model = engine.model
    model.prepare()
    greedy = SamplingParams(temperature=0.0)
    ids = model.tokenize(" warm up the engine " * 4, add_bos=False)[: max(1, model.n_ctx // 4)]
    prompt = model.detokenize(ids)
    limit, engine.max_queue = engine.max_queue, max(engine.max_queue, 2)  # a queue of 1 must not refuse the pair
    try:
        handles = [engine.submit(Request(prompt=prompt, max_tokens=3, params=greedy)) for _ in range(2)]
        for h in handles:
            h.result()
        # and one alone: a lone sequence's decode runs the one-call blocks (kernels.fused)
        engine.submit(Request(prompt=prompt, max_tokens=3, params=greedy)).result()
    finally:
        engine.max_queue = limit
    engine.forget_warm_up()
    return time.perf_counter() - t0
