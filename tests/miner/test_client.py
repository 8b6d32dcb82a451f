"""The orchestrator client's retries: a stopping process interrupts them instead of waiting out an outage."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from bittensor.keyfiles import Keypair

from iota.miner.client import OrchestratorClient


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
