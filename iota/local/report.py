"""The JSON report of an `iota local` run, and the summary printed at its end.

Throughput, the loss curve, the latest checkpoint's held-out loss, the audits and weights, and the baseline
trained on the same tokens."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from iota.config import RunSettings
from iota.local.network import LocalNetwork, LocalOptions
from iota.local.progress import step
from iota.protocol import Status


def scores(net: LocalNetwork) -> dict[str, Any]:
    """Audits, the weights the score log implies, and what each validator set on the local chain."""
    try:
        log = httpx.get(f"{net.url}/scores", timeout=30).json()
    except (httpx.HTTPError, ValueError):
        return {}
    from iota.audit.scoring import ORCHESTRATOR, compute_scores

    verdicts = log["verdicts"]
    replayed = [int(v.get("hops", 0)) for v in verdicts if v["validator"] != ORCHESTRATOR]
    return {
        "audits": len(verdicts),
        "audits_failed": sum(1 for v in verdicts if not v["passed"]),
        # what auditing cost, in hops (a replayed hop costs about what computing it did)
        "hops_done": sum(int(row["hops"]) for rows in log["work"].values() for row in rows),
        "hops_replayed": sum(replayed),
        "hops_recomputed": sum(int(v.get("hops", 0)) for v in verdicts if v["validator"] == ORCHESTRATOR),
        "weights": compute_scores(log),
        "uids": log["uids"],
        "chain_weights": {hk: dict(entry.weights) for hk, entry in net.chain.weights().items()},
    }


def run_report(
    settings: RunSettings,
    status: Status | None,
    run_dir: Path,
    wall: float,
    started: float,
    orch_env: dict[str, str],
    options: LocalOptions,
) -> dict[str, Any]:
    if status is None:
        raise RuntimeError(f"no status from the orchestrator; see {run_dir / 'logs'}")
    checkpoint, eval_loss = _pull_and_eval(settings, run_dir, orch_env, options.progress)
    curve = [list(p) for p in status.loss_curve]
    tail = [loss for _, loss in status.loss_curve[-8:]]
    miners = [m.model_dump() for st in status.stages for m in st.miners]
    return {
        "preset": settings.preset,
        "tokens_trained": status.tokens_trained,
        "wall_seconds": wall,
        "tokens_per_second": status.tokens_trained / wall if wall > 0 else 0.0,
        "loss_curve": curve,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "eval_loss": eval_loss,
        "epochs_completed": status.epoch,
        "stages": [
            {"index": st.index, "miners": len(st.miners), "hops_done": sum(m.hops_done for m in st.miners)}
            for st in status.stages
        ],
        "miners": miners,
        "bytes_transferred": status.bytes_transferred,
        "samples_completed": status.samples_completed,
        "samples_lost": status.samples_lost,
        "samples_requeued": status.samples_requeued,
        "scores": {},
        "checkpoint": str(checkpoint) if checkpoint else None,
        "run_dir": str(run_dir),
        "settings": settings.model_dump(mode="json"),
        "miners_per_stage": options.miners_per_stage,
        "total_seconds": time.time() - started,
    }


def _pull_and_eval(
    settings: RunSettings, run_dir: Path, env: dict[str, str], shown: bool = True
) -> tuple[Path | None, float | None]:
    """The latest checkpoint into run_dir/checkpoint, and its held-out loss (the orchestrator never trains)."""
    with step("pulling the latest checkpoint", enabled=shown) as pulling:
        # Inside the step: these imports load torch, seconds on a busy machine.
        from iota.checkpoint import eval_command, find_prepared, latest_epoch, pull_checkpoint
        from iota.storage import LocalStore, S3Store

        if env.get("IOTA_STORE") == "s3":
            store: Any = S3Store(
                "iota",
                endpoint_url=env["IOTA_S3_ENDPOINT"],
                access_key=env["IOTA_S3_ACCESS_KEY"],
                secret_key=env["IOTA_S3_SECRET_KEY"],
            )
        else:
            store = LocalStore(run_dir / "orchestrator" / "store", "http://unused", b"local-read-only-secret")
        epoch = latest_epoch(store, "local")
        if epoch is None:
            return None, None
        pulling.update(0, f"epoch {epoch}")
        manifest = json.loads(store.get(f"runs/local/checkpoints/{epoch}/manifest.json"))
        prepared = find_prepared(settings.data_dir, manifest["data"])
        out = pull_checkpoint(store, "local", epoch, run_dir / "checkpoint", tokenizer_dir=prepared)
    with step(f"evaluating it on {settings.heldout_samples} held-out samples", enabled=shown):
        report = eval_command(out, settings.data_dir, settings.heldout_samples, out / "eval.json")
    return out, float(report["eval_loss"])


def baseline(settings: RunSettings, tokens: int, replicas: int, shown: bool = True) -> dict[str, Any]:
    """The same tokens trained in one process (then evaluated): what the network's losses are compared with."""
    from iota.train.baseline import train_baseline
    from iota.train.run import build_run

    if tokens <= 0:
        return {}
    # On a terminal the baseline's own bar (tqdm, on stderr) counts its steps with an ETA; elsewhere tqdm is
    # silent, and this step's line counts them instead.
    own_bar = shown and sys.stderr.isatty()
    with step(
        f"baseline: the same {tokens:,} tokens in one process, then evaluated",
        beat=not own_bar,
        enabled=shown,
        unit="steps",
    ) as progress:

        def on_step(done: int, steps: int, loss: float) -> None:
            progress.total = steps
            progress.update(done, f"loss {loss:.3f}")

        report = train_baseline(
            build_run(settings),
            tokens,
            replicas=replicas,
            progress=own_bar,
            on_step=None if own_bar else on_step,
        )
    return {
        k: report[k]
        for k in (
            "tokens_trained",
            "wall_seconds",
            "tokens_per_second",
            "final_loss",
            "eval_loss",
            "unigram_entropy",
        )
    }


def print_summary(report: dict[str, Any], run_dir: Path) -> None:
    curve = report["loss_curve"]
    first = curve[0][1] if curve else float("nan")
    lines = [
        "",
        f"iota local: {report['tokens_trained']} tokens trained in {report['wall_seconds']:.0f} s "
        f"({report['tokens_per_second']:.0f} tok/s) over {report['epochs_completed']} epochs",
        f"  loss: {first:.3f} at the start -> {report['final_loss'] or float('nan'):.3f} at the end; "
        f"held-out {report['eval_loss'] if report['eval_loss'] is not None else float('nan'):.3f}",
    ]
    if report.get("baseline"):
        b = report["baseline"]
        lines.append(
            f"  baseline (one process, same tokens): held-out {b['eval_loss']:.3f}; "
            f"unigram entropy of the corpus {b['unigram_entropy']:.3f}"
        )
    audits = report.get("scores") or {}
    if audits.get("audits"):
        share = audits["hops_replayed"] / max(audits["hops_done"], 1)
        lines.append(
            f"  audits: {audits['audits']} ({audits['audits_failed']} failed), replaying {audits['hops_replayed']} "
            f"hops against {audits['hops_done']} done ({share:.0%} of the miners' hop compute; the "
            f"orchestrator recomputed {audits['hops_recomputed']})"
        )
    lines += [
        f"  samples: {report['samples_completed']} completed, {report['samples_requeued']} requeued, "
        f"{report['samples_lost']} lost",
        f"  checkpoint: {report['checkpoint']}",
        f"  logs: {run_dir / 'logs'}",
    ]
    print("\n".join(lines))
