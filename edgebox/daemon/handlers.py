"""Commands -> the engine, on the dispatcher thread; replies and acknowledgements.

Threads: paho's network thread only queues an ``Inbound`` (``submit``); the dispatcher thread
parses, validates, and starts work; the engine's scheduler thread produces tokens and calls
``_on_event``, which publishes chunks and the final reply; load/unload run on a short-lived
thread of their own so a long model load never blocks ``cancel`` or ``get_status``.

Every command gets exactly one final reply (or none, if it names no place to reply to: then an
``event`` says what was wrong), and is acknowledged to the broker once that final reply has
reached it. Bad input of any kind is answered with a code, logged, published as a
``bad_request`` event, and the dispatcher carries on.

Duplicates: a request_id seen again (same method, same reply route) is answered once. That is
what a QoS 1 redelivery is (after a reconnect the broker resends what we had not yet
acknowledged): the copy is not run again and gets no second reply; it is acknowledged when the
original's final reply is delivered.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from edgebox.daemon.config import DaemonConfig
from edgebox.daemon.engine_host import Busy, ModelHost, Unavailable
from edgebox.daemon.schemas import (
    BAD_REQUEST,
    CONFLICT,
    EXPIRED,
    INTERNAL,
    METHODS,
    NOT_FOUND,
    OK,
    PARAMS,
    TOO_LARGE,
    TOO_MANY,
    UNAVAILABLE,
    CancelParams,
    CommandEnvelope,
    FinalReply,
    GenerateParams,
    LoadModelParams,
    SetPowerBudgetParams,
    StreamChunk,
    Timings,
    Topics,
    UnloadModelParams,
    Usage,
    describe_validation_error,
    encode,
    error_reply,
    ok_reply,
    one_line,
    reply_topic_problem,
)
from edgebox.daemon.transport import Inbound, Transport
from edgebox.errors import ContextOverflowError, EdgeboxError

log = logging.getLogger("edgebox.daemon")

DRAIN_METHODS = ("cancel", "get_status")  # still served while draining; the rest wait for the next run
REMEMBERED_REQUESTS = 4096  # finished request_ids kept to recognise redeliveries


class DaemonServices(Protocol):
    """What the command handlers need from the daemon's ``Service``: its settings, the budget,
    and publishing events, state and status."""

    cfg: DaemonConfig

    def set_budget(self, watts: float) -> dict: ...
    def publish_event(self, kind: str, **fields) -> None: ...
    def publish_state(self) -> None: ...
    def status(self) -> dict: ...


@dataclass(frozen=True)
class Route:
    topic: str
    correlation: bytes | None


@dataclass(eq=False)
class Job:
    """A generate in flight. ``lock`` orders its chunks and its one final reply."""

    key: tuple
    request_id: str
    engine_id: str
    route: Route
    inbound: Inbound
    stream: bool
    deadline: float | None  # monotonic; the first token must come before it
    handle: object = None
    next_seq: int = 0
    started: bool = False  # a token has come out (before that, a cancel can answer at once)
    finished: bool = False  # the final reply is out; later engine events are ignored
    broken: bool = False  # a chunk could not be queued: the final must be an error
    cancel_reason: tuple[int, str] | None = None  # why *we* cancelled it; None: the client did, or nobody
    acks: list[Inbound] = field(default_factory=list)  # duplicates delivered while it ran
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Rejected(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class CommandHandler:
    def __init__(self, service: DaemonServices, transport: Transport, host: ModelHost, topics: Topics):
        self.service, self.transport, self.host, self.topics = service, transport, host, topics
        self._inbox: queue.SimpleQueue[Inbound | None] = queue.SimpleQueue()  # bounded by ReceiveMaximum; None wakes
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._seen: OrderedDict[tuple, Job | None] = OrderedDict()  # None: finished
        self._draining = False
        self._held = 0
        self._stop = threading.Event()
        self.heartbeat = time.monotonic()
        self.counters = {"received": 0, "rejected": 0, "duplicates": 0, "completed": 0}
        self._thread = threading.Thread(target=self._run, name="edgebox-dispatch", daemon=True)

    # -- called from other threads --------------------------------------------------------------
    def submit(self, inbound: Inbound) -> None:
        """paho's network thread: hand over, nothing else."""
        self._inbox.put(inbound)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(5.0)

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def start_draining(self) -> None:
        """Stop taking new work: commands other than cancel/get_status stay unacknowledged, so the
        broker hands them to the next run of the daemon."""
        self._draining = True

    def cancel_all(self, code: int, message: str) -> int:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            self._cancel_job(job, code, message)
        return len(jobs)

    def _cancel_job(self, job: Job, code: int | None = None, message: str = "") -> None:
        """Stop a job. ``code`` None: the client asked (final "ok", done_reason "cancelled").
        A job with no token yet is answered at once: a request still queued behind a long batch
        would otherwise wait for a free slot before the engine reports it cancelled."""
        with job.lock:
            if code is not None and job.cancel_reason is None:
                job.cancel_reason = (code, message)
            started = job.started
        if job.handle is not None:
            job.handle.cancel()
        if not started:
            if code is None:
                reply = FinalReply(request_id=job.request_id, seq=0, status="ok", code=OK)
            else:
                reply = error_reply(job.request_id, code, message)
            reply.done_reason = "cancelled"
            self._finish(job, reply)

    def _finish(self, job: Job, reply: FinalReply) -> bool:
        """Send the job's one final reply (False: it already had one)."""
        with job.lock:
            if job.finished:
                return False
            job.finished = True
            reply.seq = job.next_seq
            with self._lock:
                self._jobs.pop(job.engine_id, None)
                self._seen[job.key] = None
                acks = [job.inbound, *job.acks]
            self.counters["completed"] += 1
            # inside the job's lock: no chunk of this job can be queued after its final
            self._send_final(job.route, reply, acks)
        return True

    # -- dispatcher thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                inbound = self._inbox.get(timeout=0.2 if self._has_deadlines() else 1.0)
            except queue.Empty:
                inbound = None
            if inbound is not None:
                try:
                    self._dispatch(inbound)
                except Exception as e:  # a bug must cost one command, not the daemon
                    log.exception("command on %s failed", inbound.topic)
                    self._reject(
                        inbound,
                        None,
                        Route(inbound.response_topic, inbound.correlation) if inbound.response_topic else None,
                        INTERNAL,
                        f"internal error: {type(e).__name__}: {e}",
                    )
            self._expire_waiting()

    def _dispatch(self, inbound: Inbound) -> None:
        method = self.topics.method_of(inbound.topic) or ""
        if self._draining and method not in DRAIN_METHODS:
            self._held += 1  # not acknowledged: redelivered to the next run
            return
        self.counters["received"] += 1
        route = Route(inbound.response_topic, inbound.correlation) if inbound.response_topic else None

        if inbound.retain and inbound.size == 0:
            self.transport.ack(inbound)  # the deletion of a retained command (ours, below): nothing to do
            return
        if inbound.payload is None:
            return self._reject(
                inbound,
                None,
                route,
                TOO_LARGE,
                f"payload of {inbound.size} bytes exceeds max_payload_bytes ({self.service.cfg.max_payload_bytes})",
            )
        try:
            data = json.loads(inbound.payload)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            return self._reject(inbound, None, route, BAD_REQUEST, f"payload is not JSON: {type(e).__name__}: {e}")
        if not isinstance(data, dict):
            return self._reject(
                inbound, None, route, BAD_REQUEST, 'payload must be a JSON object {"request_id": ..., "params": {...}}'
            )
        request_id = data.get("request_id") if isinstance(data.get("request_id"), str) else None
        if route is None and isinstance(data.get("reply_to"), str):
            route = Route(data["reply_to"], None)
        if inbound.retain:
            # a retained command would run again at every restart: clear it and refuse it
            self.transport.publish(inbound.topic, b"", retain=True)
            return self._reject(
                inbound, request_id, route, BAD_REQUEST, "commands must not be retained; the retained copy was cleared"
            )
        try:
            envelope = CommandEnvelope.model_validate(data)
        except ValidationError as e:
            return self._reject(inbound, request_id, route, BAD_REQUEST, describe_validation_error(e))
        if route is None:
            return self._reject(
                inbound, request_id, None, BAD_REQUEST, "no Response Topic (MQTT 5) or reply_to (MQTT 3.1.1): nowhere to reply"
            )
        problem = reply_topic_problem(route.topic, self.topics)
        if problem:
            return self._reject(inbound, request_id, None, BAD_REQUEST, f"{problem} ({route.topic!r})")

        key = (method, route.topic, route.correlation, envelope.request_id)
        with self._lock:
            if key in self._seen:
                earlier = self._seen[key]
                if earlier is not None:
                    earlier.acks.append(inbound)  # acknowledged with the original's final reply
            else:
                earlier = False
                self._seen[key] = None
                self._forget_old()
        if earlier is not False:
            self.counters["duplicates"] += 1
            log.warning(
                "duplicate request_id %r on %s (%s): answered once",
                envelope.request_id,
                method,
                "still running" if earlier else "already answered",
            )
            self.service.publish_event(
                "duplicate_request", request_id=envelope.request_id, method=method, redelivered=inbound.dup
            )
            if earlier is None:
                self.transport.ack(inbound)
            return

        try:
            if method not in PARAMS:
                raise _Rejected(NOT_FOUND, f"unknown method {method!r}; methods: {', '.join(METHODS)}")
            deadline = self._deadline(inbound, envelope)
            if deadline is not None and time.monotonic() > deadline:
                raise _Rejected(EXPIRED, "expired before it could start (expires_at / Message Expiry Interval passed)")
            try:
                params = PARAMS[method].model_validate(envelope.params)
            except ValidationError as e:
                raise _Rejected(BAD_REQUEST, describe_validation_error(e, "params")) from None
            getattr(self, f"_cmd_{method}")(inbound, envelope.request_id, route, key, params, deadline)
        except _Rejected as r:
            self._reject(inbound, envelope.request_id, route, r.code, r.message)

    def _deadline(self, inbound: Inbound, envelope: CommandEnvelope) -> float | None:
        limits = []
        if inbound.expiry_remaining_s is not None:
            limits.append(inbound.received + inbound.expiry_remaining_s)
        if envelope.expires_at is not None:
            limits.append(inbound.received + (envelope.expires_at - time.time()))
        return min(limits) if limits else None

    def _forget_old(self) -> None:
        """Keep the registry bounded; running requests are never forgotten."""
        excess = len(self._seen) - REMEMBERED_REQUESTS
        for key in list(self._seen)[: max(0, excess)]:
            if self._seen[key] is None:
                del self._seen[key]

    # -- replies ----------------------------------------------------------------------------------
    def _send_final(self, route: Route, reply: FinalReply, acks: list[Inbound]) -> None:
        def acknowledge() -> None:
            for inbound in acks:
                self.transport.ack(inbound)

        self.transport.publish_final(route.topic, encode(reply), route.correlation, acknowledge)

    def _reject(self, inbound: Inbound, request_id: str | None, route: Route | None, code: int, message: str) -> None:
        self.counters["rejected"] += 1
        method = self.topics.method_of(inbound.topic)
        log.warning("rejected %s command %s with %d: %s", method or "?", request_id or "(no request_id)", code, message)
        self.service.publish_event(
            "bad_request",
            request_id=request_id,
            method=method,
            code=code,
            message=one_line(message),
            reply_topic=route.topic if route else None,
        )
        if route is None or reply_topic_problem(route.topic, self.topics):
            self.transport.ack(inbound)  # nowhere to answer; the event above is the only trace
            return
        self._send_final(route, error_reply(request_id, code, message), [inbound])

    def _reply_ok(self, inbound: Inbound, request_id: str, route: Route, result: dict) -> None:
        self._send_final(route, ok_reply(request_id, result), [inbound])

    # -- generate -----------------------------------------------------------------------------------
    def _cmd_generate(
        self, inbound: Inbound, request_id: str, route: Route, key: tuple, p: GenerateParams, deadline: float | None
    ) -> None:
        from edgebox.engine import KVBudgetError, QueueFullError, Request
        from edgebox.text.sampler import SamplingParams

        cfg = self.service.cfg
        if len(self._jobs) >= cfg.max_in_flight:
            raise _Rejected(TOO_MANY, f"{len(self._jobs)} requests in flight (max_in_flight {cfg.max_in_flight}); retry later")
        if p.max_tokens > cfg.max_tokens_limit:
            raise _Rejected(BAD_REQUEST, f"params.max_tokens {p.max_tokens} exceeds this box's limit of {cfg.max_tokens_limit}")
        try:
            sampling = SamplingParams(
                temperature=p.temperature,
                top_k=p.top_k,
                top_p=p.top_p,
                min_p=p.min_p,
                repeat_penalty=p.repeat_penalty,
                repeat_last_n=p.repeat_last_n,
                seed=p.seed,
            )
            request = Request(
                prompt=p.prompt,
                messages=None if p.messages is None else tuple(m.model_dump() for m in p.messages),
                max_tokens=p.max_tokens,
                params=sampling,
                stop=tuple(p.stop),
                context_shift=p.context_shift,
                n_keep=p.n_keep,
                request_id=uuid.uuid4().hex,
            )
        except (ValueError, EdgeboxError) as e:
            raise _Rejected(BAD_REQUEST, str(e)) from None

        job = Job(key, request_id, request.request_id, route, inbound, p.stream, deadline)
        with self._lock:
            self._jobs[job.engine_id] = job
            self._seen[key] = job
        try:
            handle = self.host.submit(request, on_event=lambda event: self._on_event(job, event))
        except Exception as e:
            with self._lock:
                self._jobs.pop(job.engine_id, None)
                self._seen[key] = None
            code = (
                TOO_LARGE
                if isinstance(e, (ContextOverflowError, KVBudgetError))
                else TOO_MANY
                if isinstance(e, QueueFullError)
                else UNAVAILABLE
                if isinstance(e, Unavailable)
                else BAD_REQUEST
                if isinstance(e, EdgeboxError)
                else INTERNAL
            )
            raise _Rejected(code, str(e) if isinstance(e, EdgeboxError) else f"internal error: {type(e).__name__}: {e}") from None
        job.handle = handle
        if job.cancel_reason is not None or job.finished:  # cancelled before submit returned
            handle.cancel()
        log.debug("generate %s accepted (%d in flight)", request_id, len(self._jobs))

    def _on_event(self, job: Job, event) -> None:
        """The engine's thread: stream a chunk, or send the final reply."""
        from edgebox.engine import Chunk

        if isinstance(event, Chunk):
            with job.lock:
                job.started = True
                if job.finished or not job.stream or job.cancel_reason is not None:
                    return
                chunk = StreamChunk(
                    request_id=job.request_id, seq=job.next_seq, delta=event.text, reasoning=True if event.reasoning else None
                )
                job.next_seq += 1
                queued = self.transport.publish(job.route.topic, encode(chunk), correlation=job.route.correlation)
                if not queued:
                    # paho's queue is full (the broker has been away a while): a gap would be silent
                    # corruption, so the stream ends with an error instead
                    job.broken = True
            if not queued:
                log.warning("generate %s: outgoing queue full; ending the stream with an error", job.request_id)
                self._cancel_job(
                    job, UNAVAILABLE, "the reply stream broke: the broker was unreachable and the outgoing queue filled up; retry"
                )
            return

        s = event  # Summary: the last event of the request
        if job.cancel_reason is not None and (s.done_reason == "cancelled" or job.broken):
            code, message = job.cancel_reason
            reply = error_reply(job.request_id, code, message)
        elif s.done_reason == "error":
            reply = error_reply(job.request_id, INTERNAL, f"generation failed: {s.error}")
        else:
            reply = FinalReply(request_id=job.request_id, seq=0, status="ok", code=OK)
        reply.done_reason = s.done_reason
        reply.usage = Usage(
            prompt_tokens=s.prompt_tokens,
            completion_tokens=s.generated_tokens,
            total_tokens=s.prompt_tokens + s.generated_tokens,
            cached_prompt_tokens=s.cached_prompt_tokens,
            prompt_truncated=s.prompt_truncated,
        )
        reply.timings = Timings(
            queue_ms=_ms(s.queue_s),
            ttft_ms=_ms(s.ttft_s),
            prompt_ms=_ms(s.prompt_s),
            decode_ms=_ms(s.decode_s),
            total_ms=_ms(s.total_s),
            decode_tokens_per_s=round(s.decode_tok_per_s, 2),
        )
        if not job.stream:
            reply.text, reply.content, reply.reasoning = s.text, s.content, s.reasoning or None
        if job.inbound.dup:
            reply.redelivered = True
        if self._finish(job, reply):
            log.info(
                "generate %s: %s, %d+%d tokens, %.0f ms",
                job.request_id,
                s.done_reason,
                s.prompt_tokens,
                s.generated_tokens,
                s.total_s * 1000,
            )

    def _has_deadlines(self) -> bool:
        return any(j.deadline is not None and not j.started for j in list(self._jobs.values()))

    def _expire_waiting(self) -> None:
        """A request that has not produced a token by its deadline is cancelled with 408."""
        now = time.monotonic()
        for job in list(self._jobs.values()):
            if job.deadline is not None and not job.started and now > job.deadline and job.cancel_reason is None:
                log.warning("generate %s expired before its first token", job.request_id)
                self._cancel_job(
                    job, EXPIRED, "expired before its first token (Message Expiry Interval / expires_at passed while it waited)"
                )

    # -- the other commands ------------------------------------------------------------------------------
    def _cmd_cancel(self, inbound: Inbound, request_id: str, route: Route, key: tuple, p: CancelParams, deadline) -> None:
        with self._lock:
            matches = [j for j in self._jobs.values() if j.request_id == p.target]
        # request_ids are chosen by clients: prefer the canceller's own request when two clash
        mine = [j for j in matches if j.route.topic == route.topic] or matches
        if not mine:
            raise _Rejected(NOT_FOUND, f"no generate with request_id {p.target!r} is in flight (finished, or never received)")
        for job in mine:
            self._cancel_job(job)
        self._reply_ok(inbound, request_id, route, {"target": p.target, "cancelled": len(mine)})

    def _cmd_get_status(self, inbound: Inbound, request_id: str, route: Route, key: tuple, p, deadline) -> None:
        self._reply_ok(inbound, request_id, route, self.service.status())

    def _cmd_set_power_budget(
        self, inbound: Inbound, request_id: str, route: Route, key: tuple, p: SetPowerBudgetParams, deadline
    ) -> None:
        try:
            result = self.service.set_budget(p.watts)
        except ValueError as e:
            raise _Rejected(BAD_REQUEST, f"budget {p.watts} W refused: {e}") from None
        self._reply_ok(inbound, request_id, route, result)

    def _cmd_load_model(self, inbound: Inbound, request_id: str, route: Route, key: tuple, p: LoadModelParams, deadline) -> None:
        cfg = self.service.cfg
        allowed = cfg.allowed_models_dir.resolve()
        path = Path(p.path) if Path(p.path).is_absolute() else allowed / p.path
        path = path.resolve()
        if not path.is_relative_to(allowed):
            raise _Rejected(BAD_REQUEST, f"{p.path}: models load only from {allowed} (models_dir)")
        if not path.is_file():
            raise _Rejected(NOT_FOUND, f"model file {path} not found")
        self._check_switch_allowed(p.force, "load a model")
        chips, ctx = p.chips or cfg.chips, p.ctx or cfg.ctx
        threading.Thread(
            target=self._switch_model, name="edgebox-load", daemon=True, args=(inbound, request_id, route, path, chips, ctx)
        ).start()

    def _cmd_unload_model(
        self, inbound: Inbound, request_id: str, route: Route, key: tuple, p: UnloadModelParams, deadline
    ) -> None:
        self._check_switch_allowed(p.force, "unload the model")
        threading.Thread(
            target=self._switch_model, name="edgebox-unload", daemon=True, args=(inbound, request_id, route, None, 0, None)
        ).start()

    def _check_switch_allowed(self, force: bool, what: str) -> None:
        if self.host.busy:
            raise _Rejected(CONFLICT, "a model is already being loaded or unloaded; retry when it is done")
        if self._jobs and not force:
            raise _Rejected(
                CONFLICT, f'{len(self._jobs)} requests in flight; cancel them, wait, or send "force": true to {what} anyway'
            )

    def _switch_model(
        self, inbound: Inbound, request_id: str, route: Route, path: Path | None, chips: int, ctx: int | None
    ) -> None:
        """Its own thread: loading a 7B model takes seconds; cancel and get_status keep working."""
        why = "cancelled: the model is being replaced" if path else "cancelled: the model was unloaded"
        try:
            if path is None:
                self.host.unload(before_close=lambda: self.cancel_all(UNAVAILABLE, why))
                result: dict = {"state": "unloaded"}
                self.service.publish_event("model_unloaded")
            else:
                self.service.publish_event("model_loading", path=str(path))
                result = self.host.load(path, chips, ctx, before_swap=lambda: self.cancel_all(UNAVAILABLE, why))
                self.service.publish_event("model_loaded", **result)
            self.service.publish_state()
            self._reply_ok(inbound, request_id, route, result)
        except Busy as e:
            self._reject(inbound, request_id, route, CONFLICT, str(e))
        except EdgeboxError as e:  # ModelError: not a GGUF, unsupported, ...: the old model keeps serving
            self.service.publish_event("error", message=one_line(str(e)), method="load_model")
            self.service.publish_state()
            self._reject(inbound, request_id, route, BAD_REQUEST, str(e))
        except Exception as e:
            log.exception("model switch failed")
            self.service.publish_state()
            self._reject(inbound, request_id, route, INTERNAL, f"internal error: {type(e).__name__}: {e}")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)
