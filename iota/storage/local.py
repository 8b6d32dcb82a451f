"""LocalStore: objects as files under one directory, and the HTTP router that serves its HMAC-presigned URLs."""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlencode

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from iota.storage.base import (
    InvalidKey,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    check_key,
    check_prefix,
    check_presign,
    check_range,
)

# A key's last segment gets one of these suffixes on disk. '~' is outside the key alphabet, so the file of key
# "a" ("a.~obj") can never collide with the directory of key "a/b" ("a/"), and no key maps to a temp or meta file.
_DATA = ".~obj"
_META = ".~meta"
_TMP = ".~tmp-"
_CHUNK = 1024 * 1024
# Objects up to this size are served without a worker thread: with a busy event loop each thread hop waits for it,
# and hashing 1 MiB (md5 and sha256) on the loop costs ~2 ms. An activation of the tiny preset at micro-batch 4 is
# 256 KiB plus its header: under a 256 KiB threshold each PUT of one took a thread hop per piece, plus two.
INLINE_MAX_BYTES = 1024 * 1024


class _PendingObject:
    """One write in progress: a temp file beside the target, hashed as it grows, renamed into place on commit."""

    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self.meta_path = data_path.with_name(data_path.name[: -len(_DATA)] + _META)
        token = secrets.token_hex(8)
        self._tmp = data_path.with_name(f"{data_path.name}{_TMP}{token}")
        self._meta_tmp = data_path.with_name(f"{self.meta_path.name}{_TMP}{token}")
        self._md5 = hashlib.md5()
        self._sha256 = hashlib.sha256()
        self.size = 0
        self._file = self._open()

    def _open(self) -> BinaryIO:
        # A concurrent delete may prune the (empty) parent directory between mkdir and open: retry once more.
        for attempt in range(3):
            self.data_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return open(self._tmp, "xb")
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._md5.update(chunk)
        self._sha256.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        """The hex digest of what was written so far."""
        return self._sha256.hexdigest()

    def commit(self, replace: bool = True) -> str:
        """Move the object into place; returns its md5 hex (the ETag). Without `replace`, ObjectExists if the key
        already holds an object (this write is then aborted)."""
        self._file.close()
        stat = os.stat(self._tmp)
        md5 = self._md5.hexdigest()
        # The sidecar names the data file it describes (inode, size, mtime), so a stale sidecar is detected.
        meta = {
            "ino": stat.st_ino,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "md5": md5,
            "sha256": self._sha256.hexdigest(),
        }
        self._meta_tmp.write_text(json.dumps(meta))
        # No fsync: the store must survive a process restart, which the page cache does; rename keeps it atomic.
        if replace:
            os.replace(self._tmp, self.data_path)
        else:
            try:  # a link is an atomic create-if-absent: of two racing writes, one wins
                os.link(self._tmp, self.data_path)
            except FileExistsError:
                self.abort()
                raise ObjectExists(f"{self.data_path.name[: -len(_DATA)]!r} is written once") from None
            os.unlink(self._tmp)
        os.replace(self._meta_tmp, self.meta_path)
        return md5

    def abort(self) -> None:
        self._file.close()
        for path in (self._tmp, self._meta_tmp):
            path.unlink(missing_ok=True)


