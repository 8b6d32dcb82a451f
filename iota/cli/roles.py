"""The `iota` subcommands that run the roles: orchestrator, miner, validator, local (all on this machine)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iota.cli.common import (
    add_run_options,
    device_memory,
    load_keypair,
    make_chain,
    pick_device,
    run_overrides,
    sentence,
    settings_help,
    write_report,
)
from iota.config import MinerSettings, OrchestratorSettings, RunSettings, ValidatorSettings
from iota.config.settings import SettingsError, load

if TYPE_CHECKING:
    from iota.protocol import Status
    from iota.train.worker import StageWorker


def cmd_orchestrator(args: argparse.Namespace) -> int:
    settings = load(OrchestratorSettings, **run_overrides(args))  # first: a bad value stops it in a second
    keypair = load_keypair(settings)
    import uvicorn
    from loguru import logger

    from iota.orchestrator.app import server_options
    from iota.orchestrator.assembly import assemble
    from iota.orchestrator.preflight import banner, preflight

    # Before anything is migrated or prepared: a missing bucket or database is one line, not a late traceback.
    problems = preflight(settings, lambda: make_chain(settings))
    if problems:
        raise SettingsError(problems)
    for line in banner(settings, keypair.ss58_address):
        logger.info(line)
    assembled = assemble(settings, make_chain(settings), keypair.ss58_address)
    uvicorn.run(assembled.app, **server_options(settings))
    return 0


def cmd_miner(args: argparse.Namespace, worker_factory: type[StageWorker] | None = None) -> int:
    """`iota miner`; `worker_factory` replaces the stage worker (bench/emulate.py: compute slept, not run)."""
    settings = load(MinerSettings)
    if args.action == "status":
        return _miner_status(settings)
    keypair = load_keypair(settings)
    import torch
    from loguru import logger

    from iota.client.orchestrator import OrchestratorClient
    from iota.miner.main import MinerDaemon
    from iota.train.worker import StageWorker

    device = pick_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    client = OrchestratorClient(settings.orchestrator_url, keypair, settings.orchestrator_hotkey)
    memory = int(settings.memory_gb * 2**30) or device_memory(device)
    miner_dir = Path(settings.miner_dir)
    miner_dir.mkdir(parents=True, exist_ok=True)
    factory = worker_factory or StageWorker
    if settings.adversary:
        from iota.audit import adversaries

        cheat = getattr(adversaries, settings.adversary, None)
        if not (isinstance(cheat, type) and issubclass(cheat, StageWorker)):
            why = "not a class of iota.audit.adversaries (tests and demos only)"
            raise SettingsError([f"IOTA_ADVERSARY={settings.adversary}: {why}"])
        factory = cheat
        logger.warning("this miner cheats on purpose ({}): validators will catch it", settings.adversary)
    miner = MinerDaemon(
        client,
        device,
        settings.autocast,
        settings.cache_size,
        memory,
        miner_dir,
        status_file=miner_dir / f"status-{keypair.ss58_address}.json",
        worker_factory=factory,
        hold_s=settings.hold_s,
        depth=settings.pipeline_depth,
    )
    if settings.health_port:
        from iota.miner.health import serve_health

        serve_health(settings.health_port, miner.snapshot)
    miner.run_forever()
    return 0


def _miner_status(settings: MinerSettings) -> int:
    """What a miner operator checks: whether the orchestrator accepts this miner's signed requests, its stage and
    work done, and why it is idle when it is (0: accepted, 1: refused or unreachable).

    The check is a signed heartbeat, the call a running miner makes: an unsigned read would say "alive" while
    every request of the daemon with the same settings is refused (a wrong IOTA_ORCHESTRATOR_HOTKEY, a hotkey
    not registered). A registered miner's heartbeat also counts as a sign of life, for one miner_timeout_s."""
    from iota.client.orchestrator import OrchestratorClient, Refused

    keypair = load_keypair(settings)
    local = Path(settings.miner_dir) / f"status-{keypair.ss58_address}.json"
    mine = json.loads(local.read_text()) if local.exists() else {}
    client = OrchestratorClient(
        settings.orchestrator_url, keypair, settings.orchestrator_hotkey, give_up_s=10
    )
    print(f"hotkey      {keypair.ss58_address}")
    try:
        status = client.status()
        print(f"run         {status.run_id}, epoch {status.epoch}, phase {status.phase}")
        client.heartbeat()
    except ConnectionError as error:
        print(f"orchestrator unreachable at {settings.orchestrator_url}: {error}")
        return 1
    except Refused as error:
        print(f"refused     {_refusal_hint(client, settings, error)}")
        return 1
    me = next((m for st in status.stages for m in st.miners if m.hotkey == keypair.ss58_address), None)
    if me is None or me.stage is None:
        print("registered  no: start the miner (bash start_miner.sh) and check its log")
        return 1
    print(f"stage       {me.stage}")
    print(f"state       {idle_reason(status, me.stage)}")
    compute = f", {mine['compute_s']:.0f} s computing" if "compute_s" in mine else ""
    print(f"work done   {me.hops_done} hops (this process: {mine.get('hops_done', '?')}{compute})")
    print(f"clock       offset {client.auth.offset_s:+.2f} s from the orchestrator")
    return 0


