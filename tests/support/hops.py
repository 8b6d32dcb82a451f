"""Work done on the test's thread by the miner daemon's own code, for tests that drive miners step by step: a
training hop, and a merge whose uploaded slices are corrupted; and a hop done at once over the scheduler itself."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

import iota.miner.phases as miner_phases
from iota.merge import MergePlan, run_owner, sha256_hex
from iota.miner.main import MinerDaemon
from iota.model.flat import decode_f32, encode_f32
from iota.orchestrator.scheduler import FORWARD, Scheduler
from iota.orchestrator.state import Hop
from iota.protocol import Work
from iota.storage.transfer import download, upload


def complete_next(sched: Scheduler, hotkey: str, now: float, loss: Callable[[Hop], float]) -> Hop | None:
    """`hotkey` leases its next hop from the real scheduler and completes it at once, with a placeholder sha256 for
    its output and, on the tail's forward, `loss(hop)`; the hop as leased, or None when it had nothing to do."""
    hop = sched.next_work(hotkey, now).hop
    if hop is None:
        return None
    with sched.transaction():
        leased = sched.leased_hop(hotkey, hop.id, hop.epoch, now)
        tail = leased.direction == FORWARD and leased.stage == sched.policy.n_stages - 1
        output = None if leased.output_key is None else hashlib.sha256(b"%d" % leased.id).hexdigest()
        sched.complete(leased, output, None if output is None else 8, loss(leased) if tail else None, 64, now)
    return leased


def train_hop(miner: MinerDaemon, work: Work) -> None:
    """Fetch the input, compute the forward or backward and the inner step it completes (`Hops.compute`, with
    the epoch plan's learning rate and the sketch it commits), upload the output, report. A refused report raises
    (the daemon's outbox would only log it)."""
    assert miner.worker is not None
    data = (
        download(work.input_url, work.input_sha256, miner.worker.max_bytes, miner.http)
        if work.input_url
        else None
    )
    finished = miner.hops.compute(work, data)
    if finished.output is not None:
        assert work.output_url
        upload(work.output_url, finished.output, miner.http)
    miner.client.report(finished.report())


def corrupted_merge(
    miner: MinerDaemon, work: Work, corrupt: Callable[[torch.Tensor], torch.Tensor], honest_digest: bool
) -> None:
    """Do a merge order with the daemon's code, but upload `corrupt(merged weights)` for each partition the miner
    owns. `honest_digest`: the report names the digest of the correct merge (a lying owner, or bytes corrupted on
    their way to the bucket), so the owners' reports agree and only the bytes betray it; otherwise it names the
    digest of what was uploaded, and the owners disagree."""
    assert work.merge is not None
    plan = MergePlan.model_validate(work.merge.plan)
    hotkey = miner.client.hotkey
    weights_keys = {plan.output_key(i, hotkey, "weights") for i in plan.partitions_of(hotkey)}

    class CorruptingUrlStore(miner_phases.UrlStore):
        def put(self, key: str, data: bytes) -> None:
            super().put(key, encode_f32(corrupt(decode_f32(data))) if key in weights_keys else data)

    def corrupting_owner(store: Any, plan: MergePlan, hotkey: str, **kw: Any) -> Any:
        done = run_owner(store, plan, hotkey, **kw)
        for index, result in done.results.items():
            result.weights = corrupt(result.weights)
            result.weights_digest = sha256_hex(encode_f32(result.weights))
            store.put(plan.output_key(index, hotkey, "weights"), encode_f32(result.weights))
        return done

    with pytest.MonkeyPatch.context() as patch:
        if honest_digest:
            patch.setattr(miner_phases, "UrlStore", CorruptingUrlStore)
        else:
            patch.setattr(miner_phases, "run_owner", corrupting_owner)
        miner.phases.do(work)
