"""Snapshot challenges through the real orchestrator: a report that completes a step must commit a sketch, a
challenged step is the miner's next order before any other work, its snapshot is checked for size and digest,
and audits start their replay from it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bittensor.keyfiles import Keypair

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


def answer(net: Net, step: int, blob: bytes, kind: str = "snapshot") -> str:
    result = SnapshotTaken(step=step) if kind == "snapshot_taken" else SnapshotDone(step=step)
    report = PhaseReport(
        run_id=net.orch.run.run_id,
        epoch=0,
        inner_step=step,
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
        starts = set()
        net.orch.auditor.max_open = 40  # the draws below are left unanswered
        for _ in range(40):  # the window start is drawn among the checkpoint and the snapshot
            response = net.signed("validator", "/validators/audit")
            task = AuditTask.model_validate_json(response.content)
            if task.miner != tail:
                continue
            starts.add(task.start_step)
            assert [s.step for s in task.snapshots] == [1] and task.snapshots[0].sketch == SKETCH
            assert download(task.snapshots[0].url, task.snapshots[0].sha256, size) == blob
        assert starts == {0, 1}


def test_a_miner_past_the_step_answers_with_its_current_one(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    with serve_net(data_dir, keypairs, tmp_path, snapshot_rate=1.0) as net:
        tail = net.keys["tail"].ss58_address
        tail_reaches_step_one(net, SKETCH)
        order = net.work("tail", kind="snapshot")
        assert order.output_url and order.output_size
        blob = b"\x01" * order.output_size
        upload(order.output_url, blob)
        refused(lambda: answer(net, 0, blob), 400, "step 1 or later")
        assert answer(net, 3, blob) == "snapshot recorded"  # items fetched before the order had stepped
        assert net.orch.challenges.snapshots(tail, 0) == {}  # no sketch committed for step 3 yet: not usable
        assert net.orch.state.get("snapshots/0/" + tail) == [3]


def test_a_taken_snapshot_lets_work_go_on_up_to_its_step(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    """The miner copies its state and uploads it beside its work (iota.miner.phases.Phases.snapshot): once it says
    it took the snapshot it gets other work, but a report past that step is refused and the order served again."""
    with serve_net(data_dir, keypairs, tmp_path, snapshot_rate=1.0) as net:
        tail_reaches_step_one(net, SKETCH)
        order = net.work("tail", kind="snapshot")
        assert order.output_url and order.output_size
        refused(lambda: answer(net, 0, b"", kind="snapshot_taken"), 400, "step 1 or later")
        assert "taken" in answer(net, 1, b"", kind="snapshot_taken")

        def hop(name: str, kind: str, **over: object) -> None:
            work = net.work(name, kind)  # not the order: the snapshot is on its way
            data = download(work.input_url, work.input_sha256, 1 << 24) if work.input_url else None
            out = net.activation(0.1) if work.output_url else None
            if work.output_url and out is not None:
                upload(work.output_url, out)
            net.clients[name].report(report_for(work, data, out, **over))

        hop("head", "forward")  # sample 1
        hop("mid", "backward")  # sample 0's, first
        hop("mid", "forward")
        hop("head", "backward")
        hop("head", "forward")  # sample 2
        hop("mid", "forward")
        hop("tail", "forward", loss=2.0, inner_step=1)  # a micro-batch of the next step: accepted
        before = net.snapshot()
        refused(
            lambda: hop("tail", "forward", loss=2.0, inner_step=2, sketch=SKETCH),
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
        tail_reaches_step_one(net, SKETCH)
        assert net.work("tail", kind="snapshot").challenged_step == 1
        net.join("tail")  # PM2 restarted it
        assert net.clients["tail"].work().kind != "snapshot"
        (dropped,) = [e for e in net.orch.state.events(50) if e["kind"] == "challenge_dropped"]
        assert dropped["hotkey"] == tail and dropped["step"] == 1
        assert net.orch.abuse.strikes(tail, net.clock()) == 0
