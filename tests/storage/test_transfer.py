"""transfer.upload/download against a real server that misbehaves on purpose: when to retry, when to stop."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from iota.storage import TooLarge, TransferError, download, upload
from tests.support import running_server


class Script:
    """Status codes the server answers in turn (then 200), and what it received."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.bodies: list[bytes] = []
        self.lengths: list[str | None] = []


@pytest.fixture
def flaky() -> Iterator[tuple[str, Script]]:
    script = Script()
    app = FastAPI()

    def next_status() -> int:
        return script.statuses.pop(0) if script.statuses else 200

    @app.put("/obj")
    async def put(request: Request) -> Response:
        script.bodies.append(await request.body())
        script.lengths.append(request.headers.get("content-length"))
        return Response(status_code=next_status())

    @app.get("/obj")
    def get() -> Response:
        script.bodies.append(b"")
        return Response(b"payload", status_code=next_status())

    @app.get("/chunked")
    def chunked() -> StreamingResponse:
        # No Content-Length: the client can only count as it reads.
        return StreamingResponse(iter([b"x" * 1000] * 10))

    with running_server(app) as url:
        yield url, script


def test_upload_retries_server_errors_then_succeeds(flaky: tuple[str, Script]) -> None:
    url, script = flaky
    script.statuses = [503, 500]
    upload(f"{url}/obj", b"hello", backoff_s=0.01)
    assert script.bodies == [b"hello"] * 3
    assert script.lengths == ["5"] * 3


def test_upload_does_not_retry_client_errors(flaky: tuple[str, Script]) -> None:
    url, script = flaky
    script.statuses = [403, 403]
    with pytest.raises(TransferError) as caught:
        upload(f"{url}/obj?sig=secret", b"hello", backoff_s=0.01)
    assert caught.value.status == 403
    assert len(script.bodies) == 1
    assert "secret" not in str(caught.value)  # the signed query string stays out of errors


def test_upload_retries_429_and_gives_up_after_retries(flaky: tuple[str, Script]) -> None:
    url, script = flaky
    script.statuses = [429, 502, 502, 502]
    with pytest.raises(TransferError) as caught:
        upload(f"{url}/obj", b"x", retries=2, backoff_s=0.01)
    assert caught.value.status == 502
    assert len(script.bodies) == 3


def test_connection_refused_is_retried_then_reported() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(TransferError, match="failed"):
        upload(f"http://127.0.0.1:{port}/obj", b"x", retries=1, backoff_s=0.01)
    with pytest.raises(TransferError, match="failed"):
        download(f"http://127.0.0.1:{port}/obj", None, max_bytes=10, retries=1, backoff_s=0.01)


def test_download_retries_server_errors(flaky: tuple[str, Script]) -> None:
    url, script = flaky
    script.statuses = [503]
    with httpx.Client() as client:
        assert download(f"{url}/obj", None, max_bytes=100, client=client, backoff_s=0.01) == b"payload"
    assert len(script.bodies) == 2


def test_download_counts_bytes_without_content_length(flaky: tuple[str, Script]) -> None:
    url, _ = flaky
    with pytest.raises(TooLarge, match="more than the 5000"):
        download(f"{url}/chunked", None, max_bytes=5000)
    assert len(download(f"{url}/chunked", None, max_bytes=10_000)) == 10_000


def test_download_refuses_a_server_that_ignores_the_range(flaky: tuple[str, Script]) -> None:
    url, _ = flaky
    with pytest.raises(TransferError, match="ignored the byte range"):
        download(f"{url}/obj", None, max_bytes=100, byte_range=(0, 3))
    with pytest.raises(ValueError):
        download(f"{url}/obj", None, max_bytes=100, byte_range=(3, 3))
