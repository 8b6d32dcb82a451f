"""Admission control on the real orchestrator app: beyond a bound on requests in progress, new ones get 503 with
Retry-After at once (before their signature is checked), work already handed out is still finished, and the
server takes requests again as soon as the queue drains."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from bittensor.keyfiles import Keypair

from iota.auth import HotkeyAuth
from iota.chain.local import LocalChain
from iota.orchestrator.admission import Admission, AdmissionMiddleware, finishes_work
from iota.orchestrator.app import STORAGE_PREFIX
from iota.orchestrator.assembly import assemble
from iota.orchestrator.scheduler import Policy, Scheduler
from iota.orchestrator.service import Orchestrator
from iota.orchestrator.state import StateStore
from iota.protocol import RegisterRequest, WorkRequest
from iota.state import Database
from tests.orchestrator import run_settings
from tests.support import running_server

BOUND = 2
WORK_BODY = WorkRequest().model_dump_json().encode()
JSON = {"content-type": "application/json"}


@dataclass
class Server:
    url: str
    orch: Orchestrator
    admission: Admission
    clients: dict[str, httpx.Client]  # one signed client per miner
    gate: threading.Event  # while clear, every POST /work waits in the orchestrator's thread
    waiting: list[str]  # hotkeys whose /work has reached the orchestrator's thread

    def post_work(self, name: str) -> httpx.Response:
        return self.clients[name].post("/work", content=WORK_BODY, headers=JSON)


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def server(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    keys = {name: Keypair.create_from_mnemonic(Keypair.generate_mnemonic()) for name in "abcdo"}
    chain = LocalChain(tmp_path / "chain.json")
    for name in "abcd":
        chain.register(keys[name].ss58_address, keys[name].ss58_address)
    settings = run_settings(data_dir, tmp_path / "run", max_requests_in_progress=BOUND)
    assembled = assemble(settings, chain, keys["o"].ss58_address)
    orch = assembled.orchestrator
    gate, waiting = threading.Event(), []
    work = orch.work

    def gated_work(hotkey: str, forward: bool = True) -> Any:
        waiting.append(hotkey)
        assert gate.wait(30), "the test never opened the gate"
        return work(hotkey, forward)

    monkeypatch.setattr(orch, "work", gated_work)
    # On the worker thread (as with Postgres or S3), so that a call held at the gate leaves the event loop free.
    assembled.app.state.call_runner.inline = False
    with running_server(assembled.app) as url:
        clients = {
            name: httpx.Client(base_url=url, auth=HotkeyAuth(keys[name], keys["o"].ss58_address), timeout=30)
            for name in "abcd"
        }
        for name, client in clients.items():
            body = RegisterRequest(device="cpu", memory_bytes=1 << 40, session=name).model_dump_json()
            assert client.post("/miners/register", content=body, headers=JSON).status_code == 200
        try:
            yield Server(url, orch, assembled.app.state.admission, clients, gate, waiting)
        finally:
            gate.set()
            for client in clients.values():
                client.close()


def fill(server: Server, pool: ThreadPoolExecutor) -> list[Future[httpx.Response]]:
    """BOUND requests for work in progress: the first holds the orchestrator's thread, the rest queue behind it."""
    pending = [pool.submit(server.post_work, name) for name in "ab"[:BOUND]]
    wait_until(lambda: server.admission.in_progress == BOUND and len(server.waiting) == 1)
    return pending


def test_requests_beyond_the_bound_are_refused_at_once_and_the_rest_are_served(server: Server) -> None:
    with ThreadPoolExecutor(4) as pool:
        pending = fill(server, pool)

        started = time.monotonic()
        refused = server.post_work("c")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] in ("1", "2", "3")  # spread, so refused miners return apart
        assert refused.json()["detail"]["code"] == "overloaded"
        assert time.monotonic() - started < 2.0  # not queued behind the held thread
        # Refused before the signature is looked at: an unsigned request gets the same answer, not a 401.
        unsigned = httpx.post(f"{server.url}/work", content=WORK_BODY, headers=JSON)
        assert unsigned.status_code == 503
        assert len(server.waiting) == 1  # the refused requests never reached the orchestrator
        assert server.admission.refused == 2

        server.gate.set()
        answers = [f.result(timeout=30) for f in pending]
        assert [a.status_code for a in answers] == [200] * BOUND
        # Drained: the refused miner is served now, on the connection that carried its refusal.
        wait_until(lambda: server.admission.in_progress == 0)
        served = server.post_work("c")
        assert served.status_code == 200
        assert local_port(served) == local_port(refused)


