"""A fresh database migrates to the latest version; migration 4 makes the abuse policy's tables, and keeps those a
database already has from the policy itself."""

from __future__ import annotations

from iota.orchestrator.schema import MIGRATIONS
from iota.orchestrator.state import StateStore
from iota.state import Database, migrate, schema_version

# What the abuse policy ran on its first use before its tables were a migration.
POLICY_TABLES = (
    "CREATE TABLE IF NOT EXISTS abuse_strikes (hotkey TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, why TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS abuse_strikes_by_hotkey ON abuse_strikes (hotkey, at)",
    "CREATE TABLE IF NOT EXISTS abuse_bans (hotkey TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, why TEXT NOT NULL)",
)


def test_a_fresh_database_has_the_abuse_tables(db: Database) -> None:
    state = StateStore(db)
    assert schema_version(db) == MIGRATIONS[-1][0] == len(MIGRATIONS)
    assert state.abuse.bans() == {} and state.abuse.strike_times("hk") == []
    assert state.loss_curve() == []  # migration 5's loss_summary is there


def test_migration_4_keeps_the_strikes_and_bans_the_policy_made(db: Database) -> None:
    migrate(db, MIGRATIONS[:3])
    for statement in POLICY_TABLES:
        db.execute(statement)
    db.execute("INSERT INTO abuse_strikes (hotkey, at, why) VALUES ('hk', 5.0, 'claim')")
    db.execute("INSERT INTO abuse_bans (hotkey, at, why) VALUES ('hk', 6.0, 'banned')")
    state = StateStore(db)  # migrates to the latest
    assert schema_version(db) == MIGRATIONS[-1][0]
    assert state.abuse.strike_times("hk") == [5.0] and state.abuse.bans() == {"hk": "banned"}
