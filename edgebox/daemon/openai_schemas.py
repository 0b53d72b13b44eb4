"""The OpenAI-compatible HTTP API's request bodies and how each becomes an engine ``Request``.

Field names, types and ranges follow OpenAI's API reference; llama-server's sampler extras
(``top_k``, ``min_p``, ``repeat_penalty``, ``repeat_last_n``) sit beside them with llama.cpp's
names. Unknown fields are ignored, as llama-server and vLLM do (applications send fields of newer
API versions); a known field of the wrong type or out of range is a 400 naming it. edgebox's own
answers go in extra fields (``timings``, ``reasoning_content``), never by changing OpenAI's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from edgebox.daemon.sampling import SamplerExtras, Scheduling, sampler_settings

Stop = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # "1" is not a number, 0 not a bool: as the schema says


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    reasoning_content: str | None = None  # DeepSeek's API: an earlier turn's reasoning (templates drop it)
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=64, description="an assistant turn's calls")
    tool_call_id: str | None = Field(None, max_length=256, description="a tool turn: the call it answers")

    def as_template_message(self) -> dict:
        """What the GGUF's chat template sees: role and plain-text content (OpenAI's ``developer``
        role is the templates' ``system``), an assistant's ``tool_calls``, a tool's ``tool_call_id``."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
            out["content"] = content  # None when the turn was only calls, as OpenAI sends it
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body, SamplerExtras, Scheduling):
    """The settings shared by both endpoints. ``None`` = the server's default (llama-server's)."""

    model: str | None = Field(None, max_length=256, description="ignored: the box serves the model it has loaded")
    max_tokens: int | None = Field(
        None, ge=1, description="at most this many generated tokens (default: until the context is full)"
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="llama.cpp: keep the K most likely tokens (0: off)")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="llama.cpp: drop tokens below min_p x the top probability")
    repeat_penalty: float | None = Field(None, ge=1e-6, le=100.0, description="llama.cpp: penalize recent tokens (1: off)")
    repeat_last_n: int | None = Field(None, ge=-1, le=1_000_000, description="llama.cpp: the window repeat_penalty looks at")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Stop | list[Stop] | None = Field(None, description="up to 16 strings that end the generation")
    n: int = Field(1, ge=1, le=1, description="choices per request: 1 (edgebox generates one at a time)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    response_format: dict[str, Any] | None = Field(
        None,
        description='{"type": "json_schema", "json_schema": {"schema": ...}}, {"type": "json_object"}, or edgebox\'s regex / lark',
    )

    @model_validator(mode="after")
    def _stops(self):
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError("stop: at most 16 strings")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    tools: list[dict[str, Any]] | None = Field(
        None, max_length=128, description="OpenAI function tools, through the chat template"
    )
    tool_choice: str | dict[str, Any] | None = Field(None, description='"auto", "none", "required" or a named function')
    logprobs: bool = Field(False, description="each generated token's log-probability (OpenAI's, before the sampler chain)")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the N most likely tokens at each place")
    parallel_tool_calls: bool | None = Field(None, description="accepted; a forced call is one call")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: str | TokenIds | list[str] | list[TokenIds] = Field(description="a string or a list of token ids (one prompt)")
    echo: bool = Field(False, description="false only: edgebox does not repeat the prompt")
    logprobs: int | None = Field(None, ge=0, le=20, description="each token's log-probability and the N most likely")
    suffix: str | None = Field(None, description="not supported (fill-in-the-middle): leave it out")

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise ValueError("prompt: one prompt per request (send a list of several as separate requests)")
            self.prompt = self.prompt[0]
        if self.echo:
            raise ValueError("echo: not supported; leave it false")
        if self.suffix:
            raise ValueError("suffix: fill-in-the-middle is not supported; leave it out")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


def engine_request(body: _Sampling, *, default_max_tokens: int, max_tokens_limit: int, request_id: str) -> Any:
    """The engine's ``Request`` for a body; raises ``ValueError`` (-> 400) naming the field."""
    from edgebox.engine import Request
    from edgebox.text.sampler import SamplingParams

    max_tokens = body.token_limit or default_max_tokens
    if max_tokens > max_tokens_limit:
        field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise ValueError(f"{field} {max_tokens} exceeds this server's limit of {max_tokens_limit}")
    params = SamplingParams(**sampler_settings(body))
    common = dict(
        max_tokens=max_tokens,
        params=params,
        stop=body.stop_strings,
        request_id=request_id,
        response_format=body.response_format,
        priority=body.priority,
        deadline_s=body.deadline_s,
    )
    if isinstance(body, ChatCompletionRequest):
        messages = tuple(m.as_template_message() for m in body.messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return Request(messages=messages, tools=body.tools or None, tool_choice=body.tool_choice, logprobs=logprobs, **common)
    common["logprobs"] = body.logprobs
    prompt = body.prompt
    if isinstance(prompt, list):
        return Request(prompt_ids=tuple(prompt), **common)
    return Request(prompt=prompt, **common)
