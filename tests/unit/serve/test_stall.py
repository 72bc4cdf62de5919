"""The HTTP proxy's stall guard: on a real uvicorn server on 127.0.0.1 (no Ray), then in Serve's proxy,
where 20 clients that never read must not hold the decode batch."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from llava_platform.serve import stall

CHUNK = b"data: " + b"x" * 194 + b"\n\n"  # about one SSE event of a streamed answer


class Streamer:
    """An ASGI app that streams ``chunks`` events and records how far it got and what ended it."""

    def __init__(self, chunks: int):
        self.chunks, self.sent, self.disconnected, self.finished = chunks, 0, False, threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected = True

        watcher = asyncio.ensure_future(watch())
        try:
            for _ in range(self.chunks):
                if self.disconnected:
                    break
                await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
                self.sent += 1
                await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.finished.set()


@pytest.fixture
def server():
    """``start(app)`` runs ``app`` on a real uvicorn server on a loopback port and returns the port."""
    servers = []

    def start(app, loop: str = "auto", http: str = "auto") -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", loop=loop, http=http))
        thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((srv, thread))
        deadline = time.time() + 10
        while not srv.started and time.time() < deadline:
            time.sleep(0.02)
        assert srv.started
        return sock.getsockname()[1]

    yield start
    for srv, thread in servers:
        srv.should_exit = True
        thread.join(10)


def open_stream(port: int, path: str = "/", rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # Serve's proxy runs uvloop when installed
@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_a_client_that_reads_nothing_is_reset_after_the_timeout_with_bounded_output(server, loop, http):
    app, stalls = Streamer(chunks=20_000), []  # ~4 MB: more than loopback's autotuned send buffer
    port = server(stall.StallGuard(app, timeout_s=0.5, send_buffer_bytes=4096, on_stall=stalls.append), loop, http)
    client = open_stream(port, "/v1/x", rcvbuf=4096)
    try:
        assert app.finished.wait(20), "the response never ended"
        assert stalls == ["/v1/x"] and app.disconnected
        # What waited for the client: its receive window, the bounded kernel and transport buffers
        # (without the bounds, ~2.8 MB went out before a write waited).
        assert app.sent * len(CHUNK) < 40_000, app.sent
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):  # reset, not closed: nothing is kept for it
            while client.recv(65536):
                pass
    finally:
        client.close()


def test_a_client_that_reads_slowly_but_steadily_gets_its_whole_answer(server):
    # 30 KB read at ~10 KB/s through the bounded buffers: 3 s, six timeouts (the test above checks a
    # single write that waits past the timeout while the client takes output).
    app, stalls = Streamer(chunks=150), []
    port = server(stall.StallGuard(app, timeout_s=0.5, send_buffer_bytes=16384, on_stall=stalls.append))
    client = open_stream(port, rcvbuf=4096)
    data = b""
    try:
        client.settimeout(10)
        while not data.endswith(b"0\r\n\r\n"):  # the chunked body's last chunk
            got = client.recv(1024)
            assert got, "the connection closed before the answer ended"
            data += got
            time.sleep(0.1)
    finally:
        client.close()
    assert app.finished.wait(10)
    assert stalls == [] and app.sent == 150 and data.count(b"data: ") == 150


class FakeTransport:
    """What the guard reads of a transport: its unsent bytes shrink by ``take`` every ``every`` s."""

    def __init__(self, take: int, every: float):
        self.size, self.take, self.every, self.aborted = 100_000, take, every, False

    async def drain(self):
        while self.size > 0 and not self.aborted:
            await asyncio.sleep(self.every)
            self.size -= self.take

    def get_write_buffer_size(self):
        return self.size

    def get_extra_info(self, name):
        return None

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def is_closing(self):
        return self.aborted

    def abort(self):
        self.aborted = True


class FakeCycle:
    """uvicorn's per-request object as the guard sees it: ``send`` waits while writes are paused."""

    def __init__(self, transport: FakeTransport, done_after: float):
        self.transport, self.done_after = transport, done_after
        self.flow = SimpleNamespace(write_paused=True)

    async def send(self, message):
        if message["type"] == "http.response.body" and message.get("more_body"):
            await asyncio.sleep(self.done_after)  # one write that waits for the transport to drain


