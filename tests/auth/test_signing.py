"""Client signing: the exact signed message, nonces that never repeat, and clock offsets learnt from responses."""

from __future__ import annotations

import email.utils
import hashlib

import httpx
import pytest
from bittensor import http_auth
from bittensor.sp_core import Keypair

from iota.auth import HotkeyAuth, sign_headers
from iota.auth.signing import server_offset
from iota.protocol.version import PROTOCOL_VERSION, VERSION_HEADER
from tests.auth import MINER, SERVER, FakeClock


def test_signature_covers_the_documented_message() -> None:
    body = b'{"a": 1}'
    headers = sign_headers(
        MINER, SERVER.ss58_address, "post", "/work?stage=1", body, 1_700_000_000_123_456_789
    )
    message = "\n".join(
        [
            "btauth/1",
            "sr25519",
            "POST",
            "/work?stage=1",
            hashlib.sha256(body).hexdigest(),
            "1700000000123456789",
            MINER.ss58_address,
            SERVER.ss58_address,
        ]
    ).encode()
    signature = bytes.fromhex(headers["X-Bittensor-Signature"].removeprefix("0x"))
    assert Keypair(ss58_address=MINER.ss58_address).verify(message, signature)
    assert headers["X-Bittensor-Hotkey"] == MINER.ss58_address
    assert headers["X-Bittensor-Receiver"] == SERVER.ss58_address
    assert headers["X-Bittensor-Nonce"] == "1700000000123456789"
    assert headers["X-Bittensor-Version"] == "1"


def test_auth_signs_request_with_protocol_headers_and_increasing_nonces() -> None:
    auth = HotkeyAuth(MINER, SERVER.ss58_address, clock=FakeClock(1_800_000_000.0))  # a frozen clock
    nonces = []
    for _ in range(3):
        request = httpx.Request("POST", "http://orchestrator:8000/work?x=1", content=b"body")
        next(auth.auth_flow(request))
        assert request.headers[VERSION_HEADER] == str(PROTOCOL_VERSION)
        nonces.append(int(request.headers["X-Bittensor-Nonce"]))
        caller = http_auth.verify(
            request.headers,
            b"body",
            method="POST",
            path="/work?x=1",
            self_hotkey_ss58=SERVER.ss58_address,
            now_ns=nonces[-1],
        )
        assert caller.hotkey_ss58 == MINER.ss58_address
    assert nonces[0] == 1_800_000_000 * 10**9 and nonces == sorted(set(nonces))


def test_offset_from_precise_header_or_date() -> None:
    precise = httpx.Response(200, headers={"X-Iota-Server-Time": "1000.250"})
    assert server_offset(precise, local_now=970.0) == pytest.approx(30.25)
    dated = httpx.Response(200, headers={"Date": email.utils.formatdate(1000.0, usegmt=True)})
    assert server_offset(dated, local_now=970.0) == pytest.approx(30.5)  # middle of the Date's second
    assert server_offset(httpx.Response(200), local_now=970.0) is None


def test_stale_refusal_teaches_offset_and_retries_once() -> None:
    clock = FakeClock(1000.0)
    auth = HotkeyAuth(MINER, SERVER.ss58_address, clock=clock)
    request = httpx.Request("GET", "http://o/status")
    flow = auth.auth_flow(request)
    first_nonce = int(next(flow).headers["X-Bittensor-Nonce"])
    refusal = httpx.Response(
        401,
        headers={"X-Iota-Auth-Error": "stale_timestamp", "X-Iota-Server-Time": "1020.000"},
        request=request,
    )
    retried = flow.send(refusal)
    assert auth.offset_s == pytest.approx(20.0)
    assert int(retried.headers["X-Bittensor-Nonce"]) == pytest.approx(first_nonce + 20 * 10**9)
    with pytest.raises(StopIteration):  # only once
        flow.send(refusal)
    # A bad signature is not a clock problem: no retry.
    flow = auth.auth_flow(httpx.Request("GET", "http://o/status"))
    next(flow)
    with pytest.raises(StopIteration):
        flow.send(httpx.Response(401, headers={"X-Iota-Auth-Error": "bad_signature"}))
