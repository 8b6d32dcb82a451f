"""S3Store: the ObjectStore on any S3-compatible bucket (AWS S3, R2, MinIO, moto), with SigV4 presigned URLs."""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from iota.storage.base import (
    MiB,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    check_key,
    check_prefix,
    check_presign,
    check_range,
    etag_of,
)

MIN_PART_SIZE = 5 * MiB  # S3 refuses smaller parts (except the last)
MAX_PARTS = 10_000
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer
MAX_DELETE_KEYS = 1000  # DeleteObjects takes at most this many keys
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _full_object_sha256(reply: dict[str, Any]) -> str | None:
    """The hex SHA256 S3 computed over the whole object, if the HEAD reports one (a composite checksum of a
    multipart upload's parts is not a digest of the object, and is ignored)."""
    encoded = reply.get("ChecksumSHA256")
    if not encoded or reply.get("ChecksumType") == "COMPOSITE":
        return None
    try:
        digest = base64.b64decode(str(encoded), validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest.hex() if len(digest) == 32 else None


class S3Store(ObjectStore):
    """Objects in one bucket. Objects of multipart_threshold bytes or more go up in parts of part_size.

    `endpoint_url` is None for AWS; any other endpoint gets path-style addressing (bucket in the path), which
    every S3-compatible server accepts. `presign_endpoint_url` signs URLs for the host that miners reach when it
    differs from the one this process uses (e.g. inside a container network).
    """

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
        max_concurrency: int = 4,
        presign_endpoint_url: str | None = None,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(
                f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum), got {part_size}"
            )
        if multipart_threshold < part_size:
            raise ValueError("multipart_threshold must be at least part_size")
        self.bucket = bucket
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max(1, max_concurrency)
        # One session per store, not boto3's module-level default one.
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region
        )
        self._client = self._make_client(session, endpoint_url, region)
        self._presigner = (
            self._make_client(session, presign_endpoint_url, region) if presign_endpoint_url else self._client
        )

    @staticmethod
    def _make_client(session: boto3.session.Session, endpoint_url: str | None, region: str) -> Any:
        config = Config(
            signature_version="s3v4",
            retries={"max_attempts": 5, "mode": "standard"},
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            max_pool_connections=32,
            # botocore >= 1.36 adds CRC checksums to every request by default, which several S3-compatible
            # servers reject; ask for them only where the API requires one.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def _call(self, operation: str, **params: Any) -> Any:
        """One API call; a missing key becomes ObjectNotFound and every other failure a StoreError."""
        try:
            return getattr(self._client, operation)(Bucket=self.bucket, **params)
        except ClientError as err:
            if _error_code(err) in _NOT_FOUND:
                raise ObjectNotFound(params.get("Key", "")) from err
            raise StoreError(f"S3 {operation} failed: {err}") from err
        except BotoCoreError as err:
            raise StoreError(f"S3 {operation} failed: {err}") from err

    # --- writes ------------------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        check_key(key)
        metadata = {"sha256": hashlib.sha256(data).hexdigest()}
        if len(data) < self.multipart_threshold:
            self._call("put_object", Key=key, Body=data, Metadata=metadata)
        else:
            self._put_multipart(key, data, metadata)

    def _part_size_for(self, size: int) -> int:
        # Grow parts for huge objects so they fit in S3's 10,000-part limit (expected_etag follows the same rule).
        return max(self.part_size, -(-size // MAX_PARTS))

    def _put_multipart(self, key: str, data: bytes, metadata: dict[str, str]) -> None:
        part_size = self._part_size_for(len(data))
        upload_id = self._call("create_multipart_upload", Key=key, Metadata=metadata)["UploadId"]
        view = memoryview(data)
        offsets = range(0, len(data), part_size)

        def upload_part(number_and_offset: tuple[int, int]) -> dict[str, Any]:
            number, offset = number_and_offset
            body = view[offset : offset + part_size].tobytes()
            reply = self._call("upload_part", Key=key, UploadId=upload_id, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": reply["ETag"]}

        try:
            with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
                parts = list(pool.map(upload_part, enumerate(offsets, start=1)))
            self._call(
                "complete_multipart_upload", Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Uncompleted uploads are billed until aborted.
            try:
                self._call("abort_multipart_upload", Key=key, UploadId=upload_id)
            except StoreError:
                pass  # the original error matters more; a lifecycle rule reaps what is left
            raise

    def expected_etag(self, data: bytes) -> str:
        if len(data) < self.multipart_threshold:
            return etag_of(data)
        return etag_of(data, self._part_size_for(len(data)))

    def delete(self, key: str) -> None:
        self._call("delete_object", Key=check_key(key))

    def delete_many(self, keys: Sequence[str]) -> None:
        """DeleteObjects, up to S3's 1,000 keys per request; a key S3 could not delete is a StoreError."""
        checked = [check_key(key) for key in keys]
        for start in range(0, len(checked), MAX_DELETE_KEYS):
            batch = [{"Key": key} for key in checked[start : start + MAX_DELETE_KEYS]]
            reply = self._call("delete_objects", Delete={"Objects": batch, "Quiet": True})
            if reply.get("Errors"):
                raise StoreError(f"S3 delete_objects left {len(reply['Errors'])} keys: {reply['Errors'][:3]}")

    # --- reads -------------------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        body = self._call("get_object", Key=check_key(key))["Body"]
        with body:
            return bytes(body.read())

    def get_range(self, key: str, start: int, end: int) -> bytes:
        check_key(key)
        check_range(start, end)
        if start == end:
            self._call("head_object", Key=key)  # still report a missing key
            return b""
        body = self._call("get_object", Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
        with body:
            return bytes(body.read())

    def head(self, key: str) -> ObjectInfo | None:
        try:
            reply = self._call("head_object", Key=check_key(key), ChecksumMode="ENABLED")
        except ObjectNotFound:
            return None
        etag = str(reply["ETag"]).strip('"')
        # A plain ETag is the md5 of the object, except after multipart ('-N') or SSE-KMS (then not 32 hex).
        is_md5 = len(etag) == 32 and all(c in "0123456789abcdef" for c in etag)
        return ObjectInfo(
            key=key,
            size=int(reply["ContentLength"]),
            etag=etag,
            md5=etag if is_md5 else None,
            sha256=_full_object_sha256(reply) or reply.get("Metadata", {}).get("sha256"),
        )

    def confirm(self, key: str) -> ObjectInfo | None:
        """Have S3 compute the object's SHA256 itself: a server-side copy onto itself with a SHA256 checksum
        (no byte passes through this process), then a HEAD that reports it. A presigned upload carries no sha256
        S3 has checked, and its writer's metadata is dropped, so only S3's own digest is returned."""
        try:
            self._call(
                "copy_object",
                Key=check_key(key),
                CopySource={"Bucket": self.bucket, "Key": key},
                ChecksumAlgorithm="SHA256",
                MetadataDirective="REPLACE",  # also what makes a copy onto itself legal
            )
        except ObjectNotFound:
            return None
        # With the writer's metadata gone, a sha256 here is S3's checksum (None if the object was replaced since).
        return self.head(key)

    def list(self, prefix: str) -> builtins.list[str]:
        check_prefix(prefix)
        keys: builtins.list[str] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        except (ClientError, BotoCoreError) as err:
            raise StoreError(f"S3 list of {prefix!r} failed: {err}") from err
        return sorted(keys)

    # --- presigned URLs ----------------------------------------------------------------------------------------

    def presign_get(self, key: str, expires_s: int) -> str:
        check_presign(expires_s)
        return self._presign("get_object", {"Key": check_key(key)}, expires_s)

    def presign_put(self, key: str, expires_s: int, content_length: int, once: bool = False) -> str:
        check_presign(expires_s, content_length)
        # ContentLength becomes a signed header: S3 refuses a PUT of any other size. So does If-None-Match with
        # `once`: the writer must send "If-None-Match: *", and S3 refuses (412) a PUT to a key that holds an object.
        params: dict[str, Any] = {"Key": check_key(key), "ContentLength": content_length}
        if once:
            params["IfNoneMatch"] = "*"
        return self._presign("put_object", params, expires_s)

    def _presign(self, operation: str, params: dict[str, Any], expires_s: int) -> str:
        if expires_s > MAX_PRESIGN_S:
            raise ValueError(f"SigV4 presigned URLs live at most {MAX_PRESIGN_S} s, asked for {expires_s}")
        return str(
            self._presigner.generate_presigned_url(
                operation, Params={"Bucket": self.bucket, **params}, ExpiresIn=expires_s
            )
        )
