"""The orchestrator checks what it needs before it migrates or prepares anything: `iota orchestrator` without its
bucket or its database stops at once with one line naming the setting and the command that fixes it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from iota.auth import create_wallet
from iota.chain.local import LocalChain
from iota.config import OrchestratorSettings
from iota.orchestrator.preflight import banner, preflight
from tests.support.s3 import moto_admin, moto_endpoint  # noqa: F401  (fixtures)


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orchestrator(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """`iota orchestrator` with a wallet, a local chain and these IOTA_* settings, run until it exits."""
    create_wallet(tmp_path / "wallets", "orchestrator", "default", exist_ok=True)
    env = {
        **os.environ,
        "IOTA_WALLET_PATH": str(tmp_path / "wallets"),
        "IOTA_WALLET_NAME": "orchestrator",
        "IOTA_CHAIN_PATH": str(tmp_path / "chain.json"),
        "IOTA_RUN_DIR": str(tmp_path / "run"),
        "IOTA_DATA_DIR": str(tmp_path / "data"),
        "IOTA_PRESET": "test",
        **{f"IOTA_{name.upper()}": value for name, value in settings.items()},
    }
    return subprocess.run(
        [sys.executable, "-m", "iota", "orchestrator"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def nothing_was_prepared(tmp_path: Path) -> bool:
    """No database migrated, no data prepared: the checks ran first."""
    return not (tmp_path / "run" / "state.db").exists() and not any(
        (tmp_path / "data").glob("*/manifest.json")
    )


def test_without_its_bucket_it_stops_with_the_command_that_creates_it(
    tmp_path: Path,
    moto_endpoint: str,  # noqa: F811
) -> None:
    result = orchestrator(
        tmp_path,
        store="s3",
        s3_endpoint=moto_endpoint,
        s3_bucket="never-created",
        s3_access_key="k",
        s3_secret_key="s",
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith("iota: error: IOTA_S3_BUCKET=never-created: no such bucket")
    assert f"aws s3 mb s3://never-created --endpoint-url {moto_endpoint}" in lines[0]
    assert "create_bucket(Bucket='never-created')" in lines[0]
    assert nothing_was_prepared(tmp_path)


def test_without_its_database_it_stops_with_one_line_and_hides_the_password(tmp_path: Path) -> None:
    port = closed_port()
    result = orchestrator(tmp_path, state_url=f"postgresql://iota:hunter2@127.0.0.1:{port}/iota")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"iota: error: IOTA_STATE_URL=postgresql://iota:***@127.0.0.1:{port}/iota:")
    assert f"PostgreSQL does not answer at 127.0.0.1:{port}" in lines[0]
    assert "hunter2" not in result.stderr + result.stdout
    assert nothing_was_prepared(tmp_path)


def test_every_missing_piece_is_reported_at_once(tmp_path: Path) -> None:
    settings = OrchestratorSettings(  # type: ignore[call-arg]
        _env_file=None,
        run_dir=tmp_path / "run",
        data_dir=tmp_path / "data",
        chain_path=tmp_path / "chain.json",
        state_url=f"postgresql://iota@127.0.0.1:{closed_port()}/iota",
        corpus=str(tmp_path / "missing.txt"),
    )
    problems = preflight(settings, lambda: LocalChain(settings.chain_path))
    assert [p.split("=")[0] for p in problems] == ["IOTA_STATE_URL", "IOTA_CORPUS"], problems
    assert "PostgreSQL does not answer" in problems[0] and "missing.txt" in problems[1]


def test_what_it_needs_being_there_it_may_start(tmp_path: Path, data_dir: Path) -> None:
    settings = OrchestratorSettings(  # type: ignore[call-arg]
        _env_file=None,
        preset="test",
        run_dir=tmp_path / "run",
        data_dir=data_dir,
        chain_path=tmp_path / "c.json",
    )
    assert preflight(settings, lambda: LocalChain(settings.chain_path)) == []
    assert list((tmp_path / "run" / "store").rglob("preflight-*")) == []  # the probe object is gone


def test_the_banner_says_what_an_operator_publishes(tmp_path: Path) -> None:
    settings = OrchestratorSettings(  # type: ignore[call-arg]
        _env_file=None,
        public_url="https://orchestrator.example.org",
        run_id="llama-a",
        store="s3",
        s3_bucket="iota-runs",
        state_url="postgresql://iota:hunter2@db:5432/iota",
    )
    text = "\n".join(banner(settings, "5Orchestrator"))
    for shown in (
        "https://orchestrator.example.org",
        "5Orchestrator",
        "llama-a",
        "iota-runs",
        "iota:***@db:5432",
    ):
        assert shown in text
    assert "hunter2" not in text


@pytest.fixture(autouse=True)
def _no_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no developer's .env reaches a check
