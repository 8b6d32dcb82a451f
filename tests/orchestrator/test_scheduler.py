"""The scheduler's policy over a real StateStore, on SQLite and PostgreSQL, with the clock driven by the test."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import pytest

from iota.orchestrator.scheduler import (
    BACKWARD,
    FORWARD,
    TRAIN,
    UPLOAD,
    Policy,
    Scheduler,
    SchedulingError,
)
from iota.orchestrator.state import Hop, StateStore
from iota.state import Database

POLICY = Policy(
    n_stages=3,
    samples_per_epoch=100,
    epochs=1,
    max_in_flight=4,
    lease_s=10.0,
    miner_timeout_s=30.0,
)
LAST = POLICY.n_stages - 1
TOKENS = 64  # tokens per sample, as the service passes them


@dataclass
class Net:
    """A scheduler with a hand-driven clock, and the calls a miner makes, done as the service does them."""

    sched: Scheduler
    now: float = 1000.0

    @property
    def state(self) -> StateStore:
        return self.sched.state

    def join(self, hotkey: str, memory: int = 1 << 40, session: str = "s0") -> int:
        return self.sched.register(hotkey, None, "cpu", memory, session, self.now)

    def work(self, hotkey: str) -> Hop | None:
        return self.sched.next_work(hotkey, self.now).hop

    def wait_reason(self, hotkey: str) -> str:
        assignment = self.sched.next_work(hotkey, self.now)
        assert assignment.hop is None, f"{hotkey} was given work: {assignment.hop}"
        return assignment.wait_reason

    def report(self, hotkey: str, hop: Hop, epoch: int | None = None) -> None:
        """Report a leased hop (the tail with a loss), in one transaction as Orchestrator.report does."""
        with self.sched.transaction():
            leased = self.sched.leased_hop(hotkey, hop.id, hop.epoch if epoch is None else epoch, self.now)
            has_output = leased.output_key is not None
            loss = 2.0 + leased.sample_id if leased.stage == LAST and leased.direction == FORWARD else None
            sha = f"sha-{leased.id}-{leased.lease_no}" if has_output else None
            self.sched.complete(leased, sha, 8 if has_output else None, loss, TOKENS, self.now)

    def release(self, hotkey: str, hop: Hop) -> None:
        """Hand a leased hop back, as Orchestrator.release does."""
        with self.sched.transaction():
            self.sched.release(self.sched.leased_hop(hotkey, hop.id, hop.epoch, self.now), self.now)

    def step(self, hotkey: str) -> Hop:
        """Take the next hop and report it."""
        hop = self.work(hotkey)
        assert hop is not None, f"{hotkey} got no work: {self.sched.next_work(hotkey, self.now).wait_reason}"
        self.report(hotkey, hop)
        return hop

    def counter(self, name: str) -> int:
        return int(self.state.get(name, 0))

    def samples_lost(self) -> int:
        """The formula of Orchestrator.samples_lost."""
        allocated = self.counter("cursor")
        finished = self.counter("samples_completed") + self.counter("samples_dropped")
        return allocated - finished - len(self.state.active_samples())

    def open_hops(self, sample_id: int) -> list[Hop]:
        attempt = self.state.sample(sample_id)
        assert attempt is not None
        return [
            h for h in self.state.hops_of_sample(sample_id, attempt[1]) if h.status in ("queued", "leased")
        ]


def make_net(db: Database, **policy: Any) -> Net:
    state = StateStore(db)
    return Net(
        Scheduler(state, replace(POLICY, **policy), output_key=lambda hop, lease: f"k/{hop.id}/{lease}")
    )


def staffed(net: Net, per_stage: int = 1) -> list[list[str]]:
    """Register miners until every stage has `per_stage`; returns the hotkeys by stage."""
    by_stage: list[list[str]] = [[] for _ in range(POLICY.n_stages)]
    for i in range(per_stage * POLICY.n_stages):
        hotkey = f"m{i}"
        by_stage[net.join(hotkey)].append(hotkey)
    assert [len(s) for s in by_stage] == [per_stage] * POLICY.n_stages
    return by_stage


def through_tail(net: Net, head: str, mid: str, tail: str) -> int:
    """One new sample forward through all three stages; returns its id (its backward is then queued at stage 1)."""
    sample = net.step(head).sample_id
    assert net.step(mid).sample_id == sample
    assert net.step(tail).sample_id == sample
    return sample


# -- registration -------------------------------------------------------------------------------------------


def test_stages_fill_empty_first_then_least_work_per_miner(db: Database) -> None:
    net = make_net(db)
    assert [net.join(h) for h in ("a", "b", "c")] == [0, 1, 2]  # empty stages first, lowest first
    assert net.join("a") == 0  # a known miner keeps its stage
    for _ in range(3):
        net.state.credit("a")
        net.state.credit("c")
    assert net.join("d") == 1  # stage 1 has done the least work
    net.state.credit("d")
    net.state.credit("d")
    assert net.join("e") == 1  # (0 + 2) / 2 = 1 hop per miner is still less than 3
    assert net.join("f") == 1  # (0 + 2 + 0) / 3 beats 3 per miner on stages 0 and 2


def test_the_tail_is_not_mistaken_for_the_slowest_stage(db: Database) -> None:
    """The tail does one hop per sample (its forward), the others two: a steady pipeline looks even."""
    net = make_net(db)
    assert [net.join(h) for h in ("a", "b", "c")] == [0, 1, 2]
    for _ in range(10):  # ten samples through: forward and backward at stages 0 and 1, the tail's forward
        for hotkey, hops in (("a", 2), ("b", 2), ("c", 1)):
            for _ in range(hops):
                net.state.credit(hotkey)
    assert (
        net.join("d") == 0
    )  # a tie, broken to the lowest stage; counting hops would have sent it to the tail


def test_stage_choice_respects_memory(db: Database) -> None:
    net = make_net(db, stage_memory_bytes=(100 << 30, 40 << 30, 200 << 30))
    assert net.join("small", memory=50 << 30) == 1  # fits only stage 1
    assert net.join("big", memory=300 << 30) == 0  # fits all: the empty stage 0 first
    with pytest.raises(SchedulingError) as refused:
        net.join("tiny", memory=8 << 30)
    assert refused.value.status == 400
    assert "not enough memory" in refused.value.detail and "40.0 GiB" in refused.value.detail
    assert net.state.miner("tiny") is None


def test_banned_miner_is_refused(db: Database) -> None:
    net = make_net(db)
    staffed(net)
    net.state.set_banned("m0", "sent garbage")
    for call in (lambda: net.join("m0"), lambda: net.work("m0")):
        with pytest.raises(SchedulingError) as refused:
            call()
        assert refused.value.status == 403 and "sent garbage" in refused.value.detail


def test_unknown_miner_is_told_to_register(db: Database) -> None:
    net = make_net(db)
    with pytest.raises(SchedulingError) as refused:
        net.work("nobody")
    assert refused.value.status == 404 and "/miners/register" in refused.value.detail


# -- routing ------------------------------------------------------------------------------------------------


def test_heads_get_disjoint_increasing_sample_ids(db: Database) -> None:
    net = make_net(db)
    staffed(net)
    assert net.join("h2") == 0  # every stage staffed, no work yet: the lowest stage
    given: dict[str, list[int]] = {"m0": [], "h2": []}
    order = []
    for i in range(8):
        head = ("m0", "h2")[i % 2]
        hop = net.work(head)
        assert hop is not None and hop.stage == 0 and hop.direction == FORWARD and hop.attempt == 0
        assert hop.input_key is None and hop.output_key == f"k/{hop.id}/1"
        given[head].append(hop.sample_id)
        order.append(hop.sample_id)
    assert order == list(range(8))
    assert not set(given["m0"]) & set(given["h2"])
    assert net.counter("cursor") == 8 and net.counter("allocated/0") == 8


def test_sample_flows_forward_then_backward_to_the_miners_that_did_its_forwards(db: Database) -> None:
    net = make_net(db)
    (h1, h2), (b1, b2), (t1, t2) = staffed(net, per_stage=2)  # m0, m3 | m1, m4 | m2, m5

    f0 = net.step(h1)
    queued = net.state.next_queued(1, FORWARD, None)
    assert queued is not None and queued.sample_id == f0.sample_id and queued.attempt == 0
    assert queued.input_key == f0.output_key and queued.input_sha == f"sha-{f0.id}-1"
    assert net.work(h2) is not None  # a second sample for the other head; it never gets sample 0's hops

    f1 = net.work(b1)
    assert f1 is not None and f1.id == queued.id and f1.stage == 1 and f1.direction == FORWARD
    net.report(b1, f1)
    f2 = net.work(t2)
    assert f2 is not None and f2.stage == LAST and f2.sample_id == f0.sample_id and f2.output_key
    net.report(t2, f2)
    assert net.state.loss_curve() == []  # a loss counts once its sample completes

    # The tail's report created the backward at stage S-2, bound to the miner that did the forward there.
    back1 = net.state.next_queued(1, BACKWARD, b1)
    assert back1 is not None and back1.sample_id == f0.sample_id and back1.miner == b1
    assert back1.input_key == f2.output_key
    assert net.state.next_queued(1, BACKWARD, b2) is None
    assert "no work queued" in net.wait_reason(b2)  # b2 never gets b1's backward
    got = net.work(b1)
    assert got is not None and got.id == back1.id
    net.report(b1, got)

    back0 = net.state.next_queued(0, BACKWARD, h1)
    assert back0 is not None and back0.miner == h1
    h2_next = net.work(h2)  # the other head gets a new sample, not h1's backward
    assert h2_next is not None and h2_next.direction == FORWARD and h2_next.sample_id == 2
    got = net.work(h1)
    assert got is not None and got.id == back0.id and got.output_key is None  # the head uploads nothing
    assert net.counter("samples_completed") == 0
    net.report(h1, got)

    assert net.state.sample(f0.sample_id) == (0, 0, "done")
    assert net.counter("samples_completed") == 1
    assert net.state.loss_curve() == [(1, 2.0 + f0.sample_id)]
    assert {m.hotkey: m.hops_done for m in net.state.miners()} == {h1: 2, h2: 0, b1: 2, b2: 0, t1: 0, t2: 1}
    assert net.samples_lost() == 0


def test_backward_is_preferred_over_forward(db: Database) -> None:
    net = make_net(db)
    [head], [mid], [tail] = staffed(net)
    first = through_tail(net, head, mid, tail)
    net.step(head)  # a second sample waits at stage 1
    assert net.state.next_queued(1, FORWARD, None) is not None
    hop = net.work(mid)
    assert hop is not None and hop.direction == BACKWARD and hop.sample_id == first


def test_a_sample_completes_once(db: Database) -> None:
    net = make_net(db)
    [head], [mid], [tail] = staffed(net)
    sample = through_tail(net, head, mid, tail)
    net.step(mid)
    last = net.step(head)
    assert last.direction == BACKWARD and last.stage == 0
    assert net.counter("samples_completed") == 1
    with pytest.raises(SchedulingError) as refused:
        net.report(head, last)
    assert refused.value.status == 409 and "not leased to you" in refused.value.detail
    assert net.counter("samples_completed") == 1
    assert net.state.sample(sample) == (0, 0, "done")
    assert net.state.count_samples(0, "done") == 1


# -- failures -----------------------------------------------------------------------------------------------


def test_expired_forward_lease_goes_to_another_miner_of_the_stage_first(db: Database) -> None:
    net = make_net(db)
    (head, _), (b1, b2), (tail, _) = staffed(net, per_stage=2)
    net.step(head)
    hop = net.work(b1)
    assert hop is not None
    net.now += POLICY.lease_s + 1
    net.sched.sweep(net.now)
    requeued = net.state.hop(hop.id)
    assert requeued is not None and requeued.status == "queued" and requeued.miner is None
    assert "offered to other miners first" in net.wait_reason(b1)  # the miner it lapsed with asks first
    again = net.work(b2)
    assert again is not None and again.id == hop.id and again.lease_no == 2
    assert (
        again.output_key == f"k/{hop.id}/2" != hop.output_key
    )  # a late upload under the old lease lands apart
    with pytest.raises(SchedulingError) as refused:
        net.report(b1, hop)  # the first miner's late report
    assert refused.value.status == 409 and not refused.value.fault  # its lapse was the strike, not this
    net.report(b2, again)
    assert net.state.next_queued(2, FORWARD, None) is not None
    assert net.samples_lost() == 0 and net.counter("samples_requeued") == 0


def test_a_lone_miner_of_the_stage_gets_its_lapsed_item_back(db: Database) -> None:
    """Offering a lapsed item to others first never stalls a stage that has no other miner."""
    net = make_net(db)
    [head], [mid], _ = staffed(net)
    net.step(head)
    hop = net.work(mid)
    assert hop is not None
    net.now += POLICY.lease_s + 1
    net.sched.sweep(net.now)
    again = net.work(mid)
    assert again is not None and again.id == hop.id


def test_expired_backward_lease_restarts_its_sample_though_its_miner_is_alive(db: Database) -> None:
    """No one else holds the graph, and a holder that keeps itself alive (heartbeats) must not keep the sample
    waiting lease after lease: the sample starts again at the head."""
    net = make_net(db)
    (head, _), (b1, b2), (tail, _) = staffed(net, per_stage=2)
    sample = through_tail(net, head, b1, tail)
    back = net.work(b1)
    assert back is not None and back.direction == BACKWARD
    net.now += POLICY.lease_s + 1
    net.sched.live_miner(b1, net.now)  # a heartbeat: alive, and its lease lapsed all the same
    net.sched.sweep(net.now)
    lapsed = net.state.hop(back.id)
    assert lapsed is not None and lapsed.status == "dropped"
    assert net.state.sample(sample) == (0, 1, "active")
    assert "no work queued" in net.wait_reason(b1)
    restarted = net.work(head)
    assert restarted is not None and restarted.sample_id == sample and restarted.attempt == 1
    assert net.counter("samples_requeued") == 1 and net.counter("leases_expired") == 1


def test_silent_miner_times_out_and_its_samples_restart_at_the_head(db: Database) -> None:
    net = make_net(db)
    (head, head2), (b1, b2), (tail, tail2) = staffed(net, per_stage=2)
    waiting = [net.step(head).sample_id for _ in range(2)]
    for _ in waiting:
        net.step(b1)  # b1 holds both graphs
    net.step(tail)  # the first sample's backward now waits at stage 1 for b1
    assert sorted(net.state.samples_waiting_on(b1, LAST)) == waiting
    credited = {m.hotkey: m.hops_done for m in net.state.miners()}

    net.now += POLICY.miner_timeout_s + 1
    for hotkey in (head, head2, b2, tail, tail2):
        net.state.touch_miner(hotkey, net.now)
    net.sched.sweep(net.now)

    gone = net.state.miner(b1)
    assert gone is not None and not gone.alive
    assert net.counter("samples_requeued") == 2
    for sample in waiting:
        assert net.state.sample(sample) == (0, 1, "active")
        [restart] = net.open_hops(sample)
        assert (restart.stage, restart.direction, restart.attempt, restart.miner) == (0, FORWARD, 1, None)
        old = net.state.hops_of_sample(sample, 0)
        assert all(h.status in ("done", "dropped") for h in old)
    assert {m.hotkey: m.hops_done for m in net.state.miners()} == credited  # done hops stay credited
    assert net.samples_lost() == 0

    with pytest.raises(SchedulingError) as refused:
        net.work(b1)
    assert refused.value.status == 409 and "register again" in refused.value.detail
    # Either head redoes the samples, oldest first, under their new attempt.
    redo = net.work(head2)
    assert redo is not None and (redo.sample_id, redo.attempt) == (waiting[0], 1)


def test_new_session_voids_the_old_sessions_graphs(db: Database) -> None:
    net = make_net(db)
    [head], [mid], [tail] = staffed(net)
    sample = through_tail(net, head, mid, tail)
    back = net.work(mid)
    assert back is not None and back.direction == BACKWARD
    assert net.join(mid, session="restarted") == 1  # same stage, new process: its cache is gone
    assert net.counter("samples_requeued") == 1
    assert net.state.sample(sample) == (0, 1, "active")
    with pytest.raises(SchedulingError) as refused:
        net.report(mid, back)
    assert refused.value.status == 409 and "dropped" in refused.value.detail
    # The sample goes around again and completes once, under attempt 1.
    redo = net.step(head)
    assert (redo.sample_id, redo.attempt) == (sample, 1)
    net.step(mid)
    net.step(tail)
    net.step(mid)
    net.step(head)
    assert net.state.sample(sample) == (0, 1, "done")
    assert net.counter("samples_completed") == 1 and net.samples_lost() == 0


def test_tail_going_away_does_not_restart_samples_past_it(db: Database) -> None:
    """The tail does its forward and backward in one hop: it holds no graph that a sample waits on."""
    net = make_net(db)
    [head], [mid], [tail] = staffed(net)
    sample = through_tail(net, head, mid, tail)
    assert net.state.samples_waiting_on(tail, LAST) == []
    net.sched.miner_gone(tail, net.now, "left")
    assert net.counter("samples_requeued") == 0
    net.step(mid)
    net.step(head)
    assert net.state.sample(sample) == (0, 0, "done")


def test_release_requeues_at_once(db: Database) -> None:
    net = make_net(db)
    (h1, h2), _, _ = staffed(net, per_stage=2)
    hop = net.work(h1)
    assert hop is not None
    net.release(h1, hop)
    again = net.work(h2)
    assert again is not None and again.id == hop.id and again.sample_id == hop.sample_id
    assert net.counter("cursor") == 1 and net.counter("samples_requeued") == 0


def test_a_hop_leased_max_leases_times_restarts_its_sample(db: Database) -> None:
    """A hop nobody finishes (its input poisons every miner that takes it) is not requeued forever."""
    net = make_net(db, max_leases=3)
    head, mid, _ = (s[0] for s in staffed(net))
    sample = net.step(head).sample_id
    for lease in range(1, 4):
        hop = net.work(mid)
        assert hop is not None and hop.sample_id == sample and hop.lease_no == lease and hop.attempt == 0
        net.release(mid, hop)
    assert net.state.sample(sample) == (0, 1, "active")  # the third release restarted it at the head
    assert net.wait_reason(mid) == "no work queued for this stage"
    restarted = net.work(head)
    assert restarted is not None and restarted.sample_id == sample and restarted.attempt == 1
    assert net.counter("samples_requeued") == 1 and net.samples_lost() == 0


def test_a_sample_restarted_max_restarts_times_is_dropped_and_counted(db: Database) -> None:
    net = make_net(db, max_restarts=2, samples_per_epoch=2)
    head, mid, tail = (s[0] for s in staffed(net))
    done = through_tail(net, head, mid, tail)
    net.step(mid)
    net.step(head)
    assert net.state.sample(done) == (0, 0, "done")
    poisoned = net.step(head).sample_id
    for attempt in (1, 2):
        net.sched.restart_sample(poisoned, net.now, "bad output")
        assert net.state.sample(poisoned) == (0, attempt, "active")
        assert net.work(head) is not None  # the restarted forward, leased again
    assert net.sched.phase == TRAIN
    net.sched.restart_sample(poisoned, net.now, "bad output")
    assert net.state.sample(poisoned) == (0, 2, "dropped")
    assert net.open_hops(poisoned) == []
    assert net.counter("samples_dropped") == 1 and net.counter("samples_requeued") == 2
    assert net.samples_lost() == 0  # dropped is counted, not lost
    dropped = [e for e in net.state.events(50) if e["kind"] == "drop_sample"]
    assert len(dropped) == 1 and dropped[0]["sample"] == poisoned and dropped[0]["attempts"] == 3
    assert net.sched.phase == UPLOAD  # the epoch's last open sample was the dropped one: training ends
    net.sched.restart_sample(poisoned, net.now, "bad output")  # a late claim changes nothing
    assert net.counter("samples_dropped") == 1


def test_report_for_a_closed_epoch_is_refused_and_requeued(db: Database) -> None:
    net = make_net(db)
    (h1, h2), _, _ = staffed(net, per_stage=2)
    hop = net.work(h1)
    assert hop is not None
    with pytest.raises(SchedulingError) as refused:
        net.report(h1, hop, epoch=hop.epoch - 1)
    assert refused.value.status == 409 and "closed" in refused.value.detail
    requeued = net.state.hop(hop.id)
    assert requeued is not None and requeued.status == "queued"
    again = net.work(h2)
    assert again is not None and again.id == hop.id


def test_report_after_the_lease_expired_is_refused_before_any_sweep(db: Database) -> None:
    net = make_net(db)
    (h1, h2), _, _ = staffed(net, per_stage=2)
    hop = net.work(h1)
    assert hop is not None
    net.now += POLICY.lease_s + 1
    with pytest.raises(SchedulingError) as refused:
        net.report(h1, hop)
    assert refused.value.status == 409 and "expired" in refused.value.detail
    again = net.work(h2)
    assert again is not None and again.id == hop.id
    assert net.state.next_queued(1, FORWARD, None) is None


# -- leases taken and never finished ------------------------------------------------------------------------


def test_a_miner_holds_at_most_max_leases_held_leases(db: Database) -> None:
    net = make_net(db, max_in_flight=100)
    (h1, h2), _, _ = staffed(net, per_stage=2)
    held = [net.work(h1) for _ in range(POLICY.max_leases_held)]
    assert all(hop is not None for hop in held)
    assert "holding 4 leased items (limit 4)" in net.wait_reason(h1)
    assert net.work(h2) is not None  # the cap is per miner: the stage goes on
    first = held[0]
    assert first is not None
    net.release(h1, first)
    assert net.work(h1) is not None  # room again once one is handed back


def test_lease_terms_halve_per_lapse_and_come_back_with_completed_hops(db: Database) -> None:
    net = make_net(db, max_in_flight=100)
    [head], _, _ = staffed(net)
    terms = []
    for _ in range(POLICY.lease_halvings + 2):  # lapse after lapse, past the shortest term
        hop = net.work(head)
        assert hop is not None and hop.lease_expires is not None
        terms.append(hop.lease_expires - net.now)
        net.now = hop.lease_expires + 1
        net.sched.sweep(net.now)
    lease = POLICY.lease_s
    assert terms == [lease, lease / 2, lease / 4, lease / 8, lease / 8]
    assert len(list(net.sched.lapses.unpaid())) == 5 and list(net.sched.lapses.unpaid()) == []
    # Each completed hop repays one lapse: those past the floor first (the term stays there), then the rest.
    recovered = []
    for _ in range(6):
        hop = net.work(head)
        assert hop is not None and hop.lease_expires is not None
        recovered.append(hop.lease_expires - net.now)
        net.report(head, hop)
    assert recovered == [lease / 8, lease / 8, lease / 8, lease / 4, lease / 2, lease]


def test_a_late_report_of_a_lapsed_lease_is_one_lapse_whichever_path_sees_it(db: Database) -> None:
    net = make_net(db)
    (h1, h2), _, _ = staffed(net, per_stage=2)
    first, second = net.work(h1), net.work(h1)
    assert first is not None and second is not None
    net.now += POLICY.lease_s + 1
    with pytest.raises(SchedulingError):
        net.report(h1, first)  # before any sweep: refused, requeued, one lapse
    net.sched.sweep(net.now)  # the second lapses here
    with pytest.raises(SchedulingError) as refused:
        net.report(h1, second)  # after the sweep: no second charge for it
    assert not refused.value.fault
    assert [who for who, _ in net.sched.lapses.unpaid()] == [h1, h1]
    assert net.counter("leases_expired") == 2
    assert net.sched.lapses.term(h2) == POLICY.lease_s and net.sched.lapses.term(h1) == POLICY.lease_s / 4


# -- flow control and phases --------------------------------------------------------------------------------


def test_max_in_flight_holds_back_a_head(db: Database) -> None:
    net = make_net(db, max_in_flight=2)
    [head], [mid], [tail] = staffed(net)
    net.step(head)
    net.step(head)
    reason = net.wait_reason(head)
    assert "holding 2 forward graphs" in reason and "limit 2" in reason
    assert net.counter("cursor") == 2
    through = [net.step(mid), net.step(mid), net.step(tail)]
    assert [h.direction for h in through] == [FORWARD, FORWARD, FORWARD]
    net.step(mid)  # the backward of the first sample
    assert net.step(head).direction == BACKWARD
    assert net.step(head).sample_id == 2  # one graph freed: inflow resumes


def test_max_in_flight_counts_leased_forwards_so_a_miner_may_ask_before_it_reports(db: Database) -> None:
    net = make_net(db, max_in_flight=2)
    [head], _, _ = staffed(net)
    net.step(head)  # reported: its graph awaits the backward
    leased = net.work(head)  # asked for while the first was still computing, say: leased, not reported
    assert leased is not None and leased.direction == FORWARD
    reason = net.wait_reason(head)
    assert "holding 2 forward graphs" in reason and "limit 2" in reason
    net.release(head, leased)
    assert net.work(head) is not None  # handed back: room for one again


def test_a_stage_without_a_live_miner_pauses_inflow(db: Database) -> None:
    net = make_net(db)
    assert net.join("head") == 0 and net.join("mid") == 1
    assert "stage(s) 2" in net.wait_reason("head")
    assert net.counter("cursor") == 0
    assert net.join("tail") == 2
    net.step("head")
    net.sched.miner_gone("tail", net.now, "left")
    assert "stage(s) 2" in net.wait_reason("mid")  # the stage-1 forward waits too
    net.state.put("paused", True)
    net.join("tail", session="back")
    assert "paused" in net.wait_reason("head")


def test_epoch_budget_drains_then_upload(db: Database) -> None:
    net = make_net(db, samples_per_epoch=2)
    [head], [mid], [tail] = staffed(net)
    net.step(head)
    net.step(head)
    assert "no work queued" in net.wait_reason(head)  # the budget is allocated
    assert net.counter("cursor") == 2
    for hotkey in (mid, mid, tail, tail, mid, head):
        net.step(hotkey)
    assert net.sched.phase == TRAIN  # one sample still in flight
    net.step(mid)
    net.step(head)
    assert net.sched.phase == UPLOAD
    assert net.counter("samples_completed") == 2
    assert net.wait_reason(mid) == "phase is upload"


# -- the invariant ------------------------------------------------------------------------------------------


def test_random_faults_never_lose_or_double_count_a_sample(db: Database) -> None:
    """Miners of 3 stages work while some die, leave, release, stall past their leases and re-register.

    Afterwards every allocated sample is done exactly once or still active, never lost; each done sample has
    one done head backward for its final attempt; and with the faults stopped, the epoch drains to UPLOAD.
    """
    rng = random.Random(1234)
    budget = 60
    net = make_net(db, samples_per_epoch=budget, max_in_flight=3)
    by_stage = staffed(net, per_stage=2)
    hotkeys = [h for stage in by_stage for h in stage]
    sessions = dict.fromkeys(hotkeys, 0)
    leased: dict[str, Hop] = {}
    silent_until = dict.fromkeys(hotkeys, 0.0)  # a stalled miner neither asks nor reports until then

    def rejoin(hotkey: str) -> None:
        sessions[hotkey] += 1
        net.join(hotkey, session=f"s{sessions[hotkey]}")
        leased.pop(hotkey, None)  # the old process is gone, and its lease with it

    def act(hotkey: str) -> None:
        try:
            if hotkey in leased:
                hop = leased.pop(hotkey)
                if rng.random() < 0.1:
                    net.release(hotkey, hop)
                else:
                    net.report(hotkey, hop)
                return
            given = net.work(hotkey)
        except SchedulingError as refused:
            assert refused.status == 409, refused.detail
            if "register again" in refused.detail:
                rejoin(hotkey)
            return
        if given is not None:
            if given.direction == BACKWARD:
                # A backward goes only to its bound miner, the one that did this attempt's forward here.
                assert given.miner == hotkey
                assert net.state.forward_miner(given.sample_id, given.attempt, given.stage) == hotkey
            leased[hotkey] = given

    for _ in range(300):
        net.now += rng.uniform(0.0, 1.5)
        net.sched.sweep(net.now)
        roll = rng.random()
        hotkey = rng.choice(hotkeys)
        if roll < 0.04:
            silent_until[hotkey] = net.now + rng.choice([POLICY.lease_s, POLICY.miner_timeout_s]) + 1
        elif roll < 0.07:
            rejoin(hotkey)  # restarted process
        elif roll < 0.09:
            miner = net.state.miner(hotkey)
            if miner is not None and miner.alive:
                net.sched.miner_gone(hotkey, net.now, "left")
        elif net.now >= silent_until[hotkey]:
            act(hotkey)
        for other in hotkeys:
            if net.now >= silent_until[other] and rng.random() < 0.5:
                act(other)

    requeued = net.counter("samples_requeued")
    assert requeued > 0, "the faults should have restarted some samples"
    check_samples(net)

    # Faults stop: everyone comes back and the epoch drains.
    for hotkey in hotkeys:
        rejoin(hotkey)
    for _ in range(2000):
        if net.sched.phase != TRAIN:
            break
        net.now += 0.1
        for hotkey in hotkeys:
            act(hotkey)
    assert net.sched.phase == UPLOAD
    assert net.counter("samples_completed") == budget == net.counter("cursor")
    check_samples(net)


def check_samples(net: Net) -> None:
    assert net.samples_lost() == 0
    rows = net.state.db.execute("SELECT id, attempt, status FROM samples ORDER BY id")
    assert [int(r[0]) for r in rows] == list(range(net.counter("cursor")))
    done = [(int(r[0]), int(r[1])) for r in rows if r[2] == "done"]
    assert {r[2] for r in rows} <= {"done", "active"}
    assert len(done) == net.counter("samples_completed")
    for sample, attempt in done:
        head_backwards = net.state.db.execute(
            "SELECT attempt FROM hops WHERE sample_id = ? AND stage = 0 AND direction = ? AND status = 'done'",
            (sample, BACKWARD),
        )
        assert [int(r[0]) for r in head_backwards] == [attempt], f"sample {sample}"
        assert net.open_hops(sample) == []
    stray = net.state.db.scalar(
        "SELECT COUNT(*) FROM hops h JOIN samples s ON s.id = h.sample_id WHERE h.status IN ('queued', 'leased') "
        "AND (h.attempt <> s.attempt OR s.status <> 'active')"
    )
    assert stray == 0, "an open hop of a finished sample or of an abandoned attempt"
    for sample in net.state.active_samples():
        # An active sample always has exactly one open hop of its current attempt: it can still move.
        assert len(net.open_hops(sample)) == 1, f"sample {sample}"
