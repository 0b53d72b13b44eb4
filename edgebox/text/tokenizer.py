"""Byte-level BPE tokenizer built from GGUF metadata, token for token the same as llama.cpp.

Encoding runs in HF ``tokenizers`` (Rust): a BPE model made of the GGUF vocabulary and merges,
behind a pre-tokenizer that replays llama.cpp's split regexes for the file's
``tokenizer.ggml.pre``. Decoding happens here from a bytes-per-token table, because llama.cpp
renders control and user-defined tokens as their raw text and every other token through the
GPT-2 byte map, which the HF ByteLevel decoder cannot be told to do per token.

Known differences from llama.cpp:
- Unicode tables. llama.cpp classifies code points with its own tables (Unicode 15.1);
  Oniguruma, the regex engine inside ``tokenizers``, knows Unicode 16.0. Letters, digits and
  punctuation first assigned in 16.0 (Todhri, Garay, Kirat Rai, ...) can split differently.
- Overlapping special tokens. llama.cpp splits out the longest special token everywhere first,
  ``tokenizers`` takes the leftmost-longest match; the two differ only when one special token's
  text can overlap another's, which none of the supported vocabularies has.
- llama_detokenize "cleans" spaces (" ?" -> "?") for llama-bpe; ``decode`` stays lossless, like
  llama.cpp's token_to_piece, which its streaming uses.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence

from tokenizers import AddedToken, Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from edgebox.errors import EdgeboxError, ModelError

# llama.cpp (src/llama-vocab.cpp, llm_tokenizer_bpe) applies these regexes in turn, each one to
# every piece the previous ones left; both the matches and the gaps between them become pieces,
# which is Split(behavior="isolated") in HF terms. Written for Oniguruma where llama.cpp's engine
# means something else:
# - llama.cpp's own matcher lower-cases only the letter after the apostrophe, so "(?i:'s|...)"
#   is spelled out: Oniguruma's (?i) would also fold e.g. U+017F (long s) into 's'.
# - deepseek-llm's "\s+$" is end of input in llama.cpp's std::regex; Oniguruma's "$" is end of
#   line, hence "\z".
# - Regexes without \p{..} run in std::wregex over a copy of the text in which every non-ASCII
#   whitespace char is replaced by U+000B, so a literal class never matches U+3000 or U+2028 even
#   when its ranges hold them: _wregex_class cuts them out. (The letters class holds none. The
#   intersection "[...&&\S]" would say the same but makes Oniguruma five times slower.)
# The deepseek classes are llama.cpp's literal code point ranges, written as \x{...} escapes so
# that no editor or Unicode normalisation can change them (U+2126 OHM SIGN is not U+03A9).
_NON_ASCII_SPACES = (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000)


def _wregex_class(*ranges: tuple[int, int]) -> str:
    """Regex class of the inclusive code point ranges, less the non-ASCII whitespace."""
    kept = []
    for lo, hi in ranges:
        for space in _NON_ASCII_SPACES:
            if lo <= space <= hi:
                kept.append((lo, space - 1))
                lo = space + 1
        kept.append((lo, hi))
    return "[" + "".join(f"\\x{{{lo:X}}}-\\x{{{hi:X}}}" for lo, hi in kept if lo <= hi) + "]"


_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
_CJK = _wregex_class((0x4E00, 0x9FA5), (0x800, 0x4E00), (0xAC00, 0xD7FF)) + "+"
_DEEPSEEK_LLM = (
    r"[\r\n]",
    r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}"
    r"\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}"
    r"\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}"
    r"\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}"
    r"\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}"
    r"\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}"
    r"\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}"
    r"\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}"
    r"\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}"
    r"\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}"
    r"\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
    r"\s?"
    + _wregex_class((0x21, 0x2F), (0x3A, 0x7E), (0xFF01, 0xFF0F), (0xFF1A, 0xFF5E), (0x2018, 0x201F), (0x3000, 0x3002))
    + "+",
    r"\s+\z",
    _CJK,
    r"\p{N}+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")

# tokenizer.ggml.pre -> regexes; the aliases are names llama.cpp maps to the same pre-tokenizer
# (DeepSeek-R1-Distill-Qwen files say "deepseek-r1-qwen").
_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-coder": _DEEPSEEK_CODER,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
}
# For Llama 3 llama.cpp takes a whole word from the vocabulary before trying merges, and adds BOS
# unless the file says otherwise.
_LLAMA3_NAMES = frozenset({"llama-bpe", "llama3", "llama-v3"})


# llama.cpp's token attributes (llama_token_attr), bit flags: a token can carry several
UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = (1 << n for n in range(6))
_MATCHED_IN_TEXT = CONTROL | USER_DEFINED | UNKNOWN  # split out of the raw text before BPE
_SPECIAL = CONTROL | UNKNOWN  # left as text when parse_special is off, dropped by skip_special

# tokenizer.ggml.token_type values (llama_token_type) -> attributes; other values: none
_ATTR_OF_TYPE = {1: NORMAL, 2: UNKNOWN, 3: CONTROL, 4: USER_DEFINED, 5: UNUSED, 6: BYTE}
_BYTE_TEXT = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # the only text a BYTE token may have

# llama.cpp ends generation on tokens with these texts, besides EOS/EOT/EOM (llama_vocab::load).
_LLAMA_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    }
)
# It also recognises fill-in-the-middle tokens by text; the pad/repo/file-separator ones end
# generation too. Every token found this way, EOG texts included, becomes a control token.
_LLAMA_FIM_TEXTS = frozenset(
    {
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    }
)
_LLAMA_FIM_EOG_TEXTS = frozenset(
    {
        "<|fim_pad|>",
        "<fim-pad>",
        "<fim_pad>",
        "<PAD>",
        "[PAD]",
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
        "<|file_sep|>",
    }
)
# DeepSeek-Coder-Instruct closes its turns with <|EOT|> (its generation_config's eos), a text
# llama.cpp's list misses; without it a chat never stops. It stays a user-defined token.
_EXTRA_EOG_TEXTS = frozenset({"<|EOT|>"})


def _gpt2_byte_table() -> dict[int, int]:
    """str.translate table from the GPT-2 byte-level alphabet to the bytes (as latin-1 chars) that
    its chars stand for; chars below 256 that are not in the alphabet go to U+FFFF, so that the
    latin-1 encode after translate fails on them as on any other foreign char."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    table = dict.fromkeys(shifted, 0xFFFF)
    table.update({b: b for b in printable})
    table.update({256 + n: b for n, b in enumerate(shifted)})
    return table


