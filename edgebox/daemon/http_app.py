"""The OpenAI-compatible HTTP API (FastAPI): routes, auth, errors in OpenAI's shape, SSE streams.

It runs in the daemon beside MQTT and submits to the same ``ModelHost``: one engine, one queue,
one KV budget, one power governor for both transports.

* Every error is ``{"error": {"message", "type", "code", "param"}}`` with its status: 400 bad
  field or prompt over the context, 401 no/wrong key, 404, 405, 413 body over the limit, 429
  queue full (``Retry-After``), 503 loading or draining, 500 a bug (logged).
* A stream is ``data: {chunk}`` events ending ``data: [DONE]``; a stream the server must end
  early (shutdown, engine error) ends with ``data: {"error": ...}`` then ``[DONE]``.
* A client that goes away cancels its request: a stream's task is cancelled by Starlette on the
  disconnect, a non-streamed request polls for it; either way ``Handle.cancel()`` frees the slot
  at the engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import uuid
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgebox.daemon.openai_responses import (
    FINISH_REASONS,
    ChatCompletion,
    Completion,
    ErrorResponse,
    Health,
    ModelList,
    Shape,
    error_body,
)
from edgebox.daemon.openai_schemas import ChatCompletionRequest, CompletionRequest, engine_request
from edgebox.errors import ContextOverflowError, EdgeboxError

log = logging.getLogger("edgebox.daemon.http")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "unavailable_error",
}
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 429, 503)}
# each server-sent event (stream: true): data is a chunk's JSON, an error's JSON, or [DONE] last
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
STREAM_OR_JSON = {"text/event-stream": {"schema": SSE_EVENT}}


class HttpServices(Protocol):
    """What the API needs from the daemon (``service.Service`` implements it)."""

    cfg: object  # DaemonConfig
    host: object  # ModelHost
    metrics: object  # Metrics

    def unavailable_reason(self) -> str | None:
        """None when requests can run; else why not (loading, draining, no model)."""


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, headers=None, retry_after_s=None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers
        self.retry_after_s = retry_after_s

    @classmethod
    def deadline(cls, message: str, retry_after_s: float) -> ApiError:
        """429 for a deadline the box cannot meet: ``Retry-After`` (whole seconds) and the prediction."""
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
        return cls(429, message, "deadline_unmet", headers=headers, retry_after_s=retry_after_s)


def error_response(status: int, message: str, code=None, param=None, headers=None, retry_after_s=None) -> JSONResponse:
    body = error_body(message, ERROR_TYPES.get(status, "server_error"), code, param, retry_after_s)
    return JSONResponse(body, status, headers=headers)


class LoopBridge:
    """Carries the engine thread's events into the event loop with one wake-up per burst: a
    decode step emits one chunk per running sequence, and waking the loop once for all of them
    (not once each) keeps the GIL with the engine instead of handing it back and forth."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def post(self, target: asyncio.Queue, event) -> None:
        """Any thread: deliver ``event`` to ``target`` on the loop."""
        with self._lock:
            self._pending.append((target, event))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop has closed (shutdown)
            pass

    def _deliver(self) -> None:
        with self._lock:
            batch, self._pending, self._scheduled = self._pending, [], False
        for target, event in batch:
            target.put_nowait(event)


class OpenRequests:
    """The generate requests HTTP has in the engine, so shutdown can end them with a reason."""

    def __init__(self):
        self._lock = threading.Lock()
        self._handles: dict[str, object] = {}
        self.reason: str | None = None  # set by cancel_all: what their streams' last event says

    def add(self, handle) -> None:
        with self._lock:
            self._handles[handle.request_id] = handle

    def discard(self, handle) -> None:
        with self._lock:
            self._handles.pop(handle.request_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._handles)

    def cancel_all(self, reason: str) -> int:
        with self._lock:
            handles = list(self._handles.values())
            self.reason = reason
        for h in handles:
            h.cancel()
        return len(handles)


