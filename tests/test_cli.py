"""The `iota` command: help for every subcommand, every setting listed, and the set-up commands an operator runs
(config, wallet create, chain register, data prepare) working and safe to repeat."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from iota.chain.local import LocalChain
from iota.cli import main, parser
from iota.config import MinerSettings, OrchestratorSettings
from iota.data import load_prepared

REPO = Path(__file__).resolve().parent.parent


def iota(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m iota ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "iota", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def subcommands() -> list[str]:
    actions = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


def test_top_level_help_names_every_subcommand() -> None:
    result = iota("--help")
    assert result.returncode == 0, result.stderr
    for name in subcommands():
        assert name in result.stdout
    assert {"orchestrator", "miner", "local", "baseline", "eval", "export", "config"} <= set(subcommands())


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "iota"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: iota" in result.stdout


@pytest.mark.parametrize("name", subcommands())
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert f"usage: iota {name}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("role", "settings"), [("orchestrator", OrchestratorSettings), ("miner", MinerSettings)]
)
def test_role_help_lists_every_setting(role: str, settings: type[BaseSettings]) -> None:
    result = iota(role, "--help")
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"\bIOTA_[A-Z0-9_]+\b", result.stdout))
    expected = {f"IOTA_{name.upper()}" for name in settings.model_fields}
    assert listed == expected, f"missing {sorted(expected - listed)}, extra {sorted(listed - expected)}"
    for name, info in settings.model_fields.items():
        line = next(x for x in result.stdout.splitlines() if f"IOTA_{name.upper()} " in x)
        assert str(info.description) in line and f"default: {info.default}" in line


def test_config_prints_env_example(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("IOTA_PORT=1\n")  # the template, never the operator's values
    result = iota("config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (REPO / ".env.example").read_text()


def test_wallet_create_and_chain_register_are_idempotent(tmp_path: Path) -> None:
    wallets, chain_path = tmp_path / "wallets", tmp_path / "chain" / "chain.json"
    created = [
        iota("wallet", "create", "--path", str(wallets), "--name", "m0", "--hotkey", "h") for _ in "12"
    ]
    assert all(r.returncode == 0 for r in created), [r.stderr for r in created]
    first, again = (re.search(r"hotkey (\w{48})", r.stdout) for r in created)
    assert first and again and first.group(1) == again.group(1), "a re-run must keep the existing hotkey"
    hotkey = first.group(1)
    assert (wallets / "m0" / "hotkeys" / "h").is_file() and (wallets / "m0" / "coldkeypub.txt").is_file()

    register = ["chain", "register", "--chain-path", str(chain_path), "--hotkey", hotkey, "--stake", "5"]
    registered = [iota(*register) for _ in "12"]
    assert all(r.returncode == 0 for r in registered), [r.stderr for r in registered]
    assert registered[0].stdout == registered[1].stdout and "registered uid 0" in registered[0].stdout
    (neuron,) = LocalChain(chain_path).neurons()
    assert neuron.hotkey == hotkey and neuron.stake == 5 and not neuron.validator_permit

    # Re-running with other values updates them rather than adding a second registration.
    updated = iota(*register[:-1], "7", "--validator")
    assert updated.returncode == 0, updated.stderr
    (neuron,) = LocalChain(chain_path).neurons()
    assert neuron.stake == 7 and neuron.validator_permit


def test_data_prepare_tokenizes_a_small_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex the jolly bard".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + "." for i in range(400)]
    corpus.write_text("\n\n".join(lines))
    out = tmp_path / "prepared"
    result = iota("data", "prepare", str(corpus), "--vocab-size", "300", "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer_kind"] == "bpe" and manifest["vocab_size"] <= 300
    prepared = load_prepared(out)  # checks every shard's digest
    assert prepared.manifest.total_tokens == len(prepared.tokens) > 1000
    assert int(prepared.tokens.max()) < prepared.manifest.vocab_size
