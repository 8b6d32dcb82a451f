"""The end of an epoch under audit, through the real orchestrator on uvicorn: once the merge is done, every miner
whose pseudo-gradient went into it is audited by a validator daemon over HTTP. A forged upload (scaled, zeros,
noise, another miner's) fails its miner; a poisoned merged partition fails its owner, even where the orchestrator
already kept it out of the checkpoint; honest miners and owners pass; a second validator, or the orchestrator's
own recomputation, confirms each failure.

Two stages of three replicas train one epoch: the replicas are the daemon's own `MinerDaemon`s stepped one work
item at a time over signed HTTP (hops computed by their StageWorker, upload, merge and apply by `phases.do`);
the validators are `ValidatorDaemon`s asking `POST /validators/audit` and answering `POST /validators/verdict`.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from bittensor.keyfiles import Keypair

from iota.audit.scoring import ORCHESTRATOR, confirmed_failures
from iota.chain.local import LocalChain
from iota.client.orchestrator import OrchestratorClient
from iota.merge import MergePlan
from iota.miner.main import MinerDaemon
from iota.orchestrator.app import STORAGE_PREFIX
from iota.orchestrator.assembly import assemble
from iota.orchestrator.recheck import Rechecker
from iota.orchestrator.service import Orchestrator
from iota.protocol import Ack, AuditTask, AuditVerdict, Work
from iota.storage import LocalStore
from iota.validator.main import ValidatorDaemon
from tests.orchestrator import run_settings
from tests.security import serving
from tests.support import Clock
from tests.support.hops import corrupted_merge, train_hop

# Registered in this order, the replicas take stages 0, 1, 0, 1, 0, 1.
REPLICAS = ("s0a", "s1a", "s0b", "s1b", "s0c", "s1c")
VALIDATORS = ("validator", "validator2")


@dataclass
class Net:
    url: str
    orch: Orchestrator
    clock: Clock
    batch: Callable[
        [int], tuple[torch.Tensor, torch.Tensor]
    ]  # the run's samples, for the orchestrator's recheck
    miners: dict[str, MinerDaemon]
    validators: dict[str, ValidatorDaemon]
    stopped: set[str] = field(default_factory=set)
    poisoners: dict[str, bool] = field(default_factory=dict)  # owner -> whether it reported its own digest

    def hotkey(self, name: str) -> str:
        return self.miners[name].client.hotkey

    def name_of(self, hotkey: str) -> str:
        return next(n for n, m in self.miners.items() if m.client.hotkey == hotkey)


@pytest.fixture(scope="module")
def keypairs() -> dict[str, Keypair]:
    names = ("orchestrator", "cold", *REPLICAS, *VALIDATORS)
    return {name: Keypair.create_from_mnemonic(Keypair.generate_mnemonic()) for name in names}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The stages are tiny: torch's thread pool costs more than it saves on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    chain = LocalChain(tmp_path / "chain.json")
    cold = keypairs["cold"].ss58_address
    for name in REPLICAS:
        chain.register(keypairs[name].ss58_address, cold)
    for name in VALIDATORS:
        chain.register(keypairs[name].ss58_address, cold, 1e6, validator_permit=True)
    settings = run_settings(
        data_dir,
        tmp_path / "run",
        stages=2,
        samples_per_epoch=6,  # two per head replica: two inner steps each, inside one audit's depth
        partitions=4,
        lr=1e-2,
        warmup_tokens=0,
        total_tokens=100_000,
        miner_timeout_s=1e6,  # nobody times out here; heartbeats (every timeout / 4) never fire
        rate_per_ip=0.0,
        rate_per_hotkey=1e6,
    )
    clock = Clock()
    store = LocalStore(
        tmp_path / "run" / "store", "http://127.0.0.1:9/storage", secrets.token_bytes(32), now=clock
    )
    orchestrator = keypairs["orchestrator"].ss58_address
    assembled = assemble(settings, chain, orchestrator, store=store, local_store=store)
    assembled.orchestrator.clock = clock
    assembled.orchestrator.auditor.clock = clock
    # Every role already holds the data shards (what fetch_data would download, digests checked).
    cache = tmp_path / "cache"
    shards = cache / "data" / assembled.run.plan.digest[:16]
    shards.mkdir(parents=True)
    for shard in assembled.run.plan.shards:
        shutil.copyfile(assembled.run.prepared.directory / shard.file, shards / shard.file)
    with serving(assembled.app) as url:
        store.base_url = url + STORAGE_PREFIX
        miners, validators = {}, {}
        for name in REPLICAS:
            client = OrchestratorClient(url, keypairs[name], orchestrator, timeout_s=30, give_up_s=5)
            miners[name] = MinerDaemon(client, torch.device("cpu"), False, 8, 1 << 34, cache)
            miners[name].start()
            assert miners[name].stage == int(name[1]), name
        for name in VALIDATORS:
            client = OrchestratorClient(url, keypairs[name], orchestrator, timeout_s=30, give_up_s=5)
            daemon = ValidatorDaemon(client, chain, keypairs[name], torch.device("cpu"), 1e9, cache)
            daemon.run = client.run_info()
            validators[name] = daemon
        net = Net(url, assembled.orchestrator, clock, assembled.run.batch, miners, validators)
        try:
            yield net
        finally:
            for miner in miners.values():
                miner.state.stopping = True
                miner.http.close()
                miner.client.close()
            for daemon in validators.values():
                daemon.http.close()
                daemon.client.close()


# -- the epoch ------------------------------------------------------------------------------------------------

Cheat = Callable[[Net, str, Work], bool]  # does a work item its own way instead of the daemon; True if it did


def run_epoch(net: Net, cheat: Cheat, until: Callable[[], bool] = lambda: False) -> None:
    """Round-robin over the replicas, each asking for work and doing it, until all are told the run is done (or
    `until` holds)."""
    for _ in range(300):
        live = [name for name in REPLICAS if name not in net.stopped]
        if not live or until():
            return
        for name in live:
            miner = net.miners[name]
            assert miner.worker is not None
            work = miner.client.work(forward=miner.worker.wants_forward())
            if work.kind == "stop":
                net.stopped.add(name)
            elif work.kind in ("forward", "backward"):
                train_hop(net.miners[name], work)
            elif work.kind != "wait" and not cheat(net, name, work):
                miner.phases.do(work)
    raise AssertionError(f"the run did not finish: phase {net.orch.scheduler.phase}")


def audit_all(net: Net, validator: str) -> list[tuple[AuditTask, AuditVerdict]]:
    """`validator` asks for audits until none is left for it; each is replayed, judged and answered."""
    daemon = net.validators[validator]
    done = []
    while (task := daemon.next_task()) is not None:
        verdict = daemon.audit(task)
        daemon.client.call("POST", "/validators/verdict", Ack, verdict)
        done.append((task, verdict))
        assert len(done) < 20, "audits never run out"
    return done


def end_audits(net: Net) -> dict[str, tuple[AuditTask, AuditVerdict]]:
    """The first validator's audits after the epoch: one per replica, each with its upload to check."""
    assert net.orch.scheduler.phase == "done"
    done = audit_all(net, "validator")
    by_name = {net.name_of(task.miner): (task, verdict) for task, verdict in done}
    assert sorted(by_name) == sorted(REPLICAS) and len(done) == len(REPLICAS)
    for task, _ in done:
        # Every replica stepped, and its epoch is short enough for one window from the checkpoint to reach its end.
        assert task.epoch == 0 and task.pseudo_gradient is not None and task.start_step == 0
        assert 1 <= task.pseudo_gradient.step <= 6 and task.pseudo_gradient.sketch is not None
    owners = [name for name, (task, _) in by_name.items() if task.merge is not None]
    assert len(owners) >= 4  # two owners per partition, four partitions per stage
    return by_name


