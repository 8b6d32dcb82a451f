"""Overlap a miner's HTTP with its compute: find the next item and send finished ones on threads beside it.

The main thread keeps every torch call (the stage worker is not thread-safe). Beside it, a `Prefetcher` asks the
orchestrator for the next item and downloads its input while the current one computes, and an `Outbox` uploads
each output and then reports it, in order, while the next one computes. Neither touches the worker: what they
learn that concerns it (a `holding` list, a refused report) goes back to the main thread as a value.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from iota.protocol import Work

T = TypeVar("T")
R = TypeVar("R")
TAKE_POLL_S = 0.1  # how often a blocked `take` looks at the stop flag (a signal handler only sets a flag)
STOP_GRACE_S = 1.0  # how long a stopping `take` waits for the request in progress (it may be held far longer)


@dataclass(frozen=True)
class Fetched:
    """An answer to a request for work, with the input of a forward or backward already downloaded."""

    work: Work
    data: bytes | None = None
    error: Exception | None = None  # the download failed: the main thread releases the item
    quiet: bool = False  # asked while nothing of this miner's was unreported: a `holding` list is complete

    @property
    def settled(self) -> bool:
        """Worth handing to the main thread: anything but a `wait`, or a `wait` whose `holding` list the main
        thread must act on (only a quiet answer's list is complete: a forward still being reported is missing)."""
        return self.work.kind != "wait" or (self.quiet and self.work.holding is not None)


class Prefetcher:
    """Looks for the miner's next item on a thread.

    `start(forward)` begins: the thread asks for work (`forward()` says, at each request, whether forward work may
    be given), and on a `wait` answer sleeps for the answer's `wait_s`, woken early by `kick` (a report went out,
    so the answer may differ now), and asks again, until the answer is `settled`. `take` blocks until then; when
    `stopping()` turns true it stops the asking and returns the answer to the request in progress if it comes
    within STOP_GRACE_S (a leased item the caller must release), else None: the request may be held by the
    orchestrator for a while, and what it leases is handed back when the stopping miner leaves. `close` waits
    for that request.
    """

    def __init__(self, fetch: Callable[[bool], Fetched]):
        self._fetch = fetch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._future: Future[Fetched | None] | None = None
        self._wake = threading.Event()
        self._cancel = threading.Event()

    def start(self, forward: Callable[[], bool], after_s: float = 0.0) -> None:
        """Begin looking, after `after_s` (a `wait` the main thread was told to honour; `kick` cuts it short)."""
        if self._future is not None:
            raise RuntimeError("the previous answer has not been taken")
        self._cancel.clear()
        self._wake.clear()
        self._future = self._pool.submit(self._search, forward, after_s)

    def kick(self) -> None:
        """Ask again now rather than at the end of the current `wait`."""
        self._wake.set()

    def take(self, stopping: Callable[[], bool]) -> Fetched | None:
        """The settled answer (None: stopped before asking); an exception raised while asking is raised here."""
        future = self._future
        if future is None:
            raise RuntimeError("nothing was started")
        try:
            while True:
                if stopping():
                    self._cancel.set()
                    self._wake.set()
                    try:
                        return future.result(timeout=STOP_GRACE_S)
                    except TimeoutError:
                        return None
                try:
                    return future.result(timeout=TAKE_POLL_S)
                except TimeoutError:
                    continue
        finally:
            self._future = None

    def close(self) -> None:
        self._cancel.set()
        self._wake.set()
        self._pool.shutdown(wait=True)

    def _search(self, forward: Callable[[], bool], after_s: float) -> Fetched | None:
        if after_s > 0:
            self._wake.wait(after_s)
        while not self._cancel.is_set():
            self._wake.clear()  # a kick during the request below cuts the sleep after it
            fetched = self._fetch(forward())
            if fetched.settled or self._cancel.is_set():
                return fetched
            self._wake.wait(fetched.work.wait_s)
        return None


class Outbox(Generic[T, R]):
    """Sends finished items on a thread, one at a time and in order, while the main thread computes the next.

    `send(item)` uploads and reports one item and handles the failures it expects itself; what it returns (other
    than None) is kept for the main thread, which takes it with `collect`. An exception that escapes `send` is
    raised on the main thread by the next `put`, `drain` or `collect`. At most `depth` items wait behind the one
    being sent: `put` blocks beyond that, so a slow store slows the miner down instead of piling outputs up.
    `on_sent` runs on the sending thread after each item.
    """

    def __init__(
        self, send: Callable[[T], R | None], depth: int = 1, on_sent: Callable[[], None] | None = None
    ):
        self._send, self._depth, self._on_sent = send, depth, on_sent
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._queue: deque[tuple[T, Future[R | None]]] = deque()
        self._lock = (
            threading.Lock()
        )  # the prefetch thread reads the queue (`unsent`) while the main thread edits it
        self._results: list[R] = []

    def put(self, item: T) -> None:
        self._settle(self._depth)
        future = self._pool.submit(self._send_one, item)
        with self._lock:
            self._queue.append((item, future))

    def unsent(self) -> list[T]:
        """Items not yet sent and reported (the one being sent included); safe from any thread."""
        with self._lock:
            return [item for item, future in self._queue if not future.done()]

    def drain(self) -> None:
        """Wait until everything put has been sent."""
        self._settle(0)

    def collect(self) -> list[R]:
        """What `send` returned for the items sent so far (each once)."""
        self._settle(None)
        results, self._results = self._results, []
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _send_one(self, item: T) -> R | None:
        try:
            return self._send(item)
        finally:
            if self._on_sent is not None:
                self._on_sent()

    def _settle(self, keep: int | None) -> None:
        """Take the results of sent items, in order; with `keep`, first wait until at most `keep` are unsent."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                item, future = self._queue[0]
                if not future.done() and (keep is None or len(self._queue) <= keep):
                    return
            result = future.result()  # raises what escaped `send`
            with self._lock:
                self._queue.popleft()
            if result is not None:
                self._results.append(result)
