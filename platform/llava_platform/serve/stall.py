"""A client that stops reading must not keep its row decoding: an ASGI middleware for Serve's HTTP proxy.

Serve's proxy pulls a response from the replica only as fast as it can write it to the client, but the
replica side never waits: what a stalled client does not read piles up in the proxy (the Gateway's
``send`` only appends to a queue), and the row decodes to ``max_tokens``, holding its place in the
decode batch. :class:`StallGuard` wraps the proxy's ASGI app and, for each HTTP response:

- bounds what may wait unsent for a streamed answer (``text/event-stream``): the connection's kernel
  send buffer (``SO_SNDBUF``; the kernel doubles it) and the proxy's transport buffer are set to
  ``send_buffer_bytes`` (on loopback the kernel would otherwise autotune up to 4 MB, more than a whole
  answer, and writes would never wait); other responses keep the kernel's buffers;
- gives the client up when output has waited ``timeout_s`` with the client taking none of it (the
  transport's buffer has not shrunk): the connection is reset (``SO_LINGER`` 0, then abort, which also
  frees the kernel's buffer) and the proxy is told the client disconnected. Serve then cancels the
  request exactly as for a closed connection: the Gateway's stream ends and the LanguageModel frees the
  row at its next decode step (counted in its ``cancelled`` rows), and the stall is counted in
  ``ray_llava_stalled_streams_total``.

A client that keeps reading, however slowly, is never cut. Install it on every node's proxy through the
environment Ray starts with (the cluster files, the image and the demo do)::

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
import struct
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
    needed = ("get_extra_info", "set_write_buffer_limits", "get_write_buffer_size", "abort", "is_closing")
    return transport if all(callable(getattr(transport, m, None)) for m in needed) else None


def _writes_paused(send: Callable) -> bool:
    """Whether uvicorn's ``send`` would wait for the transport to drain (True when unknown)."""
    return getattr(getattr(getattr(send, "__self__", None), "flow", None), "write_paused", True)


def bound_send_buffers(transport: Any, size: int) -> None:
    """Let at most about ``size`` bytes wait in the transport and ``2 * size`` in the kernel for this
    connection (a fixed SO_SNDBUF also turns the kernel's autotuning off for it)."""
    if transport.is_closing():
        return
    try:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        transport.set_write_buffer_limits(high=size)
    except (OSError, RuntimeError) as e:  # closed meanwhile (uvloop raises RuntimeError), or not TCP
        logger.debug("could not bound the send buffers: %s", e)


def reset(transport: Any) -> None:
    """Drop the connection now: a TCP reset (SO_LINGER 0), so neither the proxy nor the kernel keeps
    the unread output of a client that may never read it."""
    try:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as e:
        logger.debug("could not set SO_LINGER: %s", e)
    transport.abort()


