"""The `iota` subcommands that run the roles: orchestrator, miner, validator, local (all on this machine)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from iota.cli.common import (
    add_run_options,
    device_memory,
    load_keypair,
    make_chain,
    pick_device,
    run_overrides,
    settings_help,
    write_report,
)
from iota.config import MinerSettings, OrchestratorSettings, ValidatorSettings
from iota.config.settings import load


def cmd_orchestrator(args: argparse.Namespace) -> int:
    import uvicorn

    from iota.orchestrator.app import server_options
    from iota.orchestrator.assembly import assemble

    settings = load(OrchestratorSettings, **run_overrides(args))
    keypair = load_keypair(settings)
    assembled = assemble(settings, make_chain(settings), keypair.ss58_address)
    uvicorn.run(assembled.app, **server_options(settings))
    return 0


def cmd_miner(args: argparse.Namespace) -> int:
    if args.action == "status":
        return _miner_status(load(MinerSettings))
    import torch
    from loguru import logger

    from iota.client.orchestrator import OrchestratorClient
    from iota.miner.main import MinerDaemon
    from iota.train.worker import StageWorker

    settings = load(MinerSettings)
    device = pick_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    keypair = load_keypair(settings)
    client = OrchestratorClient(settings.orchestrator_url, keypair, settings.orchestrator_hotkey)
    memory = int(settings.memory_gb * 2**30) or device_memory(device)
    miner_dir = Path(settings.miner_dir)
    miner_dir.mkdir(parents=True, exist_ok=True)
    factory = StageWorker
    if settings.adversary:
        from iota.audit import adversaries

        factory = getattr(adversaries, settings.adversary)
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
    )
    if settings.health_port:
        from iota.miner.health import serve_health

        serve_health(settings.health_port, miner.snapshot)
    miner.run_forever()
    return 0


def _miner_status(settings: MinerSettings) -> int:
    """What a miner operator checks: its stage, work done, and the run as the orchestrator sees it."""
    from iota.client.orchestrator import OrchestratorClient

    keypair = load_keypair(settings)
    local = Path(settings.miner_dir) / f"status-{keypair.ss58_address}.json"
    mine = json.loads(local.read_text()) if local.exists() else {}
    client = OrchestratorClient(
        settings.orchestrator_url, keypair, settings.orchestrator_hotkey, give_up_s=10
    )
    try:
        status = client.status()
    except ConnectionError as error:
        print(f"orchestrator unreachable at {settings.orchestrator_url}: {error}")
        return 1
    me = next((m for st in status.stages for m in st.miners if m.hotkey == keypair.ss58_address), None)
    print(f"hotkey      {keypair.ss58_address}")
    print(f"run         {status.run_id}, epoch {status.epoch}, phase {status.phase}")
    if me is None:
        print("registered  no: start the miner (bash start_miner.sh) and check its log")
        return 1
    print(f"stage       {me.stage} ({'alive' if me.alive else 'timed out'})")
    print(f"work done   {me.hops_done} hops (this process: {mine.get('hops_done', '?')})")
    print(f"clock       offset {client.auth.offset_s:+.2f} s from the orchestrator")
    return 0


def cmd_validator(args: argparse.Namespace) -> int:
    settings = load(ValidatorSettings)
    keypair = load_keypair(settings)
    validator_dir = Path(settings.validator_dir)
    validator_dir.mkdir(parents=True, exist_ok=True)
    if args.action == "status":
        return _validator_status(settings, keypair.ss58_address, validator_dir)
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
    when = "never" if last is None else f"{len(last['weights'])} miners, at unix time {last['at']:.0f}"
    print(f"last weights  {when}")
    if status.get("last_error"):
        print(f"warning       {status['last_error']}")
    return 0


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
        overrides=run_overrides(args),
        s3_access_key=operator.s3_access_key or "test",
        s3_secret_key=operator.s3_secret_key or "test",
    )
    report = run_local(options)
    write_report(report, args.report)
    return 0 if report.get("samples_lost", 0) == 0 else 1


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

    p = sub.add_parser("local", help="the whole network on this machine")
    p.add_argument("--miners-per-stage", type=int, default=2)
    p.add_argument("--validators", type=int, default=1)
    p.add_argument("--run-dir", default=None, help="default: runs/local-<time>")
    p.add_argument("--report", default=None, help="write the JSON report here")
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
    add_run_options(p)
    p.set_defaults(func=cmd_local)