# -- cases ----------------------------------------------------------------------------------------------------


FORGERS = {  # replica -> its forged upload, from its honest pseudo-gradient and its honest stage-mate's
    "s0b": lambda own, mate: own * 2,
    "s0c": lambda own, mate: torch.zeros_like(own),
    "s1b": lambda own, mate: torch.randn(own.shape, generator=torch.Generator().manual_seed(5)) * own.std(),
    "s1c": lambda own, mate: mate,
}


def forge_uploads(net: Net, name: str, work: Work) -> bool:
    forge = FORGERS.get(name)
    if work.kind != "upload" or forge is None:
        return False
    mate = net.miners[f"s{name[1]}a"].worker
    worker = net.miners[name].worker
    assert worker is not None and mate is not None
    forged = forge(worker.pseudo_gradient(), mate.pseudo_gradient())
    worker.pseudo_gradient = lambda: forged  # type: ignore[method-assign]  # what `phases.do` uploads
    net.miners[name].phases.do(work)
    return True


def test_a_forged_pseudo_gradient_fails_its_miner_and_honest_ones_pass(net: Net) -> None:
    run_epoch(net, forge_uploads)
    audits = end_audits(net)
    for name, (task, verdict) in audits.items():
        assert "pseudo_gradient_sketch" in verdict.errors and "pseudo_gradient" in verdict.errors, name
        if name in FORGERS:
            assert not verdict.passed, name
            assert "pseudo_gradient_sketch: sketch relative error" in verdict.reason, verdict.reason
            assert "pseudo_gradient: relative error" in verdict.reason, verdict.reason
            assert verdict.errors["pseudo_gradient"] > 0.5 and "merge:" not in verdict.reason
            assert max(verdict.errors.get(k, 0.0) for k in ("activation", "gradient", "loss")) < 1e-3
        else:
            assert verdict.passed, verdict.reason
            assert (
                verdict.errors["pseudo_gradient"] < 1e-4 and verdict.errors["pseudo_gradient_sketch"] < 1e-6
            )
        if task.merge is not None:  # every owner merged honestly, forged uploads and all
            assert verdict.errors["merge"] == 0.0 and "merge:" not in verdict.reason, name
    # A second validator is given each failing verdict to confirm, without being told why, and confirms it.
    confirmations = audit_all(net, "validator2")
    assert sorted(net.name_of(task.miner) for task, _ in confirmations) == sorted(FORGERS)
    assert all(not verdict.passed and "pseudo_gradient" in verdict.reason for _, verdict in confirmations)
    log = net.orch.auditor.score_log()
    assert confirmed_failures(log["verdicts"]) == {(net.hotkey(name), 0) for name in FORGERS}


