"""Write the hostile GGUF corpus: small broken or malicious files and the one line each must give.

    python tools/make_hostile_corpus.py [OUT_DIR]     # default tests/data/hostile

Every file is NANO (a complete llama model of a few KB: 8 tokens, width 8, one layer, F32) with
one thing broken, written byte by byte here (not with gguf-py's writer, which cannot write
duplicate keys, misaligned offsets or lying counts). ``expected.json`` maps each file to what
``edgebox info FILE`` and ``edgebox run FILE -p hi -n 1`` must do: the exit code and a piece of
the one error line. ``tests/integration/test_hostile_corpus.py`` runs them and checks that the
committed files are the ones this script writes; ``tests/fuzz/test_fuzz_gguf.py`` mutates NANO.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "hostile"

# GGUF value types and GGML tensor types (the file format's numbers, as in gguf-py's constants)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_PACK = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
GGML_F32, GGML_Q8_0 = 0, 8


def encode(vtype: int, value) -> bytes:
    """A metadata value's bytes; an array is (item type, items)."""
    if vtype == STR:
        raw = value.encode() if isinstance(value, str) else value
        return struct.pack("<Q", len(raw)) + raw
    if vtype == ARR:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(encode(item_type, v) for v in items)
    return struct.pack(_PACK[vtype], value)


@dataclass
class Tensor:
    name: str
    ne: list[int]  # GGUF order: ne[0] is the row length
    data: bytes
    ggml_type: int = GGML_F32
    offset: int | None = None  # None: the next aligned offset


@dataclass
class Model:
    """A GGUF file's parts; ``to_bytes`` lays them out (counts, offsets and padding derived
    unless overridden)."""

    kvs: list[tuple[str, int, object]]  # (key, value type, value); RAW: value is the bytes after the type
    tensors: list[Tensor]
    magic: bytes = b"GGUF"
    version: int = 3
    n_tensors: int | None = None
    n_kv: int | None = None
    alignment: int = 32

    def with_kv(self, key: str, vtype: int, value) -> Model:
        """This model with ``key`` set (replaced in place, or appended)."""
        kvs = [kv for kv in self.kvs if kv[0] != key]
        at = next((i for i, kv in enumerate(self.kvs) if kv[0] == key), len(kvs))
        kvs.insert(at, (key, vtype, value))
        return replace(self, kvs=kvs)

    def without(self, key: str) -> Model:
        return replace(self, kvs=[kv for kv in self.kvs if kv[0] != key])

    def with_tensor(self, name: str, **changes) -> Model:
        return replace(self, tensors=[replace(t, **changes) if t.name == name else t for t in self.tensors])

    def header_parts(self) -> list[bytes]:
        """The bytes of each section: fixed header, every KV, every tensor info (for truncations)."""
        parts = [self.magic + struct.pack("<IQQ", self.version, _n(self.n_tensors, self.tensors), _n(self.n_kv, self.kvs))]
        for key, vtype, value in self.kvs:
            body = value if vtype == RAW else encode(vtype, value)
            parts.append(encode(STR, key) + (b"" if vtype == RAW else struct.pack("<I", vtype)) + body)
        offset = 0
        for t in self.tensors:
            at = offset if t.offset is None else t.offset
            info = encode(STR, t.name) + struct.pack("<I", len(t.ne)) + b"".join(struct.pack("<Q", d) for d in t.ne)
            parts.append(info + struct.pack("<IQ", t.ggml_type, at))
            offset = _pad(offset + len(t.data), self.alignment)
        return parts

    def to_bytes(self) -> bytes:
        out = bytearray(b"".join(self.header_parts()))
        out += bytes(_pad(len(out), self.alignment) - len(out))
        for t in self.tensors:
            out += t.data + bytes(_pad(len(t.data), self.alignment) - len(t.data))
        return bytes(out)


RAW = -1  # a KV whose value type and value are given as raw bytes


def _n(override: int | None, items: list) -> int:
    return len(items) if override is None else override


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


TOKENS = ["h", "i", "hi", "<s>", "</s>", "a", "b", "ab"]
N_EMBD, N_HEAD, N_FF, N_CTX = 8, 2, 16, 64


