"""Client side of hotkey-signed requests: an httpx auth that signs every request to the orchestrator.

The protocol is bittensor's ``btauth/1`` (``bittensor.http_auth``), bound to the orchestrator's hotkey. The client
signs, with its sr25519 hotkey, the UTF-8 bytes of these eight lines joined by ``\\n`` (no trailing newline)::

    btauth/1
    sr25519
    <METHOD, upper case>
    <request target: the path as sent to the server's public address, percent-encoded, plus ?query if any>
    <sha256 of the raw body, lower-case hex (sha256 of b"" for no body)>
    <nonce: the signing time in integer nanoseconds since the Unix epoch, in the clock corrected by the offset>
    <caller hotkey, ss58>
    <receiver hotkey, ss58: the orchestrator's own>

and sends, besides ``X-Iota-Protocol: <PROTOCOL_VERSION>`` and ``X-Iota-Client: <iota version>``::

    X-Bittensor-Version:   1
    X-Bittensor-Hotkey:    <caller hotkey ss58>
    X-Bittensor-Receiver:  <receiver hotkey ss58>
    X-Bittensor-Nonce:     <nonce, decimal>
    X-Bittensor-Signature: 0x<64-byte sr25519 signature, hex>

The nonce is both the timestamp and the replay token: the server accepts it if it lies within 10 s before and
2 s after its own clock, is not earlier than the server's start, and was never used by this hotkey. The client
keeps its nonces strictly increasing, so two requests signed in the same nanosecond still differ.

Clocks drift. ``HotkeyAuth`` learns ``offset = server clock - local clock`` from its first response, and again from
a 401 whose ``X-Iota-Auth-Error`` says the timestamp was off (``stale_timestamp``, ``future_timestamp``,
``before_server_start``), after which it signs the request again (fresh nonce) and retries once. The server's
time comes from ``X-Iota-Server-Time`` (Unix seconds, millisecond precision) when present, else from ``Date``;
``Date`` has one-second resolution, so then the middle of that second is taken (error up to half a second).
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import httpx
from bittensor import http_auth

import iota
from iota.protocol.version import CLIENT_HEADER, PROTOCOL_VERSION, VERSION_HEADER

AUTH_ERROR_HEADER = "X-Iota-Auth-Error"
SERVER_TIME_HEADER = (
    "X-Iota-Server-Time"  # the server's clock, Unix seconds with milliseconds: finer than Date
)
RETRYABLE_CODES = frozenset({"stale_timestamp", "future_timestamp", "before_server_start"})
"""Refusals that a fresh signature from a corrected clock can cure; the client retries these once."""


def sign_headers(
    keypair: Any, receiver_hotkey: str, method: str, target: str, body: bytes, nonce_ns: int
) -> dict[str, str]:
    """The btauth/1 headers for one request; ``target`` is the path plus ``?query`` exactly as sent."""
    return http_auth.sign(
        keypair, method=method, path=target, body=body, receiver_ss58=receiver_hotkey, nonce_ns=nonce_ns
    )


def server_offset(response: httpx.Response, local_now: float) -> float | None:
    """``server clock - local clock`` from the response's ``X-Iota-Server-Time`` or else ``Date``; None without."""
    precise = response.headers.get(SERVER_TIME_HEADER)
    if precise is not None:
        try:
            return float(precise) - local_now
        except ValueError:
            pass  # fall back to Date
    for value in response.headers.get_list("date"):
        try:
            server_second = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            continue  # an unparseable Date from some proxy: try the next one
        return server_second + 0.5 - local_now
    return None


class HotkeyAuth(httpx.Auth):
    """Signs every request of an ``httpx.Client`` or ``httpx.AsyncClient`` with ``keypair`` for ``receiver_hotkey``.

    ``keypair`` is a ``bittensor.sp_core.Keypair`` (see ``iota.auth.wallet.load_hotkey``) or any bittensor
    ``Signer``. ``clock`` and ``offset_s`` are injectable: tests give a client a clock that runs fast.
    """

    requires_request_body = True  # the body's sha256 is signed

    def __init__(
        self,
        keypair: Any,
        receiver_hotkey: str,
        *,
        clock: Callable[[], float] = time.time,
        offset_s: float = 0.0,
    ) -> None:
        self.keypair = keypair
        self.receiver_hotkey = receiver_hotkey
        self.clock = clock
        self._offset_s = offset_s
        self._synced = False
        self._last_nonce_ns = 0
        self._lock = threading.Lock()  # one HotkeyAuth may serve several threads or tasks

    @property
    def hotkey(self) -> str:
        return str(self.keypair.ss58_address)

    @property
    def offset_s(self) -> float:
        """The correction added to the local clock when signing (server minus local, seconds)."""
        return self._offset_s

    def now(self) -> float:
        """The local clock corrected to the server's."""
        return self.clock() + self._offset_s

    def next_nonce(self) -> int:
        with self._lock:
            nonce_ns = max(int(self.now() * 1e9), self._last_nonce_ns + 1)
            self._last_nonce_ns = nonce_ns
            return nonce_ns

    def learn_offset(self, response: httpx.Response) -> None:
        """Take the clock offset from ``response``'s ``Date`` header (kept as it was if there is none)."""
        offset_s = server_offset(response, self.clock())
        if offset_s is None:
            return
        with self._lock:
            self._offset_s = offset_s
            self._synced = True
            # A smaller offset may put the next nonces below the last one; uniqueness only needs them increasing
            # from here on, and the old ones are then older than anything new.
            self._last_nonce_ns = 0

    def sign(self, request: httpx.Request) -> None:
        """Add the protocol and btauth/1 headers to ``request`` (its body must have been read)."""
        target = request.url.raw_path.decode("ascii")
        headers = sign_headers(
            self.keypair, self.receiver_hotkey, request.method, target, request.content, self.next_nonce()
        )
        request.headers.update(headers)
        request.headers[VERSION_HEADER] = str(PROTOCOL_VERSION)
        request.headers[CLIENT_HEADER] = iota.__version__

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self.sign(request)
        response = yield request
        first = not self._synced
        if first:
            self.learn_offset(response)
        if response.status_code == 401 and response.headers.get(AUTH_ERROR_HEADER) in RETRYABLE_CODES:
            if not first:
                self.learn_offset(response)
            self.sign(request)
            yield request
