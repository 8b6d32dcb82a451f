"""What every route needs: the orchestrator behind the app, where its calls run, and refusals as HTTP errors."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Path, Query, Request

from iota.auth.ratelimit import retry_after_header
from iota.orchestrator.admission import Admission
from iota.orchestrator.doorbell import DROPPED, Ticket
from iota.orchestrator.scheduler import SchedulingError
from iota.orchestrator.service import Orchestrator

T = TypeVar("T")


class CallRunner:
    """Where the routes' calls into the orchestrator run: in arrival order, one at a time.

    Every call reads and writes the state behind one database lock, so a pool of threads would only queue on that
    lock, handing the GIL and the lock from thread to thread on every request. With ``inline`` (every backend is
    in this process: SQLite, a local store, a local chain) a call runs on the event loop itself, which costs no
    hand-over at all; otherwise calls run on one worker thread, so that a network round trip (Postgres, an S3
    HEAD, the chain) does not stop the event loop from parsing and authenticating the next requests meanwhile.
    """

    def __init__(self, inline: bool = False) -> None:
        self.inline = inline
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orchestrator")

    async def run(self, call: Callable[..., T], *args: object) -> T:
        """``call(*args)``, inline or on the worker thread."""
        if self.inline:
            return call(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(call, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Served:
    """What a route is handed: the orchestrator behind the app, the runner its calls go through, the bound on
    calls in progress (None: unbounded) and the request's ASGI scope (whose client that bound counts)."""

    orchestrator: Orchestrator
    runner: CallRunner
    admission: Admission | None = None
    scope: Mapping[str, Any] = field(default_factory=dict)

    async def run(self, call: Callable[..., T], *args: object) -> T:
        return await self._admitted(None, call, *args)

    async def serve(self, hotkey: str | None, call: Callable[..., T], *args: object) -> T:
        """``call(*args)`` inside ``refusals`` for the verified caller ``hotkey`` (None: no caller to hold to
        account)."""

        def guarded() -> T:
            with refusals(self.orchestrator, hotkey):
                return call(*args)

        return await self._admitted(hotkey, guarded)

    async def _admitted(self, hotkey: str | None, call: Callable[..., T], *args: object) -> T:
        """``call(*args)`` in a slot of the bound on calls in progress: taken here, once the body was read and the
        signature checked, so that slow or unsigned requests hold none (iota.orchestrator.admission)."""
        if self.admission is None:
            return await self.runner.run(call, *args)
        async with self.admission.slot(self.scope, hotkey):
            return await self.runner.run(call, *args)

    async def hold(self, ticket: Ticket, timeout_s: float) -> str | None:
        """Wait until the ticket is rung (why it was) or ``timeout_s`` passes (None). A held request costs the
        server nothing meanwhile, and holds no slot of the bound on calls in progress."""
        try:
            await asyncio.wait([asyncio.wrap_future(ticket.rung)], timeout=max(timeout_s, 0.0))
        finally:
            self.orchestrator.scheduler.doorbell.drop(ticket)  # resolves it, unless a ring came first
        why = ticket.rung.result()
        return None if why == DROPPED else why


async def served(request: Request) -> Served:
    state = request.app.state
    return Served(state.orchestrator, state.call_runner, state.admission, request.scope)


Orch = Annotated[Served, Depends(served)]

# Ids and epochs are BIGINT in the state database: a larger number is refused here (422), not by the driver (500).
MAX_ID = 2**63 - 1
ItemId = Annotated[int, Path(ge=0, le=MAX_ID, description="a work item's id")]
EpochNumber = Annotated[int, Query(ge=0, le=MAX_ID, description="the epoch the item belongs to")]


@contextmanager
def refusals(orch: Orchestrator | None = None, hotkey: str | None = None) -> Iterator[None]:
    """A SchedulingError becomes its HTTP status with the scheduler's reason; nothing was changed.

    Given the caller (``orch`` and its verified ``hotkey``), its abuse record is consulted first (a banned hotkey
    gets 403, a throttled one 429), and a refusal that is its fault counts as a strike against it.
    """
    abuse = orch.abuse if orch is not None else None
    try:
        if abuse is not None and hotkey is not None:
            wait_s = abuse.admit(hotkey, orch.clock())  # type: ignore[union-attr]
            if wait_s > 0:
                message = f"hotkey {hotkey} is throttled after repeated protocol violations; retry in {wait_s:.1f} s"
                raise HTTPException(429, detail=message, headers=retry_after_header(wait_s))
        yield
    except SchedulingError as error:
        if error.fault and abuse is not None and hotkey is not None:
            abuse.strike(hotkey, error.detail, orch.clock())  # type: ignore[union-attr]
        raise HTTPException(error.status, detail=error.detail) from error
