"""The orchestrator's app factory, and the assembly of its parts from settings (the `iota orchestrator` entry)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger
from starlette.concurrency import run_in_threadpool

from iota.auth import Authenticator, RateLimiter, SqliteNonceStore, install_auth
from iota.chain.base import Chain, Neuron
from iota.config import OrchestratorSettings
from iota.merge import OuterConfig
from iota.model import wire
from iota.orchestrator.abuse import AbusePolicy, BodyLimitMiddleware, guarded_h11
from iota.orchestrator.audits import Auditor
from iota.orchestrator.epochs import EpochDriver, EpochSettings
from iota.orchestrator.recheck import Rechecker
from iota.orchestrator.routes import dashboard, miners, run, validators
from iota.orchestrator.scheduler import Policy, Scheduler
from iota.orchestrator.service import Limits, Orchestrator
from iota.orchestrator.state import Hop, StateStore
from iota.protocol import RunInfo, StageInfo
from iota.state.db import open_database
from iota.storage import LocalStore, ObjectStore, S3Store, keys, local_store_router
from iota.train.run import Run, build_run

STORAGE_PREFIX = "/storage"
MAX_BODY_BYTES = 1024 * 1024  # the largest JSON request (a report with its weight sketch) is a few KiB

# Limits against slow and crowding clients, for uvicorn.run (see server_options).
HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS_PER_IP = 64  # a machine with 8 GPUs runs 8 miners of about 2 connections each
MAX_CONNECTIONS = 2048  # beyond, uvicorn answers 503 at once (keep `ulimit -n` above it)
MAX_HEADER_BYTES = 64 * 1024  # request line and headers: a signed request needs under 1 KiB


def create_app(
    orchestrator: Orchestrator,
    authenticator: Authenticator,
    *,
    local_store: LocalStore | None = None,
    rate_per_ip: float = 0.0,
    trusted_proxies: tuple[str, ...] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    app = FastAPI(
        title="iota orchestrator", version="1", description="Routes work between miners and validators."
    )
    app.state.orchestrator = orchestrator
    # Added before install_auth, so it sits inside the per-IP limit: a flood is turned away before this.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, exempt_prefixes=(STORAGE_PREFIX + "/",))
    app.add_exception_handler(RequestValidationError, _malformed_request)
    limiter = RateLimiter(rate_per_ip, burst=2 * rate_per_ip) if rate_per_ip > 0 else None
    install_auth(
        app,
        authenticator,
        ip_limiter=limiter,
        trusted_proxies=trusted_proxies,
        ip_exempt_paths=(STORAGE_PREFIX,),
        date_header=True,
    )
    app.include_router(miners.router)
    app.include_router(run.router)
    app.include_router(run.control)
    app.include_router(dashboard.router)
    app.include_router(validators.router)
    app.include_router(validators.public)
    if local_store is not None:
        app.include_router(local_store_router(local_store), prefix=STORAGE_PREFIX)
    return app


async def _malformed_request(request: Request, error: Exception) -> JSONResponse:
    """422 as FastAPI answers it; a malformed body from a verified hotkey is also a strike against it."""
    hotkey = getattr(request.state, "caller_hotkey", None)
    orchestrator: Orchestrator = request.app.state.orchestrator
    if hotkey is None and request.method == "POST" and orchestrator.abuse is not None:
        # Unparseable JSON is refused before the route's dependencies verify the signature: verify it here.
        try:
            hotkey = (await request.app.state.authenticator.authenticate(request)).hotkey
        except HTTPException:
            hotkey = None  # not a verified caller: nobody to hold to account
    if hotkey is not None and orchestrator.abuse is not None:
        why = f"malformed request to {request.url.path}"
        await run_in_threadpool(orchestrator.abuse.strike, hotkey, why, orchestrator.clock())
    assert isinstance(error, RequestValidationError)
    return await request_validation_exception_handler(request, error)


def server_options(
    settings: OrchestratorSettings,
    *,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP,
    max_connections: int = MAX_CONNECTIONS,
) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run(app, **server_options(settings))``: the address, and the limits that keep
    slow or crowding clients (slowloris) from starving the others; see iota.orchestrator.abuse.guarded_h11."""
    proxies = [p for p in settings.trusted_proxies.split(",") if p.strip()]
    return {
        "host": settings.host,
        "port": settings.port,
        "http": guarded_h11(header_timeout_s, max_connections_per_ip, exempt=proxies),
        "timeout_keep_alive": KEEP_ALIVE_S,
        "limit_concurrency": max_connections,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "backlog": max_connections,
        "date_header": False,  # ServerHeadersMiddleware writes Date from the verifier's clock
        "log_level": "warning",
    }


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
    from iota.checkpoint import stage_tensor_lists

    sizes = [sum(_numel(shape) for _, shape in t) for t in stage_tensor_lists(run.model, run.stages)]
    return RunInfo(
        run_id=run_id,
        orchestrator_hotkey=hotkey,
        model=run.model.to_dict(),
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
        seed=s.seed,
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def upload_data(run: Run, run_id: str, store: ObjectStore, state: StateStore) -> None:
    """Put the prepared shards in the bucket once: heads, tails and validators fetch them by URL."""
    names = []
    for shard in run.plan.shards:
        key = keys.data_shard(run_id, shard.file)
        if store.head(key) is None:
            store.put(key, (run.prepared.directory / shard.file).read_bytes())
        names.append(shard.file)
    state.put("data_shards", names)


def cached_lookup(chain: Chain, ttl_s: float = 5.0) -> Callable[[str], Neuron | None]:
    """chain.neuron as a lookup in the whole registry, refreshed every `ttl_s`: auth runs on every request, and
    reading the registry once per interval (not once per hotkey) keeps that O(1) however many miners there are."""
    lock = threading.Lock()
    cache: dict[str, Neuron | None] = {}  # None: looked up since the refresh and not registered
    loaded_at = [float("-inf")]

    def lookup(hotkey: str) -> Neuron | None:
        now = time.monotonic()
        with lock:
            if now - loaded_at[0] > ttl_s:
                cache.clear()
                cache.update({n.hotkey: n for n in chain.neurons()})
                loaded_at[0] = now
            if hotkey in cache:
                return cache[hotkey]
        neuron = chain.neuron(
            hotkey
        )  # perhaps registered since the refresh; asked once per refresh either way
        with lock:
            cache[hotkey] = neuron
        return neuron

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
    info.flags.update(state.get("flags", {}))
    upload_data(run, settings.run_id, store, state)
    wire_dtype = wire.wire_dtype(settings.wire_dtype)
    act_bytes = wire.encoded_size((settings.micro_batch, run.model.seq_len, run.model.wire_width), wire_dtype)
    need = tuple(
        20 * st.n_params for st in info.stages
    )  # fp32 weights, grads, Adam moments, epoch-start copy

    def activation_key(hop: Hop, lease: int) -> str:
        serial = state.bump(
            "lease_serial"
        )  # unique per lease: a late upload under an old lease lands elsewhere
        return keys.activation(settings.run_id, hop.epoch, hop.sample_id, hop.stage, hop.direction, serial)  # type: ignore[arg-type]

    policy = Policy(
        n_stages=len(run.stages),
        samples_per_epoch=settings.samples_per_epoch,
        epochs=settings.epochs,
        max_in_flight=settings.max_in_flight,
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
    with state.transaction():
        epochs.initialize(time.time())
        state.resume(time.time(), settings.lease_s)
    limits = Limits(activation_bytes=act_bytes, url_ttl_s=settings.url_ttl_s)
    lookup = cached_lookup(chain)
    abuse = AbusePolicy(state, scheduler, exempt=[settings.operator_hotkey])
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
    authenticator = Authenticator(
        receiver_hotkey=hotkey,
        lookup=lookup,
        nonce_store=SqliteNonceStore(run_dir / "nonces.sqlite"),
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
