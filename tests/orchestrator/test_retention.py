"""A run's footprint stays bounded: retention after each checkpoint, over real epochs.

Nine epochs of a two-stage run go through the real scheduler and epoch driver (hops leased and reported, one lease
per epoch lapsing after its upload, pseudo-gradients uploaded, the merge recomputed by the orchestrator, the new
weights applied), on each store (a LocalStore served over HTTP, S3 on moto) and each database engine. Each
published checkpoint wakes the retention pass (iota.orchestrator.retention) on its own thread. The bucket's objects
and the state's rows stop growing after the first few epochs; the latest checkpoints, every object an open audit
or an unsettled claim reads, and the records they need stay; the rest goes; the weights and every validator's
standing read from the state are what they were before the pass.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from bittensor.keyfiles import Keypair

from iota.audit.scoring import compute_scores, standing
from iota.chain.local import LocalChain
from iota.merge import OuterConfig, sha256_hex
from iota.model.config import preset
from iota.model.flat import encode_f32
from iota.model.stages import plan_stages
from iota.orchestrator.assembly import assemble
from iota.orchestrator.commitments import epoch_end
from iota.orchestrator.epochs import EpochDriver, EpochSettings
from iota.orchestrator.ledgers import AuditRecord, CheckpointInfo, Claim, EndAuditQueue, ScoreArchive
from iota.orchestrator.ledgers import keys as ledger_keys
from iota.orchestrator.retention import Retention, RetentionSettings
from iota.orchestrator.scheduler import APPLY, FORWARD, MERGE, TRAIN, UPLOAD, Policy, Scheduler
from iota.orchestrator.state import Hop, StateStore
from iota.protocol import ApplyDone, EpochPlan, PhaseReport, UploadDone
from iota.state import Database
from iota.storage import LocalStore, ObjectStore, keys
from tests.orchestrator import run_settings
from tests.storage.conftest import local_store, s3_store, store  # noqa: F401  (both stores, served for real)
from tests.support.s3 import moto_admin, moto_endpoint, s3_bucket  # noqa: F401

RUN_ID = "run-keep"
MODEL = preset("test", vocab_size=256)
STAGES = plan_stages(MODEL.n_layers, 2)
HEADS, TAIL = ("head-a", "head-b"), "tail"
SAMPLES = 3
EPOCHS = 8
KEEP = RetentionSettings(keep_epochs=2, keep_checkpoints=2, url_ttl_s=10**6)
PHASE_TIMEOUT_S = 30.0
CLAIMED_EPOCH, AUDITED_EPOCH, ANSWERED_AFTER = 1, 2, 6  # the audit of epoch 2 is answered after epoch 6


@dataclass
class Run:
    state: StateStore
    store: ObjectStore
    scheduler: Scheduler
    epochs: EpochDriver
    retention: Retention
    now: float = 1000.0

    @property
    def epoch(self) -> int:
        return self.scheduler.epoch

    def train(self) -> None:
        """One epoch of hops: the head that goes first takes every sample (head-a in even epochs), so the work,
        and with it the weights, differs from epoch to epoch. The epoch's first lease lapses after its upload."""
        order = HEADS if self.epoch % 2 == 0 else HEADS[::-1]
        lapsed = False
        while self.scheduler.phase == TRAIN:
            for hotkey in (*order, TAIL):
                hop = self.scheduler.next_work(hotkey, self.now).hop
                if hop is None:
                    continue
                if hop.output_key is not None:
                    self.store.put(hop.output_key, f"{hop.id}-{hop.lease_no}".encode())
                with self.scheduler.transaction():
                    leased = self.scheduler.leased_hop(hotkey, hop.id, hop.epoch, self.now)
                    if not lapsed:
                        self.scheduler.release(leased, self.now)  # its output key is named by nobody now
                        lapsed = True
                        continue
                    self.complete(leased)

    def complete(self, hop: Hop) -> None:
        sha = sha256_hex(f"{hop.id}-{hop.lease_no}".encode()) if hop.output_key else None
        loss = 2.0 if hop.stage == 1 and hop.direction == FORWARD else None
        self.scheduler.complete(hop, sha, 8 if sha else None, loss, 64, self.now, inner_step=hop.id)

    def end_epoch(self) -> None:
        """Upload, then let MERGE time out (the orchestrator recomputes every partition and publishes the next
        checkpoint, which wakes retention), then apply."""
        epoch = self.epoch
        assert self.scheduler.phase == UPLOAD
        for miner in self.state.miners():
            data = encode_f32(torch.full((self.epochs.n_params[miner.stage],), 1e-3))
            self.store.put(keys.pseudo_grad(RUN_ID, epoch, miner.stage, miner.hotkey), data)
            with self.state.transaction():
                assert self.epochs.phase_work(miner, self.now).kind == "upload"
                done = UploadDone(norm=1e-3 * self.epochs.n_params[miner.stage] ** 0.5)
                report = PhaseReport(
                    run_id=RUN_ID, epoch=epoch, inner_step=0, result=done, output_sha256=sha256_hex(data)
                )
                self.epochs.report(miner, report, self.now)
        if any(claim.epoch == epoch for claim in self.state.audits.claims().values()):
            # the merge waits for an unsettled failing verdict on this epoch, until UPLOAD times out
            assert self.scheduler.phase == UPLOAD
            self.now += PHASE_TIMEOUT_S + 1
            with self.state.transaction():
                self.epochs.advance(self.now)
        assert self.scheduler.phase == MERGE
        self.now += PHASE_TIMEOUT_S + 1
        with self.state.transaction():
            self.epochs.advance(self.now)
        assert self.scheduler.phase == APPLY
        self.retention.wait()
        for miner in self.state.miners():
            sha = self.epochs.checkpoints.weights_sha(miner.stage)
            report = PhaseReport(
                run_id=RUN_ID, epoch=epoch, inner_step=0, result=ApplyDone(), output_sha256=sha
            )
            with self.state.transaction():
                self.epochs.report(miner, report, self.now)
        assert (self.epoch, self.scheduler.phase) == (epoch + 1, TRAIN)


