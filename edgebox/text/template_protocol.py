"""What the template worker and its parent say to each other over a pipe: length-prefixed JSON.

One frame is a 4-byte big-endian length and that many bytes of JSON in UTF-8, lone surrogates
passed through (a prompt may hold one; they survive both ways). A request is ``{"template",
"context"}``; a reply is ``{"kind", "text"}`` where ``kind`` says how the render ended and
``text`` is the prompt (``OK``) or a one-line message. JSON rather than pickle: the parent never
unpickles what a process running untrusted templates wrote.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time

OK = "ok"  # text is the rendered prompt
RAISED = "raised"  # the template's own raise_exception(...): a verdict on the messages, not a fault
FAILED = "failed"  # it does not parse, or fails while rendering
LIMIT = "limit"  # it passed a bound (time, memory, output size, recursion) or crashed the worker
READY = "ready"  # the worker's first frame: limits set, requests welcome

_HEADER = struct.Struct(">I")


def encode(obj: object) -> bytes:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return _HEADER.pack(len(body)) + body


def write_frame(fd: int, frame: bytes) -> None:
    view = memoryview(frame)
    while view:
        view = view[os.write(fd, view) :]


def read_frame(fd: int, max_bytes: int, deadline: float | None = None) -> object:
    """The next frame's JSON value. ``EOFError``: the other side is gone; ``TimeoutError``:
    ``deadline`` (``time.monotonic()``) passed; ``ValueError``: longer than ``max_bytes``."""
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    if size > max_bytes:
        raise ValueError(f"a frame of {size} bytes, more than {max_bytes}")
    return json.loads(_read_exact(fd, size, deadline).decode("utf-8", "surrogatepass"))


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            left_ms = (deadline - time.monotonic()) * 1000.0
            if left_ms <= 0 or not poller.poll(max(1, int(left_ms))):
                raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)