class StallGuard:
    """Pure ASGI middleware: an HTTP response whose client takes nothing of it for ``timeout_s`` is
    ended as if the client had disconnected (the connection is reset, ``receive`` answers
    ``http.disconnect``, later sends are dropped). ``on_stall(path)`` is called once per such response.
    Behind a server that does not expose its transport, a single write that waits ``timeout_s`` counts
    as the stall (and no buffer is bounded)."""

    def __init__(self, app: Any, timeout_s: float = DEFAULT_TIMEOUT_S,
                 send_buffer_bytes: int = DEFAULT_BUFFER_BYTES, on_stall: Callable[[str], None] | None = None):
        if not _valid_timeout(timeout_s):
            raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {timeout_s!r}")
        if not _valid_buffer(send_buffer_bytes):
            raise ValueError(f"{BUFFER_ENV} must be a whole number of bytes >= 1024, got {send_buffer_bytes!r}")
        self.app, self.timeout_s, self.send_buffer_bytes = app, float(timeout_s), send_buffer_bytes
        self.poll_s = min(max(self.timeout_s / 10, 0.01), 1.0)
        self.on_stall = on_stall

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        transport = transport_of(send)
        stalled = asyncio.Event()
        path = scope.get("path", "")

        def give_up() -> None:
            stalled.set()
            logger.warning("%s: the client took nothing for %g s; ending its response as disconnected",
                           path, self.timeout_s)
            if transport is not None:
                reset(transport)
            if self.on_stall is not None:
                try:
                    self.on_stall(path)
                except Exception:  # noqa: BLE001 - a metrics failure must not break the proxy's send loop
                    logger.exception("stall callback failed")

        async def wait_while_progressing(write: asyncio.Future) -> bool:
            """Wait for ``write`` while the client keeps taking output; False when it took none for
            ``timeout_s``."""
            loop = asyncio.get_running_loop()
            deadline, left = loop.time() + self.timeout_s, transport.get_write_buffer_size()
            while True:
                done, _ = await asyncio.wait({write}, timeout=self.poll_s)
                if done:
                    return True
                now, size = loop.time(), transport.get_write_buffer_size()
                if size < left:  # the kernel took some: the client read
                    deadline = now + self.timeout_s
                left = size
                if now >= deadline:
                    return False

        async def guarded_send(message: dict) -> None:
            if stalled.is_set():
                return
            if message["type"] == "http.response.start" and transport is not None and _event_stream(message):
                bound_send_buffers(transport, self.send_buffer_bytes)
            if transport is not None and not _writes_paused(send):
                return await send(message)  # the fast path: nothing waits
            write = asyncio.ensure_future(send(message))
            try:
                if transport is not None:
                    finished = await wait_while_progressing(write)
                else:
                    finished = (await asyncio.wait({write}, timeout=self.timeout_s))[0] != set()
                if finished:
                    return write.result()
            finally:
                if not write.done():
                    write.cancel()
            give_up()

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


def _event_stream(start: dict) -> bool:
    return any(k.lower() == b"content-type" and v.lower().startswith(b"text/event-stream")
               for k, v in start.get("headers", ()))


def _valid_timeout(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _valid_buffer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1024


def _from_env(name: str, default: Any, kind: type, valid: Callable[[Any], bool], what: str) -> Any:
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ValueError(f"{name} must be {what}, got {raw!r}")
    return value


def settings_from_env() -> tuple[float, int]:
    """``(timeout_s, send_buffer_bytes)`` from ``LLAVA_STREAM_STALL_TIMEOUT_S`` (default 10) and
    ``LLAVA_STREAM_SEND_BUFFER_BYTES`` (default 16384); a bad value is refused with the variable's name."""
    timeout = _from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, float, _valid_timeout, "a positive number of seconds")
    size = _from_env(BUFFER_ENV, DEFAULT_BUFFER_BYTES, int, _valid_buffer, "a whole number of bytes >= 1024")
    return timeout, size


def installed() -> bool:
    """Whether this process's environment names the guard as Serve's proxy callback: a hint only (a
    replica shares its node's environment with that node's proxy unless a runtime_env changes it)."""
    return os.environ.get(CALLBACK_ENV, "") == IMPORT_PATH


def proxy_middlewares() -> list:
    """Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the stall guard,
    counting stalled responses in ``ray_llava_stalled_streams_total`` on the node's metrics endpoint."""
    from ray.util.metrics import Counter
    from starlette.middleware import Middleware

    try:
        timeout_s, size = settings_from_env()
    except ValueError as e:  # a typo must not take every app's HTTP down with the proxy: say so, use the defaults
        logger.error("%s; the stall guard uses its defaults (%g s, %d bytes)", e, DEFAULT_TIMEOUT_S, DEFAULT_BUFFER_BYTES)
        timeout_s, size = DEFAULT_TIMEOUT_S, DEFAULT_BUFFER_BYTES
    counter = Counter(STALLED_METRIC, description="HTTP responses ended because the client read nothing "
                      f"for {TIMEOUT_ENV} seconds while output waited")
    return [Middleware(StallGuard, timeout_s=timeout_s, send_buffer_bytes=size,
                       on_stall=lambda path: counter.inc())]
