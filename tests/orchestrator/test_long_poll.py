"""Long-polled POST /work on the real app over HTTP: a request held while there is no work is answered as soon as
work for that miner appears (and only that miner's request is woken), when the miner itself reports or leaves, or
with a `wait` to ask again at once when its hold ends; held requests do not count as requests in progress."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from iota.client.orchestrator import Refused
from iota.protocol import RegisterRequest, Work
from tests.orchestrator import test_routes
from tests.orchestrator.test_routes import MINERS, Net, forward_with_bytes, lease_at

keys, net = test_routes.keys, test_routes.net  # the same fixtures: a fresh run on a real server

HOLD_S = 5.0


def held(
    pool: ThreadPoolExecutor, net: Net, name: str, hold_s: float = HOLD_S, forward: bool = True
) -> Future[Work]:
    """`name` asks for work with a hold; returns once the orchestrator holds the request."""
    before = net.orch.scheduler.doorbell.held
    future = pool.submit(net.clients[name].work, forward, hold_s)
    deadline = time.monotonic() + 5
    while net.orch.scheduler.doorbell.held == before:
        assert not future.done(), future.result()  # answered at once: there was work, or an error
        assert time.monotonic() < deadline, "the request was never held"
        time.sleep(0.01)
    return future


def test_a_held_request_is_answered_as_soon_as_work_arrives(net: Net) -> None:
    net.join(*MINERS)
    with ThreadPoolExecutor(2) as pool:
        mid = held(pool, net, "mid")
        time.sleep(0.3)
        assert not mid.done()
        head_work, _ = forward_with_bytes(net, "head", fill=0.5)  # queues the sample's forward on stage 1
        reported = time.monotonic()
        work = mid.result(timeout=HOLD_S)
        assert time.monotonic() - reported < 1.0  # woken, not answered at the end of its hold
    assert work.kind == "forward" and work.stage == 1 and work.sample_id == head_work.sample_id
    hop = net.orch.state.hop(work.hop_id or -1)
    assert hop is not None and hop.status == "leased" and hop.miner == net.clients["mid"].hotkey


def test_a_hold_without_work_ends_in_a_wait_to_ask_again_at_once(net: Net) -> None:
    net.join(*MINERS)
    started = time.monotonic()
    work = net.clients["mid"].work(True, 0.5)
    assert 0.2 <= time.monotonic() - started < 3.0  # held a random 50-100% of its hold
    assert work.kind == "wait" and work.wait_s == 0.0 and "no work queued" in work.reason
    assert net.orch.scheduler.doorbell.held == 0
    # Without a hold the answer comes at once, with the usual pause before asking again.
    started = time.monotonic()
    work = net.clients["mid"].work()
    assert work.kind == "wait" and work.wait_s > 0 and time.monotonic() - started < 0.5


def test_one_forward_wakes_one_of_the_miners_waiting_for_it(net: Net) -> None:
    net.join(*MINERS)
    idle = net.clients["idle"].register(RegisterRequest(device="cpu", memory_bytes=1 << 34, session="idle"))
    with net.orch.state.transaction():  # a second miner on stage 1 (the scheduler put it on stage 0)
        miner = net.orch.state.miner(net.clients["idle"].hotkey)
        assert miner is not None and idle.stage == miner.stage
        net.orch.state.upsert_miner(dataclasses.replace(miner, stage=1))
    with ThreadPoolExecutor(2) as pool:
        first = held(pool, net, "mid")
        second = held(pool, net, "idle")
        forward_with_bytes(net, "head", fill=0.5)
        assert first.result(timeout=2).kind == "forward"  # the miner that has waited longest
        time.sleep(0.5)
        assert not second.done()  # not woken to race for work that is gone
        assert net.orch.scheduler.doorbell.held == 1
        assert second.result(timeout=HOLD_S + 2).kind == "wait"


def test_a_miners_own_release_answers_its_held_request(net: Net) -> None:
    work, _ = lease_at(net, 1)
    assert work.hop_id is not None
    with ThreadPoolExecutor(1) as pool:
        # Finishing its window: backward work only, and there is none; its own report or release may change that.
        mid = held(pool, net, "mid", forward=False)
        released = time.monotonic()
        net.clients["mid"].release(work.hop_id, work.epoch)
        answer = mid.result(timeout=HOLD_S)
        assert time.monotonic() - released < 1.0
    assert answer.kind == "wait" and answer.wait_s == 0.0 and answer.holding == []


def test_a_miner_that_leaves_gets_its_held_request_refused_at_once(net: Net) -> None:
    net.join(*MINERS)
    with ThreadPoolExecutor(1) as pool:
        mid = held(pool, net, "mid")
        left = time.monotonic()
        net.clients["mid"].leave()
        with pytest.raises(Refused) as error:
            mid.result(timeout=HOLD_S)
        assert time.monotonic() - left < 1.0
    assert error.value.status == 409


def test_held_requests_are_not_requests_in_progress(net: Net) -> None:
    net.join(*MINERS)
    admission = net.app.state.admission
    assert admission is not None
    with ThreadPoolExecutor(2) as pool:
        held(pool, net, "mid")
        held(pool, net, "tail")
        assert admission.in_progress == 0
        assert net.orch.scheduler.doorbell.held == 2
        net.orch.scheduler.doorbell.ring_all()
