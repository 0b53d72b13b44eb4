"""Constrained decoding: the one wrapper around llguidance (the grammar engine llama.cpp uses).

A ``Constraint`` says what the output must be: a JSON Schema, any JSON object, a regex or a Lark
grammar (llguidance's dialect, which can embed schemas: ``obj: %json {...}``). ``parse_constraint``
reads the shapes requests carry (OpenAI ``response_format``, ollama ``format``); ``compile_constraint``
turns one into a ``Grammar`` for a tokenizer; ``Grammar.matcher()`` gives a sequence its own
``Matcher``, which says which tokens may come next (a bitmask, one bit per token) and follows the
tokens chosen. What a mask means for the draw is ``apply_mask``: every other token's logit is
-inf; ``Sampler.sample(..., allowed=mask)`` draws exactly that token, faster, from the allowed ones.

Invariants and why:
- one ``LLTokenizer`` per ``Tokenizer`` (built once, ~0.3 s on a 102k vocabulary), from the very
  bytes edgebox's detokenizer prints (``token_to_piece``), so the grammar checks the text the user
  sees; control tokens are special (never text), and every end-of-generation id is an EOS to
  llguidance, so any of them may end a sequence once the grammar accepts;
- compiled grammars are cached per tokenizer (LRU of ``GRAMMAR_CACHE`` entries); a sequence gets
  a ``deep_copy`` of the compiled matcher, which shares the compiled lexer and parser tables;
- hostile grammars are bounded: the text is at most ``MAX_SPEC_BYTES``; llguidance's
  ``LIMITS`` cap the grammar size, the lexer's states and its fuel at compile time and per token
  (a mask costs at most ~15 ms of lexer work and ~2.5 ms of parser work, llguidance's own speed
  figures; a first mask of a regex of a million states took 0.1 s here), and a sequence that
  hits a limit ends with a one-line ``GrammarError``.
- the JSON is compact (no whitespace) and date/time formats are strict patterns (see below).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from llguidance import LLExecutor, LLMatcher, LLParserLimits, LLTokenizer, TokenizerWrapper
from llguidance.numpy import fill_next_token_bitmask_par

from edgebox.errors import EdgeboxError

MAX_SPEC_BYTES = 64 * 1024  # a schema / regex / grammar's text; more is refused before compiling
GRAMMAR_CACHE = 32  # compiled grammars kept per tokenizer
# llguidance's resource limits (LLParserLimits), its defaults tightened where an edge box needs it:
# the lexer's states (~1-2 kB each: 40 MB at most instead of 500 MB) and the grammar's size.
LIMITS = dict(
    max_items_in_row=2000,  # branching of one production row
    initial_lexer_fuel=200_000,  # regex analysis before the first mask (llguidance: 1M; 1.1 s -> 0.1 s on a hostile regex here)
    step_lexer_fuel=200_000,  # lexer work per token mask (~15 ms)
    step_max_items=50_000,  # Earley items per token mask (~2.5 ms)
    max_lexer_states=20_000,
    max_grammar_size=200_000,  # symbols in all productions
    verbose_errors=False,  # no parser dumps in the error a client sees
)
# JSON output compact ("," and ":", no whitespace): a model that likes spaces could otherwise
# spend max_tokens on them (llguidance's default is flexible whitespace)
JSON_OPTIONS = {"whitespace_flexible": False}
# llguidance's "date", "time" and "date-time" formats allow February 29 of any year and second 60
# of any minute; JSON Schema validators (RFC 3339: leap seconds only at 23:59:60 UTC) refuse
# them. These patterns (years 0001-9999, leap years exact, seconds 00-59, at most 6 fraction
# digits) replace those formats before compiling, so the output always validates.
_DATE = (
    r"(?:(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    r"|02-(?:0[1-9]|1[0-9]|2[0-8]))|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)-02-29)"
)
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
FORMAT_PATTERNS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$"}
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # their values are data, not schemas
KINDS = ("json_schema", "json_object", "regex", "lark")


class GrammarError(EdgeboxError):
    """A constraint that cannot be used: malformed, refused by llguidance, or a limit hit while
    generating (code 400). One line, with llguidance's message."""