class LocalStore(ObjectStore):
    """Objects as files under `root`; presigned URLs point at `base_url`, where local_store_router(self) is mounted.

    `base_url` includes the router's mount prefix, e.g. "http://127.0.0.1:8000/storage" for prefix "/storage".
    `secret` signs the URLs (HMAC-SHA256); `now` is the clock that expiry is checked against.
    """

    def __init__(
        self, root: Path, base_url: str, secret: bytes, now: Callable[[], float] = time.time
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the URL signing secret must be at least 16 bytes")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_url = base_url.rstrip("/")
        self._secret = secret
        self.now = now

    # --- paths -------------------------------------------------------------------------------------------------

    def data_path(self, key: str) -> Path:
        """The file holding `key`; InvalidKey for any key that could leave `root`."""
        *dirs, leaf = check_key(key).split("/")
        return self.root.joinpath(*dirs, leaf + _DATA)

    def _key_of(self, data_path: Path) -> str:
        relative = data_path.relative_to(self.root).as_posix()
        return relative[: -len(_DATA)]

    # --- ObjectStore -------------------------------------------------------------------------------------------

    def begin_write(self, key: str) -> _PendingObject:
        """Start writing `key`; the caller writes chunks, then commits or aborts."""
        return _PendingObject(self.data_path(key))

    def put(self, key: str, data: bytes) -> None:
        pending = self.begin_write(key)
        try:
            pending.write(data)
            pending.commit()
        except BaseException:
            pending.abort()
            raise

    def get(self, key: str) -> bytes:
        try:
            return self.data_path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        check_range(start, end)
        try:
            with open(self.data_path(key), "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if start == end:
                    return b""
                if start >= size:
                    raise StoreError(f"range start {start} is past the end of {key!r} ({size} bytes)")
                file.seek(start)
                return file.read(min(end, size) - start)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def head(self, key: str) -> ObjectInfo | None:
        path = self.data_path(key)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        meta = self._read_meta(path.with_name(path.name[: -len(_DATA)] + _META))
        fresh = meta.get("ino") == stat.st_ino and meta.get("size") == stat.st_size
        if fresh and meta.get("mtime_ns") == stat.st_mtime_ns:
            md5, sha256 = str(meta["md5"]), str(meta["sha256"])
        else:
            # Sidecar missing or stale (a crash between the two renames): hash the data itself.
            md5, sha256 = self._hash_file(path)
        return ObjectInfo(key=key, size=stat.st_size, etag=md5, md5=md5, sha256=sha256)

    @staticmethod
    def _read_meta(meta_path: Path) -> dict[str, object]:
        try:
            loaded = json.loads(meta_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    @staticmethod
    def _hash_file(path: Path) -> tuple[str, str]:
        md5, sha256 = hashlib.md5(), hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(_CHUNK):
                md5.update(chunk)
                sha256.update(chunk)
        return md5.hexdigest(), sha256.hexdigest()

    def delete(self, key: str) -> None:
        path = self.data_path(key)
        path.unlink(missing_ok=True)
        path.with_name(path.name[: -len(_DATA)] + _META).unlink(missing_ok=True)
        # Prune emptied directories so that expired epochs leave nothing for list() to walk.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone): stop pruning
                break
            parent = parent.parent

    def list(self, prefix: str) -> builtins.list[str]:
        *dirs, _partial = check_prefix(prefix).split("/")
        start = self.root.joinpath(*dirs)
        keys = []
        for directory, _subdirs, files in os.walk(start):
            for name in files:
                if name.endswith(_DATA):
                    key = self._key_of(Path(directory) / name)
                    if key.startswith(prefix):
                        keys.append(key)
        return sorted(keys)

    # --- presigned URLs ----------------------------------------------------------------------------------------

    def signature(self, method: str, key: str, expires: int, size: int | None, once: bool = False) -> str:
        """HMAC-SHA256 over everything a URL grants: method, key, expiry, (for PUT) the exact size, and whether
        the key is written once (dropping `once` from a URL breaks its signature)."""
        fields = [method, key, str(expires), "" if size is None else str(size)]
        if once:
            fields.append("once")
        return hmac.new(self._secret, "\n".join(fields).encode(), hashlib.sha256).hexdigest()

    def _presign(self, method: str, key: str, expires_s: int, size: int | None, once: bool = False) -> str:
        check_key(key)
        expires = int(self.now()) + expires_s
        params: dict[str, str | int] = {"method": method, "expires": expires}
        if size is not None:
            params["size"] = size
        if once:
            params["once"] = 1
        params["sig"] = self.signature(method, key, expires, size, once)
        return f"{self.base_url}/objects/{quote(key, safe='/')}?{urlencode(params)}"

    def presign_get(self, key: str, expires_s: int) -> str:
        check_presign(expires_s)
        return self._presign("GET", key, expires_s, None)

    def presign_put(self, key: str, expires_s: int, content_length: int, once: bool = False) -> str:
        check_presign(expires_s, content_length)
        return self._presign("PUT", key, expires_s, content_length, once)

    def verify(self, method: str, key: str, query: dict[str, str]) -> SignedGrant:
        """Check a presigned request's query and return what it grants, else raise URLRefused."""
        try:
            expires = int(query["expires"])
            size = int(query["size"]) if method == "PUT" else None
            claimed = query["sig"]
        except (KeyError, ValueError):
            raise URLRefused("missing or malformed signature parameters") from None
        once = query.get("once") == "1"
        if query.get("method") != method:
            raise URLRefused(f"this URL was not signed for {method}")
        if not hmac.compare_digest(claimed, self.signature(method, key, expires, size, once)):
            raise URLRefused("signature does not match this key, method, expiry and size")
        if self.now() > expires:
            raise URLRefused("URL expired")
        return SignedGrant(size, once)


@dataclass(frozen=True)
class SignedGrant:
    """What a verified presigned URL allows: the exact size of a PUT (None for a GET), and whether the key is
    written once."""

    size: int | None
    once: bool = False


class URLRefused(StoreError):
    """A presigned request whose signature, method or expiry does not hold."""


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """[start, end) for a single satisfiable byte range; None to serve everything; False if unsatisfiable."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None  # absent, malformed or multi-range: RFC 9110 lets a server ignore it and send the whole object
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)
        return (max(size - suffix, 0), size) if suffix > 0 and size > 0 else False
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or (last != "" and int(last) < start):
        return False
    return start, end


def _stream_file(file: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    try:
        file.seek(start)
        remaining = end - start
        while remaining > 0:
            chunk = file.read(min(_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
    finally:
        file.close()


async def _put_inline(store: LocalStore, key: str, request: Request, size: int, once: bool) -> Response:
    """A small upload, already checked against its signed size: buffered whole, then written and committed."""
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > size:
                raise ValueError("body longer than Content-Length")
            chunks.append(chunk)
        if received != size:
            raise ValueError(f"body ended after {received} of {size} bytes")
    except (ClientDisconnect, ValueError) as err:
        # Nothing touched the disk yet: an interrupted small upload leaves no temp file to clean.
        return _refusal(400, f"upload incomplete: {err or 'client disconnected'}")
    pending = store.begin_write(key)
    try:
        pending.write(b"".join(chunks))
        etag = pending.commit(replace=not once)
    except ObjectExists as err:
        return _written_once(store, key, pending, err)
    except BaseException:
        pending.abort()
        raise
    return Response(status_code=200, headers={"etag": f'"{etag}"'})


def _written_once(store: LocalStore, key: str, pending: _PendingObject, refusal: ObjectExists) -> Response:
    """A write-once key that already holds an object: the same bytes again are an honest retry (a reply that was
    lost) and succeed; other bytes are refused, so what the orchestrator accepted stays what it accepted."""
    held = store.head(key)
    if held is not None and held.sha256 == pending.sha256:
        return Response(status_code=200, headers={"etag": f'"{held.etag}"'})
    return _refusal(409, str(refusal))


def _refusal(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"detail": reason}, status_code=status)


def local_store_router(store: LocalStore, inline_max_bytes: int = INLINE_MAX_BYTES) -> APIRouter:
    """GET (with Range) and PUT on /objects/{key} for URLs that `store` presigned; mount where base_url points.

    Transfers of at most `inline_max_bytes` are read and written on the event loop; larger ones go through a
    worker thread, chunk by chunk, so that hashing and disk I/O of big objects do not stall other requests.
    """
    router = APIRouter()

    @router.get("/objects/{key:path}")
    async def get_object(key: str, request: Request) -> Response:
        try:
            store.verify("GET", key, dict(request.query_params))
            path = store.data_path(key)
        except InvalidKey as err:
            return _refusal(400, str(err))
        except URLRefused as err:
            return _refusal(403, str(err))
        try:
            # Hold the file open from here on, so a concurrent replace or delete cannot change what we send.
            file = open(path, "rb")
        except FileNotFoundError:
            return _refusal(404, f"no object {key!r}")
        size = os.fstat(file.fileno()).st_size
        byte_range = _parse_range(request.headers.get("range"), size)
        if byte_range is False:
            file.close()
            return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
        headers = {"accept-ranges": "bytes"}
        if isinstance(byte_range, tuple):
            start, end = byte_range
            headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
            status = 206
        else:
            start, end, status = 0, size, 200
        headers["content-length"] = str(end - start)
        if end - start <= inline_max_bytes:
            # A page-cached read of this size takes microseconds; a thread hop would wait for the busy loop twice.
            with file:
                file.seek(start)
                body = file.read(end - start)
            return Response(body, status_code=status, headers=headers, media_type="application/octet-stream")
        return StreamingResponse(
            _stream_file(file, start, end),
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )

    @router.put("/objects/{key:path}")
    async def put_object(key: str, request: Request) -> Response:
        try:
            grant = store.verify("PUT", key, dict(request.query_params))
            check_key(key)
        except InvalidKey as err:
            return _refusal(400, str(err))
        except URLRefused as err:
            return _refusal(403, str(err))
        size, once = grant.size or 0, grant.once
        # Refuse on the headers alone, before a single body byte is read: the signed size is the whole budget.
        declared = request.headers.get("content-length")
        if declared is None:
            return _refusal(411, "Content-Length is required (chunked uploads are refused)")
        if not declared.isdigit() or int(declared) != size:
            return _refusal(403, f"Content-Length {declared} differs from the signed size {size}")
        if size <= inline_max_bytes:
            return await _put_inline(store, key, request, size, once)
        pending = await anyio.to_thread.run_sync(store.begin_write, key)
        try:
            # The server hands over ~64 KiB at a time: one thread hop per _CHUNK, not per piece.
            buffered = bytearray()
            async for chunk in request.stream():
                if pending.size + len(buffered) + len(chunk) > size:
                    raise ValueError("body longer than Content-Length")
                buffered += chunk
                if len(buffered) >= _CHUNK:
                    await anyio.to_thread.run_sync(pending.write, bytes(buffered))
                    buffered.clear()
            if buffered:
                await anyio.to_thread.run_sync(pending.write, bytes(buffered))
            if pending.size != size:
                raise ValueError(f"body ended after {pending.size} of {size} bytes")
            etag = await anyio.to_thread.run_sync(pending.commit, not once)
        except ObjectExists as err:
            return await anyio.to_thread.run_sync(_written_once, store, key, pending, err)
        except (ClientDisconnect, ValueError) as err:
            await anyio.to_thread.run_sync(pending.abort)
            return _refusal(400, f"upload incomplete: {err or 'client disconnected'}")
        except BaseException:
            await anyio.to_thread.run_sync(pending.abort)
            raise
        return Response(status_code=200, headers={"etag": f'"{etag}"'})

    return router
