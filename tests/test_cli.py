"""The `iota` command: help for every subcommand, every setting listed, and the set-up commands an operator runs
(config, wallet create, chain register, data prepare) working and safe to repeat."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from iota import __version__ as iota_version
from iota.auth import create_wallet
from iota.chain.local import LocalChain
from iota.checkpoint.generate import continuation
from iota.cli import main, parser
from iota.cli.roles import keep_report, local_overrides
from iota.client.orchestrator import OrchestratorClient
from iota.config import MinerSettings, OrchestratorSettings
from iota.data import load_prepared
from iota.local import LOCAL_DEFAULTS
from iota.protocol import RegisterRequest
from tests.miner.conftest import Net, make_net  # noqa: F401  (the fixture)

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

    # By wallet name: its hotkey with its coldkey, nothing pasted.
    by_name = [
        "--wallet",
        "m0",
        "--wallet-path",
        str(wallets),
        "--wallet-hotkey",
        "h",
        "--stake",
        "7",
        "--validator",
    ]
    other_chain = tmp_path / "other-chain.json"  # the hotkey above was registered with itself as coldkey
    assert iota("chain", "register", "--chain-path", str(other_chain), *by_name).returncode == 0
    (neuron,) = LocalChain(other_chain).neurons()
    coldkey = (wallets / "m0" / "coldkeypub.txt").read_text()
    assert neuron.hotkey == hotkey and neuron.coldkey in coldkey
    missing = iota("chain", "register", "--chain-path", str(other_chain), "--wallet", "nobody")
    assert (
        missing.returncode == 2
        and "iota wallet create" in missing.stderr
        and "Traceback" not in missing.stderr
    )


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


def test_version() -> None:
    result = iota("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"iota {iota_version}"


def test_local_help_shows_the_defaults_iota_local_uses() -> None:
    result = iota("local", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    # iota local's own defaults, not the run settings': 5 epochs (the setting's default is 1), 48 samples.
    assert (
        f"--epochs EPOCHS Epochs the run trains; 0 trains until stopped (default: {LOCAL_DEFAULTS['epochs']})"
        in text
    )
    assert f"(default: {LOCAL_DEFAULTS['samples_per_epoch']})" in text
    assert "--miners-per-stage MINERS_PER_STAGE miners on each stage (default: 2)" in text
    assert "IOTA_<NAME>" in text and "(default: None)" not in text


def test_iota_local_takes_run_settings_from_dotenv_under_its_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # setup.sh's .env is .env.example: a line at the setting's default (IOTA_STAGES=3) chooses nothing.
    (tmp_path / ".env").write_text((REPO / ".env.example").read_text() + "IOTA_EPOCHS=5\nIOTA_LR=0.01\n")
    args = parser().parse_args(["local", "--lr", "0.02"])
    assert local_overrides(args) == {"epochs": 5, "lr": 0.02}  # a flag wins; IOTA_PORT is no run setting


def test_each_local_run_keeps_its_report(tmp_path: Path) -> None:
    latest = tmp_path / "runs" / "local-report.json"
    latest.parent.mkdir()
    latest.write_text('{"run": "before"}')
    kept = keep_report({"run": "this"}, latest)
    assert re.fullmatch(r"local-report-\d{8}-\d{6}\.json", kept.name) and kept.parent == latest.parent
    assert json.loads(kept.read_text()) == json.loads(latest.read_text()) == {"run": "this"}


def test_generated_text_never_holds_replacement_characters() -> None:
    # A byte-level tokenizer: each id one byte, as the BPE's base alphabet. "é" is two bytes, "€" three.
    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    prompt = list("café".encode())
    euro = list("€".encode())
    assert continuation(decode, prompt, euro) == "€"  # one character from three tokens
    assert continuation(decode, prompt, euro[:2]) == ""  # cut off by the last token
    assert continuation(decode, prompt, [0xFF, *b" ok"]) == " ok"  # no UTF-8


@pytest.fixture
def registered_miner(
    make_net: Callable[..., Net],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Net, str]:
    """An orchestrator with one miner registered and alive, whose wallet and settings `iota miner status` reads."""
    net = make_net(miners=0)
    hotkey = create_wallet(tmp_path / "wallets", "m", "default").hotkey
    LocalChain(tmp_path / "chain.json").register(hotkey.ss58_address, hotkey.ss58_address)
    client = OrchestratorClient(net.url, hotkey, net.orchestrator_hotkey, give_up_s=30)
    client.register(RegisterRequest(device="cpu", memory_bytes=1 << 34, session="status-test"))
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "IOTA_WALLET_PATH": str(tmp_path / "wallets"),
        "IOTA_WALLET_NAME": "m",
        "IOTA_ORCHESTRATOR_URL": net.url,
        "IOTA_ORCHESTRATOR_HOTKEY": net.orchestrator_hotkey,
        "IOTA_MINER_DIR": str(tmp_path / "miner"),
    }.items():
        monkeypatch.setenv(name, value)
    return net, hotkey.ss58_address


def test_miner_status_makes_a_signed_call_and_says_why_the_miner_is_idle(
    registered_miner: tuple[Net, str], capsys: pytest.CaptureFixture[str]
) -> None:
    net, hotkey = registered_miner
    assert main(["miner", "status"]) == 0
    out = capsys.readouterr().out
    assert f"hotkey      {hotkey}" in out
    # Its stage is staffed, the others have no miner: nothing can reach it.
    assert re.search(r"state       idle: waiting for other stages .*no live miner on stage", out), out


def test_miner_status_reports_a_wrong_orchestrator_hotkey(
    registered_miner: tuple[Net, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    net, _ = registered_miner
    wrong = create_wallet(net.root / "wallets", "other", "default").hotkey.ss58_address
    monkeypatch.setenv("IOTA_ORCHESTRATOR_HOTKEY", wrong)
    assert main(["miner", "status"]) == 1  # it used to say "alive", as its unsigned call was not refused
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("refused")]
    assert f"IOTA_ORCHESTRATOR_HOTKEY={wrong} is not this orchestrator's hotkey" in line
    assert f"set IOTA_ORCHESTRATOR_HOTKEY={net.orchestrator_hotkey}" in line and "wrong_receiver" in line


def test_a_refused_operator_call_is_a_sentence(
    registered_miner: tuple[Net, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "pause"]) == 1  # a miner's key is not the operator's
    out = capsys.readouterr().out
    assert out.startswith("refused (403): ") and "{" not in out and "'" not in out.split(":", 1)[1][:3]


def test_validator_status_shows_a_human_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hotkey = create_wallet(tmp_path / "wallets", "v", "default").hotkey.ss58_address
    (tmp_path / "validator").mkdir()
    at = time.time() - 600
    status = {"audits": 3, "failed": 0, "last_weights": {"weights": {"a": 1.0}, "at": at}}
    (tmp_path / "validator" / f"status-{hotkey}.json").write_text(json.dumps(status))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IOTA_WALLET_PATH", str(tmp_path / "wallets"))
    monkeypatch.setenv("IOTA_WALLET_NAME", "v")
    monkeypatch.setenv("IOTA_VALIDATOR_DIR", str(tmp_path / "validator"))
    monkeypatch.setenv("IOTA_ORCHESTRATOR_HOTKEY", hotkey)
    assert main(["validator", "status"]) == 0
    out = capsys.readouterr().out
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(at))
    assert (
        f"last weights  1 miners, {stamp}" in out and re.search(r"\(1\d min ago\)", out) and "unix" not in out
    )
