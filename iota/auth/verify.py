"""Server side of hotkey-signed requests: the FastAPI dependency that hands each route its verified caller.

The signed message and request headers are specified in ``iota.auth.signing``. Wiring::

    authenticator = Authenticator(receiver_hotkey=my_ss58, lookup=chain.neuron,
                                  nonce_store=SqliteNonceStore(run_dir / "nonces.sqlite"), ...)
    install_auth(app, authenticator, ip_limiter=RateLimiter(20, 40), trusted_proxies=["127.0.0.1"])
    router = APIRouter(dependencies=[Depends(check_protocol_version)])

    @router.post("/work")
    async def work(caller: Caller) -> ...:   # or Miner / Validator / Operator from iota.auth.roles
        caller.hotkey, caller.neuron, caller.body

Refusals are JSON ``{"detail": {"code": ..., "message": ..., ...}}`` and carry the code in ``X-Iota-Auth-Error``:

=====  =====================  =================================================================================
426    protocol_mismatch      ``X-Iota-Protocol`` missing or different; the message says what to upgrade
401    malformed              a btauth header is missing or unparseable
401    wrong_receiver         signed for another receiver hotkey (or for none)
401    stale_timestamp        signed more than ``max_age_s`` ago; detail has ``server_time`` and ``offset_s``
401    future_timestamp       signed more than ``max_future_s`` ahead; detail has ``server_time`` and ``offset_s``
401    before_server_start    signed before this server process started (a replay across a restart)
401    bad_signature          the signature does not verify for the claimed hotkey (forgery, tampered body/query)
401    replayed_nonce         this hotkey already used this nonce
403    unregistered           the hotkey is neither registered on the subnet nor the run operator
429    rate_limited           per-hotkey (here) or per-IP (``IPRateLimitMiddleware``) bucket empty; Retry-After
=====  =====================  =================================================================================

Every 401 carries ``WWW-Authenticate: btauth/1``. Every response carries ``Date`` and ``X-Iota-Server-Time``
(from the verifier's clock, so clients learn their offset; serve with ``uvicorn.run(..., date_header=False)`` to
avoid uvicorn adding a second ``Date``) and ``X-Iota-Protocol``.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, NoReturn

from bittensor import http_auth
from fastapi import Depends, FastAPI, HTTPException, Request

from iota.auth.nonces import NonceStore
from iota.auth.ratelimit import IPRateLimitMiddleware, RateLimiter, retry_after_header
from iota.auth.signing import AUTH_ERROR_HEADER, SERVER_TIME_HEADER
from iota.chain.base import Neuron
from iota.protocol.version import CLIENT_HEADER, PROTOCOL_VERSION, VERSION_HEADER


@dataclass(frozen=True)
class VerifiedCaller:
    """Who sent this request, proven by signature; ``body`` is exactly the bytes the signature covers."""

    hotkey: str  # ss58
    neuron: Neuron | None  # None only for the run operator (or when unregistered callers are allowed)
    body: bytes = field(repr=False)
    nonce_ns: int  # also the signing time, in the caller's corrected clock


def reject(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> NoReturn:
    """Raise the HTTPException every refusal of this package uses: a coded JSON detail and the code as a header."""
    all_headers = {AUTH_ERROR_HEADER: code, **(headers or {})}
    if status == 401:
        all_headers["WWW-Authenticate"] = http_auth.PROTOCOL
    raise HTTPException(
        status, detail={"code": code, "message": message, **(extra or {})}, headers=all_headers
    )


_BT_ERRORS: tuple[tuple[type[http_auth.AuthError], str], ...] = (
    (http_auth.MalformedAuth, "malformed"),
    (http_auth.WrongReceiver, "wrong_receiver"),
    (http_auth.StaleRequest, "stale_timestamp"),
    (http_auth.BadSignature, "bad_signature"),
    (http_auth.ReplayedRequest, "replayed_nonce"),
)


class Authenticator:
    """Verifies btauth/1 requests addressed to ``receiver_hotkey`` and holds the settings of the role checks.

    ``lookup`` maps a hotkey to its registered ``Neuron`` (the chain registry, a dict in tests). Requests signed
    before this object was created are refused whatever the nonce store remembers, so a replay across a restart
    fails even if the store file was lost. ``path_prefix`` is the prefix a reverse proxy strips (the client signs
    the path it sent the proxy); when empty, the ASGI ``root_path`` is used.
    """

    def __init__(
        self,
        receiver_hotkey: str,
        lookup: Callable[[str], Neuron | None],
        nonce_store: NonceStore,
        *,
        max_age_s: float = 10.0,
        max_future_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        path_prefix: str = "",
        operator_hotkey: str | None = None,
        min_stake: float = 0.0,
        allow_unregistered: bool = False,
        hotkey_limiter: RateLimiter | None = None,
    ) -> None:
        self.receiver_hotkey = receiver_hotkey
        self.lookup = lookup
        self.nonce_store = nonce_store
        self.max_age_s = max_age_s
        self.max_future_s = max_future_s
        self.clock = clock
        self.path_prefix = path_prefix.rstrip("/")
        self.operator_hotkey = operator_hotkey
        self.min_stake = min_stake
        self.allow_unregistered = allow_unregistered
        self.hotkey_limiter = hotkey_limiter
        self.started_ns = int(clock() * 1e9)

    async def authenticate(self, request: Request) -> VerifiedCaller:
        """The verified caller of ``request``, or an HTTPException (401/403/429) saying why not."""
        body = await request.body()
        now = self.clock()
        now_ns = int(now * 1e9)
        self._check_time(request.headers.get(http_auth.HEADER_NONCE), now, now_ns)
        try:
            verified = http_auth.verify(
                request.headers,
                body,
                method=request.method,
                path=self.signed_target(request.scope),
                self_hotkey_ss58=self.receiver_hotkey,
                max_age=self.max_age_s,
                allowed_skew=self.max_future_s,
                nonce_store=self.nonce_store,
                now_ns=now_ns,
            )
        except http_auth.AuthError as error:
            code = next((code for kind, code in _BT_ERRORS if isinstance(error, kind)), "unauthorized")
            hint = f" (this server's hotkey is {self.receiver_hotkey})" if code == "wrong_receiver" else ""
            reject(401, code, f"{error}{hint}")
        hotkey = verified.hotkey_ss58
        # Proven from here on: an error handler outside the route (a malformed body) can hold the hotkey to account.
        request.state.caller_hotkey = hotkey
        neuron = self.lookup(hotkey)
        if neuron is None and hotkey != self.operator_hotkey and not self.allow_unregistered:
            reject(403, "unregistered", f"hotkey {hotkey} is not registered on this subnet")
        if self.hotkey_limiter is not None:
            wait_s = self.hotkey_limiter.acquire(hotkey)
            if wait_s > 0.0:
                message = f"too many requests from hotkey {hotkey}; retry in {wait_s:.1f} s"
                reject(429, "rate_limited", message, headers=retry_after_header(wait_s))
        return VerifiedCaller(hotkey=hotkey, neuron=neuron, body=body, nonce_ns=verified.nonce_ns)

    def signed_target(self, scope: Mapping[str, Any]) -> str:
        """The request target the client signed: the proxy prefix, the path as sent, and ``?query`` if any."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1")
        prefix = self.path_prefix or scope.get("root_path", "").rstrip("/")
        # uvicorn --root-path already puts the prefix into raw_path; a stripping proxy leaves it out.
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            path = prefix + path
        query = scope.get("query_string", b"").decode("latin-1")
        return f"{path}?{query}" if query else path

    def _check_time(self, raw_nonce: str | None, now: float, now_ns: int) -> None:
        # http_auth.verify checks freshness too, but cannot say by how much a clock is off; these messages do.
        try:
            nonce_ns = int(raw_nonce or "")
        except ValueError:
            return  # missing or malformed: http_auth.verify names the header
        offset_s = (nonce_ns - now_ns) / 1e9
        if -self.max_age_s <= offset_s <= self.max_future_s and nonce_ns >= self.started_ns:
            return  # the common case, decided before any message is formatted
        server_time = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")
        clock = {"server_time": now, "offset_s": round(offset_s, 3)}
        if -offset_s > self.max_age_s:
            message = (
                f"timestamp is {-offset_s:.1f} s old (limit {self.max_age_s:g} s): your clock is about "
                f"{-offset_s:.1f} s behind the server's ({server_time}); sync it (NTP) and sign again"
            )
            reject(401, "stale_timestamp", message, extra=clock)
        if offset_s > self.max_future_s:
            message = (
                f"timestamp is {offset_s:.1f} s in the future (limit {self.max_future_s:g} s): your clock is about "
                f"{offset_s:.1f} s ahead of the server's ({server_time}); sync it (NTP) and sign again"
            )
            reject(401, "future_timestamp", message, extra=clock)
        if nonce_ns < self.started_ns:
            started = datetime.fromtimestamp(self.started_ns / 1e9, timezone.utc).isoformat(
                timespec="milliseconds"
            )
            message = f"request was signed before this server started ({started}); sign it again"
            reject(401, "before_server_start", message, extra=clock)