@dataclass(frozen=True)
class Constraint:
    """What the output must match. ``kind`` is one of ``KINDS``; ``text`` is the JSON Schema (as
    compact JSON), the regex or the Lark grammar. Build it with the class methods."""

    kind: str
    text: str

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> Constraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
        # key order kept: the output follows it
        return cls("json_schema", json.dumps(_strict_formats(schema), separators=(",", ":")))

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object (OpenAI's ``{"type": "json_object"}``, ollama's ``"json"``)."""
        return cls("json_object", '{"type":"object"}')

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", _text("regex", pattern))

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        """A Lark grammar in llguidance's dialect (``start:`` is the output; ``%json {schema}``
        embeds a JSON Schema, e.g. a tool call's arguments)."""
        return cls("lark", _text("lark", grammar))

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if len(self.text.encode()) > MAX_SPEC_BYTES:
            raise GrammarError(
                f"the {self.kind} constraint has {len(self.text.encode())} bytes; at most {MAX_SPEC_BYTES} are allowed"
            )

    def grammar(self) -> str:
        """The llguidance grammar definition (not yet checked)."""
        if self.kind in ("json_schema", "json_object"):
            return LLMatcher.grammar_from_json_schema(self.text, overrides=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.text)
        return LLMatcher.grammar_from_lark(self.text)


