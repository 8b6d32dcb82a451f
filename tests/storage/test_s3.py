"""S3Store only: its presigned URLs are SigV4 and bind key, expiry and size (checked by re-signing, since moto doesn't)."""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from iota.storage import S3Store, StoreError, download, etag_of, upload
from iota.storage.base import MiB
from tests.support.s3 import S3Bucket


def query_of(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def signature_holds(url: str, method: str, headers: dict[str, str], bucket: S3Bucket) -> bool:
    """Verify a presigned URL as S3 does: rebuild the canonical request from what arrives and re-sign it."""
    query = query_of(url)
    claimed = query.pop("X-Amz-Signature")
    parts = urlsplit(url)
    unsigned_url = urlunsplit(parts._replace(query=urlencode(query)))
    request = AWSRequest(method=method, url=unsigned_url, headers=headers)
    request.context["timestamp"] = query["X-Amz-Date"]
    # Only the headers the URL says were signed take part, as on the server.
    for name in list(request.headers.keys()):
        if name.lower() not in query["X-Amz-SignedHeaders"].split(";"):
            del request.headers[name]
    signer = S3SigV4QueryAuth(
        Credentials(bucket.access_key, bucket.secret_key),
        "s3",
        bucket.region,
        expires=int(query["X-Amz-Expires"]),
    )
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    return expected == claimed


def replace_query(url: str, **changes: str) -> str:
    query = query_of(url)
    query.update(changes)
    return urlunsplit(urlsplit(url)._replace(query=urlencode(query)))


def test_presigned_put_is_sigv4_and_binds_key_expiry_and_length(
    s3_store: S3Store, s3_bucket: S3Bucket
) -> None:
    url = s3_store.presign_put(
        "runs/r1/activations/0/5/0-forward-0.safetensors", expires_s=900, content_length=1234
    )
    query = query_of(url)
    parts = urlsplit(url)

    assert parts.netloc == urlsplit(s3_bucket.endpoint_url).netloc
    assert parts.path == f"/{s3_bucket.bucket}/runs/r1/activations/0/5/0-forward-0.safetensors"  # path-style
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Expires"] == "900"
    assert query["X-Amz-Credential"].startswith(f"{s3_bucket.access_key}/")
    assert query["X-Amz-Credential"].endswith(f"/{s3_bucket.region}/s3/aws4_request")
    assert "content-length" in query["X-Amz-SignedHeaders"].split(";")

    assert signature_holds(url, "PUT", {"content-length": "1234"}, s3_bucket)
    assert not signature_holds(url, "PUT", {"content-length": "1235"}, s3_bucket)  # another size
    assert not signature_holds(url, "GET", {"content-length": "1234"}, s3_bucket)  # another method
    repointed = urlunsplit(parts._replace(path=f"/{s3_bucket.bucket}/runs/r1/scores/0.json"))
    assert not signature_holds(repointed, "PUT", {"content-length": "1234"}, s3_bucket)
    extended = replace_query(url, **{"X-Amz-Expires": "604800"})
    assert not signature_holds(extended, "PUT", {"content-length": "1234"}, s3_bucket)


def test_presigned_get_is_sigv4(s3_store: S3Store, s3_bucket: S3Bucket) -> None:
    url = s3_store.presign_get("runs/r1/config.json", expires_s=60)
    query = query_of(url)

    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Expires"] == "60"
    assert query["X-Amz-SignedHeaders"] == "host"
    assert signature_holds(url, "GET", {}, s3_bucket)
    assert signature_holds(
        url, "GET", {"range": "bytes=0-9"}, s3_bucket
    )  # an unsigned Range header is allowed
    other_key = urlunsplit(urlsplit(url)._replace(path=f"/{s3_bucket.bucket}/runs/r1/other.json"))
    assert not signature_holds(other_key, "GET", {}, s3_bucket)


def test_presign_limits(s3_store: S3Store) -> None:
    with pytest.raises(ValueError, match="at most"):
        s3_store.presign_get("k", expires_s=8 * 24 * 3600)
    with pytest.raises(ValueError):
        s3_store.presign_put("k", expires_s=0, content_length=1)
    with pytest.raises(ValueError):
        s3_store.presign_put("k", expires_s=60, content_length=-1)


def test_presign_endpoint_for_clients_elsewhere(s3_bucket: S3Bucket, http: httpx.Client) -> None:
    # The orchestrator reaches the bucket at one address and signs URLs for the address miners use.
    public = s3_bucket.endpoint_url.replace("127.0.0.1", "localhost")
    store = S3Store(**s3_bucket.store_kwargs(), presign_endpoint_url=public)
    url = store.presign_put("k/x", 60, content_length=3)
    assert urlsplit(url).netloc == urlsplit(public).netloc

    upload(url, b"abc", client=http)
    assert store.get("k/x") == b"abc"
    assert download(store.presign_get("k/x", 60), None, max_bytes=3, client=http) == b"abc"


def test_huge_object_parts_grow_to_fit_the_part_limit(s3_bucket: S3Bucket) -> None:
    store = S3Store(**s3_bucket.store_kwargs(), multipart_threshold=5 * MiB, part_size=5 * MiB)
    # 60 GB in 5 MiB parts would need 11,444 parts; S3 allows 10,000, so parts grow (checked without uploading).
    assert store._part_size_for(60 * 10**9) == 6_000_000
    assert store._part_size_for(12 * MiB) == 5 * MiB


def test_multipart_with_concurrency_one_and_a_whole_last_part(s3_bucket: S3Bucket) -> None:
    store = S3Store(
        **s3_bucket.store_kwargs(), multipart_threshold=5 * MiB, part_size=5 * MiB, max_concurrency=1
    )
    data = os.urandom(10 * MiB)  # exactly two parts
    store.put("k/two-parts", data)
    info = store.head("k/two-parts")
    assert info is not None and info.etag == etag_of(data, 5 * MiB) and info.etag.endswith("-2")
    assert store.get("k/two-parts") == data
    assert not s3_bucket_has_pending_uploads(store)


def s3_bucket_has_pending_uploads(store: S3Store) -> bool:
    return bool(store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads"))


def test_constructor_refuses_parts_below_the_s3_minimum(s3_bucket: S3Bucket) -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Store(**s3_bucket.store_kwargs(), part_size=1 * MiB)


def test_missing_bucket_is_a_store_error(s3_bucket: S3Bucket) -> None:
    kwargs = {**s3_bucket.store_kwargs(), "bucket": "no-such-bucket-here"}
    store = S3Store(**kwargs)
    with pytest.raises(StoreError):
        store.put("k/x", b"data")
    with pytest.raises(StoreError):
        store.list("k/")
