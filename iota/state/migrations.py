"""Schema migrations: apply a caller's ordered list once each, recorded in the database itself.

A migration is `Migration(version, name, statements)` (a plain 3-tuple works too). Versions are positive and
strictly increasing; a released migration is never edited, a change is a new migration. A statement is portable
SQL, or a mapping from dialect to SQL where the engines differ, e.g.
`{"sqlite": "... INTEGER PRIMARY KEY ...", "postgres": "... BIGINT GENERATED ALWAYS AS IDENTITY ..."}`.

Each migration runs in its own transaction together with its `schema_migrations` row (DDL is transactional on
both engines), so a crash leaves the database at the previous version, and two processes migrating at once
serialize on transaction() and apply each migration once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from iota.state.db import Database

Statement = str | Mapping[str, str]

_CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)


class Migration(NamedTuple):
    """One step of the schema: its version number, a short name, and the statements that make it."""

    version: int
    name: str
    statements: Sequence[Statement]


class MigrationError(RuntimeError):
    """The migration list is malformed, or the database cannot be brought to it."""


class SchemaTooNewError(MigrationError):
    """The database was migrated by a newer iota than this one."""


def schema_version(db: Database) -> int:
    """The highest migration version recorded in the database (0 for a fresh one)."""
    with db.transaction():
        db.execute(_CREATE_TABLE)
        return int(db.scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))


def migrate(db: Database, migrations: Sequence[Migration | tuple[int, str, Sequence[Statement]]]) -> int:
    """Apply the migrations the database lacks, in order; returns the schema version it ends at.

    Refuses (SchemaTooNewError) a database whose recorded version is above the last one given, rather than
    running code against tables it does not know.
    """
    plan = _validated([Migration(*m) for m in migrations])
    known = plan[-1].version if plan else 0
    current = schema_version(db)
    if current > known:
        raise SchemaTooNewError(
            f"state database is at schema {current}, this iota knows up to {known}; upgrade iota"
        )
    for migration in plan:
        if migration.version <= current:
            continue
        with db.transaction():
            # Re-read under the write lock: another process may have applied it since we looked.
            if db.scalar("SELECT 1 FROM schema_migrations WHERE version >= ?", (migration.version,)):
                continue
            for statement in migration.statements:
                db.execute(_for_dialect(statement, db.dialect, migration))
            db.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
    return max(current, known)


def _validated(plan: list[Migration]) -> list[Migration]:
    previous = 0
    for m in plan:
        if not isinstance(m.version, int) or m.version <= previous:
            raise MigrationError(
                f"migration versions must be positive and strictly increasing: {m.version!r} follows {previous}"
            )
        if not m.name:
            raise MigrationError(f"migration {m.version} has no name")
        if isinstance(m.statements, str):
            raise MigrationError(f"migration {m.version}: statements must be a list, not one string")
        previous = m.version
    return plan


def _for_dialect(statement: Statement, dialect: str, migration: Migration) -> str:
    if isinstance(statement, str):
        return statement
    if dialect not in statement:
        raise MigrationError(
            f"migration {migration.version} ({migration.name}) has no statement for {dialect}"
        )
    return statement[dialect]
