"""One suite for every ObjectStore: each test runs on LocalStore (uvicorn) and S3Store (moto)."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from iota.storage import (
    DigestMismatch,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StoreError,
    TooLarge,
    TransferError,
    download,
    etag_of,
    upload,
)
from tests.storage.conftest import PART_SIZE


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_get_head_round_trip(store: ObjectStore) -> None:
    data = os.urandom(1000)
    store.put("runs/r1/a.bin", data)

    assert store.get("runs/r1/a.bin") == data
    info = store.head("runs/r1/a.bin")
    assert info is not None
    assert (info.key, info.size) == ("runs/r1/a.bin", 1000)
    assert info.md5 == hashlib.md5(data).hexdigest() == info.etag
    assert info.sha256 == sha256(data)


def test_missing_object(store: ObjectStore) -> None:
    assert store.head("runs/r1/absent") is None
    with pytest.raises(ObjectNotFound):
        store.get("runs/r1/absent")
    with pytest.raises(ObjectNotFound):
        store.get_range("runs/r1/absent", 0, 10)


def test_put_replaces_and_delete_is_idempotent(store: ObjectStore) -> None:
    store.put("k/x", b"first")
    store.put("k/x", b"second!")
    assert store.get("k/x") == b"second!"
    info = store.head("k/x")
    assert info is not None and info.size == 7 and info.sha256 == sha256(b"second!")

    store.delete("k/x")
    assert store.head("k/x") is None
    assert store.list("k/") == []
    store.delete("k/x")  # absent: no error, as in S3


def test_empty_object(store: ObjectStore, http: httpx.Client) -> None:
    store.put("k/empty", b"")
    assert store.get("k/empty") == b""
    info = store.head("k/empty")
    assert info is not None and info.size == 0 and info.sha256 == sha256(b"")

    upload(store.presign_put("k/empty-too", 60, content_length=0), b"", client=http)
    assert download(store.presign_get("k/empty-too", 60), sha256(b""), max_bytes=0, client=http) == b""


def test_list_is_a_plain_string_prefix(store: ObjectStore) -> None:
    for key in [
        "runs/r1/act/1",
        "runs/r1/act/2/x",
        "runs/r1/activations/3",
        "runs/r1/b",
        "runs/r10/act/1",
        "top",
    ]:
        store.put(key, key.encode())

    assert store.list("runs/r1/act/") == ["runs/r1/act/1", "runs/r1/act/2/x"]
    assert store.list("runs/r1/act") == ["runs/r1/act/1", "runs/r1/act/2/x", "runs/r1/activations/3"]
    assert store.list("runs/r1") == [
        "runs/r1/act/1",
        "runs/r1/act/2/x",
        "runs/r1/activations/3",
        "runs/r1/b",
        "runs/r10/act/1",
    ]
    assert store.list("runs/r2/") == []
    assert len(store.list("")) == 6


def test_key_and_key_prefix_coexist(store: ObjectStore) -> None:
    # In S3 "a" and "a/b" are independent keys; LocalStore must not confuse a file with a directory.
    store.put("a", b"leaf")
    store.put("a/b", b"below")
    assert store.get("a") == b"leaf" and store.get("a/b") == b"below"
    assert store.list("a") == ["a", "a/b"]
    store.delete("a")
    assert store.list("a") == ["a/b"]


def test_unsafe_keys_refused(store: ObjectStore) -> None:
    for key in [
        "../escape",
        "a/../../b",
        "/abs",
        "a//b",
        "a/",
        "",
        "a b",
        ".hidden",
        "a/~x",
        "é",
        "a" * 1025,
    ]:
        with pytest.raises(InvalidKey):
            store.put(key, b"x")
        with pytest.raises(InvalidKey):
            store.get(key)
        with pytest.raises(InvalidKey):
            store.presign_put(key, 60, 1)
        with pytest.raises(InvalidKey):
            store.presign_get(key, 60)
    with pytest.raises(InvalidKey):
        store.list("../")
    assert store.list("") == []


def test_get_range(store: ObjectStore) -> None:
    data = bytes(range(256)) * 4
    store.put("k/range", data)

    assert store.get_range("k/range", 0, 10) == data[0:10]
    assert store.get_range("k/range", 100, 356) == data[100:356]
    assert store.get_range("k/range", 1000, 5000) == data[1000:]  # clipped at the end
    assert store.get_range("k/range", 7, 7) == b""
    with pytest.raises(StoreError):
        store.get_range("k/range", 1024, 1030)  # starts past the end
    with pytest.raises(ValueError):
        store.get_range("k/range", 10, 5)


def test_presigned_put_then_get_through_transfer(store: ObjectStore, http: httpx.Client) -> None:
    data = os.urandom(300_000)
    put_url = store.presign_put("runs/r1/up.bin", expires_s=60, content_length=len(data))
    assert "runs/r1/up.bin" in put_url

    upload(put_url, data, client=http)

    info = store.head("runs/r1/up.bin")
    assert info is not None and info.size == len(data) and info.etag == hashlib.md5(data).hexdigest()
    get_url = store.presign_get("runs/r1/up.bin", expires_s=60)
    assert download(get_url, sha256(data), max_bytes=len(data), client=http) == data
    assert (
        download(get_url, None, max_bytes=len(data), client=http, byte_range=(1000, 1100)) == data[1000:1100]
    )
    # A range download checks the digest of the slice it asked for.
    assert download(get_url, sha256(data[5:9]), max_bytes=4, client=http, byte_range=(5, 9)) == data[5:9]


def test_download_refuses_wrong_digest(store: ObjectStore, http: httpx.Client) -> None:
    store.put("k/d", b"the real bytes")
    url = store.presign_get("k/d", 60)
    with pytest.raises(DigestMismatch, match="differs from the expected"):
        download(url, sha256(b"other bytes"), max_bytes=100, client=http)


def test_download_refuses_more_than_max_bytes(store: ObjectStore, http: httpx.Client) -> None:
    store.put("k/big", b"x" * 1001)
    url = store.presign_get("k/big", 60)
    with pytest.raises(TooLarge):
        download(url, None, max_bytes=1000, client=http)
    assert len(download(url, None, max_bytes=1001, client=http)) == 1001


def test_download_of_missing_object_is_final(store: ObjectStore, http: httpx.Client) -> None:
    url = store.presign_get("k/never-written", 60)
    with pytest.raises(TransferError) as caught:
        download(url, None, max_bytes=10, client=http, retries=3, backoff_s=5.0)  # a retry would take 5 s
    assert caught.value.status == 404
    assert "X-Amz-Signature" not in str(caught.value) and "sig=" not in str(caught.value)


def test_multipart_upload_etag_matches_recomputed(store: ObjectStore) -> None:
    # Over the test threshold (5 MiB) S3Store uploads in 5 MiB parts: 3 parts here, the last one short.
    data = os.urandom(2 * PART_SIZE + 12345)
    store.put("runs/r1/checkpoints/big.safetensors", data)

    info = store.head("runs/r1/checkpoints/big.safetensors")
    assert info is not None and info.size == len(data)
    assert info.etag == store.expected_etag(data)
    assert info.sha256 == sha256(data)
    if isinstance(store, S3Store):
        assert info.etag == etag_of(data, PART_SIZE) and info.etag.endswith("-3")
        assert info.md5 is None  # a multipart ETag is not the object's md5
    assert store.get("runs/r1/checkpoints/big.safetensors") == data
    assert (
        store.get_range("runs/r1/checkpoints/big.safetensors", PART_SIZE - 5, PART_SIZE + 5)
        == data[PART_SIZE - 5 : PART_SIZE + 5]
    )
