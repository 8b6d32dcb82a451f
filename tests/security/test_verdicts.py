"""A validator's failing verdict is not believed on its word: the orchestrator recomputes the audit when no other
validator confirms it, a lie is refuted and costs the liar its standing, a true failure is confirmed; and the score
log, mirrored to the bucket, survives a fresh orchestrator."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from bittensor.keyfiles import Keypair

from iota.audit.judge import replay_setup
from iota.audit.scoring import ORCHESTRATOR, STRIKES, compute_scores, standing
from iota.chain.local import LocalChain
from iota.model.flat import decode_f32, encode_f32
from iota.orchestrator.assembly import assemble
from iota.orchestrator.audits import Auditor
from iota.orchestrator.ledgers import Claim, SnapshotRecord
from iota.orchestrator.recheck import Rechecker
from iota.protocol import AuditTask, AuditVerdict, WeightSketch
from iota.storage import keys
from iota.storage.transfer import upload
from iota.train.snapshot import snapshot_to_f32, take_snapshot
from tests.orchestrator import run_settings
from tests.security import Net, report_for, serve_net


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    with serve_net(data_dir, keypairs, tmp_path) as net:
        net.orch.auditor.clock = net.clock
        yield net


def honest_head_forward(net: Net) -> None:
    """The head computes its forward for real (the checkpoint's weights), uploads and reports it."""
    orch = net.orch
    work = net.work("head")
    checkpoint = decode_f32(orch.store.get(keys.checkpoint_stage(orch.run.run_id, 0, 0)))
    setup = replay_setup(orch.run, 0, orch.epochs.plan(0), False, net.run.batch, torch.device("cpu"))
    assert work.sample_id is not None and work.output_url is not None
    out, _ = setup.worker(checkpoint).forward(work.sample_id, None)
    upload(work.output_url, out)
    net.clients["head"].report(report_for(work, None, out))


def audit(net: Net, validator: str = "validator") -> AuditTask:
    response = net.signed(validator, "/validators/audit")
    assert response.status_code == 200, response.text
    return AuditTask.model_validate_json(response.content)


def verdict(net: Net, task: AuditTask, passed: bool, validator: str = "validator") -> None:
    body = AuditVerdict(
        audit_id=task.audit_id,
        miner=task.miner,
        epoch=task.epoch,
        stage=task.stage,
        passed=passed,
        hops_replayed=len(task.hops),
        depth=1,
        reason="" if passed else "claimed mismatch",
    )
    response = net.signed(validator, "/validators/verdict", body.model_dump_json().encode())
    assert response.status_code == 200, response.text


def recheck(net: Net) -> int:
    net.clock.offset += net.orch.auditor.confirm_wait_s + 1  # nobody else took the claim up in time
    return Rechecker(net.orch.auditor, net.orch.run, net.orch.state, net.orch.store, net.run.batch).run_once()


def test_a_lone_validators_lies_are_refuted_and_cost_it_its_standing(net: Net) -> None:
    net.join("head", "mid", "tail")
    head = net.keys["head"].ss58_address
    honest_head_forward(net)
    for strike in range(STRIKES):
        task = audit(net)
        assert task.miner == head  # the only miner with committed work
        verdict(net, task, passed=False)  # a lie
        log = net.orch.auditor.score_log()
        assert head in compute_scores(log)  # unconfirmed: it does not count yet
        assert recheck(net) == 1
        log = net.orch.auditor.score_log()
        mine = [v for v in log["verdicts"] if v["validator"] == ORCHESTRATOR]
        assert len(mine) == strike + 1 and mine[-1]["passed"], mine[-1]["detail"]["reason"]
        assert mine[-1]["detail"]["confirms"] == task.audit_id
        assert compute_scores(log)[head] == 1.0  # refuted: the honest head keeps its whole credit
    response = net.signed("validator", "/validators/audit")
    assert response.status_code == 403 and "standing" in response.text


def test_a_true_failure_is_confirmed_by_the_orchestrators_recomputation(net: Net) -> None:
    net.join("head", "mid", "tail")
    head = net.keys["head"].ss58_address
    work = net.work("head")
    assert work.output_url is not None
    out = net.activation(0.5)  # not what the stage computes
    upload(work.output_url, out)
    net.clients["head"].report(report_for(work, None, out))
    verdict(net, audit(net), passed=False)
    assert recheck(net) == 1
    log = net.orch.auditor.score_log()
    (mine,) = [v for v in log["verdicts"] if v["validator"] == ORCHESTRATOR]
    assert not mine["passed"] and "forward" in mine["detail"]["reason"]
    assert head not in compute_scores(log)
    assert recheck(net) == 0  # settled: nothing left to recompute


def disputed(net: Net) -> int:
    """The orchestrator's recomputations of claims a second validator disputed: due at once, no wait."""
    return Rechecker(net.orch.auditor, net.orch.run, net.orch.state, net.orch.store, net.run.batch).run_once()


def test_another_validator_is_given_the_same_audit_and_its_pass_alone_settles_nothing(net: Net) -> None:
    net.join("head", "mid", "tail")
    head = net.keys["head"].ss58_address
    honest_head_forward(net)
    accused = audit(net)
    verdict(net, accused, passed=False)  # a lie about the honest head
    own = audit(net)  # the accuser is not asked to confirm itself
    assert net.orch.state.get(f"audit/{own.audit_id}")["confirms"] is None
    verdict(net, own, passed=True)
    check = audit(net, "validator2")
    assert (check.miner, check.epoch) == (head, accused.epoch)
    assert net.orch.state.get(f"audit/{check.audit_id}")["confirms"] == accused.audit_id
    verdict(net, check, passed=True, validator="validator2")
    assert standing(net.orch.auditor.score_log()["verdicts"]) == {}  # one word against another: no strike yet
    assert disputed(net) == 1  # the orchestrator decides, without waiting for confirm_wait_s
    assert disputed(net) == 0
    log = net.orch.auditor.score_log()
    (mine,) = [v for v in log["verdicts"] if v["validator"] == ORCHESTRATOR]
    assert mine["passed"] and mine["detail"]["confirms"] == accused.audit_id
    assert compute_scores(log)[head] == 1.0
    # the liar's second lie meets the same end and costs it its standing; validator2 keeps its own
    verdict(net, audit(net), passed=False)
    verdict(net, audit(net, "validator2"), passed=True, validator="validator2")
    assert disputed(net) == 1
    assert standing(net.orch.auditor.score_log()["verdicts"]) == {net.keys["validator"].ss58_address: STRIKES}
    assert net.signed("validator", "/validators/audit").status_code == 403
    assert net.signed("validator2", "/validators/audit").status_code in (200, 204)


def test_a_bought_validator_neither_shields_a_cheater_nor_costs_its_accuser_anything(net: Net) -> None:
    """validator2 passes whatever it is given to confirm; the honest validator fails a head and a body that cheat.
    The orchestrator's recomputation fails each: their failures are confirmed, and the strikes are the bought one's.
    A further failing verdict on a confirmed miner's epoch asks nobody to confirm it: it is moot."""
    net.join("head", "mid", "tail")
    cheaters = {net.keys[name].ss58_address for name in ("head", "mid")}
    bought, honest = net.keys["validator2"].ss58_address, net.keys["validator"].ss58_address
    net.forward("head", 0.5)  # not what the stage computes
    net.forward("mid", 0.5)  # its input, passed on unchanged
    accused: set[str] = set()
    for _ in range(40):
        task = audit(net)
        verdict(net, task, passed=False)  # true
        if task.miner in accused:
            assert net.orch.auditor.unconfirmed(net.clock() + 1e6) == []  # moot: nothing to confirm
            continue
        accused.add(task.miner)
        check = audit(net, "validator2")
        assert check.miner == task.miner
        verdict(net, check, passed=True, validator="validator2")  # bought
        assert disputed(net) == 1
        log = net.orch.auditor.score_log()
        assert task.miner not in compute_scores(log)
        assert honest not in standing(log["verdicts"])
        if accused == cheaters:
            break
    assert accused == cheaters
    assert standing(net.orch.auditor.score_log()["verdicts"]) == {bought: STRIKES}
    response = net.signed("validator2", "/validators/audit")
    assert response.status_code == 403 and "proved" in response.text


def test_two_validators_confirming_a_false_failure_are_found_out_by_a_spot_check(net: Net) -> None:
    """validator fails an honest head and validator2 confirms it: two voices, which alone would zero the head. A
    spot check (every confirmation here) has the orchestrator recompute it: the failure stops counting, and each
    of the two takes a strike; a second such pair of lies costs both their standing."""
    net.orch.auditor.spot_check = 1.0
    net.join("head", "mid", "tail")
    head = net.keys["head"].ss58_address
    honest_head_forward(net)
    liars = {net.keys[name].ss58_address for name in ("validator", "validator2")}
    for strike in range(1, STRIKES + 1):
        verdict(net, audit(net), passed=False)  # a lie
        check = audit(net, "validator2")
        assert check.miner == head
        verdict(net, check, passed=False, validator="validator2")  # the same lie, "confirmed"
        assert disputed(net) == 1  # recomputed at once, without waiting for confirm_wait_s
        log = net.orch.auditor.score_log()
        assert (
            compute_scores(log)[head] == 1.0
        )  # the recomputation passed the head: the pair's word counts for nothing
        lost = standing(log["verdicts"])
        assert set(lost) == (liars if strike == STRIKES else set())
    for name in ("validator", "validator2"):
        assert net.signed(name, "/validators/audit").status_code == 403


def test_a_verdict_out_of_bounds_is_refused_and_never_stored(net: Net) -> None:
    """A validator's verdict is kept for good and served to anyone: an oversized reason, a dict of thousands of
    error kinds, a NaN, a number past 64 bits or a miner that is no hotkey is a 422, and the audit stays open."""
    net.join("head", "mid", "tail")
    honest_head_forward(net)
    task = audit(net)
    honest = AuditVerdict(
        audit_id=task.audit_id,
        miner=task.miner,
        epoch=task.epoch,
        stage=task.stage,
        passed=True,
        hops_replayed=len(task.hops),
        depth=1,
        errors={"forward": 1e-6},
    ).model_dump()
    spoilt: list[dict[str, Any]] = [
        {"reason": "x" * 600_000},
        {"errors": {f"kind{i}": 0.5 for i in range(10_000)}},
        {"errors": {"forward": math.nan}},
        {"errors": {"forward": math.inf}},
        {"hops_replayed": 2**63},
        {"depth": -1},
        {"miner": "not a hotkey"},
        {"audit_id": "x" * 10_000},
    ]
    log = net.orch.auditor.score_log()
    for change in spoilt:
        response = net.signed("validator", "/validators/verdict", json.dumps(honest | change).encode())
        assert response.status_code == 422, (list(change), response.status_code)
        assert len(response.content) < 4096  # the answer names what is wrong without repeating it
    assert net.orch.auditor.score_log() == log
    response = net.signed("validator", "/validators/verdict", json.dumps(honest).encode())
    assert response.status_code == 200, response.text  # the audit was still open
    (stored,) = [
        v for v in net.orch.auditor.score_log()["verdicts"] if v["detail"]["audit_id"] == task.audit_id
    ]
    assert stored["passed"] and stored["detail"]["errors"] == {"forward": 1e-6}


def test_the_score_log_survives_a_fresh_orchestrator_through_the_bucket(
    net: Net, data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    net.join("head", "mid", "tail")
    honest_head_forward(net)
    verdict(net, audit(net), passed=True)
    net.orch.auditor.mirror(0)  # as when the next checkpoint is published
    log = net.orch.auditor.score_log()
    assert log["work"] and log["verdicts"]
    assert net.orch.store.head(keys.scores(net.orch.run.run_id, 0)) is not None
    # a new orchestrator with an empty state store over the same bucket
    chain = LocalChain(tmp_path / "chain.json")
    settings = run_settings(data_dir, tmp_path / "fresh-run")
    fresh = assemble(settings, chain, keypairs["orchestrator"].ss58_address, store=net.store)
    auditor: Auditor = fresh.orchestrator.auditor
    restored = auditor.score_log()
    assert restored["work"] == log["work"]
    assert [v["detail"] for v in restored["verdicts"]] == [v["detail"] for v in log["verdicts"]]
    assert compute_scores(restored) == compute_scores(log)


def test_a_recomputation_from_the_checkpoint_compares_the_snapshots_the_window_reaches(net: Net) -> None:
    """A window from the checkpoint names the snapshots it reaches and the validator compares the replay's weights
    with them; the orchestrator's recomputation must compare the same, or it refutes a right failure (a miner that
    moved its weights off course within the window) and strikes the validator that found it."""
    net.join("head", "mid", "tail")
    orch, head = net.orch, net.keys["head"].ss58_address
    checkpoint = decode_f32(orch.store.get(keys.checkpoint_stage(orch.run.run_id, 0, 0)))
    setup = replay_setup(orch.run, 0, orch.epochs.plan(0), False, net.run.batch, torch.device("cpu"))
    snapshot = take_snapshot(setup.worker(checkpoint))
    blob = encode_f32(snapshot_to_f32(snapshot))
    orch.store.put("snapshot-of-step-1", blob)
    with orch.state.transaction():
        orch.state.steps.commit(0, head, 1, WeightSketch(norms=[1.0], projection=[0.0] * 8))
        answered = SnapshotRecord(key="snapshot-of-step-1", sha256=hashlib.sha256(blob).hexdigest())
        orch.state.snapshots.record(0, head, 1, answered)
    claim = Claim(miner=head, epoch=0, stage=0, accuser="v", at=0.0, plan=orch.epochs.plan(0), bf16=False)
    rechecker = Rechecker(orch.auditor, orch.run, orch.state, orch.store, net.run.batch, orch.challenges)
    evidence = rechecker._load(claim)
    assert evidence.start is None and list(evidence.later) == [1]
    assert torch.equal(evidence.later[1], snapshot.weights)
