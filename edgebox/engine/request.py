"""What a caller hands the engine and gets back: ``Request`` in, a ``Handle`` that yields
``Chunk``s and ends with one ``Summary``; the errors a submit can raise before queueing; and
``EngineStats``. A request's life before it runs is ``engine.queued``'s.

Handles are thread-safe: iterate one (or pass ``on_event``) on any thread, ``cancel()`` at any
time; the scheduler thread is the only one that emits.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from edgebox.engine.energy import Energy
from edgebox.errors import EdgeboxError
from edgebox.text.grammar import Constraint, parse_constraint
from edgebox.text.sampler import SamplingParams


class QueueFullError(EdgeboxError):
    """Too many requests are waiting; try again later (HTTP/MQTT code 429)."""


class KVBudgetError(EdgeboxError):
    """A request needs more KV cache than the whole budget (code 413)."""


class DeadlineError(QueueFullError):
    """A request with ``deadline_s`` that the engine predicts cannot start in time (code 429);
    ``retry_after_s``: when the cost model expects room for it."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


PRIORITIES = ("interactive", "batch")  # admission order: every interactive request before any batch one


@dataclass(frozen=True)
class Request:
    prompt: str | None = None  # raw prompt text, or
    messages: tuple[dict, ...] | list[dict] | None = None  # chat messages through the GGUF chat template, or
    prompt_ids: tuple[int, ...] | None = None  # the prompt's token ids, as given (no BOS added)
    max_tokens: int = 128
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    context_shift: bool = False  # when the context fills: drop old tokens (keeping n_keep) instead of stopping
    n_keep: int = 0
    # what the output must match (text.grammar); a request shape (OpenAI response_format, ollama
    # format) is parsed into a Constraint here, None = free text
    response_format: Constraint | None = None
    # OpenAI tools, rendered through the GGUF's chat template (messages only); tool_choice "auto",
    # "none", "required" or {"type": "function", "function": {"name": ...}}; see text.tool_calls
    tools: tuple[dict, ...] | list[dict] | None = None
    tool_choice: object = None
    logprobs: int | None = None  # None: off; N >= 0: each token's logprob and its N best rivals (Chunk/Summary.logprobs)
    n_probs: int | None = None  # llama.cpp's n_probs: each token's N best after the sampler chain (Summary.chain_probs)
    # interactive work is admitted (and its prompt read) first, pausing batch work for a slot;
    # batch-only work runs at the governor's most efficient clock and batch (engine.scheduler)
    priority: str = "interactive"
    deadline_s: float | None = None  # refused (DeadlineError) when it cannot start this soon after submit

    def __post_init__(self) -> None:
        object.__setattr__(self, "response_format", parse_constraint(self.response_format))
        if sum(x is not None for x in (self.prompt, self.messages, self.prompt_ids)) != 1:
            raise EdgeboxError("a request needs exactly one of 'prompt', 'messages' or 'prompt_ids'")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise EdgeboxError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.n_keep < 0:
            raise EdgeboxError(f"n_keep must be >= 0, got {self.n_keep}")
        if self.priority not in PRIORITIES:
            raise EdgeboxError(f"priority must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")
        if self.deadline_s is not None and not (isinstance(self.deadline_s, int | float) and 0 < self.deadline_s < 1e9):
            raise EdgeboxError(f"deadline_s must be a number of seconds > 0, got {self.deadline_s!r}")


@dataclass(frozen=True)
class Chunk:
    request_id: str
    seq: int  # 0, 1, 2, ... per request
    text: str
    reasoning: bool = False  # DeepSeek-R1 <think> text (llama.cpp --reasoning-format deepseek)
    tool_calls: tuple[dict, ...] = ()  # OpenAI's streamed tool-call deltas (text.tool_calls), text then ""
    logprobs: tuple = ()  # text.sampler.TokenLogprobs of the tokens generated since the last chunk


@dataclass(frozen=True)
class Summary:
    """The final word on a request, like ollama's final response."""

    request_id: str
    done_reason: str  # stop | length | tool_calls | cancelled | error
    text: str  # everything generated (reasoning tags removed)
    content: str | None  # None when the reply was only tool calls
    reasoning: str
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens reused from the prompt cache
    generated_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float = 0.0  # submit -> first token
    prompt_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    error: str | None = None
    prompt_truncated: int = 0  # tokens dropped from an over-long prompt (context_shift)
    tool_calls: tuple[dict, ...] = ()  # OpenAI tool_calls parsed from the reply (requests with tools)
    logprobs: tuple = ()  # every generated token's text.sampler.TokenLogprobs (requests with logprobs)
    chain_probs: tuple = ()  # the same over the sampler chain's candidates (requests with n_probs)
    energy: Energy = field(default_factory=Energy)  # its share of the chips' energy (engine.energy)
    retry_after_s: float | None = None  # refused at its deadline: when the cost model expects room
    draft_tokens: int = 0  # speculative draft tokens verified (llama-server's draft_n)
    draft_accepted: int = 0  # of those, kept (draft_n_accepted; engine.speculative)

    @property
    def ok(self) -> bool:
        return self.done_reason != "error"

    @property
    def decode_tok_per_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.generated_tokens > 1 and self.decode_s > 0 else 0.0


Event = Chunk | Summary


class Handle:
    """One submitted request: iterate it for ``Chunk``s; ``summary`` once done."""

    def __init__(self, request: Request, on_event: Callable[[Event], None] | None, wake: Callable[[], None] | None = None):
        self.request = request
        self.request_id = request.request_id
        self.summary: Summary | None = None
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._on_event = on_event
        self._wake = wake  # tells the scheduler (asleep when idle) to look at the cancel now
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self.tool_plan = None  # text.tool_calls.ToolPlan when the request has tools (set at submit)

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next scheduler step (milliseconds)."""
        self._cancelled.set()
        if self._wake is not None:
            self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            event = self._events.get()
            if isinstance(event, Summary):
                return
            yield event

    def text(self) -> str:
        """Wait for the end and return the whole generated text."""
        return self.result().text

    def result(self, timeout: float | None = None) -> Summary:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        return self.summary

    def _emit(self, event: Event) -> None:
        if isinstance(event, Summary):
            self.summary = event
        self._events.put(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a consumer's bug must not stop the scheduler
                pass
        if isinstance(event, Summary):
            self._done.set()


@dataclass
class EngineStats:
    running: int
    queued: int
    batch_limit: int
    kv_used_bytes: int
    kv_budget_bytes: int
    tokens_per_s: float  # generated tokens per second over the last few seconds
    steps: int
    generated_tokens: int
    energy_j: float = 0.0  # the chips' energy in steps since the model loaded (every request's joules)
    idle_energy_j: float = 0.0  # the chips' energy idling between steps (charged to no request)