def create_app(svc: HttpServices, api_key: str | None) -> FastAPI:
    from edgebox import __version__

    app = FastAPI(
        title="edgebox",
        version=__version__,
        description="OpenAI-compatible API of an edgebox (llama.cpp-style sampler extras, R1 reasoning_content)",
        docs_url=None,
        redoc_url=None,
    )
    app.state.open = open_requests = OpenRequests()
    key = api_key.encode() if api_key else None
    bridge = LoopBridge()

    def authorize(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    # -- errors in OpenAI's shape ---------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        svc.metrics.refused("http", request.url.path, e.status)
        return error_response(e.status, e.message, e.code, e.param, e.headers, e.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        message, param = describe_errors(e.errors())
        svc.metrics.refused("http", request.url.path, 400)
        return error_response(400, message, None, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))  # 405 keeps its Allow

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    # -- routes ---------------------------------------------------------------------------------------
    @app.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def health():
        reason = svc.unavailable_reason()
        if reason is not None:
            return error_response(503, reason, "unavailable")
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorResponse}})
    async def metrics(request: Request):
        if svc.cfg.metrics_need_key:
            authorize(request)
        from edgebox.daemon.metrics import CONTENT_TYPE

        body = await run_in_threadpool(svc.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
    async def models(request: Request):
        authorize(request)
        info = svc.host.info
        data = [] if info is None else [model_card(info)]
        return {"object": "list", "data": data}

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": STREAM_OR_JSON}, **ERRORS},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        authorize(request)
        return await generate(request, body, chat=True)

    @app.post("/v1/completions", response_model=Completion, responses={200: {"content": STREAM_OR_JSON}, **ERRORS})
    async def completions(body: CompletionRequest, request: Request):
        authorize(request)
        return await generate(request, body, chat=False)

    # -- generation -------------------------------------------------------------------------------------
    async def generate(request: Request, body, chat: bool):
        from edgebox.engine import Summary

        bridge.bind(asyncio.get_running_loop())
        endpoint = request.url.path
        reason = svc.unavailable_reason()
        if reason is not None:
            raise ApiError(503, reason, "unavailable", headers={"Retry-After": "5"})
        cfg, host = svc.cfg, svc.host
        request_id = uuid.uuid4().hex
        try:
            engine_req = engine_request(
                body, default_max_tokens=cfg.max_tokens_limit, max_tokens_limit=cfg.max_tokens_limit, request_id=request_id
            )
        except (ValueError, TypeError, EdgeboxError) as e:
            raise ApiError(400, str(e)) from None

        events: asyncio.Queue = asyncio.Queue()

        def on_event(event) -> None:  # the engine's thread
            if isinstance(event, Summary):  # counted here: a client that went away no longer listens
                svc.metrics.finished("http", endpoint, event)
            bridge.post(events, event)

        handle = await run_in_threadpool(submit, host, engine_req, on_event)
        open_requests.add(handle)
        engine = host.engine
        shape = Shape(chat, request_id, (host.info or {}).get("name", "edgebox"), engine.model.tokenizer if engine else None)
        if body.stream:
            stream = sse_events(open_requests, handle, events, shape, body.include_usage)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        try:
            summary = await wait_summary(request, handle, events)
        finally:
            open_requests.discard(handle)
        if summary.done_reason == "cancelled":
            raise ApiError(503, open_requests.reason or "the request was cancelled", "cancelled")
        if summary.done_reason == "error" and summary.retry_after_s is not None:  # its deadline passed while queued
            raise ApiError.deadline(summary.error, summary.retry_after_s)
        if summary.done_reason == "error":
            raise ApiError(500, f"generation failed: {summary.error}", "generation_failed")
        return JSONResponse(shape.final(summary))

    return app


def submit(host, engine_req, on_event):
    """``ModelHost.submit`` with its refusals as API errors (runs on a worker thread: tokenizing
    a long prompt holds the GIL for a while)."""
    from edgebox.daemon.engine_host import Unavailable
    from edgebox.engine import KVBudgetError, QueueFullError
    from edgebox.engine.request import DeadlineError

    try:
        return host.submit(engine_req, on_event=on_event)
    except Unavailable as e:
        raise ApiError(503, str(e), "unavailable", headers={"Retry-After": "5"}) from None
    except DeadlineError as e:
        raise ApiError.deadline(str(e), e.retry_after_s) from None
    except QueueFullError as e:
        stats = host.stats() or {}
        wait_s = 1 + stats.get("queued", 0) // max(1, stats.get("batch_limit", 1))
        raise ApiError(429, str(e), "queue_full", headers={"Retry-After": str(wait_s)}) from None
    except ContextOverflowError as e:
        raise ApiError(400, str(e), "context_length_exceeded") from None
    except KVBudgetError as e:
        raise ApiError(400, str(e), "kv_budget_exceeded") from None
    except EdgeboxError as e:
        raise ApiError(400, str(e)) from None


async def wait_summary(request: Request, handle, events: asyncio.Queue):
    """The request's Summary; cancels it if the client disconnects while it runs."""
    from edgebox.engine import Summary

    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    handle.cancel()
                continue
            if isinstance(event, Summary):
                return event
    finally:
        if not handle.done:
            handle.cancel()


async def sse_events(open_requests: OpenRequests, handle, events: asyncio.Queue, shape: Shape, include_usage: bool):
    """The SSE body of a streamed request. Runs inside Starlette's response task: a disconnect
    cancels it at its ``await``, and ``finally`` cancels the engine request. A request with tools
    gets the engine's tool-call deltas (OpenAI's shape) as they come."""
    from edgebox.engine import Summary

    sent = 0  # logprobs entries already streamed
    try:
        if shape.chat:
            yield sse(shape.delta(first=True))
        while True:
            batch = [await events.get()]  # then whatever else has arrived: one write for all
            while not events.empty():
                batch.append(events.get_nowait())
            last = batch[-1]
            text = "".join(
                sse(shape.delta_of({"tool_calls": list(e.tool_calls)}))
                if e.tool_calls
                else shape.delta_event(e.text, e.reasoning)
                for e in batch
                if not isinstance(e, Summary) and (e.text or e.tool_calls)
            )
            if text:
                yield text
            if isinstance(last, Summary):
                break
        s = last
        if s.done_reason in FINISH_REASONS:
            last_delta = shape.last_delta(s)
            last_delta["choices"][0]["logprobs"] = shape.logprobs(s.logprobs[sent:])  # tokens no chunk carried
            yield sse(last_delta)
            if include_usage:
                yield sse(shape.usage_chunk(s))
        elif s.done_reason == "cancelled":
            yield sse(error_body(open_requests.reason or "the request was cancelled", "unavailable_error", "cancelled"))
        elif s.retry_after_s is not None:  # its deadline passed while queued
            yield sse(error_body(s.error, ERROR_TYPES[429], "deadline_unmet", retry_after_s=s.retry_after_s))
        else:
            yield sse(error_body(f"generation failed: {s.error}", "server_error", "generation_failed"))
        yield "data: [DONE]\n\n"
    finally:
        open_requests.discard(handle)
        if not handle.done:
            handle.cancel()


def piece_event(shape: Shape, e) -> str:
    """One engine Chunk as an SSE event: tool-call deltas, or text (pre-rendered unless it carries logprobs)."""
    if e.tool_calls:
        event = shape.delta_of({"tool_calls": list(e.tool_calls)})
    elif not e.logprobs:
        return shape.delta_event(e.text, e.reasoning)
    else:
        event = shape.delta(e.text, e.reasoning)
    event["choices"][0]["logprobs"] = shape.logprobs(e.logprobs)
    return sse(event)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def describe_errors(errors) -> tuple[str, str | None]:
    """FastAPI's validation errors as one line naming the field (``messages.0.role: ...``)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}" if param else msg) + more, param


def model_card(info: dict) -> dict:
    meta = {k: info.get(k) for k in ("arch", "n_ctx", "n_ctx_train", "n_vocab", "n_params", "size_bytes", "quant_mix", "chips")}
    return {"id": info["name"], "object": "model", "created": int(info.get("loaded_at", 0)), "owned_by": "edgebox", "meta": meta}
