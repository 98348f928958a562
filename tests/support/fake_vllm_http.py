"""The fake vLLM (`tests.support.fake_vllm.FakeVllm`) served over real HTTP on a free loopback
port, so that the real `lorawarm run` process can talk to it, plus the faults only a socket can
make: an answer slower than the client's timeout, a burst of 5xx, a connection reset in the
middle of a request, a malformed body.

    with FakeVllmHttp() as server:            # listening on server.url until the block ends
        server.delay("load", seconds=60)      # every load answers after 60 s (until clear())
        server.burst(500, "models", "load", times=4)
        server.reset("load")                  # the socket is closed with a RST, no answer
        server.answer("models", 200, b"<html>", content_type="text/html")
        server.clear()                        # the faults end
        server.count("load", since=t0)        # requests received, from `server.seen`

The server is a small HTTP/1.1 server (h11, keep-alive, as uvicorn speaks it) on its own asyncio
loop in one thread; leaving the block stops it, cancels every connection and joins the thread.
Each request without a fault is handed to `FakeVllm.handler`, and its answer is sent as it is:
status, `content-type` (none where vLLM sends none), body; the framing headers (`date`,
`server: uvicorn`, `content-length`) are the ones uvicorn adds. A `FakeVllm.fail(...)` scripted
with `raises=` (or `reachable = False`) resets the connection. Script the `FakeVllm` only
inside `with server.lock:`: it is called from the server's thread.

Faults apply to the routes named (health, models, load, unload), in the order they were
scripted, `times` requests in total over those routes (None: until `clear()`). A delayed request
is still carried out when its time comes even if the client has gone (vLLM does not cancel a
load whose client disconnected: `entrypoints/serve/lora/api_router.py` has no cancellation
wrapper), and a client that goes away while it waits is recorded (`Seen.client_gone`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from types import TracebackType
from typing import Literal

import h11
import httpx

from tests.support.fake_vllm import ROUTES, FakeVllm

Kind = Literal["delay", "answer", "reset"]

#: What Starlette's ServerErrorMiddleware sends for an unhandled exception in vLLM's API server.
INTERNAL_SERVER_ERROR = (500, "text/plain; charset=utf-8", b"Internal Server Error")
#: What an nginx reverse proxy in front of vLLM sends while its upstream is down or restarting.
BAD_GATEWAY = (
    502,
    "text/html",
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n",
)
#: vLLM's own 503 (`Response(status_code=503)`: empty, no content-type), as /health sends it.
SERVICE_UNAVAILABLE = (503, None, b"")
BURSTS = {500: INTERNAL_SERVER_ERROR, 502: BAD_GATEWAY, 503: SERVICE_UNAVAILABLE}


@dataclass
class HttpFault:
    """What the next requests to `routes` get instead of (or before) the fake's answer."""

    kind: Kind
    routes: frozenset[str]
    remaining: int | None  # None: until cleared
    seconds: float = 0.0
    answer: tuple[int, str | None, bytes] | None = None


@dataclass
class Seen:
    """One request the server received: route, adapter name, when (monotonic), what it got.

    `outcome`: `answered` (with `status`), `reset`, or `pending` while it waits or is handled.
    `client_gone` is when the client closed the connection before the answer was sent.
    """

    route: str
    method: str
    name: str | None
    at: float
    outcome: str = "pending"
    status: int | None = None
    fault: Kind | None = None
    client_gone: float | None = None


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.SERVER))