@pytest.fixture
def run(db: Database, store: ObjectStore) -> Iterator[Run]:  # noqa: F811
    state = StateStore(db)
    policy = Policy(
        n_stages=2, samples_per_epoch=SAMPLES, epochs=0, max_in_flight=8, lease_s=60.0, miner_timeout_s=1e9
    )

    def activation_key(hop: Hop, lease: int) -> str:  # as the assembly names them: one key per lease
        serial = state.counters.bump("lease_serial")
        return keys.activation(RUN_ID, hop.epoch, hop.sample_id, hop.stage, hop.direction, serial)  # type: ignore[arg-type]

    scheduler = Scheduler(state, policy, activation_key)
    settings = EpochSettings(
        partitions=2,
        outer=OuterConfig(),
        seed=0,
        url_ttl_s=60,
        phase_timeout_s=PHASE_TIMEOUT_S,
        min_upload_bytes_per_s=1e9,
    )
    extra = {"data_plan": {}, "schedule": {}, "tokenizer_kind": "bpe", "tokenizer_digest": "0" * 64}
    epochs = EpochDriver(RUN_ID, MODEL, STAGES, state, scheduler, store, settings, lambda: extra, 64)
    retention = Retention(RUN_ID, state, store, KEEP, clock=lambda: the_run.now)
    epochs.checkpoints.retention = retention
    the_run = Run(state, store, scheduler, epochs, retention)
    with state.transaction():
        epochs.initialize(the_run.now)
    for hotkey in (HEADS[0], TAIL, HEADS[1]):
        scheduler.register(hotkey, None, "cpu", 1 << 30, "s0", the_run.now)
    assert {m.hotkey: m.stage for m in state.miners()} == {HEADS[0]: 0, HEADS[1]: 0, TAIL: 1}
    yield the_run
    retention.wait()


def epochs_in_bucket(bucket: ObjectStore) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {
        "activations": set(),
        "epochs": set(),
        "checkpoints": set(),
        "scores": set(),
    }
    for key in bucket.list(keys.run_prefix(RUN_ID)):
        if (activation := keys.parse_activation(key)) is not None:
            found["activations"].add(activation.epoch)
        elif (epoch := keys.parse_epoch_object(key)) is not None:
            found["epochs"].add(epoch)
        elif (epoch := keys.parse_checkpoint_epoch(key)) is not None:
            found["checkpoints"].add(epoch)
    return found


def footprint(run: Run) -> dict[str, int]:
    """Objects in the bucket and rows of each growing table."""
    rows = {
        table: int(run.state.db.scalar(f"SELECT COUNT(*) FROM {table}"))
        for table in ("hops", "samples", "losses", "kv", "verdicts")
    }
    return {"objects": len(run.store.list(keys.run_prefix(RUN_ID))), **rows}


