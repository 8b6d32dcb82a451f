"""The orchestrator process built from its settings: `assemble`, what the `iota orchestrator` entry runs.

Its object store, state, scheduler, epoch driver, audits, authenticator and app."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from loguru import logger

from iota.auth import Authenticator, JournaledNonceStore, RateLimiter
from iota.chain.base import Chain, Neuron
from iota.checkpoint.manifest import n_params, stage_tensor_lists
from iota.config import OrchestratorSettings
from iota.merge import OuterConfig
from iota.model import codecs, wire
from iota.orchestrator.abuse import AbusePolicy
from iota.orchestrator.app import STORAGE_PREFIX, create_app
from iota.orchestrator.audits import Auditor
from iota.orchestrator.epochs import EpochDriver, EpochSettings
from iota.orchestrator.recheck import Rechecker
from iota.orchestrator.retention import Retention, RetentionSettings
from iota.orchestrator.scheduler import Policy, Scheduler
from iota.orchestrator.service import Limits, Orchestrator
from iota.orchestrator.state import Hop, StateStore
from iota.protocol import ModelInfo, RunInfo, StageInfo
from iota.state.db import open_database
from iota.storage import LocalStore, ObjectStore, S3Store, keys
from iota.train.run import Run, build_run


@dataclass
class Assembled:
    app: FastAPI
    orchestrator: Orchestrator
    run: Run
    rechecker: Rechecker | None = None  # recomputes unconfirmed failing verdicts on a background thread


def public_url(settings: OrchestratorSettings) -> str:
    return settings.public_url.rstrip("/") or f"http://{settings.host}:{settings.port}"


def make_store(settings: OrchestratorSettings) -> tuple[ObjectStore, LocalStore | None]:
    if settings.store == "s3":
        store = S3Store(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint or None,
            region=settings.s3_region,
            access_key=settings.s3_access_key or None,
            secret_key=settings.s3_secret_key or None,
        )
        return store, None
    secret = settings.url_secret.encode() or secrets.token_bytes(32)
    local = LocalStore(Path(settings.run_dir) / "store", public_url(settings) + STORAGE_PREFIX, secret)
    return local, local


def run_info(run: Run, run_id: str, hotkey: str) -> RunInfo:
    s = run.settings
    sizes = [n_params(t) for t in stage_tensor_lists(run.model, run.stages)]
    return RunInfo(
        run_id=run_id,
        orchestrator_hotkey=hotkey,
        model=ModelInfo.model_validate(run.model.to_dict()),
        stages=[
            StageInfo(index=sp.index, first_layer=sp.first_layer, last_layer=sp.last_layer, n_params=n)
            for sp, n in zip(run.stages, sizes, strict=True)
        ],
        data=run.plan.to_dict(),
        schedule=run.schedule.to_dict(),
        micro_batch=s.micro_batch,
        accumulate=s.accumulate,
        optimizer=s.optimizer,
        weight_decay=s.weight_decay,
        clip=s.clip,
        wire_dtype=s.wire_dtype,
        codec=s.codec,
        seed=s.seed,
    )


def upload_data(run: Run, run_id: str, store: ObjectStore, state: StateStore) -> None:
    """Put the prepared shards in the bucket once: heads, tails and validators fetch them by URL."""
    names = []
    for shard in run.plan.shards:
        key = keys.data_shard(run_id, shard.file)
        if store.head(key) is None:
            store.put(key, (run.prepared.directory / shard.file).read_bytes())
        names.append(shard.file)
    state.run.set_data_shards(names)


def cached_lookup(
    chain: Chain, ttl_s: float = 5.0, miss_refresh_s: float = 1.0, clock: Callable[[], float] = time.monotonic
) -> Callable[[str], Neuron | None]:
    """chain.neuron as a lookup in the whole registry, read once per ``ttl_s``: auth runs on every request, and
    reading the registry once per interval (not once per hotkey) keeps that O(1) however many miners there are.

    A hotkey not in the registry makes it re-read at once, but at most once per ``miss_refresh_s``: a miner that
    just registered is known within a second, and a flood of requests signed by unregistered keys costs one read
    per second, not one per request."""
    lock = threading.Lock()
    registry: dict[str, Neuron] = {}
    loaded_at = [float("-inf")]

    def lookup(hotkey: str) -> Neuron | None:
        now = clock()
        with lock:
            age = now - loaded_at[0]
            if age > ttl_s or (hotkey not in registry and age >= miss_refresh_s):
                registry.clear()
                registry.update({n.hotkey: n for n in chain.neurons()})
                loaded_at[0] = now
            return registry.get(hotkey)

    return lookup


def assemble(
    settings: OrchestratorSettings,
    chain: Chain,
    hotkey: str,
    store: ObjectStore | None = None,
    local_store: LocalStore | None = None,
) -> Assembled:
    """Everything the orchestrator process runs, built from its settings."""
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if store is None:
        store, local_store = make_store(settings)
    run = build_run(settings)
    state = StateStore(open_database(settings.state_url or f"sqlite:///{run_dir / 'state.db'}"))
    info = run_info(run, settings.run_id, hotkey)
    info.flags.update(state.run.flags)
    upload_data(run, settings.run_id, store, state)
    wire_dtype = wire.wire_dtype(settings.wire_dtype)
    act_shape = (settings.micro_batch, run.model.seq_len, run.model.wire_width)
    act_bytes = codecs.build(settings.codec, act_shape, wire_dtype, settings.seed).size  # what a hop sends
    need = tuple(
        20 * st.n_params for st in info.stages
    )  # fp32 weights, grads, Adam moments, epoch-start copy

    def activation_key(hop: Hop, lease: int) -> str:
        serial = state.counters.bump(
            "lease_serial"
        )  # unique per lease: a late upload under an old lease lands elsewhere
        return keys.activation(settings.run_id, hop.epoch, hop.sample_id, hop.stage, hop.direction, serial)  # type: ignore[arg-type]

    policy = Policy(
        n_stages=len(run.stages),
        samples_per_epoch=settings.samples_per_epoch,
        epochs=settings.epochs,
        max_in_flight=settings.max_in_flight,
        max_leases_held=settings.max_leases_held,
        lease_s=settings.lease_s,
        miner_timeout_s=settings.miner_timeout_s,
        stage_memory_bytes=need,
    )
    scheduler = Scheduler(state, policy, activation_key)
    epoch_settings = EpochSettings(
        partitions=settings.partitions,
        outer=OuterConfig(lr=settings.outer_lr, momentum=settings.outer_momentum),
        seed=settings.seed,
        url_ttl_s=settings.url_ttl_s,
        phase_timeout_s=settings.phase_timeout_s,
        min_upload_bytes_per_s=settings.min_upload_bytes_per_s,
        merge_clip=settings.merge_clip,
    )
    tokenizer_digest = run.prepared.manifest.tokenizer_digest

    def manifest_extra() -> dict[str, object]:
        return {
            "data_plan": run.plan,
            "schedule": run.schedule,
            "tokenizer_kind": settings.tokenizer,
            "tokenizer_digest": tokenizer_digest,
            "preset": settings.preset,
        }

    epochs = EpochDriver(
        settings.run_id,
        run.model,
        run.stages,
        state,
        scheduler,
        store,
        epoch_settings,
        manifest_extra,
        run.micro_batch_tokens,
    )
    keep = RetentionSettings(settings.keep_epochs, settings.keep_checkpoints, settings.url_ttl_s)
    epochs.checkpoints.retention = Retention(settings.run_id, state, store, keep)
    with state.transaction():
        epochs.initialize(time.time())
        state.resume(time.time(), settings.lease_s)
    limits = Limits(
        activation_bytes=act_bytes,
        url_ttl_s=settings.url_ttl_s,
        # Held well inside the silence after which a miner is declared gone.
        max_hold_s=min(settings.max_hold_s, settings.miner_timeout_s / 3),
    )
    lookup = cached_lookup(chain)
    abuse = AbusePolicy(state, scheduler, exempt=[settings.operator_hotkey])
    epochs.strike = abuse.strike  # a worker whose upload or apply lease lapses
    epochs.distrusted = abuse.unwaited  # not waited for at the end of an epoch
    orchestrator = Orchestrator(
        info,
        state,
        scheduler,
        store,
        epochs,
        limits,
        uid_of=lambda hk: n.uid if (n := lookup(hk)) else None,
        abuse=abuse,
        challenge_rate=settings.snapshot_rate,
    )
    orchestrator.auditor = Auditor(
        info,
        state,
        scheduler,
        store,
        epochs.plan,
        epochs.data_urls,
        settings.url_ttl_s,
        confirm_wait_s=settings.confirm_wait_s,
        challenges=orchestrator.challenges,
    )
    rechecker = None
    if settings.recheck:
        rechecker = Rechecker(orchestrator.auditor, info, state, store, run.batch, orchestrator.challenges)
        rechecker.start()
    # One process serves the run, so its nonces are decided in memory, with no write on each request's path, and
    # journaled to the run directory so that a restarted orchestrator still refuses them.
    nonces = JournaledNonceStore(run_dir / "nonces.sqlite")
    authenticator = Authenticator(
        receiver_hotkey=hotkey,
        lookup=lookup,
        nonce_store=nonces,
        operator_hotkey=settings.operator_hotkey or None,
        min_stake=settings.min_validator_stake,
        hotkey_limiter=RateLimiter(settings.rate_per_hotkey, burst=2 * settings.rate_per_hotkey),
    )
    proxies = tuple(p for p in settings.trusted_proxies.split(",") if p)
    app = create_app(
        orchestrator,
        authenticator,
        local_store=local_store,
        rate_per_ip=settings.rate_per_ip,
        trusted_proxies=proxies,
        max_in_progress=settings.max_requests_in_progress,
        # Nothing a call does waits on the network: SQLite, this process's store, a chain file.
        inline_calls=state.db.dialect == "sqlite" and store is local_store and settings.chain == "local",
        on_shutdown=nonces.close,
    )
    logger.info(
        "run {}: {} stages of {} ({} params), epoch {}, phase {}",
        settings.run_id,
        len(run.stages),
        settings.preset,
        sum(st.n_params for st in info.stages),
        scheduler.epoch,
        scheduler.phase,
    )
    return Assembled(app, orchestrator, run, rechecker)
