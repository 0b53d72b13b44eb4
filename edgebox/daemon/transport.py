"""The daemon's MQTT 5 connection (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``).

* **Commands survive our restarts**: a persistent session (``clean_start=False``, a
  ``SessionExpiryInterval``) and QoS 1 subscriptions, renewed in every ``on_connect``.
* **At least once, answered once**: commands are acknowledged by hand (``manual_ack``), only
  after their final reply has reached the broker, and only on the connection that received them
  (``Inbound.generation``): after a reconnect the broker resends, and that copy is acknowledged.
* **ReceiveMaximum** covers every generate the box may hold unacknowledged plus the lanes'
  other slots (``receive_maximum``), so the broker never holds a ``cancel`` back behind them.
  It is per connection, so it bounds the fleet's shared generates and the box's own together:
  the broker sends a box no more unacknowledged commands than it has room for in its lanes
  (``max_in_flight`` generates); past that the lanes answer 429 at once.
* **Fleet requests**: besides its own ``cmd/+`` the box subscribes to the MQTT 5 shared
  subscription ``$share/edgebox/edgebox/v1/fleet/cmd/generate``; the broker gives each message
  to one subscriber of the group.  A broker or ACL that refuses it costs only the fleet queue
  (a warning), never the box's own commands.
* **Last Will**: retained ``{"state": "offline"}``; ``stop()`` says it itself and disconnects.
* **Reconnect with backoff** (``reconnect_delay_set``), the first connection included.
* **In order across reconnects**: paho resends its unacknowledged messages on reconnect, but a
  publish from another thread would overtake them; so from a disconnect on, QoS 1 messages wait
  in our outbox until the broker has acknowledged everything sent before it.
* **Bounded memory**: ``max_queued_messages`` caps the outbox (a chunk that does not fit is
  refused and its stream ends with an error); final replies, one per command, always go.

Nothing here runs inference: ``on_message`` only hands an ``Inbound`` to the handler's lanes.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgebox.daemon.config import DaemonConfig
from edgebox.daemon.schemas import FLEET_SHARED_GENERATE, Topics, encode

log = logging.getLogger("edgebox.daemon")

# CONNACK reason codes that retrying will not fix
_REFUSALS = {
    "Bad user name or password",
    "Not authorized",
    "Banned",
    "Client identifier not valid",
    "Bad authentication method",
    "Unsupported protocol version",
}


@dataclass(frozen=True)
class Inbound:
    """One command as it arrived (built on paho's network thread, handled on the dispatcher's)."""

    topic: str
    payload: bytes | None  # None: larger than max_payload_bytes, dropped unread
    size: int
    mid: int
    qos: int
    dup: bool
    retain: bool
    response_topic: str | None
    correlation: bytes | None
    expiry_remaining_s: int | None  # MQTT 5 Message Expiry Interval left when it reached us
    received: float  # time.monotonic()
    generation: int  # connection it arrived on; acks go only on that one


class Transport:
    def __init__(
        self,
        cfg: DaemonConfig,
        topics: Topics,
        *,
        password: str | None,
        on_inbound: Callable[[Inbound], None],
        on_connected: Callable[[bool], None],
        will_payload: bytes,
        receive_maximum: int,
    ):
        self.cfg = cfg
        self.topics = topics
        self._on_inbound = on_inbound
        self._on_connected = on_connected
        self.payload_limit = cfg.max_payload_bytes
        self.generation = 0
        self.connected = False
        self.ever_connected = False
        self.fatal: str | None = None  # the broker refused us for a reason retrying will not fix
        self.subscribed = threading.Event()
        self.receive_maximum = max(1, min(65535, receive_maximum))
        self._wake_service: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._tracked: list[tuple[mqtt.MQTTMessageInfo, Callable[[], None] | None]] = []  # with paho, not yet acked
        self._outbox: deque[_Outgoing] = deque()  # not yet given to paho (reconnecting, or paho's queue full)
        self._holding = False  # from a disconnect until what paho held then is acknowledged
        self._held_since = 0.0
        self._delivered = threading.Event()
        self._stopping = threading.Event()
        self._last_connect_error = ""
        self._shared_mid: int | None = None

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.mqtt_client_id, protocol=mqtt.MQTTv5, manual_ack=True)
        if cfg.username or password:
            c.username_pw_set(cfg.username, password)
        if cfg.broker_tls:
            c.tls_set(
                ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                certfile=str(cfg.cert_file) if cfg.cert_file else None,
                keyfile=str(cfg.key_file) if cfg.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        c.will_set(topics.status, will_payload, qos=1, retain=True)
        c.reconnect_delay_set(min_delay=cfg.reconnect_min_s, max_delay=cfg.reconnect_max_s)
        c.max_queued_messages_set(cfg.max_queued_messages)
        c.max_inflight_messages_set(64)
        c.on_connect = self._handle_connect
        c.on_connect_fail = self._handle_connect_fail
        c.on_disconnect = self._handle_disconnect
        c.on_subscribe = self._handle_subscribe
        c.on_message = self._handle_message
        c.on_publish = self._handle_publish
        self.client = c
        self._acker = threading.Thread(target=self._delivery_loop, name="edgebox-mqtt-acks", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, wake_service: Callable[[], None]) -> None:
        self._wake_service = wake_service
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        props.ReceiveMaximum = self.receive_maximum
        # the broker drops (silently) what we could never accept anyway; between max_payload_bytes
        # and this size a command still arrives, to be answered with 413
        props.MaximumPacketSize = max(4 * self.cfg.max_payload_bytes, 2**20) + 65536
        self._acker.start()
        self.client.connect_async(
            self.cfg.broker_host, self.cfg.broker_port, keepalive=self.cfg.keepalive_s, clean_start=False, properties=props
        )
        self.client.loop_start()  # paho's network thread; it retries the first connection too

    def stop(self, offline_payload: bytes, timeout: float = 5.0) -> None:
        """Say offline (retained), disconnect cleanly (no Last Will; the session stays), stop threads."""
        self._stopping.set()
        if self.connected:
            info = self.client.publish(self.topics.status, offline_payload, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self._delivered.set()
        self._acker.join(2.0)

    # -- publishing ----------------------------------------------------------------------------
    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, correlation: bytes | None = None
    ) -> bool:
        """Queue a message; False when it cannot be (the outbox is full, or QoS 0 while
        disconnected). QoS 1 messages reach the broker in order, across reconnects."""
        if qos == 0:
            if not self.connected:
                return False
            return (
                self.client.publish(topic, payload, qos=0, retain=retain, properties=_props(correlation)).rc
                == MQTTErrorCode.MQTT_ERR_SUCCESS
            )
        return self._enqueue(_Outgoing(topic, payload, retain, correlation, None, final=False))

    def publish_final(
        self, topic: str, payload: bytes, correlation: bytes | None, on_delivered: Callable[[], None] | None
    ) -> None:
        """A final reply is never refused. ``on_delivered`` runs (on the ack thread) once the
        broker has it."""
        self._enqueue(_Outgoing(topic, payload, False, correlation, on_delivered, final=True))
        self._delivered.set()  # the ack thread may find it already delivered

    def publish_json(self, topic: str, message, **kwargs) -> bool:
        return self.publish(topic, encode(message), **kwargs)

    def _enqueue(self, m: _Outgoing) -> bool:
        with self._lock:
            if self._holding or self._outbox:  # behind what waits already: keep the order
                if not m.final and len(self._outbox) >= self.cfg.max_queued_messages:
                    return False
                self._outbox.append(m)
                return True
        if self._hand_to_paho(m):
            return True
        if not m.final:
            return False
        with self._lock:
            self._outbox.append(m)
        return True

    def _hand_to_paho(self, m: _Outgoing) -> bool:
        info = self.client.publish(m.topic, m.payload, qos=1, retain=m.retain, properties=_props(m.correlation))
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            return False
        with self._lock:
            self._tracked.append((info, m.on_delivered))
        return True

    def ack(self, inbound: Inbound) -> None:
        """Acknowledge a command, on the connection it came in on only (see the module docstring)."""
        if inbound.qos == 0:
            return
        if inbound.generation != self.generation or not self.connected:
            log.debug(
                "not acknowledging mid %d from connection %d: the broker will redeliver it", inbound.mid, inbound.generation
            )
            return
        self.client.ack(inbound.mid, inbound.qos)

    def pending_deliveries(self) -> int:
        with self._lock:
            return len(self._tracked) + len(self._outbox)

    def wait_delivered(self, timeout: float) -> bool:
        """Wait until the broker has every QoS 1 message we sent (and their acks have gone out)."""
        deadline = time.monotonic() + timeout
        while self.pending_deliveries():
            if time.monotonic() > deadline:
                return False
            self._delivered.set()
            time.sleep(0.02)
        return True

    # -- paho callbacks (network thread: quick, no inference, no blocking) ------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            why = str(reason_code)
            log.error("broker %s refused the connection: %s", self.cfg.broker, why)
            if why in _REFUSALS and not self.ever_connected:
                self.fatal = f"broker {self.cfg.broker} refused the connection: {why}"
                self._wake_service()
            return
        self.generation += 1
        with self._lock:
            self._held_since = time.monotonic()  # the 10 s grace for paho's resends starts now
        self.connected = True
        first = not self.ever_connected
        self.ever_connected = True
        self._last_connect_error = ""
        log.info(
            "%s to %s as %s (session present: %s)",
            "connected" if first else "reconnected",
            self.cfg.broker,
            self.cfg.mqtt_client_id,
            flags.session_present,
        )
        # subscribe on every connect: the broker may have lost the session (restart without persistence).
        # retainAsPublished: a command published with retain is seen as such and refused at once,
        # rather than run now and replayed at every restart
        client.subscribe(self.topics.cmd_filter, options=SubscribeOptions(qos=1, retainAsPublished=True))
        _, self._shared_mid = client.subscribe(FLEET_SHARED_GENERATE, options=SubscribeOptions(qos=1, retainAsPublished=True))
        self._on_connected(flags.session_present)
        self._delivered.set()  # release the outbox once paho's resends are acknowledged

    def _handle_connect_fail(self, client, userdata) -> None:
        msg = f"cannot reach broker {self.cfg.broker}; retrying with backoff"
        if msg != self._last_connect_error:  # say it once per outage, not once per retry
            log.warning(msg)
            self._last_connect_error = msg

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.generation += 1  # acks for messages of the old connection must not go on the next one
        self.connected = False
        with self._lock:
            self._holding = True
        self.subscribed.clear()
        if not self._stopping.is_set() and self.ever_connected:
            log.warning("disconnected from %s (%s); reconnecting with backoff", self.cfg.broker, reason_code)

    def _handle_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        failed = [str(rc) for rc in reason_code_list if rc.is_failure]
        if mid == self._shared_mid:
            if failed:
                log.warning(
                    "broker %s refused the fleet subscription %s: %s (fleet requests will not reach this box)",
                    self.cfg.broker,
                    FLEET_SHARED_GENERATE,
                    ", ".join(failed),
                )
            return
        if failed:
            self.fatal = f"broker {self.cfg.broker} refused the subscription to {self.topics.cmd_filter}: {', '.join(failed)} (check the ACL)"
            log.error(self.fatal)
            self._wake_service()
            return
        self.subscribed.set()
        self._wake_service()

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        size = len(msg.payload)
        inbound = Inbound(
            topic=msg.topic,
            payload=msg.payload if size <= self.payload_limit else None,
            size=size,
            mid=msg.mid,
            qos=msg.qos,
            dup=bool(msg.dup),
            retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None) or None,
            correlation=getattr(props, "CorrelationData", None),
            expiry_remaining_s=getattr(props, "MessageExpiryInterval", None),
            received=time.monotonic(),
            generation=self.generation,
        )
        self._on_inbound(inbound)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code.is_failure:
            # e.g. "Not authorized": the ACL forbids a reply topic
            log.warning(
                "the broker refused message %d: %s (replies must go under %s...)", mid, reason_code, self.topics.reply_prefix
            )
        self._delivered.set()

    # -- delivery tracking (own thread: paho calls on_publish holding its message lock) ------------
    def _delivery_loop(self) -> None:
        while not self._stopping.is_set():
            self._delivered.wait(1.0)
            self._delivered.clear()
            with self._lock:
                done, waiting = [], []
                for entry in self._tracked:
                    (done if _delivered(entry[0]) else waiting).append(entry)
                self._tracked = waiting
            for _, callback in done:
                if callback is not None:
                    try:
                        callback()
                    except Exception:
                        log.exception("delivery callback failed")
            self._release_outbox()

    def _release_outbox(self) -> None:
        """Hand the outbox to paho, in order, once it is safe (see the module docstring)."""
        with self._lock:
            if not self.connected or not (self._holding or self._outbox):
                return
            if self._holding and self._tracked:
                if time.monotonic() - self._held_since < 10.0:
                    return  # paho's resends are not all acknowledged yet
                log.warning("%d messages unacknowledged 10 s after reconnecting; releasing the outbox anyway", len(self._tracked))
        while True:
            with self._lock:
                if not self._outbox:
                    self._holding = False
                    return
                m = self._outbox.popleft()
            if not self.connected or not self._hand_to_paho(m):
                with self._lock:
                    self._outbox.appendleft(m)  # paho's queue is full: wait for deliveries
                return


@dataclass(frozen=True)
class _Outgoing:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None
    on_delivered: Callable[[], None] | None
    final: bool


def _delivered(info: mqtt.MQTTMessageInfo) -> bool:
    """Has the broker acknowledged it? Not ``is_published()``: that raises for a message published
    while disconnected (its rc stays MQTT_ERR_NO_CONN) although paho sends it after the reconnect
    and marks it published on the PUBACK, which is what this reads."""
    return bool(getattr(info, "_published", False))


def _props(correlation: bytes | None) -> Properties | None:
    props = Properties(PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1  # UTF-8 JSON
    if correlation is not None:
        props.CorrelationData = correlation
    return props
