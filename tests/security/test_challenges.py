"""Snapshot challenges through the real orchestrator: a report that completes a step must commit a sketch, a
challenged step is kept from the miner until the steps an audit replays from it are committed and is then its next
order before any other work, its snapshot is checked for size, digest and step, and audits start their replay from
it. Most tests here serve a challenge at once (`delay` 0) to keep the hops they drive few."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bittensor.keyfiles import Keypair

from iota.audit.compare import FP32
from iota.protocol import AuditTask, PhaseReport, SnapshotDone, SnapshotTaken, WeightSketch
from iota.storage.transfer import download, upload
from iota.train.snapshot import snapshot_size
from tests.security import MINERS, Net, refused, report_for, serve_net

SKETCH = WeightSketch(norms=[1.0], projection=[0.0] * 8)


def tail_reaches_step_one(net: Net, sketch: WeightSketch | None) -> None:
    net.join(*MINERS)
    net.forward("head", fill=0.5)
    net.forward("mid", fill=0.5)
    work = net.work("tail")
    assert work.input_url and work.output_url
    data = download(work.input_url, work.input_sha256, 1 << 24)
    out = net.activation(0.1)
    upload(work.output_url, out)
    net.clients["tail"].report(report_for(work, data, out, loss=2.0, inner_step=1, sketch=sketch))


def hop(net: Net, name: str, kind: str, **over: object) -> None:
    """`name` asks for work, which must be of `kind`, does it and reports it (`over`: the report's fields)."""
    work = net.work(name, kind)
    data = download(work.input_url, work.input_sha256, 1 << 24) if work.input_url else None
    out = net.activation(0.1) if work.output_url else None
    if work.output_url and out is not None:
        upload(work.output_url, out)
    net.clients[name].report(report_for(work, data, out, **over))


def next_sample_to_tail(net: Net) -> None:
    """After `tail_reaches_step_one`: the next sample through head and mid (sample 0's backward on the way)."""
    hop(net, "head", "forward")  # sample 1
    hop(net, "mid", "backward")  # sample 0's, first
    hop(net, "mid", "forward")
    hop(net, "head", "backward")
    hop(net, "head", "forward")  # sample 2
    hop(net, "mid", "forward")


def answer(net: Net, step: int, blob: bytes, kind: str = "snapshot", at: int | None = None) -> str:
    """Answer (or, `kind` snapshot_taken, take) the challenge of `step`; `at`: the step the miner is at."""
    result = SnapshotTaken(step=step) if kind == "snapshot_taken" else SnapshotDone(step=step)
    report = PhaseReport(
        run_id=net.orch.run.run_id,
        epoch=0,
        inner_step=step if at is None else at,
        output_sha256=hashlib.sha256(blob).hexdigest(),
        result=result,
    )
    return net.clients["tail"].phase_report(report).detail


def test_a_step_without_a_sketch_is_refused(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    with serve_net(data_dir, keypairs, tmp_path, snapshot_rate=1.0) as net:
        refused(lambda: tail_reaches_step_one(net, None), 400, "sketch")


def test_a_challenged_step_is_answered_first_and_audited_from(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    with serve_net(data_dir, keypairs, tmp_path, snapshot_rate=1.0) as net:
        tail = net.keys["tail"].ss58_address
        net.orch.challenges.delay = 0
        tail_reaches_step_one(net, SKETCH)
        order = net.work("tail", kind="snapshot")
        stage = net.orch.epochs
        size = snapshot_size(stage.n_params[2], len(stage.tensors[2]), net.run.settings.optimizer)
        assert order.challenged_step == 1 and order.output_size == size and order.output_url
        assert net.work("tail", kind="snapshot").challenged_step == 1  # nothing else until it is answered
        refused(lambda: answer(net, 1, bytes(size)), 400, "snapshot missing")  # not uploaded yet
        blob = bytes(size)
        upload(order.output_url, blob)
        assert answer(net, 1, blob) == "snapshot recorded"
        assert net.clients["tail"].work().kind == "wait"
        (found,) = net.orch.challenges.snapshots(tail, 0).items()
        assert found[0] == 1 and found[1]["sketch"] == SKETCH.model_dump()
        starts = []
        net.orch.auditor.max_open = 40  # the draws below are left unanswered
        for _ in range(40):  # the window start is drawn among the checkpoint and the snapshot
            response = net.signed("validator", "/validators/audit")
            task = AuditTask.model_validate_json(response.content)
            if task.miner != tail:
                continue
            starts.append(task.start_step)
            assert [s.step for s in task.snapshots] == [1] and task.snapshots[0].sketch == SKETCH
            assert download(task.snapshots[0].url, task.snapshots[0].sha256, size) == blob
        assert set(starts) == {0, 1}


def test_a_snapshot_answers_for_the_challenged_step_only(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    """The miner keeps the state of each recent step, so it answers for the step named, never a later one: a
    later step's window could start where the miner already knew of the challenge."""
    with serve_net(data_dir, keypairs, tmp_path, snapshot_rate=1.0) as net:
        tail = net.keys["tail"].ss58_address
        net.orch.challenges.delay = 0
        tail_reaches_step_one(net, SKETCH)
        order = net.work("tail", kind="snapshot")
        assert order.output_url and order.output_size
        blob = b"\x01" * order.output_size
        upload(order.output_url, blob)
        refused(lambda: answer(net, 0, blob), 400, "answers for step 1, not 0")
        refused(lambda: answer(net, 3, blob), 400, "answers for step 1, not 3")
        refused(lambda: answer(net, 3, blob, kind="snapshot_taken"), 400, "answers for step 1, not 3")
        assert answer(net, 1, blob) == "snapshot recorded"
        assert net.orch.state.get("snapshots/0/" + tail) == [1]


def test_a_challenge_is_served_only_once_its_window_is_committed(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    """A challenge of step 1 is kept from the miner until it has committed `delay` more steps (by default the
    replay depth of its precision), so every hop an audit replays from the snapshot is in before the miner can know
    it will be; challenges drawn meanwhile wait behind it, oldest first."""
    with serve_net(data_dir, keypairs, tmp_path, snapshot_rate=1.0) as net:
        tail = net.keys["tail"].ss58_address
        tail_reaches_step_one(net, SKETCH)
        miner = net.orch.state.miner(tail)
        assert miner is not None and net.orch.challenges.delay_of(miner) == FP32.depth  # a CPU miner: fp32
        net.orch.challenges.delay = 1
        assert net.orch.challenges.pending(tail)  # drawn, and not served: the tail gets its ordinary work
        next_sample_to_tail(net)
        hop(net, "tail", "forward", loss=2.0, inner_step=2, sketch=SKETCH)  # commits step 2
        assert [c.step for c in net.orch.state.snapshots.queued(tail)] == [1, 2]
        order = net.work("tail", kind="snapshot")
        assert order.challenged_step == 1 and order.output_url and order.output_size
        blob = b"\x03" * order.output_size
        upload(order.output_url, blob)
        assert answer(net, 1, blob, at=2) == "snapshot recorded"
        assert net.clients["tail"].work().kind != "snapshot"  # step 2's waits for step 3


def test_a_taken_snapshot_lets_work_go_on_up_to_its_step(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    """The miner copies the kept state and uploads it beside its work (iota.miner.phases.Phases.snapshot): once it
    says it took the snapshot it gets other work, but a report past the step it was at is refused and the order
    served again."""
    with serve_net(data_dir, keypairs, tmp_path, snapshot_rate=1.0) as net:
        net.orch.challenges.delay = 0
        tail_reaches_step_one(net, SKETCH)
        order = net.work("tail", kind="snapshot")
        assert order.output_url and order.output_size
        assert "past step 1" in answer(net, 1, b"", kind="snapshot_taken", at=1)
        next_sample_to_tail(net)  # not the order: the snapshot is on its way
        hop(net, "tail", "forward", loss=2.0, inner_step=1)  # a micro-batch of the next step: accepted
        before = net.snapshot()
        refused(
            lambda: hop(net, "tail", "forward", loss=2.0, inner_step=2, sketch=SKETCH),
            409,
            "answer the snapshot challenge first",
        )
        after = net.snapshot()
        assert before["samples"] == after["samples"] and before["losses"] == after["losses"]
        assert (
            net.work("tail", kind="snapshot").challenged_step == 1
        )  # served again: a failed upload is redone
        blob = b"\x02" * order.output_size
        upload(order.output_url, blob)
        assert answer(net, 1, blob) == "snapshot recorded"
        found = net.orch.challenges.snapshots(net.keys["tail"].ss58_address, 0)
        assert found[1]["sha256"] == hashlib.sha256(blob).hexdigest()


def test_a_challenge_goes_with_the_session_that_was_challenged(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    """A miner killed with a challenge pending and restarted (a new session, back at the checkpoint's step 0) is
    not ordered to answer for the old session's step: it could not, and every try was a strike."""
    with serve_net(data_dir, keypairs, tmp_path, snapshot_rate=1.0) as net:
        tail = net.keys["tail"].ss58_address
        net.orch.challenges.delay = 0
        tail_reaches_step_one(net, SKETCH)
        assert net.work("tail", kind="snapshot").challenged_step == 1
        net.join("tail")  # PM2 restarted it
        assert net.clients["tail"].work().kind != "snapshot"
        (dropped,) = [e for e in net.orch.state.events(50) if e["kind"] == "challenge_dropped"]
        assert dropped["hotkey"] == tail and dropped["step"] == 1
        assert net.orch.abuse.strikes(tail, net.clock()) == 0


def test_a_drawn_window_replays_steps_no_earlier_window_did(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    """Windows of 6 steps drawn at 0 and 7 of a miner that reached step 20: the next covers a step none did,
    from the snapshots at 0, 6, 7 and 13: 13 (steps 13-18), or 6 for the one step between the two windows (a rule
    that took the most new steps never drew it, and a cheat at that one step went unseen); once every step is
    covered, any start may be drawn."""
    with serve_net(data_dir, keypairs, tmp_path) as net:
        state, challenges = net.orch.state, net.orch.challenges
        state.steps.commit(0, "hk", 20, SKETCH)
        for start in (0, 7):
            state.snapshots.add_drawn(0, "hk", start)
        draws = [challenges._draw_start("hk", 0, 6, [0, 6, 7, 13]) for _ in range(100)]
        assert set(draws) <= {6, 13} and 6 in draws
        for start in (6, 13, 15):
            state.snapshots.add_drawn(0, "hk", start)
        assert {challenges._draw_start("hk", 0, 6, [0, 6, 13]) for _ in range(60)} == {0, 6, 13}
