"""Admission control on the real orchestrator app: beyond a bound on calls in progress, new ones get 503 with
Retry-After at once, one caller beyond its share gets 429, work already handed out is still finished, and the
server takes requests again as soon as the queue drains. A slot is taken only once the signature is checked."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from bittensor.keyfiles import Keypair
from fastapi import HTTPException

from iota.auth import HotkeyAuth
from iota.chain.local import LocalChain
from iota.orchestrator.admission import Admission, finishes_work
from iota.orchestrator.app import STORAGE_PREFIX
from iota.orchestrator.assembly import assemble
from iota.orchestrator.scheduler import Policy, Scheduler
from iota.orchestrator.service import Orchestrator
from iota.orchestrator.state import StateStore
from iota.protocol import RegisterRequest, Report, WorkRequest
from iota.state import Database
from tests.orchestrator import run_settings
from tests.support import running_server

BOUND = 2  # so one hotkey may hold 1 slot (an eighth, rounded up) and one address 1 (a half)
ADDRESSES = {name: f"127.0.0.{10 + i}" for i, name in enumerate("abcd")}  # one machine per miner
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
    keys: dict[str, Keypair]

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
            name: httpx.Client(
                base_url=url,
                auth=HotkeyAuth(keys[name], keys["o"].ss58_address),
                timeout=30,
                transport=httpx.HTTPTransport(local_address=ADDRESSES[name]),
            )
            for name in "abcd"
        }
        for name, client in clients.items():
            body = RegisterRequest(device="cpu", memory_bytes=1 << 40, session=name).model_dump_json()
            assert client.post("/miners/register", content=body, headers=JSON).status_code == 200
        try:
            yield Server(url, orch, assembled.app.state.admission, clients, gate, waiting, keys)
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
        # A slot is for a checked signature: an unsigned request is refused for that, and never counted.
        unsigned = httpx.post(f"{server.url}/work", content=WORK_BODY, headers=JSON)
        assert unsigned.status_code in (401, 426)
        assert len(server.waiting) == 1  # the refused requests never reached the orchestrator
        assert server.admission.refused == 1

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


def test_one_hotkey_gets_its_share_of_the_slots_and_no_more(server: Server) -> None:
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(server.post_work, "a")
        wait_until(lambda: server.admission.in_progress == 1 and len(server.waiting) == 1)
        # The same hotkey from another machine, a slot still free: over its share (1 of 2), refused at once.
        auth = HotkeyAuth(server.keys["a"], server.keys["o"].ss58_address)
        transport = httpx.HTTPTransport(local_address="127.0.0.99")
        with httpx.Client(base_url=server.url, auth=auth, transport=transport, timeout=30) as elsewhere:
            refused = elsewhere.post("/work", content=WORK_BODY, headers=JSON)
        assert refused.status_code == 429 and refused.json()["detail"]["code"] == "too_many_in_progress"
        assert refused.headers["retry-after"] == "1"
        # Another hotkey takes the free slot, and waits its turn.
        other = pool.submit(server.post_work, "b")
        wait_until(lambda: server.admission.in_progress == BOUND)
        server.gate.set()
        assert held.result(timeout=30).status_code == 200 and other.result(timeout=30).status_code == 200
    assert server.admission.refused == 0 and server.admission.refused_share == 1


def test_work_already_handed_out_is_finished_under_load(server: Server) -> None:
    with ThreadPoolExecutor(4) as pool:
        pending = fill(server, pool)
        # An object transfer is not the orchestrator's work: not counted, not refused (this one reaches the store,
        # which refuses its unsigned URL).
        transfer = httpx.get(f"{server.url}{STORAGE_PREFIX}/objects/run-test/none?exp=1&sig=00")
        assert transfer.status_code in (400, 403)
        assert server.admission.in_progress == BOUND
        # A report completes work that was handed out: counted, never refused; it waits its turn.
        body = Report(
            run_id="run-test",
            epoch=0,
            hop_id=1,
            inner_step=0,
            input_sha256=None,
            output_sha256=None,
            output_md5=None,
        )
        report = pool.submit(
            server.clients["c"].post, "/work/1/report", content=body.model_dump_json(), headers=JSON
        )
        wait_until(lambda: server.admission.in_progress == BOUND + 1)
        assert server.post_work("d").status_code == 503
        server.gate.set()
        # Served, and refused on its merits (no such lease), not for load.
        assert report.result(timeout=30).status_code in (400, 404, 409)
        assert [f.result(timeout=30).status_code for f in pending] == [200] * BOUND


def test_metrics_count_refusals(server: Server) -> None:
    with ThreadPoolExecutor(4) as pool:
        pending = fill(server, pool)
        assert server.post_work("c").status_code == 503
        server.gate.set()
        for f in pending:
            f.result(timeout=30)
    wait_until(lambda: server.admission.in_progress == 0)
    figures = dict(
        line.split() for line in httpx.get(f"{server.url}/metrics").text.splitlines() if line[:1] != "#"
    )
    assert float(figures["iota_requests_refused_overloaded_total"]) == 1
    assert float(figures["iota_requests_in_progress_limit"]) == BOUND


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


def scope(address: str, path: str = "/work") -> dict[str, Any]:
    return {"type": "http", "path": path, "client": (address, 40000), "headers": []}


async def outcomes(
    admission: Admission, callers: Sequence[tuple[str | None, str]], path: str = "/work"
) -> list[int]:
    """The status each of ``callers`` (hotkey, address), arriving together, gets: 200 when it had a slot."""
    served: list[int] = []

    async def one(hotkey: str | None, address: str) -> int:
        try:
            async with admission.slot(scope(address, path), hotkey):
                served.append(1)
                await asyncio.sleep(0)  # all are in progress together
                return 200
        except HTTPException as refusal:
            return refusal.status_code

    statuses = await asyncio.gather(*(one(*caller) for caller in callers))
    assert len(served) == statuses.count(200)
    assert admission.in_progress == 0 and not admission.by_hotkey and not admission.by_address
    return list(statuses)


def test_calls_arriving_together_are_counted_together() -> None:
    # Served inline a call never waits, so without the slot's yield each would finish before the next is counted
    # and a backlog could never be refused.
    callers: list[tuple[str | None, str]] = [(f"h{i}", f"10.0.0.{i}") for i in range(5)]
    assert sorted(asyncio.run(outcomes(Admission(3), callers))) == [200, 200, 200, 503, 503]


def test_one_hotkey_or_one_address_gets_its_share_and_no_more() -> None:
    seen: list[str] = []
    admission = Admission(16, exempt=finishes_work, on_refusal=lambda: seen.append("refused"))
    assert (admission.per_hotkey, admission.per_address) == (2, 8)
    # One hotkey opening many calls at once, from many addresses: two are served.
    many = [("greedy", f"10.0.1.{i}") for i in range(10)]
    assert sorted(asyncio.run(outcomes(admission, many))) == [200] * 2 + [429] * 8
    # One address with many hotkeys (Sybils on one machine): half the bound, the rest is left to others.
    sybils: list[tuple[str | None, str]] = [(f"s{i}", "10.0.2.1") for i in range(12)]
    assert sorted(asyncio.run(outcomes(admission, sybils))) == [200] * 8 + [429] * 4
    # Anonymous public reads count by address alone.
    reads: list[tuple[str | None, str]] = [(None, "10.0.3.1")] * 10
    assert sorted(asyncio.run(outcomes(admission, reads))) == [200] * 8 + [429] * 2
    # A caller over its share is refused for what it does, not for the load: the miner timeout is not held off.
    assert seen == [] and admission.refused == 0 and admission.refused_share == 14
    # Work already handed out is counted and never refused, whoever sends it.
    assert asyncio.run(outcomes(admission, many, "/work/3/report")) == [200] * 10


def test_the_address_is_the_trusted_proxys_client() -> None:
    admission = Admission(4, trusted_proxies=("10.9.0.1",))
    behind = {**scope("10.9.0.1"), "headers": [(b"x-forwarded-for", b"203.0.113.7")]}
    spoofed = {**scope("198.51.100.1"), "headers": [(b"x-forwarded-for", b"203.0.113.7")]}

    async def addresses() -> list[str]:
        seen: list[str] = []
        for each in (behind, spoofed):
            async with admission.slot(each, None):
                seen.extend(admission.by_address)
        return seen

    assert asyncio.run(addresses()) == ["203.0.113.7", "198.51.100.1"]


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
