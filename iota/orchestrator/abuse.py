"""Defence against hostile callers that authenticate: strikes that throttle, then ban, a hotkey.

Anyone on the internet reaches the orchestrator, registered miners and validators included. A refusal that is the
caller's fault (``SchedulingError(fault=True)``: a report for an item it was never leased, an output that is not
what it uploaded, a malformed body) is a *strike* against its hotkey. ``throttle_at`` strikes within ``window_s``
slow the hotkey to one request every ``throttle_interval_s``; ``ban_at`` ban it from the run (the ``banned`` column
of miners and an ``abuse_bans`` row, with a ``ban`` event in the operator's log). Strikes live in the state
database, so a restart forgets nothing. Honest miners lose races too: a report that arrives after its lease expired
and the item went to someone else cannot be told from a claim on someone else's item. An honest miner loses at
most one such race per lease term (``lease_s``, 60 s by default), so at most 10 in the default window, well under
``throttle_at``.

A lease that lapses unreported is a strike too (Orchestrator._charging_lapses): leasing work and sitting on it
(hoarding) would otherwise cost nothing, since a miner that never completes a hop is never audited. Its holder also
gets shorter leases and a cap on leases held (iota.orchestrator.scheduler). An honest miner lets a lease lapse only
when it is cut off or far slower than ``lease_s``: a few strikes, forgotten after ``window_s`` (and the late
report of a lapsed item is no second strike). A hoarder holding its cap of 4 leases is struck 4 times per term
while its terms halve to ``lease_s / 8``, so it is banned within a few minutes.

A miner is also struck for an output the next stage found bad, but never on that miner's word: the orchestrator
first checks the claim against the store (Orchestrator._bad_input), and a claim the store contradicts strikes the
one who made it instead.

Before a caller is authenticated, the HTTP guards (iota.orchestrator.guards) bound request bodies and slow or
crowding connections.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from loguru import logger

from iota.auth.ratelimit import RateLimiter
from iota.orchestrator.scheduler import Scheduler, SchedulingError
from iota.orchestrator.state import StateStore


@dataclass(frozen=True)
class AbuseConfig:
    window_s: float = 600.0  # strikes older than this are forgotten
    waited_until: int = 5  # strikes in the window past which the end of an epoch no longer waits for a miner
    throttle_at: int = 20  # strikes in the window that put a hotkey on the slow lane
    ban_at: int = 50  # strikes in the window that ban it from the run
    throttle_interval_s: float = 5.0  # a throttled hotkey gets one request through this often

    def __post_init__(self) -> None:
        if not 0 < self.throttle_at <= self.ban_at:
            raise ValueError(f"need 0 < throttle_at <= ban_at, got {self.throttle_at} and {self.ban_at}")
        if self.window_s <= 0 or self.throttle_interval_s <= 0:
            raise ValueError("window_s and throttle_interval_s must be positive")


class AbusePolicy:
    """Strikes per hotkey in a sliding window, kept in the state database; throttles, then bans.

    ``exempt`` hotkeys (the operator's) are never struck. Times are passed in (``now``), the orchestrator's clock.
    """

    def __init__(
        self,
        state: StateStore,
        scheduler: Scheduler,
        config: AbuseConfig | None = None,
        exempt: Iterable[str] = (),
    ) -> None:
        self.state = state
        self.scheduler = scheduler
        self.config = config or AbuseConfig()
        self.exempt = frozenset(h for h in exempt if h)
        # The database is the record (state.abuse); these caches spare a query on every request (one orchestrator
        # process writes the state, so they cannot go stale behind its back).
        self._recent: dict[str, deque[float]] = {}
        self._bans = state.abuse.bans()
        self._lock = threading.Lock()  # route handlers run in a thread pool
        self._slow_lane = RateLimiter(1.0 / self.config.throttle_interval_s, burst=1.0)

    # -- asked on every request ---------------------------------------------------------------------------

    def admit(self, hotkey: str, now: float) -> float:
        """0.0 if ``hotkey`` may be served now, else the seconds a throttled hotkey must wait; 403 if banned."""
        ban = self.ban_reason(hotkey)
        if ban is not None:
            raise SchedulingError(403, f"hotkey {hotkey} is banned from this run: {ban}")
        if self.strikes(hotkey, now) < self.config.throttle_at:
            return 0.0
        return self._slow_lane.acquire(hotkey)

    def throttled(self, hotkey: str, now: float) -> bool:
        """On the slow lane or banned: a miner that takes no new samples."""
        return self.ban_reason(hotkey) is not None or self.strikes(hotkey, now) >= self.config.throttle_at

    def unwaited(self, hotkey: str, now: float) -> bool:
        """A miner the end of an epoch does not wait for: `waited_until` strikes in the window (an honest miner
        has none or one; a miner that sends bad outputs or malformed reports reaches it in a few requests)."""
        return self.ban_reason(hotkey) is not None or self.strikes(hotkey, now) >= self.config.waited_until

    def ban_reason(self, hotkey: str) -> str | None:
        return self._bans.get(hotkey)

    def strikes(self, hotkey: str, now: float) -> int:
        """Strikes against ``hotkey`` within the window ending at ``now``."""
        # May read the database: never while holding _lock (lock order: db, then _lock).
        recent = self._times(hotkey)
        with self._lock:
            while recent and recent[0] <= now - self.config.window_s:
                recent.popleft()
            return len(recent)

    # -- after a refusal that was the caller's fault -------------------------------------------------------

    def strike(self, hotkey: str, why: str, now: float) -> int:
        """Record one strike; throttle or ban on crossing a threshold. Returns the strikes in the window."""
        if hotkey in self.exempt:
            return 0
        banned = None
        self.strikes(hotkey, now)  # loads the cache before the insert, which it must not count twice
        with self.state.transaction():
            self.state.abuse.strike(hotkey, now, why[:500])
            self.state.abuse.forget_strikes(hotkey, through=now - self.config.window_s)
            recent = self._times(hotkey)
            with self._lock:
                recent.append(now)
            count = self.strikes(hotkey, now)
            logger.warning("strike {} against {}: {}", count, hotkey[:10], why)
            if count == self.config.throttle_at:
                self.state.log(now, "throttle", hotkey, strikes=count, why=why)
            if count >= self.config.ban_at and self.ban_reason(hotkey) is None:
                banned = f"{count} protocol violations in {self.config.window_s:.0f} s, last: {why}"
                self._ban(hotkey, banned, now)
        if banned is not None:
            self._bans[hotkey] = banned  # once committed
        return count

    def _ban(self, hotkey: str, why: str, now: float) -> None:
        self.state.abuse.ban(hotkey, now, why)
        if self.state.miner(hotkey) is not None:
            self.state.set_banned(hotkey, why)
            self.scheduler.miner_gone(hotkey, now, "banned")  # its open work goes back to the queue
        self.state.log(now, "ban", hotkey, why=why)
        logger.warning("banned {}: {}", hotkey, why)

    def forgive(self, hotkey: str) -> None:
        """The operator unbanned ``hotkey``: its strikes and ban are cleared."""
        with self.state.transaction():
            self.state.abuse.forgive(hotkey)
        with self._lock:
            self._recent.pop(hotkey, None)
        self._bans.pop(hotkey, None)

    def _times(self, hotkey: str) -> deque[float]:
        recent = self._recent.get(hotkey)
        if recent is None:
            loaded = deque(self.state.abuse.strike_times(hotkey))
            with self._lock:
                recent = self._recent.setdefault(hotkey, loaded)
        return recent
