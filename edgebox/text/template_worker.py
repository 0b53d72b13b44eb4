"""The chat-template worker: a child process that compiles and renders templates under limits.

Started by ``template_sandbox`` as ``python -c ... --memory B --cpu S --max-chars N``. It imports
Jinja, then limits itself: address space to what it uses now plus ``B`` bytes (a string or list
multiplication past it is a ``MemoryError``, after which the worker reports and exits to start
afresh), CPU seconds to ``S`` more per request (a backstop: the parent kills it on its wall-clock
deadline first; this one ends it even when the parent is gone), no core dumps and no file
writes; if it cannot (a seccomp filter that denies ``prlimit64``) it says so and exits rather
than render unbounded. Then it answers frames on stdin/stdout until stdin closes. SIGINT is
ignored (the parent owns Ctrl-C); every exception is a reply, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys

from edgebox.text import chat_jinja
from edgebox.text.template_protocol import FAILED, LIMIT, READY, encode, read_frame, write_frame

EXIT_AFTER_FAULT = 3


def _limit_self(memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    with open("/proc/self/statm") as f:  # first field: the address space in pages
        in_use = int(f.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = in_use + memory_bytes
    cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # the hard limit too: nothing in the worker raises it again


def _allow_cpu(seconds: int) -> None:
    """CPU time is counted over the process's life: each request gets ``seconds`` more."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(used.ru_utime + used.ru_stime) + 1 + seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ap = argparse.ArgumentParser(prog="template_worker")
    ap.add_argument("--memory", type=int, required=True)
    ap.add_argument("--cpu", type=int, required=True)
    ap.add_argument("--max-chars", type=int, required=True)
    ap.add_argument("--max-request", type=int, required=True)
    args = ap.parse_args(argv)
    chat_jinja.render("{{ x }}", {"x": ""}, 1)  # Jinja's lazy imports and caches, before the limit
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    try:
        _limit_self(args.memory)
        _allow_cpu(args.cpu)
    except OSError as e:  # a seccomp filter that denies prlimit64, say: refuse to run unbounded
        write_frame(stdout, encode({"kind": FAILED, "text": f"cannot set its resource limits: {e}"}))
        return
    write_frame(stdout, encode({"kind": READY, "text": ""}))
    while True:
        try:
            request = read_frame(stdin, args.max_request)
        except EOFError:
            return
        except MemoryError:
            _last_word(stdout, f"the chat request needed more than {args.memory >> 20} MiB of memory")
        except Exception as e:  # a frame the parent should never send: the stream is out of step
            _last_word(stdout, f"the chat request could not be read: {type(e).__name__}")
        _allow_cpu(args.cpu)
        try:
            kind, text = chat_jinja.render(request["template"], request["context"], args.max_chars)
        except MemoryError:
            _last_word(stdout, f"chat template needed more than {args.memory >> 20} MiB of memory")
        write_frame(stdout, encode({"kind": kind, "text": text}))


def _last_word(stdout: int, message: str) -> None:
    """Reply, then exit: after a MemoryError or a broken frame the parent starts a fresh worker."""
    write_frame(stdout, encode({"kind": LIMIT, "text": message}))
    os._exit(EXIT_AFTER_FAULT)


if __name__ == "__main__":
    main(sys.argv[1:])
