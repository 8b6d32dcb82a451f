"""The `iota` subcommands that set a network up and operate it: wallet, chain, run (operator), config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iota.cli.common import load_keypair
from iota.config import MinerSettings, env_example
from iota.config.settings import load


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
        settings.orchestrator_url, load_keypair(settings), settings.orchestrator_hotkey, give_up_s=30
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


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
