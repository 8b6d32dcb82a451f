"""The end-of-epoch merge as the orchestrator drives it, with one fault injected per test at a named point.

A real orchestrator app (SQLite state, the LocalStore it serves, sr25519-signed requests in process over ASGI) runs
two stages of three replicas each. The replicas are the daemon's own `MinerDaemon`s stepped one work item at a
time: hops through their StageWorker as the daemon computes them, upload, merge and apply through `phases.do`.
Each case breaks one thing at a named point (torchft's style) and lets the run finish; the test then recomputes
from the bucket's uploads, with the pure merge functions, what the new weights must be, and checks that every
surviving replica holds exactly that, that the weights moved, that the outer momentum the next epoch's merge will
read is the merge's, and that the orchestrator's accounting (recomputed partitions, flags, events) says what
happened.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from bittensor.keyfiles import Keypair

from iota.audit import scoring
from iota.chain.local import LocalChain
from iota.client.orchestrator import OrchestratorClient, Refused
from iota.config import OrchestratorSettings
from iota.merge import (
    DictStore,
    FlatRef,
    MergePlan,
    OuterConfig,
    Submitter,
    make_plan,
    merge_partition,
    partition_bounds,
    read_slice,
    sha256_hex,
)
from iota.miner.main import MinerDaemon
from iota.model.flat import decode_f32, encode_f32, flatten
from iota.model.stages import build_stage
from iota.orchestrator.app import STORAGE_PREFIX
from iota.orchestrator.assembly import assemble
from iota.orchestrator.referee import ORCHESTRATOR
from iota.orchestrator.service import Orchestrator
from iota.protocol import Ack, Report, Work
from iota.storage import LocalStore, keys
from iota.storage.transfer import upload
from iota.train.run import Run
from tests.orchestrator import run_settings
from tests.support import Clock
from tests.support.hops import corrupted_merge
from tests.support.hops import train_hop as hop

RUN_ID = "run-merge"
BASE_URL = "http://testserver"
SECRET = b"merge-faults-url-secret!"  # a restarted orchestrator signs and verifies URLs with the same secret
PARTITIONS = 4
PHASE_TIMEOUT_S = 30.0
SLOW_UPLOADS = {"min_upload_bytes_per_s": 25_000.0}  # a stage's ~0.5 MB upload gets ~20 s past the deadline
MERGE_CLIP = 3.0  # below every pseudo-gradient norm here (~4.7-5.5): each upload is clipped in some partition
SAMPLES = 6  # two per head replica
# Registered in this order, the replicas take stages 0, 1, 0, 1, 0, 1 (an empty stage first, then the emptiest).
NAMES = ("s0a", "s1a", "s0b", "s1b", "s0c", "s1c")
VICTIM_SUBMITTER = "s0b"  # the replica whose pseudo-gradient goes wrong in the submitter cases
FAULTY_STAGE = 0  # owner faults hit stage 0's merge; stage 1 merges honestly beside it


class InProcess(httpx.BaseTransport):
    """A sync transport into the ASGI app in this process; responses stay streamable (transfers use iter_raw)."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app, client=("127.0.0.1", 123))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> tuple[int, httpx.Headers, bytes]:
            response = await self.inner.handle_async_request(request)
            return response.status_code, response.headers, await response.aread()

        status, headers, content = asyncio.run(call())
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content))


