"""The tokenizer against llama.cpp: its test vectors, golden ids made with llama.cpp itself
(tools/make_tokenizer_golden.py), lossless round trips, streaming and speed."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import pytest

from edgebox.errors import ModelError
from edgebox.gguf.file import read_fields
from edgebox.text.tokenizer import Tokenizer
from tests.fixtures.paths import DATA, vocab_path

VOCABS = ("deepseek-llm", "deepseek-coder", "qwen2")
VOCABS_WITH_VECTORS = ("deepseek-llm", "qwen2")
GOLDEN = DATA / "tokenizer_golden_deepseek_coder.json"


@functools.cache
def tokenizer(name: str) -> Tokenizer:
    path = vocab_path(name)
    return Tokenizer.from_gguf_fields(read_fields(path), path.name)


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs, parsed as llama.cpp's tests/test-tokenizer-0.cpp does: the inputs are
    split on "\\n__ggml_vocab_test__\\n" (a string keeps any newline of its own; an empty tail
    after the last separator is no test), each .out line is stripped and split on spaces."""
    path = vocab_path(name)
    texts = Path(f"{path}.inp").read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")
    if texts[-1] == "":
        texts.pop()
    lines = Path(f"{path}.out").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(texts), f"{path.name}: {len(texts)} inputs but {len(lines)} output lines"
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts, lines)]


# Text a model meets: code, CJK, emoji (several byte tokens each), combining marks, odd spaces.
MIXED_TEXT = (
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 🦙\n\n"
    "DeepSeek 是一个大型语言模型。こんにちは世界！안녕하세요 🚀🔥👩‍💻 naïve café Ελληνικά Русский "
    "x\u00a0y\u3000z\t\t\r\n  It's 3.14159, isn't it? ''' \"quoted\" [1,2,3] {a: b} $$ 1234567890\n"
)


# -- llama.cpp's own test vectors --------------------------------------------------------------


@pytest.mark.parametrize("name", VOCABS_WITH_VECTORS)
def test_matches_llama_cpp_vectors(name):
    tok = tokenizer(name)
    vectors = read_vectors(name)
    # test-tokenizer-0 tokenizes with add_special=false, parse_special=false
    results = [(text, tok.encode(text, add_bos=False, parse_special=False), ids) for text, ids in vectors]
    mismatches = [(text, got, ids) for text, got, ids in results if got != ids]
    print(f"{name}: {len(vectors) - len(mismatches)}/{len(vectors)} lines match")
    assert not mismatches, "\n".join(f"{t!r}: got {g}, llama.cpp {e}" for t, g, e in mismatches)


@pytest.mark.parametrize(
    "text, ids",
    [
        ("a  \u3000!", [64, 243, 88946, 0]),
        ("=  \u3000=", [28, 243, 88946, 28]),
        ("  \u3000\u3000 ", [243, 88946, 88946, 207]),
    ],
)
def test_deepseek_llm_literal_classes_skip_non_ascii_spaces(text, ids):
    # ids from llama.cpp (llama-cpp-python 0.3.36): its std::wregex never sees U+3000, so the
    # punctuation class [...\x{3000}-\x{3002}] must not take it and "  " stays one token
    assert tokenizer("deepseek-llm").encode(text, add_bos=False, parse_special=False) == ids


@pytest.mark.parametrize("name", VOCABS)
def test_round_trip_is_lossless(name):
    tok = tokenizer(name)
    texts = [text for text, _ in read_vectors("qwen2")] + [MIXED_TEXT]
    for text in texts:
        assert tok.decode(tok.encode(text, add_bos=False)) == text


# -- deepseek-coder against ids llama.cpp produced ------------------------------------------------


def golden_cases() -> list[dict]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]


def case_id(case: dict) -> str:
    flags = ("bos " if case["add_bos"] else "") + ("special " if case["parse_special"] else "")
    return flags + repr(case["text"][:20])


@pytest.mark.parametrize("case", golden_cases(), ids=case_id)
def test_deepseek_coder_matches_llama_cpp(case):
    tok = tokenizer("deepseek-coder")
    assert tok.encode(case["text"], add_bos=case["add_bos"], parse_special=case["parse_special"]) == case["ids"]
    assert tok.decode(case["ids"]) == case["detokenized"]


