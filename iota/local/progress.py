"""What `iota local` prints while it works: a progress line per job, with its total, rate and ETA where known.

On a terminal the line is rewritten in place. In a log or a pipe a new line is printed when the count or the note
moves (at most every `every_s`) and otherwise every `quiet_s`, so the output is never silent for long and never
repeats itself. tqdm formats the numbers (its `format_meter`); the clock and the stream are arguments, so that a
test can drive a reporter without waiting.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

COUNTED = "{desc}: {n:,}/{total:,} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
# Until the count has moved twice there is no rate: tqdm would guess n / elapsed, slowed by the start-up.
BEFORE_RATE = "{desc}: {n:,}/{total:,} {unit} ({percentage:.0f}%) [{elapsed}<?]{postfix}"
UNCOUNTED = "{desc}: {elapsed}{postfix}"


class Progress:
    """The progress of one job: `update(n, note)` as often as convenient; it decides what is worth printing."""

    def __init__(
        self,
        what: str,
        total: int | None = None,
        unit: str = "",
        *,
        out: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = 5.0,
        quiet_s: float = 8.0,  # under 10 s even when the box is so loaded that a heartbeat comes late
        enabled: bool = True,
    ):
        self.what, self.total, self.unit, self.enabled = what, total, unit, enabled
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.clock, self.every_s, self.quiet_s = clock, every_s, quiet_s
        self.started = clock()
        self.n, self.note = 0, ""
        # When and where the count first moved: the rate is measured from there, not through a slow start-up.
        self._moved: tuple[float, int] | None = None
        self._printed_at = float("-inf")
        self._shown: tuple[int, str] | None = None  # what the last line said, apart from the clock
        self._lock = threading.Lock()  # a heartbeat thread updates too

    def update(self, n: int, note: str = "") -> None:
        if not self.enabled:
            return
        with self._lock:
            now = self.clock()
            if self._moved is None and n != self.n:
                self._moved = (now, n)
            self.n, self.note = n, note
            since = now - self._printed_at
            if self.tty:
                due = since >= 0.5  # rewritten in place: the clock may tick
            else:
                due = since >= self.quiet_s or ((n, note) != self._shown and since >= self.every_s)
            if due:
                self._print(now)

    def close(self, note: str | None = None) -> None:
        """The job is over: its last line, whatever was printed before."""
        if not self.enabled:
            return
        with self._lock:
            if note is not None:
                self.note = note
            self._print(self.clock())
            if self.tty:
                self.out.write("\n")
                self.out.flush()

    def line(self, now: float) -> str:
        rate = None
        if self._moved is not None and now > self._moved[0] and self.n > self._moved[1]:
            rate = (self.n - self._moved[1]) / (now - self._moved[0])
        counted = self.total is not None and self.total > 0
        bar_format = UNCOUNTED if not counted else COUNTED if rate is not None else BEFORE_RATE
        return tqdm.format_meter(
            self.n,
            self.total if counted else None,
            now - self.started,
            prefix=self.what,
            unit=self.unit,
            unit_scale=True,
            rate=rate,
            postfix=self.note or None,
            bar_format=bar_format,
        )

    def _print(self, now: float) -> None:
        text = self.line(now)
        self._printed_at, self._shown = now, (self.n, self.note)
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.out.write("\r" + text[:width].ljust(width))
        else:
            self.out.write(text + "\n")
        self.out.flush()


@contextmanager
def step(what: str, beat: bool = True, **options: Any) -> Iterator[Progress]:
    """A job that may block for long (a pull, an eval, processes stopping, polls of a busy server): its line now,
    again from a thread every few seconds while it runs (unless `beat` is off: the job shows its own bar), and at
    the end how long it took ("done" for a job without a count; a counted one keeps its last note)."""
    progress = Progress(what, **options)
    progress.update(0)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(1.0):
            progress.update(progress.n, progress.note)

    thread = threading.Thread(target=heartbeat, name=f"progress: {what}", daemon=True)
    beating = beat and progress.enabled
    if beating:
        thread.start()
    try:
        yield progress
    finally:
        stop.set()
        if beating:
            thread.join()
    progress.close("done" if progress.total is None else None)