@dataclass
class Net:
    settings: OrchestratorSettings
    chain: LocalChain
    keypairs: dict[str, Keypair]
    store_root: Path
    clock: Clock = field(default_factory=Clock)
    miners: dict[str, MinerDaemon] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)  # replicas killed by the fault: never asked again
    stopped: set[str] = field(default_factory=set)  # replicas told the run is complete
    timed_out: list[str] = field(default_factory=list)  # phases that moved on by their deadline
    restarts: int = 0
    hops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NAMES, 0))  # reported by each replica
    orch: Orchestrator = field(init=False)
    run: Run = field(init=False)
    store: LocalStore = field(init=False)
    _transport: InProcess = field(init=False)

    def boot(self) -> None:
        """Start (or restart) the orchestrator over the same state database and bucket, as a new process would."""
        self.store = LocalStore(self.store_root, BASE_URL + STORAGE_PREFIX, SECRET)
        hotkey = self.keypairs["orchestrator"].ss58_address
        assembled = assemble(self.settings, self.chain, hotkey, store=self.store, local_store=self.store)
        assembled.orchestrator.clock = self.clock
        assert assembled.orchestrator.epochs.settings.merge_clip == self.settings.merge_clip
        self.orch, self.run = assembled.orchestrator, assembled.run
        self._transport = InProcess(assembled.app)
        for miner in self.miners.values():
            self.connect(miner)

    def restart(self) -> None:
        self.orch.state.db.close()
        self.restarts += 1
        self.boot()

    def connect(self, miner: MinerDaemon) -> None:
        """Point a miner's signed client and its bucket transfers at the current app."""
        miner.client.http.close()
        miner.http.close()
        miner.client.http = httpx.Client(
            transport=self._transport, base_url=BASE_URL, auth=miner.client.auth, timeout=30, verify=False
        )
        miner.http = httpx.Client(transport=self._transport, timeout=30, verify=False)  # no TLS in process

    def add_miner(self, name: str, cache_dir: Path) -> MinerDaemon:
        client = OrchestratorClient(
            BASE_URL, self.keypairs[name], self.keypairs["orchestrator"].ss58_address, give_up_s=5
        )
        miner = MinerDaemon(client, torch.device("cpu"), False, 8, 1 << 34, cache_dir)
        self.connect(miner)
        miner.start()
        self.miners[name] = miner
        return miner

    def name_of(self, hotkey: str) -> str:
        return next(n for n, m in self.miners.items() if m.client.hotkey == hotkey)

    @property
    def phase(self) -> str:
        return self.orch.scheduler.phase

    def state(self, key: str) -> Any:
        return self.orch.state.get(key)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.orch.state.events(limit=10_000) if e["kind"] == kind]


# -- faults at named points ------------------------------------------------------------------------------


class Fault:
    """Does nothing: every replica is honest and alive."""

    def on_work(self, net: Net, name: str, work: Work, monkeypatch: pytest.MonkeyPatch) -> bool:
        """Called for every work item before the miner does it; True when the fault handled it instead."""
        return False

    def victim_name(self, net: Net) -> str | None:
        """The replica the fault struck, if any."""
        return None

    def busy(self, net: Net, name: str, monkeypatch: pytest.MonkeyPatch) -> bool | None:
        """Called before a replica asks for work: None to let it ask; else it asks nothing this turn, and the
        value says whether it was busy (a round in which nobody was busy moves the clock past a deadline)."""
        return None


