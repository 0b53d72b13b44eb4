"""``Model``: a loaded GGUF with its tokenizer, the forward pass and simple generation.

This is the public object of ``edgebox.load``; the engine (many requests at once) builds on it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgebox.chips.box import Box
from edgebox.errors import ContextOverflowError, EdgeboxError
from edgebox.gguf.loader import LoadedModel, load_gguf
from edgebox.kernels import entry_hint
from edgebox.kernels.backend import BACKENDS, DEFAULT_BACKEND
from edgebox.kernels.kv_quant import cache_type
from edgebox.model import KVCache, Transformer
from edgebox.model.kv_cache import Segment, step_cost
from edgebox.text.chat import check_chat_template, render_chat
from edgebox.text.generation import Completion
from edgebox.text.grammar import Constraint, compile_constraint, parse_constraint
from edgebox.text.sampler import SamplingParams

DEFAULT_CTX = 4096


def context_size(n_ctx: int | None, n_ctx_train: int) -> int:
    """The context a model runs with: None = min(DEFAULT_CTX, the trained context); 0 = the trained
    context (llama.cpp's ``-c 0``); a larger value is capped at the trained context (llama.cpp runs
    past it with a warning; edgebox does not extend a model's context). Negative: refused."""
    if n_ctx is None:
        return min(DEFAULT_CTX, n_ctx_train)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 0:
        raise EdgeboxError(f"n_ctx must be None (default), 0 (the model's trained context) or a positive integer, got {n_ctx!r}")
    return n_ctx_train if n_ctx == 0 else min(int(n_ctx), n_ctx_train)


def token_array(ids: Sequence[int], n_vocab: int) -> np.ndarray:
    """``ids`` as int32, each checked to be an integer token id in [0, n_vocab)."""
    ids = list(ids)
    if not ids:
        raise EdgeboxError("no token ids given; give at least one")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n_vocab:
            raise EdgeboxError(f"token ids must be integers in [0, {n_vocab}); got {i!r}")
    return np.asarray(ids, np.int32)


def default_model_path() -> Path:
    """The small model bundled in the package, used when no model is named."""
    return Path(__file__).parent / "data" / "default.gguf"


def load(
    path: str | os.PathLike | None = None,
    chips: int = 1,
    n_ctx: int | None = None,
    profile: str | None = None,
    backend: str = DEFAULT_BACKEND,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
) -> Model:
    """Map a GGUF model (no weights are copied) and split it over ``chips`` chips.

    ``path`` None loads the bundled default model; ``n_ctx`` as ``context_size`` reads it. ``chips=1``
    runs the whole model on one device (the ``host`` profile unless ``profile`` names another); more
    chips use ``r100-edge``.
    ``backend``: "numba" (the JIT kernels), "onnxruntime" (its MatMulNBits for the matmuls),
    "auto" (numba or onnxruntime per weight shape and batch size, timed on this CPU once and
    cached: ``kernels.autotune``) or "ref" (the numpy reference, slow and exact).
    ``cache_type_k``, ``cache_type_v``: the KV cache's element types, llama.cpp's names "f16"
    (default), "q8_0" or "q4_0" (``kernels.kv_quant``); a bad one is refused before the file is read.
    """
    cache_types = (cache_type(cache_type_k, "cache_type_k"), cache_type(cache_type_v, "cache_type_v"))
    if backend not in BACKENDS:
        raise EdgeboxError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = default_model_path() if path is None else path
    entry_hint.read_ahead_model(path, chips)  # the weights read from disk while the GGUF is parsed
    loaded = load_gguf(path)
    # a hostile or broken chat template refuses the load, before any request uses it (text.chat)
    check_chat_template(
        loaded.file.fields.get("tokenizer.chat_template"), loaded.file.path.name, **_special_texts(loaded.tokenizer)
    )
    n_ctx = context_size(n_ctx, loaded.args.n_ctx_train)  # refused before the chips start
    box = Box(
        loaded.args,
        loaded.weights,
        chips,
        profile=profile,
        backend=backend,
        source=loaded.file.path.name,
        cache_type_k=cache_types[0],
        cache_type_v=cache_types[1],
    )
    return Model(loaded, box, n_ctx=n_ctx)


def _special_texts(tok) -> dict[str, str]:
    """The ``bos_token`` and ``eos_token`` text a chat template sees."""

    def text(token_id: int | None) -> str:
        return tok.token_to_piece(token_id).decode("utf-8", "replace") if token_id is not None else ""

    return {"bos_token": text(tok.bos_id), "eos_token": text(tok.eos_id)}


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    done_reason: str = ""  # stop | length
    prefill_j: float = 0.0  # the chips' energy for the prompt pass (the box runs nothing else meanwhile)
    decode_j: float = 0.0  # ... and for the decode steps

    @property
    def joules(self) -> float:
        return self.prefill_j + self.decode_j

    @property
    def prompt_tok_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        # the first generated token comes out of the prompt pass; the rest are decode steps
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


@dataclass
class Generation:
    """An iterator of text pieces for one prompt; ``stats`` is complete once it is exhausted.

    The end-of-generation, stop-string and max-token rules are ``Completion``'s (the engine's
    too); the context is the model's: generation also ends when it is full."""

    model: Model
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: Sequence[str] = ()
    constraint: Constraint | None = None  # text.grammar: what the output must match
    stats: GenerationStats = field(default_factory=GenerationStats)
    tokens: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[str]:
        m = self.model
        n_prompt = len(self.prompt_ids)
        if n_prompt == 0:
            raise EdgeboxError("the prompt is empty and the model adds no BOS token; give a prompt")
        prompt = token_array(self.prompt_ids, m.args.n_vocab)
        if n_prompt + 1 > m.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {n_prompt} tokens but the context holds {m.n_ctx}; shorten the prompt or raise the context size"
            )
        completion = Completion(
            m.tokenizer, self.prompt_ids, self.params, min(self.max_tokens, m.n_ctx - n_prompt), self.stop, self.constraint
        )
        self.tokens = completion.tokens
        kv = m.new_cache()

        # prompt processing: one forward pass over the whole prompt, logits of the last token only
        t0, j0 = time.perf_counter(), m.box.accounting.step_j
        logits = m.forward(prompt, np.arange(n_prompt, dtype=np.int32), kv, all_logits=False)[0]
        self.stats.prompt_tokens = n_prompt
        self.stats.prompt_seconds = time.perf_counter() - t0
        self.stats.prefill_j = m.box.accounting.step_j - j0

        # decode: sample, show the text, feed the token back until the completion ends
        t0, j0 = time.perf_counter(), m.box.accounting.step_j
        while True:
            token = completion.sample(logits)
            text = completion.push(token)
            self.stats.generated_tokens = len(completion.tokens)
            if text:
                yield text
            if completion.done_reason is not None:
                break
            pos = np.array([n_prompt + len(completion.tokens) - 1], np.int32)
            logits = m.forward(np.array([token], np.int32), pos, kv, all_logits=False)[0]
            self.stats.decode_j = m.box.accounting.step_j - j0
        tail = completion.finish()
        if tail:
            yield tail
        self.stats.done_reason = completion.done_reason
        self.stats.decode_seconds = time.perf_counter() - t0


