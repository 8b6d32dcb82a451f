"""The `iota` subcommands that set a network up and operate it: wallet, chain, run (operator), config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iota.cli.common import load_keypair, sentence
from iota.config import MinerSettings, env_example
from iota.config.settings import ROLES, SettingsError, load, shown, source


def cmd_wallet(args: argparse.Namespace) -> int:
    from iota.auth import create_wallet

    wallet = create_wallet(args.path, args.name, args.hotkey, exist_ok=True)
    print(f"wallet {args.name}/{args.hotkey}: hotkey {wallet.hotkey.ss58_address}")
    return 0


def cmd_chain(args: argparse.Namespace) -> int:
    from iota.chain.local import register_command

    hotkey, coldkey = args.hotkey, args.coldkey
    if args.wallet:  # the wallet's own keys: nothing to copy and paste
        from bittensor import Wallet

        wallet = Wallet(
            name=args.wallet, hotkey=args.wallet_hotkey, path=str(Path(args.wallet_path).expanduser())
        )
        if not wallet.hotkey_file.exists_on_device():
            print(
                f"iota: error: no hotkey at {wallet.hotkey_file.path}; create it with `iota wallet create`",
                file=sys.stderr,
            )
            return 2
        hotkey, coldkey = wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address
    if not hotkey:
        print(
            "iota: error: name the hotkey: --wallet NAME (its hotkey and coldkey) or --hotkey SS58",
            file=sys.stderr,
        )
        return 2
    neuron = register_command(Path(args.chain_path), hotkey, coldkey or hotkey, args.stake, args.validator)
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
        print(f"refused ({error.status}): {sentence(error.detail)}")
        return 1
    print(ack.detail)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "check":
        return config_check([args.role] if args.role else list(ROLES))
    sys.stdout.write(env_example())
    return 0


def config_check(roles: list[str]) -> int:
    """What each role would run with here (value and where it comes from) and every problem it would stop on:
    the settings that do not parse, those it cannot do without, its wallet. 0 when every role could start."""
    failed = False
    for role in roles:
        print(f"{role}:")
        try:
            settings = load(ROLES[role])
            load_keypair(settings)  # type: ignore[arg-type]  # every role's settings hold a wallet
        except SettingsError as error:
            failed = True
            for problem in error.problems:
                print(f"  problem: {problem}")
            continue
        for name in type(settings).model_fields:
            print(f"  IOTA_{name.upper():<28} {shown(name, getattr(settings, name)):<40} ({source(name)})")
        print("  no problems")
    return 2 if failed else 0


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
    p.add_argument("--wallet", default="", help="wallet name: register its hotkey with its coldkey")
    p.add_argument("--wallet-path", default="~/.bittensor/wallets")
    p.add_argument("--wallet-hotkey", default="default", help="the wallet's hotkey name")
    p.add_argument("--hotkey", default="", help="ss58 address (instead of --wallet)")
    p.add_argument("--coldkey", default="", help="ss58 address (instead of --wallet); default: the hotkey")
    p.add_argument("--stake", type=float, default=0.0)
    p.add_argument("--validator", action="store_true")
    p.set_defaults(func=cmd_chain)

    p = sub.add_parser("run", help="operator controls: pause, resume, close-epoch, ban, unban, set-flag")
    p.add_argument("action", choices=["pause", "resume", "close-epoch", "ban", "unban", "set-flag"])
    p.add_argument("target", nargs="?", help="hotkey (ban, unban) or flag name (set-flag)")
    p.add_argument("value", nargs="?", help="reason (ban) or flag value (set-flag)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "config",
        help="print .env.example (every setting with its default), or `iota config check`: what each role "
        "would use here, and any problem",
    )
    p.add_argument("action", nargs="?", choices=["example", "check"], default="example")
    p.add_argument("--role", choices=list(ROLES), default=None, help="check this role only (default: all)")
    p.set_defaults(func=cmd_config)
