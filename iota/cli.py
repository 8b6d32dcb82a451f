"""The `iota` command: each subcommand reads its settings once and calls into the package."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from iota.config import MinerSettings, OrchestratorSettings, RunSettings, ValidatorSettings, env_example
from iota.config.settings import ChainSettings, WalletSettings, load


def _settings_help(cls: type) -> str:
    """Every setting of a role, for --help: they come from .env or the environment (IOTA_NAME=value)."""
    lines = ["settings (environment or .env, as IOTA_<NAME>):"]
    for name, info in cls.model_fields.items():  # type: ignore[attr-defined]
        lines.append(f"  IOTA_{name.upper():<26} {info.description} (default: {info.default})")
    return "\n".join(lines)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """--preset, --stages, ... : command-line overrides of the run settings."""
    for name, info in RunSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind: type = info.annotation if info.annotation in (int, float) else str  # type: ignore[assignment]
        parser.add_argument(
            flag, dest=f"run_{name}", metavar=name.upper(), type=kind, default=None, help=info.description
        )


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("run_") and v is not None}


def _write_report(report: dict[str, Any], path: str | None) -> None:
    text = json.dumps(report, indent=1)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"report written to {path}")


def _keypair(settings: WalletSettings) -> Any:
    from iota.auth import load_hotkey

    return load_hotkey(settings.wallet_path, settings.wallet_name, settings.wallet_hotkey)


def _chain(settings: ChainSettings) -> Any:
    if settings.chain == "local":
        from iota.chain.local import LocalChain

        return LocalChain(settings.chain_path)
    from iota.chain.bittensor import BittensorChain

    return BittensorChain(settings.network, settings.netuid, settings.metagraph_sync_s)


# -- commands ------------------------------------------------------------------------------------------------


def cmd_orchestrator(args: argparse.Namespace) -> int:
    import uvicorn

    from iota.orchestrator.app import assemble, server_options

    settings = load(OrchestratorSettings, **_run_overrides(args))
    keypair = _keypair(settings)
    assembled = assemble(settings, _chain(settings), keypair.ss58_address)
    uvicorn.run(assembled.app, **server_options(settings))
    return 0


def cmd_miner(args: argparse.Namespace) -> int:
    if args.action == "status":
        return _miner_status(load(MinerSettings))
    import torch
    from loguru import logger

    from iota.client.orchestrator import OrchestratorClient
    from iota.miner.main import Miner
    from iota.train.worker import StageWorker

    settings = load(MinerSettings)
    device = _device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    keypair = _keypair(settings)
    client = OrchestratorClient(settings.orchestrator_url, keypair, settings.orchestrator_hotkey)
    memory = int(settings.memory_gb * 2**30) or _device_memory(device)
    miner_dir = Path(settings.miner_dir)
    miner_dir.mkdir(parents=True, exist_ok=True)
    factory = StageWorker
    if settings.adversary:
        from iota.audit import adversaries

        factory = getattr(adversaries, settings.adversary)
        logger.warning("this miner cheats on purpose ({}): validators will catch it", settings.adversary)
    miner = Miner(
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

    keypair = _keypair(settings)
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


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _device_memory(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cmd_validator(args: argparse.Namespace) -> int:
    settings = load(ValidatorSettings)
    keypair = _keypair(settings)
    validator_dir = Path(settings.validator_dir)
    validator_dir.mkdir(parents=True, exist_ok=True)
    if args.action == "status":
        return _validator_status(settings, keypair.ss58_address, validator_dir)
    from iota.client.orchestrator import OrchestratorClient
    from iota.validator.main import ValidatorDaemon

    client = OrchestratorClient(settings.orchestrator_url, keypair, settings.orchestrator_hotkey)
    daemon = ValidatorDaemon(
        client,
        _chain(settings),
        keypair,
        _device(settings.device),
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


def cmd_baseline(args: argparse.Namespace) -> int:
    from iota.train.baseline import train_baseline
    from iota.train.run import build_run

    run = build_run(load(RunSettings, **_run_overrides(args)))
    report = train_baseline(
        run, args.tokens, replicas=args.replicas, device=args.device, bf16=args.bf16, threads=args.threads
    )
    print(
        f"baseline: {report['tokens_trained']} tokens in {report['wall_seconds']:.1f} s "
        f"({report['tokens_per_second']:.0f} tok/s); final loss {report['final_loss']:.3f}, "
        f"held-out {report['eval_loss']:.3f}, unigram entropy {report['unigram_entropy']:.3f}"
    )
    _write_report(report, args.report)
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
        overrides=_run_overrides(args),
        s3_access_key=operator.s3_access_key or "test",
        s3_secret_key=operator.s3_secret_key or "test",
    )
    report = run_local(options)
    _write_report(report, args.report)
    return 0 if report.get("samples_lost", 0) == 0 else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from iota.checkpoint import eval_command

    settings = load(RunSettings)
    report = eval_command(
        Path(args.checkpoint),
        settings.data_dir,
        args.samples or settings.heldout_samples,
        Path(args.report) if args.report else None,
    )
    print(
        f"held-out loss {report['eval_loss']:.4f} on {report['n_samples']} samples (epoch {report['epoch']})"
    )
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Pull a published checkpoint from the run's bucket into a local directory (the operator's settings)."""
    from iota.checkpoint import find_prepared, latest_epoch, pull_checkpoint
    from iota.orchestrator.app import make_store

    settings = load(OrchestratorSettings)
    store, _ = make_store(settings)
    epoch = latest_epoch(store, settings.run_id) if args.epoch is None else args.epoch
    if epoch is None:
        print(f"run {settings.run_id} has no published checkpoint in its bucket")
        return 1
    manifest = json.loads(store.get(f"runs/{settings.run_id}/checkpoints/{epoch}/manifest.json"))
    try:
        tokenizer_dir = find_prepared(settings.data_dir, manifest["data"])
    except ValueError as error:
        print(f"note: no tokenizer attached ({error}); eval works, export and generate need it")
        tokenizer_dir = None
    out = pull_checkpoint(store, settings.run_id, epoch, Path(args.out), tokenizer_dir=tokenizer_dir)
    print(f"checkpoint {epoch} of run {settings.run_id} written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from iota.checkpoint import export_hf, export_native

    out = (export_hf if args.format == "hf" else export_native)(Path(args.checkpoint), Path(args.out))
    print(f"exported to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from iota.checkpoint import generate

    print(generate(Path(args.checkpoint), args.prompt, args.max_new_tokens, args.temperature, args.seed))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from iota.data import prepare_command

    out = prepare_command([Path(p) for p in args.paths], args.tokenizer, args.vocab_size, Path(args.out))
    print(f"prepared {out}")
    return 0


def cmd_wallet(args: argparse.Namespace) -> int:
    from iota.auth import create_wallet

    wallet = create_wallet(args.path, args.name, args.hotkey, exist_ok=True)
    print(f"wallet {args.name}/{args.hotkey}: hotkey {wallet.hotkey.ss58_address}")
    return 0


def cmd_chain(args: argparse.Namespace) -> int:
    from iota.chain.local import register_command

    neuron = register_command(
        Path(args.chain_path), args.hotkey, args.coldkey or args.hotkey, args.stake, args.validator
    )
    print(
        f"registered uid {neuron.uid}: {neuron.hotkey} (stake {neuron.stake}, validator {neuron.validator_permit})"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Operator controls, signed with the operator's hotkey (IOTA_WALLET_* settings)."""
    from iota.client.orchestrator import OrchestratorClient, Refused
    from iota.protocol import Ack

    settings = load(MinerSettings)
    client = OrchestratorClient(
        settings.orchestrator_url, _keypair(settings), settings.orchestrator_hotkey, give_up_s=30
    )
    try:
        ack = client.call(
            "POST",
            f"/operator/{args.action}",
            Ack,
            params={"target": args.target or "", "value": args.value or ""},
        )
    except Refused as error:
        print(f"refused: {error}")
        return 1
    print(ack.detail)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(env_example())
    return 0


# -- parser --------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="iota", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "orchestrator",
        help="run the orchestrator",
        epilog=_settings_help(OrchestratorSettings),
        formatter_class=raw,
    )
    _add_run_options(p)
    p.set_defaults(func=cmd_orchestrator)

    p = sub.add_parser(
        "miner",
        help="run a miner, or `iota miner status`",
        epilog=_settings_help(MinerSettings),
        formatter_class=raw,
    )
    p.add_argument("action", nargs="?", choices=["run", "status"], default="run")
    p.set_defaults(func=cmd_miner)

    p = sub.add_parser(
        "validator",
        help="run a validator, or `iota validator status`",
        epilog=_settings_help(ValidatorSettings),
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
    _add_run_options(p)
    p.set_defaults(func=cmd_local)

    p = sub.add_parser("baseline", help="train the whole model in one process on the run's samples")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--report", default=None)
    p.add_argument(
        "--replicas", type=int, default=1, help="global batch of this many replicas per inner step"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, default=0)
    _add_run_options(p)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("eval", help="held-out loss of a checkpoint directory")
    p.add_argument("checkpoint")
    p.add_argument("--report", default=None)
    p.add_argument("--samples", type=int, default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "checkpoint", help="`iota checkpoint pull --out DIR`: a checkpoint from the run's bucket"
    )
    p.add_argument("action", choices=["pull"])
    p.add_argument("--epoch", type=int, default=None, help="default: the latest complete one")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("export", help="export a checkpoint (hf: transformers LlamaForCausalLM)")
    p.add_argument("checkpoint")
    p.add_argument("--format", choices=["hf", "native"], default="hf")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="continue a prompt with a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("data", help="`iota data prepare PATHS... --out DIR`: tokenize a corpus into shards")
    p.add_argument("action", choices=["prepare"])
    p.add_argument("paths", nargs="*", help=".txt/.jsonl/.parquet files or folders; none: the KJV Bible")
    p.add_argument("--tokenizer", choices=["bpe", "llama3"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "wallet", help="`iota wallet create`: a coldkey and hotkey, without prompts (local use)"
    )
    p.add_argument("action", choices=["create"])
    p.add_argument("--path", default="~/.bittensor/wallets")
    p.add_argument("--name", default="default")
    p.add_argument("--hotkey", default="default")
    p.set_defaults(func=cmd_wallet)

    p = sub.add_parser("chain", help="`iota chain register`: add a hotkey to the local chain")
    p.add_argument("action", choices=["register"])
    p.add_argument("--chain-path", default="runs/chain.json")
    p.add_argument("--hotkey", required=True, help="ss58")
    p.add_argument("--coldkey", default="")
    p.add_argument("--stake", type=float, default=0.0)
    p.add_argument("--validator", action="store_true")
    p.set_defaults(func=cmd_chain)

    p = sub.add_parser("run", help="operator controls: pause, resume, close-epoch, ban, unban, set-flag")
    p.add_argument("action", choices=["pause", "resume", "close-epoch", "ban", "unban", "set-flag"])
    p.add_argument("target", nargs="?", help="hotkey (ban, unban) or flag name (set-flag)")
    p.add_argument("value", nargs="?", help="reason (ban) or flag value (set-flag)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="print .env.example: every setting with its default")
    p.set_defaults(func=cmd_config)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
