"""Shared pieces of the auth tests: real sr25519 keys, a registry dict, and a small FastAPI app using every check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import httpx
from bittensor.sp_core import Keypair
from fastapi import APIRouter, Depends, FastAPI
from pydantic import BaseModel

from iota.auth import (
    Authenticator,
    Caller,
    MemoryNonceStore,
    Miner,
    NonceStore,
    Operator,
    RateLimiter,
    Validator,
    check_protocol_version,
    install_auth,
    sign_headers,
)
from iota.chain.base import Neuron
from iota.protocol.version import PROTOCOL_VERSION, VERSION_HEADER

SERVER = Keypair.create_from_uri("//IotaOrchestrator")
MINER = Keypair.create_from_uri("//Miner")
VALIDATOR = Keypair.create_from_uri("//Validator")
POOR_VALIDATOR = Keypair.create_from_uri("//PoorValidator")
OPERATOR = Keypair.create_from_uri("//Operator")  # not registered: the operator need not be a neuron
STRANGER = Keypair.create_from_uri("//Stranger")  # valid key, not registered

MIN_STAKE = 1000.0
REGISTRY = {
    MINER.ss58_address: Neuron(0, MINER.ss58_address, "cold0", stake=0.0, validator_permit=False),
    VALIDATOR.ss58_address: Neuron(1, VALIDATOR.ss58_address, "cold1", stake=5000.0, validator_permit=True),
    POOR_VALIDATOR.ss58_address: Neuron(
        2, POOR_VALIDATOR.ss58_address, "cold2", stake=10.0, validator_permit=True
    ),
}


class Report(BaseModel):
    loss: float


class FakeClock:
    """A wall clock the test sets by hand."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def make_authenticator(nonce_store: NonceStore | None = None, **kwargs: Any) -> Authenticator:
    return Authenticator(
        receiver_hotkey=SERVER.ss58_address,
        lookup=REGISTRY.get,
        nonce_store=nonce_store if nonce_store is not None else MemoryNonceStore(),
        operator_hotkey=OPERATOR.ss58_address,
        min_stake=MIN_STAKE,
        **kwargs,
    )


def build_app(
    authenticator: Authenticator,
    *,
    ip_limiter: RateLimiter | None = None,
    trusted_proxies: Iterable[str] = (),
) -> FastAPI:
    app = FastAPI()
    router = APIRouter(dependencies=[Depends(check_protocol_version)])

    @router.post("/echo")
    async def echo(caller: Caller, x: str | None = None) -> dict[str, Any]:
        return {"hotkey": caller.hotkey, "body": caller.body.decode(), "x": x}

    @router.post("/report")
    async def report(caller: Miner, report: Report) -> dict[str, Any]:
        return {"uid": caller.neuron.uid if caller.neuron else None, "loss": report.loss}

    @router.get("/miner")
    async def miner_route(caller: Miner) -> dict[str, Any]:
        assert caller.neuron is not None
        return {"uid": caller.neuron.uid}

    @router.get("/validator")
    async def validator_route(caller: Validator) -> dict[str, Any]:
        assert caller.neuron is not None
        return {"uid": caller.neuron.uid}

    @router.get("/operator")
    async def operator_route(caller: Operator) -> dict[str, Any]:
        return {"hotkey": caller.hotkey}

    app.include_router(router)
    install_auth(app, authenticator, ip_limiter=ip_limiter, trusted_proxies=trusted_proxies)
    return app


def signed(
    keypair: Keypair,
    method: str,
    target: str,
    body: bytes = b"",
    *,
    nonce_ns: int | None = None,
    receiver: str | None = None,
) -> dict[str, str]:
    """Headers of a request signed by hand (so a test can tamper with what it then sends)."""
    nonce_ns = time.time_ns() if nonce_ns is None else nonce_ns
    headers = sign_headers(keypair, receiver or SERVER.ss58_address, method, target, body, nonce_ns)
    return {**headers, VERSION_HEADER: str(PROTOCOL_VERSION)}


def code_of(response: Any) -> str:
    """The refusal code of a response from this package (asserting it is one)."""
    detail = response.json()["detail"]
    assert response.headers["X-Iota-Auth-Error"] == detail["code"]
    return str(detail["code"])


class SyncASGITransport(httpx.BaseTransport):
    """Lets a sync ``httpx.Client`` call an ASGI app in process (Starlette's TestClient is built on httpx2 here,
    which does not take an ``httpx.Auth``)."""

    def __init__(self, app: Any, client: tuple[str, int] = ("127.0.0.1", 123), root_path: str = "") -> None:
        self.inner = httpx.ASGITransport(app=app, client=client, root_path=root_path)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> httpx.Response:
            response = await self.inner.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return asyncio.run(call())


def http_client(
    app: Any, auth: httpx.Auth | None = None, base_url: str = "http://testserver"
) -> httpx.Client:
    return httpx.Client(transport=SyncASGITransport(app), base_url=base_url, auth=auth)
