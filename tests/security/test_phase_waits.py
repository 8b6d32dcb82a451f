"""The end of an epoch waits only for those who owe something: a registered miner that did no work holds up
neither UPLOAD nor APPLY (even one that takes the new weights and never says it loaded them: it is handed them
again before any hop of the next epoch), and a worker whose upload or apply lease lapses is struck and waited for
no longer.

Through the real orchestrator on uvicorn, with real keys: three miners carry one sample through three stages, then
upload (zeros: what is merged does not matter here), merge with iota.merge as a miner does, and apply.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from bittensor.keyfiles import Keypair

from iota.client.orchestrator import Refused
from iota.client.transfers import UrlStore
from iota.merge import MergePlan, run_owner
from iota.model import wire
from iota.protocol import (
    ApplyDone,
    MergeDone,
    PartitionDone,
    PhaseReport,
    RegisterRequest,
    UploadDone,
    Work,
)
from iota.storage.transfer import download, upload
from tests.security import MINERS, Net, report_for, serve_net


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    # One sample an epoch; nobody is timed out when the clock is moved past a lease.
    with serve_net(data_dir, keypairs, tmp_path, samples_per_epoch=1, epochs=2, miner_timeout_s=1e6) as net:
        yield net


def train_one_sample(net: Net) -> None:
    """head, mid and tail forward; mid and head backward: each of the three has done work this epoch."""
    for name, kind in [("head", "forward"), ("mid", "forward"), ("tail", "forward")]:
        hop(net, name, kind)
    for name in ("mid", "head"):
        hop(net, name, "backward")
    assert net.orch.scheduler.phase == "upload"


def hop(net: Net, name: str, kind: str) -> None:
    work = net.work(name, kind)
    data = download(work.input_url, work.input_sha256, 1 << 24) if work.input_url else None
    out = net.activation(0.5) if work.output_url else None
    if work.output_url and out is not None:
        upload(work.output_url, out)
    loss = 2.5 if kind == "forward" and name == "tail" else None
    net.clients[name].report(report_for(work, data, out, loss))


def phase_report(
    work: Work, result: UploadDone | MergeDone | ApplyDone, **digests: str | None
) -> PhaseReport:
    return PhaseReport(run_id=work.run_id, epoch=work.epoch, inner_step=0, result=result, **digests)


def upload_zeros(net: Net, name: str) -> None:
    work = net.work(name, "upload")
    assert work.output_url and work.output_size
    data = bytes(work.output_size)  # fp32 zeros
    upload(work.output_url, data)
    digests = {"output_sha256": wire.sha256(data), "output_md5": wire.md5_hex(data)}
    net.clients[name].phase_report(phase_report(work, UploadDone(norm=0.0), **digests))


def merge(net: Net, name: str) -> None:
    work = net.work(name, "merge")
    assert work.merge is not None
    plan = MergePlan.model_validate(work.merge.plan)
    with httpx.Client() as http:
        store = UrlStore(work.merge.get, work.merge.put, http, 4 * plan.n_params)
        result = run_owner(store, plan, net.clients[name].hotkey)
    partitions = {
        i: PartitionDone(digest=r.digest, sq_norms=r.slice_sq_norms) for i, r in result.results.items()
    }
    net.clients[name].phase_report(phase_report(work, MergeDone(partitions=partitions, failed=result.failed)))


def apply(net: Net, name: str) -> None:
    work = net.work(name, "apply")
    digests = {"input_sha256": work.input_sha256, "output_sha256": work.input_sha256}
    net.clients[name].phase_report(phase_report(work, ApplyDone(), **digests))


def past(net: Net, lease: float | None) -> None:
    """Move the orchestrator's clock just past `lease`."""
    assert lease is not None
    net.clock.offset += lease + 1 - net.clock()


def strikes(net: Net, name: str) -> list[float]:
    return net.orch.state.abuse.strike_times(net.keys[name].ss58_address)


def test_an_idle_registered_miner_holds_up_no_phase(net: Net) -> None:
    net.join(*MINERS)
    net.clients["idle"].register(
        RegisterRequest(device="cpu", memory_bytes=1 << 34, session=uuid.uuid4().hex)
    )
    train_one_sample(net)
    net.clients["idle"].heartbeat()  # alive, as far as the orchestrator can tell
    asked = net.clients["idle"].work()
    assert asked.kind == "wait" and "nothing to upload" in asked.reason

    for name in MINERS:
        upload_zeros(net, name)
    assert net.orch.scheduler.phase == "merge"  # at once: the idle miner owes no upload
    for name in MINERS:
        merge(net, name)
    assert net.orch.scheduler.phase == "apply"
    for name in MINERS:
        apply(net, name)
    assert (net.orch.scheduler.epoch, net.orch.scheduler.phase) == (1, "train")  # at once again
    assert net.clock.offset == 0  # no deadline had to pass
    assert strikes(net, "idle") == [] and not net.events("lease_lapsed")


