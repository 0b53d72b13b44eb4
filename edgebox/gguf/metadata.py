"""The one table of the GGUF metadata edgebox reads: each key and the kind of value it must hold.

A broken or hostile file can store any value type under any key: a string where a number belongs,
NaN or inf, integers where token texts belong, a bool where llama.cpp reads a uint32. ``check``
runs once, where the values are read from the file (``gguf.file``, right after the metadata
section), over every key of ``TABLE`` the file holds. Everything above it (``ModelArgs``, the
tokenizer, ``edgebox info``, the chat template) then reads only values of the expected kind, and
a wrong one is refused with one line naming the file, the key, what it holds and what was expected.

``{arch}`` stands for the file's ``general.architecture``. An integer may be stored with any GGUF
integer type and a float as float32, float64 or an integer; a bool is never a number (GGUF stores
it apart). Relations between keys (head counts that divide, the token_type list as long as the
token list) are checked where they are used: ``ModelArgs`` and ``Tokenizer``. Keys not in the
table are not read by edgebox.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edgebox.errors import ModelError

_MAX_COUNT = 2**31  # hyper-parameters beyond this are absurd (and overflow int32 index math)


@dataclass(frozen=True)
class Kind:
    """What a key must hold: ``ok(value, n_vocab)`` says whether it does (``n_vocab`` is the
    length of tokenizer.ggml.tokens, or None when the file has no valid token list)."""

    expected: str
    ok: Callable[[object, int | None], bool]


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: object) -> bool:
    return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(v)


def _str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _int_array(v: object) -> bool:
    if isinstance(v, np.ndarray):
        return v.ndim == 1 and v.dtype.kind in "iu"
    return isinstance(v, list) and all(_is_int(x) for x in v)


STRING = Kind("a string", lambda v, n: isinstance(v, str))
BOOL = Kind("a bool", lambda v, n: isinstance(v, (bool, np.bool_)))
COUNT = Kind(f"an integer in [1, {_MAX_COUNT}]", lambda v, n: _is_int(v) and 1 <= v <= _MAX_COUNT)
POSITIVE = Kind("a finite number > 0", lambda v, n: _is_real(v) and v > 0)
EPSILON = Kind("a finite number in (0, 1)", lambda v, n: _is_real(v) and 0 < v < 1)
ALIGNMENT = Kind("a uint32 power of two", lambda v, n: _is_int(v) and 0 < v < 2**32 and v & (v - 1) == 0)
STRINGS = Kind("an array of strings", lambda v, n: _str_list(v))
INTEGERS = Kind("an array of integers", lambda v, n: _int_array(v))
TOKEN_ID = Kind("a token id in [0, n_vocab)", lambda v, n: _is_int(v) and 0 <= v and (n is None or v < n))

TABLE: dict[str, Kind] = {
    "general.architecture": STRING,
    "general.alignment": ALIGNMENT,
    "general.name": STRING,
    "general.description": STRING,
    "{arch}.vocab_size": COUNT,
    "{arch}.context_length": COUNT,
    "{arch}.embedding_length": COUNT,
    "{arch}.block_count": COUNT,
    "{arch}.feed_forward_length": COUNT,
    "{arch}.attention.head_count": COUNT,
    "{arch}.attention.head_count_kv": COUNT,
    "{arch}.attention.layer_norm_rms_epsilon": EPSILON,
    "{arch}.rope.dimension_count": COUNT,
    "{arch}.rope.freq_base": POSITIVE,
    "{arch}.rope.scaling.type": STRING,
    "{arch}.rope.scaling.factor": POSITIVE,
    "tokenizer.ggml.model": STRING,
    "tokenizer.ggml.pre": STRING,
    "tokenizer.ggml.tokens": STRINGS,  # first: the token ids below are checked against its length
    "tokenizer.ggml.merges": STRINGS,
    "tokenizer.ggml.token_type": INTEGERS,
    "tokenizer.ggml.add_bos_token": BOOL,
    "tokenizer.ggml.bos_token_id": TOKEN_ID,
    "tokenizer.ggml.eos_token_id": TOKEN_ID,
    "tokenizer.ggml.eot_token_id": TOKEN_ID,
    "tokenizer.ggml.eom_token_id": TOKEN_ID,
    "tokenizer.ggml.fim_pad_token_id": TOKEN_ID,
    "tokenizer.ggml.fim_rep_token_id": TOKEN_ID,
    "tokenizer.ggml.fim_sep_token_id": TOKEN_ID,
    "tokenizer.chat_template": STRING,
}


def describe(value: object) -> str:
    """What a metadata value is, short enough for a one-line message."""
    if isinstance(value, (bool, np.bool_)):
        return f"the bool {bool(value)}"
    if _is_int(value):
        return f"the integer {int(value)}"
    if isinstance(value, (float, np.floating)):
        return f"the number {float(value)!r}"
    if isinstance(value, str):
        text = repr(value[:40]) + ("..." if len(value) > 40 else "")
        return f"the string {text}"
    if isinstance(value, np.ndarray):
        return f"an array of {value.size} {'bool' if value.dtype.kind == 'b' else value.dtype.name}"
    if isinstance(value, list):
        if not value:
            return "an empty array"
        first = value[0]
        item = "strings" if isinstance(first, str) else "arrays" if isinstance(first, (list, np.ndarray)) else "values"
        return f"an array of {len(value)} {item}"
    return f"a {type(value).__name__}"


def check(fields: Mapping[str, object], source: str) -> None:
    """Refuse the first key of ``TABLE`` whose value is not of its kind (one line, ``ModelError``)."""
    arch = fields.get("general.architecture")
    n_vocab = None
    for pattern, kind in TABLE.items():
        if "{arch}" in pattern:
            if not isinstance(arch, str):
                continue  # ModelArgs refuses a missing or unknown architecture by name
            key = pattern.replace("{arch}", arch)
        else:
            key = pattern
        if key not in fields:
            continue
        value = fields[key]
        if not kind.ok(value, n_vocab):
            shown = key if len(key) <= 80 else key[:80] + "..."
            raise ModelError(
                f"{source}: metadata {shown} holds {describe(value)}, expected {kind.expected}"
                + (f" (n_vocab {n_vocab})" if kind is TOKEN_ID and n_vocab is not None else "")
                + "; the file is broken or hostile, re-convert it with llama.cpp's convert_hf_to_gguf.py"
            )
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
