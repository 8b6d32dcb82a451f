"""Admission control: a bound on the orchestrator's calls in progress, overall and per caller, the excess refused
at once (503 overall, 429 for one caller's share)."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, NoReturn

from fastapi import HTTPException

from iota.auth.ratelimit import parse_networks, retry_after_header, scope_client_ip

# A second drains a queue of Admission's length many times over; refused clients are told one of these at random,
# so that those refused together do not all come back together.
OVERLOADED_RETRY_S = (1, 2, 3)

# One caller's share of the bound: a hotkey may hold an eighth of it, an address (several miners on one machine,
# a few requests each) half. Neither can then keep the others out.
HOTKEY_SHARE = 8
ADDRESS_SHARE = 2


def finishes_work(path: str) -> bool:
    """Requests that complete work already handed out (a report, a release, leaving): refusing them under load
    would waste that work, since its lease runs out and the sample restarts."""
    return path.endswith(("/report", "/release")) or path == "/miners/leave"


class Admission:
    """A bound on the calls into the orchestrator in progress: once ``max_in_progress`` are, further ones are
    refused at once (503 with Retry-After); one hotkey may have ``per_hotkey`` of them and one client address
    ``per_address`` (429 beyond its share).

    A slot is taken by ``slot`` when a route calls into the orchestrator: after the request's body has been read
    (bounded and paced, iota.orchestrator.guards) and its signature checked, so a client that is slow, or that
    cannot sign, holds none. An overloaded server that queues every request answers each one later, until answers
    come after the client's timeout: miners are then declared gone, their samples restart and they register
    again, which adds work just when there is none to spare. Refusing the excess early keeps the answered requests
    fast, and the miner client backs off on 503 and 429. Requests for which ``exempt(path)`` holds (those that
    finish work already handed out) are counted but never refused. Only refusals for the overall bound are
    reported to ``on_refusal``: a caller over its own share is refused for what it does, not for the load.
    """

    def __init__(
        self,
        max_in_progress: int,
        exempt: Callable[[str], bool] = lambda _: False,
        on_refusal: Callable[[], None] = lambda: None,
        *,
        per_hotkey: int | None = None,
        per_address: int | None = None,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        if max_in_progress < 1:
            raise ValueError(f"max_in_progress must be at least 1, got {max_in_progress}")
        self.max_in_progress = max_in_progress
        self.per_hotkey = per_hotkey or math.ceil(max_in_progress / HOTKEY_SHARE)
        self.per_address = per_address or math.ceil(max_in_progress / ADDRESS_SHARE)
        self.exempt = exempt
        self.on_refusal = on_refusal
        self.trusted_proxies = parse_networks(trusted_proxies)
        # Touched only on the event loop: no lock.
        self.in_progress = 0
        self.by_hotkey: Counter[str] = Counter()
        self.by_address: Counter[str] = Counter()
        self.refused = 0  # for the overall bound
        self.refused_share = 0  # for a caller's share

    @asynccontextmanager
    async def slot(self, scope: Mapping[str, Any], hotkey: str | None) -> AsyncIterator[None]:
        """Hold a slot for the request of ``scope``, from the verified ``hotkey`` (None: a public read) while the
        block runs; refused with an HTTPException (503 or 429) when none is free for it."""
        address = scope_client_ip(scope, self.trusted_proxies)  # as the per-IP rate limit sees it
        self._admit(scope.get("path", ""), hotkey, address)
        self.in_progress += 1
        self.by_address[address] += 1
        if hotkey is not None:
            self.by_hotkey[hotkey] += 1
        try:
            # Yield once before serving: requests that reached this point together are all counted before the
            # first is served, even where serving one never waits (CallRunner inline), so a backlog shows.
            await asyncio.sleep(0)
            yield
        finally:
            self.in_progress -= 1
            _decrement(self.by_address, address)
            if hotkey is not None:
                _decrement(self.by_hotkey, hotkey)

    def _admit(self, path: str, hotkey: str | None, address: str) -> None:
        if self.exempt(path):
            return
        if self.in_progress >= self.max_in_progress:
            self.refused += 1
            self.on_refusal()
            retry_s = random.choice(OVERLOADED_RETRY_S)
            _refuse(503, "overloaded", f"the orchestrator is at capacity; retry in {retry_s} s", retry_s)
        if hotkey is not None and self.by_hotkey[hotkey] >= self.per_hotkey:
            self.refused_share += 1
            _refuse(
                429, "too_many_in_progress", f"{self.per_hotkey} requests of this hotkey are in progress", 1
            )
        if self.by_address[address] >= self.per_address:
            self.refused_share += 1
            _refuse(
                429, "too_many_in_progress", f"{self.per_address} requests of this address are in progress", 1
            )


def _refuse(status: int, code: str, message: str, retry_s: int) -> NoReturn:
    raise HTTPException(
        status, detail={"code": code, "message": message}, headers=retry_after_header(retry_s)
    )


def _decrement(counts: Counter[str], key: str) -> None:
    """Forget keys at zero, so the counters stay as small as the set of callers in progress."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]
