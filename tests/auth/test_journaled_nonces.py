"""JournaledNonceStore: decided in memory, written to its file in batches, and read back by a restarted server."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from iota.auth import JournaledNonceStore, SqliteNonceStore
from tests.auth import FakeClock

T0 = 1_800_000_000.0


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


def rows(path: Path) -> set[tuple[str, int]]:
    db = sqlite3.connect(path)
    try:
        return {(str(h), int(n)) for h, n in db.execute("SELECT hotkey, nonce FROM nonces")}
    finally:
        db.close()


def test_a_nonce_is_accepted_once_per_hotkey(tmp_path: Path) -> None:
    store = JournaledNonceStore(tmp_path / "n.sqlite", clock=FakeClock(T0))
    assert store.check_and_store("alice", ns(T0))
    assert not store.check_and_store("alice", ns(T0))
    assert store.check_and_store("bob", ns(T0))
    assert store.check_and_store("alice", ns(T0) + 1)


def test_nonces_reach_the_file_in_batches_and_on_close(tmp_path: Path) -> None:
    path, clock = tmp_path / "n.sqlite", FakeClock(T0)
    store = JournaledNonceStore(path, clock=clock, flush_every_s=1.0)
    store.check_and_store("alice", ns(T0))
    store.check_and_store("alice", ns(T0) + 1)
    assert rows(path) == set()  # no write on the request's path
    clock.now = T0 + 1.0
    store.check_and_store("bob", ns(T0) + 2)  # the first check a batch interval later writes the batch
    assert rows(path) == {("alice", ns(T0)), ("alice", ns(T0) + 1), ("bob", ns(T0) + 2)}
    store.check_and_store("carol", ns(T0) + 3)
    store.close()
    assert ("carol", ns(T0) + 3) in rows(path)


def test_a_restarted_store_refuses_what_the_last_one_accepted(tmp_path: Path) -> None:
    path, clock = tmp_path / "run" / "n.sqlite", FakeClock(T0)
    first = JournaledNonceStore(path, clock=clock)
    assert first.check_and_store("alice", ns(T0))
    first.close()
    second = JournaledNonceStore(path, clock=clock)
    assert not second.check_and_store("alice", ns(T0))
    assert second.check_and_store("alice", ns(T0) + 1)
    # The file is SqliteNonceStore's table: either store reads what the other wrote.
    second.close()
    assert not SqliteNonceStore(path, clock=clock).check_and_store("alice", ns(T0) + 1)


def test_expired_nonces_leave_memory_and_the_file(tmp_path: Path) -> None:
    path, clock = tmp_path / "n.sqlite", FakeClock(T0)
    store = JournaledNonceStore(path, retention_s=60, clock=clock, flush_every_s=0)
    for i in range(5):
        store.check_and_store("alice", ns(T0) + i)
    clock.now = T0 + 61
    store.check_and_store("alice", ns(clock.now))
    assert len(store) == 1
    assert rows(path) == {("alice", ns(clock.now))}
    store.close()
    assert len(JournaledNonceStore(path, retention_s=60, clock=clock)) == 1