@pytest.mark.parametrize("take, stalled", [(1, False), (0, True)])
def test_a_write_may_wait_past_the_timeout_while_the_client_takes_output(take, stalled):
    """A slow reader makes one write wait longer than the timeout (the transport resumes only after
    draining to its low mark); the guard cuts only when nothing at all was taken for the timeout."""
    transport = FakeTransport(take, every=0.1)
    cycle, stalls = FakeCycle(transport, done_after=1.5), []
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        if requests:
            return requests.pop()
        await asyncio.sleep(3600)

    async def run():
        drainer = asyncio.ensure_future(transport.drain())
        try:
            await stall.StallGuard(Streamer(chunks=1), timeout_s=0.5, on_stall=stalls.append)(
                {"type": "http", "path": "/s"}, receive, cycle.send)
        finally:
            drainer.cancel()

    asyncio.run(asyncio.wait_for(run(), 10))
    assert (stalls == ["/s"]) is stalled and transport.aborted is stalled


def test_only_streamed_answers_get_the_small_buffers(server):
    """Other responses (files, JSON) keep the kernel's buffers: a fixed small SO_SNDBUF would cap their
    throughput on a long link."""
    sizes = {}

    async def app(scope, receive, send):
        await receive()
        kind = b"text/event-stream" if scope["path"] == "/sse" else b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
        sock = scope["server_transport"].get_extra_info("socket")
        sizes[scope["path"]] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        await send({"type": "http.response.body", "body": b"{}"})

    async def with_transport(scope, receive, send):  # uvicorn's send, passed on unchanged to the guard
        scope["server_transport"] = send.__self__.transport
        await stall.StallGuard(app, timeout_s=1, send_buffer_bytes=4096)(scope, receive, send)

    port = server(with_transport)
    for path in ("/sse", "/json"):
        assert httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).status_code == 200
    assert sizes["/sse"] == 2 * 4096 and sizes["/json"] > 2 * 4096, sizes


def test_without_the_servers_transport_a_blocked_send_still_ends_as_a_disconnect():
    async def blocked_send(message):
        if message["type"] == "http.response.body":
            await asyncio.sleep(3600)

    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        if requests:
            return requests.pop()
        await asyncio.sleep(3600)

    app, stalls = Streamer(chunks=100), []
    guard = stall.StallGuard(app, timeout_s=0.2, on_stall=stalls.append)
    assert stall.transport_of(blocked_send) is None
    asyncio.run(asyncio.wait_for(guard({"type": "http", "path": "/p"}, receive, blocked_send), 10))
    assert stalls == ["/p"] and app.disconnected and app.sent < 100


