"""Moving bytes through presigned URLs: what miners and validators use, holding URLs but no credentials.

Synchronous on purpose: async callers run these in a thread (anyio.to_thread / asyncio.to_thread) rather than
keeping a second copy of the same upload code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from iota.storage.base import StoreError

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)  # per network operation, not for the whole transfer
_RETRY_STATUS = frozenset({408, 429})  # the 4xx that mean "try again later"; all 5xx do too
MAX_BACKOFF_S = 30.0
T = TypeVar("T")


class TransferError(StoreError):
    """An upload or download through a presigned URL failed (after retries where retrying could help)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DigestMismatch(TransferError):
    """The downloaded bytes do not hash to the sha256 they were announced with."""


class TooLarge(TransferError):
    """The object is bigger than the caller agreed to receive."""


def _retryable(status: int) -> bool:
    return status >= 500 or status in _RETRY_STATUS


def _redact(url: str) -> str:
    # The query string is the credential: keep it out of error messages and logs.
    return url.split("?", 1)[0]


@contextmanager
def _client_or_new(client: httpx.Client | None) -> Iterator[httpx.Client]:
    if client is not None:
        yield client
        return
    with httpx.Client(timeout=DEFAULT_TIMEOUT) as new_client:
        yield new_client


def _with_retries(attempt: Callable[[], T], retries: int, backoff_s: float) -> T:
    """`attempt()`, tried again up to `retries` times while it raises _Retryable, after backoff_s, 2 backoff_s,
    4 backoff_s, ... (at most MAX_BACKOFF_S); the last _Retryable becomes a TransferError with its status."""
    policy = Retrying(
        retry=retry_if_exception_type(_Retryable),
        stop=stop_after_attempt(retries + 1),
        wait=wait_exponential(multiplier=backoff_s, max=MAX_BACKOFF_S),
        reraise=True,
    )
    try:
        return policy(attempt)
    except _Retryable as err:
        raise TransferError(str(err), status=err.status) from err.__cause__


def upload(
    url: str,
    data: bytes,
    client: httpx.Client | None = None,
    retries: int = 4,
    backoff_s: float = 0.5,
) -> None:
    """PUT `data` to a presigned URL with its exact Content-Length.

    Retries (doubling backoff_s) on connection errors, 5xx, 408 and 429; any other 4xx is final: the URL itself
    is wrong (expired, tampered, or signed for another size) and sending it again cannot help.
    """

    headers = {"content-length": str(len(data)), **_signed_conditions(url)}

    def put_once(http: httpx.Client) -> None:
        try:
            response = http.put(url, content=data, headers=headers)
        except httpx.TransportError as err:
            raise _Retryable(f"upload to {_redact(url)} failed: {err!r}") from err
        if response.is_success or (response.status_code == 412 and "if-none-match" in headers):
            # 412: a write-once key already holds an object, which only this URL can have written (a retry
            # whose first reply was lost): the report is checked against what the store holds.
            return
        message = f"upload to {_redact(url)} refused with {response.status_code}: {response.text[:300]}"
        # S3 answers 409 ConditionalRequestConflict to a conditional PUT racing another on the same key (our own
        # earlier attempt still in flight): asked again, it settles to 200 or 412. (LocalStore's 409, other bytes
        # at a write-once key, names no such code and is final.)
        racing = response.status_code == 409 and "ConditionalRequestConflict" in response.text
        if _retryable(response.status_code) or racing:
            raise _Retryable(message, response.status_code)
        raise TransferError(message, status=response.status_code)

    with _client_or_new(client) as http:
        _with_retries(lambda: put_once(http), retries, backoff_s)


def _signed_conditions(url: str) -> dict[str, str]:
    """The conditional headers an S3 URL was signed with, which S3 then requires: If-None-Match on a write-once
    key (iota.storage.s3). LocalStore's URLs carry write-once in their signed query instead."""
    signed = parse_qs(urlsplit(url).query).get("X-Amz-SignedHeaders", [""])[0].split(";")
    return {"if-none-match": "*"} if "if-none-match" in signed else {}


def download(
    url: str,
    expected_sha256: str | None,
    max_bytes: int,
    client: httpx.Client | None = None,
    retries: int = 4,
    backoff_s: float = 0.5,
    byte_range: tuple[int, int] | None = None,
) -> bytes:
    """GET a presigned URL, refusing more than max_bytes and checking the sha256 (of the range, if one is given).

    byte_range is [start, end) and must lie within the object. Retries as upload() does; TooLarge and
    DigestMismatch are final, since the same URL would give the same bytes.
    """
    headers = {}
    if byte_range is not None:
        start, end = byte_range
        if start < 0 or end <= start:
            raise ValueError(f"byte_range must be [start, end) with 0 <= start < end, got {byte_range}")
        headers["range"] = f"bytes={start}-{end - 1}"
    with _client_or_new(client) as http:
        data = _with_retries(
            lambda: _download_once(http, url, headers, max_bytes, byte_range), retries, backoff_s
        )
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise DigestMismatch(
                f"{_redact(url)}: sha256 {actual} differs from the expected {expected_sha256}"
            )
    return data


class _Retryable(Exception):
    """A failure that sending the same request again may cure: a dropped connection, a 5xx, 408 or 429."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _download_once(
    http: httpx.Client, url: str, headers: dict[str, str], max_bytes: int, byte_range: tuple[int, int] | None
) -> bytes:
    where = _redact(url)
    try:
        with http.stream("GET", url, headers=headers) as response:
            if not response.is_success:
                response.read()
                message = f"download of {where} refused with {response.status_code}: {response.text[:300]}"
                if _retryable(response.status_code):
                    raise _Retryable(message, response.status_code)
                raise TransferError(message, status=response.status_code)
            if byte_range is not None and response.status_code != 206:
                # A server that ignored Range would send the whole object: not what the caller asked for.
                raise TransferError(
                    f"download of {where} ignored the byte range", status=response.status_code
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise TooLarge(f"{where} is {declared} bytes, more than the {max_bytes} allowed")
            received = bytearray()
            for chunk in response.iter_raw():  # the stored bytes, even if a server sent them encoded
                received += chunk
                if len(received) > max_bytes:
                    raise TooLarge(f"{where} sent more than the {max_bytes} bytes allowed")
            if declared is not None and declared.isdigit() and len(received) != int(declared):
                raise _Retryable(f"download of {where} ended after {len(received)} of {declared} bytes")
            return bytes(received)
    except httpx.TransportError as err:
        raise _Retryable(f"download of {where} failed: {err!r}") from err
