"""Slow and greedy clients against the bound on calls in progress: a body is read bounded and paced before its
signature is checked, and only a checked signature takes a slot (one hotkey's share of the slots:
tests/orchestrator/test_admission.py). A real orchestrator on uvicorn with server_options, the hostile clients on
raw sockets from an address of their own."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from bittensor.keyfiles import Keypair
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from iota.orchestrator.app import server_options
from iota.orchestrator.guards import BODY_GRACE_S, BodyLimitMiddleware
from iota.protocol.version import PROTOCOL_VERSION, VERSION_HEADER
from tests.orchestrator import run_settings
from tests.security import Net, serve_net
from tests.security.test_http_limits import closed_within, connect, response_to
from tests.support import running_server

BOUND = 4  # calls in progress
HOSTILE = "127.0.0.5"
SLOW = 3 * BOUND  # more slow bodies than there are slots, well under the connections one address may hold


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    options = server_options(run_settings(data_dir, tmp_path))
    with serve_net(data_dir, keypairs, tmp_path, options=options, max_requests_in_progress=BOUND) as net:
        yield net


def slow_body_request(path: str = "/work", declared: int = 1000) -> bytes:
    """Headers of an unsigned POST whose body is yet to come; Expect: 100-continue makes the server say when the
    app starts reading it, so the test knows it got that far without sleeping."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n"
        f"Expect: 100-continue\r\n{VERSION_HEADER}: {PROTOCOL_VERSION}\r\n\r\n"
    ).encode()


def test_slow_bodies_from_one_address_cannot_keep_a_signed_miner_out(net: Net) -> None:
    net.join("head")
    with ExitStack() as stack:
        slow = [stack.enter_context(connect(net, HOSTILE)) for _ in range(SLOW)]
        trickle = stack.enter_context(connect(net, HOSTILE))  # and one trickling its headers
        trickle.sendall(b"POST /miners/heartbeat HTTP/1.1\r\n")
        for sock in slow:
            sock.sendall(slow_body_request())
            assert response_to(sock).startswith(b"HTTP/1.1 100"), "the server never read the body"
            sock.sendall(b"{")  # one byte, then nothing
        started = time.monotonic()
        for _ in range(3):
            answer = net.signed("head", "/miners/heartbeat")
            assert answer.status_code == 200, answer.text  # not 503: the slow bodies hold no slot
        admission = net.app.state.admission
        assert admission.in_progress == 0 and admission.refused == 0
        # The bodies do not keep up the minimum rate: each is refused (408) and its connection closed once the
        # grace is spent, whether or not the client ever sends more.
        for sock in slow:
            remaining = BODY_GRACE_S + 30 - (time.monotonic() - started)
            sock.settimeout(max(remaining, 1.0))
            assert response_to(sock).startswith(b"HTTP/1.1 408")
            assert closed_within(sock, 10.0)


# -- the pace of a body, on a small app (a grace of a second, not the orchestrator's ten) ----------------------

GRACE_S = 1.0
MIN_RATE = 1000  # bytes a second


@pytest.fixture
def paced() -> Iterator[str]:
    app = FastAPI()

    @app.post("/echo-length")
    async def echo_length(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    @app.get("/slow-answer")
    async def slow_answer() -> StreamingResponse:
        async def pieces() -> AsyncIterator[bytes]:
            for _ in range(6):
                await asyncio.sleep(GRACE_S / 2)
                yield b"piece;"

        return StreamingResponse(pieces())

    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=1 << 20,
        min_bytes_per_s=MIN_RATE,
        grace_s=GRACE_S,
        exempt_prefixes=("/x/",),
    )
    with running_server(app) as url:
        yield url


def post_slowly(url: str, chunks: list[bytes], pause_s: float) -> bytes:
    """POST ``chunks`` with ``pause_s`` between them on a raw socket; the answer's head and body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        size = sum(map(len, chunks))
        sock.sendall(f"POST /echo-length HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(pause_s)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
            if b"}" in reply:
                break
        return reply


def test_a_trickled_body_is_refused_once_its_grace_is_spent(paced: str) -> None:
    started = time.monotonic()
    reply = post_slowly(paced, [b"x"] * 100, pause_s=0.1)  # 10 bytes a second, for 10 s if allowed
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"connection: close" in reply.lower()
    assert time.monotonic() - started < 10 * GRACE_S  # cut long before the client was done


def test_a_body_at_the_minimum_rate_is_read_whole(paced: str) -> None:
    # Two seconds of body at three times the floor, sent in pieces: slow, but within its pace all along.
    chunk = b"x" * (MIN_RATE // 4)
    reply = post_slowly(paced, [chunk] * 12, pause_s=0.08)
    assert reply.startswith(b"HTTP/1.1 200") and f'"received":{12 * len(chunk)}'.encode() in reply, reply


def test_the_pace_ends_with_the_body(paced: str) -> None:
    # A streamed answer listens for the client leaving by reading past the body: that read is not paced, or
    # every download longer than the grace would be cut.
    answer = httpx.get(f"{paced}/slow-answer", timeout=30)
    assert answer.status_code == 200 and answer.content == b"piece;" * 6
