"""The abuse policy's record (iota.orchestrator.abuse): strikes against hotkeys, and bans, in their own tables.

They sit beside the run's tables so that a refused request leaves those untouched: only the strike is written.
"""

from __future__ import annotations

from iota.state.db import Database


class AbuseLedger:
    def __init__(self, db: Database):
        self.db = db

    def strike(self, hotkey: str, at: float, why: str) -> None:
        self.db.execute("INSERT INTO abuse_strikes (hotkey, at, why) VALUES (?, ?, ?)", (hotkey, at, why))

    def forget_strikes(self, hotkey: str, through: float) -> None:
        """Drop the hotkey's strikes at or before `through` (they left the window)."""
        self.db.execute("DELETE FROM abuse_strikes WHERE hotkey = ? AND at <= ?", (hotkey, through))

    def strike_times(self, hotkey: str) -> list[float]:
        rows = self.db.execute("SELECT at FROM abuse_strikes WHERE hotkey = ? ORDER BY at", (hotkey,))
        return [float(r[0]) for r in rows]

    def ban(self, hotkey: str, at: float, why: str) -> None:
        self.db.execute("INSERT INTO abuse_bans (hotkey, at, why) VALUES (?, ?, ?)", (hotkey, at, why))

    def bans(self) -> dict[str, str]:
        """Banned hotkey -> why."""
        return {
            str(hotkey): str(why) for hotkey, why in self.db.execute("SELECT hotkey, why FROM abuse_bans")
        }

    def forgive(self, hotkey: str) -> None:
        """Clear the hotkey's strikes and ban."""
        self.db.execute("DELETE FROM abuse_strikes WHERE hotkey = ?", (hotkey,))
        self.db.execute("DELETE FROM abuse_bans WHERE hotkey = ?", (hotkey,))
