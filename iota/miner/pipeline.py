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
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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
    asked_at: float = 0.0  # time.monotonic() when the request was made
    begun: int = 0  # hops the main thread had begun when the request was made

    @property
    def settled(self) -> bool:
        """Worth handing to the main thread: anything but a `wait`, or a `wait` whose `holding` list the main
        thread must act on (only a quiet answer's list is complete: a forward still being reported is missing)."""
        return self.work.kind != "wait" or (self.quiet and self.work.holding is not None)


class Prefetcher:
    """Looks for the miner's next items on `depth` threads.

    `start(forward)` begins a search unless `depth` are under way (the depth may be lowered, never raised): its
    thread asks for work (`forward()` says, at each request, whether forward work may be given), and on a `wait`
    answer sleeps for the answer's `wait_s`, woken early by `kick` (a report went out, so the answer may differ
    now), and asks again, until the answer is `settled`. `take` blocks until a search has settled and returns its
    answer (the first to settle); when `stopping()` turns true it stops the asking and returns an answer that comes
    within STOP_GRACE_S (a leased item the caller must release), else None: a request may be held by the
    orchestrator for a while, and what the searches lease is handed back when the stopping miner leaves. `close`
    waits for the requests in progress. With depth > 1 a miner over a long link keeps several requests for work and
    downloads in flight at once.
    """

    def __init__(self, fetch: Callable[[bool], Fetched], depth: int = 1):
        self._fetch, self.depth = fetch, depth
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="prefetch")
        self._futures: list[Future[Fetched | None]] = []
        self._kicks = 0  # counts `kick`s: a search sleeping through a `wait` wakes when it moves
        self._woken = threading.Condition()
        self._cancel = threading.Event()

    @property
    def searching(self) -> int:
        """Searches started and not taken."""
        return len(self._futures)

    def start(self, forward: Callable[[], bool], after_s: float = 0.0) -> None:
        """Begin looking, after `after_s` (a `wait` the main thread was told to honour; `kick` cuts it short)."""
        if len(self._futures) >= self.depth:
            return  # as many searches as the depth are under way (or were, before the depth was lowered)
        self._cancel.clear()
        self._futures.append(self._pool.submit(self._search, forward, after_s))

    def kick(self) -> None:
        """Ask again now rather than at the end of the current `wait`."""
        with self._woken:
            self._kicks += 1
            self._woken.notify_all()

    def take(self, stopping: Callable[[], bool]) -> Fetched | None:
        """The first settled answer (None: stopped before one came); an exception raised while asking is raised
        here."""
        if not self._futures:
            raise RuntimeError("nothing was started")
        while True:
            if stopping():
                self._cancel.set()
                self.kick()
                done, _ = wait(self._futures, timeout=STOP_GRACE_S, return_when=FIRST_COMPLETED)
                return self._pop(done) if done else None
            done, _ = wait(self._futures, timeout=TAKE_POLL_S, return_when=FIRST_COMPLETED)
            if done:
                return self._pop(done)

    def close(self) -> None:
        self._cancel.set()
        self.kick()
        self._pool.shutdown(wait=True)

    def _pop(self, done: set[Future[Fetched | None]]) -> Fetched | None:
        future = next(f for f in self._futures if f in done)  # the earliest started among those done
        self._futures.remove(future)
        return future.result()

    def _sleep(self, seconds: float, kicks: int) -> None:
        """Sleep up to `seconds`, or until a kick after the count `kicks`."""
        with self._woken:
            self._woken.wait_for(lambda: self._kicks != kicks or self._cancel.is_set(), timeout=seconds)

    def _search(self, forward: Callable[[], bool], after_s: float) -> Fetched | None:
        if after_s > 0:
            self._sleep(after_s, self._kicks)
        while not self._cancel.is_set():
            kicks = self._kicks  # a kick during the request below cuts the sleep after it
            fetched = self._fetch(forward())
            if fetched.settled or self._cancel.is_set():
                return fetched
            self._sleep(fetched.work.wait_s, kicks)
        return None


class Outbox(Generic[T, R]):
    """Sends finished items on `workers` threads (in order, one at a time, with one) while the main thread computes
    the next.

    `send(item)` uploads and reports one item and handles the failures it expects itself; what it returns (other
    than None) is kept for the main thread, which takes it with `collect`, in the order items were put. An
    exception that escapes `send` is raised on the main thread by the next `put`, `drain` or `collect`. At most
    `depth` items wait behind the one being sent: `put` blocks beyond that, so a slow store slows the miner down
    instead of piling outputs up. `on_sent` runs on the sending thread after each item. With several workers, an
    item for which `barrier(item)` holds is sent after every item put before it and before any put after it (a
    report that completes an inner step and commits to it must reach the orchestrator between the step's
    reports and the next step's).
    """

    def __init__(
        self,
        send: Callable[[T], R | None],
        depth: int = 1,
        on_sent: Callable[[], None] | None = None,
        workers: int = 1,
        barrier: Callable[[T], bool] = lambda item: False,
    ):
        self._send, self.depth, self._on_sent, self._barrier = send, max(depth, workers), on_sent, barrier
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="outbox")
        self._last_barrier: Future[R | None] | None = None
        self._queue: deque[tuple[T, Future[R | None]]] = deque()
        self._lock = (
            threading.Lock()
        )  # the prefetch thread reads the queue (`unsent`) while the main thread edits it
        self._results: list[R] = []

    def put(self, item: T) -> None:
        self._settle(self.depth)
        with self._lock:
            if self._barrier(item):
                after = [future for _, future in self._queue]
            else:
                after = [self._last_barrier] if self._last_barrier is not None else []
            # Submitted after what it waits for: the pool starts items in order, so the wait always ends.
            future = self._pool.submit(self._send_one, item, after)
            if self._barrier(item):
                self._last_barrier = future
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

    def _send_one(self, item: T, after: list[Future[R | None]]) -> R | None:
        wait(after)  # their failures are raised in order by `_settle`
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
