"""The orchestrator client's retries: a stopping process interrupts them instead of waiting out an outage, and an
overloaded orchestrator's Retry-After is honoured, to the millisecond where the orchestrator says it."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from bittensor.keyfiles import Keypair
from fastapi import FastAPI, Request

from iota.auth.ratelimit import retry_after_header
from iota.client.orchestrator import OrchestratorClient, retry_after_s
from iota.orchestrator.admission import Admission
from iota.protocol import EpochPlan, Work
from tests.support import running_server


def test_interrupt_ends_the_retries_of_a_request_in_progress() -> None:
    with socket.socket() as s:  # a port nobody listens on: every attempt is refused, and retried
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    client = OrchestratorClient(
        f"http://127.0.0.1:{port}", key, key.ss58_address, give_up_s=60, max_backoff_s=5
    )
    threading.Timer(0.5, client.interrupt).start()
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="interrupted"):
        client.work()
    assert time.monotonic() - started < 3  # not the 60 s it would otherwise keep trying
    with pytest.raises(ConnectionError, match="interrupted"):
        client.heartbeat()  # later requests are tried once, not retried
    client.close()


def test_an_overloaded_answer_is_retried_after_its_retry_after() -> None:
    """A 503 from the orchestrator's admission control is retried after its Retry-After (1-3 s), not after the
    client's own first backoff (0.2 s)."""
    app = FastAPI()
    admission = Admission(1)
    admission.in_progress = 1  # full, as under load: the first request is refused

    @app.post("/work")
    async def work(request: Request) -> Work:
        async with admission.slot(request.scope, None):
            return Work(
                kind="stop",
                run_id="r",
                epoch=0,
                stage=0,
                plan=EpochPlan(epoch=0, tokens_at_start=0, replicas=1),
            )

    key = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    with running_server(app) as url:
        client = OrchestratorClient(url, key, key.ss58_address, give_up_s=30)
        threading.Timer(0.05, lambda: setattr(admission, "in_progress", 0)).start()
        started = time.monotonic()
        answer = client.work()
        waited = time.monotonic() - started
        client.close()
    assert answer.kind == "stop" and admission.refused == 1
    assert waited >= 0.95


def test_a_rate_limit_says_its_wait_to_the_millisecond_and_the_client_takes_only_a_sound_hint() -> None:
    """A token bucket refills in milliseconds; Retry-After has whole seconds. The refusal carries both, and the
    client waits the hint, never longer than Retry-After, and ignores a hint that is not a wait."""
    headers = retry_after_header(0.0123)
    assert headers == {"Retry-After": "1", "X-Iota-Retry-After-Ms": "13"}
    assert retry_after_s(httpx.Headers(headers)) == pytest.approx(0.013)
    assert retry_after_s(httpx.Headers({"Retry-After": "2"})) == 2.0  # no hint: Retry-After
    for hostile in ("nan", "-5", "inf", "soon", "99999"):
        assert retry_after_s(httpx.Headers({"Retry-After": "1", "X-Iota-Retry-After-Ms": hostile})) == 1.0
    assert retry_after_s(httpx.Headers({"X-Iota-Retry-After-Ms": "250"})) == pytest.approx(0.25)
