"""The `iota` command's log streams (iota.cli.logs), in a real process: INFO and below on stdout, WARNING and
above on stderr, so that PM2 shows a healthy miner's lines as output and only its problems as errors."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
from loguru import logger
from iota.cli.logs import configure_logging
from iota.config.settings import log_level
configure_logging(log_level())
logger.debug("a debug line")
logger.info("an info line")
logger.warning("a warning line")
logger.error("an error line")
"""


def run(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True, env=env
    )


def test_info_goes_to_stdout_and_warnings_to_stderr() -> None:
    done = run()
    assert [line.split(" - ")[-1] for line in done.stdout.splitlines()] == ["a debug line", "an info line"]
    assert [line.split(" - ")[-1] for line in done.stderr.splitlines()] == ["a warning line", "an error line"]
    assert "| INFO     |" in done.stdout and "| WARNING  |" in done.stderr


def test_loguru_level_still_chooses_the_lowest_level_shown() -> None:
    done = run({**os.environ, "LOGURU_LEVEL": "ERROR"})
    assert done.stdout == ""
    assert [line.split(" - ")[-1] for line in done.stderr.splitlines()] == ["an error line"]
