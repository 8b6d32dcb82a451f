"""Fixtures: the `db` of the state tests (SQLite and a real PostgreSQL), and data prepared once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from iota.train.run import load_data
from tests.orchestrator import run_settings
from tests.state.conftest import db  # noqa: F401  (every scheduler test runs on both engines)
from tests.support.postgres import postgres_dsn, postgres_server  # noqa: F401  (used by `db`)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KJV tokenized by the test preset's BPE, prepared once: every app of the session reuses it (~9 s)."""
    root = tmp_path_factory.mktemp("data")
    load_data(run_settings(root, root / "unused-run"))
    return root
