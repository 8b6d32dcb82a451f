"""A registered miner that leases work and never reports or releases it (a hoarder) is capped, struck per lapsed
lease, given shorter leases, and banned, while an honest miner of the same stage completes work at its rate; the
items the hoarder let lapse go to the honest miner first. The hoarder asks from four threads at once, with real
signed clients against the real app; time moves on the orchestrator's clock, never by sleeping. An honest miner's
own pipeline (prefetch and outbox, iota.miner.hops) never reaches the cap."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from bittensor.keyfiles import Keypair

from iota.client.orchestrator import OrchestratorClient, Refused
from iota.config import OrchestratorSettings
from iota.orchestrator.abuse import AbuseConfig, AbusePolicy
from iota.protocol import Ack, RegisterRequest, Report, Work
from iota.storage.transfer import upload
from tests.miner.conftest import Net as MinerNet
from tests.miner.conftest import make_net  # noqa: F401  (fixture)
from tests.security import Net, refused, report_for, serve_net

# Long enough that a round of asking on a loaded machine stays inside the hoarder's shortest term (30 s of real
# time), short enough that its 50 lapses fall inside the strike window (600 s on the orchestrator's clock).
LEASE_S = 240.0
CAP = OrchestratorSettings.model_fields["max_leases_held"].default
BAN_AT = AbuseConfig().ban_at
THREADS, ASKS_PER_THREAD = 4, 3
HONEST_MOST = 4  # an honest miner's leases at most: one prefetched, one computing, two in its outbox
HONEST_PER_ROUND = 6  # more than the hoarder can hold: the lapsed items and then new ones


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    # One stage: both miners are head and tail, so one honest hop completes a sample.
    with serve_net(data_dir, keypairs, tmp_path, stages=1, samples_per_epoch=10**6, lease_s=LEASE_S) as net:
        # The default thresholds, less the throttle (tested in test_abuse), which would slow this test in real time.
        config = AbuseConfig(throttle_at=BAN_AT, ban_at=BAN_AT)
        exempt = [net.keys["operator"].ss58_address]
        net.orch.abuse = AbusePolicy(net.orch.state, net.orch.scheduler, config, exempt=exempt)
        yield net


def hoard(net: Net, clients: list[OrchestratorClient]) -> tuple[list[Work], list[str]]:
    """Every thread asks for work ASKS_PER_THREAD times at once; the items leased and the reasons to wait."""

    def ask(client: OrchestratorClient) -> list[Work]:
        return [client.work() for _ in range(ASKS_PER_THREAD)]

    with ThreadPoolExecutor(THREADS) as pool:
        answers = [work for batch in pool.map(ask, clients) for work in batch]
    return [w for w in answers if w.kind == "forward"], [w.reason for w in answers if w.kind == "wait"]


def honest_hop(net: Net) -> Work:
    """The honest miner takes its next item, uploads its output and reports it with the loss."""
    work = net.work("head")
    out = net.activation(0.5)
    assert work.output_url is not None
    upload(work.output_url, out)
    net.clients["head"].report(report_for(work, None, out, loss=2.0))
    return work


def test_a_hoarder_is_capped_struck_shortened_and_banned_while_the_honest_miner_keeps_its_rate(
    net: Net,
) -> None:
    net.join("head")
    hoarder = net.keys["idle"].ss58_address
    clients = [
        OrchestratorClient(net.url, net.keys["idle"], net.keys["orchestrator"].ss58_address, timeout_s=30)
        for _ in range(THREADS)
    ]
    request = RegisterRequest(device="cpu", memory_bytes=1 << 34, session=uuid.uuid4().hex)
    assert clients[0].register(request).stage == 0  # the honest miner's stage

    assert net.orch.abuse is not None
    abuse = net.orch.abuse
    honest_done, lapsed_total = 0, 0
    # Per round: the terms of the hoarder's leases, and how long its asking took.
    terms: list[tuple[list[float], float]] = []
    lapsed: list[Work] = []
    try:
        for _round in range(BAN_AT):
            if lapsed:
                # The hoarder's leases lapse. Its heartbeat sweeps them: it keeps the miner registered, not its
                # leases (and answers 403 once the lapses it swept have banned it).
                net.clock.offset += max(w.lease_expires or 0 for w in lapsed) - net.clock() + 2
                try:
                    clients[0].heartbeat()
                except Refused as banned:
                    assert banned.status == 403
                lapsed_total += len(lapsed)
                assert abuse.strikes(hoarder, net.clock()) == lapsed_total  # one strike per lapsed lease
                if abuse.ban_reason(hoarder) is not None:
                    refused(clients[0].work, 403, "banned")
                    break
                waiting = clients[0].work()
                assert waiting.kind == "wait" and "offered to other miners first" in waiting.reason
            # The honest miner is never kept waiting, and gets the items that lapsed with the hoarder first.
            took = [honest_hop(net) for _ in range(HONEST_PER_ROUND)]
            honest_done += len(took)
            assert [w.hop_id for w in took[: len(lapsed)]] == sorted(w.hop_id or 0 for w in lapsed)
            issued = net.clock()
            lapsed, reasons = hoard(net, clients)
            answered = net.clock()
            # From twelve asks on four threads, never more than the cap; the others are told why.
            assert len(lapsed) == CAP == net.orch.scheduler.leases_held(hoarder), reasons
            assert len(reasons) == THREADS * ASKS_PER_THREAD - CAP
            assert all(f"holding {CAP} leased items (limit {CAP})" in why for why in reasons), reasons
            terms.append(([(w.lease_expires or 0) - issued for w in lapsed], answered - issued))
        else:
            pytest.fail(f"the hoarder was not banned after {lapsed_total} lapsed leases")
    finally:
        for client in clients:
            client.close()

    # A full term until its first lapses, then the shortest (each lease was issued while its round asked).
    expected = [LEASE_S] + [LEASE_S / 8] * (len(terms) - 1)
    for term, (leases, asking_s) in zip(expected, terms, strict=True):
        assert all(term <= lease <= term + asking_s for lease in leases), (term, leases)
    assert lapsed_total >= BAN_AT and len(terms) == -(-BAN_AT // CAP)  # banned after 13 terms of 4 lapses
    (ban,) = net.events("ban")
    assert ban["hotkey"] == hoarder and "lapsed unreported" in ban["why"]
    assert net.orch.scheduler.leases_held(hoarder) == 0  # the ban handed its last leases back
    # The honest miner did every hop it asked for, was never struck, and kept full leases.
    head = net.keys["head"].ss58_address
    assert honest_done == HONEST_PER_ROUND * len(terms)
    assert abuse.strikes(head, net.clock()) == 0 and net.orch.scheduler.lapses.term(head) == LEASE_S
    assert honest_hop(net).kind == "forward"


def test_an_honest_miners_prefetch_and_outbox_never_reach_the_cap(make_net: Callable[..., MinerNet]) -> None:  # noqa: F811
    """Real miner daemons; the tail's reports are held back until it holds the most an honest miner can (one item
    prefetched, one computing, two in its outbox); no request of any miner is ever refused for holding too many."""
    # A window of 4 lets 4 samples reach the tail before any backward; leases outlast a loaded machine.
    net = make_net(samples_per_epoch=8, micro_batch=2, accumulate=4, max_in_flight=8, lease_s=3600.0)
    reasons: list[str] = []
    for _ in range(2):
        miner = net.miner()
        watch(miner.client, reasons)
        net.start(miner)
    deadline_s = 120.0
    wait_until("the head and body to register", lambda: len(net.orch.state.miners()) == 2, deadline_s)
    tail = net.miner()
    watch(tail.client, reasons)
    gate = threading.Event()
    send_report = tail.client.report

    def held_report(report: Report) -> Ack:
        gate.wait(deadline_s)
        return send_report(report)

    tail.client.report = held_report  # type: ignore[method-assign]
    net.start(tail)
    hotkey = tail.client.hotkey
    try:
        held = HONEST_MOST
        wait_until(
            f"the tail to hold {held} leases",
            lambda: net.orch.scheduler.leases_held(hotkey) == held,
            deadline_s,
        )
    finally:
        gate.set()
    net.join(timeout_s=deadline_s)
    assert net.orch.status().phase == "done"
    assert not [why for why in reasons if "leased items" in why], reasons
    assert net.orch.abuse is not None and net.orch.abuse.strikes(hotkey, net.orch.clock()) == 0


def watch(client: OrchestratorClient, reasons: list[str]) -> None:
    """Keep the reason of every `wait` answer the client gets (the client's own call, unchanged)."""
    work = client.work

    def watched(*args: Any, **kwargs: Any) -> Work:
        answer = work(*args, **kwargs)
        if answer.kind == "wait":
            reasons.append(answer.reason)
        return answer

    client.work = watched  # type: ignore[method-assign]


def wait_until(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
