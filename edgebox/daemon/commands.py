"""A command's bytes -> a validated ``Command``, or ``Rejected`` with a code and one line.

Pure and cheap (no model, no engine, no I/O), so it can run on any lane, and the fuzzer
(tests/fuzz/test_fuzz_mqtt_schemas.py) holds it to its promise: whatever the payload, the
answer is a ``Command`` or a 4xx ``Rejected`` whose message is one line, never an exception.
``build_request`` and ``model_path`` do the same for a generate's sampling settings and a
load_model's file.

``peek`` reads one string field from the head of a payload without parsing it: the network
thread uses it to address a cheap 429/503 to a command it will not queue.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from edgebox.daemon.schemas import (
    BAD_REQUEST,
    METHODS,
    NOT_FOUND,
    PARAMS,
    CommandEnvelope,
    GenerateParams,
    Topics,
    describe_validation_error,
    reply_topic_problem,
)
from edgebox.errors import EdgeboxError

PEEK_BYTES = 2048  # how far into a payload ``peek`` looks


@dataclass(frozen=True)
class Route:
    topic: str
    correlation: bytes | None


@dataclass(frozen=True)
class Command:
    method: str
    request_id: str
    route: Route
    params: BaseModel
    expires_at: float | None

    @property
    def key(self) -> tuple:
        """What makes two commands the same request (a redelivery, a client's retry)."""
        return (self.method, self.route.topic, self.route.correlation, self.request_id)


class Rejected(Exception):
    """Bad input: answer ``code`` with ``message``; ``route`` None: nowhere to answer;
    ``retry_after_s``: when to try again (a 429 the box can predict)."""

    def __init__(
        self,
        code: int,
        message: str,
        request_id: str | None = None,
        route: Route | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.code, self.message, self.request_id, self.route = code, message, request_id, route
        self.retry_after_s = retry_after_s


def parse_command(
    method: str, payload: bytes, *, topics: Topics, response_topic: str | None, correlation: bytes | None, retained: bool = False
) -> Command:
    """Validate the envelope, the reply route and the method's params (raises ``Rejected``)."""
    route = Route(response_topic, correlation) if response_topic else None
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise Rejected(BAD_REQUEST, f"payload is not JSON: {type(e).__name__}: {e}", None, _usable(route, topics)) from None
    if not isinstance(data, dict):
        message = 'payload must be a JSON object {"request_id": ..., "params": {...}}'
        raise Rejected(BAD_REQUEST, message, None, _usable(route, topics))
    request_id = data.get("request_id") if _usable_id(data.get("request_id")) else None
    if route is None and isinstance(data.get("reply_to"), str):
        route = Route(data["reply_to"], None)
    if route is None:
        raise Rejected(BAD_REQUEST, "no Response Topic (MQTT 5) or reply_to (MQTT 3.1.1): nowhere to reply", request_id)
    problem = reply_topic_problem(route.topic, topics)
    if problem:  # answered with an event only: never publish there
        raise Rejected(BAD_REQUEST, f"{problem} ({route.topic!r})", request_id)
    if retained:
        raise Rejected(BAD_REQUEST, "commands must not be retained; the retained copy was cleared", request_id, route)
    try:
        envelope = CommandEnvelope.model_validate(data)
    except ValidationError as e:
        raise Rejected(BAD_REQUEST, describe_validation_error(e), request_id, route) from None
    if method not in PARAMS:
        raise Rejected(NOT_FOUND, f"unknown method {method!r}; methods: {', '.join(METHODS)}", request_id, route)
    try:
        params = PARAMS[method].model_validate(envelope.params)
    except ValidationError as e:
        raise Rejected(BAD_REQUEST, describe_validation_error(e, "params"), request_id, route) from None
    return Command(method, envelope.request_id, route, params, envelope.expires_at)


def build_request(p: GenerateParams, max_tokens_limit: int, engine_id: str) -> Any:
    """The engine's ``Request`` for a generate (raises ``Rejected`` 400 for settings the box or
    the sampler refuses)."""
    from edgebox.daemon.sampling import sampler_settings
    from edgebox.engine import Request
    from edgebox.text.grammar import parse_constraint
    from edgebox.text.sampler import SamplingParams

    if p.max_tokens > max_tokens_limit:
        raise Rejected(BAD_REQUEST, f"params.max_tokens {p.max_tokens} exceeds this box's limit of {max_tokens_limit}")
    try:
        sampling = SamplingParams(**sampler_settings(p))
        if p.response_format is not None and p.format is not None:
            raise ValueError("give response_format or format, not both")
        return Request(
            prompt=p.prompt,
            messages=None if p.messages is None else tuple(m.model_dump(exclude_none=True) for m in p.messages),
            max_tokens=p.max_tokens,
            params=sampling,
            stop=tuple(p.stop),
            context_shift=p.context_shift,
            n_keep=p.n_keep,
            request_id=engine_id,
            response_format=parse_constraint(p.format, "format") if p.format is not None else p.response_format,
            tools=p.tools or None,
            tool_choice=p.tool_choice,
            logprobs=p.logprobs,
            n_probs=p.n_probs,
            priority=p.priority,
            deadline_s=p.deadline_s,
        )
    except (ValueError, TypeError, OverflowError, EdgeboxError) as e:
        raise Rejected(BAD_REQUEST, f"params: {e}") from None


def model_path(text: str, allowed_dir: Path) -> Path:
    """The file a load_model names: relative to, and never outside, ``allowed_dir`` (raises
    ``Rejected``: 400 outside it or unusable, 404 missing)."""
    try:
        allowed = allowed_dir.resolve()
        path = (Path(text) if Path(text).is_absolute() else allowed / text).resolve()
        inside, exists = path.is_relative_to(allowed), path.is_file()
    except (OSError, RuntimeError, ValueError) as e:  # a loop of symlinks, a name too long, ...
        raise Rejected(BAD_REQUEST, f"{text!r}: not a usable path: {e}") from None
    if not inside:
        raise Rejected(BAD_REQUEST, f"{text}: models load only from {allowed} (models_dir)")
    if not exists:
        raise Rejected(NOT_FOUND, f"model file {path} not found")
    return path


def peek(payload: bytes | None, field: str) -> str | None:
    """The string value of ``"field"`` if it appears in the first ``PEEK_BYTES`` of ``payload``
    (None otherwise, or when it is not a usable request id / topic)."""
    if not payload:
        return None
    m = re.search(rb'"' + re.escape(field.encode()) + rb'"\s*:\s*("(?:[^"\\]|\\.){1,512}?")', payload[:PEEK_BYTES])
    if m is None:
        return None
    try:
        value = json.loads(m.group(1))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if _usable_id(value) or (field != "request_id" and isinstance(value, str)) else None


def _usable(route: Route | None, topics: Topics) -> Route | None:
    return route if route is not None and not reply_topic_problem(route.topic, topics) else None


def _usable_id(value) -> bool:
    """A request id fit to echo in a reply (the envelope's own rule)."""
    return isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable()
