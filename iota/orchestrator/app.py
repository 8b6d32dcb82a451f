"""The orchestrator's app factory, and the assembly of its parts from settings (the `iota orchestrator` entry)."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger

from iota.auth import Authenticator, JournaledNonceStore, RateLimiter, install_auth
from iota.chain.base import Chain, Neuron
from iota.config import OrchestratorSettings
from iota.merge import OuterConfig
from iota.model import wire
from iota.orchestrator.abuse import AbusePolicy, BodyLimitMiddleware, guarded_http
from iota.orchestrator.audits import Auditor
from iota.orchestrator.epochs import EpochDriver, EpochSettings
from iota.orchestrator.recheck import Rechecker
from iota.orchestrator.routes import dashboard, miners, run, validators
from iota.orchestrator.routes.deps import CallRunner
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
MAX_HEADER_BYTES = 64 * 1024  # request line and headers: a signed request needs under 1 KiB

# A second drains a queue of Admission's length many times over; refused clients are told one of these at random,
# so that those refused together do not all come back together.
OVERLOADED_RETRY_S = (1, 2, 3)


def _overloaded(retry_s: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The answer to a request refused because too many are in progress (Admission), prepared once."""
    body = json.dumps(
        {
            "detail": {
                "code": "overloaded",
                "message": f"the orchestrator is at capacity; retry in {retry_s} s",
            }
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_s).encode()),
    ]
    return headers, body


OVERLOADED = [_overloaded(s) for s in OVERLOADED_RETRY_S]


