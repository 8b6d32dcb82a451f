"""The prefetch and outbox threads on their own: order, bounds, wake-ups, stopping, and errors reaching the caller.

Their collaborators here are plain functions that record what the threads did (the daemon's real ones, HTTP to an
orchestrator and a bucket, are exercised in test_main.py)."""

from __future__ import annotations

import threading
import time

import pytest

from iota.miner.pipeline import Fetched, Outbox, Prefetcher
from iota.protocol import EpochPlan, Work


def work(kind: str, wait_s: float = 0.0, holding: list[int] | None = None) -> Work:
    plan = EpochPlan(epoch=0, tokens_at_start=0, replicas=1)
    return Work(kind=kind, run_id="r", epoch=0, stage=0, plan=plan, wait_s=wait_s, hop_id=7, holding=holding)


# -- Outbox ------------------------------------------------------------------------------------------------------


def test_outbox_sends_in_order_and_returns_each_result_once() -> None:
    sent: list[int] = []
    outbox: Outbox[int, str] = Outbox(lambda i: (sent.append(i), f"odd {i}" if i % 2 else None)[1], depth=1)
    for i in range(6):
        outbox.put(i)
    outbox.drain()
    assert sent == list(range(6))
    assert outbox.unsent() == []
    assert outbox.collect() == ["odd 1", "odd 3", "odd 5"]
    assert outbox.collect() == []
    outbox.close()


def test_outbox_put_blocks_once_depth_items_wait_behind_the_one_being_sent() -> None:
    release = threading.Event()
    outbox: Outbox[int, None] = Outbox(lambda i: (release.wait(10), None)[1], depth=1)
    outbox.put(0)  # being sent (blocked in send)
    outbox.put(1)  # waiting behind it
    assert outbox.unsent() == [0, 1]
    third = threading.Thread(target=outbox.put, args=(2,))
    third.start()
    time.sleep(0.2)
    assert third.is_alive(), "a third item was accepted while two were unsent"
    release.set()
    third.join(5)
    outbox.drain()
    assert outbox.unsent() == []
    outbox.close()


def test_outbox_raises_what_escaped_send_on_the_callers_thread_and_runs_on_sent() -> None:
    sent = threading.Event()

    def send(i: int) -> None:
        if i == 1:
            raise ConnectionError("orchestrator unreachable")

    outbox: Outbox[int, None] = Outbox(send, on_sent=sent.set)
    outbox.put(0)
    outbox.put(1)
    with pytest.raises(ConnectionError, match="unreachable"):
        outbox.drain()
    assert sent.is_set()
    outbox.close()


def test_outbox_workers_send_at_once_but_a_barrier_item_between_the_items_around_it() -> None:
    """Four workers, item 4 a barrier (a report that completes an inner step): items 0-3 are sent at once (each
    waits until all four are being sent), item 4 only after all of them, items 5-7 only after it; results still
    come back in the order put."""
    together = threading.Barrier(4, timeout=10)
    log: list[tuple[str, int]] = []
    lock = threading.Lock()

    def send(i: int) -> str:
        with lock:
            log.append(("start", i))
        if i < 4:
            together.wait()  # raises BrokenBarrierError unless items 0-3 are sent at once
        with lock:
            log.append(("end", i))
        return f"item {i}"

    outbox: Outbox[int, str] = Outbox(send, depth=8, workers=4, barrier=lambda i: i == 4)
    for i in range(8):
        outbox.put(i)
    outbox.drain()
    assert outbox.collect() == [f"item {i}" for i in range(8)]
    at = {event: n for n, event in enumerate(log)}
    assert at[("start", 4)] > max(at[("end", i)] for i in range(4))
    assert min(at[("start", i)] for i in range(5, 8)) > at[("end", 4)]
    outbox.close()


# -- Prefetcher --------------------------------------------------------------------------------------------------


def test_several_searches_run_at_once_and_take_returns_the_first_settled() -> None:
    """Depth 3: three requests in flight; the one answered first is taken first, whichever started first."""
    gates = [threading.Event() for _ in range(3)]
    asked: list[int] = []
    lock = threading.Lock()

    def fetch(forward: bool) -> Fetched:
        with lock:
            n = len(asked)
            asked.append(n)
        gates[n].wait(10)
        return Fetched(Work(**{**work("forward").model_dump(), "hop_id": n}), b"x")

    prefetch = Prefetcher(fetch, depth=3)
    for _ in range(4):
        prefetch.start(lambda: True)  # a fourth start while three search: nothing more
    deadline = time.monotonic() + 10
    while len(asked) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a fourth request, were there one
    assert sorted(asked) == [0, 1, 2] and prefetch.searching == 3
    gates[2].set()
    fetched = prefetch.take(stopping=lambda: False)
    assert fetched is not None and fetched.work.hop_id == 2 and prefetch.searching == 2
    gates[0].set()
    gates[1].set()
    taken = {prefetch.take(stopping=lambda: False).work.hop_id for _ in range(2)}  # type: ignore[union-attr]
    assert taken == {0, 1} and prefetch.searching == 0
    prefetch.close()


