"""Fixtures of the security tests: the prepared data, real sr25519 keys, and a moto S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest
from bittensor.keyfiles import Keypair

from iota.train.run import load_data
from tests.orchestrator import run_settings
from tests.security import NAMES
from tests.support.s3 import moto_admin, moto_endpoint, s3_bucket  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test preset's data, prepared once for every security test module (load_data skips prepared data)."""
    root = tmp_path_factory.getbasetemp() / "security-data"
    load_data(run_settings(root, root / "unused-run"))
    return root


@pytest.fixture(scope="session")
def keypairs() -> dict[str, Keypair]:
    return {name: Keypair.create_from_mnemonic(Keypair.generate_mnemonic()) for name in NAMES}
