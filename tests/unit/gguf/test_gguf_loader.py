"""GGUF loading: good files load as views; every kind of broken or hostile file gets one clear line.

Each error case is checked twice: ``edgebox.load`` raises ``ModelError`` with the expected words,
and ``edgebox info FILE`` exits 2 with exactly one line on stderr and no traceback.
"""

from __future__ import annotations

import struct
import sys

import gguf
import numpy as np
import pytest

import edgebox
from edgebox.cli import main as cli_main
from edgebox.gguf.file import GGUFFile


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    argv = sys.argv
    sys.argv = ["edgebox", *args]
    try:
        with pytest.raises(SystemExit) as exc:
            cli_main()
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_refused(path, words: list[str], capsys) -> None:
    with pytest.raises(edgebox.ModelError) as exc:
        edgebox.load(path)
    message = str(exc.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    code, _, err = run_cli(["info", str(path)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("edgebox: error: ")


def test_micro_model_loads_as_views(micro_gguf):
    path = micro_gguf()
    m = edgebox.load(path)
    assert m.args.arch == "llama" and m.args.n_embd == 32
    wq = m.weights.layers[0].wq
    # the weight is a view into the file's mmap, not a copy
    assert not wq.data.flags.owndata and wq.data.base is not None
    logits = m.logits([257, 72, 105])
    assert logits.shape == (3, 259) and np.isfinite(logits).all()


def test_not_a_gguf(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert_refused(path, ["not a GGUF"], capsys)


def test_tiny_file(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert_refused(path, ["not a GGUF", "too short"], capsys)


def test_missing_file(tmp_path, capsys):
    assert_refused(tmp_path / "nope.gguf", ["cannot open", "nope.gguf"], capsys)


@pytest.mark.parametrize("keep_fraction", [0.01, 0.3])
def test_truncated_header(micro_gguf, keep_fraction, capsys):
    path = micro_gguf()
    data = path.read_bytes()
    header_end = GGUFFile(path).data_offset
    path.write_bytes(data[: max(24, int(header_end * keep_fraction))])
    assert_refused(path, ["truncated"], capsys)


def test_truncated_data(micro_gguf, capsys):
    path = micro_gguf()
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    assert_refused(path, ["truncated data", "tensor"], capsys)


def test_unsupported_version(micro_gguf, capsys):
    path = micro_gguf()
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    path.write_bytes(bytes(data))
    assert_refused(path, ["version 99"], capsys)


def test_absurd_tensor_count(micro_gguf, capsys):
    path = micro_gguf()
    data = bytearray(path.read_bytes())
    data[8:16] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(data))
    assert_refused(path, [str(2**40), "tensors"], capsys)


def test_absurd_string_length(micro_gguf, capsys):
    path = micro_gguf()
    data = bytearray(path.read_bytes())
    data[24:32] = struct.pack("<Q", 2**62)  # length of the first metadata key
    path.write_bytes(bytes(data))
    assert_refused(path, ["truncated"], capsys)


def test_unknown_architecture(micro_gguf, capsys):
    assert_refused(micro_gguf(arch="mamba9"), ["'mamba9'", "not supported", "llama"], capsys)


def test_unsupported_tensor_type(micro_gguf, capsys):
    path = micro_gguf(raw_types={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.IQ4_NL})
    assert_refused(path, ["blk.0.ffn_up.weight", "IQ4_NL", "does not support"], capsys)


def test_missing_tensor(micro_gguf, capsys):
    assert_refused(micro_gguf(skip=("blk.0.ffn_down.weight",)), ["blk.0.ffn_down.weight", "missing"], capsys)


def test_wrong_shape(micro_gguf, capsys):
    path = micro_gguf(shapes={"blk.0.attn_k.weight": (16, 32)})
    assert_refused(path, ["blk.0.attn_k.weight", "[16, 32]", "expected [32, 32]"], capsys)


def test_vocab_size_mismatch(micro_gguf, capsys):
    assert_refused(micro_gguf(vocab_size=300), ["vocabulary size mismatch", "259", "300"], capsys)


def test_tied_embeddings_without_output(micro_gguf):
    m = edgebox.load(micro_gguf(skip=("output.weight",)))
    assert m.weights.tied_embeddings and m.weights.output is m.weights.token_embd
    assert m.logits([257, 65]).shape == (2, 259)


def test_info_on_good_file(micro_gguf, capsys):
    code, out, err = run_cli(["info", str(micro_gguf())], capsys)
    assert code == 0, err
    assert "architecture" in out and "llama" in out and "F32" in out and "chat template" in out