class Orchestrator:
    """Answers `wait` until `ready` is set, then a forward item; records each request's `forward` flag."""

    def __init__(self, wait_s: float = 0.05):
        self.ready = threading.Event()
        self.asked: list[bool] = []
        self.wait_s = wait_s

    def fetch(self, forward: bool) -> Fetched:
        self.asked.append(forward)
        if self.ready.is_set():
            return Fetched(work("forward"), b"input")
        return Fetched(work("wait", self.wait_s, holding=[1, 2]), quiet=False)


def test_prefetch_asks_again_through_wait_answers_until_an_item_comes() -> None:
    orch = Orchestrator()
    prefetch = Prefetcher(orch.fetch)
    flags = iter([False, False, True, True, True, True, True, True, True, True])
    prefetch.start(lambda: next(flags))  # decided at each request: a report going out may open the window
    time.sleep(0.2)
    orch.ready.set()
    fetched = prefetch.take(stopping=lambda: False)
    assert fetched is not None and fetched.work.kind == "forward" and fetched.data == b"input"
    assert len(orch.asked) >= 3 and orch.asked[:3] == [False, False, True]
    prefetch.close()


def test_a_kick_cuts_a_wait_short() -> None:
    orch = Orchestrator(wait_s=30.0)
    prefetch = Prefetcher(orch.fetch)
    prefetch.start(lambda: True)
    time.sleep(0.1)  # asked once, now sleeping for 30 s
    orch.ready.set()
    started = time.monotonic()
    prefetch.kick()
    fetched = prefetch.take(stopping=lambda: False)
    assert fetched is not None and fetched.work.kind == "forward"
    assert time.monotonic() - started < 5
    prefetch.close()


def test_stopping_returns_an_answer_that_came_or_none_at_once() -> None:
    orch = Orchestrator(wait_s=30.0)
    prefetch = Prefetcher(orch.fetch)
    prefetch.start(lambda: True)
    time.sleep(0.1)
    started = time.monotonic()
    assert prefetch.take(stopping=lambda: True) is None  # it was sleeping between requests: nothing leased
    assert time.monotonic() - started < 5

    asking, answer = threading.Event(), threading.Event()

    def slow_fetch(forward: bool) -> Fetched:
        asking.set()
        answer.wait(10)
        return Fetched(work("forward"), b"x")

    prefetch = Prefetcher(slow_fetch)
    prefetch.start(lambda: True)
    asking.wait(5)
    started = time.monotonic()
    # A request in progress (perhaps held by the orchestrator) is not waited for: leaving hands back its item.
    assert prefetch.take(stopping=lambda: True) is None
    assert time.monotonic() - started < 3
    threading.Timer(0.2, answer.set).start()
    prefetch.close()  # waits for the request in progress
    assert answer.is_set()

    prefetch = Prefetcher(lambda forward: Fetched(work("forward"), b"x"))
    prefetch.start(lambda: True)
    time.sleep(0.2)
    fetched = prefetch.take(stopping=lambda: True)  # an answer that came: the caller releases it
    assert fetched is not None and fetched.work.kind == "forward"
    prefetch.close()


def test_only_a_quiet_wait_with_a_holding_list_reaches_the_main_thread() -> None:
    answers = [
        Fetched(
            work("wait", 0.01, holding=[3]), quiet=False
        ),  # a forward of ours may be missing from the list
        Fetched(work("wait", 0.01), quiet=True),  # no list to act on
        Fetched(work("wait", 0.01, holding=[3]), quiet=True),
    ]
    prefetch = Prefetcher(lambda forward: answers.pop(0))
    prefetch.start(lambda: False)
    fetched = prefetch.take(stopping=lambda: False)
    assert fetched is not None and fetched.quiet and fetched.work.holding == [3]
    assert answers == []
    with pytest.raises(RuntimeError, match="nothing was started"):
        prefetch.take(stopping=lambda: False)
    prefetch.close()


def test_an_error_while_asking_is_raised_by_take() -> None:
    def fetch(forward: bool) -> Fetched:
        raise ConnectionError("orchestrator unreachable")

    prefetch = Prefetcher(fetch)
    prefetch.start(lambda: True)
    with pytest.raises(ConnectionError):
        prefetch.take(stopping=lambda: False)
    prefetch.start(lambda: True)  # taken (raised): a new search may start
    with pytest.raises(ConnectionError):
        prefetch.take(stopping=lambda: False)
    prefetch.close()
