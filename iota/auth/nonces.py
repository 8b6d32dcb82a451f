"""Replay protection: remember every accepted (hotkey, nonce) until its timestamp has left the freshness window.

The nonce of a signed request is its nanosecond timestamp (``btauth/1``), so an entry can be forgotten as soon as
``now - nonce`` exceeds the retention: a request that old is refused as stale before the store is asked. Every
store satisfies ``bittensor.http_auth.NonceStore`` and exposes ``retention`` (seconds), which ``http_auth.verify``
checks against the freshness window: ``MemoryNonceStore`` (one process, forgotten on exit), ``JournaledNonceStore``
(one server process, kept in a file across restarts, no write per request) and ``SqliteNonceStore`` (a file that
several worker processes share, one write per request).
"""

from __future__ import annotations

import heapq
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

DEFAULT_RETENTION_S = 60.0
"""Comfortably longer than the default window (10 s back, 2 s ahead); only the stale check bounds how long a nonce
matters, so a longer retention costs a few rows and nothing else."""


class NonceStore(Protocol):
    """Accepted (hotkey, nonce) pairs; ``check_and_store`` is True the first time a pair is seen, False after."""

    retention: float

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool: ...


class MemoryNonceStore:
    """One process's nonces, in memory: for tests and single-process tools (a restart forgets everything).

    Entries leave in nonce order through a heap, so a check costs O(log n) however many are remembered.
    """

    def __init__(
        self, retention_s: float = DEFAULT_RETENTION_S, clock: Callable[[], float] = time.time
    ) -> None:
        self.retention = retention_s
        self._clock = clock
        self._seen: set[tuple[str, int]] = set()
        self._by_age: list[tuple[int, str]] = []  # (nonce, hotkey), a min-heap
        self._lock = threading.Lock()

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        key = (hotkey_ss58, nonce_ns)
        with self._lock:
            self._prune()
            if key in self._seen:
                return False
            self._seen.add(key)
            heapq.heappush(self._by_age, (nonce_ns, hotkey_ss58))
            return True

    def __len__(self) -> int:
        return len(self._seen)

    def _prune(self) -> None:
        cutoff_ns = int((self._clock() - self.retention) * 1e9)
        while self._by_age and self._by_age[0][0] < cutoff_ns:
            nonce_ns, hotkey = heapq.heappop(self._by_age)
            self._seen.discard((hotkey, nonce_ns))


class JournaledNonceStore(MemoryNonceStore):
    """One server process's nonces in memory, journaled in batches to a sqlite file so a restart still refuses them.

    Memory decides, so a request costs no database write: accepted nonces are written to the file (the same table
    as SqliteNonceStore's) in one transaction at the first check ``flush_every_s`` after the last write, and on
    ``close``; a new store reads the unexpired ones back. A crash can lose the last batch; a request of it replayed
    after the restart is still refused by the Authenticator's server-start check (it was signed before the start),
    unless the clock was set back across the restart. Only for a server of one process (the orchestrator): worker
    processes that must see each other's nonces at once share a SqliteNonceStore instead.
    """

    def __init__(
        self,
        path: str | Path,
        retention_s: float = DEFAULT_RETENTION_S,
        clock: Callable[[], float] = time.time,
        flush_every_s: float = 0.1,
    ) -> None:
        super().__init__(retention_s, clock)
        self.path = Path(path)
        self._flush_every_s = flush_every_s
        self._pending: list[tuple[str, int]] = []
        self._last_flush = clock()
        self._db = _open_nonce_file(self.path)
        cutoff_ns = int((clock() - retention_s) * 1e9)
        for hotkey, nonce_ns in self._db.execute(
            "SELECT hotkey, nonce FROM nonces WHERE nonce >= ?", (cutoff_ns,)
        ):
            self._seen.add((str(hotkey), int(nonce_ns)))
            self._by_age.append((int(nonce_ns), str(hotkey)))
        heapq.heapify(self._by_age)

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        accepted = super().check_and_store(hotkey_ss58, nonce_ns)
        with self._lock:
            if accepted:
                self._pending.append((hotkey_ss58, nonce_ns))
            if self._clock() - self._last_flush >= self._flush_every_s:
                self._flush()
        return accepted

    def flush(self) -> None:
        """Write the nonces accepted since the last write, and forget expired ones in the file."""
        with self._lock:
            self._flush()

    def close(self) -> None:
        with self._lock:
            self._flush()
            self._db.close()

    def _flush(self) -> None:
        now = self._clock()
        self._last_flush = now
        pending, self._pending = self._pending, []
        cutoff_ns = int((now - self.retention) * 1e9)
        with self._db:  # one transaction
            self._db.executemany("INSERT OR IGNORE INTO nonces (hotkey, nonce) VALUES (?, ?)", pending)
            self._db.execute("DELETE FROM nonces WHERE nonce < ?", (cutoff_ns,))


def _open_nonce_file(
    path: Path, isolation_level: Literal["DEFERRED", "IMMEDIATE", "EXCLUSIVE"] | None = "DEFERRED"
) -> sqlite3.Connection:
    """The nonce table in a sqlite file (WAL), created if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=10.0, isolation_level=isolation_level, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS nonces ("
        " hotkey TEXT NOT NULL, nonce INTEGER NOT NULL, PRIMARY KEY (hotkey, nonce)) WITHOUT ROWID"
    )
    db.execute("CREATE INDEX IF NOT EXISTS nonces_by_time ON nonces (nonce)")
    db.commit()
    return db


class SqliteNonceStore:
    """Nonces in a sqlite file (WAL), shared by every worker process of a server and surviving its restarts.

    The uniqueness is the table's primary key, so two workers racing on the same nonce cannot both win: exactly one
    ``INSERT OR IGNORE`` changes a row. Rows older than the retention are deleted every ``prune_every_s``.
    ``synchronous=NORMAL`` keeps a committed nonce across a process crash (not necessarily across a power loss,
    after which every old request is stale anyway: the server restarts after the window has passed).
    """

    def __init__(
        self,
        path: str | Path,
        retention_s: float = DEFAULT_RETENTION_S,
        clock: Callable[[], float] = time.time,
        prune_every_s: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.retention = retention_s
        self._clock = clock
        self._prune_every_s = prune_every_s
        self._last_prune = float("-inf")
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, each statement its own transaction; the lock serialises threads.
        self._db = _open_nonce_file(self.path, isolation_level=None)

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        with self._lock:
            self._maybe_prune()
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO nonces (hotkey, nonce) VALUES (?, ?)", (hotkey_ss58, nonce_ns)
            )
            return cursor.rowcount == 1

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM nonces").fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _maybe_prune(self) -> None:
        now = self._clock()
        if now - self._last_prune < self._prune_every_s:
            return
        self._last_prune = now
        cutoff_ns = int((now - self.retention) * 1e9)
        self._db.execute("DELETE FROM nonces WHERE nonce < ?", (cutoff_ns,))
