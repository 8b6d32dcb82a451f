"""What an anonymous reader, or a validator that only draws, can make the orchestrator do: the score log is rebuilt
at most once a second however many ask, read by page where it grows, and each address has a budget of public reads;
a validator has a bounded number of audits open. A real orchestrator on uvicorn."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from bittensor.keyfiles import Keypair

from iota.orchestrator.app import PUBLIC_READS_PER_IP
from iota.orchestrator.audits import MAX_OPEN_AUDITS
from iota.orchestrator.routes.cache import PUBLIC_READ_TTL_S
from iota.orchestrator.routes.validators import MAX_VERDICTS_PAGE
from tests.security import MINERS, Net, serve_net
from tests.security.test_verdicts import audit, verdict


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    with serve_net(data_dir, keypairs, tmp_path) as net:
        yield net


def client_at(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def test_a_flood_of_score_reads_rebuilds_the_log_once_a_second(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    auditor = net.orch.auditor
    rebuilt: list[float] = []
    score_log = auditor.score_log

    def counted() -> dict[str, Any]:
        rebuilt.append(time.monotonic())
        return score_log()

    monkeypatch.setattr(auditor, "score_log", counted)
    clients = [client_at(f"127.0.0.{30 + i}") for i in range(10)]  # each within its address's budget
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: clients[i % 10].get(f"{net.url}/scores"), range(80)))
    elapsed = time.monotonic() - started
    for client in clients:
        client.close()
    assert [a.status_code for a in answers] == [200] * 80
    assert all(a.json()["run_id"] == "run-test" for a in answers)
    assert 1 <= len(rebuilt) <= 1 + elapsed / PUBLIC_READ_TTL_S, (len(rebuilt), elapsed)


def test_public_reads_have_a_budget_per_address(net: Net) -> None:
    statuses: list[int] = []
    with client_at("127.0.0.40") as flood:
        started = time.monotonic()
        while 429 not in statuses and len(statuses) < 1000:
            answer = flood.get(f"{net.url}/scores")
            statuses.append(answer.status_code)
        elapsed = time.monotonic() - started
        assert answer.status_code == 429 and int(answer.headers["retry-after"]) >= 1
        # A burst of four seconds' worth, then the rate: however slow the box, no more got through.
        assert statuses.count(200) <= 4 * PUBLIC_READS_PER_IP + PUBLIC_READS_PER_IP * elapsed + 1
        assert flood.get(f"{net.url}/status").status_code == 200  # the run's own reads are not on this budget
    with client_at("127.0.0.41") as other:
        assert other.get(f"{net.url}/scores").status_code == 200  # nor is another address


def test_verdicts_are_read_by_page(net: Net) -> None:
    state = net.orch.state
    with state.transaction():
        for n in range(5):
            state.add_verdict(1.0 + n, "v", "m", 0, 0, True, 1, 1, {"reason": f"r{n}"})
    page = httpx.get(f"{net.url}/scores/verdicts", params={"offset": 1, "limit": 2}).json()
    assert page["total"] == 5 and page["offset"] == 1
    assert [v["detail"]["reason"] for v in page["verdicts"]] == ["r1", "r2"]
    assert httpx.get(f"{net.url}/scores/verdicts", params={"offset": 5}).json()["verdicts"] == []
    for bad in ({"limit": MAX_VERDICTS_PAGE + 1}, {"limit": 0}, {"offset": -1}, {"offset": 2**63}):
        assert httpx.get(f"{net.url}/scores/verdicts", params=bad).status_code == 422, bad
    assert len(httpx.get(f"{net.url}/scores").json()["verdicts"]) == 5  # the whole log, as validators read it


def test_a_validator_has_a_bounded_number_of_audits_open(net: Net) -> None:
    net.orch.auditor.clock = net.clock  # moved past the audits' URLs below
    net.join(*MINERS)
    net.forward("head", 0.5)  # committed work to audit
    tasks = [audit(net) for _ in range(MAX_OPEN_AUDITS)]
    refused = net.signed("validator", "/validators/audit")
    assert refused.status_code == 429 and "unanswered" in refused.text, refused.text
    assert net.signed("validator2", "/validators/audit").status_code == 200  # others are not held back
    verdict(net, tasks[0], passed=True)
    audit(net)  # an answer frees its place
    assert net.signed("validator", "/validators/audit").status_code == 429
    net.clock.offset += net.orch.auditor.url_ttl_s + 1  # the unanswered ones expire with their URLs
    assert [audit(net) for _ in range(MAX_OPEN_AUDITS)]
