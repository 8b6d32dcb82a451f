"""The `db` fixture: every state test written against it runs on SQLite and on a real PostgreSQL server."""

from collections.abc import Iterator

import pytest

from iota.state import Database, PostgresDatabase, SqliteDatabase, migrate
from tests.support.postgres import postgres_dsn, postgres_server  # noqa: F401  (fixtures used by `db`)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path) -> Iterator[Database]:
    """A fresh database with only the migrations table, on each engine in turn."""
    if request.param == "sqlite":
        database: Database = SqliteDatabase(tmp_path / "state.db")
    else:
        # Requested lazily so a run of SQLite tests alone never starts the server.
        database = PostgresDatabase(request.getfixturevalue("postgres_dsn"))
    migrate(database, [])
    yield database
    database.close()
