"""The dashboard page at GET / (a live view of /status for people) and what it shows beyond /status, at GET
/dashboard/data: scores, audits, validators and their verdicts, checkpoints, phases and the epoch's progress."""

from __future__ import annotations

from collections import Counter
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from iota.audit.scoring import standing
from iota.orchestrator.metrics import Figures
from iota.orchestrator.routes.run import RunFigures

router = APIRouter(tags=["dashboard"])

RECENT_VERDICTS = 10
RECENT_CHECKPOINTS = 10


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> str:
    return resources.files("iota.orchestrator").joinpath("dashboard.html").read_text(encoding="utf-8")


@router.get("/dashboard/data")
async def dashboard_data(figures: RunFigures) -> dict[str, Any]:
    """The dashboard's figures that /status does not carry (the reading GET /metrics serves)."""
    return details(figures)


def details(f: Figures) -> dict[str, Any]:
    """Per miner its score and audits; per validator its verdicts; the latest verdicts and checkpoints; the phase
    changes (oldest first); the current epoch's progress; and the orchestrator's clock, to age `last_seen` by."""
    passed = Counter(v["miner"] for v in f.verdicts if v["passed"])
    failed = Counter(v["miner"] for v in f.verdicts if not v["passed"])
    miners = {m.hotkey for st in f.status.stages for m in st.miners} | set(f.scores)
    lost = standing(f.verdicts)
    validators: dict[str, dict[str, Any]] = {}
    for v in f.verdicts:
        row = validators.setdefault(
            v["validator"], {"hotkey": v["validator"], "passed": 0, "failed": 0, "last_at": 0.0}
        )
        row["passed" if v["passed"] else "failed"] += 1
        row["last_at"] = max(row["last_at"], float(v["at"]))
    recent = sorted(f.verdicts, key=lambda v: float(v["at"]), reverse=True)[:RECENT_VERDICTS]
    verdict_keys = ("at", "validator", "miner", "epoch", "stage", "passed", "hops")
    return {
        "now": f.now,
        "epoch": {
            "epoch": f.status.epoch,
            "epochs": f.epochs,
            "samples_done": f.epoch_samples_done,
            "samples_per_epoch": f.samples_per_epoch,
        },
        "miners": {
            hotkey: {
                "score": f.scores.get(hotkey, 0.0),
                "audits_passed": passed[hotkey],
                "audits_failed": failed[hotkey],
            }
            for hotkey in sorted(miners)
        },
        "validators": [
            {**row, "standing": row["hotkey"] not in lost} for _, row in sorted(validators.items())
        ],
        "verdicts": [{k: v.get(k) for k in verdict_keys} for v in recent],
        "phases": [
            {"at": e["at"], "epoch": e.get("epoch"), "phase": e.get("phase")}
            for e in reversed(f.events)
            if e["kind"] == "phase"
        ],
        "checkpoints": [
            {"at": e["at"], "epoch": e.get("epoch")} for e in f.events if e["kind"] == "checkpoint"
        ][:RECENT_CHECKPOINTS],
        "checkpoint": f.status.checkpoint,
    }
