"""The doorbell that wakes held requests for work: whom each ring wakes, and that a ticket resolves once."""

from __future__ import annotations

from iota.orchestrator.doorbell import ALL, DROPPED, MINER, NOW, STAGE, Doorbell


def test_a_stage_ring_wakes_only_the_oldest_miner_that_would_take_forward_work() -> None:
    bell = Doorbell()
    blocked = bell.ticket("blocked", stage=1, on_stage=False)  # e.g. holding its limit of graphs
    first = bell.ticket("first", stage=1, on_stage=True)
    second = bell.ticket("second", stage=1, on_stage=True)
    other = bell.ticket("other", stage=2, on_stage=True)
    bell.ring_stage(1)
    assert first.rung.result(0) == STAGE
    assert not any(t.rung.done() for t in (blocked, second, other))
    bell.ring_stage(1)
    assert second.rung.result(0) == STAGE
    bell.ring_stage(1)  # nobody left on stage 1 who takes forward work: the ring is lost, nothing else wakes
    assert not blocked.rung.done() and not other.rung.done()
    assert bell.held == 2


def test_miner_rings_reach_that_miner_whatever_it_waits_for() -> None:
    bell = Doorbell()
    mine = bell.ticket("a", stage=0, on_stage=False)
    theirs = bell.ticket("b", stage=0, on_stage=True)
    bell.ring_miner("a")
    assert mine.rung.result(0) == MINER and not theirs.rung.done()
    again = bell.ticket("a", stage=0, on_stage=True)
    bell.answer_now("a")
    assert again.rung.result(0) == NOW
    bell.ring_miner("nobody")  # no ticket: nothing happens
    assert bell.held == 1


def test_a_newer_request_answers_the_older_one_of_the_same_miner_now() -> None:
    bell = Doorbell()
    older = bell.ticket("a", stage=1, on_stage=True)
    newer = bell.ticket("a", stage=1, on_stage=True)
    assert older.rung.result(0) == NOW
    assert bell.held == 1
    bell.ring_stage(1)  # the older ticket left the stage's queue with it
    assert newer.rung.result(0) == STAGE


def test_ring_all_and_drop() -> None:
    bell = Doorbell()
    tickets = [bell.ticket(str(i), stage=i % 2, on_stage=bool(i % 3)) for i in range(6)]
    bell.drop(tickets[0])
    assert tickets[0].rung.result(0) == DROPPED
    bell.ring_all()
    assert [t.rung.result(0) for t in tickets[1:]] == [ALL] * 5
    assert bell.held == 0
    bell.ring_stage(0)  # every queue is empty again
    bell.ring_stage(1)
    bell.drop(tickets[1])  # a ticket resolves once: dropping after a ring changes nothing
    assert tickets[1].rung.result(0) == ALL


def test_a_deep_miner_holds_several_tickets_and_its_reports_answer_only_the_stale_ones() -> None:
    """per_miner 3 (a miner at IOTA_PIPELINE_DEPTH 3): three held requests coexist, a fourth answers the oldest; a
    report answers only those that would not be given forward work (their ask may be stale), a stage ring one that
    would; a miner gone answers them all."""
    bell = Doorbell(per_miner=3)
    forward_a = bell.ticket("a", stage=1, on_stage=True)
    declining = bell.ticket("a", stage=1, on_stage=False)
    forward_b = bell.ticket("a", stage=1, on_stage=True)
    assert bell.held == 3 and not any(t.rung.done() for t in (forward_a, declining, forward_b))
    bell.answer_now("a", stale_only=True)
    assert declining.rung.result(0) == NOW and not forward_a.rung.done() and not forward_b.rung.done()
    bell.ring_stage(1)
    assert forward_a.rung.result(0) == STAGE and not forward_b.rung.done()
    newer = [bell.ticket("a", stage=1, on_stage=True) for _ in range(3)]
    assert forward_b.rung.result(0) == NOW and bell.held == 3  # the oldest made room
    bell.ring_miner("a")
    assert [t.rung.result(0) for t in newer] == [MINER] * 3 and bell.held == 0
    last = [bell.ticket("a", stage=0, on_stage=on) for on in (True, False)]
    bell.answer_now("a")
    assert [t.rung.result(0) for t in last] == [NOW, NOW]
