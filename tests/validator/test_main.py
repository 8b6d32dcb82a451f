"""The validator daemon against an orchestrator that cannot serve its score log: it waits, it does not die."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from bittensor.keyfiles import Keypair

from iota.chain.local import LocalChain
from iota.client import OrchestratorClient
from iota.validator.main import ValidatorDaemon

ANSWERS = {
    "overloaded": (503, {"detail": "too many requests in progress"}),
    "not a score log": (200, {"detail": "something else"}),
    "not JSON": (200, "<html>"),
}


@pytest.fixture
def orchestrator() -> Iterator[tuple[str, dict[str, str]]]:
    """An HTTP server whose GET /scores answers what `answer["kind"]` names."""
    answer = {"kind": "overloaded"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = ANSWERS[answer["kind"]]
            data = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answer
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", sorted(ANSWERS))
def test_a_score_log_it_cannot_read_is_an_error_to_retry_not_a_crash(
    kind: str, orchestrator: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, answer = orchestrator
    answer["kind"] = kind
    keypair = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    client = OrchestratorClient(url, keypair, keypair.ss58_address, give_up_s=1.0)
    chain = LocalChain(tmp_path / "chain.json")
    daemon = ValidatorDaemon(client, chain, keypair, torch.device("cpu"), 1e9, tmp_path)
    try:
        daemon.set_weights()
    finally:
        client.close()
    assert daemon.status["last_error"].startswith("score log unavailable")
    assert daemon.status["last_weights"] is None