OWN_DIGEST = {
    0: True,
    1: False,
}  # stage -> whether its poisoner's report names the digest of what it uploaded


def noise(values: torch.Tensor) -> torch.Tensor:
    return (
        values + torch.randn(values.shape, generator=torch.Generator().manual_seed(7)) * values.abs().mean()
    )


def poison_merges(net: Net, name: str, work: Work) -> bool:
    """The first owner of each stage's partition 0 uploads noisy weights slices for every partition it owns,
    under its own digest (the owners disagree) or under the honest one (their reports agree; only the bytes
    betray it)."""
    if work.kind != "merge":
        return False
    assert work.merge is not None
    plan = MergePlan.model_validate(work.merge.plan)
    hotkey = net.hotkey(name)
    if hotkey != plan.partitions[0].owners[0]:
        return False
    own_digest = net.poisoners[name] = OWN_DIGEST[plan.stage]
    corrupted_merge(net.miners[name], work, noise, honest_digest=not own_digest)
    return True


def test_a_poisoned_merged_partition_fails_its_owner_and_the_orchestrator_confirms_it(net: Net) -> None:
    run_epoch(net, poison_merges)
    poisoners = net.poisoners
    assert sorted(OWN_DIGEST.values()) == sorted(poisoners.values())  # one in each stage
    mismatched = {e["hotkey"] for e in net.orch.state.events(10_000) if e["kind"] == "merge_mismatch"}
    assert mismatched == {
        net.hotkey(name) for name in poisoners
    }  # kept out of the checkpoint, but no verdict yet
    assert not net.orch.state.verdicts()
    audits = end_audits(net)
    for name, (task, verdict) in audits.items():
        assert verdict.errors["pseudo_gradient"] < 1e-4, name  # every upload is honest
        if name in poisoners:
            assert task.merge is not None and not verdict.passed, name
            expected = "is not the merge of the uploads" if poisoners[name] else "not the result it reported"
            assert verdict.reason.startswith("merge: partition") and expected in verdict.reason, (
                verdict.reason
            )
        else:
            assert verdict.passed, verdict.reason
            assert task.merge is None or verdict.errors["merge"] == 0.0
    # No other validator takes the claims up: the orchestrator recomputes them itself and confirms both.
    net.clock.offset += net.orch.auditor.confirm_wait_s + 1
    rechecker = Rechecker(net.orch.auditor, net.orch.run, net.orch.state, net.orch.store, net.batch)
    assert rechecker.run_once() == len(poisoners)
    log = net.orch.auditor.score_log()
    mine = [v for v in log["verdicts"] if v["validator"] == ORCHESTRATOR]
    assert {v["miner"] for v in mine} == {net.hotkey(name) for name in poisoners}
    assert all(not v["passed"] and "merge: partition" in v["detail"]["reason"] for v in mine)
    assert confirmed_failures(log["verdicts"]) == {(net.hotkey(name), 0) for name in poisoners}


