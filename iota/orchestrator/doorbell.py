"""Wake held requests for work (long-poll POST /work) when work for them may be there.

A miner with nothing to do may ask the orchestrator to hold its request for work (``WorkRequest.hold_s``) instead
of being told to wait and asking again. A held request takes a `Ticket` and sleeps until the scheduler rings it:

- ``ring_stage(s)``: a forward hop was queued on stage s. It wakes one ticket, the oldest of those that would be
  given forward work (``on_stage``), since one hop feeds one miner: a hundred idle miners of a stage are not all
  woken to race for it.
- ``ring_miner(h)``: something for miner h alone: a backward hop bound to it, a freed place for a forward graph.
- ``answer_now(h)``: miner h is gone, or (``stale_only``) it reported or released an item, so what it asks for may
  have changed (its accumulation window closed, a lease of its limit freed): its held requests that would not be
  given forward work answer at once and the miner asks again. One that would is answered by a stage ring.
- ``ring_all()``: the run's state changed for everyone (a phase, a pause or resume, a stage's first miner).

A miner holds at most ``per_miner`` tickets (a miner with IOTA_PIPELINE_DEPTH d asks d times at once): a newer
request beyond that answers the miner's oldest at once. Rings come from inside calls into the orchestrator, which
run one at a time, and a ticket is taken inside the same call that found no work, so no ring falls between looking
for work and waiting for it. Thread-safe: with a database across the network the calls run on a worker thread while
held requests wait on the event loop.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

STAGE, MINER, NOW, ALL = "stage", "miner", "now", "all"  # why a ticket was rung
DROPPED = "dropped"  # the held request gave up waiting (timed out, or its client left)


@dataclass(eq=False)
class Ticket:
    hotkey: str
    stage: int
    on_stage: bool  # forward work queued on its stage would be given to it: it is woken by ring_stage
    rung: Future[str] = field(default_factory=Future)  # set to why it was rung


class Doorbell:
    def __init__(self, per_miner: int = 1) -> None:
        self.per_miner = per_miner
        self._lock = threading.Lock()
        # Insertion-ordered (oldest first): each miner's tickets, and each stage's that would take forward work.
        self._miners: dict[str, dict[Ticket, None]] = defaultdict(dict)
        self._stages: dict[int, dict[Ticket, None]] = defaultdict(dict)

    def ticket(self, hotkey: str, stage: int, on_stage: bool) -> Ticket:
        ticket = Ticket(hotkey, stage, on_stage)
        with self._lock:
            while len(self._miners[hotkey]) >= self.per_miner:
                self._settle(next(iter(self._miners[hotkey])), NOW)
            self._miners[hotkey][ticket] = None
            if on_stage:
                self._stages[stage][ticket] = None
        return ticket

    def ring_stage(self, stage: int) -> None:
        with self._lock:
            waiting = self._stages.get(stage)
            if waiting:
                self._settle(next(iter(waiting)), STAGE)

    def ring_miner(self, hotkey: str) -> None:
        self._ring(hotkey, MINER)

    def answer_now(self, hotkey: str, stale_only: bool = False) -> None:
        self._ring(hotkey, NOW, lambda ticket: not (stale_only and ticket.on_stage))

    def ring_all(self) -> None:
        with self._lock:
            for mine in list(self._miners.values()):
                for ticket in list(mine):
                    self._settle(ticket, ALL)

    def drop(self, ticket: Ticket) -> None:
        """The held request stops waiting: forget its ticket (a ring that came meanwhile is lost with it)."""
        with self._lock:
            self._settle(ticket, DROPPED)

    @property
    def held(self) -> int:
        with self._lock:
            return sum(len(mine) for mine in self._miners.values())

    def _ring(self, hotkey: str, why: str, which: Callable[[Ticket], bool] = lambda ticket: True) -> None:
        with self._lock:
            for ticket in list(self._miners.get(hotkey, ())):
                if which(ticket):
                    self._settle(ticket, why)

    def _settle(self, ticket: Ticket, why: str) -> None:
        """Under the lock: resolve the ticket once and forget it."""
        mine = self._miners.get(ticket.hotkey)
        if mine is not None:
            mine.pop(ticket, None)
            if not mine:
                del self._miners[ticket.hotkey]
        self._stages[ticket.stage].pop(ticket, None)
        if not ticket.rung.done():
            ticket.rung.set_result(why)
