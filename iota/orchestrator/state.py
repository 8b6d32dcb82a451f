"""The orchestrator's durable state: miners, samples, hops (units of work), verdicts and the operator's log, in
SQL, and the typed ledgers (iota.orchestrator.ledgers) over the rest of it."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from iota.orchestrator.ledgers import (
    AbuseLedger,
    Audits,
    Counters,
    EpochValues,
    Merges,
    RunValues,
    Snapshots,
    Steps,
    Uploads,
    WorkDone,
)
from iota.orchestrator.ledgers import keys as ledger_keys
from iota.orchestrator.schema import MIGRATIONS
from iota.state.db import Database
from iota.state.migrations import migrate

OPEN = ("queued", "leased")
EVENTS_KEPT = 10_000  # the operator's log keeps its newest events (GET /events serves the last 100)
EVENTS_TRIMMED_EVERY = 500
LOSS_PARTS = 8  # points an expired epoch keeps on the loss curve
# Past this many folded points, runs of consecutive ones are merged: the loss curve's rows stay bounded.
SUMMARY_ROWS = 1024


@dataclass(frozen=True)
class Hop:
    id: int
    sample_id: int
    attempt: int
    epoch: int
    stage: int
    direction: str  # "forward" | "backward"
    status: str  # "queued" | "leased" | "done" | "dropped"
    miner: str | None
    lease_no: int
    lease_expires: float | None
    input_key: str | None
    input_sha: str | None
    output_key: str | None
    output_sha: str | None
    output_size: int | None


HOP_COLUMNS = (
    "id, sample_id, attempt, epoch, stage, direction, status, miner, lease_no, lease_expires, "
    "input_key, input_sha, output_key, output_sha, output_size"
)


@dataclass(frozen=True)
class MinerRecord:
    """A miner's row: the stage it was given, its session and device, and how it stands."""

    hotkey: str
    uid: int | None
    stage: int
    session: str
    device: str
    memory_bytes: int
    registered_at: float
    last_seen: float
    alive: bool
    hops_done: int
    banned: str | None


MINER_COLUMNS = (
    "hotkey, uid, stage, session, device, memory_bytes, registered_at, last_seen, alive, hops_done, banned"
)


def settles_nothing(passed: bool, detail: dict[str, Any] | None) -> bool:
    """A passing verdict that confirms or refutes no claim: scoring never reads it (iota.audit.scoring)."""
    return bool(passed) and (detail or {}).get("confirms") is None


def _miner(row: tuple) -> MinerRecord:
    return MinerRecord(*row[:8], bool(row[8]), row[9], row[10])  # type: ignore[arg-type,call-arg]


