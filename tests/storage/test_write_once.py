"""Write-once PUT URLs and what each store confirms of an upload, on both stores served for real (moto for S3).

An accepted output must stay what was accepted: a PUT to a write-once key that holds an object is refused, and
confirm() returns the sha256 the store computed, never one the writer chose.
"""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from iota.storage import LocalStore, ObjectStore, S3Store, TransferError, upload
from iota.storage.local import INLINE_MAX_BYTES

FIRST, OTHER = b"accepted bytes!!", b"swapped bytes!!!"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def conditions(store: ObjectStore) -> dict[str, str]:
    """The headers an honest S3 writer sends with a write-once URL (S3 refuses the signature without them)."""
    return {"if-none-match": "*"} if isinstance(store, S3Store) else {}


def test_a_write_once_key_keeps_its_first_object(store: ObjectStore, http: httpx.Client) -> None:
    url = store.presign_put("runs/r/activations/0/1/0-forward-1.safetensors", 60, len(FIRST), once=True)
    upload(url, FIRST, client=http)
    # The same URL again with other bytes, as a hostile writer sends it (with the signed condition, or S3 would
    # refuse the signature): refused, and the object is still the first one.
    refused = http.put(url, content=OTHER, headers=conditions(store))
    assert refused.status_code in (409, 412), refused.text
    key = "runs/r/activations/0/1/0-forward-1.safetensors"
    assert store.get(key) == FIRST
    info = store.confirm(key)
    assert info is not None and info.sha256 == sha256(FIRST) and info.size == len(FIRST)


def test_an_identical_retry_of_a_write_once_upload_succeeds(store: ObjectStore, http: httpx.Client) -> None:
    """A retry whose first reply was lost: the bytes are already there, and the uploader must not fail."""
    url = store.presign_put("k/retried", 60, len(FIRST), once=True)
    upload(url, FIRST, client=http)
    upload(url, FIRST, client=http)
    assert store.get("k/retried") == FIRST


def test_urls_without_once_still_replace(store: ObjectStore, http: httpx.Client) -> None:
    """End-of-epoch objects are written again before they are accepted (a refused report, redone)."""
    url = store.presign_put("k/phase", 60, len(FIRST))
    upload(url, FIRST, client=http)
    upload(url, OTHER, client=http)
    assert store.get("k/phase") == OTHER


@pytest.mark.parametrize("size", [len(FIRST), INLINE_MAX_BYTES + 1], ids=["inline", "streamed"])
def test_local_refuses_other_bytes_through_the_uploader(
    local_store: LocalStore, http: httpx.Client, size: int
) -> None:
    first, other = b"a" * size, b"b" * size
    url = local_store.presign_put("k/once", 60, size, once=True)
    upload(url, first, client=http)
    with pytest.raises(TransferError) as error:
        upload(url, other, client=http)
    assert error.value.status == 409
    upload(url, first, client=http)  # the same bytes again: a retry, answered as a success
    assert local_store.get("k/once") == first
    beside = sorted(p.name for p in local_store.data_path("k/once").parent.iterdir())
    assert beside == ["once.~meta", "once.~obj"]  # refused writes leave no temp file behind


def test_local_write_once_cannot_be_dropped_from_the_url(local_store: LocalStore, http: httpx.Client) -> None:
    url = local_store.presign_put("k/signed", 60, len(FIRST), once=True)
    upload(url, FIRST, client=http)
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items() if name != "once"}
    stripped = urlunsplit(parts._replace(query=urlencode(query)))
    response = http.put(stripped, content=OTHER)
    assert response.status_code == 403, response.text
    assert local_store.get("k/signed") == FIRST


def test_s3_confirm_ignores_a_sha256_the_writer_chose(s3_store: S3Store, http: httpx.Client) -> None:
    """moto, like any store that takes unsigned metadata headers, keeps an x-amz-meta-sha256 the writer sent:
    head() would report it, confirm() has S3 compute the digest and reports that."""
    key = "runs/r/activations/0/2/0-forward-3.safetensors"
    url = s3_store.presign_put(key, 60, len(OTHER), once=True)
    forged = sha256(FIRST)
    response = http.put(url, content=OTHER, headers={"if-none-match": "*", "x-amz-meta-sha256": forged})
    assert response.status_code == 200, response.text
    head = s3_store.head(key)
    assert head is not None and head.sha256 == forged  # the writer's word, before confirm
    confirmed = s3_store.confirm(key)
    assert confirmed is not None and confirmed.sha256 == sha256(OTHER)
    assert confirmed.md5 == hashlib.md5(OTHER).hexdigest() and confirmed.size == len(OTHER)
    assert s3_store.get(key) == OTHER  # the copy onto itself changed no byte


def test_confirm_of_a_missing_object_is_none(store: ObjectStore) -> None:
    assert store.confirm("k/never-written") is None
