"""HTTP guards against hostile or careless clients: a request-body limit, and slow or crowding connections.

- ``BodyLimitMiddleware``: JSON API bodies over a limit are refused (413) from Content-Length before a byte is
  read, and a chunked body is counted as it arrives and refused the moment it passes the limit.
- ``guarded_http`` (on httptools where installed, else h11): uvicorn's HTTP/1.1 protocol with a deadline for a
  request's headers (uvicorn has none: a connection that trickles headers byte by byte would be held forever), a
  bound on their size, and a cap on connections per client IP. ``iota.orchestrator.app.server_options`` puts one,
  and uvicorn's own limits, in the arguments of ``uvicorn.run``.

Hostile callers that authenticate are held to account by the abuse policy (iota.orchestrator.abuse).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable, Iterable
from typing import Any, Literal

from fastapi import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from iota.auth.ratelimit import parse_networks

# -- request bodies ----------------------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a chunked body passes the limit; FastAPI passes HTTPExceptions through."""

    def __init__(self, limit: int) -> None:
        # Closing stops the server reading (and discarding) the rest of an endless chunked body.
        super().__init__(
            413, detail=f"request body over the {limit}-byte limit", headers={"connection": "close"}
        )


class BodyLimitMiddleware:
    """ASGI middleware: request bodies of at most ``max_bytes``, except under ``exempt_prefixes`` (the object
    store's presigned PUTs, whose exact size is part of their signature)."""

    def __init__(self, app: Any, max_bytes: int, exempt_prefixes: Iterable[str] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_prefixes = tuple(exempt_prefixes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or any(path.startswith(p) for p in self.exempt_prefixes):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _refuse(
                send, 413, f"request body of {declared} bytes is over the {self.max_bytes}-byte limit"
            )
            return
        received = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal received
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as error:
            # Raised outside FastAPI's exception handling (a plain ASGI read): answer here if nothing was sent.
            if started:
                raise
            await _refuse(send, 413, str(error.detail))


def _content_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None  # h11 refuses a malformed one before we see it
    return None


async def _refuse(send: Any, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),  # the unread body would otherwise be taken for the next request
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- slow and crowding connections -------------------------------------------------------------------------

# h11's default bound on a request's line and headers, applied to httptools too when uvicorn's
# ``h11_max_incomplete_event_size`` is not set, so that both parsers refuse the same requests.
_DEFAULT_MAX_HEADER_BYTES = 16 * 1024
_HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\ncontent-length: 30\r\nconnection: close\r\n\r\n"
    b"Request headers are too large."
)


def guarded_http(
    header_timeout_s: float,
    max_connections_per_ip: int,
    exempt: Iterable[str] = (),
    parser: Literal["httptools", "h11"] | None = None,
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers and a cap on connections per IP.

    ``parser``: httptools (C; uvicorn's pure-Python h11 was a fifth to a third of the orchestrator's time under
    load) or h11; None takes httptools where it is installed, else h11. The guards are the same on both: a
    connection must deliver a request's complete headers within ``header_timeout_s`` of its first byte (or of
    connecting) or it is closed; between requests uvicorn's ``timeout_keep_alive`` applies as usual. A client IP
    with ``max_connections_per_ip`` open connections has further ones closed at once (0: no cap); ``exempt``
    addresses or CIDR blocks (trusted reverse proxies, which carry everyone's connections) are not capped.
    Headers are bounded by uvicorn's ``h11_max_incomplete_event_size`` on either parser.
    """
    admit = _connection_cap(max_connections_per_ip, exempt)
    if parser != "h11":
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        except ImportError:
            if parser == "httptools":
                raise
        else:
            return _guarded_httptools(HttpToolsProtocol, header_timeout_s, admit)
    return _guarded_h11(header_timeout_s, admit)


class _HeaderDeadline:
    """The header deadline both guarded protocols share: armed while a request's headers are awaited, cancelled
    once they are in; `_headers_too_slow` (each protocol's own) runs when it expires."""

    header_timeout: float
    loop: asyncio.AbstractEventLoop
    _header_deadline: asyncio.TimerHandle | None = None
    _admit: Callable[[object], bool]  # the per-IP connection cap (a staticmethod of each protocol)
    _headers_too_slow: Callable[[], None]  # each protocol closes a too-slow connection its own way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if not self._admit(self):
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None


def _guarded_httptools(
    base: type[Any], header_timeout_s: float, admit: Callable[[object], bool]
) -> type[asyncio.Protocol]:
    class GuardedHttpToolsProtocol(_HeaderDeadline, base):  # type: ignore[misc, valid-type]
        header_timeout = header_timeout_s
        _awaiting_headers = True  # from connecting, and after each request's body, until its headers are in
        _header_bytes = 0  # bytes received while awaiting headers (httptools buffers a partial header itself)
        _message_ended = False  # a request's body ended within the data being parsed
        # httptools parses bytes that follow a complete request while that request is still being answered (h11
        # waits). A refusal of those bytes waits for the answer, as under h11, instead of cutting it off.
        _after_response: Callable[[], None] | None = None
        _admit = staticmethod(admit)

        def data_received(self, data: bytes) -> None:
            if self._awaiting_headers and self._header_deadline is None:
                self._arm()
            self._message_ended = False
            super().data_received(data)
            # Bytes that leave the parser still awaiting headers are header bytes, except where a body ended in
            # this read (the rest may be a pipelined request's start): those are not counted, a bounded miss.
            if self._awaiting_headers and not self._message_ended:
                self._header_bytes += len(data)
                max_bytes = self.config.h11_max_incomplete_event_size or _DEFAULT_MAX_HEADER_BYTES
                if self._header_bytes > max_bytes:
                    self._refuse(self._headers_too_large)

        def on_headers_complete(self) -> None:
            self._awaiting_headers = False
            self._header_bytes = 0
            self._disarm()  # the headers are in; the app now reads the body at its own pace
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._awaiting_headers = True  # whatever comes next is the next request's headers
            self._message_ended = True

        def send_400_response(self, msg: str) -> None:
            self._refuse(lambda: super(GuardedHttpToolsProtocol, self).send_400_response(msg))

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._after_response is not None:
                if self.cycle.response_complete:  # every request before the refused bytes is answered
                    refusal, self._after_response = self._after_response, None
                    refusal()
                else:
                    self.flow.pause_reading()  # uvicorn resumed reading; nothing more is parsed

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _refuse(self, refusal: Callable[[], None]) -> None:
            if self.transport.is_closing():
                return
            if self._awaiting_headers and self.cycle is not None and not self.cycle.response_complete:
                self._after_response = refusal
                self.flow.pause_reading()
            else:
                refusal()

        def _headers_too_large(self) -> None:
            self.transport.write(_HEADERS_TOO_LARGE)
            self.transport.close()

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            self._refuse(self.transport.close)

    return GuardedHttpToolsProtocol


def _guarded_h11(header_timeout_s: float, admit: Callable[[object], bool]) -> type[asyncio.Protocol]:
    class GuardedH11Protocol(_HeaderDeadline, H11Protocol):
        header_timeout = header_timeout_s
        _admit = staticmethod(admit)

        def data_received(self, data: bytes) -> None:
            if self._awaiting_request() and self._header_deadline is None:
                self._arm()
            super().data_received(data)
            if not self._awaiting_request():
                self._disarm()  # the headers are in; the app now reads the body at its own pace

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _awaiting_request(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def _connection_cap(max_connections_per_ip: int, exempt: Iterable[str]) -> Callable[[object], bool]:
    """Whether a just-made connection (already among uvicorn's connections) stays under its IP's cap."""
    proxies = parse_networks(exempt)

    def capped(ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return True
        return max_connections_per_ip > 0 and not any(address in network for network in proxies)

    def admit(protocol: object) -> bool:
        ip = _client_ip(protocol)
        if ip is None or not capped(ip):
            return True
        # uvicorn's set of open connections, this one included.
        connections = getattr(protocol, "connections", ())
        return sum(1 for c in connections if _client_ip(c) == ip) <= max_connections_per_ip

    return admit


def _client_ip(protocol: object) -> str | None:
    client = getattr(protocol, "client", None)  # (host, port) of an HTTP connection's peer
    return str(client[0]) if client else None