async def verified_caller(request: Request) -> VerifiedCaller:
    """FastAPI dependency: verify the request with the app's ``app.state.authenticator``."""
    authenticator: Authenticator = request.app.state.authenticator
    return await authenticator.authenticate(request)


Caller = Annotated[VerifiedCaller, Depends(verified_caller)]
"""A route parameter of this type receives the verified caller (FastAPI verifies once per request)."""


async def check_protocol_version(request: Request) -> None:
    """FastAPI dependency (put it on the API routers): 426 unless the client speaks this server's protocol."""
    sent = request.headers.get(VERSION_HEADER)
    if sent == str(PROTOCOL_VERSION):
        return
    client = request.headers.get(CLIENT_HEADER, "unknown version")
    if sent is not None and sent.isdigit() and int(sent) > PROTOCOL_VERSION:
        advice = f"this server is older than your client: ask its operator to upgrade iota, or use an iota release that speaks protocol {PROTOCOL_VERSION}"
    else:
        advice = f"upgrade iota (git pull && bash setup.sh, or pip install -U iota) to a release that speaks protocol {PROTOCOL_VERSION}, then restart"
    message = (
        f"this server speaks iota protocol {PROTOCOL_VERSION}; your client (iota {client}) sent "
        f"{VERSION_HEADER}: {sent if sent is not None else 'none'}. {advice}"
    )
    extra = {"server_protocol": PROTOCOL_VERSION, "client_protocol": sent}
    reject(426, "protocol_mismatch", message, extra=extra)


