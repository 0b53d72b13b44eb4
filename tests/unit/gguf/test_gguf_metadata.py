"""Hostile metadata and tensor tables: every key of gguf.metadata.TABLE refuses a value of the wrong
kind with one line naming the file, the key, what it holds and what was expected; the parser does
not recurse without bound, wrap int64, accept misaligned offsets or open what is not a file.

The files are NANO (tools/make_hostile_corpus.py: a complete model of a few KB) with one thing
changed; ``assert_refused`` checks ``edgebox.load`` and ``edgebox info`` alike.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import replace

import numpy as np
import pytest

import edgebox
from edgebox.gguf import metadata
from edgebox.gguf.file import MAX_ARRAY_DEPTH, GGUFFile
from tests.unit.gguf.test_gguf_loader import assert_refused, run_cli
from tools.make_hostile_corpus import ARR, BOOL, F32, F64, I32, RAW, STR, U32, U64, Tensor, nano

BASE = nano()


def write(tmp_path, model=BASE, name="model.gguf"):
    path = tmp_path / name
    path.write_bytes(model.to_bytes())
    return path


def test_nano_loads(tmp_path):
    m = edgebox.load(write(tmp_path), backend="ref")
    assert m.args.n_vocab == 8 and m.tokenize("hi") == [3, 2]


# One wrong value per kind in the table, and the words the line must hold.
WRONG = {
    metadata.STRING: (U32, 7, "holds the integer 7, expected a string"),
    metadata.BOOL: (STR, "yes", "holds the string 'yes', expected a bool"),
    metadata.COUNT: (F32, float("nan"), "holds the number nan, expected an integer"),
    metadata.POSITIVE: (STR, "abc", "holds the string 'abc', expected a finite number > 0"),
    metadata.EPSILON: (ARR, (F32, [1e-5]), "holds an array of 1 float32, expected a finite number in (0, 1)"),
    metadata.ALIGNMENT: (BOOL, True, "holds the bool True, expected a uint32 power of two"),
    metadata.STRINGS: (ARR, (I32, [1, 2]), "holds an array of 2 int32, expected an array of strings"),
    metadata.INTEGERS: (ARR, (STR, ["1"] * 8), "holds an array of 8 strings, expected an array of integers"),
    metadata.TOKEN_ID: (F32, 3.0, "holds the number 3.0, expected a token id in [0, n_vocab)"),
}


@pytest.mark.parametrize("pattern", list(metadata.TABLE))
def test_every_key_of_the_table_refuses_a_value_of_the_wrong_kind(tmp_path, capsys, pattern):
    key = pattern.replace("{arch}", "llama")
    vtype, value, words = WRONG[metadata.TABLE[pattern]]
    model = BASE.with_kv(key, vtype, value)
    assert_refused(write(tmp_path, model), [f"model.gguf: metadata {key} {words}"], capsys)


@pytest.mark.parametrize(
    "key, vtype, value, words",
    [
        ("llama.rope.freq_base", F32, float("inf"), "holds the number inf"),  # accepted before
        ("llama.rope.freq_base", F64, -1.0, "holds the number -1.0"),
        ("llama.vocab_size", STR, "8", "holds the string '8'"),  # int("8") accepted it before
        ("llama.context_length", BOOL, True, "holds the bool True"),
        ("llama.block_count", U64, 2**40, "holds the integer 1099511627776"),
        ("general.alignment", U32, 48, "holds the integer 48, expected a uint32 power of two"),
        ("tokenizer.ggml.bos_token_id", U32, 8, "holds the integer 8, expected a token id in [0, n_vocab) (n_vocab 8)"),
        ("tokenizer.ggml.eos_token_id", I32, -1, "holds the integer -1"),
        ("tokenizer.ggml.add_bos_token", U32, 1, "holds the integer 1, expected a bool"),
        ("tokenizer.ggml.pre", ARR, (STR, ["qwen2"]), "holds an array of 1 strings"),
    ],
)
def test_values_of_the_right_type_but_out_of_range(tmp_path, capsys, key, vtype, value, words):
    assert_refused(write(tmp_path, BASE.with_kv(key, vtype, value)), [f"metadata {key} {words}"], capsys)


def test_integers_of_any_width_and_floats_as_float64_are_accepted(tmp_path):
    model = BASE.with_kv("llama.context_length", U64, 64).with_kv("llama.rope.freq_base", F64, 10000.0)
    model = model.with_kv("llama.attention.layer_norm_rms_epsilon", F64, 1e-5).with_kv("llama.block_count", I32, 1)
    assert edgebox.load(write(tmp_path, model), backend="ref").args.n_ctx_train == 64


def test_a_byte_token_must_be_written_as_its_byte(tmp_path, capsys):
    model = BASE.with_kv("tokenizer.ggml.token_type", ARR, (I32, [1, 1, 6, 3, 3, 1, 1, 1]))
    assert_refused(write(tmp_path, model), ["token 2 ('hi') has token_type 6 (byte) but is not written <0xNN>"], capsys)
    # a byte token written as its byte is fine (no merge may then use "h": it is not in the vocabulary)
    tokens = ["<0x68>", "i", "hi", "<s>", "</s>", "a", "b", "ab"]
    fine = BASE.with_kv("tokenizer.ggml.tokens", ARR, (STR, tokens)).with_kv("tokenizer.ggml.merges", ARR, (STR, ["a b"]))
    fine = fine.with_kv("tokenizer.ggml.token_type", ARR, (I32, [6, 1, 1, 3, 3, 1, 1, 1]))
    assert edgebox.load(write(tmp_path, fine, "fine.gguf"), backend="ref").detokenize([0]) == "h"


# -- the parser --------------------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return struct.pack("<I", ARR) + struct.pack("<IQ", ARR, 1) * (depth - 1) + struct.pack("<IQ", I32, 0)


def test_50000_nested_arrays_are_refused_without_recursing(tmp_path, capsys):
    assert_refused(write(tmp_path, BASE.with_kv("general.tags", RAW, nested(50_000))), ["nests arrays more than 8 deep"], capsys)


def test_arrays_nested_up_to_the_limit_still_parse(tmp_path):
    f = GGUFFile(write(tmp_path, BASE.with_kv("general.tags", RAW, nested(MAX_ARRAY_DEPTH))))
    value = f.fields["general.tags"]
    for _ in range(MAX_ARRAY_DEPTH - 1):
        value = value[0]
    assert value.size == 0


def test_a_key_appears_once(tmp_path, capsys):
    model = BASE.with_kv("general.name", STR, "x")
    model.kvs.append(("general.name", STR, "y"))
    assert_refused(write(tmp_path, model), ["metadata key 'general.name' appears twice"], capsys)


def test_big_endian_file_is_named(tmp_path, capsys):
    data = bytearray(BASE.to_bytes())
    data[4:8] = struct.pack(">I", 3)
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(data))
    assert_refused(path, ["model.gguf is a big-endian GGUF"], capsys)


def test_misaligned_tensor_offset_is_refused(tmp_path, capsys):
    model = BASE.with_tensor("output.weight", offset=4)
    assert_refused(
        write(tmp_path, model), ["tensor 'output.weight' starts at data offset 4, not a multiple of general.alignment 32"], capsys
    )


def test_offsets_follow_a_larger_alignment(tmp_path):
    model = BASE.with_kv("general.alignment", U32, 64)
    model.alignment = 64
    assert edgebox.load(write(tmp_path, model), backend="ref").args.n_embd == 8
    laid_out_for_32 = BASE.with_kv("general.alignment", U32, 64)
    with pytest.raises(edgebox.ModelError, match="not a multiple of general.alignment 64"):
        GGUFFile(write(tmp_path, laid_out_for_32, "m32.gguf"))


@pytest.mark.parametrize("ne", [[8, 2**32, 2**32], [8, 2**21, 2**21, 2**22], [2**16] * 4])
def test_dimension_products_that_wrap_int64_are_refused(tmp_path, capsys, ne):
    """Before: the first two loaded (their row count, np.prod in int64, wrapped to 0: no bytes); the
    element count of all three wrapped to 0 (``edgebox info``'s parameter count)."""
    model = replace(BASE, tensors=BASE.tensors + [Tensor("extra.weight", ne, np.ones(8, "<f4").tobytes())])
    assert_refused(write(tmp_path, model), ["tensor 'extra.weight' has absurd dimensions"], capsys)


def test_unused_tensor_of_unknown_type_loads_and_info_names_it(tmp_path, capsys):
    model = replace(BASE, tensors=BASE.tensors + [Tensor("extra.weight", [8], np.ones(8, "<f4").tobytes(), 99)])
    path = write(tmp_path, model)
    assert edgebox.load(path, backend="ref").args.n_layer == 1
    code, out, err = run_cli(["info", str(path)], capsys)
    assert code == 0, err
    assert "unknown type 99 0%" in out


def test_tensor_name_longer_than_llama_cpp_allows(tmp_path, capsys):
    model = replace(BASE, tensors=BASE.tensors + [Tensor("x" * 64, [8], np.ones(8, "<f4").tobytes())])
    assert_refused(write(tmp_path, model), ["is longer than 63 bytes"], capsys)


# -- what is opened -----------------------------------------------------------------------------------


def test_a_directory_is_not_a_model(tmp_path, capsys):
    assert_refused(tmp_path, [f"{tmp_path} is a directory, not a GGUF model file"], capsys)


def test_a_fifo_is_refused_at_once(tmp_path, capsys):
    """Before: open() waited for a writer forever."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    t = threading.Thread(target=lambda: result.append(_error_of(fifo)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "edgebox.load blocked on a FIFO"
    assert isinstance(result[0], edgebox.ModelError) and "is a FIFO, not a GGUF model file" in str(result[0])
    assert_refused(fifo, ["is a FIFO"], capsys)


def _error_of(path) -> BaseException | None:
    try:
        edgebox.load(path)
    except BaseException as e:  # the test asserts on the type
        return e
    return None


def test_a_character_device_is_refused(capsys):
    assert_refused("/dev/zero", ["/dev/zero is a character device"], capsys)


@pytest.mark.parametrize("name", ["a\0b.gguf", "a\ud800.gguf"])
def test_unopenable_path_names(tmp_path, name):
    with pytest.raises(edgebox.ModelError, match="cannot open model file"):
        edgebox.load(str(tmp_path / name))
