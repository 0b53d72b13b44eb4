"""Two lanes for commands, chosen on paho's network thread from the topic alone.

* control (``cancel``, ``get_status``, ``set_power_budget``): its own thread answers them within
  milliseconds whatever else runs; no generation work, prompt validation, tokenization or chat
  rendering ever happens on it.
* work (``generate``, ``load_model``, ``unload_model``, and unknown methods for their 404): its
  thread validates, journals, renders and tokenizes, and hands commands to the engine.

Both are bounded, QoS 0 included (the broker's Receive Maximum holds back QoS 1 only): at most
``CONTROL_SLOTS`` control commands wait; generates wait up to the box's in-flight limit, counting
those already accepted (``max_in_flight``: the batch plus a 512-deep queue by default); other
work commands get ``EXTRA_WORK_SLOTS``. What does not fit is turned away at once, unparsed: a
QoS 1 command gets a 429 (a generate over the limit) or a 503 (a full lane) addressed from a
bounded peek at its request_id; a QoS 0 one is dropped and counted (``dropped_qos0``). Its sender
asked for at most once and the broker cannot hold it back, so answering each would turn an
inbound flood into an outbound one of replies, which are never dropped. A QoS 1 redelivery
(``dup``) always gets in: it may be a running request's copy, acknowledged with it (and the
Receive Maximum bounds those). Every waiting payload is at most ``max_payload_bytes``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

from edgebox.daemon.commands import peek
from edgebox.daemon.schemas import TOO_MANY, UNAVAILABLE, Topics
from edgebox.daemon.transport import Inbound

CONTROL_METHODS = frozenset({"cancel", "get_status", "set_power_budget"})
CONTROL_SLOTS = 64
EXTRA_WORK_SLOTS = 64


@dataclass(frozen=True)
class Turned:
    """A command turned away at the door, and what to answer (QoS 1 only)."""

    code: int
    message: str


class Lanes:
    def __init__(self, topics: Topics):
        self.topics = topics
        lock = threading.Lock()
        self._control_ready = threading.Condition(lock)
        self._work_ready = threading.Condition(lock)
        self._control: deque[Inbound] = deque()
        self._work: deque[Inbound] = deque()
        self._generates = 0  # generates offered to the work lane and not yet done with
        self._waiting_ids: Counter[str] = Counter()  # their request ids, as far as a peek sees
        self._closed = False

    def offer(self, inbound: Inbound, *, accepted_generates: int, limit: int) -> Turned | None:
        """paho's network thread: queue ``inbound`` on its lane (None), or say why not."""
        method = self.topics.method_of(inbound.topic) or ""
        with self._control_ready:
            if method in CONTROL_METHODS:
                if len(self._control) >= CONTROL_SLOTS and not inbound.dup:
                    return Turned(UNAVAILABLE, f"{CONTROL_SLOTS} control commands are waiting already; retry in a moment")
                self._control.append(inbound)
                self._control_ready.notify()
                return None
            if method == "generate":
                waiting = self._generates + accepted_generates
                if waiting >= limit and not inbound.dup:
                    return Turned(TOO_MANY, f"{waiting} generate requests in flight (max_in_flight {limit}); retry later")
                self._generates += 1
                rid = peek(inbound.payload, "request_id")
                if rid is not None:
                    self._waiting_ids[rid] += 1
            elif len(self._work) - self._generates >= EXTRA_WORK_SLOTS and not inbound.dup:
                return Turned(UNAVAILABLE, f"{EXTRA_WORK_SLOTS} {method or 'other'} commands are waiting already; retry later")
            self._work.append(inbound)
            self._work_ready.notify()
            return None

    def take_control(self, timeout: float) -> Inbound | None:
        return self._take(self._control, self._control_ready, timeout)

    def take_work(self, timeout: float) -> Inbound | None:
        return self._take(self._work, self._work_ready, timeout)

    def work_done(self, inbound: Inbound) -> str | None:
        """The work lane has accepted or answered ``inbound``: its place is free. Returns the
        request id it was waiting under, if any."""
        if self.topics.method_of(inbound.topic) != "generate":
            return None
        rid = peek(inbound.payload, "request_id")
        with self._work_ready:
            self._generates -= 1
            if rid is not None:
                self._waiting_ids[rid] -= 1
                if self._waiting_ids[rid] <= 0:
                    del self._waiting_ids[rid]
        return rid

    def waiting(self, request_id: str) -> bool:
        """Is a generate with this request id waiting for (or on) the work lane?"""
        with self._work_ready:
            return request_id in self._waiting_ids

    def depths(self) -> dict[str, int]:
        with self._control_ready:
            return {"control": len(self._control), "work": len(self._work)}

    def close(self) -> None:
        with self._control_ready:
            self._closed = True
            self._control_ready.notify_all()
            self._work_ready.notify_all()

    def _take(self, q: deque, ready: threading.Condition, timeout: float) -> Inbound | None:
        with ready:
            if not q and not self._closed:
                ready.wait(timeout)
            return q.popleft() if q else None


class Latencies:
    """How long control commands take in the box, for get_status: from arrival to the reply handed
    to the MQTT client (``answered``), and to the broker's acknowledgement of it (``acknowledged``,
    which adds the broker's round trip). The last ``keep`` of each, and the worst since start."""

    def __init__(self, keep: int = 1024):
        self._recent = {"answered": deque(maxlen=keep), "acknowledged": deque(maxlen=keep)}
        self._worst = {"answered": 0.0, "acknowledged": 0.0}
        self._lock = threading.Lock()

    def add(self, kind: str, received: float) -> None:
        took = time.monotonic() - received
        with self._lock:
            self._recent[kind].append(took)
            self._worst[kind] = max(self._worst[kind], took)

    def summary(self) -> dict:
        out = {}
        with self._lock:
            for kind, recent in self._recent.items():
                r = sorted(recent)
                out[kind] = {"count": len(r)}
                if r:
                    out[kind].update(p50_ms=_ms(r[len(r) // 2]), p99_ms=_ms(r[int(len(r) * 0.99)]), max_ms=_ms(self._worst[kind]))
        return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
