"""The commands in progress, kept in the state directory so that a restart can tell.

A command that kills the daemon (a hostile model file, a bug) would come back from the broker
after every restart for as long as the session lives: a crash loop. So the work lane writes a
command's key here before anything risky is done with it (render, tokenize, run, load) and
forgets it once its final reply has reached the broker. What a new run finds here is what the
last run was serving when it died: *suspects*, answered with an error and never run again.

The file is a log of ``+`` / ``-`` lines (one JSON object each), every one appended with a
single ``write``: a killed process leaves whole lines, and a torn last line (a power cut) is
skipped. When dead lines outnumber live ones it is rewritten through a temporary file and
``os.replace``, so it holds at most ``2 * max_entries + 64`` lines (~200 bytes each); past
``max_entries`` live keys the oldest is dropped. No fsync: the journal guards against a dying
process, whose writes the kernel keeps; a power cut that loses its tail only means those
commands run again, as they did before it existed. A journal that cannot be written logs one
warning and goes on in memory: it must never stop the box from serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("edgebox.daemon")


def default_state_dir(env: Mapping[str, str] = os.environ) -> Path:
    """systemd's ``StateDirectory=`` ($STATE_DIRECTORY, /var/lib/edgebox), else the XDG state home."""
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = Path(env["XDG_STATE_HOME"]) if env.get("XDG_STATE_HOME") else Path.home() / ".local" / "state"
    return base / "edgebox"


def journal_path(state_dir: Path, client_id: str) -> Path:
    """One file per MQTT session (redeliveries come from the session the client id names)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", client_id)[:64]
    return state_dir / f"in-progress-{safe}.jsonl"


def key_of(command_key: tuple) -> str:
    method, topic, correlation, request_id = command_key
    raw = json.dumps([method, topic, correlation.hex() if correlation else None, request_id])
    return hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()[:32]


class Journal:
    def __init__(self, path: Path | None, *, max_entries: int = 4096, max_age_s: float | None = None):
        self.path = path
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._live: dict[str, dict] = {}  # key -> {"t", "method", "request_id"}, oldest first
        self.suspects: dict[str, dict] = {}
        self._lines = 0
        self._fd: int | None = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._read(max_age_s)
                self._rewrite()
            except OSError as e:
                self._give_up(e)
        self.suspects = dict(self._live)
        if self.suspects:
            log.warning(
                "%d command(s) were in progress when the last run stopped (%s); they will be answered with an error if they come again",
                len(self.suspects),
                ", ".join(f"{m['method']} {m['request_id']!r}" for m in list(self.suspects.values())[:5]),
            )

    def suspect(self, key: str) -> dict | None:
        """What the last run recorded about ``key`` if it died serving it."""
        with self._lock:
            return self.suspects.get(key)

    def add(self, key: str, method: str, request_id: str) -> None:
        entry = {"t": round(time.time(), 3), "method": method, "request_id": request_id}
        with self._lock:
            if key in self._live:
                return
            while len(self._live) >= self.max_entries:
                old = next(iter(self._live))
                log.warning("in-progress journal full (%d): forgetting %s", self.max_entries, self._live[old]["request_id"])
                self._drop(old)
            self._live[key] = entry
            self._append({"op": "+", "key": key, **entry})

    def remove(self, key: str) -> None:
        with self._lock:
            if key in self._live:
                self._drop(key)
                if self._lines > 2 * len(self._live) + 64:
                    self._rewrite()

    def __len__(self) -> int:
        return len(self._live)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- the file (under the lock) ----------------------------------------------------------------
    def _drop(self, key: str) -> None:
        del self._live[key]
        self.suspects.pop(key, None)
        self._append({"op": "-", "key": key})

    def _append(self, record: dict) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, (json.dumps(record, ensure_ascii=True) + "\n").encode())
            self._lines += 1
        except OSError as e:
            self._give_up(e)

    def _read(self, max_age_s: float | None) -> None:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return
        now = time.time()
        for line in lines:
            try:
                r = json.loads(line)
                key = r["key"]
                if r["op"] == "+":
                    self._live[key] = {"t": float(r["t"]), "method": str(r["method"]), "request_id": str(r["request_id"])}
                else:
                    self._live.pop(key, None)
            except (ValueError, KeyError, TypeError):
                continue  # a torn line: skip it
        if max_age_s is not None:  # the broker has forgotten these with the session
            self._live = {k: v for k, v in self._live.items() if now - v["t"] <= max_age_s}
        while len(self._live) > self.max_entries:
            del self._live[next(iter(self._live))]

    def _rewrite(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            text = "".join(json.dumps({"op": "+", "key": k, **v}, ensure_ascii=True) + "\n" for k, v in self._live.items())
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                data = memoryview(text.encode())
                while data:
                    data = data[os.write(fd, data) :]
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            if self._fd is not None:
                os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            self._lines = len(self._live)
        except OSError as e:
            self._give_up(e)

    def _give_up(self, e: OSError) -> None:
        log.warning(
            "cannot write the in-progress journal %s (%s): going on without it; a command that crashes the box may be run again after a restart",
            self.path,
            e.strerror or e,
        )
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd, self.path = None, None
