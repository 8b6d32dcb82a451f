"""Durable state: one database interface over SQLite and PostgreSQL, and schema migrations."""

from iota.state.db import (
    Database,
    IntegrityError,
    PostgresDatabase,
    SqliteDatabase,
    TransactionAborted,
    open_database,
)
from iota.state.migrations import (
    Migration,
    MigrationError,
    SchemaTooNewError,
    migrate,
    schema_version,
)

__all__ = [
    "Database",
    "IntegrityError",
    "Migration",
    "MigrationError",
    "PostgresDatabase",
    "SchemaTooNewError",
    "SqliteDatabase",
    "TransactionAborted",
    "migrate",
    "open_database",
    "schema_version",
]
