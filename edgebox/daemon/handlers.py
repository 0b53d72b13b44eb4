"""Commands -> the engine, on two lanes; replies and acknowledgements.

Threads: paho's network thread only sorts an ``Inbound`` onto a lane (``submit``, see
``lanes``). The control thread answers cancel, get_status and set_power_budget and expires
waiting requests; the work thread validates, journals, renders and tokenizes generates and
hands them to the engine, whose scheduler thread calls ``_on_event`` to publish chunks and the
final reply; load/unload run on a thread of their own.

Every command gets exactly one final reply (or none, if it names no place to reply to: then an
``event`` says what was wrong), and is acknowledged to the broker once that reply has reached
it. Bad input is answered with a code, logged, published as a ``bad_request`` event.

Duplicates: a request_id seen again (same method, same reply route) after it was *accepted* is
answered once: a QoS 1 redelivery or a client's retry is not run again and gets no second
reply. A rejected one (400, 408, 429, ...) is not remembered, so a retry gets an answer.

Poison: work commands are journaled (``journal``) until their final reply is delivered; one the
last run died serving is answered 500 "the box restarted while serving it", never run again: a
partly streamed answer cannot be resumed, and only the client knows whether to resend it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgebox.daemon.commands import Command, Rejected, Route, build_request, model_path, parse_command, peek
from edgebox.daemon.config import DaemonConfig
from edgebox.daemon.engine_host import Busy, ModelHost, Unavailable
from edgebox.daemon.journal import Journal, key_of
from edgebox.daemon.lanes import CONTROL_METHODS, Lanes, Latencies, Turned
from edgebox.daemon.metrics import Metrics
from edgebox.daemon.schemas import (
    BAD_REQUEST,
    CONFLICT,
    EXPIRED,
    INTERNAL,
    NOT_FOUND,
    OK,
    TOO_LARGE,
    TOO_MANY,
    UNAVAILABLE,
    CancelParams,
    EnergyUsage,
    FinalReply,
    GenerateParams,
    LoadModelParams,
    SetPowerBudgetParams,
    StreamChunk,
    Timings,
    Topics,
    UnloadModelParams,
    Usage,
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
JOURNALED = ("generate", "load_model", "unload_model")  # what could crash the box
REMEMBERED_REQUESTS = 4096  # finished request_ids kept to recognise redeliveries
WORK_STALL_S = 120.0  # one command on the work lane longer than this: wedged (the watchdog stops)
RESTARTED = "the box restarted while serving this request (it may have crashed it); it is not run again: send it anew to retry"


class DaemonServices(Protocol):
    """What the command handlers need from the daemon's ``Service``: its settings, the budget,
    and publishing events, state and status."""

    cfg: DaemonConfig
    metrics: Metrics  # requests counted for /metrics, MQTT and HTTP alike

    def set_budget(self, watts: float) -> dict: ...
    def publish_event(self, kind: str, **fields) -> None: ...
    def publish_state(self) -> None: ...
    def status(self) -> dict: ...


@dataclass(eq=False)
class Job:
    """A generate in flight. ``lock`` orders its chunks and its one final reply."""

    key: tuple
    request_id: str
    engine_id: str
    route: Route
    inbound: Inbound  # without its payload: kept only to acknowledge it
    stream: bool
    deadline: float | None  # monotonic; the first token must come before it
    journal_key: str | None = None
    handle: object = None
    next_seq: int = 0
    started: bool = False  # a token has come out (before that, a cancel can answer at once)
    finished: bool = False  # the final reply is out; later engine events are ignored
    broken: bool = False  # a chunk could not be queued: the final must be an error
    cancel_reason: tuple[int, str] | None = None  # why *we* cancelled it; None: the client did, or nobody
    acks: list[Inbound] = field(default_factory=list)  # duplicates delivered while it ran
    lock: threading.Lock = field(default_factory=threading.Lock)


class CommandHandler:
    def __init__(self, service: DaemonServices, transport: Transport, host: ModelHost, topics: Topics, journal: Journal):
        self.service, self.transport, self.host, self.topics, self.journal = service, transport, host, topics, journal
        self.lanes = Lanes(topics)
        self.control_latency = Latencies()
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._seen: OrderedDict[tuple, Job | None] = OrderedDict()  # accepted; None: finished
        self._precancelled: dict[str, str] = {}  # request_id -> canceller's topic, for a generate still waiting
        self._draining = False
        self._held = 0
        self._stop = threading.Event()
        self.heartbeat = time.monotonic()  # the control thread's
        self.work_busy_since: float | None = None
        self._last_turned_log = 0.0
        self.counters = {
            "received": 0,
            "rejected": 0,
            "duplicates": 0,
            "completed": 0,
            "turned_away": 0,
            "dropped_qos0": 0,
            "restarted_while_serving": 0,
        }
        self._threads = [
            threading.Thread(target=self._run_control, name="edgebox-control", daemon=True),
            threading.Thread(target=self._run_work, name="edgebox-work", daemon=True),
        ]

    # -- called from other threads --------------------------------------------------------------
    def submit(self, inbound: Inbound) -> None:
        """paho's network thread: onto a lane, or turned away at once (see ``lanes``)."""
        turned = self.lanes.offer(inbound, accepted_generates=len(self._jobs), limit=self.service.cfg.in_flight_limit)
        if turned is not None:
            self._turn_away(inbound, turned)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self.lanes.close()
        for t in self._threads:
            t.join(5.0)

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def healthy(self) -> bool:
        """For the watchdog: the control lane turns, and the work lane is not stuck on one command."""
        now, busy = time.monotonic(), self.work_busy_since
        return now - self.heartbeat < 10.0 and (busy is None or now - busy < WORK_STALL_S)

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
            self._send_final(job.route, reply, acks, job.journal_key)
        return True

    # -- the lanes' threads -----------------------------------------------------------------------
    def _run_control(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            inbound = self.lanes.take_control(0.2 if self._has_deadlines() else 1.0)
            if inbound is not None:
                self._guarded(inbound)
            self._expire_waiting()

    def _run_work(self) -> None:
        while not self._stop.is_set():
            inbound = self.lanes.take_work(1.0)
            if inbound is None:
                continue
            self.work_busy_since = time.monotonic()
            try:
                self._guarded(inbound)
            finally:
                self.work_busy_since = None
                rid = self.lanes.work_done(inbound)
                if rid is not None:
                    with self._lock:
                        if not self.lanes.waiting(rid):
                            self._precancelled.pop(rid, None)

    def _guarded(self, inbound: Inbound) -> None:
        try:
            self._dispatch(inbound)
        except Exception as e:  # a bug must cost one command, not the daemon
            log.exception("command on %s failed", inbound.topic)
            route = Route(inbound.response_topic, inbound.correlation) if inbound.response_topic else None
            self._reject(inbound, None, route, INTERNAL, f"internal error: {type(e).__name__}: {e}")

    def _dispatch(self, inbound: Inbound) -> None:
        method = self.topics.method_of(inbound.topic) or ""
        if self._draining and method not in DRAIN_METHODS:
            self._held += 1  # not acknowledged: redelivered to the next run
            return
        self.counters["received"] += 1
        if inbound.retain and inbound.size == 0:
            self.transport.ack(inbound)  # the deletion of a retained command (ours, below): nothing to do
            return
        if inbound.payload is None:
            route = Route(inbound.response_topic, inbound.correlation) if inbound.response_topic else None
            message = f"payload of {inbound.size} bytes exceeds max_payload_bytes ({self.service.cfg.max_payload_bytes})"
            return self._reject(inbound, None, route, TOO_LARGE, message)
        if inbound.retain:
            # a retained command would run again at every restart: clear it (and refuse it below)
            self.transport.publish(inbound.topic, b"", retain=True)
        try:
            cmd = parse_command(
                method,
                inbound.payload,
                topics=self.topics,
                response_topic=inbound.response_topic,
                correlation=inbound.correlation,
                retained=inbound.retain,
            )
        except Rejected as r:
            return self._reject(inbound, r.request_id, r.route, r.code, r.message)

        journal_key = key_of(cmd.key) if method in JOURNALED else None
        if journal_key is not None and self.journal.suspect(journal_key):
            return self._answer_restarted(inbound, cmd, journal_key)
        with self._lock:
            earlier = self._seen.get(cmd.key, False)  # False: not accepted before
            if isinstance(earlier, Job):
                earlier.acks.append(inbound)  # acknowledged with the original's final reply
        if earlier is not False:
            return self._duplicate(inbound, cmd, earlier)

        try:
            deadline = self._deadline(inbound, cmd.expires_at)
            if deadline is not None and time.monotonic() > deadline:
                raise Rejected(EXPIRED, "expired before it could start (expires_at / Message Expiry Interval passed)")
            if journal_key is not None:
                self.journal.add(journal_key, method, cmd.request_id)
            getattr(self, f"_cmd_{method}")(inbound, cmd, deadline, journal_key)
        except Rejected as r:
            return self._reject(inbound, cmd.request_id, cmd.route, r.code, r.message, journal_key, r.retry_after_s)
        except Exception as e:  # a bug: this command gets a 500, the daemon carries on
            log.exception("%s %r failed", method, cmd.request_id)
            message = f"internal error: {type(e).__name__}: {e}"
            return self._reject(inbound, cmd.request_id, cmd.route, INTERNAL, message, journal_key)
        if method != "generate":  # a generate is remembered with its job
            self._remember(cmd.key)

    def _duplicate(self, inbound: Inbound, cmd: Command, earlier: Job | None) -> None:
        self.counters["duplicates"] += 1
        log.warning(
            "duplicate request_id %r on %s (%s): answered once",
            cmd.request_id,
            cmd.method,
            "still running" if earlier else "already answered",
        )
        self.service.publish_event("duplicate_request", request_id=cmd.request_id, method=cmd.method, redelivered=inbound.dup)
        if earlier is None:
            self.transport.ack(inbound)

    def _answer_restarted(self, inbound: Inbound, cmd: Command, journal_key: str) -> None:
        self.counters["restarted_while_serving"] += 1
        log.error(
            "%s %r: the last run died serving it; answering with an error, not running it again", cmd.method, cmd.request_id
        )
        self.service.publish_event("restarted_while_serving", request_id=cmd.request_id, method=cmd.method)
        reply = error_reply(cmd.request_id, INTERNAL, RESTARTED)
        reply.redelivered = True
        self._send_final(cmd.route, reply, [inbound], journal_key)

    def _remember(self, key: tuple, job: Job | None = None) -> None:
        with self._lock:
            self._seen[key] = job
            excess = len(self._seen) - REMEMBERED_REQUESTS  # bounded; running requests are never forgotten
            for old in list(self._seen)[: max(0, excess)]:
                if self._seen[old] is None:
                    del self._seen[old]

    def _deadline(self, inbound: Inbound, expires_at: float | None) -> float | None:
        limits = []
        if inbound.expiry_remaining_s is not None:
            limits.append(inbound.received + inbound.expiry_remaining_s)
        if expires_at is not None:
            limits.append(inbound.received + (expires_at - time.time()))
        return min(limits) if limits else None

    # -- replies ----------------------------------------------------------------------------------
    def _send_final(self, route: Route, reply: FinalReply, acks: list[Inbound], journal_key: str | None = None) -> None:
        first = acks[0]
        control = self.topics.method_of(first.topic) in CONTROL_METHODS

        def delivered() -> None:
            for inbound in acks:
                self.transport.ack(inbound)
            if journal_key is not None:
                self.journal.remove(journal_key)
            if control:
                self.control_latency.add("acknowledged", first.received)

        self.transport.publish_final(route.topic, encode(reply), route.correlation, delivered)
        if control:
            self.control_latency.add("answered", first.received)

    def _reject(
        self,
        inbound: Inbound,
        request_id: str | None,
        route: Route | None,
        code: int,
        message: str,
        journal_key: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.counters["rejected"] += 1
        method = self.topics.method_of(inbound.topic)
        self.service.metrics.refused("mqtt", method or "unknown", code)
        log.warning("rejected %s command %s with %d: %s", method or "?", request_id or "(no request_id)", code, one_line(message))
        self.service.publish_event(
            "bad_request",
            request_id=request_id,
            method=method,
            code=code,
            message=one_line(message),
            reply_topic=route.topic if route and not reply_topic_problem(route.topic, self.topics) else None,
        )
        if route is None or reply_topic_problem(route.topic, self.topics):
            self.transport.ack(inbound)  # nowhere to answer; the event above is the only trace
            if journal_key is not None:
                self.journal.remove(journal_key)
            return
        self._send_final(route, error_reply(request_id, code, message, retry_after_s=retry_after_s), [inbound], journal_key)

    def _turn_away(self, inbound: Inbound, turned: Turned) -> None:
        """paho's network thread: a command that does not fit on its lane (see ``lanes``)."""
        if inbound.qos == 0:
            self.counters["dropped_qos0"] += 1
        else:
            self.counters["turned_away"] += 1
        now = time.monotonic()
        if now - self._last_turned_log > 5.0:  # a flood must not flood the journal too
            self._last_turned_log = now
            log.warning(
                "turning commands away (%d answered with 429/503, %d QoS 0 dropped so far): %s",
                self.counters["turned_away"],
                self.counters["dropped_qos0"],
                turned.message,
            )
        if inbound.qos == 0:
            return
        topic = inbound.response_topic or peek(inbound.payload, "reply_to")
        if not topic or reply_topic_problem(topic, self.topics):
            self.transport.ack(inbound)
            return
        reply = error_reply(peek(inbound.payload, "request_id"), turned.code, turned.message)
        self._send_final(Route(topic, inbound.correlation if inbound.response_topic else None), reply, [inbound])

    def _reply_ok(self, inbound: Inbound, request_id: str, route: Route, result: dict, journal_key: str | None = None) -> None:
        self._send_final(route, ok_reply(request_id, result), [inbound], journal_key)

    # -- generate -----------------------------------------------------------------------------------
    def _cmd_generate(self, inbound: Inbound, cmd: Command, deadline: float | None, journal_key: str | None) -> None:
        from edgebox.engine import KVBudgetError, QueueFullError

        cfg = self.service.cfg
        limit = cfg.in_flight_limit
        if len(self._jobs) >= limit:
            raise Rejected(TOO_MANY, f"{len(self._jobs)} generate requests in flight (max_in_flight {limit}); retry later")
        p: GenerateParams = cmd.params
        request = build_request(p, cfg.max_tokens_limit, uuid.uuid4().hex)

        slim = dataclasses.replace(inbound, payload=None)  # the prompt lives on in the request only
        job = Job(cmd.key, cmd.request_id, request.request_id, cmd.route, slim, p.stream, deadline, journal_key)
        with self._lock:
            self._jobs[job.engine_id] = job
            cancelled_early = self._precancelled.pop(cmd.request_id, None) is not None
        self._remember(cmd.key, job)
        if cancelled_early:  # a cancel came while it waited on the work lane
            return self._cancel_job(job)
        try:
            handle = self.host.submit(request, on_event=lambda event: self._on_event(job, event))
        except Exception as e:
            with self._lock:
                self._jobs.pop(job.engine_id, None)
                self._seen.pop(cmd.key, None)  # refused: a retry must be answered
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
            message = str(e) if isinstance(e, EdgeboxError) else f"internal error: {type(e).__name__}: {e}"
            raise Rejected(code, message, retry_after_s=getattr(e, "retry_after_s", None)) from None
        job.handle = handle
        if job.cancel_reason is not None or job.finished:  # cancelled before submit returned
            handle.cancel()
        log.debug("generate %s accepted (%d in flight)", cmd.request_id, len(self._jobs))

    def _on_event(self, job: Job, event) -> None:
        """The engine's thread: stream a chunk, or send the final reply."""
        from edgebox.engine import Chunk

        if isinstance(event, Chunk):
            with job.lock:
                job.started = True
                if job.finished or not job.stream or job.cancel_reason is not None:
                    return
                chunk = StreamChunk(
                    request_id=job.request_id,
                    seq=job.next_seq,
                    delta=event.text,
                    reasoning=True if event.reasoning else None,
                    tool_calls=list(event.tool_calls) or None,
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
        self.service.metrics.finished("mqtt", "generate", s)
        if job.cancel_reason is not None and (s.done_reason == "cancelled" or job.broken):
            code, message = job.cancel_reason
            reply = error_reply(job.request_id, code, message)
        elif s.done_reason == "error" and s.retry_after_s is not None:  # its deadline passed while queued
            reply = error_reply(job.request_id, TOO_MANY, s.error, retry_after_s=s.retry_after_s)
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
            draft_n=s.draft_tokens,
            draft_n_accepted=s.draft_accepted,
        )
        reply.energy = EnergyUsage(**s.energy.as_dict())
        if not job.stream:
            reply.text, reply.content, reply.reasoning = s.text, s.content, s.reasoning or None
        reply.tool_calls = list(s.tool_calls) or None
        if s.logprobs:  # token ids, as the tokenizer's vocabulary numbers them
            reply.logprobs = [{"token": e.token, "logprob": e.logprob, "top": [list(t) for t in e.top]} for e in s.logprobs]
        if s.chain_probs:  # llama.cpp's n_probs: probabilities of the distribution each draw used
            reply.probs = [
                {"token": e.token, "prob": math.exp(e.logprob), "top": [[t, math.exp(lp)] for t, lp in e.top]}
                for e in s.chain_probs
            ]
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
    def _cmd_cancel(self, inbound: Inbound, cmd: Command, deadline, journal_key) -> None:
        p: CancelParams = cmd.params
        with self._lock:
            matches = [j for j in self._jobs.values() if j.request_id == p.target]
            waiting = not matches and self.lanes.waiting(p.target)
            if waiting:  # still on the work lane: it is answered "cancelled" when it gets there
                self._precancelled[p.target] = cmd.route.topic
        # request_ids are chosen by clients: prefer the canceller's own request when two clash
        mine = [j for j in matches if j.route.topic == cmd.route.topic] or matches
        if not mine and not waiting:
            raise Rejected(NOT_FOUND, f"no generate with request_id {p.target!r} is in flight (finished, or never received)")
        for job in mine:
            self._cancel_job(job)
        self._reply_ok(inbound, cmd.request_id, cmd.route, {"target": p.target, "cancelled": len(mine) or 1})

    def _cmd_get_status(self, inbound: Inbound, cmd: Command, deadline, journal_key) -> None:
        self._reply_ok(inbound, cmd.request_id, cmd.route, self.service.status())

    def _cmd_set_power_budget(self, inbound: Inbound, cmd: Command, deadline, journal_key) -> None:
        p: SetPowerBudgetParams = cmd.params
        try:
            result = self.service.set_budget(p.watts)
        except ValueError as e:
            raise Rejected(BAD_REQUEST, f"budget {p.watts} W refused: {e}") from None
        self._reply_ok(inbound, cmd.request_id, cmd.route, result)

    def _cmd_load_model(self, inbound: Inbound, cmd: Command, deadline, journal_key) -> None:
        p: LoadModelParams = cmd.params
        cfg = self.service.cfg
        path = model_path(p.path, cfg.allowed_models_dir)
        self._check_switch_allowed(p.force, "load a model")
        chips, ctx = p.chips or cfg.chips, p.ctx or cfg.ctx
        threading.Thread(
            target=self._switch_model,
            name="edgebox-load",
            daemon=True,
            args=(inbound, cmd, journal_key, path, chips, ctx),
        ).start()

    def _cmd_unload_model(self, inbound: Inbound, cmd: Command, deadline, journal_key) -> None:
        p: UnloadModelParams = cmd.params
        self._check_switch_allowed(p.force, "unload the model")
        threading.Thread(
            target=self._switch_model,
            name="edgebox-unload",
            daemon=True,
            args=(inbound, cmd, journal_key, None, 0, None),
        ).start()

    def _check_switch_allowed(self, force: bool, what: str) -> None:
        if self.host.busy:
            raise Rejected(CONFLICT, "a model is already being loaded or unloaded; retry when it is done")
        if self._jobs and not force:
            raise Rejected(
                CONFLICT, f'{len(self._jobs)} requests in flight; cancel them, wait, or send "force": true to {what} anyway'
            )

    def _switch_model(
        self, inbound: Inbound, cmd: Command, journal_key: str | None, path: Path | None, chips: int, ctx: int | None
    ) -> None:
        """Its own thread: loading a 7B model takes seconds; cancel and get_status keep working."""
        why = "cancelled: the model is being replaced" if path else "cancelled: the model was unloaded"
        rid, route = cmd.request_id, cmd.route
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
            self._reply_ok(inbound, rid, route, result, journal_key)
        except Busy as e:
            self._reject(inbound, rid, route, CONFLICT, str(e), journal_key)
        except EdgeboxError as e:  # ModelError: not a GGUF, unsupported, ...: the old model keeps serving
            self.service.publish_event("error", message=one_line(str(e)), method="load_model")
            self.service.publish_state()
            self._reject(inbound, rid, route, BAD_REQUEST, str(e), journal_key)
        except Exception as e:
            log.exception("model switch failed")
            self.service.publish_state()
            self._reject(inbound, rid, route, INTERNAL, f"internal error: {type(e).__name__}: {e}", journal_key)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)