def audit_reads(run: Run, epoch: int) -> list[str]:
    """Every object an audit of `epoch` names (iota.orchestrator.audits._issue): each miner's committed hops'
    inputs and outputs, the checkpoint it started from, its upload and what its merge read and wrote."""
    named = []
    for miner in run.state.miners():
        for _, _, _, _, in_key, _, out_key, _, _ in run.state.done_hops(miner.hotkey, epoch, 512):
            named += [k for k in (in_key, out_key) if k]
        end = epoch_end(run.state, miner.hotkey, epoch, miner.stage)
        assert end.upload_key is not None and end.plan is not None
        named += [keys.checkpoint_stage(RUN_ID, epoch, miner.stage), end.upload_key]
        named += [p.prev_weights.key for p in end.plan.partitions]
        named += [p.prev_momentum.key for p in end.plan.partitions if p.prev_momentum is not None]
        named += end.merge_reads(miner.hotkey)
    return named


def verdict(
    run: Run, validator: str, epoch: int, passed: bool, audit_id: str, confirms: str | None = None
) -> None:
    detail: dict[str, object] = {"reason": "", "errors": {}, "audit_id": audit_id, "confirms": confirms}
    with run.state.transaction():
        run.state.add_verdict(run.now, validator, HEADS[0], epoch, 0, passed, 4, 2, detail)


def score_log(run: Run, epoch: int) -> dict[str, object]:
    """The log the weights follow from in `epoch`, as iota.orchestrator.audits.Auditor.score_log builds it."""
    work: dict[str, list[dict[str, object]]] = {}
    for done_in, miner, stage, hops in run.state.work.credited():
        work.setdefault(str(done_in), []).append({"miner": miner, "stage": stage, "hops": hops})
    return {
        "epoch": epoch,
        "stage_params": run.epochs.n_params,
        "work": work,
        "verdicts": run.state.verdicts(),
    }


def test_footprint_stays_flat_and_audits_keep_what_they_read(run: Run) -> None:
    plan = EpochPlan(epoch=0, tokens_at_start=0, replicas=1)
    # A liar whose two failing verdicts of epoch 0 the orchestrator's recomputations refuted: it lost its standing.
    for audit_id in ("lie-1", "lie-2"):
        verdict(run, "liar", 0, False, audit_id)
        verdict(run, "orchestrator", 0, True, f"re-{audit_id}", confirms=audit_id)
    sizes = []
    for epoch in range(EPOCHS):
        run.train()
        verdict(run, "honest", epoch, True, f"routine-{epoch}")
        with run.state.transaction():
            if epoch == CLAIMED_EPOCH:  # a failing verdict nobody has confirmed or refuted yet
                claim = Claim(
                    miner=HEADS[0], epoch=epoch, stage=0, accuser="v", at=run.now, plan=plan, bf16=False
                )
                run.state.audits.put_claim("claim", claim)
            if epoch == AUDITED_EPOCH:  # an audit issued and not answered yet
                issued = AuditRecord(
                    validator="v", miner=TAIL, epoch=epoch, stage=1, issued=run.now, plan=plan, bf16=False,
                    confirms=None, start_step=0,
                )  # fmt: skip
                run.state.audits.record("open", issued)
            if epoch == ANSWERED_AFTER:
                answered = run.state.audits.get("open")
                assert answered is not None
                run.state.audits.record("open", answered.model_copy(update={"answered": run.now}))
        weights, lost = compute_scores(score_log(run, epoch)), standing(run.state.verdicts())
        run.end_epoch()  # publishes checkpoint epoch + 1, and retention's pass runs
        assert compute_scores(score_log(run, epoch)) == weights and weights
        assert standing(run.state.verdicts()) == lost == {"liar": 2}
        sizes.append(footprint(run))

        latest = epoch + 1
        kept = set(range(max(0, latest - KEEP.keep_epochs), latest))
        pinned = {CLAIMED_EPOCH} | ({AUDITED_EPOCH} if epoch < ANSWERED_AFTER else set())
        found = epochs_in_bucket(run.store)
        assert found["activations"] == found["epochs"] == kept | (pinned & set(range(latest)))
        assert found["checkpoints"] == {latest - 1, latest} | kept | (pinned & set(range(latest)))
        for audited in pinned & set(range(latest)):
            for key in audit_reads(run, audited):
                assert run.store.head(key) is not None, (
                    f"{key} is gone while an audit of epoch {audited} is open"
                )
            assert run.state.epochs.checkpoint_shas(audited) is not None
    # After the first few epochs, nothing grows: objects (one lapsed lease's output among them per epoch, deleted),
    # hops, per-epoch values and routine verdicts.
    assert sizes[-1] == sizes[-2], sizes
    assert sizes[ANSWERED_AFTER] == sizes[-1], sizes
    # The loss curve keeps every completed sample: an expired epoch's as a few means.
    curve = run.state.loss_curve()
    assert sum(n for n, _ in curve) == run.state.counters.get("samples_completed") > 0
    assert int(run.state.db.scalar("SELECT COUNT(*) FROM loss_summary")) > 0  # expired epochs were folded
    assert run.state.audits.get("open") is None  # the answered audit's record went with its epoch
    assert "claim" in run.state.audits.claims()
    assert not [k for k, _ in run.state.items("") if (e := ledger_keys.epoch_of(k)) is not None and e == 3]


