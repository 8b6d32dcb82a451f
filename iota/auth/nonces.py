"""Replay protection: remember every accepted (hotkey, nonce) until its timestamp has left the freshness window.

The nonce of a signed request is its nanosecond timestamp (``btauth/1``), so an entry can be forgotten as soon as
``now - nonce`` exceeds the retention: a request that old is refused as stale before the store is asked. Both
stores satisfy ``bittensor.http_auth.NonceStore`` and expose ``retention`` (seconds), which ``http_auth.verify``
checks against the freshness window.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

DEFAULT_RETENTION_S = 60.0
"""Comfortably longer than the default window (10 s back, 2 s ahead); only the stale check bounds how long a nonce
matters, so a longer retention costs a few rows and nothing else."""


class NonceStore(Protocol):
    """Accepted (hotkey, nonce) pairs; ``check_and_store`` is True the first time a pair is seen, False after."""

    retention: float

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool: ...


class MemoryNonceStore:
    """One process's nonces, in a dict: for tests and single-process tools (a restart forgets everything)."""

    def __init__(
        self, retention_s: float = DEFAULT_RETENTION_S, clock: Callable[[], float] = time.time
    ) -> None:
        self.retention = retention_s
        self._clock = clock
        self._seen: set[tuple[str, int]] = set()
        self._last_prune = float("-inf")
        self._lock = threading.Lock()

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        key = (hotkey_ss58, nonce_ns)
        with self._lock:
            self._prune()
            if key in self._seen:
                return False
            self._seen.add(key)
            return True

    def __len__(self) -> int:
        return len(self._seen)

    def _prune(self) -> None:
        now = self._clock()
        if now - self._last_prune < 1.0:  # a full scan per request would be quadratic under load
            return
        self._last_prune = now
        cutoff_ns = int((now - self.retention) * 1e9)
        self._seen = {key for key in self._seen if key[1] >= cutoff_ns}


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, each statement its own transaction; the lock serialises threads.
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS nonces ("
            " hotkey TEXT NOT NULL, nonce INTEGER NOT NULL, PRIMARY KEY (hotkey, nonce)) WITHOUT ROWID"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS nonces_by_time ON nonces (nonce)")

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
