"""Session-wide test set-up: the no-pickle guard for every Python process a test starts, and shared prepared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOPICKLE_DIR = REPO / "tests" / "support" / "nopickle"
_saved_environ: list[dict[str, str]] = []


def pytest_configure(config: pytest.Config) -> None:
    _saved_environ.append(dict(os.environ))
    # Tests are hermetic: an operator's IOTA_* settings must not change what a test builds or starts.
    for name in [n for n in os.environ if n.startswith("IOTA_")]:
        del os.environ[name]
    # OpenMP threads that spin while waiting turn a busy 2-core machine (tests beside other work, several iota
    # processes at once) into a 40x slowdown of torch on CPU; passive waiting costs nothing when it is idle.
    # Set before any test module imports torch, and inherited by every subprocess.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Every subprocess a test starts inherits os.environ (iota/local.py copies it for each role), so with this
    # folder first on PYTHONPATH each of them imports the guard in its sitecustomize.py before any other code.
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(NOPICKLE_DIR), *([previous] if previous else [])])


def pytest_unconfigure(config: pytest.Config) -> None:
    if _saved_environ:
        saved = _saved_environ.pop()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory shared by the session, with the `test` preset's data already prepared in it.

    Pass it as `data_dir` (RunSettings, `--data-dir`): the BPE is trained and the KJV tokenized once per session
    (about 6 s) instead of once per test.
    """
    from iota.config import RunSettings
    from iota.train.run import load_data, prepared_dir

    directory = tmp_path_factory.mktemp("prepared-data")
    settings = RunSettings(preset="test", data_dir=directory)
    load_data(settings)
    assert (prepared_dir(settings) / "manifest.json").is_file()
    return directory
