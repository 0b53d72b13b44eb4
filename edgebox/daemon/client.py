"""The operator's side: call a box's commands over MQTT 5 and read the fleet's retained status.

``FleetClient`` is what ``edgebox client ...`` uses, and what scripts and tests can use::

    with FleetClient("mqtt://broker:1883", username="controller", password=...) as fleet:
        final = fleet.call("box-001", "generate", {"prompt": "hi", "max_tokens": 16},
                           on_chunk=lambda c: print(c["delta"], end=""))
        print(fleet.devices())

Replies come back on ``edgebox/v1/{device}/reply/{client_id}`` (the Response Topic we give),
matched by Correlation Data; that topic lies inside the device's own tree, so the per-device
ACL (``pattern readwrite edgebox/v1/%u/#``) lets the box answer and nothing else.
"""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgebox.daemon.schemas import API_PREFIX, Topics
from edgebox.errors import EdgeboxError


class ClientError(EdgeboxError):
    """The broker or the box could not be reached, or did not answer in time."""


class CommandFailed(EdgeboxError):
    """The box answered with an error; ``reply`` is its final message."""

    def __init__(self, reply: dict):
        super().__init__(f"{reply.get('code')}: {reply.get('message', 'error')}")
        self.reply = reply


class FleetClient:
    def __init__(
        self,
        broker: str = "mqtt://127.0.0.1:1883",
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        client_id: str | None = None,
        connect_timeout: float = 10.0,
        session_expiry_s: int = 300,
    ):
        parts = urlsplit(broker)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ClientError(f"broker {broker!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
        self.broker = broker
        self.client_id = client_id or f"edgebox-client-{uuid.uuid4().hex[:12]}"
        self.connect_timeout = connect_timeout
        self._host, self._port = parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self._session_expiry_s = session_expiry_s
        self._pending: dict[bytes, queue.SimpleQueue] = {}
        self._status: dict[str, dict] = {}
        self._state: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._answered = threading.Event()  # CONNACK came, accepted or not
        self._subscribed: dict[int, threading.Event] = {}
        self._refused: str | None = None
        self._followed: list[str] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if username or password:
            c.username_pw_set(username, password)
        if parts.scheme == "mqtts":
            c.tls_set(
                ca_certs=str(ca_file) if ca_file else None,
                certfile=str(cert_file) if cert_file else None,
                keyfile=str(key_file) if key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        c.reconnect_delay_set(0.2, 5)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c
        self.reply_filter = f"{API_PREFIX}/+/reply/{self.client_id}"

    # -- connection --------------------------------------------------------------------------------
    def connect(self) -> FleetClient:
        props = Properties(PacketTypes.CONNECT)
        # a short persistent session, so replies survive a broker restart in the middle of a stream.
        # clean_start=False from the first connect: Mosquitto does not persist a session that began
        # with clean start (our client id is fresh, so there is no stale session to resume)
        props.SessionExpiryInterval = self._session_expiry_s
        try:
            self.client.connect(self._host, self._port, keepalive=30, clean_start=False, properties=props)
        except OSError as e:
            raise ClientError(f"cannot reach broker {self.broker}: {e.strerror or e}") from None
        self.client.loop_start()
        self._answered.wait(self.connect_timeout)
        if not self._connected.is_set():
            self.close()
            raise ClientError(
                self._refused or f"broker {self.broker} did not accept the connection within {self.connect_timeout:g} s"
            )
        self._subscribe(self.reply_filter)
        return self

    def close(self) -> None:
        # end the session: a CLI run leaves nothing queued at the broker
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        try:
            self.client.disconnect(properties=props)
        finally:
            self.client.loop_stop()

    def __enter__(self) -> FleetClient:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def _subscribe(self, topic: str) -> None:
        done = threading.Event()
        with self._lock:
            rc, mid = self.client.subscribe(topic, qos=1)
            self._subscribed[mid] = done
        if not done.wait(self.connect_timeout):
            raise ClientError(f"broker {self.broker} did not confirm the subscription to {topic}")
        if self._refused:
            raise ClientError(self._refused)

    # -- commands ------------------------------------------------------------------------------------
    def call(
        self,
        device: str,
        method: str,
        params: dict | None = None,
        *,
        timeout: float = 60.0,
        on_chunk: Callable[[dict], None] | None = None,
        request_id: str | None = None,
        expiry_s: int | None = None,
    ) -> dict:
        """Send a command and wait for its final reply (chunks go to ``on_chunk`` on this thread).
        Raises CommandFailed for an error reply, ClientError when nothing comes back in time."""
        final = self.call_raw(
            device, method, params, timeout=timeout, on_chunk=on_chunk, request_id=request_id, expiry_s=expiry_s
        )
        if final.get("status") != "ok":
            raise CommandFailed(final)
        return final

    def call_raw(
        self,
        device: str,
        method: str,
        params: dict | None = None,
        *,
        timeout: float = 60.0,
        on_chunk: Callable[[dict], None] | None = None,
        request_id: str | None = None,
        expiry_s: int | None = None,
    ) -> dict:
        """Like ``call`` but returns an error reply instead of raising."""
        topics = Topics(device)
        request_id = request_id or uuid.uuid4().hex
        correlation = request_id.encode()
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._pending[correlation] = inbox
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = topics.reply(self.client_id)
        props.CorrelationData = correlation
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        try:
            payload = json.dumps({"request_id": request_id, "params": params or {}})
            info = self.client.publish(topics.cmd(method), payload, qos=1, properties=props)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                raise ClientError("the outgoing queue is full")
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                try:
                    message = inbox.get(timeout=max(0.0, left)) if left > 0 else inbox.get_nowait()
                except queue.Empty:
                    raise ClientError(
                        f"no reply from {device} within {timeout:g} s; is it online? (edgebox client devices)"
                    ) from None
                if message.get("done"):
                    return message
                if on_chunk is not None:
                    on_chunk(message)
        finally:
            with self._lock:
                self._pending.pop(correlation, None)

    def devices(self, wait_s: float = 0.5) -> list[dict]:
        """Every device with a retained status (online or offline) and its retained state."""
        self._subscribe(f"{API_PREFIX}/+/status")
        self._subscribe(f"{API_PREFIX}/+/state")
        time.sleep(wait_s)  # retained messages follow the SUBACK; there is no end-of-retained marker
        with self._lock:
            names = sorted(self._status)
            return [{"device_id": d, **self._status[d], "device_state": self._state.get(d)} for d in names]

    def follow(self, topic_filter: str, callback: Callable) -> None:
        """Also receive ``topic_filter`` (retained messages included), handled by paho's
        ``callback(client, userdata, msg)`` on its network thread (the fleet controller)."""
        self.client.message_callback_add(topic_filter, callback)
        self._followed.append(topic_filter)
        self._subscribe(topic_filter)

    # -- paho callbacks --------------------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = f"broker {self.broker} refused the connection: {reason_code}"
            self._answered.set()
            return
        if self._connected.is_set():  # reconnect: the session may be gone
            client.subscribe(self.reply_filter, qos=1)
            for topic_filter in self._followed:
                client.subscribe(topic_filter, qos=1)
        self._connected.set()
        self._answered.set()

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        failed = [str(rc) for rc in reason_code_list if rc.is_failure]
        if failed:
            self._refused = f"broker {self.broker} refused a subscription: {', '.join(failed)} (check the ACL)"
        with self._lock:
            done = self._subscribed.pop(mid, None)
        if done is not None:
            done.set()

    def _on_message(self, client, userdata, msg) -> None:
        parts = msg.topic.split("/")
        if len(parts) == 4 and parts[3] in ("status", "state"):
            try:
                data = json.loads(msg.payload) if msg.payload else None
            except ValueError:
                return
            with self._lock:
                target = self._status if parts[3] == "status" else self._state
                if isinstance(data, dict):
                    target[parts[2]] = data
                else:
                    target.pop(parts[2], None)
            return
        correlation = getattr(msg.properties, "CorrelationData", None)
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if correlation is None and isinstance(data, dict) and isinstance(data.get("request_id"), str):
            correlation = data["request_id"].encode()
        with self._lock:
            inbox = self._pending.get(correlation)
        if inbox is not None and isinstance(data, dict):
            inbox.put(data)
