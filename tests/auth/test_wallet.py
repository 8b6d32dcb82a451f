"""Wallets in bittensor's layout: created without prompts, loaded back, usable for signing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from bittensor import Wallet
from bittensor.sp_core import Keypair

from iota.auth import create_wallet, load_hotkey


def test_create_then_load_hotkey(tmp_path: Path) -> None:
    shown: list[str] = []
    wallet = create_wallet(tmp_path, "miner", "stage0", on_mnemonic=lambda role, words: shown.append(role))
    assert shown == ["coldkey", "hotkey"]
    hotkey_file = tmp_path / "miner" / "hotkeys" / "stage0"
    assert hotkey_file.exists() and (tmp_path / "miner" / "coldkeypub.txt").exists()
    assert stat.S_IMODE(hotkey_file.stat().st_mode) == 0o600

    keypair = load_hotkey(tmp_path, "miner", "stage0")
    assert keypair.ss58_address == wallet.hotkey.ss58_address
    # bittensor reads the same wallet (the coldkey has no password: no prompt here).
    assert Wallet("miner", "stage0", str(tmp_path)).coldkey.ss58_address == wallet.coldkeypub.ss58_address
    signature = keypair.sign(b"hello")
    assert Keypair(ss58_address=keypair.ss58_address).verify(b"hello", signature)


def test_second_hotkey_shares_the_coldkey_and_existing_hotkey_is_protected(tmp_path: Path) -> None:
    first = create_wallet(tmp_path, "w", "h1")
    second = create_wallet(tmp_path, "w", "h2")
    assert second.coldkeypub.ss58_address == first.coldkeypub.ss58_address
    assert second.hotkey.ss58_address != first.hotkey.ss58_address

    with pytest.raises(FileExistsError):
        create_wallet(tmp_path, "w", "h1")
    kept = create_wallet(tmp_path, "w", "h1", exist_ok=True)
    assert kept.hotkey.ss58_address == first.hotkey.ss58_address
    replaced = create_wallet(tmp_path, "w", "h1", overwrite=True)
    assert replaced.hotkey.ss58_address != first.hotkey.ss58_address
    assert replaced.coldkeypub.ss58_address == first.coldkeypub.ss58_address  # never replaced


def test_load_missing_hotkey_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="iota wallet create"):
        load_hotkey(tmp_path, "nobody", "default")