def _refusal_hint(client: Any, settings: MinerSettings, error: Any) -> str:
    """The refusal as a sentence, and for a key signed for the wrong orchestrator, the key to set (GET /run, which
    is not signed, names the right one)."""
    from iota.client.orchestrator import Refused

    detail = sentence(error.detail)
    if isinstance(error.detail, dict) and error.detail.get("code") == "wrong_receiver":
        try:
            actual = client.run_info().orchestrator_hotkey
        except (ConnectionError, Refused):
            return detail  # the refusal's own message names the server's hotkey too
        return (
            f"IOTA_ORCHESTRATOR_HOTKEY={settings.orchestrator_hotkey} is not this orchestrator's hotkey; "
            f"set IOTA_ORCHESTRATOR_HOTKEY={actual} ({detail})"
        )
    return detail


def idle_reason(status: Status, stage: int) -> str:
    """Why a registered miner on `stage` has no work, as the orchestrator's status shows it, or that it has some."""
    if status.paused:
        return "idle: the operator paused the run (`iota run resume`)"
    if status.phase == "done":
        return "idle: the run is complete"
    if status.phase != "train":
        return f"end of epoch {status.epoch}: {status.phase} phase (miners upload, merge and apply weights)"
    mine = next((st for st in status.stages if st.index == stage), None)
    if mine is None:
        return f"idle: stage {stage} is not in this run"
    if mine.paused:
        return f"idle: {mine.paused}"
    if mine.queued_forward + mine.queued_backward + mine.leased == 0:
        empty = [st.index for st in status.stages if not st.miners or st.paused]
        why = f" (no live miner on stage {', '.join(map(str, empty))})" if empty else ""
        return f"idle: waiting for other stages to send work to stage {stage}{why}"
    return (
        f"training: stage {stage} has {mine.queued_forward} forward and {mine.queued_backward} backward queued, "
        f"{mine.leased} in progress"
    )


def cmd_validator(args: argparse.Namespace) -> int:
    settings = load(ValidatorSettings)
    keypair = load_keypair(settings)
    validator_dir = Path(settings.validator_dir)
    validator_dir.mkdir(parents=True, exist_ok=True)
    if args.action == "status":
        return _validator_status(settings, keypair.ss58_address, validator_dir)
    from loguru import logger

    from iota.client.orchestrator import OrchestratorClient
    from iota.validator.main import ValidatorDaemon

    client = OrchestratorClient(settings.orchestrator_url, keypair, settings.orchestrator_hotkey)
    daemon = ValidatorDaemon(
        client,
        make_chain(settings),
        keypair,
        pick_device(settings.device),
        settings.weights_interval_s,
        validator_dir,
        burn_uid=settings.burn_uid if settings.burn_uid >= 0 else None,
        burn_fraction=settings.burn_fraction,
        adversary=settings.adversary,
    )
    if settings.adversary:
        logger.warning(
            "this validator cheats on purpose ({}): recomputation proves it wrong", settings.adversary
        )
    if settings.health_port:
        from iota.miner.health import serve_health

        serve_health(
            settings.health_port, lambda: {k: v for k, v in daemon.status.items() if k != "last_weights"}
        )
    daemon.run_forever()
    return 0


def _validator_status(settings: ValidatorSettings, hotkey: str, validator_dir: Path) -> int:
    """What a validator operator checks: audits done and failed, the last weights set, the last error."""
    path = validator_dir / f"status-{hotkey}.json"
    if not path.exists():
        print(f"no status yet for {hotkey} in {validator_dir}: is the validator running?")
        return 1
    status = json.loads(path.read_text())
    last = status.get("last_weights")
    print(f"hotkey        {hotkey}")
    print(f"audits        {status['audits']} done, {status['failed']} failed")
    when = "never" if last is None else f"{len(last['weights'])} miners, {_ago(float(last['at']))}"
    print(f"last weights  {when}")
    if status.get("last_error"):
        print(f"warning       {status['last_error']}")
    return 0