def create_app(
    orchestrator: Orchestrator,
    authenticator: Authenticator,
    *,
    local_store: LocalStore | None = None,
    rate_per_ip: float = 0.0,
    trusted_proxies: tuple[str, ...] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
    max_in_progress: int = 0,
    inline_calls: bool = False,
    on_shutdown: Callable[[], None] = lambda: None,
) -> FastAPI:
    """The orchestrator's HTTP API. ``max_in_progress`` > 0 bounds the requests in progress (see Admission);
    ``inline_calls``: the orchestrator's backends are all in this process, so its calls run on the event loop (see
    CallRunner); ``on_shutdown`` runs when the server stops, after the last call into the orchestrator."""
    runner = CallRunner(inline=inline_calls)

    async def sweep_while_held() -> None:
        """Leases expire and miners time out on a sweep, which requests trigger; while requests are held (and so
        perhaps no others come) they are swept on a timer, so that requeued work reaches the held ones."""
        doorbell = orchestrator.scheduler.doorbell
        while True:
            await asyncio.sleep(orchestrator.limits.sweep_interval_s)
            if doorbell.held:
                try:
                    await runner.run(orchestrator.sweep, orchestrator.clock())
                except Exception:  # noqa: BLE001 (the timer must outlive a failed sweep: logged, retried)
                    logger.exception("sweep failed; retrying in {} s", orchestrator.limits.sweep_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(sweep_while_held())
        yield
        sweeper.cancel()
        runner.close()
        on_shutdown()

    app = FastAPI(
        title="iota orchestrator",
        version="1",
        description="Routes work between miners and validators.",
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry looks its providers up on every request (a share of the CPU under load);
        # the orchestrator's own figures are at GET /metrics.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.orchestrator = orchestrator
    app.state.call_runner = runner
    # Added before install_auth, so it sits inside the per-IP limit: a flood is turned away before this.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, exempt_prefixes=(STORAGE_PREFIX + "/",))
    app.state.admission = None
    if max_in_progress > 0:
        # Outside the body limit and the routes (a refusal costs neither), inside the per-IP limit.
        # A miner whose requests are refused is not silent: the scheduler holds off timing miners out meanwhile.
        scheduler = orchestrator.scheduler
        app.state.admission = Admission(
            max_in_progress,
            exempt=finishes_work,
            on_refusal=lambda: scheduler.refused_for_load(orchestrator.clock()),
        )
        # Object transfers are not the orchestrator's work and may take long on a slow link (an upload of a
        # leased item's output): neither counted nor refused.
        app.add_middleware(
            AdmissionMiddleware, admission=app.state.admission, skip_prefixes=(STORAGE_PREFIX + "/",)
        )
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
        runner: CallRunner = request.app.state.call_runner
        await runner.run(orchestrator.abuse.strike, hotkey, why, orchestrator.clock())
    assert isinstance(error, RequestValidationError)
    return await request_validation_exception_handler(request, error)


def finishes_work(path: str) -> bool:
    """Requests that complete work already handed out (a report, a release, leaving): refusing them under load
    would waste that work, since its lease runs out and the sample restarts."""
    return path.endswith(("/report", "/release")) or path == "/miners/leave"


class Admission:
    """A bound on the requests in progress: once ``max_in_progress`` are, further ones are refused (503 with
    Retry-After, by ``AdmissionMiddleware``) at once, before their body is read or their signature checked.

    An overloaded server that queues every request answers each one later, until answers come after the client's
    timeout: miners are then declared gone, their samples restart and they register again, which adds work just
    when there is none to spare. Refusing the excess early keeps the answered requests fast, and the miner client
    backs off on 503. Requests for which ``exempt(path)`` holds (those that finish work already handed out) are
    counted but never refused.
    """

    def __init__(
        self,
        max_in_progress: int,
        exempt: Callable[[str], bool] = lambda _: False,
        on_refusal: Callable[[], None] = lambda: None,
    ) -> None:
        if max_in_progress < 1:
            raise ValueError(f"max_in_progress must be at least 1, got {max_in_progress}")
        self.max_in_progress = max_in_progress
        self.exempt = exempt
        self.on_refusal = on_refusal
        self.in_progress = 0  # touched only on the event loop: no lock
        self.refused = 0

    def admit(self, path: str) -> bool:
        """Whether a request for ``path`` may go in now; a refusal is counted and reported to ``on_refusal``."""
        if self.in_progress < self.max_in_progress or self.exempt(path):
            return True
        self.refused += 1
        self.on_refusal()
        return False

    def metrics(self) -> str:
        return (
            f"iota_requests_in_progress {self.in_progress}\n"
            f"iota_requests_in_progress_limit {self.max_in_progress}\n"
            f"iota_requests_refused_overloaded_total {self.refused}\n"
        )


class AdmissionMiddleware:
    """ASGI middleware applying an ``Admission``; paths under ``skip_prefixes`` are neither counted nor refused."""

    def __init__(self, app: Any, admission: Admission, skip_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.admission = admission
        self.skip_prefixes = skip_prefixes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.skip_prefixes):
            await self.app(scope, receive, send)
            return
        admission = self.admission
        if not admission.admit(scope.get("path", "")):
            # No need to close the connection: the server discards the unread body of an answered request.
            headers, body = random.choice(OVERLOADED)
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        admission.in_progress += 1
        try:
            # Yield once before serving: requests that reached the server together are all counted before the
            # first is served, even where serving one never waits (CallRunner inline), so a backlog shows.
            await asyncio.sleep(0)
            await self.app(scope, receive, send)
        finally:
            admission.in_progress -= 1


def server_options(
    settings: OrchestratorSettings,
    *,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP,
    max_connections: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run(app, **server_options(settings))``: the address, and the limits that keep
    slow or crowding clients (slowloris) from starving the others; see iota.orchestrator.abuse.guarded_http."""
    proxies = [p for p in settings.trusted_proxies.split(",") if p.strip()]
    if max_connections is None:
        max_connections = settings.max_connections
    return {
        "host": settings.host,
        "port": settings.port,
        "http": guarded_http(header_timeout_s, max_connections_per_ip, exempt=proxies),
        "timeout_keep_alive": KEEP_ALIVE_S,
        "limit_concurrency": max_connections,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "backlog": max_connections,
        "date_header": False,  # ServerHeadersMiddleware writes Date from the verifier's clock
        # The client address stays the connection's peer: iota.auth reads X-Forwarded-For itself, from the
        # configured trusted proxies only (uvicorn would trust any local process's header, and costs a layer).
        "proxy_headers": False,
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
