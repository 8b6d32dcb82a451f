"""Signature verification through a real FastAPI app: every way a request can be refused, and the ways it passes."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from iota.auth import HotkeyAuth, MemoryNonceStore, SqliteNonceStore
from iota.protocol.version import CLIENT_HEADER, PROTOCOL_VERSION, VERSION_HEADER
from tests.auth import (
    MINER,
    SERVER,
    STRANGER,
    VALIDATOR,
    FakeClock,
    SyncASGITransport,
    build_app,
    code_of,
    http_client,
    make_authenticator,
    signed,
)


@pytest.fixture
def client() -> TestClient:
    return TestClient(build_app(make_authenticator()))


def test_signed_request_passes_and_route_gets_caller_and_body(client: TestClient) -> None:
    body = b'{"hello": "world"}'
    response = client.post("/echo?x=1", content=body, headers=signed(MINER, "POST", "/echo?x=1", body))
    assert response.status_code == 200, response.text
    assert response.json() == {"hotkey": MINER.ss58_address, "body": body.decode(), "x": "1"}
    # Every response tells the client the server's time and protocol.
    assert abs(email.utils.parsedate_to_datetime(response.headers["date"]).timestamp() - time.time()) < 2
    assert response.headers[VERSION_HEADER] == str(PROTOCOL_VERSION)


def test_route_with_a_model_body_gets_both_the_caller_and_the_parsed_body(client: TestClient) -> None:
    body = b'{"loss": 2.5}'
    headers = {**signed(MINER, "POST", "/report", body), "Content-Type": "application/json"}
    response = client.post("/report", content=body, headers=headers)
    assert response.json() == {"uid": 0, "loss": 2.5}
    headers = {**signed(MINER, "POST", "/report", body), "Content-Type": "application/json"}
    tampered = client.post("/report", content=b'{"loss": 0.1}', headers=headers)
    assert tampered.status_code == 401


def test_forged_signature_refused(client: TestClient) -> None:
    # The validator's signature, claimed to be the miner's.
    headers = signed(VALIDATOR, "POST", "/echo", b"x")
    headers["X-Bittensor-Hotkey"] = MINER.ss58_address
    response = client.post("/echo", content=b"x", headers=headers)
    assert response.status_code == 401
    assert code_of(response) == "bad_signature"
    assert response.headers["WWW-Authenticate"] == "btauth/1"


def test_missing_signature_refused(client: TestClient) -> None:
    response = client.post("/echo", content=b"x", headers={VERSION_HEADER: str(PROTOCOL_VERSION)})
    assert response.status_code == 401
    assert code_of(response) == "malformed"


def test_body_tampering_detected(client: TestClient) -> None:
    headers = signed(MINER, "POST", "/echo", b'{"loss": 2.5}')
    response = client.post("/echo", content=b'{"loss": 0.1}', headers=headers)
    assert response.status_code == 401
    assert code_of(response) == "bad_signature"


def test_query_tampering_detected(client: TestClient) -> None:
    headers = signed(MINER, "POST", "/echo?x=mine", b"")
    response = client.post("/echo?x=theirs", headers=headers)
    assert response.status_code == 401
    assert code_of(response) == "bad_signature"
    # ...and the method is covered too.
    assert client.get("/miner", headers=signed(MINER, "POST", "/miner")).status_code == 401


def test_stale_timestamp_refused_with_server_time_and_offset(client: TestClient) -> None:
    old_ns = time.time_ns() - 11 * 10**9
    response = client.post("/echo", headers=signed(MINER, "POST", "/echo", nonce_ns=old_ns))
    assert response.status_code == 401
    assert code_of(response) == "stale_timestamp"
    detail = response.json()["detail"]
    assert detail["offset_s"] == pytest.approx(-11, abs=1)
    assert detail["server_time"] == pytest.approx(time.time(), abs=2)
    assert "behind the server" in detail["message"]


def test_future_timestamp_refused(client: TestClient) -> None:
    ahead_ns = time.time_ns() + 3 * 10**9
    response = client.post("/echo", headers=signed(MINER, "POST", "/echo", nonce_ns=ahead_ns))
    assert response.status_code == 401
    assert code_of(response) == "future_timestamp"
    assert response.json()["detail"]["offset_s"] == pytest.approx(3, abs=1)


def test_replayed_nonce_refused(client: TestClient) -> None:
    headers = signed(MINER, "POST", "/echo", b"once")
    assert client.post("/echo", content=b"once", headers=headers).status_code == 200
    replay = client.post("/echo", content=b"once", headers=headers)
    assert replay.status_code == 401
    assert code_of(replay) == "replayed_nonce"


def test_wrong_receiver_refused(client: TestClient) -> None:
    # Signed for another orchestrator (or a miner's own server): must not be usable here.
    headers = signed(MINER, "POST", "/echo", receiver=VALIDATOR.ss58_address)
    response = client.post("/echo", headers=headers)
    assert response.status_code == 401
    assert code_of(response) == "wrong_receiver"
    assert SERVER.ss58_address in response.json()["detail"]["message"]


def test_unregistered_hotkey_refused(client: TestClient) -> None:
    response = client.post("/echo", headers=signed(STRANGER, "POST", "/echo"))
    assert response.status_code == 403
    assert code_of(response) == "unregistered"


def test_protocol_mismatch_answered_with_426_and_upgrade_message(client: TestClient) -> None:
    headers = {
        **signed(MINER, "POST", "/echo"),
        VERSION_HEADER: str(PROTOCOL_VERSION - 1),
        CLIENT_HEADER: "0.0.1",
    }
    response = client.post("/echo", headers=headers)
    assert response.status_code == 426
    assert code_of(response) == "protocol_mismatch"
    message = response.json()["detail"]["message"]
    assert (
        f"speaks iota protocol {PROTOCOL_VERSION}" in message
        and "upgrade iota" in message
        and "0.0.1" in message
    )
    # No header at all is a mismatch too.
    headers.pop(VERSION_HEADER)
    assert client.post("/echo", headers=headers).status_code == 426


def test_request_signed_before_server_start_refused() -> None:
    # Belt and braces for restarts: even with an empty nonce store, a request from before the start is refused.
    nonce_ns = time.time_ns() - 10**9
    client = TestClient(build_app(make_authenticator(MemoryNonceStore())))
    response = client.post("/echo", headers=signed(MINER, "POST", "/echo", nonce_ns=nonce_ns))
    assert response.status_code == 401
    assert code_of(response) == "before_server_start"


def _replay_through(app_store: Any, clock: FakeClock, headers: dict[str, str]) -> Any:
    client = TestClient(build_app(make_authenticator(app_store, clock=clock)))
    return client.post("/echo", content=b"pay me", headers=headers)


def test_replay_fails_after_restart_and_on_another_worker(tmp_path: Path) -> None:
    db = tmp_path / "nonces.sqlite"
    clock = FakeClock()
    started = clock.now
    headers = signed(MINER, "POST", "/echo", b"pay me", nonce_ns=int((started + 1) * 1e9))

    # Two workers started at the same time, sharing the run directory's nonce file.
    worker_a = make_authenticator(SqliteNonceStore(db, clock=clock), clock=clock)
    worker_b = make_authenticator(SqliteNonceStore(db, clock=clock), clock=clock)
    clock.now = started + 1.5
    assert (
        TestClient(build_app(worker_a)).post("/echo", content=b"pay me", headers=headers).status_code == 200
    )
    on_b = TestClient(build_app(worker_b)).post("/echo", content=b"pay me", headers=headers)
    assert on_b.status_code == 401 and code_of(on_b) == "replayed_nonce"

    # A restarted server reopens the file. Its start time is set before the request here, so that only the
    # store can refuse it; the control shows an empty store would have let it through.
    worker_a.nonce_store.close()  # type: ignore[attr-defined]
    clock.now = started
    restarted = SqliteNonceStore(db, clock=clock)
    response = _replay_through(restarted, clock, headers)
    assert response.status_code == 401 and code_of(response) == "replayed_nonce"
    assert _replay_through(MemoryNonceStore(clock=clock), clock, headers).status_code == 200


def test_client_clock_30s_fast_gets_through() -> None:
    client = http_client(build_app(make_authenticator()))
    auth = HotkeyAuth(MINER, SERVER.ss58_address, clock=lambda: time.time() + 30)
    first = client.post("/echo", content=b"a", auth=auth)
    assert first.status_code == 200, first.text
    # The first try was refused for the future timestamp; the client learnt the offset from Date and retried.
    assert [r.headers["X-Iota-Auth-Error"] for r in first.history] == ["future_timestamp"]
    assert auth.offset_s == pytest.approx(-30, abs=1.5)
    second = client.post("/echo", content=b"b", auth=auth)
    assert second.status_code == 200 and second.history == []


def test_client_clock_30s_slow_gets_through() -> None:
    client = http_client(build_app(make_authenticator()))
    auth = HotkeyAuth(MINER, SERVER.ss58_address, clock=lambda: time.time() - 30)
    response = client.post("/echo?x=2", content=b"a", auth=auth)
    assert response.status_code == 200, response.text
    assert auth.offset_s == pytest.approx(30, abs=1.5)


def test_async_client_signs_every_request() -> None:
    app = build_app(make_authenticator())

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        auth = HotkeyAuth(VALIDATOR, SERVER.ss58_address)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", auth=auth) as client:
            responses = await asyncio.gather(*(client.post(f"/echo?x={i}", content=b"{}") for i in range(8)))
        return [r.status_code for r in responses]

    assert asyncio.run(main()) == [200] * 8


class StripPrefixProxy:
    """A reverse proxy in miniature: forwards /iota/... to the app as /... (as nginx `location /iota/` does).

    With ``tell_root_path`` the ASGI server is told the prefix (scope ``root_path``) without putting it back
    into the path."""

    def __init__(self, app: Any, prefix: str, tell_root_path: bool = False) -> None:
        self.app, self.prefix, self.tell_root_path = app, prefix, tell_root_path

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"].removeprefix(self.prefix) or "/"
            scope = {**scope, "path": path, "raw_path": path.encode()}
            if self.tell_root_path:
                scope["root_path"] = self.prefix
        await self.app(scope, receive, send)


@pytest.mark.parametrize("configured", ["path_prefix", "root_path"])
def test_signed_path_is_the_one_the_client_saw_behind_a_proxy(configured: str) -> None:
    def client_for(authenticator: Any, tell_root_path: bool = False) -> httpx.Client:
        app = StripPrefixProxy(build_app(authenticator), "/iota", tell_root_path)
        return http_client(app, base_url="http://testserver/iota")

    if configured == "path_prefix":
        client = client_for(make_authenticator(path_prefix="/iota"))
    else:
        client = client_for(make_authenticator(), tell_root_path=True)
    auth = HotkeyAuth(MINER, SERVER.ss58_address)
    response = client.post("/echo?x=3", content=b"z", auth=auth)
    assert response.status_code == 200, response.text
    assert response.json()["x"] == "3"

    # Control: a server that does not know the prefix checks "/echo?x=3" and refuses the signature.
    unaware = client_for(make_authenticator())
    refused = unaware.post("/echo?x=3", content=b"z", auth=auth)
    assert refused.status_code == 401 and code_of(refused) == "bad_signature"


def test_prefix_already_in_path_is_not_doubled() -> None:
    # uvicorn --root-path /iota puts the prefix into path and raw_path and sets root_path: nothing to add.
    app = build_app(make_authenticator(path_prefix="/iota"))
    transport = SyncASGITransport(app, root_path="/iota")
    client = httpx.Client(
        transport=transport, base_url="http://testserver", auth=HotkeyAuth(MINER, SERVER.ss58_address)
    )
    response = client.post("/iota/echo", content=b"z")
    assert response.status_code == 200, response.text


@contextlib.contextmanager
def serve(app: Any, **config: Any) -> Iterator[str]:
    """Run ``app`` on a real uvicorn server in a thread; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, port=port, date_header=False, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 10
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_real_server_fast_client_clock_and_replay(tmp_path: Path) -> None:
    app = build_app(make_authenticator(SqliteNonceStore(tmp_path / "nonces.sqlite")))
    auth = HotkeyAuth(MINER, SERVER.ss58_address, clock=lambda: time.time() + 30)
    with serve(app) as url, httpx.Client(base_url=url, auth=auth) as client:
        response = client.post("/echo?x=%20y", content=b"over the wire")
        assert response.status_code == 200, response.text
        assert response.json() == {"hotkey": MINER.ss58_address, "body": "over the wire", "x": " y"}
        assert len(response.headers.get_list("date")) == 1
        replay = client.send(response.request, auth=None)  # the very same signed request again
        assert replay.status_code == 401 and replay.headers["X-Iota-Auth-Error"] == "replayed_nonce"


def test_real_server_behind_stripping_proxy_with_root_path() -> None:
    # uvicorn --root-path /iota expects a proxy that strips the prefix: the client signed the path it gave the
    # proxy (/iota/echo); uvicorn receives /echo and puts the prefix back into path and raw_path.
    body = b"via proxy"
    with (
        serve(build_app(make_authenticator()), root_path="/iota") as url,
        httpx.Client(base_url=url) as client,
    ):
        response = client.post(
            "/echo?x=1", content=body, headers=signed(MINER, "POST", "/iota/echo?x=1", body)
        )
        assert response.status_code == 200, response.text
        assert response.json()["x"] == "1"
        unprefixed = client.post("/echo?x=1", content=body, headers=signed(MINER, "POST", "/echo?x=1", body))
        assert unprefixed.status_code == 401 and unprefixed.headers["X-Iota-Auth-Error"] == "bad_signature"
