"""The orchestrator's HTTP app (`create_app`) and the options uvicorn serves it with (`server_options`).

Its assembly from settings: iota.orchestrator.assembly; its admission control: iota.orchestrator.admission.
What a stranger can make it hold: a body is read bounded and paced (iota.orchestrator.guards) before its
signature is checked, and only then may it take a slot of the bound on calls in progress; public reads are cached
(iota.orchestrator.routes.cache) and have a per-address budget of their own; a malformed body is a 422 that names
what is wrong without repeating it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger

from iota.auth import Authenticator, IPRateLimitMiddleware, RateLimiter, install_auth
from iota.config import OrchestratorSettings
from iota.orchestrator.admission import Admission, finishes_work
from iota.orchestrator.guards import BodyLimitMiddleware, guarded_http
from iota.orchestrator.metrics import Metrics, RequestMetricsMiddleware
from iota.orchestrator.routes import dashboard, miners, run, validators
from iota.orchestrator.routes.cache import Cache
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

# Reads anyone may make that cost more than a lookup: cached (routes.cache), and each address has this budget
# for them beside the general per-IP limit (a scraper every few seconds and a poller 4 times a second fit).
PUBLIC_READS = ("/scores", "/metrics", "/events")
PUBLIC_READS_PER_IP = 5.0


def create_app(
    orchestrator: Orchestrator,
    authenticator: Authenticator,
    *,
    local_store: LocalStore | None = None,
    rate_per_ip: float = 0.0,
    trusted_proxies: tuple[str, ...] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
    max_in_progress: int = 0,
    public_reads_per_ip: float = PUBLIC_READS_PER_IP,
    inline_calls: bool = False,
    on_shutdown: Callable[[], None] = lambda: None,
) -> FastAPI:
    """The orchestrator's HTTP API. ``max_in_progress`` > 0 bounds the calls in progress, overall and per caller
    (see Admission); ``public_reads_per_ip`` > 0 is each address's budget for PUBLIC_READS (requests a second);
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
    app.state.public_cache = Cache()
    # Added before install_auth, so they sit inside the per-IP limit: a flood is turned away before them.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, exempt_prefixes=(STORAGE_PREFIX + "/",))
    if public_reads_per_ip > 0:
        app.add_middleware(
            IPRateLimitMiddleware,
            limiter=RateLimiter(public_reads_per_ip, burst=4 * public_reads_per_ip),
            trusted_proxies=list(trusted_proxies),
            only_paths=PUBLIC_READS,
        )
    app.state.admission = None
    if max_in_progress > 0:
        # Slots are taken as routes call into the orchestrator (routes.deps.Served), after the signature check;
        # object transfers never call into it, so they take none. A miner whose requests are refused for load is
        # not silent: the scheduler holds off timing miners out meanwhile.
        scheduler = orchestrator.scheduler
        app.state.admission = Admission(
            max_in_progress,
            exempt=finishes_work,
            on_refusal=lambda: scheduler.refused_for_load(orchestrator.clock()),
            trusted_proxies=trusted_proxies,
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
    # Outermost: every request is timed, those refused by the limits above included. Its own registry: the tests
    # start several apps in one process.
    app.state.metrics = Metrics(orchestrator, app.state.admission)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
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
    """422 naming what is wrong (``refusal_of``); a malformed body from a verified hotkey is also a strike."""
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
    return refusal_of(error.errors())


# What a 422 says, bounded: a body of 10,000 wrong fields is not answered with 10,000 errors.
MAX_ERRORS_SHOWN = 8
MAX_ERROR_TEXT = 200
MAX_LOC_TEXT = 64  # our field names are short; a longer part is a caller's dict key


def refusal_of(errors: Sequence[Any]) -> JSONResponse:
    """The 422 for a request's validation ``errors``: where each is and what is wrong, never the value sent.

    FastAPI's own answer repeats each offending value (``input``, ``ctx``): a hostile caller's megabyte comes back
    to it, a value JSON cannot carry (NaN, Infinity) turns the answer into a 500, and a secret sent by mistake is
    echoed. Locations are truncated too, since a dict's keys are the caller's text.
    """
    shown = [
        {
            "type": str(e.get("type", ""))[:MAX_ERROR_TEXT],
            "loc": [p if isinstance(p, int) else str(p)[:MAX_LOC_TEXT] for p in e.get("loc", ())][:16],
            "msg": str(e.get("msg", ""))[:MAX_ERROR_TEXT],
        }
        for e in errors[:MAX_ERRORS_SHOWN]
    ]
    return JSONResponse({"detail": shown, "errors": len(errors)}, status_code=422)


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