_SERVER_TIME = SERVER_TIME_HEADER.lower().encode()
_PROTOCOL = (VERSION_HEADER.lower().encode(), str(PROTOCOL_VERSION).encode())


class ServerHeadersMiddleware:
    """ASGI middleware: every response says the server's time (``Date``, ``X-Iota-Server-Time``) and protocol."""

    def __init__(self, app: Any, clock: Callable[[], float] = time.time, date: bool = True) -> None:
        self.app = app
        self.clock = clock
        self.date = date
        self._date_second: int | None = None
        self._date_value = b""

    def _date(self, now: float) -> bytes:
        # Date has one-second resolution: formatted once per second, not once per response.
        second = int(now)
        if second != self._date_second:
            self._date_second, self._date_value = second, email.utils.formatdate(second, usegmt=True).encode()
        return self._date_value

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                now = self.clock()
                headers = list(message.get("headers", []))
                if self.date and not any(name.lower() == b"date" for name, _ in headers):
                    headers.append((b"date", self._date(now)))
                headers.append((_SERVER_TIME, f"{now:.3f}".encode()))
                headers.append(_PROTOCOL)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_auth(
    app: FastAPI,
    authenticator: Authenticator,
    *,
    ip_limiter: RateLimiter | None = None,
    trusted_proxies: Iterable[str] = (),
    ip_exempt_paths: Iterable[str] = (),
    date_header: bool = True,
) -> None:
    """Put ``authenticator`` where the dependencies find it and add the per-IP limit and the server headers.

    The header middleware is outermost, so even a 429 from the IP limiter tells the client the server's time.
    """
    app.state.authenticator = authenticator
    if ip_limiter is not None:
        app.add_middleware(
            IPRateLimitMiddleware,
            limiter=ip_limiter,
            trusted_proxies=list(trusted_proxies),
            exempt_paths=list(ip_exempt_paths),
        )
    app.add_middleware(ServerHeadersMiddleware, clock=authenticator.clock, date=date_header)
