"""The database layer and migrations, on SQLite and on a real PostgreSQL server."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from iota.state import (
    Database,
    IntegrityError,
    Migration,
    MigrationError,
    PostgresDatabase,
    SchemaTooNewError,
    SqliteDatabase,
    TransactionAborted,
    migrate,
    open_database,
    schema_version,
)
from iota.state.db import _to_pyformat

KV = "CREATE TABLE kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL)"


class Boom(Exception):
    pass


def test_execute_one_scalar(db: Database) -> None:
    db.execute("CREATE TABLE t (id BIGINT PRIMARY KEY, name TEXT, x DOUBLE PRECISION, blob BYTEA)")
    assert (
        db.execute("INSERT INTO t (id, name, x, blob) VALUES (?, ?, ?, ?)", (1, "a", 0.5, b"\x00\xff")) == []
    )
    db.executemany("INSERT INTO t (id, name, x) VALUES (?, ?, ?)", [(2, "b", 1.5), (3, "c", None)])
    assert db.execute("SELECT id, name FROM t ORDER BY id") == [(1, "a"), (2, "b"), (3, "c")]
    assert db.one("SELECT name, x, blob FROM t WHERE id = ?", (1,)) == ("a", 0.5, b"\x00\xff")
    assert db.one("SELECT name FROM t WHERE id = ?", (99,)) is None
    assert db.scalar("SELECT COUNT(*) FROM t") == 3
    assert db.scalar("SELECT x FROM t WHERE id = ?", (3,)) is None
    assert db.scalar("SELECT name FROM t WHERE id = ?", (99,)) is None
    with pytest.raises(ValueError, match="at most one row"):
        db.one("SELECT id FROM t")


def test_question_marks_and_percents_in_strings_are_not_placeholders(db: Database) -> None:
    db.execute(KV.replace("v BIGINT", "v TEXT"))
    db.execute("INSERT INTO kv (k, v) VALUES ('what?', ?)", ("100% sure? yes",))
    db.execute("INSERT INTO kv (k, v) VALUES (?, 'no?')  -- a comment? with 50%", ("why?",))
    assert db.one("SELECT v FROM kv WHERE k = 'what?'") == ("100% sure? yes",)
    assert db.scalar("SELECT v FROM kv WHERE k = ?", ("why?",)) == "no?"
    assert db.scalar("SELECT COUNT(*) FROM kv WHERE v LIKE '%?%' /* both? */") == 2
    assert db.scalar("SELECT 7 % 4") == 3


def test_placeholder_translation() -> None:
    assert _to_pyformat("SELECT ? , '?', \"a?\" -- ?\n, ?") == "SELECT %s , '?', \"a?\" -- ?\n, %s"
    assert _to_pyformat("SELECT 'it''s ?', ? /* ? */ % 2") == "SELECT 'it''s ?', %s /* ? */ %% 2"
    assert _to_pyformat("SELECT '50%'") == "SELECT '50%%'"


def test_transaction_commits_and_an_exception_rolls_back(db: Database) -> None:
    db.execute(KV)
    with db.transaction():
        db.execute("INSERT INTO kv VALUES ('a', 1)")
        db.execute("INSERT INTO kv VALUES ('b', 2)")
    with pytest.raises(Boom), db.transaction():
        db.execute("INSERT INTO kv VALUES ('c', 3)")
        db.execute("UPDATE kv SET v = 100 WHERE k = 'a'")
        raise Boom
    assert db.execute("SELECT k, v FROM kv ORDER BY k") == [("a", 1), ("b", 2)]
    # The database is usable after a rollback, on the same thread.
    with db.transaction():
        db.execute("INSERT INTO kv VALUES ('c', 3)")
    assert db.scalar("SELECT COUNT(*) FROM kv") == 3


def test_nested_transaction_joins_the_outer_one(db: Database) -> None:
    db.execute(KV)
    with pytest.raises(Boom), db.transaction():
        db.execute("INSERT INTO kv VALUES ('outer', 1)")
        with db.transaction():
            db.execute("INSERT INTO kv VALUES ('inner', 2)")
        # The inner block ended normally but is not committed: the outer failure undoes it too.
        raise Boom
    assert db.scalar("SELECT COUNT(*) FROM kv") == 0

    with db.transaction():
        db.execute("INSERT INTO kv VALUES ('outer', 1)")
        with pytest.raises(Boom), db.transaction():
            db.execute("INSERT INTO kv VALUES ('inner', 2)")
            raise Boom
        # A failed inner block undoes only its own writes; the outer one goes on and commits.
        with db.transaction(), db.transaction():
            db.execute("INSERT INTO kv VALUES ('deep', 3)")
    assert db.execute("SELECT k FROM kv ORDER BY k") == [("deep",), ("outer",)]


def test_integrity_error_is_portable_and_recoverable_in_a_nested_block(db: Database) -> None:
    db.execute(KV)
    db.execute("INSERT INTO kv VALUES ('a', 1)")
    with pytest.raises(IntegrityError):
        db.execute("INSERT INTO kv VALUES ('a', 2)")
    with db.transaction():
        with pytest.raises(IntegrityError), db.transaction():
            db.execute("INSERT INTO kv VALUES ('a', 3)")
        # On Postgres a failed statement poisons the transaction unless its savepoint was rolled back.
        db.execute("INSERT INTO kv VALUES ('b', 4)")
    assert db.execute("SELECT k, v FROM kv ORDER BY k") == [("a", 1), ("b", 4)]


def second_handle(db: Database) -> Database:
    """Another handle on the same database, as a second process would have."""
    if isinstance(db, SqliteDatabase):
        return SqliteDatabase(db.path)
    assert isinstance(db, PostgresDatabase)
    return PostgresDatabase(db.dsn)


def test_concurrent_read_modify_write_transactions_lose_no_update(db: Database) -> None:
    db.execute(KV)
    db.execute("INSERT INTO kv VALUES ('n', 0)")
    threads, increments = 8, 200
    errors: list[BaseException] = []
    other = second_handle(db)  # half the threads write through it: serialization must hold across handles

    def work(handle: Database) -> None:
        try:
            for _ in range(increments):
                with handle.transaction():
                    # Read, then write the value read: lost updates show up unless transactions serialize.
                    n = handle.scalar("SELECT v FROM kv WHERE k = 'n'")
                    handle.execute("UPDATE kv SET v = ? WHERE k = 'n'", (n + 1,))
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=work, args=(db if t % 2 else other,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    other.close()
    assert errors == []
    assert db.scalar("SELECT v FROM kv WHERE k = 'n'") == threads * increments


def test_a_swallowed_error_aborts_a_postgres_transaction_loudly(db: Database) -> None:
    db.execute(KV)

    def insert_twice() -> None:
        with db.transaction():
            db.execute("INSERT INTO kv VALUES ('a', 1)")
            with pytest.raises(IntegrityError):
                db.execute("INSERT INTO kv VALUES ('a', 2)")  # caught without a nested block around it

    if db.dialect == "postgres":
        # Postgres has aborted the transaction: COMMIT would silently roll back, so the layer says so.
        with pytest.raises(TransactionAborted):
            insert_twice()
        assert db.scalar("SELECT COUNT(*) FROM kv") == 0
    else:
        insert_twice()  # SQLite undoes only the failed statement
        assert db.scalar("SELECT COUNT(*) FROM kv") == 1


def test_on_conflict_upsert(db: Database) -> None:
    db.execute("CREATE TABLE m (hotkey TEXT PRIMARY KEY, stage BIGINT NOT NULL, seen BIGINT NOT NULL)")
    upsert = (
        "INSERT INTO m (hotkey, stage, seen) VALUES (?, ?, 1) "
        "ON CONFLICT (hotkey) DO UPDATE SET stage = excluded.stage, seen = m.seen + 1"
    )
    db.execute(upsert, ("h1", 0))
    db.execute(upsert, ("h1", 2))
    db.execute("INSERT INTO m VALUES ('h1', 9, 9) ON CONFLICT (hotkey) DO NOTHING")
    assert db.one("SELECT stage, seen FROM m WHERE hotkey = 'h1'") == (2, 2)

    db.upsert("m", {"hotkey": "h2", "stage": 1, "seen": 5}, key=["hotkey"])
    db.upsert("m", {"hotkey": "h2", "stage": 3, "seen": 6}, key=["hotkey"])
    assert db.execute("SELECT hotkey, stage, seen FROM m ORDER BY hotkey") == [("h1", 2, 2), ("h2", 3, 6)]
    db.execute("CREATE TABLE tags (hotkey TEXT, tag TEXT, PRIMARY KEY (hotkey, tag))")
    for _ in range(2):
        db.upsert("tags", {"hotkey": "h1", "tag": "fast"}, key=["hotkey", "tag"])  # key only: DO NOTHING
    assert db.execute("SELECT hotkey, tag FROM tags") == [("h1", "fast")]
    with pytest.raises(ValueError, match="identifier"):
        db.upsert("m; DROP TABLE m", {"hotkey": "x"}, key=["hotkey"])


def test_returning(db: Database) -> None:
    db.execute(KV)
    assert db.execute("INSERT INTO kv VALUES ('a', 1), ('b', 2) RETURNING k, v") == [("a", 1), ("b", 2)]
    with db.transaction():
        assert db.one("UPDATE kv SET v = v + 10 WHERE k = ? RETURNING v", ("b",)) == (12,)
    assert db.execute("DELETE FROM kv WHERE v < ? RETURNING k", (5,)) == [("a",)]


MIGRATIONS = [
    Migration(1, "kv", [KV, "INSERT INTO kv VALUES ('applied', 1)"]),
    (
        2,
        "events",
        [
            {
                "sqlite": "CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT NOT NULL)",
                "postgres": "CREATE TABLE events (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, what TEXT NOT NULL)",
            },
            "UPDATE kv SET v = v + 1 WHERE k = 'applied'",
        ],
    ),
]


def test_migrations_apply_once_and_are_idempotent(db: Database) -> None:
    assert schema_version(db) == 0
    assert migrate(db, MIGRATIONS[:1]) == 1
    assert migrate(db, MIGRATIONS) == 2
    assert migrate(db, MIGRATIONS) == 2
    assert migrate(db, MIGRATIONS[:2]) == 2
    # Each migration's statements ran exactly once (the counter would show a second run).
    assert db.scalar("SELECT v FROM kv WHERE k = 'applied'") == 2
    assert db.execute("SELECT version, name FROM schema_migrations ORDER BY version") == [
        (1, "kv"),
        (2, "events"),
    ]
    # The dialect-specific statement made an auto-increment key on either engine.
    assert db.execute("INSERT INTO events (what) VALUES ('x'), ('y') RETURNING id") == [(1,), (2,)]


def test_failed_migration_leaves_the_previous_version(db: Database) -> None:
    broken = [*MIGRATIONS, Migration(3, "broken", ["CREATE TABLE t3 (x BIGINT)", "THIS IS NOT SQL"])]
    with pytest.raises(Exception, match="(?i)syntax"):
        migrate(db, broken)
    assert schema_version(db) == 2
    # t3 was created in the failed migration's transaction, so it is gone with it.
    assert migrate(db, [*MIGRATIONS, Migration(3, "fixed", ["CREATE TABLE t3 (x BIGINT)"])]) == 3


def test_newer_schema_is_refused(db: Database) -> None:
    migrate(db, MIGRATIONS)
    with pytest.raises(SchemaTooNewError) as refused:
        migrate(db, MIGRATIONS[:1])
    assert str(refused.value) == "state database is at schema 2, this iota knows up to 1; upgrade iota"
    with pytest.raises(SchemaTooNewError):
        migrate(db, [])


def test_malformed_migration_lists_are_refused(db: Database) -> None:
    with pytest.raises(MigrationError, match="strictly increasing"):
        migrate(db, [Migration(2, "b", []), Migration(1, "a", [])])
    with pytest.raises(MigrationError, match="strictly increasing"):
        migrate(db, [Migration(1, "a", []), Migration(1, "a again", [])])
    with pytest.raises(MigrationError, match="no statement for"):
        migrate(db, [Migration(1, "a", [{"other": "SELECT 1"}])])
    assert schema_version(db) == 0


def test_sqlite_file_survives_a_process_that_dies_without_closing(tmp_path: Path) -> None:
    path = tmp_path / "run" / "state.db"
    # A separate process commits, then exits at once: no close(), no WAL checkpoint, like a killed orchestrator.
    writer = (
        "import os, sys\n"
        "from iota.state import open_database, migrate\n"
        "db = open_database('sqlite:///' + sys.argv[1])\n"
        f"migrate(db, [(1, 'kv', [{KV!r}])])\n"
        "with db.transaction():\n"
        "    db.execute(\"INSERT INTO kv VALUES ('committed', 42)\")\n"
        "os._exit(0)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", writer, str(path)], check=True, cwd=repo, timeout=60)
    assert (tmp_path / "run" / "state.db-wal").exists()  # the commit lives only in the WAL so far

    reopened = open_database(f"sqlite:///{path}")
    assert isinstance(reopened, SqliteDatabase)
    assert reopened.scalar("PRAGMA journal_mode") == "wal"
    assert reopened.scalar("PRAGMA foreign_keys") == 1
    assert schema_version(reopened) == 1
    assert reopened.scalar("SELECT v FROM kv WHERE k = 'committed'") == 42
    reopened.close()


def test_open_database_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_database("sqlite:///rel/state.db")
    relative.execute(KV)
    relative.close()
    assert (tmp_path / "rel" / "state.db").exists()
    absolute = open_database(f"sqlite:///{tmp_path}/abs.db")  # four slashes: an absolute path
    assert absolute.dialect == "sqlite"
    absolute.close()
    assert (tmp_path / "abs.db").exists()
    with open_database("sqlite:///:memory:") as memory:
        assert memory.scalar("SELECT 1") == 1
    for bad in ["mysql://x/y", "sqlite://relative.db", "sqlite:///"]:
        with pytest.raises(ValueError):
            open_database(bad)


def test_postgres_url_opens_postgres(postgres_dsn: str) -> None:
    with open_database(postgres_dsn) as db:
        assert db.dialect == "postgres"
        assert db.scalar("SELECT current_database()") == postgres_dsn.rsplit("/", 1)[1]


def test_small_transaction_throughput(db: Database) -> None:
    """Measures (prints, doesn't assert) single-row write transactions per second, from one thread and eight."""
    db.execute(
        "CREATE TABLE hits (thread BIGINT, i BIGINT, at DOUBLE PRECISION NOT NULL, PRIMARY KEY (thread, i))"
    )

    def work(thread: int, deadline: float) -> None:
        i = 0
        while time.perf_counter() < deadline:
            with db.transaction():
                db.execute("INSERT INTO hits (thread, i, at) VALUES (?, ?, ?)", (thread, i, time.time()))
            i += 1

    def rate(threads: int, seconds: float = 1.0) -> float:
        before = db.scalar("SELECT COUNT(*) FROM hits")
        start = time.perf_counter()
        workers = [
            threading.Thread(target=work, args=(threads * 100 + t, start + seconds)) for t in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return (db.scalar("SELECT COUNT(*) FROM hits") - before) / (time.perf_counter() - start)

    one_thread, eight_threads = rate(1), rate(8)
    assert one_thread > 0 and eight_threads > 0
    durability = "synchronous=NORMAL" if db.dialect == "sqlite" else "test cluster, fsync off"
    print(
        f"\n{db.dialect} ({durability}): {one_thread:.0f} tx/s from 1 thread, {eight_threads:.0f} from 8 threads"
    )