class StateStore:
    """Typed reads and writes of the orchestrator's state; callers group them with `transaction()`."""

    def __init__(self, db: Database, events_kept: int = EVENTS_KEPT):
        self.db = db
        self.events_kept = events_kept
        migrate(db, MIGRATIONS)
        self.run = RunValues(self)
        self.counters = Counters(self)
        self.epochs = EpochValues(self)
        self.uploads = Uploads(self)
        self.merges = Merges(self)
        self.steps = Steps(self)
        self.snapshots = Snapshots(self)
        self.audits = Audits(self)
        self.abuse = AbuseLedger(db)
        self.work = WorkDone(db)

    def transaction(self):
        return self.db.transaction()

    # -- the kv table under the ledgers (tests read it by key) ------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.one("SELECT value FROM kv WHERE key = ?", (key,))
        return default if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    def bump(self, key: str, by: int = 1) -> int:
        """Add to a counter and return its new value."""
        value = int(self.get(key, 0)) + by
        self.put(key, value)
        return value

    # -- miners -----------------------------------------------------------------------------------------

    def miner(self, hotkey: str) -> MinerRecord | None:
        row = self.db.one(f"SELECT {MINER_COLUMNS} FROM miners WHERE hotkey = ?", (hotkey,))
        return None if row is None else _miner(row)

    def miners(self, alive_only: bool = False) -> list[MinerRecord]:
        where = " WHERE alive = 1" if alive_only else ""
        rows = self.db.execute(f"SELECT {MINER_COLUMNS} FROM miners{where} ORDER BY stage, hotkey")
        return [_miner(r) for r in rows]

    def upsert_miner(self, m: MinerRecord) -> None:
        self.db.execute(
            f"INSERT INTO miners ({MINER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (hotkey) DO UPDATE SET uid = excluded.uid, stage = excluded.stage, "
            "session = excluded.session, device = excluded.device, memory_bytes = excluded.memory_bytes, "
            "registered_at = excluded.registered_at, last_seen = excluded.last_seen, alive = excluded.alive",
            (
                m.hotkey,
                m.uid,
                m.stage,
                m.session,
                m.device,
                m.memory_bytes,
                m.registered_at,
                m.last_seen,
                int(m.alive),
                m.hops_done,
                m.banned,
            ),
        )

    def touch_miner(self, hotkey: str, now: float) -> None:
        self.db.execute("UPDATE miners SET last_seen = ?, alive = 1 WHERE hotkey = ?", (now, hotkey))

    def set_miner_dead(self, hotkey: str) -> None:
        self.db.execute("UPDATE miners SET alive = 0 WHERE hotkey = ?", (hotkey,))

    def set_banned(self, hotkey: str, reason: str | None) -> None:
        self.db.execute("UPDATE miners SET banned = ? WHERE hotkey = ?", (reason, hotkey))

    def staffed_stages(self, n_stages: int) -> set[int]:
        """The stages below ``n_stages`` with at least one live miner: one index probe per stage."""
        return {
            s
            for s in range(n_stages)
            if self.db.one("SELECT 1 FROM miners WHERE alive = 1 AND stage = ? LIMIT 1", (s,)) is not None
        }

    def stage_load(self) -> dict[int, tuple[int, int]]:
        """Live miners and their hops done, per stage (from the index, no miner rows read)."""
        rows = self.db.execute(
            "SELECT stage, COUNT(*), SUM(hops_done) FROM miners WHERE alive = 1 GROUP BY stage"
        )
        return {int(r[0]): (int(r[1]), int(r[2] or 0)) for r in rows}

    def stale_miners(self, before: float) -> list[str]:
        rows = self.db.execute("SELECT hotkey FROM miners WHERE alive = 1 AND last_seen < ?", (before,))
        return [r[0] for r in rows]

    def resume(self, now: float, lease_s: float) -> None:
        """After a restart: miners could not reach us while we were down, so their clocks start again now, and
        leases get a full term (an upload that was under way can still be reported)."""
        self.db.execute("UPDATE miners SET last_seen = ? WHERE alive = 1", (now,))
        self.db.execute(
            "UPDATE hops SET lease_expires = ? WHERE status = 'leased' AND lease_expires < ?",
            (now + lease_s, now + lease_s),
        )

    def credit(self, hotkey: str) -> None:
        self.db.execute("UPDATE miners SET hops_done = hops_done + 1 WHERE hotkey = ?", (hotkey,))

    # -- samples ----------------------------------------------------------------------------------------

    def new_sample(self, sample_id: int, epoch: int, now: float) -> None:
        self.db.execute(
            "INSERT INTO samples (id, epoch, attempt, status, created_at) VALUES (?, ?, 0, 'active', ?)",
            (sample_id, epoch, now),
        )

    def sample(self, sample_id: int) -> tuple[int, int, str] | None:
        """(epoch, attempt, status) of a sample."""
        row = self.db.one("SELECT epoch, attempt, status FROM samples WHERE id = ?", (sample_id,))
        return None if row is None else (int(row[0]), int(row[1]), str(row[2]))

    def set_sample(self, sample_id: int, **fields: Any) -> None:
        sets = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(f"UPDATE samples SET {sets} WHERE id = ?", (*fields.values(), sample_id))

    def count_samples(self, epoch: int, status: str) -> int:
        return int(
            self.db.scalar("SELECT COUNT(*) FROM samples WHERE epoch = ? AND status = ?", (epoch, status))
        )

    def active_samples(self, epoch: int | None = None) -> list[int]:
        if epoch is None:
            rows = self.db.execute("SELECT id FROM samples WHERE status = 'active' ORDER BY id")
        else:
            rows = self.db.execute(
                "SELECT id FROM samples WHERE status = 'active' AND epoch = ? ORDER BY id", (epoch,)
            )
        return [int(r[0]) for r in rows]

    def record_loss(self, sample_id: int, epoch: int, tokens: int, loss: float) -> None:
        self.db.execute(
            "INSERT INTO losses (sample_id, epoch, tokens, loss) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (sample_id) DO UPDATE SET epoch = excluded.epoch, tokens = excluded.tokens, "
            "loss = excluded.loss",
            (sample_id, epoch, tokens, loss),
        )

    def done_hops(self, miner: str, epoch: int, limit: int) -> list[tuple]:
        """A miner's completed hops of an epoch in commit order: what an audit replays."""
        return self.db.execute(
            "SELECT id, direction, sample_id, inner_step, input_key, input_sha, output_key, output_sha, loss "
            "FROM hops WHERE miner = ? AND epoch = ? AND status = 'done' "
            "ORDER BY done_at, id LIMIT ?",
            (miner, epoch, limit),
        )

    def add_verdict(
        self,
        now: float,
        validator: str,
        miner: str,
        epoch: int,
        stage: int,
        passed: bool,
        hops: int,
        depth: int,
        detail: dict[str, Any],
    ) -> int:
        verdict_id = self.counters.bump("next_verdict_id")
        self.db.execute(
            "INSERT INTO verdicts (id, at, validator, miner, epoch, stage, passed, hops, depth, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (verdict_id, now, validator, miner, epoch, stage, int(passed), hops, depth, json.dumps(detail)),
        )
        return verdict_id

    def verdicts(self, since_id: int = 0) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, at, validator, miner, epoch, stage, passed, hops, depth, detail FROM verdicts "
            "WHERE id > ? ORDER BY id",
            (since_id,),
        )
        keys = ("id", "at", "validator", "miner", "epoch", "stage", "passed", "hops", "depth")
        return [
            {**dict(zip(keys, r[:9], strict=True)), "passed": bool(r[6]), "detail": json.loads(r[9])}
            for r in rows
        ]

    def loss_curve(self) -> list[tuple[int, float]]:
        """(samples, mean loss) in completion order: one point a completed sample, and for an epoch retention has
        folded, one point for each of its LOSS_PARTS runs of consecutive samples."""
        rows = self.db.execute(
            "SELECT n, loss FROM ("
            " SELECT s.epoch AS epoch, s.done_at AS done_at, l.sample_id AS k, 1 AS n, l.loss AS loss"
            " FROM losses l JOIN samples s ON s.id = l.sample_id WHERE s.status = 'done'"
            " UNION ALL SELECT epoch, done_at, part, samples, loss FROM loss_summary"
            ") AS curve ORDER BY epoch, done_at, k"
        )
        return [(int(r[0]), float(r[1])) for r in rows]

    # -- hops -------------------------------------------------------------------------------------------

    def add_hop(self, **fields: Any) -> int:
        hop_id = self.counters.bump("next_hop_id")
        names = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        self.db.execute(
            f"INSERT INTO hops (id, lease_no, {names}) VALUES (?, 0, {marks})", (hop_id, *fields.values())
        )
        return hop_id

    def hop(self, hop_id: int) -> Hop | None:
        row = self.db.one(f"SELECT {HOP_COLUMNS} FROM hops WHERE id = ?", (hop_id,))
        return None if row is None else Hop(*row)

    def set_hop(self, hop_id: int, **fields: Any) -> None:
        sets = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(f"UPDATE hops SET {sets} WHERE id = ?", (*fields.values(), hop_id))

    def next_queued(self, stage: int, direction: str, miner: str | None) -> Hop | None:
        """The oldest queued hop of a stage: backward hops are bound to a miner, forward hops to nobody."""
        if miner is None:
            row = self.db.one(
                f"SELECT {HOP_COLUMNS} FROM hops WHERE stage = ? AND direction = ? AND status = 'queued' "
                "AND miner IS NULL ORDER BY id LIMIT 1",
                (stage, direction),
            )
        else:
            row = self.db.one(
                f"SELECT {HOP_COLUMNS} FROM hops WHERE stage = ? AND direction = ? AND status = 'queued' "
                "AND miner = ? ORDER BY id LIMIT 1",
                (stage, direction, miner),
            )
        return None if row is None else Hop(*row)

    def hops_of_sample(self, sample_id: int, attempt: int) -> list[Hop]:
        rows = self.db.execute(
            f"SELECT {HOP_COLUMNS} FROM hops WHERE sample_id = ? AND attempt = ? ORDER BY id",
            (sample_id, attempt),
        )
        return [Hop(*r) for r in rows]

    def open_hops_of_miner(self, hotkey: str) -> list[Hop]:
        rows = self.db.execute(
            f"SELECT {HOP_COLUMNS} FROM hops WHERE miner = ? AND status IN ('queued', 'leased') ORDER BY id",
            (hotkey,),
        )
        return [Hop(*r) for r in rows]

    def samples_waiting_on(self, hotkey: str, tail_stage: int) -> list[int]:
        """Active samples whose current attempt needs this miner's cached forward for its backward.

        The tail does its forward and backward in one hop, so it holds no graph that a sample waits on.
        """
        rows = self.db.execute(
            "SELECT DISTINCT g.sample_id FROM held_graphs g "
            "JOIN samples s ON s.id = g.sample_id AND s.attempt = g.attempt "
            "WHERE g.miner = ? AND g.stage < ? AND s.status = 'active' ORDER BY g.sample_id",
            (hotkey, tail_stage),
        )
        return [int(r[0]) for r in rows]

    def hold_graph(self, hotkey: str, sample_id: int, attempt: int, stage: int) -> None:
        """A miner's forward of a sample is done: it holds the graph until that stage's backward is done."""
        self.db.execute(
            "INSERT INTO held_graphs (sample_id, attempt, stage, miner) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (sample_id, attempt, stage) DO UPDATE SET miner = excluded.miner",
            (sample_id, attempt, stage, hotkey),
        )

    def release_graph(self, sample_id: int, attempt: int, stage: int) -> None:
        self.db.execute(
            "DELETE FROM held_graphs WHERE sample_id = ? AND attempt = ? AND stage = ?",
            (sample_id, attempt, stage),
        )

    def release_graphs(self, sample_id: int) -> list[str]:
        """Every graph held for any attempt of a sample (it completed, or restarts with a new attempt); returns the
        miners that held them."""
        rows = self.db.execute("SELECT DISTINCT miner FROM held_graphs WHERE sample_id = ?", (sample_id,))
        self.db.execute("DELETE FROM held_graphs WHERE sample_id = ?", (sample_id,))
        return [str(row[0]) for row in rows]

    def expired_leases(self, now: float) -> list[Hop]:
        rows = self.db.execute(
            f"SELECT {HOP_COLUMNS} FROM hops WHERE status = 'leased' AND lease_expires < ? ORDER BY id",
            (now,),
        )
        return [Hop(*r) for r in rows]

    def queue_depths(self) -> dict[tuple[int, str, str], int]:
        rows = self.db.execute(
            "SELECT stage, direction, status, COUNT(*) FROM hops WHERE status IN ('queued', 'leased') "
            "GROUP BY stage, direction, status"
        )
        return {(int(r[0]), str(r[1]), str(r[2])): int(r[3]) for r in rows}

    def forward_miner(self, sample_id: int, attempt: int, stage: int) -> str | None:
        return self.db.scalar(
            "SELECT miner FROM hops WHERE sample_id = ? AND attempt = ? AND stage = ? AND direction = 'forward' "
            "AND status = 'done'",
            (sample_id, attempt, stage),
        )

    # -- the operator's log -----------------------------------------------------------------------------

    def log(self, now: float, kind: str, hotkey: str | None = None, **detail: Any) -> None:
        event_id = self.counters.bump("next_event_id")
        self.db.execute(
            "INSERT INTO events (id, at, kind, hotkey, detail) VALUES (?, ?, ?, ?, ?)",
            (event_id, now, kind, hotkey, json.dumps(detail)),
        )
        if event_id % EVENTS_TRIMMED_EVERY == 0:
            # Trimmed as it grows, not once an epoch: a flood of events within one epoch stays bounded too.
            self.db.execute("DELETE FROM events WHERE id <= ?", (event_id - self.events_kept,))

    def events(
        self, limit: int = 100, kinds: Sequence[str] = (), exclude: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` events, newest first: of ``kinds`` only (any when empty), none of ``exclude``.
        A filter that matches few rows reads at most the ``events_kept`` rows the log keeps."""
        tests = [(names, test) for names, test in ((kinds, "IN"), (exclude, "NOT IN")) if names]
        clauses = [f"kind {test} ({', '.join('?' * len(names))})" for names, test in tests]
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        rows = self.db.execute(
            f"SELECT at, kind, hotkey, detail FROM events {where}ORDER BY id DESC LIMIT ?",
            (*kinds, *exclude, limit),
        )
        return [{"at": r[0], "kind": r[1], "hotkey": r[2], **json.loads(r[3])} for r in rows]

    # -- retention (iota.orchestrator.retention) ---------------------------------------------------------

    def live_activations(self) -> set[str]:
        """The activation keys hops still name: outputs of hops done (later hops and audits read them) or leased
        (being written). A key from a lease that lapsed or was released is named by none."""
        rows = self.db.execute(
            "SELECT output_key FROM hops WHERE status IN ('done', 'leased') AND output_key IS NOT NULL"
        )
        return {str(row[0]) for row in rows}

    def items(self, prefix: str) -> list[tuple[str, Any]]:
        """Every (key, value) of the kv table whose key starts with `prefix`."""
        pattern = prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"
        rows = self.db.execute("SELECT key, value FROM kv WHERE key LIKE ? ESCAPE '!'", (pattern,))
        return [(str(row[0]), json.loads(row[1])) for row in rows]

    def drop(self, keys: list[str]) -> None:
        """Delete these keys from the kv table."""
        self.db.executemany("DELETE FROM kv WHERE key = ?", [(key,) for key in keys])

    def forget(self, expired: Callable[[int], bool]) -> dict[str, int]:
        """Delete the detail of every epoch `expired` says is past: its hops, its per-epoch values in kv, and its
        passing verdicts that settle no claim. Scoring reads only failing verdicts and the passing ones that
        confirm or refute one (iota.audit.scoring), so weights and standing stay what they were. Returns the rows
        deleted per table; call it inside a transaction."""
        epochs = [int(row[0]) for row in self.db.execute("SELECT DISTINCT epoch FROM hops")]
        doomed_epochs = [epoch for epoch in epochs if expired(epoch)]
        hops = sum(
            len(self.db.execute("DELETE FROM hops WHERE epoch = ? RETURNING id", (epoch,)))
            for epoch in doomed_epochs
        )
        doomed_kv = [
            (key,)
            for (key,) in self.db.execute("SELECT key FROM kv")
            if (epoch := ledger_keys.epoch_of(key)) is not None and expired(epoch)
        ]
        self.db.executemany("DELETE FROM kv WHERE key = ?", doomed_kv)
        routine = [
            (verdict_id,)
            for verdict_id, epoch, detail in self.db.execute(
                "SELECT id, epoch, detail FROM verdicts WHERE passed = 1"
            )
            if expired(int(epoch)) and settles_nothing(True, json.loads(detail))
        ]
        self.db.executemany("DELETE FROM verdicts WHERE id = ?", routine)
        finished = [
            int(row[0])
            for row in self.db.execute("SELECT DISTINCT epoch FROM samples WHERE status != 'active'")
        ]
        samples = sum(self._fold_samples(epoch) for epoch in finished if expired(epoch))
        self.compact_loss_summary()
        return {"hops": hops, "kv": len(doomed_kv), "verdicts": len(routine), "samples": samples}

    def compact_loss_summary(self, most: int = SUMMARY_ROWS) -> None:
        """Past `most` folded points, each run of 2 (or 4, 8, ... until they fit) consecutive points becomes one: its
        samples' weighted mean, keyed and timed as the run's last, so the curve's order and sample count are kept."""
        rows = list(
            self.db.execute(
                "SELECT epoch, part, samples, loss, done_at FROM loss_summary ORDER BY epoch, done_at, part"
            )
        )
        if len(rows) <= most:
            return
        size = 2
        while -(-len(rows) // size) > most:
            size *= 2
        merged = []
        for points in (rows[i : i + size] for i in range(0, len(rows), size)):
            epoch, part, _, _, done_at = points[-1]
            samples = sum(int(r[2]) for r in points)
            merged.append(
                (epoch, part, samples, sum(int(r[2]) * float(r[3]) for r in points) / samples, done_at)
            )
        self.db.execute("DELETE FROM loss_summary")
        self.db.executemany(
            "INSERT INTO loss_summary (epoch, part, samples, loss, done_at) VALUES (?, ?, ?, ?, ?)", merged
        )

    def _fold_samples(self, epoch: int) -> int:
        """An expired epoch's finished samples go, their losses folded into LOSS_PARTS means: the loss curve keeps
        its shape and the tables stop growing with the run. Returns the samples deleted."""
        losses = [
            (float(loss), float(done_at))
            for loss, done_at in self.db.execute(
                "SELECT l.loss, s.done_at FROM losses l JOIN samples s ON s.id = l.sample_id "
                "WHERE s.epoch = ? AND s.status = 'done' ORDER BY s.done_at, l.sample_id",
                (epoch,),
            )
        ]
        size = -(-len(losses) // LOSS_PARTS)
        parts = [losses[i : i + size] for i in range(0, len(losses), size)] if losses else []
        self.db.executemany(
            "INSERT INTO loss_summary (epoch, part, samples, loss, done_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (epoch, part) DO NOTHING",
            [(epoch, i, len(p), sum(v for v, _ in p) / len(p), p[-1][1]) for i, p in enumerate(parts)],
        )
        self.db.execute(
            "DELETE FROM losses WHERE sample_id IN (SELECT id FROM samples WHERE epoch = ? AND status != 'active')",
            (epoch,),
        )
        return len(
            self.db.execute(
                "DELETE FROM samples WHERE epoch = ? AND status != 'active' RETURNING id", (epoch,)
            )
        )
