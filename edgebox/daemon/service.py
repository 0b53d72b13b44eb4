"""The daemon's main loop: listen on HTTP -> load the model -> warm engine -> connect -> READY=1 -> serve.

* The HTTP API (OpenAI-compatible) listens first, so ``/health`` answers 503 "loading" while the
  model loads; MQTT and HTTP then share the one engine. ``broker = none``: HTTP only.
* READY=1 only once the model is loaded *and* the broker has confirmed our subscription.
* The main thread owns WATCHDOG=1 (not a free-running thread): each tick checks that the
  control lane turns and the work lane is not stuck on one command before pinging, so a wedged
  daemon is restarted by systemd (and the journal keeps the culprit from running again).
* Telemetry every ``telemetry_interval_s``; events as things happen; retained ``state``
  whenever it changes and on every (re)connect.
* SIGHUP re-reads the config (``RELOADING=1`` ... ``READY=1``); live settings apply at once.
* SIGTERM/SIGINT drain: new commands stay with the broker for the next run, running requests
  get ``drain_timeout_s`` to finish, the rest are cancelled with a final 503 reply; every final
  reply is delivered, status goes offline (retained), exit 0. A second signal skips the wait.
  HTTP answers new requests (and ``/health``) with 503 while draining; its open streams end with
  a final error event, then the listener closes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgebox.daemon.config import DaemonConfig, live_differences, load_config
from edgebox.daemon.engine_host import ModelHost
from edgebox.daemon.handlers import CommandHandler
from edgebox.daemon.journal import Journal, default_state_dir, journal_path
from edgebox.daemon.lanes import CONTROL_SLOTS, EXTRA_WORK_SLOTS
from edgebox.daemon.metrics import Metrics
from edgebox.daemon.notify import Notifier
from edgebox.daemon.power import BoxPower
from edgebox.daemon.schemas import UNAVAILABLE, Topics, encode
from edgebox.daemon.telemetry import TelemetrySampler, fleet_fields
from edgebox.daemon.transport import Transport
from edgebox.errors import EdgeboxError
from edgebox.kernels import packcache

log = logging.getLogger("edgebox.daemon")


class Service:
    def __init__(
        self, config_path: Path | None = None, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] = os.environ
    ):
        self.config_path, self.flags, self.env = config_path, dict(flags or {}), env
        self.cfg: DaemonConfig = load_config(config_path, self.flags, env)
        packcache.configure(self.cfg.weight_cache, self.cfg.weight_cache_gib)  # as the environment variables do
        self.power = BoxPower(self.cfg.budget, self.cfg.fw_root, self.cfg.governor, self.cfg.max_batch, env=env)
        self.budget_w = self.cfg.budget
        self.topics = Topics(self.cfg.device_id)
        self.notifier = Notifier(env)
        self.reloads = 0
        self.started_at = time.time()
        self.host = ModelHost(
            max_batch=self.cfg.max_batch,
            max_queue=self.cfg.in_flight_limit,
            kv_budget_bytes=self.cfg.kv_budget_bytes,
            power=self.power,
            backend=self.cfg.backend,
            spec=(self.cfg.spec, self.cfg.draft_max, self.cfg.model_draft),
            cache_types=(self.cfg.cache_type_k, self.cfg.cache_type_v),
        )
        self.telemetry = TelemetrySampler(self.power.fw_root)
        self.last_telemetry: dict | None = None
        self.metrics = Metrics(engine=self.host.stats, power=self.power.status, chips=self._chips_now)
        self.http = None  # HttpServer, when cfg.http is not none
        self.http_open = None  # the HTTP app's OpenRequests
        self._loaded_once = False
        self._wake = threading.Event()
        self._stop_signals = 0
        self._reload_requested = False
        self._draining = False
        self._stopped = False
        self.transport: Transport | None = None
        self.handler: CommandHandler | None = None
        self.journal: Journal | None = None

    # -- the DaemonServices interface the handlers use ---------------------------------------------
    def set_budget(self, watts: float) -> dict:
        enforced = self.power.enforced
        self.power.set_budget(watts)  # ValueError -> 400
        self.budget_w = watts
        log.info("power budget set to %.3g W (%s)", watts, "enforced" if enforced else "recorded")
        self.publish_event("budget_changed", budget_w=watts, enforced=enforced)
        self.publish_state()
        result = {"budget_w": watts, "enforced": enforced}
        if not enforced:
            result["note"] = "the power governor is off (governor = false): the budget is recorded in state, not enforced"
        return result

    def publish_event(self, kind: str, **fields) -> None:
        if self.transport is not None:
            self.transport.publish_json(
                self.topics.event, {"event": kind, "ts": time.time(), "device_id": self.cfg.device_id, **fields}
            )

    def publish_state(self) -> None:
        if self.transport is not None:
            self.transport.publish_json(self.topics.state, self.state(), retain=True)

    def state(self) -> dict:
        from edgebox import __version__

        cfg = self.cfg
        public = cfg.public()
        return {
            "device_id": cfg.device_id,
            "state": "stopped" if self._stopped else "draining" if self._draining else self.host.state,
            "model": self.host.info,
            "budget_w": self.budget_w,
            "budget_enforced": self.power.enforced,
            "chips": cfg.chips,
            "config": {
                "version": cfg.config_version,
                "path": str(self.config_path) if self.config_path else None,
                "sha256": hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:16],
                "reloads": self.reloads,
            },
            "limits": {
                "max_in_flight": cfg.in_flight_limit,
                "max_payload_bytes": cfg.max_payload_bytes,
                "max_tokens": cfg.max_tokens_limit,
                "max_batch": cfg.max_batch,
            },
            "version": __version__,
            "ts": time.time(),
        }

    def unavailable_reason(self) -> str | None:
        """Why requests cannot run now (HTTP 503, ``/health``), or None."""
        if self._draining or self._stopped:
            return "the box is shutting down"
        if self.host.state == "loading" or (self.host.state == "unloaded" and not self._loaded_once):
            return "loading the model; retry in a few seconds"
        if self.host.state != "ready":
            return "no model is loaded (load one with the MQTT load_model command)"
        return None

    def _chips_now(self) -> list[dict]:
        from edgebox.power.status import chip_status

        root = self.power.fw_root
        try:
            return chip_status(root) if root is not None else []
        except EdgeboxError:
            return []

    def _in_flight(self) -> int:
        return (self.handler.in_flight if self.handler else 0) + (len(self.http_open) if self.http_open is not None else 0)

    def status(self) -> dict:
        h = self.handler
        return {
            **self.state(),
            "http": {"url": self.http.url, "in_flight": len(self.http_open)} if self.http else None,
            "uptime_s": round(time.time() - self.started_at, 1),
            "engine": self.host.stats(),
            "in_flight": h.in_flight if h else 0,
            "waiting": h.lanes.depths() if h else {},
            "control_latency": h.control_latency.summary() if h else {},
            "counters": dict(h.counters) if h else {},
            "journal": len(self.journal) if self.journal is not None else 0,
            "power": self.power.status(),
            "telemetry": self.last_telemetry,
            "settings": self.cfg.public(),
        }

    # -- lifecycle -----------------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        configure_logging(cfg.log_level)
        self._install_signals()
        log.info("edgebox daemon %s starting (pid %d)", cfg.device_id, os.getpid())
        try:
            if cfg.http_host_port is not None:
                self._start_http()
            self.notifier.status(f"loading model {cfg.model or 'default'}")
            info = self.host.load(cfg.model, cfg.chips, cfg.ctx)
            self._loaded_once = True
            log.info("model %s loaded and warm (%.2f s load, %.2f s warm-up)", info["name"], info["load_s"], info["warmup_s"])
            where = [w for w in (self.http.url if self.http else None, cfg.broker if cfg.has_broker else None) if w]
            if cfg.has_broker:
                self._connect()
                while not self.transport.subscribed.is_set():
                    if self.transport.fatal:
                        raise EdgeboxError(self.transport.fatal)
                    if self._stop_signals:
                        return self._shutdown()
                    self._wake.wait(self._tick_s(5.0))
                    self._wake.clear()
                    self.notifier.watchdog()  # loading and connecting is progress too
            self.notifier.ready(f"serving {info['name']} as {cfg.device_id} on {' and '.join(where)}")
            log.info("ready: serving %s as %s on %s", info["name"], cfg.device_id, " and ".join(where))
            self._serve()
            code = self._shutdown()
            if self.transport is not None and self.transport.fatal:  # e.g. the ACL changed: let systemd restart us
                raise EdgeboxError(self.transport.fatal)
            return code
        except BaseException:
            self._abort()
            raise

    def _start_http(self) -> None:
        from edgebox.daemon.http_app import create_app
        from edgebox.daemon.http_server import BodyLimit, HttpServer

        cfg = self.cfg
        host, port = cfg.http_host_port
        app = create_app(self, cfg.resolved_api_key(self.env))
        if cfg.cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            app.add_middleware(
                CORSMiddleware,
                allow_origins=cfg.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        self.http_open = app.state.open
        self.http = HttpServer(
            BodyLimit(app, cfg.http_max_body_bytes),
            host,
            port,
            ssl_cert=str(cfg.ssl_cert_file) if cfg.ssl_cert_file else None,
            ssl_key=str(cfg.ssl_key_file) if cfg.ssl_key_file else None,
            max_connections=cfg.in_flight_limit + 64,
        )
        self.http.start()
        log.info("HTTP API on %s (OpenAI-compatible: /v1/chat/completions, /v1/completions; /health, /metrics)", self.http.url)

    def _connect(self) -> None:
        """Open the broker connection; the handlers serve MQTT commands from here on."""
        cfg = self.cfg
        # what the last run was serving when it died (see journal): answered, never run again
        self.journal = Journal(
            journal_path(default_state_dir(self.env), cfg.mqtt_client_id),
            max_entries=max(4096, 2 * cfg.in_flight_limit),
            max_age_s=cfg.session_expiry_s,
        )
        password = cfg.resolved_password(self.env)
        online = {"state": "online", "device_id": cfg.device_id, "pid": os.getpid(), "since": time.time()}
        self.transport = Transport(
            cfg,
            self.topics,
            password=password,
            on_inbound=self._on_inbound,
            on_connected=lambda session_present: self._on_connected(online),
            will_payload=encode({"state": "offline", "device_id": cfg.device_id, "reason": "connection lost"}),
            receive_maximum=_receive_maximum(cfg),
        )
        self.handler = CommandHandler(self, self.transport, self.host, self.topics, self.journal)
        self.handler.start()
        self.notifier.status(f"connecting to {cfg.broker}")
        log.info("connecting to %s as %s", cfg.broker, cfg.mqtt_client_id)
        self.transport.start(self._wake.set)

    def _serve(self) -> None:
        next_telemetry = time.monotonic()
        while not self._stop_signals and not (self.transport is not None and self.transport.fatal):
            now = time.monotonic()
            if now >= next_telemetry:
                self._publish_telemetry()
                next_telemetry = now + self.cfg.telemetry_interval_s
            if self.notifier.watchdog_interval_s is not None and self._healthy():
                self.notifier.watchdog()
            self._wake.wait(self._tick_s(max(0.0, next_telemetry - time.monotonic())))
            self._wake.clear()
            if self._reload_requested:
                self._reload_requested = False
                self._reload()

    def _tick_s(self, until_next: float) -> float:
        wd = self.notifier.watchdog_interval_s
        return min(until_next, wd if wd is not None else until_next, 5.0)

    def _healthy(self) -> bool:
        """Ping the watchdog only if the lanes still turn (see ``CommandHandler.healthy``) and
        the HTTP server still runs."""
        if self.http is not None and not self.http.alive:
            return False
        return self.handler.healthy() if self.handler is not None else self.http is not None

    def _shutdown(self) -> int:
        cfg = self.cfg
        self._draining = True
        self.notifier.stopping("draining")
        log.info("stopping: draining %d requests in flight (up to %.0f s)", self._in_flight(), cfg.drain_timeout_s)
        if self.handler is not None:
            self.handler.start_draining()
            self.publish_state()
        deadline = time.monotonic() + cfg.drain_timeout_s
        while self._in_flight() and time.monotonic() < deadline and self._stop_signals < 2:
            self._wake.wait(0.1)
            self._wake.clear()
            self.notifier.watchdog()
        reason = "cancelled: the box is shutting down; send it again"
        cancelled = self.handler.cancel_all(UNAVAILABLE, reason) if self.handler is not None else 0
        cancelled += self.http_open.cancel_all(reason) if self.http_open is not None else 0
        if cancelled:
            log.info("cancelled %d requests still running", cancelled)
        deadline = time.monotonic() + 5.0
        while self._in_flight() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.http is not None:
            self.http.stop()
        if self.transport is not None:
            self._stopped = True
            self.publish_state()
            # never connected: nothing can be delivered; disconnected: the broker may come back in time
            if self.transport.ever_connected and not self.transport.wait_delivered(5.0):
                log.warning("%d replies not confirmed by the broker at exit", self.transport.pending_deliveries())
            self.transport.stop(encode({"state": "offline", "device_id": cfg.device_id, "reason": "shutdown"}))
        if self.handler is not None:
            self.handler.stop()
        if self.journal is not None:
            self.journal.close()
        self.host.close()
        self.notifier.status("stopped")
        log.info("stopped")
        return 0

    def _abort(self) -> None:
        """Startup failed: leave nothing running (the caller reports the error)."""
        if self.http is not None:
            self.http.stop(timeout=2.0)
        if self.transport is not None:
            try:
                self.transport.client.disconnect()
                self.transport.client.loop_stop()
            except Exception:
                pass
        self.host.close()

    # -- callbacks ---------------------------------------------------------------------------------
    def _on_inbound(self, inbound) -> None:
        self.handler.submit(inbound)

    def _on_connected(self, online: dict) -> None:
        """paho's network thread, on every (re)connect: announce ourselves again (the broker may
        have restarted without its retained messages)."""
        self.transport.publish_json(self.topics.status, online, retain=True)
        self.publish_state()

    def _publish_telemetry(self) -> None:
        power = self.power.status()
        try:
            sample, events = self.telemetry.sample(idle=bool(power.get("idle")))
        except Exception as e:  # a sensor problem must not stop serving
            log.warning("telemetry failed: %s", e)
            return
        handler = self.handler
        engine = self.host.stats()
        sample.update(
            {
                "device_id": self.cfg.device_id,
                "engine": engine,
                "batch": engine["running"] if engine else 0,
                "queue": engine["queued"] if engine else 0,
                "tokens_per_s": engine["tokens_per_s"] if engine else 0.0,
                "in_flight": handler.in_flight if handler else 0,
                "budget_w": self.budget_w,
                "power": power,
                "fleet": fleet_fields(self.power.table(), self.budget_w),
            }
        )
        self.last_telemetry = sample
        if self.transport is not None:
            self.transport.publish_json(self.topics.telemetry, sample, qos=0)
        for kind, fields in events:
            self.publish_event(kind, **fields)

    # -- signals -------------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        def stop(signum, frame):
            self._stop_signals += 1
            self._wake.set()

        def reload(signum, frame):
            self._reload_requested = True
            self._wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _reload(self) -> None:
        self.notifier.reloading()
        old = self.cfg
        try:
            new = load_config(self.config_path, self.flags, self.env)
        except EdgeboxError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            self.publish_event("config_error", message=str(e))
            self.notifier.ready("reload failed; running configuration kept")
            return
        live, restart = live_differences(old, new)
        self.cfg = old.model_copy(update={k: getattr(new, k) for k in live})
        self.reloads += 1
        if "budget" in live:
            try:
                self.set_budget(new.budget)
            except ValueError as e:
                log.error("reload: budget %s W refused: %s", new.budget, e)
        if "max_in_flight" in live:
            self.host.set_max_queue(self.cfg.in_flight_limit)
            if self.transport and self.cfg.in_flight_limit + CONTROL_SLOTS > self.transport.receive_maximum:
                log.warning(
                    "max_in_flight %d: this connection's ReceiveMaximum (%d) lets the broker hold commands back; restart to apply fully",
                    self.cfg.in_flight_limit,
                    self.transport.receive_maximum,
                )
        if "max_payload_bytes" in live and self.transport:
            self.transport.payload_limit = new.max_payload_bytes
        if "log_level" in live:
            logging.getLogger("edgebox").setLevel(new.log_level.upper())
        log.info(
            "configuration reloaded: applied %s%s",
            ", ".join(live) or "nothing new",
            f"; restart to apply {', '.join(restart)}" if restart else "",
        )
        self.publish_event("config_reloaded", applied=live, restart_required=restart)
        self.publish_state()
        self.notifier.ready(f"reloaded ({len(live)} settings applied)")


def _receive_maximum(cfg: DaemonConfig) -> int:
    """QoS 1 commands the broker may hand us unacknowledged: every generate we may hold, plus
    the lanes' other slots, so nothing waits at the broker that the lanes could take."""
    return cfg.in_flight_limit + CONTROL_SLOTS + EXTRA_WORK_SLOTS


def configure_logging(level: str) -> None:
    # under journald (JOURNAL_STREAM set) the journal adds the time itself
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s %(levelname)s %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("edgebox")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def run_service(config_path: Path | None, flags: Mapping[str, Any]) -> int:
    return Service(config_path, flags).run()
