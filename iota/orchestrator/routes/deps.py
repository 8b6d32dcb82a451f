"""What every route needs: the orchestrator behind the app, and refusals turned into HTTP errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request

from iota.auth.ratelimit import retry_after_header
from iota.orchestrator.scheduler import SchedulingError
from iota.orchestrator.service import Orchestrator


def orchestrator(request: Request) -> Orchestrator:
    return request.app.state.orchestrator  # type: ignore[no-any-return]


Orch = Annotated[Orchestrator, Depends(orchestrator)]

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
