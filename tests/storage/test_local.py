"""LocalStore only: what its HMAC-signed URLs refuse, and how its files stay inside root and whole."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from iota.storage import LocalStore, TransferError, download, upload
from iota.storage.local import INLINE_MAX_BYTES


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def with_key(url: str, key: str) -> str:
    parts = urlsplit(url)
    prefix = parts.path.split("/objects/", 1)[0]
    return urlunsplit(parts._replace(path=f"{prefix}/objects/{key}"))


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_presigned_url_shape(local_store: LocalStore) -> None:
    url = local_store.presign_put("runs/r/x", expires_s=60, content_length=5)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert url.startswith(local_store.base_url + "/objects/runs/r/x?")
    assert query["method"] == ["PUT"] and query["size"] == ["5"]
    assert abs(int(query["expires"][0]) - (time.time() + 60)) < 5
    assert "size" not in parse_qs(urlsplit(local_store.presign_get("runs/r/x", 60)).query)


def test_expired_url_refused(local_store: LocalStore, http: httpx.Client) -> None:
    local_store.put("k/x", b"data")
    get_url = local_store.presign_get("k/x", expires_s=30)
    put_url = local_store.presign_put("k/y", expires_s=30, content_length=4)
    assert http.get(get_url).status_code == 200

    local_store.now = lambda: time.time() + 31
    response = http.get(get_url)
    assert response.status_code == 403 and "expired" in response.text
    assert http.put(put_url, content=b"data").status_code == 403
    assert local_store.head("k/y") is None


def test_tampered_parameters_refused(local_store: LocalStore, http: httpx.Client) -> None:
    local_store.put("k/x", b"data")
    url = local_store.presign_get("k/x", 60)
    sig = parse_qs(urlsplit(url).query)["sig"][0]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    later = str(int(parse_qs(urlsplit(url).query)["expires"][0]) + 3600)

    assert http.get(with_query(url, sig=flipped)).status_code == 403
    assert (
        http.get(with_query(url, expires=later)).status_code == 403
    )  # extending the expiry breaks the signature
    assert http.get(with_query(url, expires="soon")).status_code == 403
    assert http.get(url.split("?")[0]).status_code == 403  # no signature at all
    assert http.get(url).status_code == 200


def test_url_cannot_be_repointed_to_another_key(local_store: LocalStore, http: httpx.Client) -> None:
    local_store.put("runs/r/mine", b"mine")
    local_store.put("runs/r/secret", b"secret")
    get_url = local_store.presign_get("runs/r/mine", 60)
    assert http.get(with_key(get_url, "runs/r/secret")).status_code == 403

    put_url = local_store.presign_put("runs/r/issued", 60, content_length=4)
    assert http.put(with_key(put_url, "runs/r/secret"), content=b"evil").status_code == 403
    assert local_store.get("runs/r/secret") == b"secret"


def test_method_is_part_of_the_grant(local_store: LocalStore, http: httpx.Client) -> None:
    local_store.put("k/x", b"data")
    get_url = local_store.presign_get("k/x", 60)
    put_url = local_store.presign_put("k/x", 60, content_length=4)

    assert http.put(get_url, content=b"evil").status_code == 403
    assert http.put(with_query(get_url, method="PUT", size="4"), content=b"evil").status_code == 403
    assert http.get(put_url).status_code == 403
    assert local_store.get("k/x") == b"data"


def test_put_size_is_enforced(local_store: LocalStore, http: httpx.Client) -> None:
    url = local_store.presign_put("k/sized", 60, content_length=8)

    assert http.put(url, content=b"x" * 9).status_code == 403
    assert http.put(url, content=b"x" * 7).status_code == 403
    assert http.put(with_query(url, size="9"), content=b"x" * 9).status_code == 403  # size is signed
    chunked = http.put(url, content=iter([b"x" * 4, b"x" * 4]))  # no Content-Length
    assert chunked.status_code == 411
    assert local_store.head("k/sized") is None

    upload(url, b"y" * 8, client=http)
    assert local_store.get("k/sized") == b"y" * 8


def raw_request(base_url: str, head: bytes, body: bytes = b"", timeout_s: float = 5.0) -> bytes:
    """Send raw HTTP bytes and return what the server answers (first 4 KiB) before the timeout."""
    host, port = urlsplit(base_url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(head + body)
        return sock.recv(4096)


def test_oversized_body_refused_from_headers_alone(local_store: LocalStore) -> None:
    url = local_store.presign_put("k/huge", 60, content_length=10)
    target = url.split(local_store.base_url.split("/storage")[0], 1)[1]
    # Announce 1 GB and send none of it: a server that waited for the body would time out here.
    head = f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n".encode()
    answer = raw_request(local_store.base_url, head)
    assert answer.startswith(b"HTTP/1.1 403")
    assert local_store.head("k/huge") is None


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def start_partial_upload(store: LocalStore, key: str, size: int, sent: int) -> socket.socket:
    """A PUT of `size` signed bytes of which only `sent` are sent; the caller hangs up by closing the socket."""
    url = store.presign_put(key, 60, content_length=size)
    target = url.split(store.base_url.split("/storage")[0], 1)[1]
    head = f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
    host, port = urlsplit(store.base_url).netloc.split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(head + b"z" * sent)
    return sock


def test_interrupted_upload_leaves_nothing(local_store: LocalStore) -> None:
    # Over the inline threshold the body is written to a temp file as it arrives.
    with start_partial_upload(local_store, "k/cut", INLINE_MAX_BYTES + 100_000, sent=40_000):
        # Hang up mid-body only once the server is writing its temp file.
        assert wait_for(lambda: any(".~tmp-" in name for name in files_under(local_store.root)))

    assert wait_for(lambda: files_under(local_store.root) == [])  # no object, no temp file left behind
    assert local_store.head("k/cut") is None


def test_interrupted_small_upload_never_touches_the_disk(local_store: LocalStore, http: httpx.Client) -> None:
    # At or under the threshold the body is buffered whole before anything is written.
    with start_partial_upload(local_store, "k/cut", 100_000, sent=40_000):
        assert not wait_for(lambda: files_under(local_store.root) != [], timeout_s=0.3)

    upload(
        local_store.presign_put("k/after", 60, content_length=3), b"abc", client=http
    )  # server still serves
    assert files_under(local_store.root) == ["k/after.~meta", "k/after.~obj"]
    assert local_store.head("k/cut") is None


@pytest.mark.parametrize("size", [INLINE_MAX_BYTES, INLINE_MAX_BYTES + 1])
def test_both_sides_of_the_inline_threshold(local_store: LocalStore, http: httpx.Client, size: int) -> None:
    data = os.urandom(size)
    url = local_store.presign_put("k/edge", 60, content_length=size)
    assert http.put(url, content=data + b"!").status_code == 403  # exact size, on either path
    upload(url, data, client=http)

    info = local_store.head("k/edge")
    assert info is not None and info.size == size
    assert (info.md5, info.sha256) == (hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest())
    get_url = local_store.presign_get("k/edge", 60)
    assert download(get_url, info.sha256, max_bytes=size, client=http) == data
    assert download(get_url, None, max_bytes=10, client=http, byte_range=(size - 10, size)) == data[-10:]
    assert not any(".~tmp-" in name for name in files_under(local_store.root))


def test_path_traversal_refused_over_http(
    local_store: LocalStore, tmp_path: Path, http: httpx.Client
) -> None:
    (tmp_path / "outside.txt").write_text("not yours")
    evil_key = "../outside.txt"
    # Even a correctly signed URL for a traversing key (which presign never issues) is refused.
    expires = int(time.time()) + 60
    sig = local_store.signature("GET", evil_key, expires, None)
    query = urlencode({"method": "GET", "expires": expires, "sig": sig})
    response = http.get(f"{local_store.base_url}/objects/..%2Foutside.txt?{query}")
    assert response.status_code == 400
    assert "not yours" not in response.text

    put_sig = local_store.signature("PUT", "../planted", expires, 4)
    put_query = urlencode({"method": "PUT", "expires": expires, "size": 4, "sig": put_sig})
    assert (
        http.put(f"{local_store.base_url}/objects/..%2Fplanted?{put_query}", content=b"evil").status_code
        == 400
    )
    assert not (tmp_path / "planted").exists() and not (tmp_path / "planted.~obj").exists()


def test_http_ranges(local_store: LocalStore, http: httpx.Client) -> None:
    data = bytes(range(100))
    local_store.put("k/r", data)
    url = local_store.presign_get("k/r", 60)

    def get(range_header: str) -> httpx.Response:
        return http.get(url, headers={"range": range_header})

    assert (get("bytes=10-19").status_code, get("bytes=10-19").content) == (206, data[10:20])
    assert get("bytes=10-19").headers["content-range"] == "bytes 10-19/100"
    assert get("bytes=90-").content == data[90:]
    assert get("bytes=-5").content == data[95:]
    assert get("bytes=95-500").content == data[95:]
    assert get("bytes=100-").status_code == 416
    assert get("bytes=100-").headers["content-range"] == "bytes */100"
    assert (get("bytes=0-1,5-6").status_code, get("bytes=0-1,5-6").content) == (
        200,
        data,
    )  # multi-range ignored
    assert get("bytes=junk").content == data


def test_files_stay_under_root_and_writes_are_atomic(local_store: LocalStore, http: httpx.Client) -> None:
    local_store.put("runs/r/a", b"1")
    upload(local_store.presign_put("runs/r/b/c", 60, content_length=2), b"22", client=http)

    files = files_under(local_store.root)
    assert files == ["runs/r/a.~meta", "runs/r/a.~obj", "runs/r/b/c.~meta", "runs/r/b/c.~obj"]
    local_store.delete("runs/r/b/c")
    assert not (local_store.root / "runs/r/b").exists()  # emptied directories are pruned
    assert local_store.list("runs/") == ["runs/r/a"]


def test_head_survives_a_stale_sidecar(local_store: LocalStore) -> None:
    local_store.put("k/x", b"old contents")
    # Simulate a crash between the data rename and the sidecar rename: new data, old sidecar.
    path = local_store.data_path("k/x")
    path.write_bytes(b"new contents!")
    os.utime(path, ns=(1, 1))

    info = local_store.head("k/x")
    assert info is not None
    assert info.size == 13
    assert info.sha256 == hashlib.sha256(b"new contents!").hexdigest()


def test_url_signed_by_another_secret_refused(
    local_store: LocalStore, tmp_path: Path, http: httpx.Client
) -> None:
    local_store.put("k/x", b"data")
    impostor = LocalStore(tmp_path / "other", local_store.base_url, secret=b"a-different-secret-entirely")
    with pytest.raises(TransferError) as caught:
        download(impostor.presign_get("k/x", 60), None, max_bytes=10, client=http)
    assert caught.value.status == 403


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        LocalStore(Path("/nonexistent"), "http://x", secret=b"short")
