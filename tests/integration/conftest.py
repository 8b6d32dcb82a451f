"""Fixtures for tests that run the network as real processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.s3 import moto_admin, moto_endpoint, s3_bucket  # noqa: F401


@pytest.fixture(scope="session")
def net_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared data shared by every network test of the session (tokenizing once)."""
    return tmp_path_factory.mktemp("net-data")
