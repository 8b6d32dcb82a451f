"""HTTP guards against hostile or careless clients: bounded and paced request bodies, and slow or crowding
connections.

- ``BodyLimitMiddleware``: JSON API bodies over a limit are refused (413) from Content-Length before a byte is
  read, and a chunked body is counted as it arrives and refused the moment it passes the limit. Every body (object
  uploads too) must keep up a minimum rate once a grace period is spent, or it is refused (408) and its connection
  closed: a client that sends a byte every few seconds holds nothing for long.
- ``guarded_http`` (on httptools where installed, else h11): uvicorn's HTTP/1.1 protocol with a deadline for a
  request's headers (uvicorn has none: a connection that trickles headers byte by byte would be held forever), a
  bound on their size counted up to their end whatever the reads carry, and a cap on connections per client IP.
  ``iota.orchestrator.app.server_options`` puts one, and uvicorn's own limits, in the arguments of ``uvicorn.run``.

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


class BodyRefused(HTTPException):
    """Raised from ``receive`` when a body is refused while it arrives; FastAPI passes HTTPExceptions through."""

    def __init__(self, status: int, detail: str) -> None:
        # Closing stops the server reading (and discarding) the rest of an endless or trickling body.
        super().__init__(status, detail=detail, headers={"connection": "close"})


# A body must arrive at this average rate once the grace period is spent: an honest client on the slowest link
# sends far faster, and a JSON body of the maximum size (1 MiB) is then allowed a minute.
MIN_BODY_BYTES_PER_S = 16 * 1024
BODY_GRACE_S = 10.0


class BodyLimitMiddleware:
    """ASGI middleware: request bodies of at most ``max_bytes``, except under ``exempt_prefixes`` (the object
    store's presigned PUTs, whose exact size is part of their signature), each arriving at ``min_bytes_per_s``.

    The pace counts only the time spent waiting for the client, not the server's own delays: a body of n bytes
    may keep the server waiting ``grace_s + n / min_bytes_per_s`` seconds in all, and is refused (408) once it has
    waited longer for what has arrived so far. Without it a body trickled a byte at a time would hold its request
    (and whatever the request holds) for as long as the client likes.
    """

    def __init__(
        self,
        app: Any,
        max_bytes: int,
        exempt_prefixes: Iterable[str] = (),
        min_bytes_per_s: float = MIN_BODY_BYTES_PER_S,
        grace_s: float = BODY_GRACE_S,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_prefixes = tuple(exempt_prefixes)
        self.min_bytes_per_s = min_bytes_per_s
        self.grace_s = grace_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        max_bytes = None if path.startswith(self.exempt_prefixes) else self.max_bytes
        declared = _content_length(scope)
        if max_bytes is not None and declared is not None and declared > max_bytes:
            await _refuse(send, 413, f"request body of {declared} bytes is over the {max_bytes}-byte limit")
            return
        loop = asyncio.get_running_loop()
        received = 0
        waited_s = 0.0
        body_done = False
        started = False

        async def paced_receive() -> dict[str, Any]:
            nonlocal received, waited_s, body_done
            if body_done:
                # Past the body, a read waits for the client to leave (a streamed answer listens for that): no pace.
                return await receive()  # type: ignore[no-any-return]
            budget_s = self.grace_s + received / self.min_bytes_per_s - waited_s
            since = loop.time()
            try:
                # A spent budget still takes a message that is already there (the server was the slow one).
                async with asyncio.timeout(max(budget_s, 0.0)):
                    message: dict[str, Any] = await receive()
            except TimeoutError:
                rate = f"{self.min_bytes_per_s:g} bytes/s after {self.grace_s:g} s"
                raise BodyRefused(
                    408, f"request body too slow: {received} bytes so far, under {rate}"
                ) from None
            finally:
                waited_s += loop.time() - since
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if max_bytes is not None and received > max_bytes:
                    raise BodyRefused(413, f"request body over the {max_bytes}-byte limit")
                body_done = not message.get("more_body", False)
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, paced_receive, watched_send)
        except BodyRefused as error:
            # Raised outside FastAPI's exception handling (a plain ASGI read): answer here if nothing was sent.
            if started:
                raise
            await _refuse(send, error.status_code, str(error.detail))


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


class _HeaderBytes:
    """The bytes of a request's line and headers, counted as they arrive up to the blank line that ends them.

    Counted before the parser sees them, so that headers over the bound are refused however the client splits
    them: whole reads that complete the headers would otherwise pass uncounted (a 120 KB header in one write).
    Bytes after the blank line (the body, a pipelined request) are not header bytes. Headers ended by bare line
    feeds are counted whole with what follows them: the bound errs on the side of refusing.
    """

    def __init__(self) -> None:
        self.count = 0
        self._tail = b""  # the last bytes of the previous read: the blank line may straddle two reads

    def add(self, data: bytes, whole: bool = False) -> int:
        """Count ``data`` up to the blank line, or ``whole``; the count so far."""
        window = self._tail + data
        end = -1 if whole else window.find(b"\r\n\r\n")
        if end < 0:
            self.count += len(data)
            self._tail = window[-3:]
        else:
            self.count += end + 4 - len(self._tail)
        return self.count

    def reset(self) -> None:
        self.count = 0
        self._tail = b""


class _HeaderDeadline:
    """The header guards both protocols share: a deadline armed while a request's headers are awaited, cancelled
    once they are in (`_headers_too_slow`, each protocol's own, runs when it expires), and their bytes counted."""

    header_timeout: float
    loop: asyncio.AbstractEventLoop
    config: Any  # uvicorn's Config
    _header_deadline: asyncio.TimerHandle | None = None
    _header_bytes: _HeaderBytes
    _admit: Callable[[object], bool]  # the per-IP connection cap (a staticmethod of each protocol)
    _headers_too_slow: Callable[[], None]  # each protocol closes a too-slow connection its own way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header_bytes = _HeaderBytes()
        if not self._admit(self):
            transport.close()
            return
        self._arm()

    def _headers_over_bound(self, data: bytes, whole: bool = False) -> bool:
        """Count `data`, which arrived while headers are awaited: whether the headers are now over the bound."""
        max_bytes = self.config.h11_max_incomplete_event_size or _DEFAULT_MAX_HEADER_BYTES
        return bool(self._header_bytes.add(data, whole) > max_bytes)

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
        _message_ended = False  # a request ended within the read being parsed
        _body_bytes = 0  # body bytes in the read being parsed
        # httptools parses bytes that follow a complete request while that request is still being answered (h11
        # waits). A refusal of those bytes waits for the answer, as under h11, instead of cutting it off.
        _after_response: Callable[[], None] | None = None
        _admit = staticmethod(admit)

        def data_received(self, data: bytes) -> None:
            if self._awaiting_headers:
                if self._header_deadline is None:
                    self._arm()
                if self._headers_over_bound(data):
                    self._refuse(self._headers_too_large)
                    return
            self._message_ended, self._body_bytes = False, 0
            super().data_received(data)
            if self._message_ended and self._awaiting_headers:
                # A request ended within this read and the next one's headers began (pipelined): httptools
                # gives no offset, so the read less its body bytes is counted, which errs by the ended requests'
                # headers and chunk framing, on the side of refusing.
                self._header_bytes.reset()
                if self._headers_over_bound(data[self._body_bytes :], whole=True):
                    self._refuse(self._headers_too_large)

        def on_body(self, body: bytes) -> None:
            self._body_bytes += len(body)
            super().on_body(body)

        def on_headers_complete(self) -> None:
            self._awaiting_headers = False
            self._header_bytes.reset()
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
            if self._awaiting_request():
                if self._header_deadline is None:
                    self._arm()
                # h11 bounds only headers still incomplete at the end of a read: whole ones are counted here.
                if self._headers_over_bound(data):
                    self._headers_too_large()
                    return
            super().data_received(data)
            if not self._awaiting_request():
                self._disarm()  # the headers are in; the app now reads the body at its own pace
                self._header_bytes.reset()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _awaiting_request(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def _headers_too_large(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(_HEADERS_TOO_LARGE)
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
