"""Shared pieces of the security tests: a real orchestrator on uvicorn, its keys, and what honest miners send.

Hostile callers here are registered miners and validators with real sr25519 keys: the point is what they can do
after authentication.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import torch
import uvicorn
from bittensor.keyfiles import Keypair

from iota.auth import sign_headers
from iota.chain.local import LocalChain
from iota.client.orchestrator import OrchestratorClient, Refused
from iota.model import wire
from iota.orchestrator.app import STORAGE_PREFIX
from iota.orchestrator.assembly import assemble
from iota.orchestrator.service import Orchestrator
from iota.protocol import RegisterRequest, Report, Work
from iota.protocol.version import PROTOCOL_VERSION, VERSION_HEADER
from iota.storage import LocalStore
from iota.storage.transfer import download, upload
from iota.train.run import Run
from tests.orchestrator import run_settings
from tests.support import Clock, running_server

MINERS = ("head", "mid", "tail")  # registered in this order, they take stages 0, 1, 2
TABLES = ("kv", "miners", "samples", "hops", "losses", "events")  # the run's state (strikes live apart)
NAMES = ("orchestrator", "operator", "validator", "validator2", "cold", "stranger", "idle", *MINERS)


@dataclass
class Net:
    url: str
    orch: Orchestrator
    run: Run
    store: LocalStore
    clock: Clock
    clients: dict[str, OrchestratorClient]
    keys: dict[str, Keypair]
    app: Any = None

    def join(self, *names: str) -> None:
        for name in names:
            request = RegisterRequest(device="cpu", memory_bytes=1 << 34, session=uuid.uuid4().hex)
            assert self.clients[name].register(request).stage == MINERS.index(name)

    def work(self, name: str, kind: str = "forward") -> Work:
        work = self.clients[name].work()
        assert work.kind == kind, work.reason
        return work

    def activation(self, fill: float = 0.0) -> bytes:
        """Correctly sized bytes for any activation or gradient object of this run."""
        model = self.run.model
        shape = (self.run.settings.micro_batch, model.seq_len, model.wire_width)
        data = wire.encode(torch.full(shape, fill), wire.wire_dtype(self.run.settings.wire_dtype))
        assert len(data) == self.orch.limits.activation_bytes
        return data

    def forward(self, name: str, fill: float, loss: float | None = None) -> tuple[Work, bytes | None, bytes]:
        """`name` takes its next forward, uploads `fill`-valued bytes and reports: an honest hop."""
        work = self.work(name)
        data = download(work.input_url, work.input_sha256, 1 << 24) if work.input_url else None
        out = self.activation(fill)
        assert work.output_url is not None
        upload(work.output_url, out)
        self.clients[name].report(report_for(work, data, out, loss))
        return work, data, out

    def lease_at(self, stage: int) -> tuple[Work, bytes]:
        """Bring a new sample to `stage` and lease its forward there; returns the work and its input."""
        self.join(*MINERS)
        for name in MINERS[:stage]:
            self.forward(name, fill=0.5)
        work = self.work(MINERS[stage])
        assert work.stage == stage and work.input_url and work.output_url
        return work, download(work.input_url, work.input_sha256, 1 << 24)

    def snapshot(self) -> dict[str, Any]:
        """The run's state tables and /status: what a refused request must leave as it was."""
        db = self.orch.state.db
        tables = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1") for t in TABLES}  # noqa: S608
        return {"status": httpx.get(f"{self.url}/status").json(), **tables}

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.orch.state.events(1000) if e["kind"] == kind]

    def signed(
        self, name: str, path: str, body: bytes = b"", params: dict[str, Any] | None = None
    ) -> httpx.Response:
        """POST signed by `name`'s hotkey, sent once: no retry on 429, unlike the miner's client."""
        target = path + (f"?{urlencode(params)}" if params else "")
        headers = sign_headers(
            self.keys[name], self.keys["orchestrator"].ss58_address, "POST", target, body, time.time_ns()
        )
        headers |= {VERSION_HEADER: str(PROTOCOL_VERSION), "content-type": "application/json"}
        return httpx.post(self.url + target, content=body, headers=headers)


def report_for(
    work: Work, data: bytes | None, out: bytes | None, loss: float | None = None, **over: Any
) -> Report:
    """The report a well-behaved miner sends for `work`; `over` replaces fields."""
    fields: dict[str, Any] = {
        "run_id": work.run_id,
        "epoch": work.epoch,
        "hop_id": work.hop_id,
        "inner_step": 0,
        "input_sha256": wire.sha256(data) if data is not None else None,
        "output_sha256": wire.sha256(out) if out is not None else None,
        "output_md5": wire.md5_hex(out) if out is not None else None,
        "loss": loss,
        **over,
    }
    return Report(**fields)


def refused(call: Any, status: int, fragment: str = "") -> Any:
    """Run `call`, which must be refused with `status` and a reason containing `fragment`; the detail."""
    with pytest.raises(Refused) as error:
        call()
    assert error.value.status == status, error.value.detail
    detail = error.value.detail
    text = detail["message"] if isinstance(detail, dict) else str(detail)
    assert fragment in text, text
    return detail


@contextmanager
def serving(
    app: Any, options: dict[str, Any] | None = None, startup_timeout_s: float = 10.0
) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on a free 127.0.0.1 port, with `options` for uvicorn.Config
    (those of server_options; its host and port are replaced); yields the base URL."""
    if options is None:
        with running_server(app) as url:
            yield url
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    settings = {k: v for k, v in options.items() if k not in ("host", "port")}
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", **settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def serve_net(
    data_dir: Path,
    keys: dict[str, Keypair],
    run_dir: Path,
    options: dict[str, Any] | None = None,
    **overrides: Any,
) -> Iterator[Net]:
    """A fresh 3-stage run on a real server: miners, `idle` and `validator` on the chain, `stranger` not.
    `options`: uvicorn's, as server_options makes them (default: tests.support.running_server's)."""
    chain = LocalChain(run_dir / "chain.json")
    for name in (*MINERS, "idle"):
        chain.register(keys[name].ss58_address, keys["cold"].ss58_address)
    for name in ("validator", "validator2"):
        chain.register(keys[name].ss58_address, keys["cold"].ss58_address, 1e6, validator_permit=True)
    settings = run_settings(
        data_dir, run_dir / "run", operator_hotkey=keys["operator"].ss58_address, **overrides
    )
    clock = Clock()
    # The store's URLs must name the server's port, which running_server picks: set once it is known.
    store = LocalStore(
        run_dir / "run" / "store", "http://127.0.0.1:9/storage", secrets.token_bytes(32), now=clock
    )
    assembled = assemble(settings, chain, keys["orchestrator"].ss58_address, store=store, local_store=store)
    assembled.orchestrator.clock = clock
    with serving(assembled.app, options) as url:
        store.base_url = url + STORAGE_PREFIX
        clients = {
            name: OrchestratorClient(
                url, keys[name], keys["orchestrator"].ss58_address, timeout_s=10, give_up_s=5
            )
            for name in ("operator", "validator", "validator2", "idle", "stranger", *MINERS)
        }
        try:
            yield Net(url, assembled.orchestrator, assembled.run, store, clock, clients, keys, assembled.app)
        finally:
            for client in clients.values():
                client.close()
