"""Cheating miners in a live `iota local` network: caught or not, when, their weight, and the harm left behind.

Each run is the quick start's network (iota.local.LOCAL_DEFAULTS: 3 stages x 2 miners, 5 epochs; one validator)
with one miner replaced by a cheater from iota.audit.adversaries (added once every stage has an honest miner, so it
never holds a stage alone), or by an honest miner for the honest runs. After the run the validator keeps auditing
the finished epochs for `--settle` seconds (the orchestrator confirms or refutes what it failed), then the score
log and the published checkpoint are read. Per adversary, over its runs:

  caught           runs where the cheater's failure is confirmed (iota.audit.scoring.confirmed_failures)
  epoch            the first epoch of the cheater's confirmed failure (0-based; the run has 5)
  weight           the cheater's share of the weights the score log implies (0 once caught)
  held-out         the checkpoint's held-out loss, and its gap to the honest runs' mean
  false positives  failing verdicts on honest miners (confirmed, and all), over every audit of every run

Run it alone (it is a benchmark): python -m bench.cheaters [--adversaries Int8Weights ConsistentBias]
[--runs 5] [--settle 60] [--depth 1] [--json FILE]. A run takes about 2 minutes on the 2-core dev box.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.pipeline import machine
from iota.audit.scoring import compute_scores, confirmed_failures
from iota.local import LocalNetwork, LocalOptions
from iota.local.report import run_report

HONEST = "honest"
# Those iota.audit.adversaries builds without arguments (IOTA_ADVERSARY names a class, nothing more).
ADVERSARIES = (
    "Int8Weights",
    "ConsistentBias",
    "RandomOutput",
    "Identity",
    "SkippedLayers",
    "ZeroBackward",
    "SkippedBackward",
    "WrongTokens",
    "FakeLoss",
    "ForgedPseudoGradient",
    "ForgedSnapshot",
    "Watchful",
    "WindowHonest",
    "WeightPoison",
    "SelectiveTail",
)


def one_run(adversary: str, run_dir: Path, settle_s: float, depth: int = 1) -> dict[str, Any]:
    options = LocalOptions(validators=1, run_dir=run_dir, baseline=False, progress=False)
    net = LocalNetwork(options)
    # Every miner at IOTA_PIPELINE_DEPTH `depth`, and an orchestrator that admits it (reports at once, audited).
    net.common["IOTA_PIPELINE_DEPTH"] = str(depth)
    net.orch_env["IOTA_MAX_LEASES_HELD"] = str(max(4, 2 * depth + 2))
    started = time.time()
    try:
        net.start_orchestrator()
        stages = net.settings.stages
        miners = [net.add_miner() for _ in range(2 * stages - 1)]
        net.wait_until(lambda s: all(stage.miners for stage in s.stages), timeout_s=300)
        last = net.add_miner(adversary="" if adversary == HONEST else adversary)
        net.add_validator()
        train_start = time.time()
        status = net.wait_until(lambda s: s.phase == "done", timeout_s=3600)
        wall = time.time() - train_start
        time.sleep(settle_s)  # the validator audits the finished epochs; the orchestrator confirms
        net.stop([*miners, last], timeout_s=30)
        net.stop([name for name in net.procs if name.startswith("validator")], timeout_s=60)
        log = net.scores_log()
        status = net.status() or status
    finally:
        net.stop()
    report = run_report(net.settings, status, net.run_dir, wall, started, net.orch_env, options)
    cheater = net.hotkey(last)
    honest = {net.hotkey(name) for name in miners} | ({cheater} if adversary == HONEST else set())
    confirmed = confirmed_failures(log["verdicts"])
    caught = sorted(epoch for miner, epoch in confirmed if miner == cheater)
    failing = [v for v in log["verdicts"] if not v["passed"]]
    stage = next((st.index for st in status.stages for m in st.miners if m.hotkey == cheater), None)
    return {
        "adversary": adversary,
        "stage": stage,
        "caught": bool(caught) if adversary != HONEST else None,
        "epoch": caught[0] if caught else None,
        "weight": compute_scores(log).get(cheater, 0.0),
        "eval_loss": report["eval_loss"],
        "audits": len(log["verdicts"]),
        "false_failing": sum(1 for v in failing if v["miner"] in honest),
        "false_confirmed": sum(1 for miner, _ in confirmed if miner in honest),
        "seconds": time.time() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adversaries", nargs="+", default=list(ADVERSARIES), choices=ADVERSARIES)
    parser.add_argument("--runs", type=int, default=5, help="runs per adversary, and honest runs")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds of auditing after the run")
    parser.add_argument("--depth", type=int, default=1, help="every miner's IOTA_PIPELINE_DEPTH")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="iota-cheaters-") as tmp:
        for adversary in [HONEST, *args.adversaries]:
            for run in range(args.runs):
                row = one_run(adversary, Path(tmp) / f"{adversary}-{run}", args.settle, args.depth)
                rows.append(row)
                print(json.dumps(row), flush=True)
    honest = [r["eval_loss"] for r in rows if r["adversary"] == HONEST and r["eval_loss"] is not None]
    reference = statistics.mean(honest) if honest else float("nan")
    print(f"\nhonest runs: held-out {reference:.4f} (mean of {len(honest)})")
    print("adversary             caught  epochs to detection  weight  held-out  gap to honest")
    for adversary in [HONEST, *args.adversaries]:
        mine = [r for r in rows if r["adversary"] == adversary]
        losses = [r["eval_loss"] for r in mine if r["eval_loss"] is not None]
        loss = statistics.mean(losses) if losses else float("nan")
        caught = f"{sum(bool(r['caught']) for r in mine)}/{len(mine)}" if adversary != HONEST else "-"
        epochs = [r["epoch"] for r in mine if r["epoch"] is not None]
        when = f"{statistics.mean(epochs) + 1:.1f}" if epochs else "-"
        weight = statistics.mean(r["weight"] for r in mine)
        gap = (loss - reference) / reference
        print(f"{adversary:21s} {caught:>6s}  {when:>19s}  {weight:6.3f}  {loss:8.4f}  {gap:+12.2%}")
    audits = sum(r["audits"] for r in rows)
    failing = sum(r["false_failing"] for r in rows)
    confirmed = sum(r["false_confirmed"] for r in rows)
    print(
        f"\nfalse positives: {failing} failing verdicts and {confirmed} confirmed failures of honest miners "
        f"over {audits} audits in {len(rows)} runs"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
