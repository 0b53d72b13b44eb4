"""Hot standby: the weights packed and every kind of step compiled and run before real work.

The first request after a start or a model swap must cost what any other does (the seed
product's headline is first-inference latency). So before the engine serves, ``warm_up`` packs
the weights (``Model.prepare``) and runs each kind of step once, through the engine itself: a
prompt chunk beside another sequence's one-token row (a mixed step), a batched decode, and a lone
sequence's decode (every layer in one hand-off, ``chips.decode``). A step compiles its kernels and maps
the pages of every weight whatever its rows, so the smallest of each kind is enough: a 2-token
and a 1-token prompt, greedy and blind to EOG so the steps are certain, the shorter ending a step
earlier (3 forward passes of at most 3 rows; a 7B costs 0.2-0.5 s each on two cores). Then the
engine forgets them: the prompt cache, the token rate, the step counters and the pace of steps
that compiled kernels.

Not covered: runtime thresholds tiny steps stay under (the activation quantizer's parallel
variant from 32 rows, parallel decode attention from 512 cached tokens, an autotuned backend for
more rows): each costs its first use a load from numba's cache (~10 ms), or a compile when that
cache is empty.
"""

from __future__ import annotations

import time

from edgebox.engine.request import Request
from edgebox.text.sampler import SamplingParams

# (prompt tokens, max_tokens): admitted together, the first step reads the 2-token prompt beside
# the 1-token one's row, the next decodes both, the last decodes the first alone
STEPS = ((2, 3), (1, 2))


def warm_up(engine) -> float:
    """Warm ``engine`` up (its scheduler thread running, nothing else submitted); returns the seconds it took."""
    t0 = time.perf_counter()
    model = engine.model
    model.prepare()
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    words = model.tokenize(" warm up the engine", add_bos=False) * 2
    pair = [Request(prompt_ids=tuple(words[:n]), max_tokens=m, params=params) for n, m in STEPS]
    limit, engine.max_queue = engine.max_queue, max(engine.max_queue, len(pair))  # a queue of 1 must not refuse the pair
    try:
        for h in engine.submit_many(pair):
            h.result()
    finally:
        engine.max_queue = limit
    engine.forget_warm_up()
    return time.perf_counter() - t0