def local_port(response: httpx.Response) -> int:
    return int(response.extensions["network_stream"].get_extra_info("socket").getsockname()[1])


def test_work_already_handed_out_is_finished_under_load(server: Server) -> None:
    with ThreadPoolExecutor(4) as pool:
        pending = fill(server, pool)
        # An object transfer is not the orchestrator's work: not counted, not refused (this one reaches the store,
        # which refuses its unsigned URL).
        transfer = httpx.get(f"{server.url}{STORAGE_PREFIX}/objects/run-test/none?exp=1&sig=00")
        assert transfer.status_code in (400, 403)
        assert server.admission.in_progress == BOUND
        # A report completes work that was handed out: counted, never refused; it waits its turn.
        report = pool.submit(server.clients["c"].post, "/work/1/report", content=b"{}", headers=JSON)
        wait_until(lambda: server.admission.in_progress == BOUND + 1)
        assert server.post_work("d").status_code == 503
        server.gate.set()
        assert (
            report.result(timeout=30).status_code == 422
        )  # served (and refused on its merits, not for load)
        assert [f.result(timeout=30).status_code for f in pending] == [200] * BOUND


def test_metrics_count_refusals(server: Server) -> None:
    with ThreadPoolExecutor(4) as pool:
        pending = fill(server, pool)
        assert server.post_work("c").status_code == 503
        server.gate.set()
        for f in pending:
            f.result(timeout=30)
    wait_until(lambda: server.admission.in_progress == 0)
    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    assert "iota_requests_refused_overloaded_total 1" in lines
    assert f"iota_requests_in_progress_limit {BOUND}" in lines


def test_miners_are_not_timed_out_while_their_requests_may_be_refused(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout = server.orch.scheduler.policy.miner_timeout_s
    later = time.time() + timeout + 10  # every miner has been silent longer than the timeout by then
    monkeypatch.setattr(server.orch, "clock", lambda: later)
    with ThreadPoolExecutor(4) as pool:
        pending = fill(server, pool)
        assert server.post_work("c").status_code == 503  # at `later`
        server.orch.scheduler.sweep(later + 1)
        assert all(m.alive for m in server.orch.state.miners())
        server.orch.scheduler.sweep(later + timeout)  # no refusal for a whole timeout: silence counts again
        assert not any(m.alive for m in server.orch.state.miners())
        server.gate.set()
        for f in pending:
            f.result(timeout=30)


def test_refusals_hold_off_the_miner_timeout(db: Database) -> None:
    policy = Policy(
        n_stages=2, samples_per_epoch=10, epochs=1, max_in_flight=2, lease_s=10, miner_timeout_s=30
    )
    sched = Scheduler(StateStore(db), policy, lambda hop, lease: f"act/{hop.id}/{lease}")
    sched.register("m", None, "cpu", 1, "s", now=0.0)
    sched.refused_for_load(now=20.0)
    sched.sweep(now=49.0)  # silent 49 s, but refused for load 29 s ago
    assert sched.state.miner("m").alive  # type: ignore[union-attr]
    sched.sweep(now=50.0)
    assert not sched.state.miner("m").alive  # type: ignore[union-attr]


def test_requests_arriving_together_are_counted_together() -> None:
    # Served inline a request never waits, so without the middleware's yield each would finish before the next
    # is counted and a backlog could never be refused.
    served: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        served.append(1)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def burst(n: int) -> list[int]:
        middleware = AdmissionMiddleware(app, Admission(3))
        statuses: list[int] = []

        async def one() -> None:
            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            await middleware({"type": "http", "path": "/work"}, None, send)

        await asyncio.gather(*(one() for _ in range(n)))
        return statuses

    assert sorted(asyncio.run(burst(5))) == [200, 200, 200, 503, 503]
    assert len(served) == 3


def test_admission_counts_and_reports_refusals() -> None:
    seen: list[str] = []
    admission = Admission(1, exempt=lambda path: path == "/free", on_refusal=lambda: seen.append("refused"))
    assert admission.admit("/work")
    admission.in_progress = 1
    assert admission.admit("/free") and not admission.admit("/work")
    assert admission.refused == 1 and seen == ["refused"]


def test_which_requests_finish_work() -> None:
    assert (
        finishes_work("/work/12/report")
        and finishes_work("/work/12/release")
        and finishes_work("/phase/report")
    )
    assert finishes_work("/miners/leave")
    assert not any(map(finishes_work, ("/work", "/miners/register", "/status", "/miners/heartbeat")))
    with pytest.raises(ValueError):
        Admission(0)
