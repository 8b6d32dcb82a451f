"""Admission control: a bound on the orchestrator's requests in progress, the excess refused at once (503)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

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
