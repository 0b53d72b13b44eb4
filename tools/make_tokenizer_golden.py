"""Write tests/data/tokenizer_golden_deepseek_coder.json: what llama.cpp makes of a handful of
strings with the DeepSeek-Coder vocabulary, which has no test vectors in tests/data/vocab. Also
tokenized: the test strings of llama.cpp's other vocabularies (ggml-vocab-qwen2.gguf.inp), the
way its test-tokenizer-0 does (no BOS, special tokens not parsed).

Needs llama-cpp-python (``pip install -e .[oracle]``); the tests only read the JSON.

    python tools/make_tokenizer_golden.py [path/to/ggml-vocab-deepseek-coder.gguf]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import llama_cpp

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "tokenizer_golden_deepseek_coder.json"

# Code, whitespace runs (ASCII and not), digits (split one by one), CJK (its own regex),
# punctuation runs, the user-defined FIM and chat tokens, and control tokens in the middle of text.
TEXTS = [
    "def quick_sort(arr):\n    if len(arr) <= 1:\n        return arr\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i] * 2.5e-3; }\r\n",
    "   leading spaces\t\ttabs\n\n\ntrailing   ",
    "12345678901234567890 and 3.14159 and ½ ² ٣",
    "中文注释：快速排序算法。日本語のコメント、한국어 주석",
    "全角\u3000空格 →\u3000■\u2003㈱\u205f↑\u2028↓\u1680ᚁ  \u2003\n",
    "emoji 🦙🚀👩‍💻 and accents: naïve café Ελληνικά Русский",
    "!!! ??? ... --- === <<< >>> /* */ // # @decorator",
    "<｜fim▁begin｜>def f(x):\n<｜fim▁hole｜>\n    return y<｜fim▁end｜>",
    "### Instruction:\nwrite hello world\n### Response:\nprint('hi')\n<|EOT|>",
    "<｜begin▁of▁sentence｜>text<｜end▁of▁sentence｜>more",
    "User-defined õ÷Áý bytes and <pad> and <|User|> <|Assistant|>",
    "It's John's, we're, they've, I'll, he'd, I'm DON'T",
]


def llama_cpp_test_strings(inp: Path) -> list[str]:
    """The strings of a llama.cpp .inp file, split as tests/test-tokenizer-0.cpp splits them."""
    texts = inp.read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")
    return texts[:-1] if texts[-1] == "" else texts


def main() -> None:
    vocab_dir = REPO / "tests" / "data" / "vocab"
    vocab_path = Path(sys.argv[1]) if len(sys.argv) > 1 else vocab_dir / "ggml-vocab-deepseek-coder.gguf"
    llm = llama_cpp.Llama(model_path=str(vocab_path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    requests = [
        (text, add_bos, parse_special)
        for text in TEXTS
        for add_bos, parse_special in ((False, True), (False, False), (True, True))
    ]
    requests += [(text, False, False) for text in llama_cpp_test_strings(vocab_dir / "ggml-vocab-qwen2.gguf.inp")]
    cases = []
    for text, add_bos, parse_special in requests:
        ids = llm.tokenize(text.encode(), add_bos=add_bos, special=parse_special)
        cases.append(
            {
                "text": text,
                "add_bos": add_bos,
                "parse_special": parse_special,
                "ids": ids,
                # the pieces of token_to_piece(special=True) joined: control tokens as their text
                "detokenized": llm.detokenize(ids, special=True).decode("utf-8", errors="replace"),
            }
        )
    eog_ids = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]

    golden = {
        "vocab": vocab_path.name,
        "made_by": f"llama-cpp-python {llama_cpp.__version__} (tools/make_tokenizer_golden.py)",
        "eog_ids": eog_ids,
        "cases": cases,
    }
    OUT.write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
