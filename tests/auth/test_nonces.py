"""Nonce stores: first use wins, a second use fails (also from another connection), old entries are pruned."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from iota.auth import MemoryNonceStore, SqliteNonceStore
from tests.auth import FakeClock

T0 = 1_800_000_000.0


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_nonce_accepted_once_per_hotkey(kind: str, tmp_path: Path) -> None:
    clock = FakeClock(T0)
    store = (
        MemoryNonceStore(clock=clock)
        if kind == "memory"
        else SqliteNonceStore(tmp_path / "n.sqlite", clock=clock)
    )
    assert store.check_and_store("alice", ns(T0))
    assert not store.check_and_store("alice", ns(T0))
    assert store.check_and_store("bob", ns(T0))  # the same nonce from another hotkey is its own
    assert store.check_and_store("alice", ns(T0) + 1)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_entries_older_than_retention_are_pruned(kind: str, tmp_path: Path) -> None:
    clock = FakeClock(T0)
    if kind == "memory":
        store: MemoryNonceStore | SqliteNonceStore = MemoryNonceStore(retention_s=60, clock=clock)
    else:
        store = SqliteNonceStore(tmp_path / "n.sqlite", retention_s=60, clock=clock, prune_every_s=0)
    for i in range(5):
        store.check_and_store("alice", ns(T0) + i)
    clock.now = T0 + 61
    store.check_and_store("alice", ns(clock.now))
    assert len(store) == 1


def test_sqlite_store_is_shared_by_connections_racing_on_one_nonce(tmp_path: Path) -> None:
    # Eight "workers" (one connection each) race to accept the same nonce: exactly one may win.
    path = tmp_path / "n.sqlite"
    stores = [SqliteNonceStore(path) for _ in range(8)]
    nonce = ns(T0)
    results: list[bool] = []
    barrier = threading.Barrier(len(stores))

    def accept(store: SqliteNonceStore) -> None:
        barrier.wait()
        results.append(store.check_and_store("alice", nonce))

    threads = [threading.Thread(target=accept, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]


def test_sqlite_store_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "run" / "nonces.sqlite"  # the run directory need not exist yet
    nonce = time.time_ns()
    first = SqliteNonceStore(path)
    assert first.check_and_store("alice", nonce)
    first.close()
    assert not SqliteNonceStore(path).check_and_store("alice", nonce)