def test_a_miner_whose_lease_lapses_is_struck_and_waited_for_no_longer(net: Net) -> None:
    net.join(*MINERS)
    net.clients["idle"].register(
        RegisterRequest(device="cpu", memory_bytes=1 << 34, session=uuid.uuid4().hex)
    )
    train_one_sample(net)
    tail, idle = net.keys["tail"].ss58_address, net.keys["idle"].ss58_address

    stalled = net.work("tail", "upload")  # taken, and never done
    for name in ("head", "mid"):
        upload_zeros(net, name)
    # The tail did work: its upload is waited for while its lease runs.
    assert net.orch.scheduler.phase == "upload"
    assert strikes(net, "tail") == []
    past(net, stalled.lease_expires)
    assert net.clients["head"].work().kind == "merge"  # the next request moves on without it
    assert len(strikes(net, "tail")) == 1
    assert [(e["hotkey"], e["phase"]) for e in net.events("lease_lapsed")] == [(tail, "upload")]
    assert strikes(net, "idle") == []  # it was never handed an upload
    net.clients["mid"].work()
    assert len(strikes(net, "tail")) == 1  # struck once for the lapse, however often the phase is looked at

    for name in ("head", "mid"):
        merge(net, name)
    assert net.orch.scheduler.phase == "apply"
    # Both take the new weights and never say they loaded them. The tail trained: it owes its apply and is waited
    # for while its lease runs. The idle miner owes nothing and holds up nothing.
    stalled_apply = net.work("tail", "apply")
    assert net.work("idle", "apply").lease_expires is not None
    for name in ("head", "mid"):
        apply(net, name)
    assert net.orch.scheduler.phase == "apply"
    past(net, stalled_apply.lease_expires)
    net.clients["head"].work()  # the next request moves on without it
    assert (net.orch.scheduler.epoch, net.orch.scheduler.phase) == (1, "train")
    assert len(strikes(net, "tail")) == 2 and strikes(net, "idle") == []
    assert strikes(net, "head") == strikes(net, "mid") == []
    lapsed = [(e["hotkey"], e["phase"]) for e in net.events("lease_lapsed")]
    assert lapsed == [(tail, "apply"), (tail, "upload")] and idle not in {h for h, _ in lapsed}

    # Neither is handed a hop computed from the old weights: whatever it asks, it is handed the new checkpoint
    # first (the merge of epoch 0), until it says it loaded it.
    checkpoint = net.orch.state.run.checkpoint
    assert checkpoint is not None and checkpoint.epoch == 1
    for name in ("tail", "idle"):
        for _ in range(2):
            catch_up = net.work(name, "apply")
            stage = net.orch.state.miner(net.keys[name].ss58_address).stage
            assert (catch_up.epoch, catch_up.input_sha256) == (0, checkpoint.shas[stage])
    apply(net, "idle")
    assert net.orch.state.get(f"applied/0/{idle}") == checkpoint.shas[net.orch.state.miner(idle).stage]
    assert net.clients["idle"].work().kind != "apply"  # caught up: it may train now
    # An apply of any other checkpoint is refused and changes nothing.
    stale = net.work("tail", "apply").model_copy(update={"epoch": 1})
    with pytest.raises(Refused, match="stale"):
        digests = {"input_sha256": stale.input_sha256, "output_sha256": stale.input_sha256}
        net.clients["tail"].phase_report(phase_report(stale, ApplyDone(), **digests))
    assert net.work("tail", "apply").epoch == 0


def test_a_wait_lasts_what_an_honest_miner_needs_not_the_phase_timeout(net: Net) -> None:
    """A worker that takes its upload and sits on it holds the phase for the answer grace plus its size-time, not
    for the phase's timeout; one that never asks is waited for only the grace; a throttled one not at all."""
    net.join(*MINERS)
    train_one_sample(net)
    driver = net.orch.epochs
    started = net.clock()
    stalled = net.work("tail", "upload")
    size_s = 4 * driver.n_params[2] / driver.settings.min_upload_bytes_per_s
    assert stalled.lease_expires is not None
    assert stalled.lease_expires <= started + driver.settings.answer_grace_s + size_s + 1
    assert stalled.lease_expires < started + driver.settings.phase_timeout_s  # far shorter, here

    upload_zeros(net, "head")  # mid never asks for its upload
    # The tail breaks the protocol a few times: from then on its lease is not waited for.
    for _ in range(net.orch.abuse.config.waited_until):
        net.orch.abuse.strike(net.keys["tail"].ss58_address, "a confirmed bad output", net.clock())
    assert (
        net.clients["head"].work().kind == "wait" and net.orch.scheduler.phase == "upload"
    )  # mid, in its grace
    net.clock.offset += driver.settings.answer_grace_s + 1  # past the grace: mid is no longer waited for
    assert net.clients["head"].work().kind == "merge"
    assert net.clock() < started + driver.settings.phase_timeout_s  # long before the phase's timeout
    assert strikes(net, "mid") == []  # never asked: not waited for, not struck (it may be slow, not hostile)
