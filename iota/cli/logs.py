"""Where the `iota` command's log lines go: INFO and below to stdout, WARNING and above to stderr.

A process manager (PM2) shows stderr as errors: loguru's default sink (everything to stderr) made every progress
line of a healthy miner look like one. LOGURU_LEVEL (loguru's own variable) still sets the lowest level shown.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from loguru import logger

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{line} - {message}"


def configure_logging(level_name: str) -> None:
    """Replace loguru's sinks by the two streams, showing `level_name` and above; call at the start of the
    command (again: the same result)."""
    level = logger.level(level_name).no
    warning = logger.level("WARNING").no
    logger.remove()
    logger.add(
        _stream("stdout"), level=level, format=FORMAT, filter=lambda record: record["level"].no < warning
    )
    logger.add(_stream("stderr"), level=max(level, warning), format=FORMAT)


def _stream(name: str) -> Callable[[str], None]:
    """A sink writing to sys.<name> as it is when a line is logged (pytest and tools replace the streams)."""

    def write(message: str) -> None:
        stream = getattr(sys, name)
        stream.write(message)
        stream.flush()  # a line at a time: PM2 and `tail -f` show it at once

    return write
