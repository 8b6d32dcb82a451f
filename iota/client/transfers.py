"""Object transfers as a miner or validator makes them: presigned GETs and PUTs, digest- and size-checked, retried
through a restarting store; the run's data shards fetched once and cached; the merge's store over the URLs a
work item names."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
from loguru import logger
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential

from iota.data import DataPlan, TokenData
from iota.storage.transfer import DigestMismatch, TooLarge, TransferError, download, upload

TRANSFER_PATIENCE_S = (
    180.0  # how long a transfer keeps trying through an unreachable store (a restarting orchestrator)
)


def _worth_waiting(error: BaseException) -> bool:
    """A store that is down or overloaded may come back; a 4xx, or bytes that are wrong or too many, will not."""
    if not isinstance(error, TransferError) or isinstance(error, (DigestMismatch, TooLarge)):
        return False
    return error.status is None or error.status >= 500 or error.status in (408, 429)


def _patient(action: Any, what: str) -> Any:
    """Run a transfer (itself retried briefly), and again after 1, 2, 4, ... 15 s while the store seems down,
    for TRANSFER_PATIENCE_S; then its last error is raised."""

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.warning("{} failed ({}); retrying in {:.0f} s", what, error, delay)

    policy = Retrying(
        retry=retry_if_exception(_worth_waiting),
        stop=stop_after_delay(TRANSFER_PATIENCE_S),
        wait=wait_exponential(multiplier=1.0, max=15.0),
        before_sleep=log_retry,
        reraise=True,
    )
    return policy(action)


def get(
    url: str, sha: str | None, max_bytes: int, http: httpx.Client, byte_range: tuple[int, int] | None = None
) -> bytes:
    return _patient(lambda: download(url, sha, max_bytes, http, byte_range=byte_range), "download")  # type: ignore[no-any-return]


def put(url: str, data: bytes, http: httpx.Client) -> None:
    _patient(lambda: upload(url, data, http), "upload")


def fetch_data(plan: DataPlan, urls: dict[str, str], cache_dir: Path, http: httpx.Client) -> TokenData:
    """The plan's shards, fetched once by URL, checked against the plan's sha256, and cached on disk."""
    directory = cache_dir / "data" / plan.digest[:16]
    directory.mkdir(parents=True, exist_ok=True)
    for shard in plan.shards:
        path = directory / shard.file
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != shard.sha256:
            path.write_bytes(get(urls[shard.file], shard.sha256, 1 << 34, http))
    return TokenData.open(directory, plan)


class UrlStore:
    """The merge's BlobStore over presigned URLs: a miner reads and writes only the keys its work item names."""

    def __init__(self, gets: dict[str, str], puts: dict[str, str], http: httpx.Client, max_bytes: int):
        self.gets, self.puts, self.http, self.max_bytes = gets, puts, http, max_bytes

    def get(self, key: str) -> bytes:
        return get(self._url(self.gets, key), None, self.max_bytes, self.http)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return get(self._url(self.gets, key), None, self.max_bytes, self.http, byte_range=(start, end))

    def put(self, key: str, data: bytes) -> None:
        put(self._url(self.puts, key), data, self.http)

    @staticmethod
    def _url(urls: dict[str, str], key: str) -> str:
        if key not in urls:
            raise KeyError(f"the work item gives no URL for {key}")
        return urls[key]