def test_deepseek_coder_eog_ids_match_llama_cpp():
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    tok = tokenizer("deepseek-coder")
    # llama.cpp's list misses <|EOT|>, DeepSeek-Coder-Instruct's end of turn; edgebox adds it
    eot = tok.encode("<|EOT|>", add_bos=False)
    assert len(eot) == 1
    assert tok.eog_ids == frozenset(golden["eog_ids"]) | set(eot)


# -- special tokens, BOS, end of generation ------------------------------------------------------


def test_deepseek_special_tokens_and_bos():
    tok = tokenizer("deepseek-llm")
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.add_bos) == (102400, 100000, 100001, True)
    assert tok.eog_ids == {100001}
    assert tok.encode("Hi")[0] == 100000
    assert tok.encode("Hi", add_bos=False)[0] != 100000
    eos_text = "<｜end▁of▁sentence｜>"
    assert tok.encode(f"a{eos_text}b", add_bos=False) == [
        *tok.encode("a", add_bos=False),
        100001,
        *tok.encode("b", add_bos=False),
    ]
    assert 100001 not in tok.encode(f"a{eos_text}b", add_bos=False, parse_special=False)
    assert tok.token_to_piece(100001) == eos_text.encode()
    ids = tok.encode(f"Hi{eos_text}")
    assert tok.decode(ids) == f"<｜begin▁of▁sentence｜>Hi{eos_text}"
    assert tok.decode(ids, skip_special=True) == "Hi"
    # DeepSeek's user-defined single-char tokens (the bytes UTF-8 never uses, as chars) are
    # matched in raw text like any special token, and render as that text
    assert tok.encode("ø", add_bos=False, parse_special=False) == [100002]
    assert tok.decode([100002]) == "ø"


def test_deepseek_coder_user_defined_tokens():
    tok = tokenizer("deepseek-coder")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (32013, 32014, True)
    # user-defined tokens are matched whole even when control tokens are not; the FIM ones are
    # control tokens in llama.cpp (it recognises them by text), so they are not
    text = "<｜fim▁begin｜>x<|EOT|>"
    assert tok.encode(text, add_bos=False) == [32016, *tok.encode("x", add_bos=False), 32021]
    plain = tok.encode(text, add_bos=False, parse_special=False)
    assert 32016 not in plain and plain[-1] == 32021
    assert tok.decode(plain) == text
    assert tok.decode(tok.encode(text), skip_special=True) == "x<|EOT|>"


def test_qwen2_chat_tokens():
    tok = tokenizer("qwen2")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (151643, 151643, False)
    # <|endoftext|>, <|im_end|>, and the plain "</s>" (128247): llama.cpp ends generation on any
    # token with that text (checked against llama-cpp-python 0.3.36)
    assert tok.eog_ids == {151643, 151645, 128247}
    chat = "<|im_start|>user\nHello<|im_end|>\n"
    ids = tok.encode(chat)
    assert ids[0] == 151644 and 151645 in ids
    assert tok.decode(ids) == chat
    assert tok.encode("x", add_bos=True) == [151643, *tok.encode("x")]