def test_the_merge_waits_for_failing_verdicts_on_its_submitters_until_they_are_settled(net: Net) -> None:
    """While the epoch uploads, a validator fails s0b and s1b. Every pseudo-gradient is in, yet the merge waits
    while either verdict is unsettled: s0b's is confirmed by a second validator, s1b's is disputed by it and
    refuted by the orchestrator's recomputation (s1b was honest). The merge then leaves out s0b alone."""
    accused = {net.hotkey("s0b"), net.hotkey("s1b")}
    first, second = net.validators["validator"], net.validators["validator2"]
    net.orch.auditor.spot_check = (
        0.0  # the second validator's confirmation stands (spot checks: test_verdicts.py)
    )

    def answer(daemon: ValidatorDaemon, task: AuditTask, passed: bool) -> None:
        verdict = daemon.audit(task).model_copy(
            update={"passed": passed, "reason": "" if passed else "claimed"}
        )
        daemon.client.call("POST", "/validators/verdict", Ack, verdict)

    def accuse(net: Net, name: str, work: Work) -> bool:
        if work.kind == "upload" and not net.orch.state.audits.claims():
            drawn: set[str] = set()
            for _ in range(100):  # draws are weighted by work: pass the others until both come up
                task = first.next_task()
                assert task is not None
                failing = task.miner in accused - drawn
                answer(first, task, passed=not failing)
                drawn |= {task.miner} if failing else set()
                if drawn == accused:
                    break
            assert drawn == accused, "not both were drawn"
        return False  # then it uploads honestly

    def uploaded() -> bool:
        return all(
            net.orch.state.uploads.get(0, int(name[1]), net.hotkey(name)) is not None for name in REPLICAS
        )

    def held() -> None:
        for name in REPLICAS:  # every replica asks again: nothing moves while a verdict is unsettled
            assert net.miners[name].client.work().kind == "wait"
        assert net.orch.scheduler.phase == "upload"

    run_epoch(net, accuse, until=uploaded)
    held()
    assert net.orch.state.events(kinds=["merge_held"]), "the hold was not logged"
    for _ in accused:  # the second validator is given both claims first
        task = second.next_task()
        assert task is not None and task.miner in accused
        answer(second, task, passed=task.miner == net.hotkey("s1b"))  # its own replay passes the honest s1b
    held()  # s1b's dispute is the orchestrator's to decide
    assert (
        Rechecker(net.orch.auditor, net.orch.run, net.orch.state, net.orch.store, net.batch).run_once() == 1
    )
    run_epoch(net, lambda *_: False)
    plans = [net.orch.state.merges.plan(0, stage) for stage in (0, 1)]
    assert plans[0] is not None and net.hotkey("s0b") not in plans[0].hotkeys
    assert plans[1] is not None and net.hotkey("s1b") in plans[1].hotkeys
    failed = confirmed_failures(net.orch.auditor.score_log()["verdicts"])
    assert failed == {(net.hotkey("s0b"), 0)}
