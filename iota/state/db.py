"""One small database interface over SQLite (one machine) and PostgreSQL (a deployment), for durable state.

Portable SQL, so the same statements run on both engines:

- Placeholders are `?`; PostgresDatabase rewrites them to psycopg's `%s` (and escapes literal `%`), skipping
  `?` inside quoted strings, quoted identifiers and comments. Don't use Postgres' JSONB `?` operators, `E'...'`
  strings or dollar-quoted bodies in portable SQL.
- Types: BIGINT, TEXT, DOUBLE PRECISION, BYTEA (SQLite stores bytes as a BLOB under any type name). Booleans:
  store BIGINT 0/1, since SQLite hands back ints where Postgres hands back bools. Timestamps: DOUBLE PRECISION
  seconds since the epoch. Auto-increment keys are not portable (INTEGER PRIMARY KEY vs IDENTITY): choose keys
  in code, or give the migration a per-dialect statement (see migrations.py).
- `INSERT ... ON CONFLICT (key) DO UPDATE SET c = excluded.c` and `... DO NOTHING` work on both (SQLite >= 3.24),
  as does `RETURNING` (SQLite >= 3.35; SqliteDatabase refuses an older library).
- `transaction()` is a write transaction that serializes with every other `transaction()` on the same database
  (SQLite: BEGIN IMMEDIATE; Postgres: a transaction-scoped advisory lock), so a read-modify-write inside one is
  safe on both engines without SELECT ... FOR UPDATE. Nested use joins the outer transaction through a savepoint:
  an exception leaving the inner block undoes only the inner block's writes; nothing is committed until the
  outermost block ends.
- A statement run outside `transaction()` commits on its own (autocommit).
- Unique and foreign-key violations raise `IntegrityError` on both engines.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:
    from typing import LiteralString

    import psycopg

Row = tuple[Any, ...]
Params = Sequence[Any]
Dialect = Literal["sqlite", "postgres"]

MIN_SQLITE_VERSION = (3, 35, 0)  # RETURNING
# Key of the Postgres advisory lock that serializes transaction() ("iota" in ASCII); advisory locks are scoped
# to one database, so two runs in two databases don't contend.
_POSTGRES_TRANSACTION_LOCK = 0x696F7461
_BEGIN_SERIALIZED = f"BEGIN; SELECT pg_advisory_xact_lock({_POSTGRES_TRANSACTION_LOCK})"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class IntegrityError(Exception):
    """A unique, primary-key, foreign-key, not-null or check constraint refused a write (either engine)."""


class TransactionAborted(RuntimeError):
    """The transaction cannot commit because a statement in it failed and the error was swallowed (Postgres)."""


class Database(ABC):
    """A thread-safe handle on one database; every method may be called from any thread."""

    dialect: Dialect

    @abstractmethod
    def execute(self, sql: str, params: Params = ()) -> list[Row]:
        """Run one statement with `?` placeholders; its result rows ([] for a statement without any)."""

    @abstractmethod
    def executemany(self, sql: str, seq: Iterable[Params]) -> None:
        """Run one statement once per parameter tuple, all in one transaction."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """Context manager: commit on normal exit, roll back on an exception; nested use joins the outer one."""

    @abstractmethod
    def close(self) -> None:
        """Release the connections; the handle is unusable afterwards."""

    def one(self, sql: str, params: Params = ()) -> Row | None:
        """The single row the statement returns, or None when it returns none; more than one is a bug."""
        rows = self.execute(sql, params)
        if len(rows) > 1:
            raise ValueError(f"expected at most one row, got {len(rows)} from: {sql}")
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Params = ()) -> Any:
        """The first column of the single row the statement returns, or None when it returns no row."""
        row = self.one(sql, params)
        return row[0] if row is not None else None

    def upsert(self, table: str, values: Mapping[str, Any], key: Sequence[str]) -> None:
        """Insert the row, or update its non-key columns where a row with the same `key` columns exists."""
        columns = list(values)
        for name in [table, *columns, *key]:
            if not _IDENTIFIER.match(name):
                raise ValueError(f"not a plain SQL identifier: {name!r}")
        missing = [k for k in key if k not in values]
        if missing:
            raise ValueError(f"upsert key columns {missing} have no value")
        updates = [c for c in columns if c not in key]
        on_conflict = (
            "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in updates) if updates else "DO NOTHING"
        )
        placeholders = ", ".join("?" for _ in columns)
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders}) "
            f"ON CONFLICT ({', '.join(key)}) {on_conflict}"
        )
        self.execute(sql, [values[c] for c in columns])

    def __enter__(self) -> Database:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SqliteDatabase(Database):
    """A SQLite file (WAL mode) in the run directory: the one-machine default.

    One connection behind a re-entrant lock, rather than one connection per thread: measured on this 2-core
    machine with many small write transactions (insert + read-modify-write each), the lock gives ~43k tx/s from
    1 thread, ~31k from 8 and ~30k from 32, while per-thread connections give ~42k, ~22k and ~14k. SQLite admits
    one writer at a time anyway, and a contended writer waits in SQLite's busy handler, which sleeps in
    millisecond steps; an in-process lock hands over at once. The cost is that readers wait for a writer too,
    which is cheap for the short transactions the orchestrator runs. busy_timeout still matters when another
    process (a CLI reading status) holds the file.
    """

    dialect: Dialect = "sqlite"

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise RuntimeError(
                f"SQLite {sqlite3.sqlite_version} is too old: iota needs >= 3.35 (RETURNING); upgrade Python"
            )
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the sqlite3 module must not open transactions behind our back; we BEGIN ourselves.
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.RLock()
        self._depth = 0  # transaction nesting; only the thread holding _lock touches it
        self._conn.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer; fewer fsyncs
        # NORMAL in WAL mode: a commit survives a crash of the process; only an OS crash or power loss may lose
        # the last commits (never corrupts). FULL would fsync on every commit.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        self._conn.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite, always on in Postgres

    def execute(self, sql: str, params: Params = ()) -> list[Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.IntegrityError as e:
                raise IntegrityError(str(e)) from e

    def executemany(self, sql: str, seq: Iterable[Params]) -> None:
        with self.transaction():
            try:
                self._conn.executemany(sql, (tuple(p) for p in seq))
            except sqlite3.IntegrityError as e:
                raise IntegrityError(str(e)) from e

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                yield from self._outer()
            else:
                yield from self._savepoint()

    def _outer(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock now, so concurrent writers (other processes) queue on busy_timeout
        # instead of failing with "database is locked" when a read transaction tries to upgrade.
        self._conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
            self._conn.execute("COMMIT")
        finally:
            self._depth = 0
            if self._conn.in_transaction:  # the body raised, or COMMIT failed
                self._conn.execute("ROLLBACK")

    def _savepoint(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield from _savepoint(self._conn.execute, f"iota_sp{self._depth}")
        finally:
            self._depth -= 1

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresDatabase(Database):
    """A PostgreSQL database through psycopg 3, with a small pool of autocommit connections.

    A thread inside transaction() keeps one connection for the whole block (nested blocks reuse it); a
    statement outside a transaction borrows any idle connection. At most `max_connections` are open at once;
    a thread that finds none free waits up to `pool_timeout_s`.

    transaction() serializes (an in-process lock, then a transaction-scoped advisory lock for other processes)
    so code written against SQLite's one-writer model stays correct. That caps write transactions at one at a
    time, as on SQLite; `serialize_transactions=False` gives plain READ COMMITTED transactions for callers
    that only use atomic single statements (`SET n = n + 1`, ON CONFLICT) or SELECT ... FOR UPDATE.
    """

    dialect: Dialect = "postgres"

    def __init__(
        self,
        dsn: str,
        max_connections: int = 10,
        pool_timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        serialize_transactions: bool = True,
    ) -> None:
        # Imported here so SQLite-only installs don't need the optional psycopg dependency.
        import psycopg

        self._psycopg = psycopg
        self.dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._pool_timeout_s = pool_timeout_s
        self._max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._idle: list[psycopg.Connection[Any]] = []
        self._idle_lock = threading.Lock()
        self._local = threading.local()  # .conn, .depth: this thread's open transaction and its nesting
        self._serialize = serialize_transactions
        self._writer_lock = threading.Lock()
        self._closed = False
        # Connect once now, so a wrong DSN or a server that is down fails at startup, not at the first request.
        self._release(self._acquire())

    def execute(self, sql: str, params: Params = ()) -> list[Row]:
        query = _to_pyformat(sql)
        held = self._transaction_connection()
        if held is not None:
            return self._run(held, query, params)
        conn = self._acquire()
        try:
            return self._run(conn, query, params)
        finally:
            self._release(conn)

    def executemany(self, sql: str, seq: Iterable[Params]) -> None:
        query = _to_pyformat(sql)
        with self.transaction():
            conn = self._transaction_connection()
            assert conn is not None  # transaction() bound it to this thread
            try:
                with conn.cursor() as cur:
                    cur.executemany(_query(query), [tuple(p) for p in seq])
            except self._psycopg.errors.IntegrityError as e:
                raise IntegrityError(str(e)) from e

    @contextmanager
    def transaction(self) -> Iterator[None]:
        held = self._transaction_connection()
        if held is not None:
            self._local.depth += 1
            try:
                yield from _savepoint(lambda sql: held.execute(_query(sql)), f"iota_sp{self._local.depth}")
            finally:
                self._local.depth -= 1
            return
        # Threads of this process queue here, not on the advisory lock: a waiting thread then holds no pooled
        # connection (statements outside transactions still find one), and a lock hand-off between threads is
        # a futex instead of a wake-up through the server.
        with self._writer_lock if self._serialize else nullcontext():
            conn = self._acquire()
            self._local.conn, self._local.depth = conn, 0
            try:
                # One round trip: BEGIN, plus the advisory lock that serializes with other processes.
                conn.execute(_query(_BEGIN_SERIALIZED) if self._serialize else "BEGIN")
                yield
                if conn.info.transaction_status == self._psycopg.pq.TransactionStatus.INERROR:
                    # Postgres would answer COMMIT with a silent ROLLBACK; say so instead.
                    raise TransactionAborted(
                        "a statement failed inside this transaction, which Postgres then aborted; catch "
                        "errors around a nested transaction() block to recover from them"
                    )
                conn.execute("COMMIT")
            finally:
                self._local.conn = None
                usable = not (conn.closed or conn.broken)
                if usable and conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
                self._release(conn)

    def close(self) -> None:
        with self._idle_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _run(self, conn: psycopg.Connection[Any], query: str, params: Params) -> list[Row]:
        try:
            with conn.cursor() as cur:
                # Always pass a tuple, even empty: psycopg then un-escapes the `%%` that _to_pyformat wrote.
                cur.execute(_query(query), tuple(params))
                return cur.fetchall() if cur.description is not None else []
        except self._psycopg.errors.IntegrityError as e:
            raise IntegrityError(str(e)) from e

    def _transaction_connection(self) -> psycopg.Connection[Any] | None:
        return cast("psycopg.Connection[Any] | None", getattr(self._local, "conn", None))

    def _acquire(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise RuntimeError("PostgresDatabase is closed")
        if not self._slots.acquire(timeout=self._pool_timeout_s):
            raise TimeoutError(
                f"all {self._max_connections} Postgres connections stayed busy for {self._pool_timeout_s} s"
            )
        try:
            with self._idle_lock:
                while self._idle:
                    conn = self._idle.pop()
                    if not (conn.closed or conn.broken):
                        return conn
            return self._psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, int(self._connect_timeout_s))
            )
        except BaseException:
            self._slots.release()
            raise

    def _release(self, conn: psycopg.Connection[Any]) -> None:
        idle_state = self._psycopg.pq.TransactionStatus.IDLE
        reusable = not (conn.closed or conn.broken) and conn.info.transaction_status == idle_state
        with self._idle_lock:
            pooled = reusable and not self._closed
            if pooled:
                self._idle.append(conn)
        if not pooled:
            conn.close()  # broken by a server restart, or the pool is closed: don't hand it out again
        self._slots.release()


def _savepoint(run: Callable[[str], object], name: str) -> Iterator[None]:
    """A nested transaction() block: its writes join the outer transaction, or vanish if the block raises."""
    run(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        run(f"ROLLBACK TO SAVEPOINT {name}")
        raise
    finally:
        run(f"RELEASE SAVEPOINT {name}")


def open_database(url: str) -> Database:
    """The database a URL names: `sqlite:///relative/state.db`, `sqlite:////absolute/state.db`,
    `sqlite:///:memory:`, or `postgresql://user@host:port/dbname` (any libpq URL)."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        if not rest.startswith("/") or len(rest) < 2:
            raise ValueError(f"bad SQLite URL {url!r}: expected sqlite:///path/to/state.db")
        return SqliteDatabase(rest[1:])
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    raise ValueError(f"unsupported database URL {url!r}: expected sqlite:///path or postgresql://...")


def _query(query: str) -> LiteralString:
    # psycopg's types ask for a LiteralString to discourage building SQL from data; our SQL is the caller's
    # statement text with values passed separately, so the cast is sound.
    return cast("LiteralString", query)


@lru_cache(maxsize=1024)
def _to_pyformat(sql: str) -> str:
    """Rewrite `?` placeholders to `%s` and escape `%` as `%%`, outside quotes and comments (psycopg format)."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in ("'", '"'):
            end = sql.find(ch, i + 1)  # a doubled quote inside reads as close-then-open: same result
            end = n - 1 if end < 0 else end
            out.append(sql[i : end + 1].replace("%", "%%"))
            i = end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        else:
            out.append("%s" if ch == "?" else "%%" if ch == "%" else ch)
            i += 1
    return "".join(out)