def _ago(unix_time: float) -> str:
    """A moment as local time and how long ago: 2026-12-07 04:10:03 (12 min ago)."""
    seconds = max(0.0, time.time() - unix_time)
    if seconds < 120:
        ago = f"{seconds:.0f} s"
    elif seconds < 7200:
        ago = f"{seconds / 60:.0f} min"
    else:
        ago = f"{seconds / 3600:.1f} h"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(unix_time))} ({ago} ago)"


def local_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings `iota local` is given: a flag wins over IOTA_<NAME> from the environment or .env, and
    either wins over iota local's own defaults (those of a short run on one machine).

    Only a value other than the setting's default counts as chosen: setup.sh writes .env as a copy of
    .env.example, every setting at its default, and those lines would otherwise undo every default of iota local.
    """
    settings = load(RunSettings)
    fields = RunSettings.model_fields
    from_env = {
        name: value
        for name in settings.model_fields_set
        if (value := getattr(settings, name)) != fields[name].default
    }
    return {**from_env, **run_overrides(args)}


def cmd_local(args: argparse.Namespace) -> int:
    from iota.local import LocalOptions, run_local

    operator = load(OrchestratorSettings)
    options = LocalOptions(
        miners_per_stage=args.miners_per_stage,
        validators=args.validators,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        s3_endpoint=args.s3_endpoint,
        baseline=args.baseline,
        port=args.port,
        overrides=local_overrides(args),
        s3_access_key=operator.s3_access_key or "test",
        s3_secret_key=operator.s3_secret_key or "test",
    )
    report = run_local(options)
    keep_report(report, Path(args.report))
    return 0 if report.get("samples_lost", 0) == 0 else 1


def keep_report(report: dict[str, Any], latest: Path) -> Path:
    """Write the report to a new file of its own (NAME-<time>.json), and to `latest`, which always holds the last
    run's: a run no longer overwrites the one before it. Returns the new file."""
    kept = latest.with_name(f"{latest.stem}-{time.strftime('%Y%m%d-%H%M%S')}{latest.suffix}")
    write_report(report, str(kept))
    write_report(report, str(latest))
    return kept


class _LocalHelp(argparse.ArgumentDefaultsHelpFormatter):
    """`iota local --help`: each option with the default iota local uses. iota.local (slow to import) is read
    only when the help is printed, not on every `iota` command."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        from iota.local import LOCAL_DEFAULTS

        name = action.dest.removeprefix("run_")
        if action.dest.startswith("run_") and name in RunSettings.model_fields:  # not --run-dir
            default = LOCAL_DEFAULTS.get(name, RunSettings.model_fields[name].default)
            return f"{action.help} (default: {str(default).replace('%', '%%')})"
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "orchestrator",
        help="run the orchestrator",
        epilog=settings_help(OrchestratorSettings),
        formatter_class=raw,
    )
    add_run_options(p)
    p.set_defaults(func=cmd_orchestrator)

    p = sub.add_parser(
        "miner",
        help="run a miner, or `iota miner status`",
        epilog=settings_help(MinerSettings),
        formatter_class=raw,
    )
    p.add_argument("action", nargs="?", choices=["run", "status"], default="run")
    p.set_defaults(func=cmd_miner)

    p = sub.add_parser(
        "validator",
        help="run a validator, or `iota validator status`",
        epilog=settings_help(ValidatorSettings),
        formatter_class=raw,
    )
    p.add_argument("action", nargs="?", choices=["run", "status"], default="run")
    p.set_defaults(func=cmd_validator)

    p = sub.add_parser(
        "local",
        help="the whole network on this machine",
        description="The whole network on this machine. Run settings: a flag wins over IOTA_<NAME> from the "
        "environment or .env (where it differs from the setting's default), which wins over the default shown.",
        formatter_class=_LocalHelp,
    )
    p.add_argument("--miners-per-stage", type=int, default=2, help="miners on each stage")
    p.add_argument("--validators", type=int, default=1, help="validators auditing the run")
    p.add_argument("--run-dir", default=None, help="where the run's files go (default: runs/local-<time>)")
    p.add_argument(
        "--report",
        default="runs/local-report.json",
        help="the JSON report of the latest run; each run's is also kept as NAME-<time>.json beside it",
    )
    p.add_argument(
        "--s3-endpoint", default=None, help="use this S3-compatible endpoint instead of a local store"
    )
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train the baseline on the same tokens, for comparison",
    )
    p.add_argument("--port", type=int, default=0, help="orchestrator port; 0 picks a free one")
    add_run_options(p, show_defaults=False)
    p.set_defaults(func=cmd_local)
