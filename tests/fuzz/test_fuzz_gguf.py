"""Fuzzing the GGUF reader, the metadata -> ``ModelArgs`` step and the tokenizer's configuration.

Property: ``load_gguf`` of any file either succeeds or raises ``ModelError`` with one non-empty
line; no other exception escapes and no example runs longer than ``LIMIT_S`` (a SIGALRM turns a
hang into a failure). The files start from NANO (tools/make_hostile_corpus.py, a complete model of
a few KB) and are broken four ways: random bytes written over the header and metadata (biased to
the integers that break counts and lengths), truncations, metadata values of random GGUF types
under the keys edgebox reads, and well-typed but random tokenizer tables.

Bounded for CI: ``EXAMPLES`` per property (EDGEBOX_FUZZ_EXAMPLES overrides it), derandomized so
that a run is repeatable; EDGEBOX_FUZZ_RANDOM=1 draws fresh examples (longer campaigns by hand).
Every finding became a fixed case in the hostile corpus.
"""

from __future__ import annotations

import os
import signal
import struct
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgebox.errors import ModelError
from edgebox.gguf import metadata
from edgebox.gguf.loader import load_gguf
from tools.make_hostile_corpus import ARR, BOOL, F32, F64, I8, I16, I32, I64, RAW, STR, TOKENS, U8, U16, U32, U64, nano

EXAMPLES = int(os.environ.get("EDGEBOX_FUZZ_EXAMPLES", "300"))
LIMIT_S = 5.0
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("EDGEBOX_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NANO = nano()
GOOD = NANO.to_bytes()
HEADER_END = len(b"".join(NANO.header_parts()))
_DIR = Path(tempfile.mkdtemp(prefix="edgebox-fuzz-"))


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"one example ran longer than {LIMIT_S} s")


def load_or_refuse(data: bytes) -> str:
    """Load ``data`` as a GGUF file: "ok", or the ModelError's line. Anything else fails the test."""
    path = _DIR / "fuzz.gguf"
    path.write_bytes(data)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    t0 = time.perf_counter()
    try:
        load_gguf(path)
        return "ok"
    except ModelError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        return message
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        assert time.perf_counter() - t0 < LIMIT_S


def test_nano_loads():
    assert load_or_refuse(GOOD) == "ok"


# -- bytes ------------------------------------------------------------------------------------------

_EDGES = [0, 1, 2, 3, 7, 8, 9, 12, 13, 31, 32, 33, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1]
_writes = st.one_of(
    st.tuples(st.integers(0, HEADER_END - 1), st.binary(min_size=1, max_size=4)),
    st.tuples(st.integers(0, HEADER_END - 8), st.sampled_from(_EDGES).map(lambda n: struct.pack("<Q", n))),
    st.tuples(
        st.integers(0, HEADER_END - 4), st.sampled_from([n for n in _EDGES if n < 2**32]).map(lambda n: struct.pack("<I", n))
    ),
)


@pytest.mark.slow
@FUZZ
@given(writes=st.lists(_writes, min_size=1, max_size=6), cut=st.one_of(st.none(), st.integers(0, len(GOOD))))
def test_mutated_header_and_metadata(writes, cut):
    data = bytearray(GOOD)
    for at, raw in writes:
        data[at : at + len(raw)] = raw
    load_or_refuse(bytes(data[:cut] if cut is not None else data))


@pytest.mark.slow
@FUZZ
@given(cut=st.integers(0, len(GOOD) - 1))
def test_every_truncation(cut):
    assert load_or_refuse(GOOD[:cut]) != "ok"


# -- metadata values of random types under the keys edgebox reads ------------------------------------

_INTS = {U8: (0, 2**8 - 1), I8: (-(2**7), 2**7 - 1), U16: (0, 2**16 - 1), I16: (-(2**15), 2**15 - 1)}
_INTS |= {U32: (0, 2**32 - 1), I32: (-(2**31), 2**31 - 1), U64: (0, 2**64 - 1), I64: (-(2**63), 2**63 - 1)}


def _scalar(vtype: int) -> st.SearchStrategy:
    if vtype in _INTS:
        lo, hi = _INTS[vtype]
        return st.one_of(st.integers(lo, hi), st.sampled_from([max(lo, min(hi, n)) for n in (-1, 0, 1, 2, 3, 7, 8, 9, 64)]))
    if vtype == F32:
        return st.floats(width=32)
    if vtype == F64:
        return st.floats()
    if vtype == BOOL:
        return st.booleans()
    return st.text(max_size=12)  # STR


_SCALAR_TYPES = [U8, I8, U16, I16, U32, I32, F32, BOOL, STR, U64, I64, F64]
_values = st.sampled_from(_SCALAR_TYPES).flatmap(lambda t: st.tuples(st.just(t), _scalar(t)))
_arrays = st.sampled_from(_SCALAR_TYPES).flatmap(
    lambda t: st.tuples(st.just(ARR), st.tuples(st.just(t), st.lists(_scalar(t), max_size=10)))
)
_nested = st.integers(1, 3).map(lambda n: (ARR, (ARR, [(I32, [])] * n)))
_any_value = st.one_of(_values, _arrays, _nested)
_KEYS = [k.replace("{arch}", "llama") for k in metadata.TABLE] + ["llama.rope.scaling.type", "general.tags"]


@pytest.mark.slow
@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(_KEYS), _any_value), min_size=1, max_size=3), linear=st.booleans())
def test_random_metadata_types(changes, linear):
    model = NANO.with_kv("llama.rope.scaling.type", STR, "linear") if linear else NANO
    for key, (vtype, value) in changes:
        model = model.with_kv(key, vtype, value)
    load_or_refuse(model.to_bytes())


# -- well-typed but random tokenizer tables -------------------------------------------------------------

_token_text = st.one_of(st.sampled_from(TOKENS + ["<0x41>", "<0x4", "", " ", "<|im_end|>", "\u0120a"]), st.text(max_size=6))


@pytest.mark.slow
@FUZZ
@given(
    tokens=st.lists(_token_text, min_size=1, max_size=12),
    merges=st.lists(st.one_of(st.sampled_from(["h i", "a b", " h", "h ", "x y", "hi a"]), st.text(max_size=6)), max_size=6),
    types=st.lists(st.integers(-1, 8), max_size=14),
    bos=st.integers(0, 13),
    pre=st.sampled_from(["llama-bpe", "qwen2", "deepseek-llm", "deepseek-coder", "gpt-2", ""]),
)
def test_random_tokenizer_tables(tokens, merges, types, bos, pre):
    model = NANO.without("llama.vocab_size").with_kv("tokenizer.ggml.tokens", ARR, (STR, tokens))
    model = model.with_kv("tokenizer.ggml.merges", ARR, (STR, merges)).with_kv("tokenizer.ggml.token_type", ARR, (I32, types))
    model = model.with_kv("tokenizer.ggml.bos_token_id", U32, bos).with_kv("tokenizer.ggml.eos_token_id", U32, 0)
    load_or_refuse(model.with_kv("tokenizer.ggml.pre", STR, pre).to_bytes())


@pytest.mark.parametrize("depth", [9, 1000, 50_000])
def test_deeply_nested_arrays(depth):
    raw = struct.pack("<I", ARR) + struct.pack("<IQ", ARR, 1) * (depth - 1) + struct.pack("<IQ", I32, 0)
    assert "nests arrays more than 8 deep" in load_or_refuse(NANO.with_kv("general.tags", RAW, raw).to_bytes())
