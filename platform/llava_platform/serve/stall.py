"""A client that stops reading must not keep its row decoding: an ASGI middleware for Serve's HTTP proxy.

Serve's proxy pulls a response from the replica only as fast as it can write it to the client, but the
replica side never waits: what a stalled client does not read piles up in the proxy (the Gateway's
``send`` only appends to a queue), and the row decodes to ``max_tokens``, holding its place in the
decode batch. :class:`StallGuard` wraps the proxy's ASGI app and does two things per response:

- it bounds what may wait unsent for one client: the connection's kernel send buffer and the
  proxy's transport buffer are both set to ``send_buffer_bytes`` (on loopback the kernel would
  otherwise autotune up to 4 MB, more than a whole answer, and writes would never wait);
- when one write has waited ``timeout_s`` (those buffers and the client's receive window are full:
  the client has read nothing for that long), it gives the client up: the connection is aborted and
  the proxy is told the client disconnected. Serve then cancels the request exactly as for a closed
  connection: the Gateway's stream ends and the LanguageModel frees the row at its next decode step
  (counted in its ``cancelled`` rows), and the stall is counted in ``ray_llava_stalled_streams_total``.

A client that reads, however slowly, is never cut as long as each write completes within
``timeout_s``. The client sees its answer end without ``data: [DONE]`` (the connection is reset).

Install it on every node's proxy through the environment Ray starts with (the cluster files, the image
and the demo do)::

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=llava_platform.serve.stall:proxy_middlewares
    LLAVA_STREAM_STALL_TIMEOUT_S=10        # optional; the default is 10
    LLAVA_STREAM_SEND_BUFFER_BYTES=16384   # optional; the default is 16384
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from typing import Any, Awaitable, Callable

IMPORT_PATH = "llava_platform.serve.stall:proxy_middlewares"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # Serve's own variable
TIMEOUT_ENV = "LLAVA_STREAM_STALL_TIMEOUT_S"
BUFFER_ENV = "LLAVA_STREAM_SEND_BUFFER_BYTES"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_BUFFER_BYTES = 16384
STALLED_METRIC = "llava_stalled_streams"  # on Ray's endpoint: ray_llava_stalled_streams_total
DISCONNECT = {"type": "http.disconnect"}

logger = logging.getLogger(__name__)


def transport_of(send: Callable) -> Any:
    """The transport behind an ASGI server's ``send``, where the server exposes it (uvicorn's ``send``
    is a method of its per-request cycle object, which holds ``transport``: an asyncio or a uvloop
    one, so it is recognised by its methods); else None."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    needed = ("get_extra_info", "set_write_buffer_limits", "abort")
    return transport if all(callable(getattr(transport, m, None)) for m in needed) else None


def bound_send_buffers(transport: Any, size: int) -> None:
    """Let at most about ``size`` bytes wait in the kernel and ``size`` in the transport for this
    connection (a fixed SO_SNDBUF also turns the kernel's autotuning off for it)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError as e:  # not a TCP socket (a Unix socket in front of a test server): keep its buffer
            logger.debug("could not set SO_SNDBUF: %s", e)
    transport.set_write_buffer_limits(high=size)


class StallGuard:
    """Pure ASGI middleware: an HTTP response whose client accepts nothing for ``timeout_s`` is ended
    as if the client had disconnected (the connection is aborted, ``receive`` answers
    ``http.disconnect``, later sends are dropped). ``on_stall(path)`` is called once per such response.
    Behind a server that does not expose its transport only the timeout applies (no buffer bound)."""

    def __init__(self, app: Any, timeout_s: float = DEFAULT_TIMEOUT_S,
                 send_buffer_bytes: int = DEFAULT_BUFFER_BYTES, on_stall: Callable[[str], None] | None = None):
        if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < math.inf):
            raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {timeout_s!r}")
        if not (isinstance(send_buffer_bytes, int) and send_buffer_bytes >= 1024):
            raise ValueError(f"{BUFFER_ENV} must be a whole number of bytes >= 1024, got {send_buffer_bytes!r}")
        self.app, self.timeout_s, self.send_buffer_bytes = app, float(timeout_s), send_buffer_bytes
        self.on_stall = on_stall

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        transport = transport_of(send)
        if transport is not None:
            bound_send_buffers(transport, self.send_buffer_bytes)
        stalled = asyncio.Event()
        path = scope.get("path", "")

        async def guarded_send(message: dict) -> None:
            if stalled.is_set():
                return
            try:
                await asyncio.wait_for(send(message), self.timeout_s)
            except asyncio.TimeoutError:
                stalled.set()
                logger.warning("%s: the client read nothing for %g s; ending its response as disconnected",
                               path, self.timeout_s)
                if transport is not None:
                    transport.abort()  # frees the buffered output now (close() would wait for the client)
                if self.on_stall is not None:
                    self.on_stall(path)

        async def guarded_receive() -> dict:
            if stalled.is_set():
                return DISCONNECT
            got, gave_up = asyncio.ensure_future(receive()), asyncio.ensure_future(stalled.wait())
            try:
                await asyncio.wait({got, gave_up}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gave_up.cancel()
                if not got.done():
                    got.cancel()
            return got.result() if got.done() and not got.cancelled() else DISCONNECT

        await self.app(scope, guarded_receive, guarded_send)


def _number_from_env(name: str, default: float, kind: type, lowest: float, what: str) -> Any:
    raw = os.environ.get(name, "")
    if not raw.strip():
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not lowest <= value < math.inf:
        raise ValueError(f"{name} must be {what}, got {raw!r}")
    return value


def settings_from_env() -> tuple[float, int]:
    """``(timeout_s, send_buffer_bytes)`` from ``LLAVA_STREAM_STALL_TIMEOUT_S`` (default 10) and
    ``LLAVA_STREAM_SEND_BUFFER_BYTES`` (default 16384); a bad value is refused with the variable's name."""
    timeout = _number_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, float, 1e-3, "a positive number of seconds")
    size = _number_from_env(BUFFER_ENV, DEFAULT_BUFFER_BYTES, int, 1024, "a whole number of bytes >= 1024")
    return timeout, size


def installed() -> bool:
    """Whether this process's environment installs the guard in Serve's proxy (Gateway replicas share the
    environment of the node that runs them, set where Ray was started)."""
    return os.environ.get(CALLBACK_ENV, "") == IMPORT_PATH


def proxy_middlewares() -> list:
    """Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the stall guard,
    counting stalled responses in ``ray_llava_stalled_streams_total`` on the node's metrics endpoint."""
    from ray.util.metrics import Counter
    from starlette.middleware import Middleware

    timeout_s, size = settings_from_env()
    counter = Counter(STALLED_METRIC, description="HTTP responses ended because the client read nothing "
                      f"for {TIMEOUT_ENV} seconds")
    return [Middleware(StallGuard, timeout_s=timeout_s, send_buffer_bytes=size,
                       on_stall=lambda path: counter.inc())]
