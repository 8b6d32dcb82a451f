"""The orchestrator's tables, as the ordered migrations that make them (iota.state.migrations applies them)."""

from __future__ import annotations

# Portable SQL (SQLite and PostgreSQL). Ids are allocated from counters in `kv` inside the writing transaction,
# so no dialect-specific auto-increment is needed.
MIGRATIONS = [
    (
        1,
        "initial",
        [
            "CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            """CREATE TABLE miners (
                hotkey TEXT PRIMARY KEY, uid BIGINT, stage BIGINT NOT NULL, session TEXT NOT NULL,
                device TEXT NOT NULL, memory_bytes BIGINT NOT NULL, registered_at DOUBLE PRECISION NOT NULL,
                last_seen DOUBLE PRECISION NOT NULL, alive BIGINT NOT NULL, hops_done BIGINT NOT NULL,
                banned TEXT)""",
            """CREATE TABLE samples (
                id BIGINT PRIMARY KEY, epoch BIGINT NOT NULL, attempt BIGINT NOT NULL, status TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL, done_at DOUBLE PRECISION, loss DOUBLE PRECISION)""",
            "CREATE INDEX samples_status ON samples (status, epoch)",
            """CREATE TABLE hops (
                id BIGINT PRIMARY KEY, sample_id BIGINT NOT NULL, attempt BIGINT NOT NULL, epoch BIGINT NOT NULL,
                stage BIGINT NOT NULL, direction TEXT NOT NULL, status TEXT NOT NULL, miner TEXT,
                lease_no BIGINT NOT NULL, lease_expires DOUBLE PRECISION, input_key TEXT, input_sha TEXT,
                output_key TEXT, output_sha TEXT, output_size BIGINT, created_at DOUBLE PRECISION NOT NULL,
                done_at DOUBLE PRECISION)""",
            "CREATE INDEX hops_queue ON hops (stage, direction, status, miner)",
            "CREATE INDEX hops_lease ON hops (status, lease_expires)",
            "CREATE INDEX hops_sample ON hops (sample_id, attempt)",
            "CREATE INDEX hops_miner ON hops (miner, status)",
            """CREATE TABLE losses (
                sample_id BIGINT PRIMARY KEY, epoch BIGINT NOT NULL, tokens BIGINT NOT NULL,
                loss DOUBLE PRECISION NOT NULL)""",
            """CREATE TABLE events (
                id BIGINT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, hotkey TEXT,
                detail TEXT NOT NULL)""",
        ],
    ),
    (
        2,
        "audits",
        [
            "ALTER TABLE hops ADD COLUMN inner_step BIGINT",  # the miner's inner step after the hop: replay order
            "ALTER TABLE hops ADD COLUMN loss DOUBLE PRECISION",
            """CREATE TABLE verdicts (
                id BIGINT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, validator TEXT NOT NULL, miner TEXT NOT NULL,
                epoch BIGINT NOT NULL, stage BIGINT NOT NULL, passed BIGINT NOT NULL, hops BIGINT NOT NULL,
                depth BIGINT NOT NULL, detail TEXT NOT NULL)""",
            "CREATE INDEX verdicts_miner ON verdicts (miner, epoch)",
        ],
    ),
    (
        3,
        "per-request lookups by index",
        [
            # Which stages have a live miner, and each stage's load, without reading every miner row.
            "CREATE INDEX miners_alive_stage ON miners (alive, stage, hops_done)",
            # The forward graphs a miner holds for a backward still to come: one row per (sample, attempt, stage)
            # from the forward's report until that backward is done or the attempt ends, so asking what a miner
            # holds costs what it holds, not every hop it ever did. Derived from hops and samples (filled below
            # from them for a run in progress); the samples join stays in the read, so a stale row is harmless.
            """CREATE TABLE held_graphs (
                sample_id BIGINT NOT NULL, attempt BIGINT NOT NULL, stage BIGINT NOT NULL, miner TEXT NOT NULL,
                PRIMARY KEY (sample_id, attempt, stage))""",
            "CREATE INDEX held_graphs_miner ON held_graphs (miner, stage)",
            "INSERT INTO held_graphs (sample_id, attempt, stage, miner) "
            "SELECT h.sample_id, h.attempt, h.stage, h.miner FROM hops h "
            "JOIN samples s ON s.id = h.sample_id AND s.attempt = h.attempt "
            "WHERE h.direction = 'forward' AND h.status = 'done' AND s.status = 'active' AND h.miner IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM hops b WHERE b.sample_id = h.sample_id AND b.attempt = h.attempt "
            "AND b.stage = h.stage AND b.direction = 'backward' AND b.status = 'done')",
        ],
    ),
    (
        4,
        "abuse policy tables",
        [
            # The abuse policy (iota.orchestrator.abuse) created these itself before they were a migration: IF NOT
            # EXISTS keeps the tables, and the strikes and bans in them, of a database it already wrote.
            "CREATE TABLE IF NOT EXISTS abuse_strikes ("
            " hotkey TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, why TEXT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS abuse_strikes_by_hotkey ON abuse_strikes (hotkey, at)",
            "CREATE TABLE IF NOT EXISTS abuse_bans ("
            " hotkey TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, why TEXT NOT NULL)",
        ],
    ),
    (
        5,
        "the loss curve of expired epochs, folded",
        [
            # Retention folds an expired epoch's per-sample losses into a few means (iota.orchestrator.state's
            # forget): `samples` consecutive completed samples, the mean of their losses, the last one's time.
            """CREATE TABLE loss_summary (
                epoch BIGINT NOT NULL, part BIGINT NOT NULL, samples BIGINT NOT NULL,
                loss DOUBLE PRECISION NOT NULL, done_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (epoch, part))""",
        ],
    ),
]
