"""The OpenAI-compatible API's answers: one builder per shape, and pydantic models of the same
shapes for the published OpenAPI schema (the server writes plain dicts: the models document,
the builders produce, and the schemathesis run checks that the two agree).

edgebox's additions are extra fields OpenAI clients ignore: ``reasoning_content`` (DeepSeek's
API name for R1's thinking), ``timings`` (llama-server's names), ``usage.energy`` (joules).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}  # engine done_reason -> OpenAI

# -- documented shapes (OpenAPI) -------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | int | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class EnergyOut(BaseModel):
    """edgebox's extension: what the request cost the chips (its share of each step it was in)."""

    joules: float
    joules_per_token: float | None
    prefill_j: float
    decode_j: float
    avg_w: float


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    energy: EnergyOut | None = None


class TimingsOut(BaseModel):
    """llama-server's ``timings`` (milliseconds), plus queue and time to first token."""

    prompt_n: int
    prompt_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_second: float
    cache_n: int
    queue_ms: float
    ttft_ms: float
    draft_n: int = 0  # speculative draft tokens verified, and of those kept (llama-server's names)
    draft_n_accepted: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: Any = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut
    timings: TimingsOut | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: Any = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut
    timings: TimingsOut | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    meta: dict[str, Any] = Field(default_factory=dict, description="context size, quant mix, chips, ... of the loaded model")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


# -- builders ------------------------------------------------------------------------------------------


def error_body(
    message: str, type_: str, code: str | int | None = None, param: str | None = None, retry_after_s: float | None = None
) -> dict:
    """OpenAI's error shape; ``retry_after_s`` (edgebox's, on a deadline it cannot meet) only when given."""
    error = {"message": message, "type": type_, "code": code, "param": param}
    if retry_after_s is not None:
        error["retry_after_s"] = retry_after_s
    return {"error": error}


def usage(s) -> dict:
    out = {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_prompt_tokens},
    }
    if s.energy is not None:
        out["energy"] = s.energy.as_dict()
    return out


def timings(s) -> dict:
    prompt_n = max(0, s.prompt_tokens - s.cached_prompt_tokens)
    return {
        "prompt_n": prompt_n,
        "prompt_ms": round(s.prompt_s * 1e3, 3),
        "prompt_per_second": round(prompt_n / s.prompt_s, 2) if s.prompt_s > 0 else 0.0,
        "predicted_n": s.generated_tokens,
        "predicted_ms": round(s.decode_s * 1e3, 3),
        "predicted_per_second": round(s.decode_tok_per_s, 2),
        "cache_n": s.cached_prompt_tokens,
        "queue_ms": round(s.queue_s * 1e3, 3),
        "ttft_ms": round(s.ttft_s * 1e3, 3),
        "draft_n": s.draft_tokens,
        "draft_n_accepted": s.draft_accepted,
    }


class Shape:
    """The fixed part of every object one request answers with: id, kind, time, model."""

    def __init__(self, chat: bool, request_id: str, model: str, tokenizer=None):
        self.chat = chat
        self.tokenizer = tokenizer  # token ids -> text, for logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.model = model
        # a streamed piece is the same JSON each time but for its text: render the rest once
        head = _json(self._head("chat.completion.chunk" if chat else "text_completion"))[:-1]
        if chat:
            self._piece = {r: (f'{head},"choices":[{{"index":0,"delta":{{"{f}":', '},"finish_reason":null,"logprobs":null}]}')
                           for r, f in ((False, "content"), (True, "reasoning_content"))}  # fmt: skip
        else:
            self._piece = dict.fromkeys(
                (False, True), (f'{head},"choices":[{{"index":0,"text":', ',"finish_reason":null,"logprobs":null}]}')
            )

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": "edgebox"}

    def final(self, s) -> dict:
        """The whole answer of a request that was not streamed (``s``: the engine's Summary)."""
        reason = FINISH_REASONS.get(s.done_reason, s.done_reason)
        if self.chat:
            message = {"role": "assistant", "content": s.content}
            if s.tool_calls:
                message["tool_calls"] = list(s.tool_calls)
            if s.reasoning:
                message["reasoning_content"] = s.reasoning
            choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": self.logprobs(s.logprobs)}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": s.text, "finish_reason": reason, "logprobs": self.logprobs(s.logprobs)}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage(s), "timings": timings(s)}

    def logprobs(self, entries) -> dict | None:
        """OpenAI's ``logprobs`` for ``entries`` (``text.sampler.TokenLogprobs``): chat's
        ``{"content": [{token, logprob, bytes, top_logprobs}]}``, or the legacy completions shape
        (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``); None when not asked."""
        if not entries:
            return None
        piece = self._piece_bytes
        if self.chat:
            return {
                "content": [
                    {
                        "token": piece(e.token).decode("utf-8", "replace"),
                        "logprob": e.logprob,
                        "bytes": list(piece(e.token)),
                        "top_logprobs": [
                            {"token": piece(t).decode("utf-8", "replace"), "logprob": lp, "bytes": list(piece(t))}
                            for t, lp in e.top
                        ],
                    }
                    for e in entries
                ]
            }
        tokens = [piece(e.token).decode("utf-8", "replace") for e in entries]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{piece(t).decode("utf-8", "replace"): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def _piece_bytes(self, token: int) -> bytes:
        piece = self.tokenizer.token_to_piece(token)
        return piece if isinstance(piece, bytes) else piece.encode("utf-8")

    def delta(self, text: str = "", reasoning: bool = False, first: bool = False) -> dict:
        """One streamed piece of text."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}  # OpenAI opens with the role
            if text:
                delta["reasoning_content" if reasoning else "content"] = text
            return {
                **self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}],
            }
        return {**self._head("text_completion"), "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}]}

    def delta_event(self, text: str, reasoning: bool = False) -> str:
        """``delta(text, reasoning)`` as an SSE event, without building and encoding the dict."""
        prefix, suffix = self._piece[reasoning]
        return f"data: {prefix}{json.dumps(text, ensure_ascii=False)}{suffix}\n\n"

    def delta_of(self, delta: dict) -> dict:
        """A chat chunk carrying ``delta`` as given (a tool-call parser's content or calls)."""
        return {
            **self._head("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}],
        }

    def last_delta(self, s) -> dict:
        """The chunk that carries ``finish_reason`` (and llama-server's ``timings``)."""
        reason = FINISH_REASONS.get(s.done_reason, s.done_reason)
        if self.chat:
            choice = {"index": 0, "delta": {}, "finish_reason": reason, "logprobs": None}
            head = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": "", "finish_reason": reason, "logprobs": None}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "timings": timings(s)}

    def usage_chunk(self, s) -> dict:
        """``stream_options.include_usage``: the extra last chunk, with no choices."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(s)}


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
