"""The wire protocol: topics, command payloads and replies (pydantic, strict).

Topics (``{d}`` is the device id)::

    edgebox/v1/{d}/status        retained  {"state": "online"|"offline", ...}; the Last Will says offline
    edgebox/v1/{d}/state         retained  model, budget, chips, config version, limits
    edgebox/v1/{d}/telemetry     periodic  per-chip power/frequency/temperature, batch, queue, tok/s,
                                           memory, energy counters (total_j, idle_j)
    edgebox/v1/{d}/event                   model_loaded, throttled, bad_request, ...
    edgebox/v1/{d}/cmd/{method}  QoS 1     generate, cancel, load_model, unload_model, set_power_budget, get_status
    edgebox/v1/{d}/reply/...               controllers' Response Topics (the per-device ACL lets the box answer)
    edgebox/v1/fleet/cmd/generate  QoS 1   a generate for any box, via the MQTT 5 shared subscription
                                           $share/edgebox/... (edgebox.daemon.fleet)

A command is ``{"request_id": "...", "params": {...}}`` (plus ``reply_to`` for MQTT 3.1.1 callers
and an optional ``expires_at`` in Unix seconds). Replies go to the Response Topic with the
Correlation Data copied. A generate streams ``{"request_id", "seq", "delta", "done": false}``
chunks; every command ends with exactly one final ``{"request_id", "seq", "done": true, "status":
"ok"|"error", "code", ...}``, a generate's with ``usage``, ``timings`` and ``energy``
(``edgebox.engine.energy``).

Codes: 200 ok, 400 bad input, 404 unknown method / request / model file, 408 expired before it
ran, 409 conflicts with the box's state, 413 too large (payload, prompt over the context, KV
budget), 429 too many in flight or a deadline it cannot meet (``retry_after_s``), 500 internal
error, 503 unavailable (no model, shutting down, stream broken by the network).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgebox.daemon.sampling import SamplerExtras, Scheduling

API_PREFIX = "edgebox/v1"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
METHODS = ("generate", "cancel", "load_model", "unload_model", "set_power_budget", "get_status")
MAX_TOPIC_BYTES = 512
FLEET_GENERATE = f"{API_PREFIX}/fleet/cmd/generate"  # "fleet" is therefore no device id
SHARED_GROUP = "edgebox"
FLEET_SHARED_GENERATE = f"$share/{SHARED_GROUP}/{FLEET_GENERATE}"

OK, BAD_REQUEST, NOT_FOUND, EXPIRED, CONFLICT, TOO_LARGE, TOO_MANY, INTERNAL, UNAVAILABLE = (
    200,
    400,
    404,
    408,
    409,
    413,
    429,
    500,
    503,
)


class Topics:
    """Every topic of one device."""

    def __init__(self, device_id: str):
        self.device_id = device_id
        self.prefix = f"{API_PREFIX}/{device_id}"
        self.status = f"{self.prefix}/status"
        self.state = f"{self.prefix}/state"
        self.telemetry = f"{self.prefix}/telemetry"
        self.event = f"{self.prefix}/event"
        self.cmd_filter = f"{self.prefix}/cmd/+"
        self.reply_prefix = f"{self.prefix}/reply/"

    def cmd(self, method: str) -> str:
        return f"{self.prefix}/cmd/{method}"

    def method_of(self, topic: str) -> str | None:
        if topic == FLEET_GENERATE:  # the shared subscription's messages arrive on the plain topic
            return "generate"
        head = f"{self.prefix}/cmd/"
        return topic[len(head) :] if topic.startswith(head) else None

    def reply(self, client_id: str) -> str:
        """The Response Topic a controller called ``client_id`` should use with this device."""
        return f"{self.reply_prefix}{client_id}"


def reply_topic_problem(topic: str, topics: Topics) -> str | None:
    """Why a reply topic cannot be used (None: fine). Replies must never land on our own status,
    state or command topics: a reply published to our own cmd topic would come back as a command."""
    if not topic:
        return "the reply topic is empty"
    if not _encodable(topic):
        return "the reply topic is not valid Unicode (a lone surrogate)"
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        return f"the reply topic is longer than {MAX_TOPIC_BYTES} bytes"
    if any(c in topic for c in "+#\0"):
        return "the reply topic contains a wildcard or NUL"
    if topic.startswith("$"):
        return "the reply topic starts with '$' (broker-reserved)"
    if (topic == topics.prefix or topic.startswith(topics.prefix + "/")) and not topic.startswith(topics.reply_prefix):
        return f"replies inside {topics.prefix}/ must go under {topics.reply_prefix}"
    return None


# -- commands ------------------------------------------------------------------------------------


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _unicode(v: str) -> str:
    # JSON's "\ud800" decodes to a lone surrogate, which no UTF-8 consumer (the tokenizer, a
    # file name, a topic) can take: refuse it here, as the 400 it is
    if not _encodable(v):
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)")
    return v


def _path_text(v: str) -> str:
    if "\0" in v:
        raise ValueError("must not contain a NUL character")
    return _unicode(v)


Text = Annotated[str, AfterValidator(_unicode)]
PathText = Annotated[str, AfterValidator(_path_text)]


class _Strict(BaseModel):
    # strict: "10" is not an int and true is not a number; forbid: a typo ("max_token") is an
    # error; no NaN or infinity anywhere (an expires_at of NaN would never expire)
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class CommandEnvelope(_Strict):
    request_id: str = Field(min_length=1, max_length=128)
    params: dict[str, Any] = Field(default_factory=dict)
    reply_to: Text | None = Field(None, description="reply topic for MQTT 3.1.1 callers (no Response Topic)")
    expires_at: float | None = Field(None, description="Unix time after which the command must not start")

    @field_validator("request_id")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("must be printable text")
        return v


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None = None  # None: an assistant turn that was only tool calls
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=64)  # an assistant turn's OpenAI tool_calls
    tool_call_id: str | None = Field(None, max_length=256)  # a tool turn: the call it answers


class GenerateParams(_Strict, SamplerExtras, Scheduling):
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=512)
    max_tokens: int = Field(128, ge=1)
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, ge=1e-6, le=100.0)
    repeat_last_n: int = Field(64, ge=-1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[Text] = Field(default_factory=list, max_length=16)
    stream: bool = True
    context_shift: bool = False
    n_keep: int = Field(0, ge=0)
    # structured output (text.grammar): OpenAI's response_format or ollama's format, not both
    response_format: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)  # OpenAI function tools (messages only)
    tool_choice: str | dict[str, Any] | None = None
    logprobs: int | None = Field(
        None, ge=0, le=20, description="the final reply lists each token's logprob and its N best rivals"
    )
    n_probs: int | None = Field(None, ge=0, le=100, description="llama.cpp's: each token's N best after the sampler chain")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateParams:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if any(not s or len(s) > 256 for s in self.stop):
            raise ValueError("each stop string must have 1 to 256 characters")
        return self


class CancelParams(_Strict):
    target: Text = Field(min_length=1, max_length=128, description="request_id of the generate to cancel")


class LoadModelParams(_Strict):
    path: PathText = Field(min_length=1, max_length=4096)
    chips: int | None = Field(None, ge=1, le=64)
    ctx: int | None = Field(None, ge=16)
    force: bool = Field(False, description="cancel requests in flight instead of refusing with 409")


class UnloadModelParams(_Strict):
    force: bool = False


class SetPowerBudgetParams(_Strict):
    watts: float = Field(gt=0.0, le=10_000.0)


class GetStatusParams(_Strict):
    pass


PARAMS: dict[str, type[_Strict]] = {
    "generate": GenerateParams,
    "cancel": CancelParams,
    "load_model": LoadModelParams,
    "unload_model": UnloadModelParams,
    "set_power_budget": SetPowerBudgetParams,
    "get_status": GetStatusParams,
}
assert tuple(PARAMS) == METHODS


# -- replies ---------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_prompt_tokens: int = 0
    prompt_truncated: int = 0


class Timings(BaseModel):
    queue_ms: float
    ttft_ms: float
    prompt_ms: float
    decode_ms: float
    total_ms: float
    decode_tokens_per_s: float
    draft_n: int = 0  # speculative draft tokens verified, and of those kept (llama-server's names)
    draft_n_accepted: int = 0


class EnergyUsage(BaseModel):
    """The request's share of the chips' energy (``edgebox.engine.energy`` states the rule)."""

    joules: float
    joules_per_token: float | None = None  # per generated token; absent when none was generated
    prefill_j: float
    decode_j: float
    avg_w: float  # joules over the device seconds of the steps it was in


class StreamChunk(BaseModel):
    request_id: str
    seq: int
    delta: str
    done: Literal[False] = False
    reasoning: bool | None = None  # True for DeepSeek-R1 thinking text; absent otherwise
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's streamed tool-call deltas; absent otherwise


class FinalReply(BaseModel):
    request_id: str | None  # None when the command was too broken to carry one
    seq: int
    done: Literal[True] = True
    status: Literal["ok", "error"]
    code: int
    message: str | None = None  # errors: one line saying what and what to do
    done_reason: str | None = None  # generate: stop | length | cancelled | error
    usage: Usage | None = None
    timings: Timings | None = None
    energy: EnergyUsage | None = None  # generate: the request's energy
    text: str | None = None  # generate with stream=false: the whole answer
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # generate with tools: the calls (done_reason tool_calls)
    logprobs: list[dict[str, Any]] | None = None  # generate with logprobs: [{token, logprob, top: [[token, logprob]]}]
    probs: list[dict[str, Any]] | None = None  # generate with n_probs: [{token, prob, top: [[token, prob]]}] after the chain
    retry_after_s: float | None = None  # 429: when the box expects room (a deadline it cannot meet)
    result: dict[str, Any] | None = None  # other commands: what they did
    redelivered: bool | None = None  # the broker delivered this command again after a restart


def encode(message: BaseModel | dict) -> bytes:
    data = message
    if isinstance(message, BaseModel):
        data = message.model_dump(exclude_none=True)
        if isinstance(message, FinalReply):  # always there, null when the command was too broken to read
            data = {"request_id": message.request_id, **data}
    # "replace": a lone surrogate that slipped into a reply must cost a character, not the reply
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8", "replace")


def error_reply(request_id: str | None, code: int, message: str, seq: int = 0, retry_after_s: float | None = None) -> FinalReply:
    return FinalReply(
        request_id=request_id, seq=seq, status="error", code=code, message=one_line(message), retry_after_s=retry_after_s
    )


def ok_reply(request_id: str, result: dict[str, Any] | None = None, seq: int = 0) -> FinalReply:
    return FinalReply(request_id=request_id, seq=seq, status="ok", code=OK, result=result)


def describe_validation_error(e: ValidationError, prefix: str = "") -> str:
    """pydantic's errors as one short line: 'params.max_tokens: Input should be a valid integer'."""
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(_loc(x) for x in (prefix, *err["loc"]) if x != "")
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(e.errors()) - 3
    return one_line("; ".join(parts) + (f" (and {more} more)" if more > 0 else ""))


def _loc(part) -> str:
    """A field name as sent: a client's key may hold anything (newlines, 100 kB): quote and cut it."""
    text = str(part)
    if text.isidentifier() or isinstance(part, int):
        return text
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def one_line(text: str, limit: int = 400) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
