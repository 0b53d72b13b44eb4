"""The HTTP API's server: uvicorn on a thread of the daemon, on a socket we bind ourselves.

Binding first (not inside uvicorn) turns "address in use" or "permission denied" into one
clear line before the model loads, and lets port 0 pick a free port (the bound one is ``url``).
The body limit is an ASGI middleware that reads the body before the app does: a body over the
limit is a 413 without being parsed; the app then reads the buffered body, and later reads go
to the client's connection again (Starlette sees a disconnect there). A body posted without a
JSON content type (``curl -d``) is read as JSON, as llama-server does.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

from edgebox.errors import EdgeboxError

log = logging.getLogger("edgebox.daemon.http")


class BodyLimit:
    """ASGI middleware: 413 in OpenAI's error shape for a body over ``limit`` bytes."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send, int(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._too_large(send, size)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type" or b"json" in v]
        if len(headers) != len(scope["headers"]) or not any(k == b"content-type" for k, _ in headers):
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send, size: int) -> None:
        from edgebox.daemon.openai_responses import error_body

        message = f"the request body has {'at least ' if size > self.limit else ''}{size} bytes; the limit is {self.limit} (http_max_body_bytes)"
        payload = json.dumps(error_body(message, "invalid_request_error", "request_too_large")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class HttpServer:
    """``start()`` binds and serves on a thread; ``stop()`` closes the listener and ends it."""

    def __init__(
        self, app, host: str, port: int, *, ssl_cert: str | None = None, ssl_key: str | None = None, max_connections: int = 1024
    ):
        import uvicorn

        self.host, self.tls = host, ssl_cert is not None
        self.sock = _bind(host, port)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            ssl_certfile=ssl_cert,
            ssl_keyfile=ssl_key,
            limit_concurrency=max_connections,  # connections + tasks past it get uvicorn's 503
            timeout_graceful_shutdown=5,
        )
        try:
            config.load()  # reads the TLS files now: a bad one is an error before the model loads
        except (OSError, ValueError) as e:
            self.sock.close()
            raise EdgeboxError(f"cannot set up HTTPS with {ssl_cert} / {ssl_key}: {e}") from None
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="edgebox-http", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise EdgeboxError(f"the HTTP server on {self.url} did not start: {self.error or 'timed out'}")
            time.sleep(0.01)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as e:  # SystemExit from uvicorn's startup included
            self.error = e
            log.error("the HTTP server stopped: %s", e)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise EdgeboxError(
            f"cannot listen on {host}:{port} for HTTP: {e.strerror or e}; choose another --http HOST:PORT or --http none"
        ) from None
    sock.set_inheritable(True)
    return sock
