"""`specdec serve` closes connections that do not finish sending a request (Slowloris), and only those.

A real uvicorn server with the server's own settings (`uvicorn_config`) and short deadlines runs in a thread;
raw loopback sockets play the slow clients. Nothing here measures time: each check is that the server closes
the socket at all, within a bound far above the deadlines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import threading
import time

import httpx
import pytest

from specdec import SpecDecoder
from specdec.server.app import create_app
from specdec.server.cli import listen, uvicorn_config

import tiny

DEADLINE = 0.5  # seconds: request head, request body and keep-alive
BOUND = 60.0  # a server that has not closed a socket by now never will
RELEASE = threading.Event()  # holds /slow's response while clear
ENTERED = threading.Event()  # set when /slow has its request


def with_slow_route(app):
    """`app`, plus /slow: a response that takes until RELEASE is set (a long generation, as far as the
    connection can tell)."""

    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/slow":
            ENTERED.set()
            assert await asyncio.to_thread(RELEASE.wait, BOUND)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
            await send({"type": "http.response.body", "body": b"done"})
            return
        await app(scope, receive, send)

    return wrapped


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(tok):
    import uvicorn

    dec = SpecDecoder(tiny.model("llama"), tok, method="pld")
    app = create_app(dec, model_name="tiny")
    config = uvicorn_config(
        with_slow_route(app),
        log_level="warning",
        request_start=DEADLINE,
        request_complete=DEADLINE,
        keep_alive=DEADLINE,
    )
    srv = uvicorn.Server(config)
    sock = listen("127.0.0.1", 0)
    errors = Errors()
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + BOUND
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    logging.getLogger("uvicorn.error").addHandler(errors)  # after start: uvicorn configures its loggers then
    srv.port, srv.errors, srv.worker = sock.getsockname()[1], errors, app.state.worker
    yield srv
    RELEASE.set()
    srv.should_exit = True
    thread.join(timeout=BOUND)
    logging.getLogger("uvicorn.error").removeHandler(errors)


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=BOUND)


def closed_by_server(*sockets: socket.socket) -> bool:
    """Reads every socket until the server has closed them all (True) or BOUND passes (False)."""
    open_ = set(sockets)
    end = time.monotonic() + BOUND
    try:
        while open_ and time.monotonic() < end:
            readable, _, _ = select.select(list(open_), [], [], max(0.0, end - time.monotonic()))
            for sock in readable:
                try:
                    if not sock.recv(4096):
                        open_.discard(sock)
                except ConnectionResetError:
                    open_.discard(sock)
        return not open_
    finally:
        for sock in sockets:
            sock.close()


def trickle_until_closed(sock: socket.socket, data: bytes) -> bool:
    """Sends `data` a byte at a time, 20 bytes a second (each byte would restart a per-byte timer), until the
    server closes the connection (True) or BOUND passes (False)."""
    end = time.monotonic() + BOUND
    i = 0
    try:
        while time.monotonic() < end:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable and not sock.recv(4096):
                return True
            sock.sendall(data[i % len(data) : i % len(data) + 1])
            i += 1
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        sock.close()


def healthy(server) -> bool:
    return httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=BOUND).status_code == 200


HALF_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appli"


def test_half_sent_headers_and_silent_sockets_are_closed(server):
    sockets = [connect(server) for _ in range(60)]
    for sock in sockets[:50]:
        sock.sendall(HALF_HEAD)  # the other 10 send nothing at all
    assert closed_by_server(*sockets)
    assert healthy(server)


def test_a_byte_at_a_time_does_not_keep_a_connection(server):
    """The head's deadline runs from its first byte; more bytes do not push it back. Also for the second
    request on a kept-alive connection."""
    assert trickle_until_closed(connect(server), b"GET /health HTTP/1.1\r\nX-Padding: " + b"a" * 200)
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    assert trickle_until_closed(sock, b"GET /health HTTP/1.1\r\nX-Padding: " + b"a" * 200)
    assert healthy(server)


def test_a_stalled_body_is_closed_without_a_generation_or_an_error(server):
    body = json.dumps({"prompt": "def f():\n", "max_tokens": 4}).encode()
    sock = connect(server)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:10])
    assert closed_by_server(sock)
    assert healthy(server)
    snapshot = server.worker.snapshot()
    assert snapshot["completed"] == snapshot["failed"] == snapshot["running"] == 0
    assert not server.errors.records, [r.getMessage() for r in server.errors.records]


def test_a_slow_response_is_not_a_slow_client(server):
    """While the server works on a response, the connection is not timed: the client is waiting, not slow."""
    RELEASE.clear()
    responses: list[httpx.Response] = []
    url = f"http://127.0.0.1:{server.port}/slow"
    pending = threading.Thread(target=lambda: responses.append(httpx.get(url, timeout=BOUND)))
    try:
        pending.start()
        assert ENTERED.wait(BOUND)
        # a socket opened after the slow request arrived is closed for missing its deadline: by then the slow
        # request has waited longer than the deadline too
        sock = connect(server)
        sock.sendall(HALF_HEAD)
        assert closed_by_server(sock)
    finally:
        RELEASE.set()
        pending.join(timeout=BOUND)
    assert [(r.status_code, r.text) for r in responses] == [(200, "done")]
