"""The warm-up leaves the engine compiled: real requests after it load or compile no numba code.

Numba's dispatchers are global to a process, so each case runs in a fresh one: it records every
signature a dispatcher adds (``Dispatcher.add_overload``: a compile, or a load from numba's disk
cache), builds the engine, then serves requests of each kind of step the warm-up claims (prompt
chunks of two sequences, their batched decode, a lone sequence's prompt and decode, a prompt read
while another sequence decodes). Without the warm-up the same requests must add signatures, or
the record would prove nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.paths import REPO, TEST_MODEL

SCRIPT = r"""
import json, sys
from numba.core.dispatcher import Dispatcher
import edgebox
from edgebox.engine import Engine, Request

added = []  # every signature compiled or loaded from numba's cache goes through add_overload
add_overload = Dispatcher.add_overload
Dispatcher.add_overload = lambda d, cres: (added.append(f"{d.py_func.__qualname__}{cres.signature}"), add_overload(d, cres))[1]

m = edgebox.load(sys.argv[1], chips=4)
e = Engine(m, max_batch=4, warmup=sys.argv[2] == "1")
n = len(added)
params = edgebox.SamplingParams(seed=1)  # the default chain, not only greedy
prompts = ["def add(a, b):", "import numpy as np\n"]
for h in [e.submit(Request(prompt=p, max_tokens=4, params=params)) for p in prompts]:
    assert h.result().generated_tokens >= 1
assert e.generate(Request(prompt="class Stack:", max_tokens=4, params=params)).generated_tokens >= 1
# a prompt read while another sequence decodes (a mixed step)
running = e.submit(Request(prompt="for i in range(10):", max_tokens=8, params=params))
next(iter(running))  # its first token is out: it decodes in the next steps
assert e.generate(Request(prompt="while True:", max_tokens=2, params=params)).generated_tokens >= 1
assert running.result().generated_tokens >= 1
e.close()
print(json.dumps(added[n:]))
"""


def signatures_added_by_requests(warmup: bool) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(TEST_MODEL), "1" if warmup else "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_requests_after_the_warm_up_compile_nothing():
    assert signatures_added_by_requests(warmup=True) == []


@pytest.mark.slow
def test_without_the_warm_up_the_same_requests_compile():
    assert signatures_added_by_requests(warmup=False) != []
