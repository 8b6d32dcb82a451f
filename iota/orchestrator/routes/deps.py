"""What every route needs: the orchestrator behind the app, and refusals turned into HTTP errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from iota.orchestrator.scheduler import SchedulingError
from iota.orchestrator.service import Orchestrator


def orchestrator(request: Request) -> Orchestrator:
    return request.app.state.orchestrator  # type: ignore[no-any-return]


Orch = Annotated[Orchestrator, Depends(orchestrator)]


@contextmanager
def refusals() -> Iterator[None]:
    """A SchedulingError becomes its HTTP status with the scheduler's reason; nothing was changed."""
    try:
        yield
    except SchedulingError as error:
        raise HTTPException(error.status, detail=error.detail) from error
