"""sd_notify: tell systemd how the service is doing, over the ``NOTIFY_SOCKET`` datagram socket.

The protocol is a few lines (sd_notify(3)): send ``KEY=VALUE`` lines as one datagram to the
AF_UNIX socket named by ``$NOTIFY_SOCKET``; a leading '@' names an abstract socket (the '@'
becomes a NUL byte). Written here rather than taken from an unmaintained package.

``WATCHDOG_USEC`` (set by systemd from ``WatchdogSec=``) is how often systemd expects
``WATCHDOG=1``; we ping at half that, from the service's main loop, so a wedged loop stops the
pings and systemd restarts us. ``WATCHDOG_PID``, when set, must be our pid.
Without ``NOTIFY_SOCKET`` (not under systemd) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("edgebox.daemon")


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ):
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_interval_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as e:  # systemd gone or a bad address: report once, never stop serving
            if not self._warned:
                log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), e.strerror or e)
                self._warned = True
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload; older ones ignore it
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # e.g. vsock: addresses (systemd >= 254 in VMs): not supported here; say so rather than guess
    log.warning("NOTIFY_SOCKET=%s is not a path or an abstract socket; sd_notify disabled", value)
    return None
