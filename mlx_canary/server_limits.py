"""The HTTP server's defences against slow, idle and too many clients: read timeouts and a connection cap.

A server exposed with ``--host 0.0.0.0`` must not be held open by clients that connect and send nothing, trickle
a request's head, or trickle its body (slowloris), nor exhausted by opening connections. uvicorn bounds none of
the reads by itself (its keep-alive timer starts after a response and stops at the next byte), so
``ConnectionLimits`` is applied in two places:

* the request head (``TimedH11Protocol``, uvicorn's h11 protocol with one timer more): the whole head must arrive
  within ``read_timeout`` of the connection opening or of the previous response; otherwise the connection is
  closed (answered 408 when part of a head had arrived);
* the request body (``ReadDeadline``, ASGI middleware around the app): each wait for the next piece of the body
  is bounded by ``read_timeout`` and the whole body by ``upload_timeout``; past either the request is answered
  408 (OpenAI's error shape) and the connection closed.

``max_connections`` is uvicorn's ``limit_concurrency``: while more connections are open, new requests are answered
503 at once (idle ones are closed by the head timer, so the cap cannot be held for longer than ``read_timeout``).
Time spent transcribing is never limited: only reading from the client is.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from .errors import CanaryError

log = logging.getLogger("mlx_canary.server")

DEFAULT_READ_TIMEOUT = 30.0  # seconds: a request's head, or a pause within its body
DEFAULT_UPLOAD_TIMEOUT = 300.0  # seconds: one whole upload (25 MB at ~0.7 Mbit/s)
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_STREAMS = 8  # live WebSocket streams decoded at once (each is a share of the worker)
DEFAULT_STREAM_IDLE_TIMEOUT = 30.0  # seconds a live stream may send nothing


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take to send a request, and how many clients may be connected at once
    (``max_streams`` of them live WebSocket streams, each closed after ``stream_idle_timeout`` s without audio)."""

    read_timeout: float = DEFAULT_READ_TIMEOUT
    upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_streams: int = DEFAULT_MAX_STREAMS
    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT

    def __post_init__(self):
        if not self.read_timeout > 0 or not self.upload_timeout > 0:
            raise CanaryError("read_timeout and upload_timeout must be positive numbers of seconds")
        if self.max_connections < 1 or self.max_streams < 1:
            raise CanaryError("max_connections and max_streams must be at least 1")
        if not self.stream_idle_timeout > 0:
            raise CanaryError("stream_idle_timeout must be a positive number of seconds")


def uvicorn_options(limits: ConnectionLimits) -> dict:
    """The arguments of ``uvicorn.run`` / ``uvicorn.Config`` that apply ``limits``."""
    # uvicorn answers 503 once len(connections) >= limit_concurrency, the asking one included.
    return {"http": timed_h11_protocol(limits.read_timeout), "limit_concurrency": limits.max_connections + 1}


def timed_h11_protocol(head_timeout: float) -> type:
    """uvicorn's h11 protocol class with a deadline on receiving each request head."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return type("TimedH11Protocol", (_HeadTimerMixin, H11Protocol), {"head_timeout": head_timeout})


_REQUEST_TIMEOUT_HEAD = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: "
)


class _HeadTimerMixin:
    """Closes a connection whose next request head is not complete ``head_timeout`` seconds after the connection
    opened or the previous response ended (data arriving does not reset it: a trickled head is cut too)."""

    head_timeout: float
    _head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head was parsed: the body has its own deadline (ReadDeadline)
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        self._arm_head_timer()  # first: the call below may already parse a pipelined request (and cancel it)
        super().on_response_complete()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        import h11

        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        # Part of a head waits in h11's buffer (not the rest of a body the app did not read: that needs no answer).
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            log.info("closing a connection whose request head took over %g s", self.head_timeout)
            body = _error_body(f"The request headers did not arrive within {self.head_timeout:g} s.")
            self.transport.write(_REQUEST_TIMEOUT_HEAD + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()


class _ReadTimedOut(Exception):
    """Raised into the app by ReadDeadline's receive; answered 408 by ReadDeadline."""


def _error_body(message: str) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": "request_timeout"}
    return json.dumps({"error": error}).encode("utf-8")


class ReadDeadline:
    """ASGI middleware: bounds each wait for the request body by ``read_timeout`` and the whole body by
    ``upload_timeout``; a request past either is answered 408 and its connection closed."""

    def __init__(self, app, limits: ConnectionLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.upload_timeout
        body_done = False
        response_started = False

        async def timed_receive():
            nonlocal body_done
            if body_done:  # afterwards the app only listens for a disconnect: no deadline
                return await receive()
            wait = min(self.limits.read_timeout, deadline - loop.time())
            if wait <= 0:
                raise _ReadTimedOut(f"The upload did not complete within {self.limits.upload_timeout:g} s.")
            try:
                message = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                if loop.time() >= deadline:
                    raise _ReadTimedOut(f"The upload did not complete within {self.limits.upload_timeout:g} s.") \
                        from None
                raise _ReadTimedOut(f"The upload stalled: nothing arrived for {self.limits.read_timeout:g} s.") \
                    from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracking_send(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except _ReadTimedOut as e:
            log.info("%s %s: %s", scope.get("method"), scope.get("path"), e)
            if response_started:
                return
            body = _error_body(str(e))
            await send({"type": "http.response.start", "status": 408,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
