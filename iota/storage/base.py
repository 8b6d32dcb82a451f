"""The ObjectStore interface every role sees, the key rules both stores enforce, and S3's ETag arithmetic."""

from __future__ import annotations

import builtins
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

MiB = 1024 * 1024

# S3 accepts almost any key, but a key is also a file path in LocalStore and a URL path in presigned URLs.
# One conservative alphabet keeps both safe: no '/', '..', '~', '%', spaces or a leading dot in any segment.
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]*")
MAX_KEY_BYTES = 1024  # S3's own limit


class StoreError(RuntimeError):
    """The object store refused or failed a request."""


class InvalidKey(StoreError, ValueError):
    """A key (or key component) outside the allowed alphabet, or one that could escape its prefix."""


class ObjectNotFound(StoreError, KeyError):
    """No object is stored under this key."""


class ObjectExists(StoreError):
    """A write-once key already holds an object (other bytes than those offered)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD tells about one stored object."""

    key: str
    size: int
    etag: (
        str  # without quotes; md5 hex for a single PUT, "<md5 of part md5s>-<parts>" after a multipart upload
    )
    md5: str | None  # hex digest of the whole object when the store knows it
    # Hex digest computed by the store from the bytes it holds (LocalStore always; S3 once the object carries a
    # SHA256 checksum, as after confirm()), else the one put() recorded beside the object; None if neither.
    sha256: str | None


def check_key(key: str) -> str:
    """Return `key` if it is a safe object key: '/'-separated segments from the allowed alphabet; else InvalidKey."""
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidKey(f"object key must be 1..{MAX_KEY_BYTES} bytes: {key!r}")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise InvalidKey(f"object key segment {segment!r} is not allowed in {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """Return `prefix` if every complete segment is allowed (the last may be partial or empty); else InvalidKey."""
    *whole, last = prefix.split("/")
    for segment in whole:
        if not _SEGMENT.fullmatch(segment):
            raise InvalidKey(f"prefix segment {segment!r} is not allowed in {prefix!r}")
    if last and not re.fullmatch(r"[A-Za-z0-9._=-]*", last):
        raise InvalidKey(f"prefix {prefix!r} has characters outside the key alphabet")
    return prefix


def multipart_etag(part_md5s: Sequence[bytes]) -> str:
    """S3's ETag for a multipart upload: md5 of the parts' binary md5 digests, then '-' and the part count."""
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


def etag_of(data: bytes, part_size: int | None = None) -> str:
    """The ETag S3 reports for `data`: its md5 for a single PUT, or the multipart ETag when sent in parts of part_size."""
    if part_size is None:
        return hashlib.md5(data).hexdigest()
    if part_size <= 0:
        raise ValueError(f"part_size must be positive, got {part_size}")
    view = memoryview(data)
    part_md5s = [
        hashlib.md5(view[start : start + part_size]).digest() for start in range(0, len(data), part_size)
    ]
    return multipart_etag(part_md5s)


class ObjectStore(ABC):
    """A flat bucket of immutable-by-convention objects. S3Store in production, LocalStore on one machine.

    Only the orchestrator holds an ObjectStore; miners and validators get presigned URLs and use `transfer`.
    """

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any previous object; the sha256 is recorded for head()."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; ObjectNotFound if absent."""

    @abstractmethod
    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object (end past the size is clipped); StoreError if start is past the end."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and digests, or None if absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting an absent key is not an error (as in S3)."""

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove every object named (absent ones are not an error); stores with a batch delete override this."""
        for key in keys:
            self.delete(key)

    @abstractmethod
    def list(self, prefix: str) -> builtins.list[str]:
        """Every key that starts with `prefix` (a plain string prefix, as in S3), sorted."""

    @abstractmethod
    def presign_get(self, key: str, expires_s: int) -> str:
        """A URL anyone holding it may GET (Range allowed) for expires_s seconds."""

    @abstractmethod
    def presign_put(self, key: str, expires_s: int, content_length: int, once: bool = False) -> str:
        """A URL that accepts a PUT of exactly content_length bytes to `key` for expires_s seconds.

        With `once`, the key is written once: a PUT to a key that already holds an object is refused (the store
        answers 409 or 412; an identical retry may be answered 200), so an upload the orchestrator accepted stays
        what it accepted while the URL still lives."""

    def confirm(self, key: str) -> ObjectInfo | None:
        """What the store itself vouches for of an object a presigned PUT wrote, or None if there is none.

        Asked when the orchestrator accepts an upload: the sha256 is computed by the store from the bytes it holds,
        never taken from the writer, so a report can be checked against it and only what the store confirms is
        recorded. This default is head(), for stores whose head() already hashes what they received (LocalStore).
        """
        return self.head(key)

    def expected_etag(self, data: bytes) -> str:
        """The ETag head() reports after put(key, data); stores that upload in parts override this."""
        return etag_of(data)


def check_range(start: int, end: int) -> None:
    """Refuse a byte range that no store could serve: negative, or ending before it starts."""
    if start < 0 or end < start:
        raise ValueError(f"byte range [{start}, {end}) is not valid")


def check_presign(expires_s: int, content_length: int | None = None) -> None:
    """Refuse presign arguments that would make a useless or unbounded URL."""
    if expires_s <= 0:
        raise ValueError(f"expires_s must be positive, got {expires_s}")
    if content_length is not None and content_length < 0:
        raise ValueError(f"content_length must be >= 0, got {content_length}")
