"""A miner killed mid-epoch and restarted at once (kill -9 under PM2) through the real orchestrator: its new
session starts from the checkpoint at inner step 0, the samples it held are restarted, and every audit of the
epoch, its own included, passes: the orchestrator keeps where each session begins among its hops, and the
validator replays each session from the checkpoint.

The network is the end-of-epoch audits' (tests/security/test_epoch_audits.py): two stages of three replicas as the
daemon's own `MinerDaemon`s over signed HTTP, driven one work item at a time, and a `ValidatorDaemon`.
"""

from __future__ import annotations

import torch
from bittensor.keyfiles import Keypair

from iota.client.orchestrator import OrchestratorClient
from iota.miner.main import MinerDaemon
from tests.security import test_epoch_audits as epoch_audits
from tests.security.test_epoch_audits import REPLICAS, Net, audit_all
from tests.support.hops import train_hop

# The end-of-epoch audits' network and its fixtures.
keypairs, net, one_thread = epoch_audits.keypairs, epoch_audits.net, epoch_audits.one_thread

CRASHED = "s1a"  # the tail: it steps at every hop, so its first session is ahead of its second at once


def restart(net: Net, name: str, keypairs: dict[str, Keypair]) -> None:
    """Kill the miner's process (nothing it held is reported or released) and start a new one with its key."""
    old = net.miners[name]
    old.state.stopping = True
    old.http.close()
    old.client.close()
    orchestrator = keypairs["orchestrator"].ss58_address
    client = OrchestratorClient(net.url, keypairs[name], orchestrator, timeout_s=30, give_up_s=5)
    new = MinerDaemon(client, torch.device("cpu"), False, 8, 1 << 34, old.cache_dir)
    new.start()
    assert new.session != old.session and new.stage == old.stage
    assert new.worker is not None and new.worker.inner_step == 0
    net.miners[name] = new


def run_epoch_with_a_crash(net: Net, keypairs: dict[str, Keypair]) -> int:
    """Round-robin over the replicas until the run is done; the crashed miner is restarted right after its first
    inner step. Returns that step."""
    crashed_at = 0
    for _ in range(300):
        live = [name for name in REPLICAS if name not in net.stopped]
        if not live:
            return crashed_at
        for name in live:
            miner = net.miners[name]
            assert miner.worker is not None
            work = miner.client.work(forward=miner.worker.wants_forward())
            if work.kind == "stop":
                net.stopped.add(name)
            elif work.kind in ("forward", "backward"):
                train_hop(miner, work)
                if name == CRASHED and not crashed_at and miner.worker.inner_step > 0:
                    crashed_at = miner.worker.inner_step
                    restart(net, name, keypairs)
            elif work.kind != "wait":
                miner.phases.do(work)
    raise AssertionError(f"the run did not finish: phase {net.orch.scheduler.phase}")


def test_a_miner_restarted_mid_epoch_passes_its_audits(net: Net, keypairs: dict[str, Keypair]) -> None:
    crashed_at = run_epoch_with_a_crash(net, keypairs)
    assert crashed_at >= 1
    state, hotkey = net.orch.state, net.hotkey(CRASHED)
    sessions = state.steps.sessions(0, hotkey)
    assert len(sessions) == 2 and sessions[0][1] == 0 and sessions[1][1] >= 1
    audits = audit_all(net, "validator")
    by_name = {net.name_of(task.miner): (task, verdict) for task, verdict in audits}
    assert sorted(by_name) == sorted(REPLICAS)
    for name, (_, verdict) in by_name.items():
        assert verdict.passed, (name, verdict.reason)
    task, verdict = by_name[CRASHED]
    # Both sessions were named and replayed, each from the checkpoint, and the upload was the last session's.
    assert {hop.session for hop in task.hops} == {0, 1}
    assert [hop.inner_step for hop in task.hops][sessions[1][1]] <= crashed_at
    assert verdict.hops_replayed == len(task.hops)
    assert task.pseudo_gradient is not None and task.pseudo_gradient.session == 1
    assert "pseudo_gradient" in verdict.errors and verdict.errors["pseudo_gradient"] < 1e-4
    assert not [v for v in state.verdicts() if not v["passed"]]
