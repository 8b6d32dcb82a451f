"""What the `iota` subcommands share: settings help, run overrides, the hotkey, chain, device, JSON report."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from iota.config import RunSettings
from iota.config.settings import ChainSettings, SettingsError, WalletSettings


def settings_help(cls: type) -> str:
    """Every setting of a role, for --help: they come from .env or the environment (IOTA_NAME=value)."""
    lines = ["settings (environment or .env, as IOTA_<NAME>):"]
    for name, info in cls.model_fields.items():  # type: ignore[attr-defined]
        lines.append(f"  IOTA_{name.upper():<26} {info.description} (default: {info.default})")
    return "\n".join(lines)


def add_run_options(parser: argparse.ArgumentParser, show_defaults: bool = True) -> None:
    """--preset, --stages, ... : command-line overrides of the run settings (a flag wins over IOTA_<NAME>);
    their help names the setting's default unless the command shows its own (`show_defaults=False`)."""
    for name, info in RunSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind: type = info.annotation if info.annotation in (int, float) else str  # type: ignore[assignment]
        default = f" (default: {info.default})" if show_defaults else ""
        parser.add_argument(
            flag,
            dest=f"run_{name}",
            metavar=name.upper(),
            type=kind,
            default=None,
            help=f"{info.description}{default}".replace("%", "%%"),
        )


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("run_") and v is not None}


def write_report(report: dict[str, Any], path: str | None) -> None:
    text = json.dumps(report, indent=1)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"report written to {path}")


def sentence(detail: Any) -> str:
    """An orchestrator's refusal as a sentence: its detail is a string, or {"code", "message", ...} from the
    signature check (iota.auth.verify), whose message is the sentence and code the reason's name."""
    if isinstance(detail, dict) and isinstance(detail.get("message"), str):
        code = detail.get("code")
        return f"{detail['message']} ({code})" if isinstance(code, str) else detail["message"]
    return str(detail)


def load_keypair(settings: WalletSettings) -> Any:
    """The role's hotkey; a missing or encrypted one is a settings problem (SettingsError), not a traceback."""
    from iota.auth import load_hotkey

    try:
        return load_hotkey(settings.wallet_path, settings.wallet_name, settings.wallet_hotkey)
    except (FileNotFoundError, ValueError) as error:
        create = (
            f"iota wallet create --path {settings.wallet_path} --name {settings.wallet_name} "
            f"--hotkey {settings.wallet_hotkey}"
        )
        raise SettingsError(
            [f"IOTA_WALLET_PATH/IOTA_WALLET_NAME/IOTA_WALLET_HOTKEY: {error} (here: {create})"]
        ) from None


def make_chain(settings: ChainSettings) -> Any:
    if settings.chain == "local":
        from iota.chain.local import LocalChain

        return LocalChain(settings.chain_path)
    from iota.chain.bittensor import BittensorChain

    return BittensorChain(settings.network, settings.netuid, settings.metagraph_sync_s)


def pick_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_memory(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
