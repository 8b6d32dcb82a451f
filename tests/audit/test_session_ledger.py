"""A miner's sessions through the real orchestrator: a restart's first report opens a session where its hops
begin, the epoch's commitments start afresh (the new session's step 1 is committed, the old session's snapshot is
dropped), audit tasks name each hop's session, and a failing verdict whose window began at a dropped snapshot
lapses instead of being confirmed on other evidence."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from bittensor.keyfiles import Keypair

from iota.protocol import AuditTask, AuditVerdict, PhaseReport, SnapshotDone, WeightSketch
from iota.storage.transfer import download, upload
from tests.security import NAMES, Net, report_for, serve_net

OLD = WeightSketch(norms=[1.0], projection=[0.0] * 8)
NEW = WeightSketch(norms=[2.0], projection=[0.0] * 8)


@pytest.fixture(scope="module")
def keypairs() -> dict[str, Keypair]:
    return {name: Keypair.create_from_mnemonic(Keypair.generate_mnemonic()) for name in NAMES}


def hop(net: Net, name: str) -> str:
    """`name` does its next item, forward or backward, honestly in form: returns its kind."""
    work = net.clients[name].work()
    assert work.kind in ("forward", "backward"), work.reason
    data = download(work.input_url, work.input_sha256, 1 << 24) if work.input_url else None
    out = None
    if work.output_url:  # the head's backward uploads nothing
        out = net.activation(0.1)
        upload(work.output_url, out)
    net.clients[name].report(report_for(work, data, out))
    return work.kind


def tail_hop(net: Net, sketch: WeightSketch) -> None:
    """A new sample through head and body (each doing the backwards it has first) to the tail, whose report
    reaches inner step 1."""
    for name in ("head", "mid"):
        while hop(net, name) != "forward":
            pass
    work = net.work("tail")
    assert work.input_url and work.output_url
    data = download(work.input_url, work.input_sha256, 1 << 24)
    out = net.activation(0.1)
    upload(work.output_url, out)
    net.clients["tail"].report(report_for(work, data, out, loss=2.0, inner_step=1, sketch=sketch))


def answer_challenge(net: Net) -> None:
    order = net.work("tail", kind="snapshot")
    assert order.output_url and order.output_size and order.challenged_step == 1
    blob = bytes(order.output_size)
    upload(order.output_url, blob)
    done = PhaseReport(
        run_id=net.orch.run.run_id,
        epoch=0,
        inner_step=1,
        output_sha256=hashlib.sha256(blob).hexdigest(),
        result=SnapshotDone(step=1),
    )
    net.clients["tail"].phase_report(done)


def draw(net: Net, validator: str, miner: str) -> AuditTask:
    for _ in range(40):
        response = net.signed(validator, "/validators/audit")
        assert response.status_code == 200, response.text
        task = AuditTask.model_validate_json(response.content)
        if task.miner == miner:
            return task
    raise AssertionError("the miner was never drawn")


def test_a_restart_opens_a_session_and_its_old_window_lapses(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    with serve_net(data_dir, keypairs, tmp_path, snapshot_rate=1.0) as net:
        net.orch.challenges.delay = 0  # served at once: the test drives few hops
        state, tail = net.orch.state, net.keys["tail"].ss58_address
        net.orch.auditor.max_open = 100  # draws are left unanswered
        net.join("head", "mid", "tail")
        tail_hop(net, OLD)
        answer_challenge(net)
        assert [first for _, first in state.steps.sessions(0, tail)] == [0]
        # A validator fails the tail from a window that starts at the snapshot: a claim, to be confirmed.
        task = draw(net, "validator", tail)
        while task.start_step != 1:  # drawn among the checkpoint and the snapshot
            task = draw(net, "validator", tail)
        verdict = AuditVerdict(
            audit_id=task.audit_id, miner=tail, epoch=0, stage=2, passed=False, hops_replayed=0, depth=0
        )
        assert net.signed("validator", "/validators/verdict", verdict.model_dump_json().encode()).is_success
        assert len(state.audits.claims()) == 1

        net.join("tail")  # killed and restarted: a new session, from the checkpoint at step 0
        tail_hop(net, NEW)
        sessions = state.steps.sessions(0, tail)
        assert [first for _, first in sessions] == [0, 1] and sessions[0][0] != sessions[1][0]
        # The new session's step 1 is committed (before, the old session's step 1 kept it out), the old snapshot
        # is gone: it is of weights nobody holds now.
        assert state.steps.last(0, tail) == 1 and state.steps.sketch(0, tail, 1) == NEW
        assert net.orch.challenges.snapshots(tail, 0) == {}
        (restarted,) = net.events("session_restarted")
        assert restarted["hotkey"] == tail and restarted["first_hop"] == 1
        assert (
            net.events("credit_forfeited") == []
        )  # its challenge was answered: the old session keeps its credit

        task = draw(net, "validator2", tail)  # the claim's window cannot be rebuilt: it lapsed, unconfirmed
        assert state.audits.claims() == {}
        assert task.start_step == 0 and [hop.session for hop in task.hops] == [0, 1]
        assert [hop.inner_step for hop in task.hops] == [1, 1]


def test_a_session_that_leaves_a_challenge_unanswered_earns_nothing(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    """A restart drops the challenges a session was served or would have been (its state is gone), and with them
    any audit of those steps: that session's hops then earn nothing. It is no failure and no strike (an honest
    crash does the same); a session whose challenges were answered keeps its credit (the test above)."""
    with serve_net(data_dir, keypairs, tmp_path, snapshot_rate=1.0) as net:
        tail = net.keys["tail"].ss58_address
        net.join("head", "mid", "tail")
        tail_hop(net, OLD)  # step 1 is challenged, and waits for D more steps: not served yet
        assert net.orch.challenges.pending(tail)
        net.join("tail")  # killed and restarted: a new session
        tail_hop(net, NEW)
        (forfeited,) = net.events("credit_forfeited")
        assert forfeited["hotkey"] == tail and forfeited["hops"] == 1
        work = {row["miner"]: row["hops"] for row in net.orch.auditor.score_log()["work"]["0"]}
        assert work[tail] == 1  # two hops done, the first session's forfeited
        assert net.orch.abuse.strikes(tail, net.clock()) == 0 and net.orch.state.verdicts() == []


def test_a_challenge_left_unanswered_when_its_epoch_closes_forfeits_the_session(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    """Challenges of an epoch's last steps are served once training ends; a miner that never answers them (and
    so is never audited there) earns nothing for that session's hops when the epoch closes, once."""
    with serve_net(data_dir, keypairs, tmp_path, snapshot_rate=1.0) as net:
        tail = net.keys["tail"].ss58_address
        net.join("head", "mid", "tail")
        tail_hop(net, OLD)
        miner = net.orch.state.miner(tail)
        assert miner is not None and net.orch.challenges.pending(tail)
        plan = net.orch.epochs.plan(2)
        for _ in range(2):  # the next epoch: the challenge of epoch 0 is dropped, and counted once
            assert net.orch.challenges.work(miner, 1, plan, net.orch.run.run_id, True, net.clock()) is None
        (forfeited,) = net.events("credit_forfeited")
        assert forfeited["epoch"] == 0 and forfeited["hops"] == 1
        assert net.orch.state.snapshots.forfeited(0, tail) == 1