# -- the pieces, on both database engines -------------------------------------------------------------------


def test_every_per_epoch_value_is_known_as_one(db: Database) -> None:
    """Every key of the kv table made from an epoch is known as that epoch's, so a new family cannot outlive its
    epoch unnoticed; a run-level key or another epoch's never matches."""
    dummies = {"epoch": 7, "stage": 1, "hotkey": "hk", "step": 3, "phase": "merge"}
    per_epoch = [
        function(**{name: dummies[name] for name in inspect.signature(function).parameters})
        for function in vars(ledger_keys).values()
        if inspect.isfunction(function) and list(inspect.signature(function).parameters)[:1] == ["epoch"]
    ]
    assert {key.split("/")[0] for key in per_epoch} == set(ledger_keys.PER_EPOCH)
    assert [ledger_keys.epoch_of(key) for key in per_epoch] == [7] * len(per_epoch)
    others = [
        ledger_keys.audit("a1"),
        ledger_keys.challenge("hk"),
        ledger_keys.CHECKPOINT,
        "upload/x/1",
        "next_hop_id",
    ]
    assert [ledger_keys.epoch_of(key) for key in others] == [None] * len(others)
    state = StateStore(db)
    for key in [*per_epoch, *others, "step/6/hk", "upload_x/7/hk"]:
        state.put(key, 1)
    with state.transaction():
        assert state.forget(lambda epoch: epoch == 7)["kv"] == len(per_epoch)
    assert {key for key, _ in state.items("")} == {*others, "step/6/hk", "upload_x/7/hk"}
    # A prefix is a prefix, not a LIKE pattern: '_' and '%' match only themselves.
    assert [key for key, _ in state.items("upload_")] == ["upload_x/7/hk"]
    assert state.items("upload%") == []


def test_the_event_log_keeps_its_newest(db: Database) -> None:
    state = StateStore(db, events_kept=700)
    for n in range(2_600):
        state.log(float(n), "requeue", None, n=n)
    kept = int(db.scalar("SELECT COUNT(*) FROM events"))
    assert 700 <= kept < 700 + 500  # trimmed every 500 events
    assert [event["n"] for event in state.events(limit=3)] == [2_599, 2_598, 2_597]


def test_unservable_end_audits_and_the_carried_score_log_are_compacted(
    db: Database,
    local_store: LocalStore,  # noqa: F811
) -> None:
    """End-of-epoch audits still queued for an epoch past the window are dropped (unless a claim keeps that epoch);
    the score log a resumed run carried over loses old work and routine verdicts, never what settles a claim."""
    state = StateStore(db)
    state.run.set_checkpoint(CheckpointInfo(epoch=10, shas=[]))
    plan = EpochPlan(epoch=4, tokens_at_start=0, replicas=1)
    state.audits.put_claim(
        "c", Claim(miner="m", epoch=4, stage=0, accuser="v", at=0.0, plan=plan, bf16=False)
    )
    state.audits.set_end_audits(
        EndAuditQueue(through=9, pending=[(3, "m", 0), (4, "m", 0), (5, "m", 0), (8, "m", 1)])
    )
    routine = {"epoch": 1, "passed": True, "detail": {"confirms": None}}
    refutation = {"epoch": 1, "passed": True, "detail": {"confirms": "a"}}
    failing = {"epoch": 1, "passed": False, "detail": {"confirms": None}}
    recent = {"epoch": 7, "passed": True, "detail": {"confirms": None}}
    work = {str(e): [{"miner": "m", "stage": 0, "hops": e}] for e in range(10)}
    state.audits.set_score_archive(ScoreArchive(work=work, verdicts=[routine, refutation, failing, recent]))

    Retention(RUN_ID, state, local_store, RetentionSettings(keep_epochs=2, keep_checkpoints=1)).run_once()

    assert state.audits.end_audits().pending == [(4, "m", 0), (8, "m", 1)]
    archive = state.audits.score_archive()
    assert archive is not None
    assert sorted(archive.work, key=int) == [
        "4",
        *map(str, range(6, 10)),
    ]  # scoring's window, and the claim's
    assert archive.verdicts == [refutation, failing, recent]


