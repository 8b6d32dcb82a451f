"""`iota local`: the whole network on one machine, start to finish.

Each role is an `iota <role>` subprocess (iota.local.network): wallets are created and registered on a
file-backed LocalChain in the run directory; the orchestrator serves a local object store (or uses an S3
endpoint); every process logs to run_dir/logs. Each phase prints its progress (iota.local.progress): the
orchestrator's start-up, then the dashboard's URL, the tokens trained of the run's total with an ETA, and at the
end the checkpoint pulled and evaluated on held-out data, the baseline, and a JSON report (iota.local.report).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

from loguru import logger

from iota.local.network import LOCAL_DEFAULTS, LocalNetwork, LocalOptions, free_port
from iota.local.progress import step
from iota.local.report import baseline, print_summary, run_report, scores
from iota.protocol import Status

__all__ = ["LOCAL_DEFAULTS", "LocalNetwork", "LocalOptions", "free_port", "run_local"]


def run_local(options: LocalOptions) -> dict[str, Any]:
    if options.validators == 0 and options.snapshot_rate is None:
        # Nobody will audit this run, so snapshot challenges would only cost the miners (and the pipeline) time.
        options = replace(options, snapshot_rate=0.0)
    net = LocalNetwork(options)
    n_miners = net.settings.stages * options.miners_per_stage
    # The cores this process may use (its affinity, which taskset and cgroups set), not the host's.
    threads = max(1, len(os.sched_getaffinity(0)) // n_miners)
    started = time.time()
    shown = options.progress
    settings = net.settings
    if shown:
        print(
            f"iota local: {n_miners} miners on {settings.stages} stages, {options.validators} validators, "
            f"preset {settings.preset}, {settings.epochs} epochs; run directory {net.run_dir}",
            flush=True,
        )
    try:
        with step("starting the orchestrator", enabled=shown) as starting:
            # It prepares the data first (minutes, the first time): its own last log line says how far it is.
            net.start_orchestrator(watch=lambda: starting.update(0, net.log_tail("orchestrator")))
        if shown:
            print(f"dashboard: {net.url}/  (logs: {net.run_dir / 'logs'})", flush=True)
        for _ in range(n_miners):
            net.add_miner(threads=threads)
        validators = [net.add_validator() for _ in range(options.validators)]
        train_start = time.time()
        run = net.run_info()
        planned = settings.epochs * settings.samples_per_epoch * run.micro_batch_tokens  # 0: until stopped
        miners_gone = lambda st: all(net.procs[m].poll() is not None for m in net.miner_names)  # noqa: E731
        with step("training", total=planned, unit="tok", enabled=shown) as training:
            status = net.wait_until(
                lambda st: st.phase == "done" or miners_gone(st),
                24 * 3600,
                watch=lambda st: training.update(
                    st.tokens_trained, training_note(st, settings.epochs, n_miners)
                ),
            )
            training.update(status.tokens_trained, training_note(status, settings.epochs, n_miners))
        if status.phase != "done":
            logger.error("every miner exited before the run finished; see {}", net.run_dir / "logs")
        wall = time.time() - train_start
        with step("stopping the miners and validators", enabled=shown):
            net.stop(net.miner_names, timeout_s=30)
            net.stop(validators, timeout_s=60)  # each sets its weights once more on the way out
            status = net.status() or status
            audits = scores(net)
    finally:
        with step("stopping the orchestrator", enabled=shown):
            net.stop()
    report = run_report(net.settings, status, net.run_dir, wall, started, net.orch_env, options)
    report["scores"] = audits
    if options.baseline:
        report["baseline"] = baseline(
            net.settings, report["tokens_trained"], options.miners_per_stage, options.progress
        )
    print_summary(report, net.run_dir)
    return report


def training_note(status: Status, epochs: int, miners: int) -> str:
    """What the training line says beside the count: the epoch of how many, and what the network is doing."""
    epoch = f"epoch {min(status.epoch + 1, epochs)}/{epochs}" if epochs else f"epoch {status.epoch + 1}"
    alive = sum(m.alive for stage in status.stages for m in stage.miners)
    if status.tokens_trained == 0 and alive < miners:
        return f"{epoch}: {alive} of {miners} miners registered (each loads its stage and the data first)"
    loss = "-" if status.latest_loss is None else f"{status.latest_loss:.3f}"
    paused = " (paused)" if status.paused else ""
    return (
        f"{epoch} {status.phase}{paused}, loss {loss}, {alive}/{miners} miners, "
        f"{status.samples_in_flight} samples in flight, {status.samples_requeued} requeued"
    )
