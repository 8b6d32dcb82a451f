"""What leases that lapsed cost their holder (docs/security.md, "Lease hoarding"), kept for the scheduler.

Each lapse halves the miner's next lease terms until it completes hops again, puts the forward item it held on
offer to the stage's other miners first for a lease term, and is queued to be charged as a strike by the service
(a strike may ban, and a ban requeues work: it cannot happen inside the scheduler's sweep). Kept in memory, not in
the database: a restarted orchestrator gives every miner full terms again, which costs one full term per lease a
miner may hold; the strikes themselves are durable (iota.orchestrator.abuse).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator


class Lapses:
    def __init__(self, lease_s: float, halvings: int):
        self.lease_s, self.halvings = lease_s, halvings
        self._owed: dict[str, int] = {}  # hotkey -> leases that lapsed, less the hops it completed since
        self._offered: dict[
            int, tuple[str, float]
        ] = {}  # forward item -> (who it lapsed with, offered until)
        self._unpaid: deque[tuple[str, str]] = deque()  # (hotkey, why) of lapses not yet charged as strikes

    def record(self, hop_id: int, hotkey: str, forward: bool, now: float) -> None:
        self._owed[hotkey] = self._owed.get(hotkey, 0) + 1
        if forward:
            self._offered[hop_id] = (hotkey, now + self.lease_s)
        self._unpaid.append((hotkey, f"the lease of work item {hop_id} lapsed unreported"))

    def repaid(self, hotkey: str) -> None:
        """A completed hop repays one lapse."""
        if self._owed.get(hotkey):
            self._owed[hotkey] -= 1

    def term(self, hotkey: str) -> float:
        """``lease_s``, halved per lapse the miner has not repaid, down to lease_s / 2**halvings."""
        return self.lease_s / 2 ** min(self._owed.get(hotkey, 0), self.halvings)

    def lapsed_with(self, hop_id: int, hotkey: str, now: float | None = None) -> bool:
        """The item lapsed in this miner's lease (and, with ``now``, is still offered to others first)."""
        holder, until = self._offered.get(hop_id, ("", 0.0))
        return holder == hotkey and (now is None or until > now)

    def expire(self, now: float) -> None:
        self._offered = {h: offered for h, offered in self._offered.items() if offered[1] > now}

    def unpaid(self) -> Iterator[tuple[str, str]]:
        """(hotkey, why) of each lapse not yet charged as a strike, each once."""
        while self._unpaid:
            try:
                yield self._unpaid.popleft()
            except IndexError:  # another thread took the last one
                return