class Model:
    def __init__(self, loaded: LoadedModel, box: Box, n_ctx: int | None = None):
        self.path = loaded.file.path
        self.file = loaded.file
        self.args = loaded.args
        self.tokenizer = loaded.tokenizer
        self.weights = loaded.weights
        self.box = box
        self.transformer = Transformer(loaded.args, loaded.weights, box)
        self.n_ctx = context_size(n_ctx, self.args.n_ctx_train)

    @property
    def chat_template(self) -> str | None:
        template = self.file.fields.get("tokenizer.chat_template")
        return template if isinstance(template, str) else None

    def prepare(self, progress: bool = False) -> None:
        """Repack the weights for the kernels now (otherwise each is repacked at its first use)."""

        def show(done: int, total: int) -> None:
            print(
                f"\rpreparing weights for the kernels: {done}/{total}",
                end="" if done < total else "\n",
                file=sys.stderr,
                flush=True,
            )

        self.box.prepare(show if progress else None)

    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        return self.transformer.new_cache(n_ctx or self.n_ctx)

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; adds BOS when the GGUF says add_bos_token (unless told otherwise)."""
        return self.tokenizer.encode(text, add_bos=add_bos)

    def tokenize_prompt(self, text: str) -> list[int]:
        """Like ``tokenize``, but a prompt whose text already starts with the BOS token (as chat
        templates render it) does not get a second one, as llama.cpp avoids."""
        tok = self.tokenizer
        if tok.add_bos and tok.bos_id is not None:
            bos_text = tok.token_to_piece(tok.bos_id).decode("utf-8", "replace")
            if bos_text and text.startswith(bos_text):
                return tok.encode(text, add_bos=False)
        return tok.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), n_vocab] for a fresh sequence; row i = next-token logits after ids[:i+1]."""
        tokens = token_array(ids, self.args.n_vocab)
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"{len(tokens)} tokens do not fit in the context of {self.n_ctx}")
        return self.forward(tokens, np.arange(len(tokens), dtype=np.int32), self.new_cache())

    def forward(self, tokens: np.ndarray, positions: np.ndarray, kv: KVCache, all_logits: bool = True) -> np.ndarray:
        """``Transformer.forward`` with the chips charged for it: logits [T, V] (or [1, V])."""
        segment = Segment(tokens, positions, kv, all_logits)
        self.box.account_step(*step_cost([segment]))
        return self.transformer.forward_segments([segment])[0]

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: object = None) -> str:
        """The prompt for ``messages`` (and OpenAI ``tools``) through the GGUF's chat template
        (llama.cpp --jinja); tools for a template without call syntax: ``ToolsUnsupportedError``."""
        template = self.chat_template
        if template is None:
            raise EdgeboxError(
                f"{self.path.name} has no tokenizer.chat_template; run without chat mode or use a model that has one"
            )
        return render_chat(
            template,
            messages,
            tools=tools,
            tool_choice=tool_choice,
            add_generation_prompt=True,
            template_name=self.path.name,
            **_special_texts(self.tokenizer),
        )

    def stream(
        self,
        prompt: str | list[int],
        max_tokens: int = 128,
        params: SamplingParams | None = None,
        stop: Sequence[str] = (),
        response_format: object = None,
    ) -> Generation:
        """``response_format``: a ``text.grammar.Constraint`` or a request shape ``parse_constraint``
        reads (OpenAI ``response_format``, ollama ``format``); a bad one raises ``GrammarError`` here."""
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenize_prompt(prompt)
        constraint = parse_constraint(response_format)
        if constraint is not None:
            compile_constraint(self.tokenizer, constraint)  # refused now, not at the first token
        return Generation(self, ids, params or SamplingParams(), max_tokens, tuple(stop), constraint)

    def generate(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        response_format: object = None,
        **sampling,
    ) -> Iterator[str]:
        """The completion of ``prompt``, streamed as text pieces. ``sampling``: any other
        ``SamplingParams`` field (llama.cpp's names: ``typical_p``, ``mirostat``, ``logit_bias``,
        ``dry_multiplier``, ``samplers``, ...); ``response_format`` constrains the output."""
        params = SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, **sampling
        )
        return iter(self.stream(prompt, max_tokens, params, stop, response_format))
