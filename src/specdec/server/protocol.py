"""uvicorn's HTTP/1.1 protocol with deadlines on receiving a request (uvicorn has none).

uvicorn closes a connection that stays silent *after* a response (`timeout_keep_alive`), but not one that
never completes a request: its keep-alive timer is cancelled by every byte received and is not started at all
before the first request, so a client that sends half its headers, or a body that never ends, holds its socket
for ever, and a few hundred such clients use up the server's file descriptors (Slowloris). These deadlines
are the ones uvicorn's own tracking issue proposes (encode/uvicorn#157: `--timeout-request-start`,
`--timeout-request-complete`):

- a request's head (request line and headers) must be complete within `request_start` seconds of its first
  byte, or of the connection opening for the first request; later bytes do not push the deadline back, so
  sending a byte at a time does not help;
- its body must be complete within `request_complete` seconds of the head.

Nothing is timed while the server computes or sends a response: a long generation is not a slow client. The
h11 implementation is used whatever else is installed: it is the one the `server` extra installs, and one
implementation keeps the bookkeeping below exact (the engine, not HTTP parsing, bounds the server's speed).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("specdec.server")


class DeadlineProtocol(H11Protocol):
    """H11Protocol plus the deadlines above; build a configured subclass with `deadline_protocol`."""

    request_start: float = 10.0
    request_complete: float = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm(self.request_start, "its request headers")

    def data_received(self, data: bytes) -> None:
        previous = self.cycle
        super().data_received(data)
        self._watch(previous, head_pending=True)

    def on_response_complete(self) -> None:
        previous = self.cycle
        self._disarm()  # uvicorn's keep-alive timer now watches the silence before the next request
        super().on_response_complete()  # may start a pipelined request already received
        self._watch(previous, head_pending=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _watch(self, previous, head_pending: bool) -> None:
        """Set the deadline for what the connection now waits for from the client, if anything."""
        cycle = self.cycle
        if self.transport.is_closing():
            self._disarm()
        elif cycle is not None and not cycle.response_complete:  # a request is being received or answered
            if cycle is not previous:  # its head arrived just now
                self._disarm()
                if cycle.more_body:
                    self._arm(self.request_complete, "its request body")
            elif not cycle.more_body:  # its body is complete: the server is the one working now
                self._disarm()
        elif head_pending and self._deadline is None:  # bytes of the next request's head have arrived
            self._arm(self.request_start, "its request headers")

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, seconds, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, seconds: float, what: str) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.debug(
                "closing a connection from %s: it did not send %s within %gs", self.client, what, seconds
            )
            self.transport.close()


def deadline_protocol(request_start: float, request_complete: float) -> type[DeadlineProtocol]:
    """The protocol class to pass as uvicorn's `http` setting."""
    return type(
        "DeadlineProtocol",
        (DeadlineProtocol,),
        {"request_start": request_start, "request_complete": request_complete},
    )
