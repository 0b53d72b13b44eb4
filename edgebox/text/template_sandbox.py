"""Chat templates rendered in a child process that a hostile template cannot take down with it.

A GGUF's template is untrusted code: Jinja's sandbox stops attribute escapes but not CPU, memory
or output, and one C-level call (``'x' * 10**9``, ``9**(9**9)`` folded while compiling) can neither
be counted nor interrupted in-process. So every compile and render runs in one persistent worker
(``template_worker``) under process limits, and the parent waits on a wall-clock deadline: past
it the worker is killed and the next render starts a new one. The parent never imports Jinja.

One worker per ``TemplateRenderer``, started at the first render and shared by every thread, one
render at a time (renders take well under a millisecond; a hostile one holds the others up to
``RENDER_SECONDS``). After a limit is hit, or a crash, the worker is replaced; a forked child
starts its own instead of writing into its parent's pipes.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

from edgebox.errors import EdgeboxError
from edgebox.text.template_protocol import FAILED, LIMIT, READY, encode, read_frame, write_frame

# The real templates render a conversation in well under a millisecond and the longest prompt
# (MAX_PROMPT_CHARS) in tenths of a second; a second leaves room for the engine's threads on every
# core, and bounds how long a hostile template holds the renderer and how long a refusal takes.
RENDER_SECONDS = 1.0
# Backstop in the worker itself (whole seconds, RLIMIT_CPU): ends a render even if the parent is gone.
CPU_SECONDS = 2
# The prompt is at most MAX_PROMPT_CHARS and the messages a few times that: a few MiB; a bomb's
# 'x'*100000*1000*3 needs 400 MiB. Small beside the model's weights.
MEMORY_BYTES = 128 << 20
# The longest context of the models the box runs (131072 tokens, DeepSeek-R1-Distill-Qwen) holds
# about half a million characters: a longer prompt could never be used.
MAX_PROMPT_CHARS = 1 << 20
# A request (template + messages as JSON) of the longest prompt: up to 6 bytes a character (a
# control character's \uXXXX escape), with room for the keys.
MAX_REQUEST_BYTES = 8 << 20
# Python and Jinja starting on a loaded box with a cold disk cache; no template runs yet.
START_SECONDS = 30.0

_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds the edgebox package
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from edgebox.text.template_worker import main; main(sys.argv[2:])"
_RENDERERS: weakref.WeakSet[TemplateRenderer] = weakref.WeakSet()


class TemplateRenderer:
    def __init__(self, seconds: float = RENDER_SECONDS, memory_bytes: int = MEMORY_BYTES, max_chars: int = MAX_PROMPT_CHARS):
        self.seconds, self.memory_bytes, self.max_chars = seconds, memory_bytes, max_chars
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        _RENDERERS.add(self)

    def render(self, template: str, context: dict) -> tuple[str, str]:
        """``(kind, text)``: the prompt (``OK``) or a one-line message (kinds of ``template_protocol``).
        Raises ``EdgeboxError`` only when no worker can be started at all."""
        try:
            frame = encode({"template": template, "context": context})
        except (TypeError, ValueError, RecursionError) as e:
            return FAILED, f"the messages are not plain JSON values ({type(e).__name__}: {str(e)[:200]})"
        if len(frame) > MAX_REQUEST_BYTES:
            return LIMIT, f"the template and messages take {len(frame) >> 20} MiB, more than any prompt can hold"
        with self._lock:
            proc = self._running()
            try:
                write_frame(proc.stdin.fileno(), frame)
                reply = read_frame(proc.stdout.fileno(), 6 * self.max_chars + 4096, time.monotonic() + self.seconds)
            except TimeoutError:
                self._stop()
                return LIMIT, f"chat template ran longer than {self.seconds:g} s (a loop without end?)"
            except (EOFError, OSError, ValueError):
                code = self._stop()
                return LIMIT, f"chat template crashed its renderer (exit status {code})"
            except BaseException:  # Ctrl-C mid-render: its reply must not answer the next request
                self._stop()
                raise
            if reply["kind"] == LIMIT:
                self._stop()  # a MemoryError leaves the worker exiting; start the next one afresh
            return reply["kind"], reply["text"]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _running(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop()
        args = ["--memory", self.memory_bytes, "--cpu", CPU_SECONDS, "--max-chars", self.max_chars]
        args += ["--max-request", MAX_REQUEST_BYTES]
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, _ROOT, *map(str, args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # the terminal's Ctrl-C goes to the parent, which owns it
            )
        except OSError as e:
            raise EdgeboxError(f"cannot start the chat template renderer: {e}") from None
        self._proc = proc
        try:
            ready = read_frame(proc.stdout.fileno(), 4096, time.monotonic() + START_SECONDS)
        except (TimeoutError, EOFError, OSError, ValueError) as e:
            code = self._stop()
            raise EdgeboxError(
                f"cannot start the chat template renderer ({type(e).__name__}, exit status {code}); check that jinja2 is installed"
            ) from None
        if ready["kind"] != READY:
            self._stop()
            raise EdgeboxError(f"the chat template renderer {ready['text']}; it does not run templates without them")
        return proc

    def _stop(self) -> int | None:
        """End the worker (if any) and forget it; its exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        for pipe in (proc.stdin, proc.stdout):
            pipe.close()
        return proc.wait()

    def _forget_after_fork(self) -> None:
        # the forked child shares the parent's pipes: close its copies, leave the worker to the parent
        self._lock = threading.Lock()
        proc, self._proc = self._proc, None
        if proc is not None:
            for pipe in (proc.stdin, proc.stdout):
                pipe.close()
            proc.returncode = 0  # not this process's child: never wait for it


def _after_fork_in_child() -> None:
    for r in list(_RENDERERS):
        r._forget_after_fork()


def _close_all() -> None:
    for r in list(_RENDERERS):
        r.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all)

RENDERER = TemplateRenderer()
