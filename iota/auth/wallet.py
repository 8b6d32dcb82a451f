"""Bittensor wallets on disk (``<path>/<name>/coldkey``, ``coldkeypub.txt``, ``hotkeys/<hotkey>``): create and load.

The layout is bittensor's own, so a wallet made here works with btcli and the other way round. ``create_wallet`` is
non-interactive, for local runs and scripts: the coldkey is written WITHOUT a password (anyone who can read the
file controls its funds), so for a wallet that holds real TAO create the coldkey with btcli and only add hotkeys
here. Hotkeys are unencrypted, as bittensor's are by default: processes sign with them unattended.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bittensor import Wallet


def create_wallet(
    path: str | Path,
    name: str,
    hotkey: str,
    overwrite: bool = False,
    *,
    exist_ok: bool = False,
    on_mnemonic: Callable[[str, str], None] | None = None,
) -> Wallet:
    """Create wallet ``name`` with hotkey ``hotkey`` under ``path``, without prompting.

    An existing coldkey is always kept (the hotkey is added to it): replacing a coldkey can lose funds, so that takes
    deleting it by hand. An existing hotkey raises FileExistsError unless ``overwrite`` (replace it) or
    ``exist_ok`` (keep it). ``on_mnemonic(role, words)``
    receives each new mnemonic ("coldkey" or "hotkey") so a CLI can show it; it is printed nowhere otherwise.
    """
    wallet = Wallet(name=name, hotkey=hotkey, path=str(Path(path).expanduser()))

    def reveal(role: str) -> Callable[[str], None] | None:
        return None if on_mnemonic is None else (lambda words: on_mnemonic(role, words))

    # Check ourselves: bittensor asks "Overwrite? (y/N)" on a terminal instead of refusing.
    has_coldkey = wallet.coldkey_file.exists_on_device() or wallet.coldkeypub_file.exists_on_device()
    if not has_coldkey:
        wallet.create_new_coldkey(use_password=False, suppress=True, on_mnemonic=reveal("coldkey"))
    if wallet.hotkey_file.exists_on_device() and not overwrite:
        if exist_ok:
            return wallet
        raise FileExistsError(f"hotkey {wallet.hotkey_file.path} exists; pass overwrite=True to replace it")
    wallet.create_new_hotkey(
        use_password=False, overwrite=overwrite, suppress=True, on_mnemonic=reveal("hotkey")
    )
    return wallet


def load_hotkey(path: str | Path, name: str, hotkey: str) -> Any:
    """The hotkey keypair (``bittensor.sp_core.Keypair``) of wallet ``name``, read without prompting."""
    wallet = Wallet(name=name, hotkey=hotkey, path=str(Path(path).expanduser()))
    keyfile = wallet.hotkey_file
    if not keyfile.exists_on_device():
        raise FileNotFoundError(f"no hotkey at {keyfile.path}; create it with `iota wallet create` or btcli")
    if keyfile.is_encrypted():
        raise ValueError(
            f"hotkey {keyfile.path} is encrypted; iota signs unattended and needs a plain hotkey"
        )
    return wallet.hotkey
