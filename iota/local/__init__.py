"""`iota local`: the whole network on one machine, start to finish.

Each role is an `iota <role>` subprocess (iota.local.network): wallets are created and registered on a
file-backed LocalChain in the run directory; the orchestrator serves a local object store (or uses an S3
endpoint); every process logs to run_dir/logs. Progress is printed while it trains; at the end the latest
checkpoint is pulled, evaluated on held-out data, and a JSON report written (iota.local.report).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

from loguru import logger

from iota.local.network import LOCAL_DEFAULTS, LocalNetwork, LocalOptions, free_port, tty
from iota.local.report import baseline, print_summary, run_report, scores

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
    try:
        net.start_orchestrator()
        for _ in range(n_miners):
            net.add_miner(threads=threads)
        validators = [net.add_validator() for _ in range(options.validators)]
        train_start = time.time()
        miners_gone = lambda st: all(net.procs[m].poll() is not None for m in net.miner_names)  # noqa: E731
        status = net.wait_until(lambda st: st.phase == "done" or miners_gone(st), 24 * 3600, options.progress)
        if tty() and options.progress:
            print()
        if status.phase != "done":
            logger.error("every miner exited before the run finished; see {}", net.run_dir / "logs")
        wall = time.time() - train_start
        net.stop(net.miner_names, timeout_s=30)
        net.stop(validators, timeout_s=60)  # each sets its weights once more on the way out
        status = net.status() or status
        audits = scores(net)
    finally:
        net.stop()
    report = run_report(net.settings, status, net.run_dir, wall, started, net.orch_env, options)
    report["scores"] = audits
    if options.baseline:
        report["baseline"] = baseline(net.settings, report["tokens_trained"], options.miners_per_stage)
    print_summary(report, net.run_dir)
    return report