def test_settings_from_the_environment_name_the_variable_when_wrong(monkeypatch, caplog):
    monkeypatch.delenv(stall.TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(stall.BUFFER_ENV, raising=False)
    assert stall.settings_from_env() == (stall.DEFAULT_TIMEOUT_S, stall.DEFAULT_BUFFER_BYTES)
    monkeypatch.setenv(stall.TIMEOUT_ENV, "2.5")
    monkeypatch.setenv(stall.BUFFER_ENV, "8192")
    assert stall.settings_from_env() == (2.5, 8192)
    for name, bad in ((stall.TIMEOUT_ENV, "soon"), (stall.TIMEOUT_ENV, "0"), (stall.TIMEOUT_ENV, "nan"),
                      (stall.TIMEOUT_ENV, "inf"), (stall.BUFFER_ENV, "10"), (stall.BUFFER_ENV, "4k")):
        monkeypatch.setenv(stall.TIMEOUT_ENV, "2.5")
        monkeypatch.setenv(stall.BUFFER_ENV, "8192")
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            stall.settings_from_env()
    with pytest.raises(ValueError, match=stall.TIMEOUT_ENV):
        stall.StallGuard(Streamer(1), timeout_s=-1)
    # In the proxy a bad value is logged and the defaults used: raising would stop every app's HTTP.
    monkeypatch.setenv(stall.TIMEOUT_ENV, "soon")
    (middleware,) = stall.proxy_middlewares()
    assert middleware.kwargs["timeout_s"] == stall.DEFAULT_TIMEOUT_S and stall.TIMEOUT_ENV in caplog.text


def test_a_receive_that_serve_cancels_reads_as_the_clients_disconnect():
    """What a cut looks like inside the Gateway: Serve's replica-side ``receive`` raises
    ``TaskCancelledError`` (about one cut stream in three): the app must see a disconnect, not a 500."""
    from ray.exceptions import TaskCancelledError

    from llava_platform.serve.gateway import ObserveRequests

    seen, recorded = [], []

    async def app(scope, receive, send):
        seen.append(await receive())

    async def cancelled_receive():
        raise TaskCancelledError()

    async def send(message):
        pass

    state = SimpleNamespace(metrics=SimpleNamespace(request=lambda *a: recorded.append(a)))
    scope = {"type": "http", "method": "POST", "app": SimpleNamespace(state=state)}
    asyncio.run(ObserveRequests(app)(scope, cancelled_receive, send))
    assert seen == [{"type": "http.disconnect"}] and len(recorded) == 1


# ---- in Serve's proxy (the session's cluster installs the guard with a 3 s timeout, see conftest) ----


@pytest.fixture(scope="module")
def long_app(serve_app, tiny_model_dir):
    """A second app on the session's proxy whose answers may be long (the session app stops at 64
    tokens, too few to fill a client's buffers): one LanguageModel replica of 16 rows."""
    from ray import serve

    from llava_platform.serve.app import LlavaAppArgs, build_app

    args = LlavaAppArgs(model=str(tiny_model_dir), max_new_tokens_limit=2000, max_batch_size=16,
                        batch_wait_timeout_s=0.05)
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    app = build_app(args, {"Gateway": dict(small, num_replicas=1), "VisionEncoder": dict(small, num_replicas=1),
                           "LanguageModel": dict(small, num_replicas=1, max_ongoing_requests=40)})
    serve.run(app, name="long", route_prefix="/long")
    yield f"{serve_app.url}/long", serve.get_deployment_handle("LanguageModel", "long")
    serve.delete("long")


def _post(url: str, max_tokens: int, stream: bool) -> bytes:
    body = json.dumps({"model": "llava", "messages": [{"role": "user", "content": "tell me a story"}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": stream}).encode()
    host_port = url.split("//")[1].split("/")[0]
    path = "/" + url.split("//")[1].split("/", 1)[1] + "/v1/chat/completions"
    return (f"POST {path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _quick(url: str) -> float:
    t = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "llava", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return time.monotonic() - t


def _settled_stalled_total(metrics_url: str) -> float:
    prev = _stalled_total(metrics_url)
    for _ in range(10):
        time.sleep(2.5)  # the test cluster reports metrics every 2 s
        cur = _stalled_total(metrics_url)
        if cur == prev:
            return cur
        prev = cur
    return prev


def _stalled_total(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"ray_{stall.STALLED_METRIC}_total"))


@pytest.mark.ray
@pytest.mark.slow
def test_twenty_clients_that_never_read_do_not_hold_the_decode_batch(long_app, ray_cluster):
    url, lm = long_app
    port = int(url.split(":")[2].split("/")[0])
    baseline = statistics.median(_quick(url) for _ in range(3))
    before = lm.stats.remote().result()
    stalled_before = _settled_stalled_total(ray_cluster.metrics_url)  # earlier cuts all reported
    clients = []
    try:
        for _ in range(20):  # 1900-token answers, greedy (no early end): ~38 s of decoding each without the guard
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(_post(url, 1900, True))
            clients.append(s)
        time.sleep(0.5)  # the streams are decoding; the clients read nothing and keep their sockets open
        first = _quick(url)  # waits for a batch slot until the guard cuts the stalled rows
        later = [_quick(url) for _ in range(5)]
        deadline = time.time() + 60
        while time.time() < deadline and lm.stats.remote().result()["cancelled"] - before["cancelled"] < 20:
            time.sleep(0.5)
        after = lm.stats.remote().result()
    finally:
        for s in clients:
            s.close()
    assert after["cancelled"] - before["cancelled"] == 20, (before, after)
    assert first < 30, f"first request behind the stalled clients took {first:.1f} s (baseline {baseline:.2f} s)"
    assert statistics.median(later) < max(2.0, 5 * baseline), (baseline, later)
    deadline = time.time() + 30
    while time.time() < deadline and _stalled_total(ray_cluster.metrics_url) - stalled_before < 20:
        time.sleep(1)
    assert _stalled_total(ray_cluster.metrics_url) - stalled_before == 20