def nano() -> Model:
    """NANO: llama, 8 tokens (BOS 3, EOS 4; "hi" is one token), width 8, two heads, FFN 16, one
    layer, F32 weights from a fixed seed. ``edgebox run NANO -p hi -n 1`` works."""
    rng = np.random.RandomState(0)
    d, f, v = N_EMBD, N_FF, len(TOKENS)

    def w(*shape: int) -> bytes:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype("<f4").tobytes()

    def norm(n: int) -> bytes:
        return np.ones(n, "<f4").tobytes()

    kvs = [
        ("general.architecture", STR, "llama"),
        ("general.name", STR, "nano"),
        ("llama.context_length", U32, N_CTX),
        ("llama.embedding_length", U32, d),
        ("llama.block_count", U32, 1),
        ("llama.feed_forward_length", U32, f),
        ("llama.attention.head_count", U32, N_HEAD),
        ("llama.attention.head_count_kv", U32, N_HEAD),
        ("llama.rope.dimension_count", U32, d // N_HEAD),
        ("llama.rope.freq_base", F32, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.vocab_size", U32, v),
        ("tokenizer.ggml.model", STR, "gpt2"),
        ("tokenizer.ggml.pre", STR, "llama-bpe"),
        ("tokenizer.ggml.tokens", ARR, (STR, TOKENS)),
        ("tokenizer.ggml.token_type", ARR, (I32, [1, 1, 1, 3, 3, 1, 1, 1])),
        ("tokenizer.ggml.merges", ARR, (STR, ["h i", "a b"])),
        ("tokenizer.ggml.bos_token_id", U32, 3),
        ("tokenizer.ggml.eos_token_id", U32, 4),
    ]
    tensors = [
        Tensor("token_embd.weight", [d, v], w(v, d)),
        Tensor("blk.0.attn_norm.weight", [d], norm(d)),
        Tensor("blk.0.attn_q.weight", [d, d], w(d, d)),
        Tensor("blk.0.attn_k.weight", [d, d], w(d, d)),
        Tensor("blk.0.attn_v.weight", [d, d], w(d, d)),
        Tensor("blk.0.attn_output.weight", [d, d], w(d, d)),
        Tensor("blk.0.ffn_norm.weight", [d], norm(d)),
        Tensor("blk.0.ffn_gate.weight", [d, f], w(f, d)),
        Tensor("blk.0.ffn_up.weight", [d, f], w(f, d)),
        Tensor("blk.0.ffn_down.weight", [f, d], w(d, f)),
        Tensor("output_norm.weight", [d], norm(d)),
        Tensor("output.weight", [d, v], w(v, d)),
    ]
    return Model(kvs, tensors)


def _f32(values) -> bytes:
    return np.asarray(values, "<f4").tobytes()


def _nested(depth: int) -> bytes:
    """An array holding an array ... ``depth`` deep, the innermost an empty int32 array."""
    return struct.pack("<I", ARR) + struct.pack("<IQ", ARR, 1) * (depth - 1) + struct.pack("<IQ", I32, 0)


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # what is broken, for a reader of expected.json
    error: str  # a piece of the one error line; "" = the command succeeds
    make: Callable[[], bytes]
    info_ok: bool = False  # info succeeds (only running the model can find the fault)


def cases() -> list[Case]:
    base = nano()
    good = base.to_bytes()
    parts = base.header_parts()
    kv_end = sum(map(len, parts[: 1 + len(base.kvs)]))
    infos_end = sum(map(len, parts))
    data_start = _pad(infos_end, base.alignment)

    def kv(key: str, vtype: int, value, model: Model = base):
        return lambda: model.with_kv(key, vtype, value).to_bytes()

    def tensor(name: str, **changes):
        return lambda: base.with_tensor(name, **changes).to_bytes()

    def extra(ne: list[int], ggml_type: int = GGML_F32):
        return lambda: replace(base, tensors=base.tensors + [Tensor("extra.weight", ne, _f32(np.ones(8)), ggml_type)]).to_bytes()

    def patch(at: int, raw: bytes):
        return lambda: good[:at] + raw + good[at + len(raw) :]

    nan_out = np.frombuffer(base.tensors[-1].data, "<f4").copy()
    nan_out[5] = np.nan
    inf_norm = np.ones(N_EMBD, "<f4")
    inf_norm[0] = np.inf
    linear = base.with_kv("llama.rope.scaling.type", STR, "linear")

    c = [
        # the reference: both commands work
        Case("nano", "the intact model", "", lambda: good),
        # -- the fixed header ----------------------------------------------------------------
        Case("bad-magic", "starts with GGML, not GGUF", "not a GGUF file", lambda: b"GGML" + good[4:]),
        Case("too-short", "10 bytes", "too short", lambda: good[:10]),
        Case("version-99", "GGUF version 99", "version 99", patch(4, struct.pack("<I", 99))),
        Case("version-1", "GGUF version 1 (gone since 2023)", "version 1", patch(4, struct.pack("<I", 1))),
        Case("big-endian", "version 3 written big-endian", "is a big-endian GGUF", patch(4, struct.pack(">I", 3))),
        Case("tensor-count-2e40", "claims 2**40 tensors", "1099511627776 tensors", patch(8, struct.pack("<Q", 2**40))),
        Case(
            "kv-count-2e40",
            "claims 2**40 metadata entries",
            "1099511627776 metadata entries",
            patch(16, struct.pack("<Q", 2**40)),
        ),
        Case(
            "kv-count-short",
            "claims one metadata entry more than it has",
            "truncated header",
            lambda: replace(base, n_kv=len(base.kvs) + 1).to_bytes(),
        ),
        # -- metadata encoding ---------------------------------------------------------------
        Case("key-length-2e62", "the first key claims 2**62 bytes", "truncated header", patch(24, struct.pack("<Q", 2**62))),
        Case(
            "value-type-99",
            "a value of type 99",
            "unknown value type 99",
            lambda: base.with_kv("general.name", RAW, struct.pack("<I", 99)).to_bytes(),
        ),
        Case(
            "string-array-2e60",
            "a string array claiming 2**60 items",
            "claims 1152921504606846976 strings",
            lambda: base.with_kv("general.tags", RAW, struct.pack("<IIQ", ARR, STR, 2**60)).to_bytes(),
        ),
        Case(
            "int-array-2e60",
            "an int32 array claiming 2**60 items",
            "truncated header",
            lambda: base.with_kv("general.tags", RAW, struct.pack("<IIQ", ARR, I32, 2**60)).to_bytes(),
        ),
        Case(
            "nested-arrays-1000",
            "1000 arrays nested in each other",
            "nests arrays more than 8 deep",
            lambda: base.with_kv("general.tags", RAW, _nested(1000)).to_bytes(),
        ),
        Case(
            "duplicate-key",
            "llama.block_count twice",
            "appears twice",
            lambda: replace(base, kvs=base.kvs + [("llama.block_count", U32, 1)]).to_bytes(),
        ),
        Case(
            "alignment-bool",
            "general.alignment stored as the bool true",
            "general.alignment holds the bool True",
            kv("general.alignment", BOOL, True),
        ),
        Case("alignment-3", "general.alignment 3", "general.alignment holds the integer 3", kv("general.alignment", U32, 3)),
        Case(
            "alignment-string", "general.alignment '32'", "general.alignment holds the string", kv("general.alignment", STR, "32")
        ),
        # -- hyper-parameters of the wrong kind ------------------------------------------------------
        Case(
            "architecture-missing",
            "no general.architecture",
            "architecture None is not supported",
            lambda: base.without("general.architecture").to_bytes(),
        ),
        Case(
            "architecture-int",
            "general.architecture 7",
            "general.architecture holds the integer 7",
            kv("general.architecture", U32, 7),
        ),
        Case(
            "architecture-mamba9",
            "an architecture edgebox does not run",
            "'mamba9' is not supported",
            kv("general.architecture", STR, "mamba9"),
        ),
        Case(
            "freq-base-string",
            'rope.freq_base "abc"',
            "llama.rope.freq_base holds the string 'abc'",
            kv("llama.rope.freq_base", STR, "abc"),
        ),
        Case(
            "freq-base-inf",
            "rope.freq_base inf",
            "llama.rope.freq_base holds the number inf",
            kv("llama.rope.freq_base", F32, float("inf")),
        ),
        Case(
            "freq-base-nan",
            "rope.freq_base NaN",
            "llama.rope.freq_base holds the number nan",
            kv("llama.rope.freq_base", F64, float("nan")),
        ),
        Case(
            "freq-base-array",
            "rope.freq_base an array",
            "llama.rope.freq_base holds an array of 2 float32",
            kv("llama.rope.freq_base", ARR, (F32, [1.0, 2.0])),
        ),
        Case(
            "epsilon-string",
            "rms epsilon a string",
            "layer_norm_rms_epsilon holds the string",
            kv("llama.attention.layer_norm_rms_epsilon", STR, "1e-5"),
        ),
        Case(
            "epsilon-2",
            "rms epsilon 2",
            "expected a finite number in (0, 1)",
            kv("llama.attention.layer_norm_rms_epsilon", F32, 2.0),
        ),
        Case(
            "scaling-factor-string",
            "linear rope scaling, factor a string",
            "llama.rope.scaling.factor holds the string",
            kv("llama.rope.scaling.factor", STR, "4", linear),
        ),
        Case(
            "scaling-factor-zero",
            "linear rope scaling, factor 0",
            "llama.rope.scaling.factor holds the number 0.0",
            kv("llama.rope.scaling.factor", F32, 0.0, linear),
        ),
        Case("scaling-type-yarn", "rope scaling yarn", "rope scaling 'yarn'", kv("llama.rope.scaling.type", STR, "yarn")),
        Case(
            "scaling-type-int",
            "rope scaling type 1",
            "llama.rope.scaling.type holds the integer 1",
            kv("llama.rope.scaling.type", U32, 1),
        ),
        Case("vocab-size-string", "vocab_size '8'", "llama.vocab_size holds the string '8'", kv("llama.vocab_size", STR, "8")),
        Case(
            "vocab-size-nan", "vocab_size NaN", "llama.vocab_size holds the number nan", kv("llama.vocab_size", F32, float("nan"))
        ),
        Case("vocab-size-mismatch", "vocab_size 9 for 8 tokens", "vocabulary size mismatch", kv("llama.vocab_size", U32, 9)),
        Case(
            "context-length-bool",
            "context_length true",
            "llama.context_length holds the bool True",
            kv("llama.context_length", BOOL, True),
        ),
        Case(
            "block-count-2e40",
            "block_count 2**40",
            "llama.block_count holds the integer 1099511627776",
            kv("llama.block_count", U64, 2**40),
        ),
        Case(
            "head-count-zero",
            "head_count 0",
            "llama.attention.head_count holds the integer 0",
            kv("llama.attention.head_count", U32, 0),
        ),
        Case(
            "head-count-kv-3",
            "head_count 2, head_count_kv 3",
            "is not a multiple of head_count_kv 3",
            kv("llama.attention.head_count_kv", U32, 3),
        ),
        Case(
            "embedding-length-missing",
            "no embedding_length",
            "llama.embedding_length is missing",
            lambda: base.without("llama.embedding_length").to_bytes(),
        ),
        # -- tokenizer metadata of the wrong kind ---------------------------------------------------
        Case(
            "tokenizer-model-int",
            "tokenizer.ggml.model 2",
            "tokenizer.ggml.model holds the integer 2",
            kv("tokenizer.ggml.model", U32, 2),
        ),
        Case(
            "tokenizer-model-llama",
            "a SentencePiece tokenizer",
            "edgebox supports only 'gpt2'",
            kv("tokenizer.ggml.model", STR, "llama"),
        ),
        Case(
            "tokenizer-pre-array",
            "tokenizer.ggml.pre an array",
            "tokenizer.ggml.pre holds an array of 1 strings",
            kv("tokenizer.ggml.pre", ARR, (STR, ["qwen2"])),
        ),
        Case(
            "tokens-ints",
            "tokens as int32",
            "tokenizer.ggml.tokens holds an array of 8 int32",
            kv("tokenizer.ggml.tokens", ARR, (I32, list(range(8)))),
        ),
        Case(
            "tokens-missing",
            "no tokenizer.ggml.tokens",
            "tokenizer.ggml.tokens or tokenizer.ggml.merges is missing",
            lambda: base.without("tokenizer.ggml.tokens").to_bytes(),
        ),
        Case(
            "merges-ints",
            "merges as int32",
            "tokenizer.ggml.merges holds an array of 2 int32",
            kv("tokenizer.ggml.merges", ARR, (I32, [1, 2])),
        ),
        Case(
            "merges-outside-vocab",
            "a merge of tokens not in the vocabulary",
            "merges do not fit",
            kv("tokenizer.ggml.merges", ARR, (STR, ["x y"])),
        ),
        Case(
            "token-type-strings",
            "token_type as strings",
            "tokenizer.ggml.token_type holds an array of 8 strings",
            kv("tokenizer.ggml.token_type", ARR, (STR, ["1"] * 8)),
        ),
        Case(
            "token-type-short",
            "token_type shorter than the tokens",
            "token_type has 2 entries for 8 tokens",
            kv("tokenizer.ggml.token_type", ARR, (I32, [1, 1])),
        ),
        Case(
            "token-type-byte",
            "token 'hi' has type 6 (byte) but is not <0xNN>",
            "has token_type 6 (byte)",
            kv("tokenizer.ggml.token_type", ARR, (I32, [1, 1, 6, 3, 3, 1, 1, 1])),
        ),
        Case(
            "bos-string",
            "bos_token_id '3'",
            "tokenizer.ggml.bos_token_id holds the string '3'",
            kv("tokenizer.ggml.bos_token_id", STR, "3"),
        ),
        Case(
            "bos-float",
            "bos_token_id 3.0",
            "tokenizer.ggml.bos_token_id holds the number 3.0",
            kv("tokenizer.ggml.bos_token_id", F32, 3.0),
        ),
        Case(
            "bos-outside-vocab",
            "bos_token_id 9999",
            "tokenizer.ggml.bos_token_id holds the integer 9999",
            kv("tokenizer.ggml.bos_token_id", U32, 9999),
        ),
        Case(
            "eos-negative",
            "eos_token_id -1",
            "tokenizer.ggml.eos_token_id holds the integer -1",
            kv("tokenizer.ggml.eos_token_id", I32, -1),
        ),
        Case(
            "add-bos-string",
            "add_bos_token 'yes'",
            "tokenizer.ggml.add_bos_token holds the string 'yes'",
            kv("tokenizer.ggml.add_bos_token", STR, "yes"),
        ),
        Case(
            "add-bos-int",
            "add_bos_token 1",
            "tokenizer.ggml.add_bos_token holds the integer 1",
            kv("tokenizer.ggml.add_bos_token", U8, 1),
        ),
        Case(
            "chat-template-int",
            "tokenizer.chat_template 5",
            "tokenizer.chat_template holds the integer 5",
            kv("tokenizer.chat_template", U32, 5),
        ),
        # -- the tensor table ------------------------------------------------------------------------
        Case("tensor-5-dims", "a tensor with 5 dimensions", "5 dimensions", tensor("output_norm.weight", ne=[8, 1, 1, 1, 1])),
        Case("tensor-dim-zero", "a dimension of 0", "absurd dimensions", tensor("output_norm.weight", ne=[8, 0])),
        Case(
            "tensor-dims-wrap-3d",
            "an extra 3-D tensor of 8 x 2**32 x 2**32 values (rows: 0 in int64)",
            "absurd dimensions",
            extra([8, 2**32, 2**32]),
        ),
        Case(
            "tensor-dims-wrap-4d",
            "an extra 4-D tensor of 8 x 2**21 x 2**21 x 2**22 values (rows: 0 in int64)",
            "absurd dimensions",
            extra([8, 2**21, 2**21, 2**22]),
        ),
        Case(
            "tensor-name-long",
            "a 100-byte tensor name",
            "longer than 63 bytes",
            lambda: replace(base, tensors=base.tensors + [Tensor("x" * 100, [8], _f32(np.ones(8)))]).to_bytes(),
        ),
        Case(
            "tensor-duplicate",
            "output_norm.weight twice",
            "appears twice in the tensor table",
            lambda: replace(base, tensors=base.tensors + [Tensor("output_norm.weight", [8], _f32(np.ones(8)))]).to_bytes(),
        ),
        Case(
            "tensor-type-99-used",
            "output_norm.weight of GGML type 99",
            "does not support",
            tensor("output_norm.weight", ggml_type=99),
        ),
        Case("tensor-type-99-unused", "an extra tensor of GGML type 99 no layer uses", "", extra([8], ggml_type=99)),
        Case(
            "tensor-misaligned",
            "a tensor at data offset 4 (alignment 32)",
            "not a multiple of general.alignment 32",
            tensor("output.weight", offset=4),
        ),
        Case(
            "tensor-past-end",
            "a tensor starting 1 MiB past the end of the file",
            "truncated data",
            tensor("output.weight", offset=2**20),
        ),
        Case(
            "tensor-partial-block",
            "a Q8_0 tensor with rows of 8 values",
            "not whole Q8_0 blocks",
            tensor("output_norm.weight", ggml_type=GGML_Q8_0),
        ),
        Case(
            "tensor-missing",
            "no blk.0.ffn_down.weight",
            "'blk.0.ffn_down.weight' is missing",
            lambda: replace(base, tensors=[t for t in base.tensors if t.name != "blk.0.ffn_down.weight"]).to_bytes(),
        ),
        Case(
            "tensor-wrong-shape",
            "attn_k.weight 4 x 8",
            "expected [8, 8]",
            tensor("blk.0.attn_k.weight", ne=[8, 4], data=base.tensors[3].data[:128]),
        ),
        # -- truncated at every section boundary ------------------------------------------------------------
        Case("cut-after-header", "only the 24-byte header", "more than the file can hold", _cut_case(good, 24)),
        Case("cut-in-first-key", "cut inside the first key", "more than the file can hold", _cut_case(good, 30)),
        Case(
            "cut-before-last-kv",
            "cut where the last KV starts",
            "truncated header",
            _cut_case(good, kv_end - len(parts[len(base.kvs)])),
        ),
        Case("cut-after-metadata", "cut where the tensor table starts", "truncated header", _cut_case(good, kv_end)),
        Case("cut-in-tensor-table", "cut inside the tensor table", "truncated header", _cut_case(good, kv_end + 40)),
        Case("cut-after-tensor-table", "cut right after the tensor table", "truncated data", _cut_case(good, infos_end)),
        Case("cut-at-data", "cut where the data starts", "truncated data", _cut_case(good, data_start)),
        Case("cut-in-data", "cut in the middle of the data", "truncated data", _cut_case(good, (data_start + len(good)) // 2)),
        Case("cut-last-byte", "one byte short", "truncated data", _cut_case(good, len(good) - 1)),
        # -- weights that only running finds ----------------------------------------------------------
        Case(
            "nan-output-weight",
            "a NaN in output.weight",
            "non-finite logits",
            tensor("output.weight", data=nan_out.tobytes()),
            info_ok=True,
        ),
        Case(
            "inf-norm-weight",
            "an inf in output_norm.weight",
            "non-finite logits",
            tensor("output_norm.weight", data=inf_norm.tobytes()),
            info_ok=True,
        ),
    ]
    return c


def _cut_case(data: bytes, at: int):
    return lambda: data[:at]


def expected(case: Case) -> dict:
    """What ``edgebox info`` and ``edgebox run -p hi -n 1`` must do with the case's file."""
    fail = {"exit": 2, "error": case.error}
    ok = {"exit": 0, "error": ""}
    if not case.error:
        return {"what": case.what, "info": ok, "run": ok}
    return {"what": case.what, "info": ok if case.info_ok else fail, "run": fail}


def build() -> dict[str, tuple[bytes, dict]]:
    """file name -> (bytes, expectations)."""
    return {f"{c.name}.gguf": (c.make(), expected(c)) for c in cases()}


def main(out: Path = OUT) -> None:
    out.mkdir(parents=True, exist_ok=True)
    corpus = build()
    for old in out.glob("*.gguf"):
        if old.name not in corpus:
            old.unlink()
    for name, (data, _) in corpus.items():
        (out / name).write_bytes(data)
    lines = [f"{json.dumps(name)}: {json.dumps(e)}" for name, (_, e) in corpus.items()]  # one file a line
    (out / "expected.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    total = sum(len(d) for d, _ in corpus.values())
    print(f"{len(corpus)} files, {total / 1024:.0f} KiB, in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
