"""The orchestrator as a miner or validator sees it: signed JSON calls, retried with backoff through restarts."""

from __future__ import annotations

import math
import time
from typing import Any, TypeVar

import httpx
from loguru import logger
from pydantic import BaseModel
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay

from iota.auth import HotkeyAuth
from iota.auth.ratelimit import RETRY_AFTER_HEADER, RETRY_AFTER_MS_HEADER
from iota.protocol import (
    Ack,
    PhaseReport,
    RegisterRequest,
    Registration,
    Release,
    ReleaseReason,
    Report,
    RunInfo,
    Status,
    Work,
    WorkRequest,
)

M = TypeVar("M", bound=BaseModel)
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class Refused(Exception):
    """The orchestrator answered 4xx: the request itself is wrong and repeating it will not help."""

    def __init__(self, status: int, detail: Any):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class _Unanswered(Exception):
    """No answer worth keeping (the orchestrator is unreachable or overloaded); retry_after: its Retry-After."""

    def __init__(self, why: str, retry_after: float = 0.0):
        super().__init__(why)
        self.retry_after = retry_after


def _seconds(retry_after: str | None) -> float:
    """A Retry-After header's delay in seconds; its date form (which the orchestrator never sends) counts as 0."""
    try:
        return max(0.0, float(retry_after or 0))
    except ValueError:
        return 0.0


def retry_after_s(headers: httpx.Headers) -> float:
    """How long a refusal asks to wait: its millisecond hint where it has a sound one, never longer than its
    Retry-After (whole seconds, rounded up), else the Retry-After."""
    seconds = _seconds(headers.get(RETRY_AFTER_HEADER))
    try:
        hint = float(headers.get(RETRY_AFTER_MS_HEADER, "")) / 1000
    except ValueError:
        return seconds
    if not math.isfinite(hint) or hint < 0:
        return seconds
    return min(hint, seconds) if seconds > 0 else hint


class OrchestratorClient:
    def __init__(
        self,
        url: str,
        keypair: Any,
        orchestrator_hotkey: str,
        *,
        timeout_s: float = 30.0,
        max_backoff_s: float = 10.0,
        give_up_s: float = 3600.0,
    ):
        self.auth = HotkeyAuth(keypair, orchestrator_hotkey)
        self.timeout_s = timeout_s
        self.http = httpx.Client(base_url=url.rstrip("/"), auth=self.auth, timeout=timeout_s)
        self.max_backoff_s = max_backoff_s
        self.give_up_s = give_up_s
        self._interrupted = False  # a plain flag: a signal handler sets it (see `interrupt`)

    @property
    def hotkey(self) -> str:
        return self.auth.hotkey

    def close(self) -> None:
        self.http.close()

    def interrupt(self) -> None:
        """Stop retrying: a request waiting to retry, and any later one that fails, raises ConnectionError at
        once. For a process that is stopping, which should not wait out an orchestrator's restart; safe to call
        from a signal handler (it only sets a flag)."""
        self._interrupted = True

    def call(
        self,
        method: str,
        path: str,
        out: type[M],
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
        give_up_s: float | None = None,
        extra_s: float = 0.0,
    ) -> M:
        """One request, retried while the orchestrator is unreachable or overloaded (it may be restarting):
        after 0.2, 0.4, ... up to max_backoff_s seconds, or the Retry-After it sends if longer, for give_up_s;
        ``extra_s``: the orchestrator may hold it this long before it starts answering."""
        content = body.model_dump_json().encode() if body is not None else b""
        headers = {"content-type": "application/json"}
        timeout: Any = httpx.USE_CLIENT_DEFAULT
        if extra_s:
            timeout = httpx.Timeout(self.timeout_s, read=self.timeout_s + extra_s)
        limit = self.give_up_s if give_up_s is None else give_up_s
        last: list[_Unanswered] = []

        def attempt() -> httpx.Response:
            if self._interrupted and last:
                raise ConnectionError(f"not retrying {method} {path}, the client was interrupted: {last[-1]}")
            try:
                response = self.http.request(
                    method, path, content=content, headers=headers, params=params, timeout=timeout
                )
            except httpx.TransportError as error:
                last.append(_Unanswered(f"{type(error).__name__}: {error}"))
                raise last[-1] from error
            if response.status_code in RETRY_STATUS:
                retry_after = retry_after_s(response.headers)
                last.append(_Unanswered(f"{response.status_code} {response.text[:200]}", retry_after))
                raise last[-1]
            return response

        def wait(state: RetryCallState) -> float:
            # An overloaded orchestrator says when to come back (spread, so that its refusals return apart).
            backoff = min(0.2 * 2 ** (state.attempt_number - 1), self.max_backoff_s)
            return max(backoff, min(last[-1].retry_after, self.max_backoff_s))

        def log_retry(state: RetryCallState) -> None:
            delay = state.next_action.sleep if state.next_action else 0.0
            logger.warning("{} {}: {}; retrying in {:.1f} s", method, path, last[-1], delay)

        policy = Retrying(
            retry=retry_if_exception_type(_Unanswered),
            stop=stop_after_delay(limit),
            wait=wait,
            sleep=self._pause,
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            response = policy(attempt)
        except _Unanswered as error:
            raise ConnectionError(f"orchestrator unreachable for {limit:.0f} s: {error}") from None
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise Refused(response.status_code, detail)
        return out.model_validate_json(response.content)

    def _pause(self, seconds: float) -> None:
        """Sleep, in short slices so that `interrupt` takes effect within a quarter of a second."""
        end = time.monotonic() + seconds
        while not self._interrupted and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.25))

    def run_info(self) -> RunInfo:
        return self.call("GET", "/run", RunInfo)

    def status(self) -> Status:
        return self.call("GET", "/status", Status)

    def register(self, request: RegisterRequest) -> Registration:
        return self.call("POST", "/miners/register", Registration, request)

    def work(self, forward: bool = True, hold_s: float = 0.0) -> Work:
        """The next item; with ``hold_s``, the orchestrator may hold the request that long while there is none."""
        return self.call("POST", "/work", Work, WorkRequest(forward=forward, hold_s=hold_s), extra_s=hold_s)

    def report(self, report: Report) -> Ack:
        return self.call("POST", f"/work/{report.hop_id}/report", Ack, report)

    def release(self, hop_id: int, epoch: int, reason: ReleaseReason = "stopping") -> Ack:
        return self.call(
            "POST", f"/work/{hop_id}/release", Ack, Release(reason=reason), params={"epoch": epoch}
        )

    def heartbeat(self) -> Ack:
        return self.call("POST", "/miners/heartbeat", Ack)

    def leave(self, give_up_s: float | None = None) -> Ack:
        return self.call("POST", "/miners/leave", Ack, give_up_s=give_up_s)

    def phase_report(self, report: PhaseReport) -> Ack:
        return self.call("POST", "/phase/report", Ack, report)
