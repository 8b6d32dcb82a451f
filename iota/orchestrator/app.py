"""The orchestrator's HTTP app (`create_app`) and the options uvicorn serves it with (`server_options`).

Its assembly from settings: iota.orchestrator.assembly; its admission control: iota.orchestrator.admission."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger

from iota.auth import Authenticator, RateLimiter, install_auth
from iota.config import OrchestratorSettings
from iota.orchestrator.admission import Admission, AdmissionMiddleware, finishes_work
from iota.orchestrator.guards import BodyLimitMiddleware, guarded_http
from iota.orchestrator.routes import dashboard, miners, run, validators
from iota.orchestrator.routes.deps import CallRunner
from iota.orchestrator.service import Orchestrator
from iota.storage import LocalStore, local_store_router

STORAGE_PREFIX = "/storage"
MAX_BODY_BYTES = 1024 * 1024  # the largest JSON request (a report with its weight sketch) is a few KiB

# Limits against slow and crowding clients, for uvicorn.run (see server_options).
HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS_PER_IP = 64  # a machine with 8 GPUs runs 8 miners of about 2 connections each
MAX_HEADER_BYTES = 64 * 1024  # request line and headers: a signed request needs under 1 KiB


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


def server_options(
    settings: OrchestratorSettings,
    *,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP,
    max_connections: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run(app, **server_options(settings))``: the address, and the limits that keep
    slow or crowding clients (slowloris) from starving the others; see iota.orchestrator.guards.guarded_http."""
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