class FakeVllmHttp:
    """A `FakeVllm` on `http://127.0.0.1:<free port>`; a context manager."""

    def __init__(self, fake: FakeVllm | None = None, *, host: str = "127.0.0.1") -> None:
        self.fake = fake if fake is not None else FakeVllm()
        self.host = host
        self.port = 0
        self.lock = threading.RLock()
        self.seen: list[Seen] = []
        self._faults: list[HttpFault] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- scripting -------------------------------------------------------------------------
    def _add(self, fault: HttpFault) -> None:
        unknown = fault.routes - set(ROUTES.values())
        assert fault.routes
        assert not unknown, f"unknown routes {sorted(unknown)}"
        assert fault.remaining is None or fault.remaining > 0
        with self.lock:
            self._faults.append(fault)

    @staticmethod
    def _routes(routes: Iterable[str]) -> frozenset[str]:
        return frozenset(routes) or frozenset(ROUTES.values())

    def delay(self, *routes: str, seconds: float, times: int | None = None) -> None:
        """Requests to `routes` (default: all) are answered normally, `seconds` late."""
        self._add(HttpFault("delay", self._routes(routes), times, seconds=seconds))

    def answer(
        self,
        *routes: str,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        times: int | None = None,
    ) -> None:
        """Requests to `routes` get this answer instead (the fake's state does not change)."""
        self._add(
            HttpFault("answer", self._routes(routes), times, answer=(status, content_type, body))
        )

    def burst(self, status: int, *routes: str, times: int | None) -> None:
        """`times` requests to `routes` get a 500 (Starlette's), 502 (nginx's) or 503 (vLLM's)."""
        code, content_type, body = BURSTS[status]
        self.answer(*routes, status=code, body=body, content_type=content_type, times=times)

    def reset(self, *routes: str, times: int | None = None) -> None:
        """Requests to `routes` are read in full, then the connection is reset (RST), unanswered."""
        self._add(HttpFault("reset", self._routes(routes), times))

    def clear(self) -> None:
        """Every scripted fault ends (requests already waiting keep their delay)."""
        with self.lock:
            self._faults.clear()

    def _take(self, route: str) -> HttpFault | None:
        with self.lock:
            for fault in self._faults:
                if route in fault.routes:
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining == 0:
                            self._faults.remove(fault)
                    return fault
        return None

    # -- observing -------------------------------------------------------------------------
    def requests(self, *routes: str, since: float = 0.0) -> list[Seen]:
        """Requests received at or after `since` (monotonic), to `routes` (default: all)."""
        with self.lock:
            return [s for s in self.seen if s.at >= since and (not routes or s.route in routes)]

    def count(self, *routes: str, since: float = 0.0) -> int:
        return len(self.requests(*routes, since=since))

    def registry(self) -> dict[str, str]:
        """A copy of the fake's LoRA registry: name -> path as sent."""
        with self.lock:
            return dict(self.fake.registry)

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> FakeVllmHttp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"fake-vllm-http:{self.port}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(10) or self._error is not None:
            self.__exit__(None, None, None)
            raise RuntimeError(f"fake vLLM did not start: {self._error!r}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        alive = self._thread.is_alive()
        self._thread = None
        if alive:
            raise RuntimeError(f"fake vLLM thread on port {self.port} did not stop")
        if self._error is not None and exc_type is None:
            raise RuntimeError("fake vLLM server failed") from self._error

    def _run(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._main(sock))
        except BaseException as err:  # noqa: BLE001 - handed to the test thread in __exit__
            self._error = err
            self._started.set()

    async def _main(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=sock)
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    # -- HTTP ------------------------------------------------------------------------------
    def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of our own: asyncio's stream callback chokes on a cancelled callback task.
        task = asyncio.get_running_loop().create_task(self._serve(_Conn(reader, writer)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: _Conn) -> None:
        try:
            while await self._one_request(conn):
                conn.h11.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            conn.writer.close()
            with contextlib.suppress(ConnectionError):
                await conn.writer.wait_closed()

    async def _next_event(self, conn: _Conn) -> object:
        while True:
            event = conn.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.h11.receive_data(await conn.reader.read(65536))

    async def _one_request(self, conn: _Conn) -> bool:
        """Read, answer (or fault) one request; False when the connection is done."""
        event = await self._next_event(conn)
        if not isinstance(event, h11.Request):
            return False
        body = b""
        while True:
            part = await self._next_event(conn)
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                return False
        target = event.target.decode()
        path = target.split("?", 1)[0]
        route = ROUTES.get(path, path)
        request = httpx.Request(
            event.method.decode(),
            f"http://{self.host}:{self.port}{target}",
            headers=[(k, v) for k, v in event.headers],
            content=body,
        )
        payload = FakeVllm._payload(request)
        name = payload.get("lora_name") if isinstance(payload, dict) else None
        seen = Seen(
            route, request.method, name if isinstance(name, str) else None, time.monotonic()
        )
        with self.lock:
            self.seen.append(seen)
        fault = self._take(route)
        if fault is not None:
            seen.fault = fault.kind
        if fault is not None and fault.kind == "reset":
            seen.outcome = "reset"
            self._abort(conn)
            return False
        if fault is not None and fault.kind == "delay":
            await self._wait_or_gone(conn, fault.seconds, seen)
        if fault is not None and fault.answer is not None:
            status, content_type, content = fault.answer
        else:
            try:
                with self.lock:
                    response = self.fake.handler(request)
            except httpx.TransportError:
                seen.outcome = "reset"
                self._abort(conn)
                return False
            status, content_type = response.status_code, response.headers.get("content-type")
            content = response.content
        seen.outcome, seen.status = "answered", status
        if seen.client_gone is not None:
            return False
        headers = [
            ("date", formatdate(usegmt=True)),
            ("server", "uvicorn"),
            ("content-length", str(len(content))),
        ]
        if content_type is not None:
            headers.append(("content-type", content_type))
        data = conn.h11.send(h11.Response(status_code=status, headers=headers))
        data = (data or b"") + (conn.h11.send(h11.Data(data=content)) or b"")
        data += conn.h11.send(h11.EndOfMessage()) or b""
        conn.writer.write(data)
        await conn.writer.drain()
        return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE

    async def _wait_or_gone(self, conn: _Conn, seconds: float, seen: Seen) -> None:
        """Sleep `seconds`; note when the client closes the connection meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if seen.client_gone is not None:
                await asyncio.sleep(left)
                return
            try:
                data = await asyncio.wait_for(conn.reader.read(65536), timeout=left)
            except TimeoutError:
                return
            except ConnectionError:
                data = b""
            if data:
                conn.h11.receive_data(data)  # a pipelined request: h11 keeps it for later
            else:
                seen.client_gone = time.monotonic()

    @staticmethod
    def _abort(conn: _Conn) -> None:
        """Close with a RST: what a crashed or restarting process does to an open request."""
        sock = conn.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()