# -- streaming -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VOCABS)
def test_stream_decoder_never_splits_a_character(name):
    tok = tokenizer(name)
    ids = tok.encode(MIXED_TEXT, add_bos=False)
    pieces = [tok.token_to_piece(i) for i in ids]
    assert any(p and not _is_utf8(p) for p in pieces), "the text should have characters spread over several tokens"
    stream = tok.stream_decoder()
    chunks = [stream.feed(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids) == MIXED_TEXT


def test_stream_decoder_flushes_an_unfinished_character():
    tok = tokenizer("deepseek-coder")
    first = tok.encode("🦙", add_bos=False)[0]
    assert tok.token_to_piece(first) == "🦙".encode()[:2]
    stream = tok.stream_decoder()
    assert stream.feed(first) == ""
    assert stream.flush() == "\ufffd"
    assert stream.flush() == ""


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- speed -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VOCABS)
def test_encodes_100_kb_well_under_a_second(name):
    tok = tokenizer(name)
    text = (MIXED_TEXT * (100_000 // len(MIXED_TEXT) + 1))[:100_000]
    start = time.perf_counter()
    ids = tok.encode(text)
    seconds = time.perf_counter() - start
    print(f"{name}: {len(text)} chars -> {len(ids)} tokens in {seconds * 1000:.0f} ms")
    assert seconds < 1.0


# -- what edgebox refuses --------------------------------------------------------------------------

FIELDS = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "qwen2",
    "tokenizer.ggml.tokens": ["a", "b", "ab"],
    "tokenizer.ggml.merges": ["a b"],
}


def test_tiny_vocabulary_works():
    tok = Tokenizer.from_gguf_fields(FIELDS)
    assert tok.encode("abba") == [2, 1, 0]
    assert (tok.bos_id, tok.add_bos, tok.eog_ids) == (None, False, frozenset())


def test_llama_bpe_takes_whole_words_from_the_vocabulary_and_adds_bos():
    fields = {
        **FIELDS,
        "tokenizer.ggml.tokens": ["a", "b", "c", "bc", "abc"],
        "tokenizer.ggml.merges": ["b c"],  # no merge makes "abc"
        "tokenizer.ggml.bos_token_id": 0,
    }
    assert Tokenizer.from_gguf_fields(fields).encode("abc", add_bos=False) == [0, 3]
    llama3 = Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": "llama-bpe"})
    assert llama3.encode("abc") == [0, 4]


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("tokenizer.ggml.pre", "falcon", ["tokenizer.ggml.pre", "'falcon'", "deepseek-llm", "qwen2"]),
        ("tokenizer.ggml.pre", None, ["tokenizer.ggml.pre", "missing"]),  # None: the key is absent
        ("tokenizer.ggml.model", "llama", ["tokenizer.ggml.model", "'llama'", "gpt2"]),
        ("tokenizer.ggml.bos_token_id", 7, ["bos_token_id", "7", "3 tokens"]),
        ("tokenizer.ggml.merges", ["a c"], ["merges"]),
    ],
)
def test_unsupported_or_broken_tokenizer_is_a_one_line_model_error(key, value, words):
    fields = {**FIELDS, key: value}
    if value is None:
        del fields[key]
    with pytest.raises(ModelError) as err:
        Tokenizer.from_gguf_fields(fields, "m.gguf")
    message = str(err.value)
    assert message.startswith("m.gguf: ") and "\n" not in message
    assert all(w in message for w in words), message


@pytest.mark.parametrize("text", ["<0x4", "x", "<0x4G>", "<0x41> "])
def test_a_byte_token_must_be_written_as_its_byte(text):
    """Before: token type 6 on any other text crashed the build with int()'s ValueError."""
    fields = {**FIELDS, "tokenizer.ggml.tokens": ["a", "b", "ab", text], "tokenizer.ggml.token_type": [1, 1, 1, 6]}
    with pytest.raises(ModelError, match="has token_type 6 \\(byte\\) but is not written <0xNN>"):
        Tokenizer.from_gguf_fields(fields, "m.gguf")


def test_byte_tokens_decode_to_their_byte():
    fields = {**FIELDS, "tokenizer.ggml.tokens": ["a", "b", "ab", "<0x0A>"], "tokenizer.ggml.token_type": [1, 1, 1, 6]}
    assert Tokenizer.from_gguf_fields(fields).decode([3, 0]) == "\na"


def test_a_lone_surrogate_is_one_line_not_a_type_error():
    """Before: tokenizers raised TypeError ("TextInputSequence must be str") for a prompt holding
    a lone surrogate (what Python makes of invalid UTF-8 in argv)."""
    from edgebox.errors import EdgeboxError

    tok = Tokenizer.from_gguf_fields(FIELDS)
    with pytest.raises(EdgeboxError, match=r"lone surrogate \(U\+DCED at character 2\)"):
        tok.encode("ab\udced")
    assert tok.encode("ab") == [2]