def _strict_formats(schema: object) -> object:
    """``schema`` with the date/time formats as ``FORMAT_PATTERNS`` (where no pattern is given)."""
    if isinstance(schema, list):
        return [_strict_formats(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else _strict_formats(v) for k, v in schema.items()}
    fmt = out.get("format")
    if isinstance(fmt, str) and fmt in FORMAT_PATTERNS and "pattern" not in out:
        del out["format"]
        out["pattern"] = FORMAT_PATTERNS[fmt]
    return out


def _text(field: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise GrammarError(f"'{field}' must be a non-empty string, got {value!r:.60}")
    return value


def parse_constraint(value: object, field: str = "response_format") -> Constraint | None:
    """The constraint a request's ``field`` asks for (None: free text). Accepted shapes:

    - OpenAI ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}``,
      ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``;
      edgebox's extensions ``{"type": "regex", "regex": "..."}`` and ``{"type": "lark", "lark": "..."}``;
    - ollama ``format``: ``"json"`` or a JSON Schema object (any dict whose ``type`` is not one of
      the OpenAI names above);
    - a ``Constraint`` (returned as is) or None.
    Malformed values raise ``GrammarError`` naming the field."""
    if value is None or isinstance(value, Constraint):
        return value
    if value == "json":
        return Constraint.json_object()
    if value == "" or value == "text":
        return None
    if not isinstance(value, dict):
        raise GrammarError(f'{field} must be an object or "json", got {value!r:.60}')
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise GrammarError(f'{field}.json_schema must be an object with a "schema" (and a "name"), got {spec!r:.60}')
        if not isinstance(spec["schema"], (dict, bool)):
            raise GrammarError(f"{field}.json_schema.schema must be a JSON Schema object, got {spec['schema']!r:.60}")
        return Constraint.json_schema(spec["schema"])
    if kind in ("regex", "lark"):
        if not isinstance(value.get(kind), str) or not value.get(kind):
            raise GrammarError(f"{field}.{kind} must be a non-empty string")
        return Constraint.regex(value[kind]) if kind == "regex" else Constraint.lark(value[kind])
    return Constraint.json_schema(value)  # ollama: the dict is the schema itself


# -- compiling, per tokenizer ------------------------------------------------------------------
class _Slot:
    """A tokenizer's LLTokenizer and its compiled grammars (LRU)."""

    def __init__(self, tokenizer):
        self.ll = LLTokenizer(TokenizerWrapper(_Vocab(tokenizer)), n_vocab=tokenizer.n_vocab, eos_token=sorted(tokenizer.eog_ids))
        self.grammars: OrderedDict[Constraint, Grammar] = OrderedDict()


class _Vocab:
    """What llguidance's ``TokenizerWrapper`` reads: every token's bytes, the special ids, and an
    encoder (str -> ids) it uses to tokenize forced text."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_to_piece(i) for i in range(tokenizer.n_vocab)]
        # control/unknown tokens (the tokenizer's skip-special set) and end-of-generation ones
        self.special_token_ids = sorted(tokenizer._special_ids | tokenizer.eog_ids)

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # tells TokenizerWrapper to hand us str, not bytes
            raise TypeError("str expected")
        return self._tok.encode(text, add_bos=False, parse_special=False)


_slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _slot(tokenizer) -> _Slot:
    with _lock:
        slot = _slots.get(tokenizer)
        if slot is None:
            slot = _slots[tokenizer] = _Slot(tokenizer)
        return slot


def compile_constraint(tokenizer, constraint: Constraint) -> Grammar:
    """The compiled grammar of ``constraint`` for ``tokenizer`` (cached). Raises ``GrammarError``
    with llguidance's message when it does not compile or exceeds ``LIMITS``."""
    slot = _slot(tokenizer)
    with _lock:
        grammar = slot.grammars.get(constraint)
        if grammar is not None:
            slot.grammars.move_to_end(constraint)
            return grammar
    try:
        definition = constraint.grammar()
    except ValueError as e:
        raise GrammarError(f"the {constraint.kind} constraint is malformed: {_one_line(str(e))}") from None
    # the constructor drops the GIL while it compiles; it never raises for a bad grammar
    proto = LLMatcher(slot.ll, definition, log_level=0, limits=LLParserLimits(**LIMITS))
    if proto.is_error():
        raise GrammarError(f"the {constraint.kind} constraint does not compile: {_one_line(proto.get_error())}")
    grammar = Grammar(constraint, proto, tokenizer.n_vocab)
    with _lock:
        slot.grammars[constraint] = grammar
        while len(slot.grammars) > GRAMMAR_CACHE:
            slot.grammars.popitem(last=False)
    return grammar


def _one_line(message: str) -> str:
    """llguidance's message on one line: its unindented lines (the indented ones quote the source
    with a caret under the error), at most 300 characters."""
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line[0].isspace()]
    return " ".join(lines).replace(" <non-verbose/>", "")[:300] or "unknown error"


@dataclass(frozen=True)
class Grammar:
    constraint: Constraint
    _proto: LLMatcher
    n_vocab: int

    def matcher(self) -> Matcher:
        return Matcher(self._proto.deep_copy(), self.n_vocab, self.constraint.kind)


# -- one sequence ------------------------------------------------------------------------------
def mask_words(n_vocab: int) -> int:
    """int32 words in one token bitmask (bit i of word i // 32 = token i allowed)."""
    return (n_vocab + 31) // 32


class Matcher:
    """One sequence's place in its grammar: which tokens may come next, and the tokens taken.
    ``is_stopped``: only an end-of-generation token may follow (the output is complete)."""

    def __init__(self, ll: LLMatcher, n_vocab: int, kind: str):
        self._ll, self.n_vocab, self.kind = ll, n_vocab, kind

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the next token's bitmask into ``out`` (int32 [mask_words], contiguous); releases
        the GIL while it works."""
        self._ll.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        self.check()

    def bitmask(self) -> np.ndarray:
        out = np.zeros(mask_words(self.n_vocab), np.int32)
        self.fill_bitmask(out)
        return out

    def allowed_mask(self) -> np.ndarray:
        """bool [n_vocab]: the tokens the grammar allows next."""
        return allowed_from_bitmask(self.bitmask(), self.n_vocab)

    def consume(self, token: int) -> None:
        if not self._ll.consume_token(int(token)):
            raise GrammarError(f"the {self.kind} constraint stopped at token {token}: {_one_line(self._ll.get_error())}")

    def check(self) -> None:
        """Raise the matcher's error (a limit hit), if any, as one line."""
        if self._ll.is_error():
            raise GrammarError(f"the {self.kind} constraint failed while generating: {_one_line(self._ll.get_error())}")

    @property
    def is_accepting(self) -> bool:
        return self._ll.is_accepting()

    @property
    def is_stopped(self) -> bool:
        return self._ll.is_stopped() and not self._ll.is_error()

    @property
    def llmatcher(self) -> LLMatcher:
        return self._ll


def allowed_from_bitmask(bitmask: np.ndarray, n_vocab: int) -> np.ndarray:
    """bool [n_vocab] of a token bitmask (little-endian bits, as llguidance writes them)."""
    return np.unpackbits(bitmask.view(np.uint8), bitorder="little", count=n_vocab).view(np.bool_)


def apply_mask(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``logits`` [V] with every token not ``allowed`` (bool [V]) at -inf: a new array, so the
    caller's row is left as it was. The meaning of a mask; ``Sampler.sample(allowed=)`` draws the
    token a sampler draws from this row without building it (a sampler handed this row spends
    15 ms in top-k on a 102k vocabulary: numpy's argpartition degenerates on equal values)."""
    return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)


def fill_bitmasks(executor: LLExecutor, matchers: list[Matcher]) -> np.ndarray:
    """The next bitmasks of several matchers at once, on llguidance's thread pool (the GIL is
    released throughout): int32 [len(matchers), mask_words]. Row i belongs to matchers[i]."""
    n_vocab = matchers[0].n_vocab if matchers else 0
    out = np.zeros((len(matchers), mask_words(n_vocab)), np.int32)
    if matchers:
        fill_next_token_bitmask_par(executor, [(m.llmatcher, i) for i, m in enumerate(matchers)], out)
    return out