class OwnerFault(Fault):
    """Strikes the first owner of partition 0 of the faulty stage when it receives its merge work."""

    victim: str | None = None  # hotkey

    def on_work(self, net: Net, name: str, work: Work, monkeypatch: pytest.MonkeyPatch) -> bool:
        if work.kind != "merge" or work.stage != FAULTY_STAGE:
            return False
        assert work.merge is not None
        plan = MergePlan.model_validate(work.merge.plan)
        self.victim = self.victim or plan.partitions[0].owners[0]
        if net.miners[name].client.hotkey != self.victim:
            return False
        self.strike(net, name, work, plan, monkeypatch)
        return True

    def victim_name(self, net: Net) -> str | None:
        assert self.victim is not None, "no merge work reached the faulty stage"
        return net.name_of(self.victim)

    def strike(
        self, net: Net, name: str, work: Work, plan: MergePlan, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        raise NotImplementedError


class OwnerDiesBeforeUpload(OwnerFault):
    def strike(
        self, net: Net, name: str, work: Work, plan: MergePlan, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        net.dead.add(name)


class OwnerDiesAfterUpload(OwnerFault):
    """Merges and uploads its slices, then dies before its report reaches the orchestrator."""

    def strike(
        self, net: Net, name: str, work: Work, plan: MergePlan, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        miner = net.miners[name]

        def die(report: Report) -> Ack:
            net.dead.add(name)  # the report is never sent
            return Ack(detail="never sent")

        with monkeypatch.context() as patch:
            patch.setattr(miner.client, "phase_report", die)
            miner.phases.do(work)
        uploaded = plan.output_key(plan.partitions_of(miner.client.hotkey)[0], miner.client.hotkey, "weights")
        assert name in net.dead and net.store.head(uploaded) is not None


def garbage(values: torch.Tensor) -> torch.Tensor:
    """Finite values of the right size and plausible scale that are not the merge."""
    noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(7))
    return values + noise * values.abs().mean()


def nan(values: torch.Tensor) -> torch.Tensor:
    poisoned = values.clone()
    poisoned[::97] = float("nan")
    return poisoned


class OwnerUploadsBadSlices(OwnerFault):
    """Uploads `corrupt(merged weights)` for each of its partitions.

    `honest_digest`: the report names the digest of the correct merge (a lying owner, or bytes corrupted on their
    way to the bucket), so the two owners' reports agree and only the uploaded bytes betray it. Otherwise the report
    names the digest of what was uploaded, and the owners disagree.
    """

    def __init__(self, corrupt: Callable[[torch.Tensor], torch.Tensor], honest_digest: bool):
        self.corrupt, self.honest_digest = corrupt, honest_digest

    def strike(
        self, net: Net, name: str, work: Work, plan: MergePlan, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        corrupted_merge(net.miners[name], work, self.corrupt, self.honest_digest)


class SubmitterFault(Fault):
    """Acts on VICTIM_SUBMITTER's upload work."""

    def on_work(self, net: Net, name: str, work: Work, monkeypatch: pytest.MonkeyPatch) -> bool:
        if work.kind != "upload" or name != VICTIM_SUBMITTER:
            return False
        self.strike(net, name, work)
        return True

    def victim_name(self, net: Net) -> str | None:
        return VICTIM_SUBMITTER

    def strike(self, net: Net, name: str, work: Work) -> None:
        raise NotImplementedError


class SubmitterDiesBeforeUpload(SubmitterFault):
    def strike(self, net: Net, name: str, work: Work) -> None:
        net.dead.add(name)


class SubmitterUploadVanishes(SubmitterFault):
    """Uploads and is recorded; then the object is gone from the bucket (or cut short) before the merge reads it."""

    def __init__(self, truncate: bool):
        self.truncate = truncate

    def strike(self, net: Net, name: str, work: Work) -> None:
        net.miners[name].phases.do(work)
        key = keys.pseudo_grad(RUN_ID, work.epoch, work.stage, net.miners[name].client.hotkey)
        assert net.state(f"upload/{work.epoch}/{work.stage}/{net.miners[name].client.hotkey}") is not None
        if self.truncate:
            net.store.put(key, net.store.get(key)[:-12])
        else:
            net.store.delete(key)


class SubmitterFailedItsAudit(SubmitterFault):
    """Uploads honestly, but a validator's failing verdict on its epoch was confirmed by the orchestrator's
    recomputation before the merge: its pseudo-gradient must not count."""

    def strike(self, net: Net, name: str, work: Work) -> None:
        net.miners[name].phases.do(work)
        hotkey = net.miners[name].client.hotkey
        for source in ("validator", scoring.ORCHESTRATOR):
            net.orch.state.add_verdict(net.clock(), source, hotkey, work.epoch, work.stage, False, 1, 1, {})


class OrchestratorRestartsMidMerge(Fault):
    """The first merge owner uploads its slices; the orchestrator restarts before that owner's report arrives."""

    def on_work(self, net: Net, name: str, work: Work, monkeypatch: pytest.MonkeyPatch) -> bool:
        if work.kind != "merge" or net.restarts:
            return False
        client = net.miners[name].client
        reported = []

        def restart_then_report(report: Report) -> Ack:
            net.restart()
            reported.append(report)
            return OrchestratorClient.phase_report(client, report)

        with monkeypatch.context() as patch:
            patch.setattr(client, "phase_report", restart_then_report)
            net.miners[name].phases.do(work)
        # The restarted orchestrator recorded the report sent to its predecessor's work item.
        assert net.restarts == 1 and reported
        assert net.state(f"merged/{work.epoch}/{work.stage}/{client.hotkey}") is not None
        return True


class OwnerOverwritesAfterAcceptance(OwnerFault):
    """Merges honestly; once its result is accepted (its APPLY work proves it), PUTs garbage over its weights and
    momentum slices through its merge work's URLs, which are still valid."""

    urls: dict[str, str] | None = None

    def on_work(self, net: Net, name: str, work: Work, monkeypatch: pytest.MonkeyPatch) -> bool:
        miner = net.miners[name]
        if work.kind == "apply" and self.urls and miner.client.hotkey == self.victim:
            for key, url in self.urls.items():
                accepted = net.store.get(key)
                upload(url, encode_f32(garbage(decode_f32(accepted))), miner.http)
                assert net.store.get(key) != accepted  # the overwrite landed
            self.urls = {}
            return False  # and it applies the new weights as usual
        return super().on_work(net, name, work, monkeypatch)

    def strike(
        self, net: Net, name: str, work: Work, plan: MergePlan, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        net.miners[name].phases.do(work)
        assert work.merge is not None
        self.urls = dict(work.merge.put)


class SubmitterUploadsLate(SubmitterFault):
    """Is granted its upload before the UPLOAD deadline and is still uploading when the others have finished; the
    clock passes the deadline (not its lease) while they keep asking; then its upload arrives."""

    held: Work | None = None

    def strike(self, net: Net, name: str, work: Work) -> None:
        self.held = work  # under way: the replica asks nothing until it is done

    def busy(self, net: Net, name: str, monkeypatch: pytest.MonkeyPatch) -> bool | None:
        work = self.held
        if name != VICTIM_SUBMITTER or work is None:
            return None
        if not others_uploaded(net, name):
            return True
        deadline, lease = upload_deadline(net, work), upload_lease(work)
        net.clock.offset += (deadline + lease) / 2 - net.clock()
        poll_others(net, name, expect_phase="upload")
        net.miners[name].phases.do(work)
        assert net.state(upload_name(net, name)) is not None and net.phase == "merge"
        self.held = None
        return True


class SubmitterStallsPastLease(SubmitterFault):
    """Is granted its upload and stalls: UPLOAD waits for it past its deadline until its lease ends, and not a
    second longer; the upload it finishes after that is refused, and it applies the merge of the others."""

    held: Work | None = None

    def strike(self, net: Net, name: str, work: Work) -> None:
        self.held = work

    def busy(self, net: Net, name: str, monkeypatch: pytest.MonkeyPatch) -> bool | None:
        work = self.held
        if name != VICTIM_SUBMITTER or work is None:
            return None
        if not others_uploaded(net, name):
            return True
        deadline, lease = upload_deadline(net, work), upload_lease(work)
        for at in (deadline + 1, lease - 1):
            net.clock.offset += at - net.clock()
            poll_others(net, name, expect_phase="upload")
        net.clock.offset += lease + 1 - net.clock()
        with pytest.raises(Refused, match="lease ended"):
            net.miners[name].phases.upload(work)  # reported before anyone else asks: UPLOAD has not ended yet
        assert net.state(upload_name(net, name)) is None
        poll_others(net, name, expect_phase="merge")
        self.held = None
        return True


def upload_name(net: Net, name: str) -> str:
    return f"upload/0/{int(name[1])}/{net.miners[name].client.hotkey}"


def others_uploaded(net: Net, name: str) -> bool:
    return all(net.state(upload_name(net, n)) is not None for n in NAMES if n != name)


def upload_deadline(net: Net, work: Work) -> float:
    return float(net.state(f"phase_started/{work.epoch}/upload")) + PHASE_TIMEOUT_S


def upload_lease(work: Work) -> float:
    """The lease of an upload granted before the deadline: the deadline plus its size over the minimum bandwidth."""
    assert work.lease_expires is not None and work.output_size is not None
    grace = work.output_size / SLOW_UPLOADS["min_upload_bytes_per_s"]
    assert 5 < grace < PHASE_TIMEOUT_S  # what the cases' clock moves assume
    return work.lease_expires


def poll_others(net: Net, name: str, expect_phase: str) -> None:
    """Every other replica asks for work (each request advances the phases); none has any yet."""
    for other in NAMES:
        if other != name:
            assert net.miners[other].client.work().kind in ("wait", "merge")
    assert net.phase == expect_phase


@dataclass(frozen=True)
class Case:
    fault: Callable[[], Fault]
    timeouts: tuple[str, ...] = ()  # phases that must move on by their deadline
    victim_uploads: bool = True  # the victim's pseudo-gradient is recorded and in the merge plan
    victim_counts: bool = True  # the victim's pseudo-gradient is in the merge
    victim_survives: bool = True  # the victim applies the new weights
    recomputed: bool = False  # the orchestrator recomputes the victim's partitions (a third recomputation)
    mismatch: bool = False  # and logs a merge_mismatch against the victim for each of them
    flagged: bool = False  # the victim's upload is flagged (norm_mismatch)
    clipped: bool = False  # the merge clips every upload somewhere
    settings: Mapping[str, Any] = field(default_factory=dict)  # overrides of the run's settings


CASES = {
    "all honest": Case(Fault),
    "owner dies before upload": Case(
        OwnerDiesBeforeUpload, timeouts=("merge", "apply"), victim_survives=False, recomputed=True
    ),
    "owner dies after upload": Case(
        OwnerDiesAfterUpload, timeouts=("merge", "apply"), victim_survives=False, recomputed=True
    ),
    "owner uploads garbage": Case(
        lambda: OwnerUploadsBadSlices(garbage, honest_digest=False), recomputed=True, mismatch=True
    ),
    "owner uploads NaN": Case(
        lambda: OwnerUploadsBadSlices(nan, honest_digest=False), recomputed=True, mismatch=True
    ),
    "owner uploads garbage under the honest digest": Case(
        lambda: OwnerUploadsBadSlices(garbage, honest_digest=True), recomputed=True, mismatch=True
    ),
    "owner uploads NaN under the honest digest": Case(
        lambda: OwnerUploadsBadSlices(nan, honest_digest=True), recomputed=True, mismatch=True
    ),
    "submitter dies before upload": Case(
        SubmitterDiesBeforeUpload,
        timeouts=("upload", "apply"),
        victim_uploads=False,
        victim_counts=False,
        victim_survives=False,
    ),
    "submitter upload missing": Case(
        lambda: SubmitterUploadVanishes(truncate=False), victim_counts=False, flagged=True
    ),
    "submitter upload truncated": Case(
        lambda: SubmitterUploadVanishes(truncate=True), victim_counts=False, flagged=True
    ),
    "submitter failed its audit": Case(SubmitterFailedItsAudit, victim_uploads=False, victim_counts=False),
    "orchestrator restarted mid-merge": Case(OrchestratorRestartsMidMerge),
    "owner overwrites its slices after acceptance": Case(OwnerOverwritesAfterAcceptance),
    "submitter uploads past the deadline within its lease": Case(SubmitterUploadsLate, settings=SLOW_UPLOADS),
    "submitter stalls past its lease": Case(
        SubmitterStallsPastLease, settings=SLOW_UPLOADS, victim_uploads=False, victim_counts=False
    ),
    "pseudo-gradients clipped at the merge": Case(Fault, clipped=True, settings={"merge_clip": MERGE_CLIP}),
}


# -- fixtures and the driver -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keypairs() -> dict[str, Keypair]:
    return {
        n: Keypair.create_from_mnemonic(Keypair.generate_mnemonic()) for n in ("orchestrator", "cold", *NAMES)
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The stages are tiny: on a loaded machine torch's thread pool costs 30x the compute (the merge is elementwise,
    so its bits do not depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def miner_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by every miner of the module (the daemon keeps its data shards there)."""
    return tmp_path_factory.mktemp("miner-cache")


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def net(
    data_dir: Path, keypairs: dict[str, Keypair], miner_cache: Path, tmp_path: Path, case: str
) -> Iterator[Net]:
    chain = LocalChain(tmp_path / "chain.json")
    for name in NAMES:
        chain.register(keypairs[name].ss58_address, keypairs["cold"].ss58_address)
    settings = run_settings(
        data_dir,
        tmp_path / "run",
        run_id=RUN_ID,
        stages=2,
        samples_per_epoch=SAMPLES,
        partitions=PARTITIONS,
        lr=1e-2,
        warmup_tokens=0,
        total_tokens=100_000,
        phase_timeout_s=PHASE_TIMEOUT_S,
        miner_timeout_s=1e6,  # deaths are settled by phase deadlines; heartbeats (every timeout / 4) never fire
        rate_per_ip=0.0,
        rate_per_hotkey=1e6,
        **CASES[case].settings,
    )
    net = Net(settings, chain, keypairs, tmp_path / "run" / "store")
    net.boot()
    # The miners' cache already holds the data shards (what fetch_data would download, digests checked): moving
    # 3 MB through the in-process transport for each test would take longer than the test.
    shards = miner_cache / "data" / net.run.plan.digest[:16]
    shards.mkdir(parents=True, exist_ok=True)
    for shard in net.run.plan.shards:
        shutil.copyfile(net.run.prepared.directory / shard.file, shards / shard.file)
    for name in NAMES:
        miner = net.add_miner(name, miner_cache)
        assert miner.stage == int(name[1]), (name, miner.stage)
    yield net
    for miner in net.miners.values():
        miner.state.stopping = True
        miner.http.close()
        miner.client.close()
    net.orch.state.db.close()


def train_hop(net: Net, name: str, work: Work) -> None:
    """A forward or backward hop as the daemon does it (tests.support.hops)."""
    hop(net.miners[name], work)
    net.hops[name] += 1


def serve(net: Net, name: str, fault: Fault, monkeypatch: pytest.MonkeyPatch) -> bool:
    """One turn of a replica: ask for work and do it. True when there was work to do.

    Hops are done by `train_hop`; the end-of-epoch work (upload, merge, apply) by the daemon's own `phases.do`.
    """
    miner = net.miners[name]
    assert miner.worker is not None
    busy = fault.busy(net, name, monkeypatch)
    if busy is not None:
        return busy
    work = miner.client.work(forward=miner.worker.wants_forward())
    if work.kind == "stop":
        net.stopped.add(name)
        return False
    if work.kind == "wait":
        if work.holding is not None:  # cached forwards whose backward will never come
            holding = set(work.holding)
            miner.worker.forget([s for s in list(miner.worker.cache) if s not in holding])
        return False
    if fault.on_work(net, name, work, monkeypatch):
        return True
    if work.kind in ("forward", "backward"):
        train_hop(net, name, work)
    else:
        miner.phases.do(work)
    return True


def run_epoch(net: Net, fault: Fault, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round-robin over the live replicas until every one is told the run is complete. A round in which nobody
    had work at the end of the epoch is a phase waiting for someone silent: move the clock past its deadline."""
    for _ in range(500):
        live = [n for n in NAMES if n not in net.dead | net.stopped]
        if not live:
            return
        phase = net.phase
        busy = [serve(net, name, fault, monkeypatch) for name in live]
        if not any(busy) and net.phase == phase and phase in ("upload", "merge", "apply"):
            net.timed_out.append(phase)
            net.clock.offset += PHASE_TIMEOUT_S + 1
    raise AssertionError(f"the run did not finish: phase {net.phase}, dead {net.dead}")


# -- what the bucket's uploads determine ------------------------------------------------------------------


def expected_merge(
    net: Net, stage: int, counted: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor, set[str]]:
    """New weights and outer momentum of `stage` from the seeded start and exactly the uploads in `counted`
    (hotkey -> work weight), merged partition by partition by the pure functions with the run's clip; and the
    hotkeys whose upload was clipped in some partition."""
    seeded = build_stage(net.orch.epochs.model, net.orch.epochs.stages[stage], net.settings.seed)
    start = flatten(
        dict(seeded.named_parameters())
    )  # checkpoint 0: what every replica started the epoch from
    blobs = DictStore()
    blobs.put("start", encode_f32(start))
    submitters = []
    for hotkey, weight in counted.items():
        key = keys.pseudo_grad(RUN_ID, 0, stage, hotkey)
        blobs.put(key, net.store.get(key))  # the upload as the bucket holds it
        submitters.append(Submitter(hotkey=hotkey, upload_key=key, weight=weight, claimed_norm=0.0))
    bounds = partition_bounds(start.numel(), PARTITIONS)
    plan = make_plan(
        run=RUN_ID,
        epoch=0,
        stage=stage,
        n_params=start.numel(),
        n_partitions=PARTITIONS,
        submitters=submitters,
        prev_weights=[FlatRef(key="start")] * len(bounds),
        outer=OuterConfig(lr=net.settings.outer_lr, momentum=net.settings.outer_momentum),
        clip=net.settings.merge_clip or None,
    )
    results = [merge_partition(blobs, plan, i, start[a:b], None) for i, (a, b) in enumerate(bounds)]
    assert all(r.used == sorted(counted) for r in results)
    weights = torch.cat([r.weights for r in results])
    moved = [not torch.equal(weights[a:b], start[a:b]) for a, b in bounds]
    assert all(moved), f"stage {stage}: partitions that did not move: {moved}"
    clipped = {h for r in results for h in r.clipped}
    return weights, torch.cat([r.momentum for r in results]), clipped


def test_merge_fault(net: Net, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = CASES[case]
    fault = spec.fault()
    run_epoch(net, fault, monkeypatch)

    victim = fault.victim_name(net)
    assert net.phase == "done" and net.timed_out == list(spec.timeouts)
    assert net.dead == (set() if spec.victim_survives else {victim})
    assert int(net.state("merges")) == 1 and len(net.events("checkpoint")) == 2  # epoch 0's, then the merge's
    assert net.orch.samples_lost() == 0 and int(net.state("samples_completed")) == SAMPLES
    for stage in (0, 1):
        check_stage(net, spec, stage, victim if stage == FAULTY_STAGE else None)


def check_stage(net: Net, spec: Case, stage: int, victim: str | None) -> None:
    """The stage's replicas, checkpoint and accounting after APPLY; `victim` is the replica the fault struck."""
    plan = MergePlan.model_validate(net.state(f"plan/0/{stage}"))
    names = [n for n in NAMES if int(n[1]) == stage]
    hotkey = {n: net.miners[n].client.hotkey for n in names}
    uploaded = [n for n in names if n != victim or spec.victim_uploads]
    assert plan.hotkeys == sorted(hotkey[n] for n in uploaded)
    for n in uploaded:  # work weights come from the orchestrator's ledger: the hops each replica reported
        assert net.state(f"upload/0/{stage}/{hotkey[n]}")["weight"] == net.hops[n] > 0

    counted = {hotkey[n]: float(net.hops[n]) for n in names if n != victim or spec.victim_counts}
    weights, momentum, clipped = expected_merge(net, stage, counted)
    assert clipped == (set(counted) if spec.clipped else set())
    data = encode_f32(weights)
    manifest = json.loads(net.store.get(keys.checkpoint_manifest(RUN_ID, 1)))
    assert net.store.get(keys.checkpoint_stage(RUN_ID, 1, stage)) == data
    assert net.state("checkpoint_shas/1")[stage] == manifest["stages"][stage]["sha256"] == sha256_hex(data)
    for n in names:
        if n in net.dead:
            continue
        worker = net.miners[n].worker
        assert worker is not None
        assert torch.equal(worker.flat_weights(), weights), f"{n} holds other weights than the merge"
        assert worker.inner_step == 0 and not worker.optimizer.state  # APPLY reset the inner optimizer
        assert net.state(f"applied/0/{hotkey[n]}") == sha256_hex(data)
    # The outer momentum the next epoch's merge will read is the merge's, slice by slice, under keys only the
    # orchestrator writes (an owner's merge URLs stay valid after its result is accepted).
    stage_momentum = manifest["momentum"][str(stage)]
    next_refs = net.orch.epochs._prev_momentum(stage)
    for index, (a, b) in enumerate(partition_bounds(weights.numel(), PARTITIONS)):
        assert stage_momentum[str(index)] == keys.checkpoint_momentum(RUN_ID, 1, stage, index)
        ref = next_refs[index]
        assert ref is not None and ref.key == stage_momentum[str(index)]
        assert read_slice(net.store, ref, a, b).equal(momentum[a:b])

    # Accounting: which partitions were recomputed, against whom a mismatch was logged, whose upload is flagged.
    victim_key = hotkey[victim] if victim else None
    victim_partitions = set(plan.partitions_of(victim_key)) if victim_key else set()
    recomputed = {
        p.index for p in plan.partitions if net.store.head(plan.output_key(p.index, ORCHESTRATOR, "weights"))
    }
    assert recomputed == (victim_partitions if spec.recomputed else set()), (recomputed, victim_partitions)
    accepted = net.state(f"accepted/0/{stage}")
    assert all(accepted[str(p.index)] in p.owners for p in plan.partitions)  # no partition needed us alone
    for index in recomputed:  # the recomputation picked the surviving owner's result
        assert accepted[str(index)] != victim_key
    mismatches = {(e["hotkey"], e["partition"]) for e in net.events("merge_mismatch") if e["stage"] == stage}
    assert mismatches == ({(victim_key, i) for i in victim_partitions} if spec.mismatch else set())
    flagged = {e["hotkey"] for e in net.events("norm_mismatch") if e["stage"] == stage}
    assert flagged == ({victim_key} if spec.flagged and victim_key else set())