def test_a_state_without_a_carried_score_log_gets_an_empty_one(db: Database, local_store: LocalStore) -> None:  # noqa: F811
    """Once its routine verdicts are forgotten, a state must not look fresh to the auditor, which would then
    restore the bucket's score log over its own and count every verdict twice."""
    state = StateStore(db)
    state.run.set_checkpoint(CheckpointInfo(epoch=10, shas=[]))
    assert Retention(RUN_ID, state, local_store, RetentionSettings()).run_once() is not None
    assert state.audits.score_archive() == ScoreArchive(work={}, verdicts=[])


def test_the_orchestrator_process_runs_retention_with_its_settings(data_dir: Path, tmp_path: Path) -> None:
    """`iota orchestrator` (which `iota local` starts) builds its epoch driver with retention wired to the
    settings: every checkpoint it publishes, the first one included, wakes a pass."""
    settings = run_settings(data_dir, tmp_path / "run", keep_epochs=3, keep_checkpoints=5, url_ttl_s=120)
    chain = LocalChain(tmp_path / "chain.json")
    hotkey = Keypair.create_from_mnemonic(Keypair.generate_mnemonic()).ss58_address
    assembled = assemble(settings, chain, hotkey)
    retention = assembled.orchestrator.epochs.checkpoints.retention
    assert retention is not None
    assert retention.settings == RetentionSettings(keep_epochs=3, keep_checkpoints=5, url_ttl_s=120)
    retention.wait()
    assert assembled.orchestrator.state.audits.score_archive() is not None  # the first checkpoint's pass ran


def test_a_checkpoint_published_during_a_pass_gets_a_pass_of_its_own(
    db: Database,
    local_store: LocalStore,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Passes run one at a time on their thread; a wake while one runs is not lost: another pass follows."""
    state = StateStore(db)
    state.run.set_checkpoint(CheckpointInfo(epoch=1, shas=[]))
    retention = Retention(RUN_ID, state, local_store, RetentionSettings())
    listing, release = threading.Event(), threading.Event()
    seen: list[int] = []
    list_keys = local_store.list

    def held_listing(prefix: str) -> list[str]:
        checkpoint = state.run.checkpoint
        assert checkpoint is not None
        seen.append(checkpoint.epoch)
        listing.set()
        assert release.wait(timeout=60)
        return list_keys(prefix)

    monkeypatch.setattr(local_store, "list", held_listing)
    retention.wake()
    assert listing.wait(timeout=60)  # the first pass is running
    state.run.set_checkpoint(CheckpointInfo(epoch=2, shas=[]))
    retention.wake()
    retention.wake()  # two wakes during one pass: one more pass, over the latest state
    release.set()
    retention.wait(timeout_s=60)
    assert seen == [1, 2]


def test_the_folded_loss_points_stay_bounded_and_keep_the_curve(db: Database) -> None:
    """However many epochs are folded, their points stay at most SUMMARY_ROWS: runs of points become weighted
    means, in order, and every sample is still counted."""
    state = StateStore(db)
    rows = [
        (epoch, part, 1 + part % 3, float(epoch % 5) + part / 8, epoch * 10.0 + part)
        for epoch in range(300)
        for part in range(8)
    ]
    db.executemany(
        "INSERT INTO loss_summary (epoch, part, samples, loss, done_at) VALUES (?, ?, ?, ?, ?)", rows
    )
    before = state.loss_curve()
    state.compact_loss_summary(most=1024)
    after = state.loss_curve()
    assert 512 <= len(after) <= 1024 and len(before) == 2400
    assert sum(n for n, _ in after) == sum(n for n, _ in before)
    assert sum(n * loss for n, loss in after) == pytest.approx(sum(n * loss for n, loss in before))
    # 2,400 points in runs of 4: the first point is the first four's mean, and the order is kept.
    first = before[:4]
    samples = sum(n for n, _ in first)
    assert after[0] == (samples, pytest.approx(sum(n * loss for n, loss in first) / samples))
    state.compact_loss_summary(most=1024)
    assert state.loss_curve() == after  # under the limit, nothing changes