_BYTE_TABLE = _gpt2_byte_table()


def _byte_level_bytes(text: str) -> bytes:
    """A normal token's bytes. A char outside the byte alphabet comes out as llama.cpp prints it."""
    try:
        return text.translate(_BYTE_TABLE).encode("latin-1")
    except UnicodeEncodeError:
        out = b""
        for ch in text:
            mapped = ch.translate(_BYTE_TABLE)
            if mapped != "\uffff" and ord(mapped) < 256:
                out += mapped.encode("latin-1")
            else:
                out += b"[UNK_BYTE_0x" + ch.encode().hex().encode() + text.encode() + b"]"
        return out


def _piece(text: str, attr: int) -> bytes:
    """llama.cpp's token_to_piece(special=True) for a byte-level BPE vocabulary."""
    if attr & _MATCHED_IN_TEXT:
        return text.encode()
    if attr & NORMAL:
        return _byte_level_bytes(text)
    if attr & BYTE:  # "<0xAB>"
        return bytes([int(text[3:5], 16)])
    return b""


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary; build it with ``from_gguf_fields``."""

    def __init__(
        self,
        hf: HFTokenizer,
        pieces: list[bytes],
        special_ids: frozenset[int],
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        eog_ids: frozenset[int],
    ):
        self._hf = hf
        self._hf_lock = threading.Lock()  # encode_special_tokens is a setting of the whole tokenizer
        self._pieces = pieces
        self._special_ids = special_ids  # control/unknown: skipped by decode(skip_special=True)
        self.n_vocab = len(pieces)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.eog_ids = eog_ids

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, object], source: str = "") -> Tokenizer:
        where = f"{source}: " if source else ""

        def fail(msg: str) -> ModelError:
            return ModelError(where + msg)

        def shown(key: str) -> str:
            return repr(fields[key]) if key in fields else "missing"

        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise fail(f"tokenizer.ggml.model is {shown('tokenizer.ggml.model')}; edgebox supports only 'gpt2' (byte-level BPE)")
        pre = fields.get("tokenizer.ggml.pre")
        if pre not in _PRE_TOKENIZERS:
            raise fail(
                f"tokenizer.ggml.pre is {shown('tokenizer.ggml.pre')}; edgebox supports {', '.join(sorted(_PRE_TOKENIZERS))}"
            )
        tokens = fields.get("tokenizer.ggml.tokens")
        merges = fields.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise fail(
                "tokenizer.ggml.tokens or tokenizer.ggml.merges is missing; re-convert the model with llama.cpp's convert_hf_to_gguf.py"
            )
        n_vocab = len(tokens)
        types = fields.get("tokenizer.ggml.token_type")
        if types is None:
            types = [1] * n_vocab
        elif len(types) < n_vocab:
            raise fail(f"tokenizer.ggml.token_type has {len(types)} entries for {n_vocab} tokens")

        def token_id(key: str) -> int | None:
            value = fields.get(key)
            if value is None:
                return None
            if not 0 <= int(value) < n_vocab:
                raise fail(f"{key} is {value}, outside the vocabulary of {n_vocab} tokens")
            return int(value)

        bos_id = token_id("tokenizer.ggml.bos_token_id")
        eos_id = token_id("tokenizer.ggml.eos_token_id")
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", pre in _LLAMA3_NAMES))
        if add_bos and bos_id is None:
            raise fail("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is missing")

        # llama.cpp names an empty token "[EMPTY_<id>]"; a repeated text means its last id.
        texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        vocab = {t: i for i, t in enumerate(texts)}
        attrs = [_ATTR_OF_TYPE.get(t, 0) for t in map(int, types[:n_vocab])]
        for i, a in enumerate(attrs):
            if a & BYTE and not _BYTE_TEXT.fullmatch(texts[i]):
                raise fail(f"token {i} ({texts[i][:40]!r}) has token_type 6 (byte) but is not written <0xNN>")
        eog_keys = ("eot", "eom", "fim_pad", "fim_rep", "fim_sep")
        eog_ids = {eos_id, *(token_id(f"tokenizer.ggml.{k}_token_id") for k in eog_keys)} - {None}
        for text in _LLAMA_EOG_TEXTS | _LLAMA_FIM_TEXTS | _LLAMA_FIM_EOG_TEXTS:
            if text in vocab:
                attrs[vocab[text]] |= CONTROL
        for text in _LLAMA_EOG_TEXTS | _LLAMA_FIM_EOG_TEXTS | _EXTRA_EOG_TEXTS:
            if text in vocab:
                eog_ids.add(vocab[text])

        hf = _build_hf(vocab, merges, texts, attrs, pre, where)
        special_ids = frozenset(i for i, a in enumerate(attrs) if a & _SPECIAL)
        pieces = [_piece(t, a) for t, a in zip(texts, attrs)]
        return cls(hf, pieces, special_ids, bos_id, eos_id, add_bos, frozenset(eog_ids))

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``. With parse_special=False control tokens are plain text;
        user-defined tokens are still matched whole, as in llama.cpp."""
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise EdgeboxError(
                    f"the text holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), which is not Unicode text; send valid UTF-8"
                ) from None
        with self._hf_lock:
            self._hf.encode_special_tokens = not parse_special
            # encode_batch releases the GIL while it works (encode holds it: 216 ms for 200 kB),
            # so the daemon's control lane is never stalled behind a tokenization
            ids = self._hf.encode_batch([text], add_special_tokens=False)[0].ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ModelError("cannot add BOS: the model has no tokenizer.ggml.bos_token_id")
            ids.insert(0, self.bos_id)
        return ids

    def token_to_piece(self, id: int) -> bytes:
        """The bytes a token stands for; control tokens give their text, as llama.cpp renders them."""
        if not 0 <= id < self.n_vocab:
            raise ValueError(f"token id {id} is outside the vocabulary of {self.n_vocab} tokens")
        return self._pieces[id]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return b"".join(self.token_to_piece(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns tokens arriving one by one into text, holding back a UTF-8 sequence that a later
    token completes (an emoji or CJK character often spans several byte tokens)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._pending = b""

    def feed(self, id: int) -> str:
        buf = self._pending + self._tokenizer.token_to_piece(id)
        cut = _complete_utf8_prefix(buf)
        self._pending = buf[cut:]
        return buf[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text


def _complete_utf8_prefix(buf: bytes) -> int:
    """Length of ``buf`` without a trailing multi-byte sequence that is still missing bytes."""
    # a sequence is at most 4 bytes, so its lead byte is among the last 3 when it is incomplete
    for back in range(1, min(3, len(buf)) + 1):
        byte = buf[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        needed = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return len(buf) - back if needed > back else len(buf)
    return len(buf)


def _build_hf(
    vocab: dict[str, int], merges: Sequence[str], texts: list[str], attrs: list[int], pre: str, where: str
) -> HFTokenizer:
    # llama.cpp splits a merge at the first space after its first byte and keeps the first rank
    # of a pair that appears twice.
    pairs: dict[tuple[str, str], None] = {}
    for merge in merges:
        cut = merge.find(" ", 1)
        if cut > 0:
            pairs.setdefault((merge[:cut], merge[cut + 1 :]), None)
    try:
        hf = HFTokenizer(models.BPE(vocab, list(pairs), ignore_merges=pre in _LLAMA3_NAMES))
    except Exception as e:  # tokenizers raises plain Exception for a merge outside the vocabulary
        raise ModelError(f"{where}the tokenizer's merges do not fit its vocabulary ({e})") from None
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    # llama.cpp matches control, user-defined and unknown tokens in the raw text before anything
    # else (no lstrip/rstrip for these models); only control and unknown ones are "special",
    # i.e. left as text when parse_special is off.
    hf.add_tokens(
        [AddedToken(texts[i], special=bool(a & _SPECIAL), normalized=False) for i, a in enumerate(attrs) if a & _MATCHED_IN_TEXT]
    )
    return hf
